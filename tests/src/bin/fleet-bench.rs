//! fleet-bench: how fast and how lean the hub orchestrates a large fleet, on this machine.
//!
//! It starts Postgres (the embedded default, or a fresh database on `--database-url`'s
//! server), measures the database's raw durable single-row commit rate, starts `fleet-hub
//! serve` and `spoke-agent sim-fleet` (steps that take no time) as separate processes, runs
//! one `[Prep, Upgrade, FinalizeUpgrade]` rollout over every cluster, and reports. It is a
//! benchmark: it prints numbers and never fails for being slow.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_e2e::machine::{CpuSplit, CpuTicks, USER_HZ};
use fleet_e2e::{ChildGuard, binary, free_port};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

const ADMIN: &str = "bench-admin";
const JOIN: &str = "bench-join";
const BASELINE_CONNECTIONS: usize = 16;
/// How long each baseline runs unless `--baseline-seconds` says otherwise.
const BASELINE_SECONDS: u64 = 10;

struct Args {
    clusters: u32,
    max_concurrency: u32,
    database_url: Option<String>,
    baseline_seconds: u64,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        clusters: 10_000,
        max_concurrency: 500,
        database_url: std::env::var("DATABASE_URL").ok(),
        baseline_seconds: BASELINE_SECONDS,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--clusters" => {
                a.clusters = value()?.parse().map_err(|e| format!("--clusters: {e}"))?
            }
            "--max-concurrency" => {
                a.max_concurrency = value()?
                    .parse()
                    .map_err(|e| format!("--max-concurrency: {e}"))?
            }
            "--database-url" => a.database_url = Some(value()?),
            "--baseline-seconds" => {
                a.baseline_seconds = value()?
                    .parse()
                    .map_err(|e| format!("--baseline-seconds: {e}"))?
            }
            "--help" | "-h" => {
                println!(
                    "fleet-bench [--clusters N (10000)] [--max-concurrency M (500)] [--database-url URL] [--baseline-seconds S (10)]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.clusters == 0 || a.max_concurrency == 0 || a.baseline_seconds == 0 {
        return Err(
            "--clusters, --max-concurrency and --baseline-seconds must be at least 1".into(),
        );
    }
    Ok(a)
}

#[tokio::main]
async fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fleet-bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(a).await {
        eprintln!("fleet-bench: {e}");
        std::process::exit(1);
    }
}

fn say(msg: &str) {
    eprintln!("[fleet-bench] {msg}");
}

