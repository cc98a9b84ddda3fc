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
        hubs: replicas,
        kill_hub_after,
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
    // Whatever ends the run, its database goes with it.
    let result = async {
        let (baseline, baseline_machine) = measure_baseline(&db.pool, baseline_seconds, "").await?;

        // A child that exits or logs an error ends the run at once, with what it said.
        let watch = Watch::default();
        let mut hubs = Hubs::start(&watch, &db.url, replicas).await?;
        let (fleet, fleet_url) =
            start_fleet(&watch, clusters, &hubs.urls, &work.path().join("fleet"))?;
        let registration = wait_registered(&watch, &db.pool, clusters).await?;
        let (rows_before, tables_before) = settled_row_counts(&watch, &db.pool, &db.name).await?;

        let plan = Plan {
            max_concurrency,
            kill_hub_after,
        };
        let measured = rollout(&watch, &db.pool, &mut hubs, &fleet, plan).await?;
        let replicas_figures =
            replica_figures(&db.pool, (clusters, replicas), &fleet_url, &measured).await?;
        let history_query = history_query_seconds(hubs.first_alive()).await?;

        // A backend publishes its row counts when idle, up to 10 s late, and at the latest when it
        // exits: stop the hubs and wait until their connections are gone (15 s at most).
        hubs.retire();
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
            replicas: replicas_figures,
        };
        println!(
            "{}",
            serde_json::to_string(&figures.json()).unwrap_or_default()
        );
        println!();
        println!("{}", figures.text());
        Ok::<(), String>(())
    }
    .await;
    db.drop_database().await;
    result
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

/// The hub replicas, each `fleet-hub serve` on its own port and the one database, named
/// `hub-<i>` (their drivers' names start with it).
struct Hubs {
    children: Vec<Option<Watched>>,
    urls: Vec<String>,
}

