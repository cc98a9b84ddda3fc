//! `fleet-bench` end to end, at a size a test can afford: it starts its own hub and fleet
//! (the workspace's `fleet-hub` and `spoke-agent`, which `cargo test --workspace` builds),
//! measures both baselines and the rollout, and reports every figure in its JSON line.

use std::process::{Command, Output};

use fleet_e2e::admin_url;
use serde_json::Value;

async fn bench(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleet-bench"));
    cmd.args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("fleet-bench runs"))
        .await
        .expect("fleet-bench's waiter")
}

fn number(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {report}"))
}

#[tokio::test]
async fn the_bench_reports_a_small_rollout_against_a_baseline_before_and_after_it() {
    let out = bench(&[
        "--clusters",
        "12",
        "--max-concurrency",
        "5",
        "--baseline-seconds",
        "1",
        "--database-url",
        &admin_url(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleet-bench failed: {stderr}");
    let line = stdout.lines().next().expect("a JSON line first");
    let report: Value = serde_json::from_str(line).expect("the first line is JSON");

    let summary = &report["summary"][0];
    assert_eq!(summary["completed"], 12, "{report}");
    assert_eq!(summary["failed"], 0, "{report}");
    // Each cluster's three actions were started and completed.
    let transitions = number(&report, "transitions");
    assert!(transitions >= 72.0, "{report}");
    let per_second = number(&report, "transitionsPerSecond");
    assert!(
        (per_second - transitions / number(&report, "orchestrationSeconds")).abs()
            <= per_second * 0.01,
        "{report}"
    );
    // Both baselines ran and each ratio is against its own.
    for (rate, ratio, range, machine) in [
        (
            "baselineCommitsPerSecond",
            "transitionsToBaseline",
            "baselineSecondsRange",
            "machineDuringBaseline",
        ),
        (
            "baselineAfterCommitsPerSecond",
            "transitionsToBaselineAfter",
            "baselineAfterSecondsRange",
            "machineDuringBaselineAfter",
        ),
    ] {
        let commits = number(&report, rate);
        assert!(commits > 0.0, "{rate}: {report}");
        // Within 2 % and the rounding to three decimals: not the other baseline's ratio.
        let expected = per_second / commits;
        assert!(
            (number(&report, ratio) - expected).abs() <= expected * 0.02 + 0.0005,
            "{ratio}: {report}"
        );
        let [slowest, fastest] = [0, 1].map(|i| report[range][i].as_f64().expect(range));
        assert!(0.0 < slowest && slowest <= fastest, "{range}: {report}");
        assert!(
            report[machine]["busyPercent"].is_number(),
            "{machine}: {report}"
        );
    }
    // Per busy CPU second: the machine's CPUs cannot have been busier than all of them for
    // the whole phase (slack for the counters' 10 ms ticks), and the ratio is of the two.
    let cpus = std::fs::read_to_string("/proc/stat")
        .expect("/proc/stat")
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as f64;
    let per_cpu = number(&report, "transitionsPerBusyCpuSecond");
    assert!(per_cpu * cpus >= per_second * 0.8, "{cpus} CPUs: {report}");
    for (per_cpu, rate) in [
        (
            "baselineCommitsPerBusyCpuSecond",
            "baselineCommitsPerSecond",
        ),
        (
            "baselineAfterCommitsPerBusyCpuSecond",
            "baselineAfterCommitsPerSecond",
        ),
    ] {
        let (per_cpu_value, rate_value) = (number(&report, per_cpu), number(&report, rate));
        assert!(
            per_cpu_value * cpus >= rate_value * 0.8,
            "{per_cpu}: {report}"
        );
    }
    let expected = per_cpu / number(&report, "baselineCommitsPerBusyCpuSecond");
    assert!(
        (number(&report, "transitionsToBaselinePerBusyCpuSecond") - expected).abs()
            <= expected * 0.02 + 0.0005,
        "{report}"
    );
    assert!(stdout.contains("per busy CPU second"), "{stdout}");
    assert!(stderr.contains("baseline after the rollout"), "{stderr}");
    assert!(stdout.contains("2nd baseline, after rollout"), "{stdout}");
    // The rest of what the issue asks for: actions per second, latency, the hub's memory and
    // CPU, rows written and requests served (at least one report per action).
    let orchestration = number(&report, "orchestrationSeconds");
    let actions_per_second = number(&report, "clusterActionsPerSecond");
    assert!(
        (actions_per_second - 36.0 / orchestration).abs() <= actions_per_second * 0.01,
        "{report}"
    );
    let [p50, p99, max] = [
        "decisionLatencyP50Seconds",
        "decisionLatencyP99Seconds",
        "decisionLatencyMaxSeconds",
    ]
    .map(|k| number(&report, k));
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{report}");
    assert!(number(&report, "hubPeakRssMiB") > 1.0, "{report}");
    assert!(number(&report, "hubCpuSeconds") > 0.0, "{report}");
    assert!(number(&report, "rowsWritten") >= transitions, "{report}");
    assert!(
        report["rowsWrittenByTable"]["history"].is_number(),
        "{report}"
    );
    assert!(number(&report, "hubHttpRequestsServed") >= 36.0, "{report}");
    assert_eq!(number(&report, "hubPushesSent"), 36.0, "{report}");
    assert!(number(&report, "registrationSeconds") > 0.0, "{report}");
    for query in ["cluster", "rollout"] {
        let t = report["historyQuerySeconds"][query].as_f64();
        assert!(t.is_some_and(|t| t > 0.0), "{query}: {report}");
    }
    // One hub, none killed: nothing lost or repeated, every stage changed once per action.
    assert_eq!(report["hubs"], 1, "{report}");
    assert!(report["killedHubAtSeconds"].is_null(), "{report}");
    assert!(number(&report, "failoverSeconds") >= 0.0, "{report}");
    for key in [
        "lostTransitions",
        "repeatedTransitions",
        "stagesPushedAgain",
    ] {
        assert_eq!(report[key], 0, "{key}: {report}");
    }
}

/// Two `fleet-hub serve` on one database, the fleet given both URLs, the replica that drives
/// the rollout killed with SIGKILL as soon as it drives it: the other finishes it.
#[tokio::test]
async fn a_killed_driver_is_replaced_and_nothing_is_lost_or_repeated() {
    let out = bench(&[
        "--clusters",
        "300",
        "--max-concurrency",
        "50",
        "--hubs",
        "2",
        "--kill-hub-after",
        "0",
        "--baseline-seconds",
        "1",
        "--database-url",
        &admin_url(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleet-bench failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(report["hubs"], 2);
    assert!(
        report["killedHubAtSeconds"].is_number(),
        "the driver was killed: {report}"
    );
    assert!(stderr.contains("which drives the rollout"), "{stderr}");
    assert_eq!(report["summary"][0]["completed"], 300, "{report}");
    assert_eq!(report["lostTransitions"], 0, "{report}");
    assert_eq!(report["repeatedTransitions"], 0, "{report}");
    // The target (5 s) is the bench's to report; this only catches the old 30 s wait for a
    // dead replica's pushes, or a lease that never lapses.
    let gap = number(&report, "failoverSeconds");
    assert!(gap < 20.0, "transitions stopped for {gap} s");
    eprintln!("failover: transitions stopped for {gap} s at most");
}

#[tokio::test]
async fn killing_the_only_hub_is_refused_before_anything_starts() {
    let out = bench(&["--clusters", "10", "--kill-hub-after", "1"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "fleet-bench: --kill-hub-after needs --hubs 2 or more: a replica must be left to take over"
    );
}

#[tokio::test]
async fn the_bench_refuses_a_baseline_of_no_time() {
    let out = bench(&["--baseline-seconds", "0"]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--baseline-seconds"), "{stderr}");
}

/// Without --database-url the bench makes its database on a private Postgres: the URL that
/// instance gives must be one the bench and the hub can parse (it was not, before 0.9.1's
/// stricter parser was met with `postgres://postgres@/db?host=...`).
#[tokio::test]
async fn the_bench_runs_on_its_own_private_postgres() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleet-bench"));
    cmd.args([
        "--clusters",
        "3",
        "--max-concurrency",
        "3",
        "--baseline-seconds",
        "1",
    ])
    .env_remove("DATABASE_URL");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("fleet-bench runs"))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleet-bench failed: {stderr}");
    assert!(stderr.contains("starting a private Postgres"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(report["summary"][0]["completed"], 3, "{report}");
}

/// A fleet that dies (here: 1,000 clusters under a hard limit of 300 open files that the
/// bench may not raise) ends the run at once, with the fleet's own words and exit 1, not
/// after the registration deadline.
#[tokio::test]
async fn a_child_that_dies_ends_the_run_at_once_with_its_error() {
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--nofile=300:300",
        "setpriv",
        "--bounding-set",
        "-sys_resource",
    ])
    .arg(env!("CARGO_BIN_EXE_fleet-bench"))
    .args(["--clusters", "1000", "--max-concurrency", "100"])
    .args(["--baseline-seconds", "1", "--database-url", &admin_url()]);
    let started = std::time::Instant::now();
    // prlimit and setpriv exec: the child's pid is the bench's, which names its database.
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit runs");
    let database = format!("fleet_bench_{}", child.id());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let mut server = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url())
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&database)
        .fetch_one(&mut server)
        .await
        .unwrap();
    assert_eq!(left, 0, "the failed run left {database} behind");
    assert!(
        stderr.contains("the open-file limit is 300, below the 4096 the hub and a fleet of 1000"),
        "{stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("fleet-bench: spoke-agent sim-fleet exited during the run")
            && last.contains("Too many open files (os error 24)"),
        "{stderr}"
    );
    // Well before the registration deadline (600 s): the run ended when the fleet did.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no report of a failed run");
}