async fn run(a: Args) -> Result<(), String> {
    let work = tempfile::Builder::new()
        .prefix("fleet-bench")
        .tempdir()
        .map_err(|e| e.to_string())?;
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| e.to_string())?;

    // The database: a fresh one, on the given server or on a private instance.
    let (_embedded, server_url) = match &a.database_url {
        Some(url) => (None, url.clone()),
        None => {
            say("starting a private Postgres (initdb)");
            let pg = hub::embedded_pg::EmbeddedPostgres::start(&work.path().join("pgdata"))
                .await
                .map_err(|e| e.to_string())?;
            let url = pg.url();
            (Some(pg), url)
        }
    };
    let name = format!("fleet_bench_{}", std::process::id());
    let admin =
        PgConnectOptions::from_str(&server_url).map_err(|e| format!("database URL: {e}"))?;
    let mut conn = PgConnection::connect_with(&admin)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let options = admin.clone().database(&name);
    let db_url = database_url(&server_url, &name);
    let pool = PgPoolOptions::new()
        .max_connections(BASELINE_CONNECTIONS as u32 + 2)
        .connect_with(options)
        .await
        .map_err(|e| e.to_string())?;
    hub::db::migrate(&pool).await.map_err(|e| e.to_string())?;

    let (baseline, baseline_machine) = measure_baseline(&pool, a.baseline_seconds, "").await?;

    let hub_port = free_port();
    let fleet_port = free_port();
    let hub_url = format!("http://127.0.0.1:{hub_port}");
    let hub = ChildGuard(
        Command::new(binary("fleet-hub"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{hub_port}"),
                "--database-url",
                &db_url,
                "--admin-token",
                ADMIN,
                "--join-token",
                JOIN,
            ])
            .env(
                "RUST_LOG",
                std::env::var("FLEET_BENCH_HUB_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting fleet-hub: {e}"))?,
    );
    wait_http(&format!("{hub_url}/readyz"), Duration::from_secs(60)).await?;
    say(&format!("starting {} simulated clusters", a.clusters));
    let fleet_dir = work.path().join("fleet");
    let fleet = ChildGuard(
        Command::new(binary("spoke-agent"))
            .args([
                "sim-fleet",
                "--count",
                &a.clusters.to_string(),
                "--listen",
                &format!("127.0.0.1:{fleet_port}"),
            ])
            .arg("--state-dir")
            .arg(&fleet_dir)
            .args([
                "--hub-url",
                &hub_url,
                "--join-token",
                JOIN,
                "--sim-step-ms",
                "0",
                "--sim-reboot-ms",
                "0",
                "--sim-in-memory",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting spoke-agent sim-fleet: {e}"))?,
    );
    let t = Instant::now();
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM clusters WHERE last_report IS NOT NULL")
                .fetch_one(&pool)
                .await
                .map_err(|e| e.to_string())?;
        if n as u32 >= a.clusters {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err(format!(
                "only {n} of {} clusters registered after 10 minutes",
                a.clusters
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say(&format!(
        "{} clusters registered and reporting after {:.1} s",
        a.clusters,
        t.elapsed().as_secs_f64()
    ));

    // The row counts before the rollout: a busy connection publishes its counts up to 10 s
    // late, so wait until they have not moved for 11 s (the fleet is idle now).
    say("waiting for Postgres's row counts to settle");
    let (mut rows_before, mut tables_before) = (rows_written(&pool, &name).await?, None);
    let mut still = Instant::now();
    let settle = Instant::now();
    while still.elapsed() < Duration::from_secs(11) && settle.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rows, tables) = (
            rows_written(&pool, &name).await?,
            rows_by_table(&pool).await?,
        );
        if rows != rows_before || tables_before.as_ref() != Some(&tables) {
            still = Instant::now();
        }
        (rows_before, tables_before) = (rows, Some(tables));
    }
    let tables_before = tables_before.unwrap_or_default();
    let http_before = hub_counter(&hub_url, "fleet_hub_http_requests_total").await;
    let pushes_before = hub_counter(&hub_url, "fleet_hub_spoke_pushes_total").await;
    let cpu_before = cpu_seconds(hub.pid());
    let fleet_cpu_before = cpu_seconds(fleet.pid());
    let pg_cpu_before = postgres_cpu_seconds();
    let passes_before = hub_counter(&hub_url, "fleet_hub_engine_pass_duration_seconds_count").await;
    let pass_seconds_before =
        hub_counter(&hub_url, "fleet_hub_engine_pass_duration_seconds_sum").await;

    say("starting the rollout");
    let ibgu = serde_json::json!({
        "apiVersion": "lcm.openshift.io/v1alpha1", "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "clusterLabelSelectors": [{"matchExpressions": [{"key": "name", "operator": "Exists"}]}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
            "plan": [{"actions": ["Prep", "Upgrade", "FinalizeUpgrade"], "rolloutStrategy": {"maxConcurrency": a.max_concurrency, "timeout": 600}}]
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
        let phase: String = sqlx::query_scalar("SELECT phase FROM rollouts WHERE name = 'bench'")
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
        if phase == "Completed" {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            return Err("the rollout did not finish within an hour".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rollout_machine = split(machine_before);
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    let peak_rss_mib = peak_rss.load(Ordering::SeqCst).max(hwm_kib(hub.pid())) as f64 / 1024.0;
    let cpu = cpu_seconds(hub.pid()) - cpu_before;
    let fleet_cpu = cpu_seconds(fleet.pid()) - fleet_cpu_before;
    let pg_cpu = postgres_cpu_seconds() - pg_cpu_before;
    let passes =
        hub_counter(&hub_url, "fleet_hub_engine_pass_duration_seconds_count").await - passes_before;
    let pass_seconds = hub_counter(&hub_url, "fleet_hub_engine_pass_duration_seconds_sum").await
        - pass_seconds_before;
    let transitions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM history WHERE rollout_name = 'bench'")
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
    let summary: serde_json::Value =
        sqlx::query_scalar("SELECT status->'summary' FROM rollouts WHERE name = 'bench'")
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
    let http = hub_counter(&hub_url, "fleet_hub_http_requests_total").await - http_before;
    let pushes = hub_counter(&hub_url, "fleet_hub_spoke_pushes_total").await - pushes_before;
    let metrics = reqwest::get(format!("{hub_url}/metrics"))
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .unwrap_or_default();
    // A backend publishes its row counts when idle, up to 10 s late, and at the latest when it
    // exits: stop the hub and wait until its connections are gone (15 s at most).
    drop(hub);
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(15) {
        let backends: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(&name)
                .fetch_one(&pool)
                .await
                .map_err(|e| e.to_string())?;
        if backends <= i64::from(pool.size()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut by_table = rows_by_table(&pool).await?;
    for (table, n) in &tables_before {
        *by_table.entry(table.clone()).or_default() -= n;
    }
    by_table.retain(|_, n| *n != 0);
    let rows = rows_written(&pool, &name).await? - rows_before;
    // The same baseline again, the fleet stopped too: how far the machine moved meanwhile.
    drop(fleet);
    let (after, after_machine) =
        measure_baseline(&pool, a.baseline_seconds, " after the rollout").await?;
    let max = gauge(&metrics, "fleet_hub_decision_latency_max_seconds");
    // Interpolating inside a wide bucket can overshoot: no quantile exceeds the maximum seen.
    let capped = |q: f64| {
        quantile(&metrics, "fleet_hub_decision_latency_seconds", q)
            .map(|v| max.map_or(v, |m| v.min(m)))
    };
    let (p50, p99) = (capped(0.5), capped(0.99));
    let actions = a.clusters as f64 * 3.0;
    // The same comparison per CPU second the machine was busy: what a transition and a
    // commit cost in CPU time, leaving out what the hypervisor took (not busy time).
    let baseline_commits = |b: &Baseline| b.rate * a.baseline_seconds as f64;
    let per_cpu = per_busy_second(transitions as f64, rollout_machine);
    let baseline_per_cpu = per_busy_second(baseline_commits(&baseline), baseline_machine);
    let after_per_cpu = per_busy_second(baseline_commits(&after), after_machine);
    let cpu_ratio = per_cpu.zip(baseline_per_cpu).map(|(t, b)| t / b);
    let result = serde_json::json!({
        "clusters": a.clusters, "maxConcurrency": a.max_concurrency,
        "orchestrationSeconds": round(elapsed), "clusterActionsPerSecond": round(actions / elapsed),
        "transitions": transitions, "transitionsPerSecond": round(transitions as f64 / elapsed),
        "baselineCommitsPerSecond": round(baseline.rate), "baselineSecondsRange": baseline.range().map(round),
        "transitionsToBaseline": round(transitions as f64 / elapsed / baseline.rate),
        "baselineAfterCommitsPerSecond": round(after.rate), "baselineAfterSecondsRange": after.range().map(round),
        "transitionsToBaselineAfter": round(transitions as f64 / elapsed / after.rate),
        "machineDuringBaseline": baseline_machine.map(machine_json), "machineDuringRollout": rollout_machine.map(machine_json),
        "machineDuringBaselineAfter": after_machine.map(machine_json),
        "transitionsPerBusyCpuSecond": per_cpu.map(round), "baselineCommitsPerBusyCpuSecond": baseline_per_cpu.map(round),
        "baselineAfterCommitsPerBusyCpuSecond": after_per_cpu.map(round), "transitionsToBaselinePerBusyCpuSecond": cpu_ratio.map(round),
        "decisionLatencyP50Seconds": p50.map(round), "decisionLatencyP99Seconds": p99.map(round), "decisionLatencyMaxSeconds": max.map(round),
        "hubPeakRssMiB": round(peak_rss_mib), "hubCpuSeconds": round(cpu), "simFleetCpuSeconds": round(fleet_cpu), "postgresCpuSeconds": round(pg_cpu),
        "enginePasses": passes, "enginePassSeconds": round(pass_seconds),
        "rowsWritten": rows, "rowsWrittenByTable": by_table, "hubHttpRequestsServed": http, "hubPushesSent": pushes,
        "summary": summary,
    });
    println!("{}", serde_json::to_string(&result).unwrap_or_default());
    println!();
    println!("clusters                     {}", a.clusters);
    println!("max concurrency              {}", a.max_concurrency);
    println!("orchestration                {elapsed:.1} s   (target <= 60 s at 10,000 / 500)");
    println!("cluster-actions per second   {:.0}", actions / elapsed);
    println!(
        "transitions (history rows)   {transitions}   {:.0}/s",
        transitions as f64 / elapsed
    );
    let [slowest, fastest] = baseline.range();
    println!(
        "raw commit baseline          {:.0}/s (each second {slowest:.0} to {fastest:.0})   ratio {:.2}   (target >= 1.0)",
        baseline.rate,
        transitions as f64 / elapsed / baseline.rate
    );
    let [slowest, fastest] = after.range();
    println!(
        "2nd baseline, after rollout  {:.0}/s (each second {slowest:.0} to {fastest:.0})   ratio {:.2}",
        after.rate,
        transitions as f64 / elapsed / after.rate
    );
    println!(
        "machine during baseline      {}",
        machine_text(baseline_machine)
    );
    println!(
        "machine during rollout       {}",
        machine_text(rollout_machine)
    );
    println!(
        "machine during 2nd baseline  {}",
        machine_text(after_machine)
    );
    println!(
        "per busy CPU second          {} transitions, {} commits in the baseline ({} in the 2nd)   ratio {}",
        whole(per_cpu),
        whole(baseline_per_cpu),
        whole(after_per_cpu),
        cpu_ratio.map_or("-".into(), |r| format!("{r:.2}"))
    );
    println!(
        "decision latency             p50 {}  p99 {}  max {}   (target p99 <= 1 s)",
        fmt(p50),
        fmt(p99),
        fmt(max)
    );
    println!("hub peak RSS                 {peak_rss_mib:.0} MiB   (target <= 200 MiB)");
    println!(
        "hub CPU                      {cpu:.1} s   (simulated fleet: {fleet_cpu:.1} s, Postgres on this machine: {pg_cpu:.1} s)"
    );
    println!("engine passes                {passes}   {pass_seconds:.1} s in their transactions");
    let tables: Vec<String> = by_table.iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!(
        "rows written                 {rows}   ({})",
        tables.join(", ")
    );
    println!("hub HTTP requests served     {http}   pushes sent {pushes}");
    drop(pool);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await;
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `count` per CPU second the machine was busy (none where that is unknown).
fn per_busy_second(count: f64, machine: Option<CpuSplit>) -> Option<f64> {
    machine
        .filter(|m| m.busy_seconds > 0.0)
        .map(|m| count / m.busy_seconds)
}

fn whole(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn fmt(x: Option<f64>) -> String {
    x.map(|v| format!("{:.3} s", v))
        .unwrap_or_else(|| "-".into())
}

/// The same server, another database.
fn database_url(server_url: &str, db: &str) -> String {
    if let Some((base, query)) = server_url.split_once('?') {
        let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
        format!("{base}/{db}?{query}")
    } else {
        let base = server_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(server_url);
        format!("{base}/{db}")
    }
}

/// The machine's CPU split since `before` (none where `/proc/stat` cannot be read).
fn split(before: Option<CpuTicks>) -> Option<CpuSplit> {
    CpuTicks::now()?.since(&before?)
}

fn machine_json(s: CpuSplit) -> serde_json::Value {
    serde_json::json!({"busyPercent": round(s.busy), "idlePercent": round(s.idle), "stolenPercent": round(s.steal)})
}

fn machine_text(s: Option<CpuSplit>) -> String {
    match s {
        Some(s) => format!(
            "CPU busy {:.0} %, idle {:.0} %, stolen by the hypervisor {:.0} %",
            s.busy, s.idle, s.steal
        ),
        None => "CPU split unknown (no /proc/stat)".into(),
    }
}

struct Baseline {
    /// Commits per second over the whole run.
    rate: f64,
    /// The fewest and the most commits made in one of its whole seconds.
    slowest_second: f64,
    fastest_second: f64,
}

impl Baseline {
    /// The fewest and the most commits made in one second.
    fn range(&self) -> [f64; 2] {
        [self.slowest_second, self.fastest_second]
    }
}

/// A baseline with how the machine's CPU was spent meanwhile, announced on stderr; `when`
/// tells the first (before the rollout) from the second (after it).
async fn measure_baseline(
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

async fn rows_written(pool: &PgPool, db: &str) -> Result<i64, String> {
    sqlx::query_scalar("SELECT (tup_inserted + tup_updated + tup_deleted)::bigint FROM pg_stat_database WHERE datname = $1")
        .bind(db)
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())
}

/// Rows inserted, updated or deleted so far, by table of the hub's schema (and the
/// out-of-line storage of its large values, `<table> (toast)`).
async fn rows_by_table(pool: &PgPool) -> Result<BTreeMap<String, i64>, String> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(owner.relname || ' (toast)', s.relname)::text,
                (s.n_tup_ins + s.n_tup_upd + s.n_tup_del)::bigint
         FROM pg_stat_all_tables s LEFT JOIN pg_class owner ON owner.reltoastrelid = s.relid
         WHERE s.schemaname IN ('public', 'pg_toast')",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| e.to_string())?;
    Ok(rows.into_iter().collect())
}

async fn wait_http(url: &str, limit: Duration) -> Result<(), String> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{url} did not answer within {limit:?}"))
}

async fn hub_counter(hub_url: &str, name: &str) -> f64 {
    let text = match reqwest::get(format!("{hub_url}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// A quantile from a Prometheus histogram, interpolated within its bucket.
fn quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_count) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let frac = if count > prev_count {
                (rank - prev_count) / (count - prev_count)
            } else {
                1.0
            };
            return Some(prev_le + (le - prev_le) * frac);
        }
        (prev_le, prev_count) = (le, count);
    }
    None
}

fn proc_status(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib(pid: i32) -> u64 {
    proc_status(pid, "VmRSS:")
}

fn hwm_kib(pid: i32) -> u64 {
    proc_status(pid, "VmHWM:")
}

/// CPU time of every `postgres` process on this machine (0 when the server is elsewhere).
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_seconds)
        .sum()
}

fn cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / USER_HZ
}
