//! The agent's Kubernetes mode end to end: `spoke-agent serve --kube` (simulated node) as a
//! process against the in-process fake API server (the IBU CRD's CEL rules and the chart's
//! ClusterRole enforced). The test is the user with `oc` and, for OADP, Velero: it completes
//! the Backups and Restores the agent creates.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_e2e::fake_kube::{ADMIN_HEADER, FakeKube, cluster_role_rules, oadp_configmap};
use fleet_e2e::{ChildGuard, ChildLog, binary, free_port, wait_for};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);
const IBU: (&str, &str) = ("apis/lca.openshift.io/v1", "imagebasedupgrades");
const VELERO: &str = "apis/velero.io/v1";
const TOKEN: &str = "spoke-kube-token";

/// The last condition: what `oc get ibu` prints as State and Details.
fn state(ibu: &Value) -> (String, String) {
    let last = ibu["status"]["conditions"]
        .as_array()
        .and_then(|c| c.last())
        .cloned()
        .unwrap_or_default();
    (
        format!(
            "{}/{}",
            last["type"].as_str().unwrap_or_default(),
            last["reason"].as_str().unwrap_or_default()
        ),
        last["message"].as_str().unwrap_or_default().to_string(),
    )
}

/// Velero finishing every object of a kind the agent created.
fn complete_all(kube: &FakeKube, plural: &str) -> usize {
    let mut done = 0;
    for mut obj in kube.list(VELERO, plural) {
        if obj["status"]["phase"] != "Completed" {
            obj["status"] = json!({"phase": "Completed"});
            kube.seed(VELERO, plural, obj);
        }
        done += 1;
    }
    done
}

