//! `spoke-agent serve --host lca` end to end: the hub drives clusters whose own Lifecycle
//! Agent does the upgrade. Each cluster is an in-process fake API server with the IBU CRD
//! (its CEL rules enforced) and the chart's `lca` ClusterRole held against the delegate. The
//! Lifecycle Agent is played by `spoke-agent serve --kube` on a simulated node (it follows
//! the same rules, and deletes and creates the IBU again across a reboot as the Lifecycle
//! Agent does), or, for the IPConfig block, by the test itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_e2e::fake_kube::{ADMIN_HEADER, FakeKube, cluster_role_rules};
use fleet_e2e::{ChildGuard, ChildLog, TestDb, binary, free_port, wait_for};
use serde_json::{Value, json};

use crate::rollout::{Hub, done, ibgu, start_hub};

const IBU: (&str, &str) = ("apis/lca.openshift.io/v1", "imagebasedupgrades");
const DEADLINE: Duration = Duration::from_secs(60);

/// One cluster: its API server, what plays its Lifecycle Agent, and our delegate.
struct Cluster {
    kube: FakeKube,
    _children: Vec<ChildGuard>,
}

/// How the cluster's Lifecycle Agent is played.
enum Lca<'a> {
    /// `spoke-agent serve --kube` on a simulated node, with these fault points.
    Standin(&'a [&'a str]),
    /// The test writes the IBU itself.
    Scripted,
    /// Not installed: the API server has no `imagebasedupgrades`.
    Missing,
}

fn lca_rules(without_patch: bool) -> Vec<fleet_e2e::fake_kube::Rule> {
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let yaml = std::fs::read_to_string(repo.join("charts/spoke-agent/rbac/clusterrole-lca.yaml"))
        .expect("the chart's lca ClusterRole");
    let mut rules = cluster_role_rules(&yaml);
    if without_patch {
        for r in &mut rules {
            r.verbs.retain(|v| v != "patch");
        }
    }
    rules
}

