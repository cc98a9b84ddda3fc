//! Hub replicas as processes, through the bench itself: two `fleet-hub serve` on one
//! database, a simulated fleet given both URLs, the replica that drives the rollout killed
//! with SIGKILL as soon as it drives it.

use std::time::Duration;

use fleet_e2e::{admin_url, binary};
use serde_json::Value;

const BENCH_DEADLINE: Duration = Duration::from_secs(300);

async fn bench(args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(binary("fleet-bench"))
        .args(args)
        .args(["--baseline-seconds", "1", "--database-url", &admin_url()])
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(BENCH_DEADLINE, run)
        .await
        .expect("the bench ends within its deadline")
        .expect("fleet-bench runs")
}

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
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleet-bench failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let figures: Value = serde_json::from_str(stdout.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(figures["hubs"], 2);
    assert!(
        figures["killedHubAtSeconds"].is_number(),
        "the driver was killed: {figures}"
    );
    assert!(stderr.contains("which drives the rollout"), "{stderr}");
    assert_eq!(figures["summary"][0]["completed"], 300, "{figures}");
    assert_eq!(figures["lostTransitions"], 0, "{figures}");
    assert_eq!(figures["repeatedTransitions"], 0, "{figures}");
    // The target (5 s) is the bench's to report; this only catches the old 30 s wait for a
    // dead replica's pushes, or a lease that never lapses.
    let gap = figures["failoverSeconds"].as_f64().unwrap();
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
