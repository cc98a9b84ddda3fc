//! One run, phase by phase: a fresh database and its baseline, the hub and the fleet as
//! processes, every cluster registered, one rollout timed, the baseline again, the report.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_e2e::{binary, free_port};
use hub::embedded_pg::EmbeddedPostgres;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::baseline::{BASELINE_CONNECTIONS, measure_baseline, rows_by_table, rows_written, split};
use crate::machine::CpuTicks;
use crate::probe::{
    cpu_seconds, gauge, hub_counter, hwm_kib, postgres_cpu_seconds, quantile, rss_kib, wait_http,
};
use crate::report::Figures;
use crate::watch::{Watch, Watched};
use crate::{Args, say};

const ADMIN: &str = "bench-admin";
const JOIN: &str = "bench-join";
/// Every wait of the bench has a deadline: a stuck phase ends the run with an error.
const REGISTRATION_DEADLINE: Duration = Duration::from_secs(600);
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(3600);
/// Open files the bench and its children (which inherit its limit) are to have at least: the
/// hub's and the fleet's connection limits.
const OPEN_FILES_WANTED: u64 = fleet_server::listen::OPEN_FILES_WANTED;

pub async fn run(args: Args) -> Result<(), String> {
    let Args {
        clusters,
        max_concurrency,
        database_url,
        baseline_seconds,
    } = args;
    let work = tempfile::Builder::new()
        .prefix("fleet-bench")
        .tempdir()
        .map_err(|e| e.to_string())?;
    // Run as root, the private Postgres runs as `postgres`, which must reach the directory.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| e.to_string())?;

    // The simulated fleet holds a connection or more per cluster: as many files. Raised
    // as far as the kernel allows when the bench may (run as root), else to the hard limit.
    let wanted = OPEN_FILES_WANTED.max(u64::from(clusters) * 3);
    raise_hard_limit(wanted);
    let limit = fleet_server::listen::raise_open_files(wanted);
    if limit < wanted {
        say(&format!(
            "the open-file limit is {limit}, below the {wanted} the hub and a fleet of \
             {clusters} need: raise the hard limit (ulimit -Hn)"
        ));
    }
    let db = BenchDatabase::create(database_url, work.path()).await?;
    let (baseline, baseline_machine) = measure_baseline(&db.pool, baseline_seconds, "").await?;

    // A child that exits or logs an error ends the run at once, with what it said.
    let watch = Watch::default();
    let (hub, hub_url) = start_hub(&watch, &db.url).await?;
    let fleet = start_fleet(&watch, clusters, &hub_url, &work.path().join("fleet"))?;
    let registration = wait_registered(&watch, &db.pool, clusters).await?;
    let (rows_before, tables_before) = settled_row_counts(&watch, &db.pool, &db.name).await?;

    let measured = rollout(&watch, &db.pool, &hub, &fleet, &hub_url, max_concurrency).await?;
    let history_query = history_query_seconds(&hub_url).await?;

    // A backend publishes its row counts when idle, up to 10 s late, and at the latest when it
    // exits: stop the hub and wait until its connections are gone (15 s at most).
    hub.retire();
    db.wait_hub_gone().await?;
    let mut rows_by_table = rows_by_table(&db.pool).await?;
    for (table, n) in &tables_before {
        *rows_by_table.entry(table.clone()).or_default() -= n;
    }
    rows_by_table.retain(|_, n| *n != 0);
    let rows = rows_written(&db.pool, &db.name).await? - rows_before;
    // The same baseline again, the fleet stopped too: how far the machine moved meanwhile.
    fleet.retire();
    let (after, after_machine) =
        measure_baseline(&db.pool, baseline_seconds, " after the rollout").await?;

    let figures = Figures {
        clusters,
        max_concurrency,
        baseline_seconds,
        elapsed: measured.elapsed,
        transitions: measured.transitions,
        baseline,
        baseline_machine,
        after,
        after_machine,
        rollout_machine: measured.machine,
        latency_p50: measured.latency[0],
        latency_p99: measured.latency[1],
        latency_max: measured.latency[2],
        hub_peak_rss_mib: measured.peak_rss_mib,
        hub_cpu: measured.hub_cpu,
        fleet_cpu: measured.fleet_cpu,
        postgres_cpu: measured.postgres_cpu,
        passes: measured.passes,
        pass_seconds: measured.pass_seconds,
        rows,
        rows_by_table,
        http_requests: measured.http_requests,
        pushes: measured.pushes,
        summary: measured.summary,
        history_query,
        registration,
    };
    println!(
        "{}",
        serde_json::to_string(&figures.json()).unwrap_or_default()
    );
    println!();
    println!("{}", figures.text());
    db.drop_database().await;
    Ok(())
}