fn idle_ibu() -> Value {
    json!({
        "apiVersion": "lca.openshift.io/v1", "kind": "ImageBasedUpgrade",
        "metadata": {"name": "upgrade"},
        "spec": {"stage": "Idle"},
        "status": {"observedGeneration": 1, "validNextStages": ["Prep"],
            "conditions": [{"type": "Idle", "status": "True", "reason": "Idle",
                "message": "Idle", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    })
}

async fn cluster(
    hub: &Hub,
    dir: &Path,
    name: &str,
    lca: Lca<'_>,
    rbac_without_patch: bool,
) -> Cluster {
    let kube = FakeKube::start(&[hub::crd::ibu()], Some(lca_rules(rbac_without_patch))).await;
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut children = Vec::new();
    match lca {
        Lca::Standin(faults) => {
            let admin = kube.write_admin_kubeconfig(&dir, "admin-kubeconfig");
            let log = ChildLog::new(&dir, "lifecycle-agent");
            let mut cmd = Command::new(binary("spoke-agent"));
            cmd.args(["serve", "--kube", "--host", "sim", "--cluster-name", name])
                .args(["--sim-step-ms", "10", "--sim-reboot-ms", "300"])
                .args(["--api-token", "standin"])
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .arg("--state-dir")
                .arg(dir.join("lifecycle-agent"));
            for f in faults {
                cmd.args(["--fault", f]);
            }
            let child = cmd
                .env("KUBECONFIG", &admin)
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env_remove("SPOKE_HUB_URL")
                .stdout(Stdio::null())
                .stderr(log.stdio())
                .spawn()
                .expect("the Lifecycle Agent stand-in starts");
            children.push(ChildGuard(child));
        }
        Lca::Scripted => kube.seed(IBU.0, IBU.1, idle_ibu()),
        Lca::Missing => kube.remove_resource(IBU.0, IBU.1),
    }
    let kubeconfig = kube.write_kubeconfig(&dir);
    let log = ChildLog::new(&dir, "spoke-agent");
    let child = Command::new(binary("spoke-agent"))
        .args(["serve", "--host", "lca", "--cluster-name", name])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--hub-url", &hub.url, "--join-token", crate::rollout::JOIN])
        .args(["--label", &format!("name={name}")])
        .arg("--state-dir")
        .arg(dir.join("agent"))
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(log.stdio())
        .spawn()
        .expect("spoke-agent --host lca starts");
    children.push(ChildGuard(child));
    Cluster {
        kube,
        _children: children,
    }
}

impl Cluster {
    fn ibu(&self) -> Option<Value> {
        self.kube.get(IBU.0, IBU.1, "", "upgrade")
    }

    /// The Lifecycle Agent's status write (`/status`), as a cluster admin.
    async fn write_status(&self, status: Value) {
        let url = format!("{}/{}/{}/upgrade/status", self.kube.url, IBU.0, IBU.1);
        let res = reqwest::Client::new()
            .patch(url)
            .header(ADMIN_HEADER, "1")
            .header("Content-Type", "application/merge-patch+json")
            .body(json!({ "status": status }).to_string())
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{}", res.text().await.unwrap());
    }
}

fn failed_message(g: &Value, name: &str) -> String {
    g["status"]["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .and_then(|c| c["failedActions"][0]["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_hub_drives_clusters_through_their_own_lifecycle_agent() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = cluster(&hub, d, "lca1", Lca::Standin(&[]), false).await;
    let back = cluster(&hub, d, "lca2", Lca::Standin(&[]), false).await;
    let failing = cluster(&hub, d, "lca3", Lca::Standin(&["precache"]), false).await;
    let blocked = cluster(&hub, d, "lca4", Lca::Scripted, false).await;
    let _missing = cluster(&hub, d, "lca5", Lca::Missing, false).await;
    let _forbidden = cluster(&hub, d, "lca6", Lca::Standin(&[]), true).await;
    wait_for("six delegates registered", DEADLINE, || async {
        let list = hub.get("/v1/clusters").await;
        (list["items"].as_array().map_or(0, Vec::len) == 6).then_some(())
    })
    .await;
    wait_for("the stand-ins' IBUs", DEADLINE, || async {
        (ok.ibu().is_some() && back.ibu().is_some() && failing.ibu().is_some()).then_some(())
    })
    .await;
    let uid_before = ok.ibu().unwrap()["metadata"]["uid"].clone();
    let step = |actions: Value| json!({"actions": actions, "rolloutStrategy": {"maxConcurrency": 10, "timeout": 30}});
    hub.create(ibgu(
        "forward",
        &["lca1", "lca3", "lca4", "lca5", "lca6"],
        json!([step(json!(["Prep", "Upgrade"]))]),
    ))
    .await;
    // lca2's rollout names extra manifests: the hub's copy of the ConfigMap is written into
    // the cluster before Prep, where its Lifecycle Agent reads it.
    let manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n  namespace: default\ndata:\n  a: b\n";
    let (code, body) = hub
        .send(
            reqwest::Method::PUT,
            "/v1/configmaps/openshift-lifecycle-agent/extra-manifests",
            "application/json",
            json!({"metadata": {"name": "extra-manifests", "namespace": "openshift-lifecycle-agent"},
                   "data": {"extra.yaml": manifest}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let mut back_ibgu = ibgu("back", &["lca2"], json!([step(json!(["Prep", "Upgrade"]))]));
    back_ibgu["spec"]["ibuSpec"]["extraManifests"] =
        json!([{"name": "extra-manifests", "namespace": "openshift-lifecycle-agent"}]);
    hub.create(back_ibgu).await;

    // lca4's Lifecycle Agent holds Prep while an IPConfig change runs, as it does: the
    // in-progress condition False with reason Blocked.
    wait_for("the Prep push to lca4", DEADLINE, || async {
        hub.engine.pass_all().await.unwrap();
        (blocked.ibu()?["spec"]["stage"] == "Prep").then_some(())
    })
    .await;
    blocked
        .write_status(json!({"validNextStages": ["Idle"], "conditions": [
            {"type": "Idle", "status": "False", "reason": "InProgress", "message": "In progress",
             "lastTransitionTime": "2026-01-01T00:00:01Z"},
            {"type": "PrepInProgress", "status": "False", "reason": "Blocked",
             "message": "IPC is not idle", "lastTransitionTime": "2026-01-01T00:00:01Z"}]}))
        .await;

    let g = hub.settle("forward", "[Prep, Upgrade] done", done).await;
    assert_eq!(
        hub.labels("lca1").await,
        vec![
            "lcm.openshift.io/ibgu-prep-completed",
            "lcm.openshift.io/ibgu-upgrade-completed"
        ]
    );
    // The reboot: the Lifecycle Agent deleted the IBU and created it again (a new UID); the
    // delegate followed it by name and applied nothing on its own.
    let after = ok.ibu().unwrap();
    assert_ne!(after["metadata"]["uid"], uid_before);
    assert_eq!(after["spec"]["stage"], "Upgrade");
    let last = after["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "UpgradeCompleted")
        .cloned()
        .unwrap();
    assert_eq!(last["status"], "True", "{after}");

    // Each failure says what is wrong, specifically.
    assert_eq!(
        hub.labels("lca3").await,
        vec!["lcm.openshift.io/ibgu-prep-failed"]
    );
    assert!(
        failed_message(&g, "lca3").contains("precach"),
        "{}",
        failed_message(&g, "lca3")
    );
    assert_eq!(
        failed_message(&g, "lca4"),
        "Prep blocked by the cluster's Lifecycle Agent: IPC is not idle (an IPConfig change is \
         in progress; the stage can run once it is Idle)"
    );
    assert!(
        failed_message(&g, "lca5").contains("the Lifecycle Agent is not installed on this cluster"),
        "{}",
        failed_message(&g, "lca5")
    );
    assert!(
        failed_message(&g, "lca6").contains("may not do this (RBAC)"),
        "{}",
        failed_message(&g, "lca6")
    );

    // Finalize forward; roll the other back, with a rollout of its own (as TALM wants it).
    hub.append("forward", &["FinalizeUpgrade"]).await;
    hub.settle("back", "lca2 upgraded", done).await;
    hub.create(ibgu(
        "rollback",
        &["lca2"],
        json!([step(json!(["Rollback", "FinalizeRollback"]))]),
    ))
    .await;
    hub.settle("forward", "FinalizeUpgrade done", done).await;
    let g = hub
        .settle("rollback", "Rollback and FinalizeRollback done", done)
        .await;
    assert!(failed_message(&g, "lca2").is_empty(), "{g}");
    let idle = ok.ibu().unwrap();
    assert_eq!(idle["spec"]["stage"], "Idle");
    assert!(
        hub.labels("lca1").await.is_empty(),
        "finalize clears the labels"
    );
    let copied = back
        .kube
        .get(
            "api/v1",
            "configmaps",
            "openshift-lifecycle-agent",
            "extra-manifests",
        )
        .expect("the hub's ConfigMap written into lca2");
    assert_eq!(copied["data"]["extra.yaml"], manifest);
    let rolled = back.ibu().unwrap();
    assert_eq!(rolled["spec"]["stage"], "Idle");
    let lca2 = g["status"]["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "lca2"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        lca2["completedActions"],
        json!([{"action": "Rollback"}, {"action": "FinalizeRollback"}]),
        "{g}"
    );

    // The delegates stayed within the chart's lca ClusterRole (but lca6, refused a patch).
    for (name, c) in [
        ("lca1", &ok),
        ("lca2", &back),
        ("lca3", &failing),
        ("lca4", &blocked),
    ] {
        assert_eq!(c.kube.denied(), Vec::<String>::new(), "{name}");
    }
    assert_eq!(
        _forbidden.kube.denied(),
        vec!["patch lca.openshift.io/imagebasedupgrades"]
    );
}