#[tokio::test]
async fn oc_patch_drives_the_agent_and_oadp_runs_through_velero_objects() {
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let rbac =
        std::fs::read_to_string(repo.join("charts/spoke-agent/rbac/clusterrole.yaml")).unwrap();
    let kube = FakeKube::start(&[hub::crd::ibu()], Some(cluster_role_rules(&rbac))).await;
    kube.seed(
        "api/v1",
        "configmaps",
        oadp_configmap("openshift-adp", "oadp-cm"),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let port = free_port();
    let agent_log = ChildLog::new(dir.path(), "spoke-agent");
    let _agent = ChildGuard(
        Command::new(binary("spoke-agent"))
            .args(["serve", "--kube", "--cluster-name", "sno1", "--host", "sim"])
            .args([
                "--sim-step-ms",
                "10",
                "--sim-reboot-ms",
                "100",
                "--api-token",
                TOKEN,
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("SPOKE_HUB_URL")
            .stdout(Stdio::null())
            .stderr(agent_log.stdio())
            .spawn()
            .expect("spoke-agent starts"),
    );
    let get = || kube.get(IBU.0, IBU.1, "", "upgrade");
    let wait_state = |what: &'static str, want: &'static str| async move {
        wait_for(what, DEADLINE, || async {
            let ibu = get()?;
            (state(&ibu).0 == want).then_some(ibu)
        })
        .await
    };

    // The agent creates `upgrade` at start: oc get ibu shows Idle.
    let idle = wait_state("the IBU to be created Idle", "Idle/Idle").await;
    assert_eq!(idle["spec"]["stage"], "Idle");
    assert_eq!(idle["status"]["validNextStages"], json!(["Prep"]));

    let client = reqwest::Client::new();
    let oc_patch = |patch: Value| {
        let client = client.clone();
        let url = format!("{}/{}/{}/upgrade", kube.url, IBU.0, IBU.1);
        async move {
            client
                .patch(url)
                .header(ADMIN_HEADER, "1")
                .header("Content-Type", "application/merge-patch+json")
                .body(patch.to_string())
                .send()
                .await
                .unwrap()
        }
    };
    // The API refuses a stage not in validNextStages, with the Lifecycle Agent's message.
    let refused = oc_patch(json!({"spec": {"stage": "Upgrade"}})).await;
    assert_eq!(refused.status(), 422);
    assert!(
        refused
            .text()
            .await
            .unwrap()
            .contains("the stage transition is not permitted")
    );

    // The cluster is not healthy yet: its node is not Ready, then an operator is degraded.
    let node = |ready: &str| {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "sno1"},
        "status": {"conditions": [{"type": "Ready", "status": ready}]}})
    };
    kube.seed("api/v1", "nodes", node("False"));
    let co = |degraded: &str| {
        json!({"apiVersion": "config.openshift.io/v1", "kind": "ClusterOperator",
        "metadata": {"name": "etcd"}, "status": {"conditions": [
            {"type": "Available", "status": "True"}, {"type": "Degraded", "status": degraded}]}})
    };
    kube.seed(
        "apis/config.openshift.io/v1",
        "clusteroperators",
        co("True"),
    );
    // oc patch ibu upgrade: seed, OADP ConfigMap (read from the cluster), Prep.
    let prep = oc_patch(json!({"spec": {"stage": "Prep",
        "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"},
        "oadpContent": [{"name": "oadp-cm", "namespace": "openshift-adp"}]}}))
    .await;
    assert_eq!(prep.status(), 200);
    let waiting = |what: &'static str| async move {
        wait_for(what, DEADLINE, || async {
            let ibu = get()?;
            state(&ibu).1.ends_with(what).then_some(())
        })
        .await
    };
    waiting("node sno1 is not Ready").await;
    kube.seed("api/v1", "nodes", node("True"));
    waiting("ClusterOperator etcd is Degraded").await;
    kube.seed(
        "apis/config.openshift.io/v1",
        "clusteroperators",
        co("False"),
    );
    let done = wait_state("Prep to complete", "PrepCompleted/Completed").await;
    assert_eq!(
        done["status"]["validNextStages"],
        json!(["Idle", "Upgrade"])
    );
    assert_eq!(
        done["status"]["observedGeneration"],
        done["metadata"]["generation"]
    );
    // While not idle, the seed cannot change.
    let frozen = oc_patch(
        json!({"spec": {"seedImageRef": {"version": "4.17.0", "image": "quay.io/seed:4.17.0"}}}),
    )
    .await;
    assert_eq!(frozen.status(), 422);
    assert!(
        frozen
            .text()
            .await
            .unwrap()
            .contains("can not change spec.seedImageRef while ibu is in progress")
    );

    // Upgrade: the agent creates the Backup; Velero (the test) completes it; after the
    // reboot the agent creates the Restore; Velero completes it; the upgrade completes.
    assert_eq!(
        oc_patch(json!({"spec": {"stage": "Upgrade"}}))
            .await
            .status(),
        200
    );
    wait_for("the Backup, completed by Velero", DEADLINE, || async {
        (complete_all(&kube, "backups") == 1).then_some(())
    })
    .await;
    let backup = kube
        .get(VELERO, "backups", "openshift-adp", "apps")
        .unwrap();
    assert_eq!(backup["spec"]["includedNamespaces"], json!(["app"]));
    assert_eq!(
        backup["metadata"]["labels"]["lca.openshift.io/created-by"],
        "spoke-agent"
    );
    wait_for("the Restore, completed by Velero", DEADLINE, || async {
        (complete_all(&kube, "restores") == 1).then_some(())
    })
    .await;
    let upgraded = wait_state("the upgrade to complete", "UpgradeCompleted/Completed").await;
    assert_eq!(
        upgraded["status"]["validNextStages"],
        json!(["Idle", "Rollback"])
    );

    // The hub (or anyone with the API token) finalizes through the agent's API: the CR's
    // spec follows, cleanup asks Velero to delete the backup and removes the restore.
    let res = client
        .patch(format!("http://127.0.0.1:{port}/v1/ibu"))
        .bearer_auth(TOKEN)
        .header("Content-Type", "application/merge-patch+json")
        .body(json!({"spec": {"stage": "Idle"}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let back = wait_state("finalize back to Idle", "Idle/Idle").await;
    assert_eq!(back["spec"]["stage"], "Idle", "the CR follows the agent");
    let requests = kube.list(VELERO, "deletebackuprequests");
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0]["spec"]["backupName"], "apps");
    assert!(kube.list(VELERO, "restores").is_empty());
    assert_eq!(
        kube.denied(),
        Vec::<String>::new(),
        "the ClusterRole allows all the agent did"
    );
}