/// Raises the hard limit of open files to `wanted` (at most the kernel's `fs.nr_open`) when
/// the bench is allowed to (as root); otherwise leaves it.
fn raise_hard_limit(wanted: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = wanted.min(most);
    if target > hard {
        // Refused without the privilege: the soft limit is raised to the hard one later.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, soft, target);
    }
}

/// How long the API takes to answer the rollout's history: of one cluster (`spoke1`), and
/// all of it.
async fn history_query_seconds(hub_url: &str) -> Result<[f64; 2], String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = [0.0; 2];
    for (i, query) in ["?cluster=spoke1", ""].iter().enumerate() {
        let t = Instant::now();
        let res = client
            .get(format!(
                "{hub_url}/v1/rollouts/default/bench/history{query}"
            ))
            .bearer_auth(ADMIN)
            .send()
            .await
            .map_err(|e| format!("reading the history: {e}"))?;
        if !res.status().is_success() {
            return Err(format!("reading the history: {}", res.status()));
        }
        res.bytes()
            .await
            .map_err(|e| format!("reading the history: {e}"))?;
        out[i] = t.elapsed().as_secs_f64();
    }
    Ok(out)
}

/// The bench's own database, on the given server or on a private instance it starts.
struct BenchDatabase {
    /// Keeps the private instance running (stopped when dropped).
    _embedded: Option<EmbeddedPostgres>,
    /// A connection to the server's maintenance database, to drop ours at the end.
    server: PgConnection,
    pool: PgPool,
    name: String,
    /// Our database's URL, for the hub.
    url: String,
}

impl BenchDatabase {
    async fn create(server_url: Option<String>, work: &std::path::Path) -> Result<Self, String> {
        let (embedded, server_url) = match server_url {
            Some(url) => (None, url),
            None => {
                say("starting a private Postgres (initdb)");
                let pg = EmbeddedPostgres::start(&work.join("pgdata"))
                    .await
                    .map_err(|e| e.to_string())?;
                let url = pg.url();
                (Some(pg), url)
            }
        };
        let name = format!("fleet_bench_{}", std::process::id());
        let admin =
            PgConnectOptions::from_str(&server_url).map_err(|e| format!("database URL: {e}"))?;
        let mut server = PgConnection::connect_with(&admin)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut server)
            .await
            .map_err(|e| e.to_string())?;
        let pool = PgPoolOptions::new()
            .max_connections(BASELINE_CONNECTIONS as u32 + 2)
            .connect_with(admin.database(&name))
            .await
            .map_err(|e| e.to_string())?;
        hub::db::migrate(&pool).await.map_err(|e| e.to_string())?;
        Ok(BenchDatabase {
            _embedded: embedded,
            url: database_url(&server_url, &name),
            server,
            pool,
            name,
        })
    }

    /// Waits (15 s at most) until only the bench's own connections are left.
    async fn wait_hub_gone(&self) -> Result<(), String> {
        let waited = Instant::now();
        while waited.elapsed() < Duration::from_secs(15) {
            let backends: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                    .bind(&self.name)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(|e| e.to_string())?;
            if backends <= i64::from(self.pool.size()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn drop_database(mut self) {
        self.pool.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut self.server)
        .await;
    }
}

/// The same server, another database.
fn database_url(server_url: &str, db: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server_url, String::new()),
    };
    let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
    format!("{base}/{db}{query}")
}

