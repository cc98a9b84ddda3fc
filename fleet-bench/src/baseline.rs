//! The yardstick: how many single-row commits per second this machine's Postgres makes
//! into a table like `history`, with 16 connections, and how the CPU was spent meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::machine::{CpuSplit, CpuTicks};
use crate::report::machine_text;
use crate::say;

/// Connections the baseline commits on.
pub const BASELINE_CONNECTIONS: usize = 16;

/// The machine's CPU split since `before` (none where `/proc/stat` cannot be read).
pub fn split(before: Option<CpuTicks>) -> Option<CpuSplit> {
    CpuTicks::now()?.since(&before?)
}

pub struct Baseline {
    /// Commits per second over the whole run.
    pub rate: f64,
    /// The fewest and the most commits made in one of its whole seconds.
    pub slowest_second: f64,
    pub fastest_second: f64,
}

impl Baseline {
    /// The fewest and the most commits made in one second.
    pub fn range(&self) -> [f64; 2] {
        [self.slowest_second, self.fastest_second]
    }
}

/// A baseline with how the machine's CPU was spent meanwhile, announced on stderr; `when`
/// tells the first (before the rollout) from the second (after it).
pub async fn measure_baseline(
    pool: &PgPool,
    seconds: u64,
    when: &str,
) -> Result<(Baseline, Option<CpuSplit>), String> {
    say(&format!(
        "baseline{when}: single-row insert commits, {BASELINE_CONNECTIONS} connections, {seconds} s"
    ));
    let machine_before = CpuTicks::now();
    let measured = baseline(pool, seconds).await?;
    let machine = split(machine_before);
    say(&format!(
        "baseline{when}: {:.0} commits/s (each second {:.0} to {:.0}); {}",
        measured.rate,
        measured.slowest_second,
        measured.fastest_second,
        machine_text(machine)
    ));
    Ok((measured, machine))
}

/// Single-row insert commits per second, 16 connections, into a table like `history`.
async fn baseline(pool: &PgPool, seconds: u64) -> Result<Baseline, String> {
    sqlx::query("CREATE TABLE bench_baseline (LIKE history INCLUDING DEFAULTS INCLUDING INDEXES)")
        .execute(pool)
        .await
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let commits = Arc::new(AtomicU64::new(0));
    // Commits made in each whole second: how steady the machine's durable write rate was.
    let each_second = {
        let commits = commits.clone();
        tokio::spawn(async move {
            let mut per_second = Vec::new();
            let mut last = 0;
            for s in 1..=seconds {
                tokio::time::sleep_until((start + Duration::from_secs(s)).into()).await;
                let now = commits.load(Ordering::Relaxed);
                per_second.push((now - last) as f64);
                last = now;
            }
            per_second
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..BASELINE_CONNECTIONS {
        let pool = pool.clone();
        let commits = commits.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let r = sqlx::query("INSERT INTO bench_baseline (rollout_id, rollout_namespace, rollout_name, time, cluster, step, action, event, message) VALUES (1, 'default', 'baseline', now(), 'spoke1', 0, 'Prep', 'ActionCompleted', 'Prep completed')")
                    .execute(&pool)
                    .await;
                if r.is_ok() {
                    commits.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let total = commits.load(Ordering::Relaxed);
    sqlx::query("DROP TABLE bench_baseline")
        .execute(pool)
        .await
        .map_err(|e| e.to_string())?;
    let per_second = each_second.await.unwrap_or_default();
    let rate = total as f64 / seconds as f64;
    Ok(Baseline {
        rate,
        slowest_second: per_second.iter().copied().reduce(f64::min).unwrap_or(rate),
        fastest_second: per_second.iter().copied().reduce(f64::max).unwrap_or(rate),
    })
}

pub async fn rows_written(pool: &PgPool, db: &str) -> Result<i64, String> {
    sqlx::query_scalar("SELECT (tup_inserted + tup_updated + tup_deleted)::bigint FROM pg_stat_database WHERE datname = $1")
        .bind(db)
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())
}

/// Rows inserted, updated or deleted so far, by table of the hub's schema (a partitioned
/// table's partitions counted as the table; the out-of-line storage of large values as
/// `<table> (toast)`).
pub async fn rows_by_table(pool: &PgPool) -> Result<BTreeMap<String, i64>, String> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT name, sum(n)::bigint FROM (
           SELECT coalesce(owner.relname || ' (toast)', parent.relname, s.relname)::text AS name,
                  s.n_tup_ins + s.n_tup_upd + s.n_tup_del AS n
           FROM pg_stat_all_tables s
           LEFT JOIN pg_class owner ON owner.reltoastrelid = s.relid
           LEFT JOIN pg_inherits i ON i.inhrelid = s.relid
           LEFT JOIN pg_class parent ON parent.oid = i.inhparent
           WHERE s.schemaname IN ('public', 'pg_toast')) t
         GROUP BY name",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| e.to_string())?;
    Ok(rows.into_iter().collect())
}
