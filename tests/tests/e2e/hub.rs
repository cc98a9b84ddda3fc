//! fleet-hub as a process: its own Postgres, SIGTERM, restart, flags.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_e2e::{binary, free_port, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Generous: the first start runs initdb.
const START_DEADLINE: Duration = Duration::from_secs(90);

fn start_hub(work_dir: &Path, port: u16) -> Child {
    Command::new(binary("fleet-hub"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(work_dir)
        .env_remove("DATABASE_URL")
        .env_remove("FLEET_HUB_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("fleet-hub starts")
}

async fn wait_ready(port: u16) {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    wait_for("fleet-hub /readyz to answer 200", START_DEADLINE, || {
        let req = client.get(&url).send();
        async move {
            match req.await {
                Ok(r) if r.status() == 200 => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

async fn terminate(mut child: Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = wait_for("fleet-hub to exit", Duration::from_secs(60), || {
        let exited = child.try_wait().expect("wait");
        async move { exited }
    })
    .await;
    assert!(status.success(), "SIGTERM exits 0, got {status}");
}

#[tokio::test]
async fn serve_with_no_configuration_runs_its_own_postgres_and_keeps_data() {
    let work = tempfile::tempdir().unwrap();
    // Running as root, the private Postgres runs as `postgres`, which must reach the directory.
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = work.path().join(".fleet-hub/pgdata");

    let port = free_port();
    let hub = start_hub(work.path(), port);
    wait_ready(port).await;
    assert!(
        data_dir.join("PG_VERSION").is_file(),
        "created under ./.fleet-hub/pgdata"
    );
    let created = std::fs::metadata(data_dir.join("PG_VERSION"))
        .unwrap()
        .modified()
        .unwrap();
    terminate(hub).await;
    assert!(
        !data_dir.join("postmaster.pid").exists(),
        "the private Postgres stops with the hub"
    );

    let port = free_port();
    let hub = start_hub(work.path(), port);
    wait_ready(port).await;
    let reused = std::fs::metadata(data_dir.join("PG_VERSION"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(created, reused, "the second start reuses the same cluster");
    terminate(hub).await;
}

#[tokio::test]
async fn kube_mode_without_a_cluster_says_so_before_starting() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(binary("fleet-hub"))
        .args(["serve", "--kube"])
        .env_remove("DATABASE_URL")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", empty.path().join("missing-kubeconfig"))
        .env("HOME", empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kube: no Kubernetes configuration"), "{err}");
}

#[tokio::test]
async fn help_documents_every_contract_flag() {
    let help = |bin: &str, sub: &str| {
        let out = Command::new(binary(bin))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let serve = help("fleet-hub", "serve");
    for flag in [
        "--listen",
        "FLEET_HUB_LISTEN",
        "--database-url",
        "DATABASE_URL",
        "--admin-token",
        "FLEET_HUB_ADMIN_TOKEN",
        "--join-token",
        "FLEET_HUB_JOIN_TOKEN",
        "--kube",
        "--data-dir",
    ] {
        assert!(serve.contains(flag), "fleet-hub serve --help lacks {flag}");
    }
    assert!(help("fleet-hub", "demo").contains("--clusters"));
    let agent = help("spoke-agent", "serve");
    for flag in [
        "--cluster-name",
        "SPOKE_CLUSTER_NAME",
        "--listen",
        "SPOKE_LISTEN",
        "--state-dir",
        "SPOKE_STATE_DIR",
        "--hub-url",
        "SPOKE_HUB_URL",
        "--join-token",
        "SPOKE_JOIN_TOKEN",
        "--api-token",
        "SPOKE_API_TOKEN",
        "--label",
        "--host",
        "--current-version",
        "--sim-step-ms",
        "--sim-reboot-ms",
        "--fault",
        "--sim-namespace",
        "--sim-crd",
        "--sim-lvms",
    ] {
        assert!(
            agent.contains(flag),
            "spoke-agent serve --help lacks {flag}"
        );
    }
    let fleet = help("spoke-agent", "sim-fleet");
    for flag in [
        "--count",
        "--prefix",
        "--listen",
        "--state-dir",
        "--hub-url",
        "--join-token",
        "--label",
        "--fault",
        "--sim-step-ms",
    ] {
        assert!(
            fleet.contains(flag),
            "spoke-agent sim-fleet --help lacks {flag}"
        );
    }
}

#[tokio::test]
async fn the_demo_runs_start_to_finish_on_its_own_database() {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = tokio::process::Command::new(binary("fleet-hub"))
        .args([
            "demo",
            "--clusters",
            "5",
            "--listen",
            "127.0.0.1:0",
            "--sim-step-ms",
            "20",
            "--sim-reboot-ms",
            "50",
        ])
        .current_dir(work.path())
        .env_remove("DATABASE_URL")
        .env_remove("FLEET_HUB_DATA_DIR")
        .env_remove("FLEET_HUB_LISTEN")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("the demo finishes")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("All plan steps are completed"), "{text}");
    // spoke3 fails its Prep by design; the others finish the whole plan
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        row("spoke3").contains("Prep (failed to setup stateroot"),
        "{text}"
    );
    assert!(
        row("spoke1").contains("Prep,Upgrade,FinalizeUpgrade"),
        "{text}"
    );
    assert!(
        text.contains("Succeeded=False: 1 of 5 cluster(s) failed an action"),
        "{text}"
    );
    assert!(
        !work
            .path()
            .join(".fleet-hub/pgdata/postmaster.pid")
            .exists(),
        "its Postgres is stopped"
    );
}