async fn start_hub(watch: &Watch, db_url: &str) -> Result<(Watched, String), String> {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(binary("fleet-hub"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--database-url", db_url])
        .args(["--admin-token", ADMIN, "--join-token", JOIN])
        .env(
            "RUST_LOG",
            std::env::var("FLEET_BENCH_HUB_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null());
    let hub = watch.spawn("fleet-hub", cmd)?;
    wait_http(watch, &format!("{url}/readyz"), Duration::from_secs(60)).await?;
    Ok((hub, url))
}

fn start_fleet(
    watch: &Watch,
    clusters: u32,
    hub_url: &str,
    dir: &std::path::Path,
) -> Result<Watched, String> {
    say(&format!("starting {clusters} simulated clusters"));
    let port = free_port();
    let mut cmd = Command::new(binary("spoke-agent"));
    cmd.args(["sim-fleet", "--count", &clusters.to_string()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir)
        .args(["--hub-url", hub_url, "--join-token", JOIN])
        .args([
            "--sim-step-ms",
            "0",
            "--sim-reboot-ms",
            "0",
            "--sim-in-memory",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    watch.spawn("spoke-agent sim-fleet", cmd)
}

/// Waits until every cluster registered and reported; answers how long that took (seconds).
async fn wait_registered(watch: &Watch, pool: &PgPool, clusters: u32) -> Result<f64, String> {
    let t = Instant::now();
    loop {
        watch.check()?;
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM clusters WHERE last_report IS NOT NULL")
                .fetch_one(pool)
                .await
                .map_err(|e| e.to_string())?;
        if n >= i64::from(clusters) {
            break;
        }
        if t.elapsed() > REGISTRATION_DEADLINE {
            return Err(format!(
                "only {n} of {clusters} clusters registered after {REGISTRATION_DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seconds = t.elapsed().as_secs_f64();
    say(&format!(
        "{clusters} clusters registered and reporting after {seconds:.1} s"
    ));
    Ok(seconds)
}

/// The row counts before the rollout: a busy connection publishes its counts up to 10 s
/// late, so wait until they have not moved for 11 s (the fleet is idle now; 60 s at most).
async fn settled_row_counts(
    watch: &Watch,
    pool: &PgPool,
    name: &str,
) -> Result<(i64, BTreeMap<String, i64>), String> {
    say("waiting for Postgres's row counts to settle");
    let (mut rows_before, mut tables_before) = (rows_written(pool, name).await?, None);
    let mut still = Instant::now();
    let settle = Instant::now();
    while still.elapsed() < Duration::from_secs(11) && settle.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        watch.check()?;
        let (rows, tables) = (rows_written(pool, name).await?, rows_by_table(pool).await?);
        if rows != rows_before || tables_before.as_ref() != Some(&tables) {
            still = Instant::now();
        }
        (rows_before, tables_before) = (rows, Some(tables));
    }
    Ok((rows_before, tables_before.unwrap_or_default()))
}

/// What the rollout itself cost, between its creation and its completion.
struct Rollout {
    elapsed: f64,
    transitions: i64,
    machine: Option<crate::machine::CpuSplit>,
    /// p50, p99 and the maximum of the hub's decision latency.
    latency: [Option<f64>; 3],
    peak_rss_mib: f64,
    hub_cpu: f64,
    fleet_cpu: f64,
    postgres_cpu: f64,
    passes: f64,
    pass_seconds: f64,
    http_requests: f64,
    pushes: f64,
    summary: serde_json::Value,
}

/// The hub's counters that the rollout moves, read before and after it.
struct Counters {
    http: f64,
    pushes: f64,
    passes: f64,
    pass_seconds: f64,
    hub_cpu: f64,
    fleet_cpu: f64,
    postgres_cpu: f64,
}

impl Counters {
    async fn read(hub_url: &str, hub: &Watched, fleet: &Watched) -> Counters {
        Counters {
            http: hub_counter(hub_url, "fleet_hub_http_requests_total").await,
            pushes: hub_counter(hub_url, "fleet_hub_spoke_pushes_total").await,
            passes: hub_counter(hub_url, "fleet_hub_engine_pass_duration_seconds_count").await,
            pass_seconds: hub_counter(hub_url, "fleet_hub_engine_pass_duration_seconds_sum").await,
            hub_cpu: cpu_seconds(hub.pid()),
            fleet_cpu: cpu_seconds(fleet.pid()),
            postgres_cpu: postgres_cpu_seconds(),
        }
    }
}

async fn rollout(
    watch: &Watch,
    pool: &PgPool,
    hub: &Watched,
    fleet: &Watched,
    hub_url: &str,
    max_concurrency: u32,
) -> Result<Rollout, String> {
    let before = Counters::read(hub_url, hub, fleet).await;
    say("starting the rollout");
    let ibgu = serde_json::json!({
        "apiVersion": "lcm.openshift.io/v1alpha1", "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "clusterLabelSelectors": [{"matchExpressions": [{"key": "name", "operator": "Exists"}]}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
            "plan": [{"actions": ["Prep", "Upgrade", "FinalizeUpgrade"], "rolloutStrategy": {"maxConcurrency": max_concurrency, "timeout": 600}}]
        }
    });
    let peak_rss = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop, pid) = (peak_rss.clone(), stop.clone(), hub.pid());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let machine_before = CpuTicks::now();
    let started = Instant::now();
    // A fresh connection may wait behind the fleet's (the hub serves a bounded number).
    let res = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| e.to_string())?
        .post(format!("{hub_url}/v1/rollouts"))
        .bearer_auth(ADMIN)
        .json(&ibgu)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if res.status() != 201 {
        return Err(format!(
            "creating the rollout: {} {}",
            res.status(),
            res.text().await.unwrap_or_default()
        ));
    }
    loop {
        watch.check()?;
        let phase: String = sqlx::query_scalar("SELECT phase FROM rollouts WHERE name = 'bench'")
            .fetch_one(pool)
            .await
            .map_err(|e| e.to_string())?;
        if phase == "Completed" {
            break;
        }
        if started.elapsed() > ROLLOUT_DEADLINE {
            return Err(format!(
                "the rollout did not finish within {ROLLOUT_DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let machine = split(machine_before);
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    let peak_rss_mib = peak_rss.load(Ordering::SeqCst).max(hwm_kib(hub.pid())) as f64 / 1024.0;
    let after = Counters::read(hub_url, hub, fleet).await;
    let transitions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM history WHERE rollout_name = 'bench'")
            .fetch_one(pool)
            .await
            .map_err(|e| e.to_string())?;
    let summary: serde_json::Value =
        sqlx::query_scalar("SELECT status->'summary' FROM rollouts WHERE name = 'bench'")
            .fetch_one(pool)
            .await
            .map_err(|e| e.to_string())?;
    let metrics = crate::probe::get(&format!("{hub_url}/metrics"))
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .unwrap_or_default();
    let max = gauge(&metrics, "fleet_hub_decision_latency_max_seconds");
    // Interpolating inside a wide bucket can overshoot: no quantile exceeds the maximum seen.
    let capped = |q: f64| {
        quantile(&metrics, "fleet_hub_decision_latency_seconds", q)
            .map(|v| max.map_or(v, |m| v.min(m)))
    };
    Ok(Rollout {
        elapsed,
        transitions,
        machine,
        latency: [capped(0.5), capped(0.99), max],
        peak_rss_mib,
        hub_cpu: after.hub_cpu - before.hub_cpu,
        fleet_cpu: after.fleet_cpu - before.fleet_cpu,
        postgres_cpu: after.postgres_cpu - before.postgres_cpu,
        passes: after.passes - before.passes,
        pass_seconds: after.pass_seconds - before.pass_seconds,
        http_requests: after.http - before.http,
        pushes: after.pushes - before.pushes,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn another_database_on_the_same_server() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "b"),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            database_url(
                "postgres:///fleet_hub?host=/tmp/x&port=5432&user=postgres",
                "b"
            ),
            "postgres:///b?host=/tmp/x&port=5432&user=postgres"
        );
    }
}
