//! spoke-agent as a process: the stages over HTTP through a simulated reboot, a SIGKILL in
//! the middle of Prep, and the simulated fleet.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_e2e::{ChildGuard, binary, free_port, wait_for};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);
pub(crate) const TOKEN: &str = "test-api-token";

/// The agent's API, by URL: the process behind it may be killed and started again.
pub(crate) struct Agent {
    base: String,
    client: reqwest::Client,
}

fn start(state_dir: &Path, port: u16, extra: &[&str]) -> ChildGuard {
    let mut cmd = agent_command(state_dir, port);
    cmd.args(["--host", "sim"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard(cmd.spawn().expect("spoke-agent starts"))
}

/// `spoke-agent serve` of cluster `sno1` on the port, with no hub and no host yet.
pub(crate) fn agent_command(state_dir: &Path, port: u16) -> Command {
    agent_command_named("sno1", state_dir, port)
}

pub(crate) fn agent_command_named(name: &str, state_dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(binary("spoke-agent"));
    cmd.args(["serve", "--cluster-name", name, "--api-token", TOKEN])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(state_dir)
        .env_remove("SPOKE_HUB_URL");
    cmd
}

impl Agent {
    pub(crate) async fn at(port: u16) -> Agent {
        let agent = Agent {
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        agent.wait_ibu("the agent to answer", |_| true).await;
        agent
    }

    pub(crate) async fn get(&self) -> Option<Value> {
        let res = self
            .client
            .get(format!("{}/v1/ibu", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?;
        if res.status() != 200 {
            return None;
        }
        res.json().await.ok()
    }

    pub(crate) async fn patch(&self, body: Value) -> (u16, Value) {
        let res = self
            .client
            .patch(format!("{}/v1/ibu", self.base))
            .bearer_auth(TOKEN)
            .header("Content-Type", "application/merge-patch+json")
            .body(body.to_string())
            .send()
            .await
            .expect("PATCH answers");
        (
            res.status().as_u16(),
            res.json().await.expect("JSON answer"),
        )
    }

    pub(crate) async fn stage(&self, stage: &str) {
        let (code, body) = self.patch(json!({"spec": {"stage": stage}})).await;
        assert_eq!(code, 200, "{stage}: {body}");
    }

    /// Waits until the IBU satisfies `pred`, answering it.
    pub(crate) async fn wait_ibu(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, DEADLINE, || async {
            self.get().await.filter(|v| pred(v))
        })
        .await
    }
}

pub(crate) fn last(ibu: &Value) -> (String, String, String) {
    let c = ibu["status"]["conditions"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    (
        c["type"].as_str().unwrap_or("").into(),
        c["reason"].as_str().unwrap_or("").into(),
        c["message"].as_str().unwrap_or("").into(),
    )
}

fn next_stages(ibu: &Value) -> Vec<String> {
    serde_json::from_value(ibu["status"]["validNextStages"].clone()).unwrap_or_default()
}

pub(crate) fn is_last(type_: &'static str, reason: &'static str) -> impl Fn(&Value) -> bool {
    move |v| {
        let (t, r, _) = last(v);
        t == type_ && r == reason
    }
}

#[tokio::test]
async fn stages_over_http_through_a_simulated_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _child = start(
        dir.path(),
        port,
        &["--sim-step-ms", "20", "--sim-reboot-ms", "300"],
    );
    let agent = Agent::at(port).await;

    // auth
    let res = agent
        .client
        .get(format!("{}/v1/ibu", agent.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let status: Value = res.json().await.unwrap();
    assert_eq!(status["reason"], "Unauthorized");

    let ibu = agent.get().await.unwrap();
    assert_eq!(last(&ibu), ("Idle".into(), "Idle".into(), "Idle".into()));
    assert_eq!(next_stages(&ibu), vec!["Prep"]);

    // the CEL-equivalent refusal, nothing changed
    let (code, body) = agent.patch(json!({"spec": {"stage": "Upgrade"}})).await;
    assert_eq!(code, 422);
    assert_eq!(body["reason"], "Invalid");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("the stage transition is not permitted")
    );
    assert_eq!(agent.get().await.unwrap(), ibu);

    let (code, _) = agent
        .patch(json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}}))
        .await;
    assert_eq!(code, 200);
    let ibu = agent
        .wait_ibu("Prep completed", is_last("PrepCompleted", "Completed"))
        .await;
    assert_eq!(next_stages(&ibu), vec!["Idle", "Upgrade"]);

    // A patch that is not one: a Status body, nothing changed (too large: `agent.rs`, in
    // process, where the early 413 cannot race the client's writing).
    let send = |content_type: &'static str, body: Vec<u8>| {
        let req = agent
            .client
            .patch(format!("{}/v1/ibu", agent.base))
            .bearer_auth(TOKEN)
            .header("Content-Type", content_type)
            .body(body);
        async move {
            let res = req.send().await.unwrap();
            let code = res.status().as_u16();
            let kind = res.headers()["content-type"].to_str().unwrap().to_string();
            (code, kind, res.json::<Value>().await.unwrap())
        }
    };
    let stage_upgrade = json!({"spec": {"stage": "Upgrade"}})
        .to_string()
        .into_bytes();
    let (code, kind, status) = send("text/plain", stage_upgrade).await;
    assert_eq!((code, kind.as_str()), (415, "application/json"));
    assert_eq!(status["reason"], "UnsupportedMediaType");
    assert_eq!(agent.get().await.unwrap()["spec"]["stage"], "Prep");

    // as the hub pushes a stage: the change is answered without the object
    let res = agent
        .client
        .patch(format!("{}/v1/ibu", agent.base))
        .bearer_auth(TOKEN)
        .header("Content-Type", "application/merge-patch+json")
        .header("Prefer", "return=minimal")
        .body(json!({"spec": {"stage": "Upgrade"}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(res.headers()["preference-applied"], "return=minimal");
    assert_eq!(res.bytes().await.unwrap().len(), 0);
    let ibu = agent
        .wait_ibu(
            "Upgrade completed",
            is_last("UpgradeCompleted", "Completed"),
        )
        .await;
    assert_eq!(
        ibu["metadata"]["generation"], 1,
        "restored on the new stateroot"
    );
    assert!(ibu["status"]["rollbackAvailabilityExpiration"].is_string());
    assert_eq!(next_stages(&ibu), vec!["Idle", "Rollback"]);

    agent.stage("Rollback").await;
    let ibu = agent
        .wait_ibu(
            "Rollback completed",
            is_last("RollbackCompleted", "Completed"),
        )
        .await;
    assert_eq!(next_stages(&ibu), vec!["Idle"]);
    let stages: Vec<&str> = ibu["status"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, vec!["Prep", "Upgrade", "Rollback"]);

    agent.stage("Idle").await;
    let ibu = agent
        .wait_ibu("back to Idle", is_last("Idle", "Idle"))
        .await;
    assert_eq!(ibu["status"]["conditions"].as_array().unwrap().len(), 1);
    assert!(ibu["status"].get("history").is_none());

    // must-gather is a real gzip'd tar holding the IBU
    let res = agent
        .client
        .get(format!("{}/v1/must-gather", agent.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "application/gzip");
    let bytes = res.bytes().await.unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut names = Vec::new();
    let mut events = String::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().display().to_string();
        if name.ends_with("/events.log") {
            std::io::Read::read_to_string(&mut entry, &mut events).unwrap();
        }
        names.push(name);
    }
    assert!(
        names.contains(&"must-gather-sno1/ibu.yaml".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"must-gather-sno1/ostree-admin-status.txt".to_string()));
    // one line per change of the current condition, the last one back to Idle
    let last = events.lines().last().unwrap_or_default();
    assert!(
        last.contains(" stage=Idle Idle=True reason=Idle message=\"Idle\""),
        "{events}"
    );
    assert!(
        events
            .lines()
            .any(|l| l.contains("stage=Rollback") && l.contains("reason=Completed")),
        "{events}"
    );
}

#[tokio::test]
async fn sigkill_mid_prep_resumes_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = ["--sim-step-ms", "500"];
    let mut child = start(dir.path(), port, &args);
    let agent = Agent::at(port).await;
    let (code, _) = agent
        .patch(json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}}))
        .await;
    assert_eq!(code, 200);
    let before = agent
        .wait_ibu("the stateroot step", |v| {
            last(v).2 == "Setting up stateroot"
        })
        .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.0.wait();
    drop(child);

    let _again = start(dir.path(), port, &args);
    // Prep resumes: the stateroot is set up again, precache runs, Prep completes, and the
    // history shows one Prep that started when it first did.
    let ibu = agent
        .wait_ibu(
            "Prep to complete after the restart",
            is_last("PrepCompleted", "Completed"),
        )
        .await;
    let history = ibu["status"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{ibu}");
    assert_eq!(
        history[0]["startTime"],
        before["status"]["history"][0]["startTime"]
    );
    let host: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("host.json")).unwrap()).unwrap();
    // Killed during the simulated step's time, the first setup never reached the node: the
    // one that did is the resumed one.
    for step in ["validate", "inspect-seed", "stateroot", "precache"] {
        assert_eq!(host["runs"][step], 1, "{step} ran once");
    }
}