impl Hubs {
    async fn start(watch: &Watch, db_url: &str, n: u32) -> Result<Hubs, String> {
        let mut hubs = Hubs {
            children: Vec::new(),
            urls: Vec::new(),
        };
        for i in 0..n {
            let port = free_port();
            let url = format!("http://127.0.0.1:{port}");
            let mut cmd = Command::new(binary("fleet-hub"));
            cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--database-url", db_url])
                .args(["--admin-token", ADMIN, "--join-token", JOIN])
                .env("POD_NAME", format!("hub-{i}"))
                .env(
                    "RUST_LOG",
                    std::env::var("FLEET_BENCH_HUB_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::null());
            let name = if n == 1 {
                "fleet-hub".to_string()
            } else {
                format!("fleet-hub {i}")
            };
            hubs.children.push(Some(watch.spawn(&name, cmd)?));
            wait_http(watch, &format!("{url}/readyz"), Duration::from_secs(60)).await?;
            hubs.urls.push(url);
        }
        Ok(hubs)
    }

    /// The replicas still running: their place, process and URL.
    fn alive(&self) -> impl Iterator<Item = (usize, &Watched, &str)> {
        self.children
            .iter()
            .zip(&self.urls)
            .enumerate()
            .filter_map(|(i, (c, u))| Some((i, c.as_ref()?, u.as_str())))
    }

    fn first_alive(&self) -> &str {
        self.alive().next().map_or("", |(_, _, u)| u)
    }

    /// The replica a driver's name says (`hub-<i>/<token>`).
    fn index_of(&self, driver: &str) -> Option<usize> {
        let i: usize = driver
            .strip_prefix("hub-")?
            .split('/')
            .next()?
            .parse()
            .ok()?;
        (i < self.children.len()).then_some(i)
    }

    /// Kills replica `i` with SIGKILL (as a node that dies would leave it).
    fn kill(&mut self, i: usize) {
        if let Some(child) = self.children.get_mut(i).and_then(Option::take) {
            child.retire();
        }
    }

    fn retire(self) {
        for child in self.children.into_iter().flatten() {
            child.retire();
        }
    }
}

/// The simulated fleet, given every hub URL; answers it with its API's URL.
fn start_fleet(
    watch: &Watch,
    clusters: u32,
    hub_urls: &[String],
    dir: &std::path::Path,
) -> Result<(Watched, String), String> {
    say(&format!("starting {clusters} simulated clusters"));
    let port = free_port();
    let mut cmd = Command::new(binary("spoke-agent"));
    cmd.args(["sim-fleet", "--count", &clusters.to_string()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir);
    for url in hub_urls {
        cmd.args(["--hub-url", url]);
    }
    cmd.args(["--join-token", JOIN])
        .args([
            "--sim-step-ms",
            "0",
            "--sim-reboot-ms",
            "0",
            "--sim-in-memory",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let fleet = watch.spawn("spoke-agent sim-fleet", cmd)?;
    Ok((fleet, format!("http://127.0.0.1:{port}")))
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
    /// When the driving replica was killed (seconds into the rollout), and which.
    killed: Option<(f64, usize)>,
    /// The longest time without a new transition, in seconds.
    longest_gap: f64,
}

/// How the rollout is run.
struct Plan {
    max_concurrency: u32,
    kill_hub_after: Option<f64>,
}

/// A replica's counters that the rollout moves, read before and after it.
#[derive(Clone, Copy, Default)]
struct Counters {
    http: f64,
    pushes: f64,
    passes: f64,
    pass_seconds: f64,
    cpu: f64,
}

impl Counters {
    async fn read(hub_url: &str, hub: &Watched) -> Counters {
        Counters {
            http: hub_counter(hub_url, "fleet_hub_http_requests_total").await,
            pushes: hub_counter(hub_url, "fleet_hub_spoke_pushes_total").await,
            passes: hub_counter(hub_url, "fleet_hub_engine_pass_duration_seconds_count").await,
            pass_seconds: hub_counter(hub_url, "fleet_hub_engine_pass_duration_seconds_sum").await,
            cpu: cpu_seconds(hub.pid()),
        }
    }

    /// What moved at each replica alive now, added up (a killed replica's share is lost).
    async fn moved(hubs: &Hubs, before: &[Counters]) -> Counters {
        let mut sum = Counters::default();
        for (i, hub, url) in hubs.alive() {
            let (a, b) = (Counters::read(url, hub).await, before[i]);
            sum.http += a.http - b.http;
            sum.pushes += a.pushes - b.pushes;
            sum.passes += a.passes - b.passes;
            sum.pass_seconds += a.pass_seconds - b.pass_seconds;
            sum.cpu += a.cpu - b.cpu;
        }
        sum
    }
}

/// Kills the replica that drives the rollout, once it is `after` seconds old and driven.
async fn kill_driver(
    pool: &PgPool,
    hubs: &mut Hubs,
    started: Instant,
    after: f64,
) -> Result<Option<(f64, usize)>, String> {
    let at = started.elapsed().as_secs_f64();
    if at < after {
        return Ok(None);
    }
    let driver: Option<String> =
        sqlx::query_scalar("SELECT driver FROM rollouts WHERE name = 'bench'")
            .fetch_one(pool)
            .await
            .map_err(|e| e.to_string())?;
    let Some(i) = driver.as_deref().and_then(|d| hubs.index_of(d)) else {
        return Ok(None);
    };
    say(&format!(
        "killing hub-{i}, which drives the rollout, {at:.1} s into it (SIGKILL)"
    ));
    hubs.kill(i);
    Ok(Some((at, i)))
}

async fn rollout(
    watch: &Watch,
    pool: &PgPool,
    hubs: &mut Hubs,
    fleet: &Watched,
    plan: Plan,
) -> Result<Rollout, String> {
    let mut before = Vec::new();
    for (_, hub, url) in hubs.alive() {
        before.push(Counters::read(url, hub).await);
    }
    let (fleet_cpu, postgres_cpu) = (cpu_seconds(fleet.pid()), postgres_cpu_seconds());
    let max_concurrency = plan.max_concurrency;
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
        let (peak, stop) = (peak_rss.clone(), stop.clone());
        let pids: Vec<i32> = hubs.alive().map(|(_, h, _)| h.pid()).collect();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let most = pids.iter().map(|&p| rss_kib(p)).max().unwrap_or(0);
                peak.fetch_max(most, Ordering::SeqCst);
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
        .post(format!("{}/v1/rollouts", hubs.first_alive()))
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
    let mut killed = None;
    // The longest stretch without a new transition (history row), seen every poll: the
    // rows' own times are whole seconds.
    let (mut newest, mut changed, mut longest_gap) = (None, Instant::now(), Duration::ZERO);
    loop {
        watch.check()?;
        if let (Some(after), None) = (plan.kill_hub_after, killed) {
            killed = kill_driver(pool, hubs, started, after).await?;
        }
        let row: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM history")
            .fetch_one(pool)
            .await
            .map_err(|e| e.to_string())?;
        if row != newest {
            longest_gap = longest_gap.max(changed.elapsed());
            (newest, changed) = (row, Instant::now());
        }
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
    let hwm = hubs.alive().map(|(_, h, _)| hwm_kib(h.pid())).max();
    let peak_rss_mib = peak_rss.load(Ordering::SeqCst).max(hwm.unwrap_or(0)) as f64 / 1024.0;
    let moved = Counters::moved(hubs, &before).await;
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
    // The replicas' metrics one after the other: their histograms add up.
    let mut metrics = String::new();
    let mut max: Option<f64> = None;
    for (_, _, url) in hubs.alive() {
        let text = crate::probe::get(&format!("{url}/metrics"))
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .unwrap_or_default();
        let most = gauge(&text, "fleet_hub_decision_latency_max_seconds");
        max = match (max, most) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        metrics.push_str(&text);
    }
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
        hub_cpu: moved.cpu,
        fleet_cpu: cpu_seconds(fleet.pid()) - fleet_cpu,
        // Backends of a killed replica take their CPU time with them: never below zero.
        postgres_cpu: (postgres_cpu_seconds() - postgres_cpu).max(0.0),
        passes: moved.passes,
        pass_seconds: moved.pass_seconds,
        http_requests: moved.http,
        pushes: moved.pushes,
        summary,
        killed,
        longest_gap: longest_gap.as_secs_f64(),
    })
}

/// Whether the replicas lost or repeated anything: from the history (each cluster completes
/// each of the three actions once, each start and completion is recorded once) and from the
/// spokes (each changes stage three times; a stage asked for again is not a change).
async fn replica_figures(
    pool: &PgPool,
    (clusters, hubs): (u32, u32),
    fleet_url: &str,
    measured: &Rollout,
) -> Result<crate::report::Replicas, String> {
    let (completed, repeated): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(DISTINCT (cluster, action)) FROM history
                 WHERE rollout_name = 'bench' AND event = 'ActionCompleted'),
                (SELECT count(*) - count(DISTINCT (cluster, step, action, event)) FROM history
                 WHERE rollout_name = 'bench' AND event IN ('ActionStarted', 'ActionCompleted'))",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| e.to_string())?;
    let expected = i64::from(clusters) * 3;
    let changed = hub_counter(fleet_url, "spoke_transitions_total{result=\"accepted\"}").await;
    let asked_again = hub_counter(fleet_url, "spoke_transitions_total{result=\"unchanged\"}").await;
    Ok(crate::report::Replicas {
        hubs,
        killed: measured.killed,
        longest_gap: measured.longest_gap,
        lost: expected - completed,
        repeated_in_history: repeated,
        repeated_at_spokes: (changed as i64 - expected).max(0),
        asked_again: asked_again as i64,
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