#[tokio::test]
async fn a_completed_stage_survives_a_sigkill_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = ["--sim-step-ms", "10"];
    let child = start(dir.path(), port, &args);
    let agent = Agent::at(port).await;
    agent
        .patch(json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}}))
        .await;
    let done = agent
        .wait_ibu("Prep completed", is_last("PrepCompleted", "Completed"))
        .await;
    drop(child); // SIGKILL
    let _again = start(dir.path(), port, &args);
    let after = agent.wait_ibu("the agent to answer again", |_| true).await;
    assert_eq!(after, done);
}

#[tokio::test]
async fn sim_fleet_serves_each_cluster_under_its_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("fleet.log");
    let port = free_port();
    let _fleet = ChildGuard(
        Command::new(binary("spoke-agent"))
            .args([
                "sim-fleet",
                "--count",
                "3",
                "--prefix",
                "sno",
                "--sim-step-ms",
                "10",
            ])
            .args(["--fault", "sno2=prep", "--fault", "sno3=unreachable"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(dir.path())
            .env_remove("SPOKE_HUB_URL")
            .env_remove("SPOKE_API_TOKEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // Started without --api-token: the local API is guarded by a token the fleet keeps in
    // its state directory (owner-only), and the log says where, never what.
    let token_file = dir.path().join("api-token");
    let token = wait_for("the API token file", DEADLINE, || {
        let text = std::fs::read_to_string(&token_file).ok();
        async move { text.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) }
    })
    .await;
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
    let url = |c: &str| format!("http://127.0.0.1:{port}/clusters/{c}/v1/ibu");
    let open = reqwest::Client::new();
    let refused = wait_for("the fleet to answer", DEADLINE, || {
        let req = open.get(url("sno1")).send();
        async move { req.await.ok() }
    })
    .await;
    assert_eq!(refused.status(), 401, "no token, no access");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!(
            "local API: guarded by the bearer token in {}",
            token_file.display()
        )) && !logged.contains(&token),
        "{logged}"
    );
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    for c in ["sno1", "sno2"] {
        let res = wait_for("the fleet to answer", DEADLINE, || {
            let req = client.get(url(c)).send();
            async move { req.await.ok().filter(|r| r.status() == 200) }
        })
        .await;
        let ibu: Value = res.json().await.unwrap();
        assert_eq!(ibu["spec"]["stage"], "Idle");
    }
    let res = client.get(url("sno3")).send().await.unwrap();
    assert_eq!(res.status(), 503, "the unreachable fault");
    let res = client.get(url("sno9")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    for c in ["sno1", "sno2"] {
        let res = client
            .patch(url(c))
            .header("Content-Type", "application/merge-patch+json")
            .body(json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let settled = |c: &'static str, type_: &'static str, reason: &'static str| {
        let client = client.clone();
        let u = url(c);
        async move {
            wait_for(&format!("{c} {type_} {reason}"), DEADLINE, || {
                let req = client.get(&u).send();
                async move {
                    let v: Value = req.await.ok()?.json().await.ok()?;
                    is_last(type_, reason)(&v).then_some(())
                }
            })
            .await
        }
    };
    settled("sno1", "PrepCompleted", "Completed").await;
    settled("sno2", "PrepInProgress", "Failed").await;
    assert!(
        dir.path().join("sno1/host.json").is_file(),
        "each cluster has its own state"
    );
}

#[test]
fn a_cluster_name_kubernetes_would_refuse_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["..", "Sno1", "a/b"] {
        let out = std::process::Command::new(fleet_e2e::binary("spoke-agent"))
            .args(["serve", "--cluster-name", bad, "--listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(dir.path())
            .env_remove("SPOKE_HUB_URL")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--cluster-name") && err.contains("RFC 1123 label"),
            "{err}"
        );
    }
}

/// The agent SIGKILLed in the middle of a step of each stage, then started again: the stage
/// goes on from what was saved and ends as it would have (stateroot setup: above).
#[tokio::test]
async fn a_sigkill_mid_step_of_each_stage_ends_the_stage_as_without_it() {
    // (stages completed first, the stage, the message or reason it is killed at)
    // (at: none = as soon as the stage is accepted; from the pivot on the API is away until
    // the node is back, so no later point can be seen)
    let cases: [(&[&str], &str, Option<&str>); 4] = [
        (&[], "Prep", Some("Precaching release images")),
        (&["Prep"], "Upgrade", None),
        (&["Prep", "Upgrade"], "Rollback", None),
        (&["Prep"], "Idle", Some("Aborting")),
    ];
    let ends = |stage: &str| match stage {
        "Prep" => ("PrepCompleted", "Completed"),
        "Upgrade" => ("UpgradeCompleted", "Completed"),
        "Rollback" => ("RollbackCompleted", "Completed"),
        _ => ("Idle", "Idle"),
    };
    let args = ["--sim-step-ms", "300", "--sim-reboot-ms", "300"];
    for (before, stage, at) in cases {
        let end = ends(stage);
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = start(dir.path(), port, &args);
        let agent = Agent::at(port).await;
        let push = |stage: &str| {
            let mut spec = json!({"stage": stage});
            if stage == "Prep" {
                spec["seedImageRef"] = json!({"version": "4.16.0", "image": "quay.io/seed:4.16.0"});
            }
            agent.patch(json!({ "spec": spec }))
        };
        for done in before {
            assert_eq!(push(done).await.0, 200, "{done}");
            let (t, r) = ends(done);
            agent.wait_ibu(done, is_last(t, r)).await;
        }
        assert_eq!(push(stage).await.0, 200, "{stage}");
        if let Some(at) = at {
            agent
                .wait_ibu(at, |v| {
                    v["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["message"] == at || c["reason"] == at)
                })
                .await;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        drop(child);
        let _again = start(dir.path(), port, &args);
        let ibu = agent
            .wait_ibu(
                &format!("{stage} to end after a kill at {at:?}"),
                is_last(end.0, end.1),
            )
            .await;
        assert_eq!(ibu["spec"]["stage"], stage, "{at:?}");
    }
}
