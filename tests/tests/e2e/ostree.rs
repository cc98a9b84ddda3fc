//! `spoke-agent --host ostree` on the fake node: the Lifecycle Agent's commands, in order,
//! through Prep, the pivot and its reboot, and the cleanup that finalizes the upgrade.

use std::process::Stdio;

use fleet_e2e::{ChildGuard, ChildLog, free_port};
use serde_json::{Value, json};

use fleet_e2e::fake_kube::{FakeKube, cluster_role_rules, role_rules};

use crate::fake_node::FakeNode;
use crate::spoke::{Agent, agent_command, is_last};

const SEED: &str = "quay.io/seed:4.16.0";
const WATCHDOG: &str = "spoke-agent-init-monitor.service";

/// The cluster's API for the agent whose state is in `state`: a fake API server holding
/// a single-node OpenShift cluster, the chart's RBAC enforced; its kubeconfig in `state`
/// makes `start` run the agent with `--kube`, as the chart does.
async fn with_cluster_api(state: &std::path::Path) -> FakeKube {
    let kube = chart_api().await;
    kube.seed_openshift_sno();
    kube.seed(
        "apis/apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        hub::crd::ibu(),
    );
    // What the chart made for the agent (labelled as the chart labels), and a Secret of
    // someone else's in its namespace.
    let labels = json!({"app.kubernetes.io/instance": "spoke-agent", "app.kubernetes.io/name": "spoke-agent"});
    let meta = |name: &str, ns: Option<&str>| {
        let mut m = json!({"name": name, "labels": labels});
        if let Some(ns) = ns {
            m["namespace"] = json!(ns);
        }
        m
    };
    kube.seed(
        "api/v1",
        "serviceaccounts",
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": meta("spoke-agent", Some("default"))}),
    );
    kube.seed(
        "api/v1",
        "secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": meta("spoke-agent-api", Some("default")), "data": {"token": "czNjcmV0"}}),
    );
    kube.seed(
        "api/v1",
        "secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "someone-elses", "namespace": "default"}, "data": {"x": "eA=="}}),
    );
    kube.seed("api/v1", "services", json!({"apiVersion": "v1", "kind": "Service",
        "metadata": meta("spoke-agent", Some("default")),
        "spec": {"clusterIP": "172.30.4.5", "clusterIPs": ["172.30.4.5"], "ports": [{"port": 9090}]}}));
    kube.seed("apis/apps/v1", "deployments", json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta("spoke-agent", Some("default")),
        "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "spoke-agent", "image": "quay.io/fleet/spoke-agent:1"}]}}},
        "status": {"readyReplicas": 1}}));
    kube.seed(
        "apis/rbac.authorization.k8s.io/v1",
        "clusterroles",
        json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": meta("spoke-agent", None), "rules": []}),
    );
    kube.seed(
        "apis/rbac.authorization.k8s.io/v1",
        "roles",
        json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": meta("spoke-agent", Some("openshift-config")), "rules": []}),
    );
    kube.write_kubeconfig(state);
    kube
}

/// The labels the chart puts on the agent's objects, as `--carry-selector` selects them.
const CHART_LABELS: &str =
    "app.kubernetes.io/instance=spoke-agent,app.kubernetes.io/name=spoke-agent";

/// A fake API server that holds the agent to the chart's RBAC for `host: ostree` (the
/// ClusterRole, and the Roles, the agent's namespace being `default`).
async fn chart_api() -> FakeKube {
    let rbac = |file: &str| {
        let repo = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        std::fs::read_to_string(repo.join("charts/spoke-agent/rbac").join(file)).unwrap()
    };
    let mut rules = cluster_role_rules(&rbac("clusterrole.yaml"));
    rules.extend(role_rules(&rbac("roles-ostree.yaml"), "default"));
    FakeKube::start(&[hub::crd::ibu()], Some(rules)).await
}

/// `--kube` with the kubeconfig `with_cluster_api` left in `state`, if any.
fn kube_mode(cmd: &mut std::process::Command, state: &std::path::Path) {
    let kubeconfig = state.join("kubeconfig");
    if kubeconfig.exists() {
        cmd.arg("--kube")
            .env("KUBECONFIG", kubeconfig)
            .env("SPOKE_CARRY_SELECTOR", CHART_LABELS)
            .env_remove("KUBERNETES_SERVICE_HOST");
    }
}

/// The agent on the fake node, as a service on the node runs it.
fn start(node: &FakeNode, state: &std::path::Path, port: u16, log: &ChildLog) -> ChildGuard {
    start_with(node, (state, port, log), &[])
}

/// `start`, with these flags added.
fn start_with(
    node: &FakeNode,
    (state, port, log): (&std::path::Path, u16, &ChildLog),
    extra: &[&str],
) -> ChildGuard {
    let mut cmd = agent_command(state, port);
    kube_mode(&mut cmd, state);
    cmd.args([
        "--host",
        "ostree",
        "--host-exec",
        "direct",
        "--cluster-version",
        "4.15.0",
    ])
    .args(extra)
    .arg("--host-root")
    .arg(&node.root)
    .env("PATH", node.path())
    .env("RUST_LOG", "info,spoke_agent=debug")
    .stdout(Stdio::null())
    .stderr(log.stdio());
    ChildGuard(cmd.spawn().expect("spoke-agent starts"))
}

/// Whether `want` appears in `log` in this order (other commands between them allowed).
fn in_order(log: &[Vec<String>], want: &[&str]) -> Result<(), String> {
    let mut i = 0;
    for line in log {
        if i < want.len() && line.join(" ").starts_with(want[i]) {
            i += 1;
        }
    }
    if i == want.len() {
        Ok(())
    } else {
        Err(format!(
            "`{}` not found after `{}`",
            want[i],
            want[..i].join("`, `")
        ))
    }
}

/// After the reboot of a rollback the agent or its watchdog asked for: the agent comes up on
/// the old stateroot, the new one still beside it, and shows the upgrade failed.
async fn back_on_the_old_stateroot(
    node: &FakeNode,
    agent: &Agent,
    run: (&std::path::Path, u16, &ChildLog),
) -> (Value, ChildGuard) {
    let child = start(node, run.0, run.1, run.2);
    let failed = has_condition("UpgradeCompleted", "False", "Failed");
    let ibu = agent
        .wait_ibu("the upgrade failed on the old stateroot", failed)
        .await;
    assert_eq!(
        osnames(node),
        [("rhcos".into(), true), ("rhcos_4.16.0".into(), false)]
    );
    (ibu, child)
}

/// How many times the IBU's history shows the stage.
fn runs_of(ibu: &Value, stage: &str) -> usize {
    ibu["status"]["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["stage"] == stage)
        .count()
}

/// Whether the IBU has a condition of this type, status and reason (not only as its last).
fn has_condition(
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
) -> impl Fn(&Value) -> bool {
    move |v| {
        v["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == type_ && c["status"] == status && c["reason"] == reason)
    }
}

fn osnames(node: &FakeNode) -> Vec<(String, bool)> {
    node.status()["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["osname"].as_str().unwrap().to_string(),
                d["booted"] == true,
            )
        })
        .collect()
}

#[tokio::test]
async fn prep_upgrade_through_a_reboot_and_finalize_on_the_fake_node() {
    let node = FakeNode::new("4.15.0", &[(SEED, "4.16.0")]);
    let state = tempfile::tempdir().unwrap();
    let api = with_cluster_api(state.path()).await;
    let lvm = node.file("/etc/lvm/devices/system.devices");
    std::fs::create_dir_all(lvm.parent().unwrap()).unwrap();
    std::fs::write(
        &lvm,
        "VERSION=1.1.1\nIDTYPE=sys_wwid IDNAME=naa.6001 DEVNAME=/dev/sdb PVID=abc\n",
    )
    .unwrap();
    let log = ChildLog::new(state.path(), "spoke-agent");
    let port = free_port();
    let child = start(&node, state.path(), port, &log);
    let agent = Agent::at(port).await;

    prep_completes(&agent, SEED).await;
    assert_eq!(
        osnames(&node),
        [("rhcos".into(), true), ("rhcos_4.16.0".into(), false)]
    );
    let images: Vec<String> = serde_json::from_value(node.status()["images"].clone()).unwrap();
    assert_eq!(
        images.len(),
        3,
        "the release images, and not the seed: {images:?}"
    );
    let log_now = node.log();
    let checksum = log_now
        .iter()
        .find(|l| l.starts_with(&["ostree".into(), "admin".into(), "deploy".into()]))
        .and_then(|l| l.iter().rev().nth(1).cloned())
        .unwrap();
    in_order(&log_now, &[
        "systemctl is-active var-lib-containers.mount",
        "systemctl cat var-lib-containers.mount",
        &format!("skopeo inspect --retry-times 10 --authfile /var/lib/kubelet/config.json docker://{SEED}"),
        &format!("podman pull --authfile /var/lib/kubelet/config.json {SEED}"),
        "mount /sysroot -o remount,rw",
        &format!("nsenter --target 1 --cgroup --mount --ipc --net --pid -- podman image mount {SEED}"),
        "tar xzf /var/lib/containers/storage/overlay/",
        "ostree pull-local /var/tmp/ibu-stateroot-setup-rhcos_4.16.0/ostree",
        "ostree admin os-init rhcos_4.16.0",
        "ostree admin --help",
        &format!("ostree admin deploy --os rhcos_4.16.0 --no-prune --karg-append systemd.unified_cgroup_hierarchy=1 --karg-append rcupdate.rcu_normal_after_boot=0 --karg ibu=4.16.0 {checksum} --not-as-default"),
        "rpm-ostree cleanup -b",
        &format!("podman image umount {SEED}"),
        &format!("podman rmi {SEED}"),
        "podman image exists quay.io/openshift-release-dev/",
        "podman pull quay.io/openshift-release-dev/",
    ])
    .unwrap();
    let dd = format!("/ostree/deploy/rhcos_4.16.0/deploy/{checksum}.0");
    assert_eq!(
        std::fs::read_to_string(node.file(&format!("{dd}/etc/hostname"))).unwrap(),
        "seed\n"
    );
    assert!(
        !node.file(&format!("{dd}/etc/seed-only.conf")).exists(),
        "etc.deletions applied"
    );
    assert!(
        node.file("/ostree/deploy/rhcos_4.16.0/var/seed_data/manifest.json")
            .is_file()
    );
    // The watchdog: the agent's copy and its unit, enabled in the new deployment.
    assert!(
        node.file("/ostree/deploy/rhcos_4.16.0/var/usrlocal/bin/spoke-agent")
            .is_file()
    );
    let unit =
        std::fs::read_to_string(node.file(&format!("{dd}/etc/systemd/system/{WATCHDOG}"))).unwrap();
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/spoke-agent init-monitor --host-root / --host-exec direct"
        ),
        "{unit}"
    );
    assert!(
        node.file(&format!(
            "{dd}/etc/systemd/system/multi-user.target.wants/{WATCHDOG}"
        ))
        .is_symlink()
    );
    // The IBU is where the Lifecycle Agent keeps it, as an IBU it can read.
    let saved: Value =
        serde_json::from_slice(&std::fs::read(node.file("/var/lib/lca/ibu.json")).unwrap())
            .unwrap();
    assert_eq!(saved["kind"], "ImageBasedUpgrade");
    assert_eq!(saved["spec"]["stage"], "Prep");

    // Upgrade: the pivot, then the agent asks for the reboot and waits for it.
    agent.stage("Upgrade").await;
    reboot_requested(&node, "the reboot request").await;
    let status = node.status();
    assert_eq!(
        status["deployments"][0]["osname"], "rhcos_4.16.0",
        "the new default: {status}"
    );
    // What the seed's post-pivot reconfiguration needs, from the cluster's API and the node,
    // where it looks for it (the Lifecycle Agent's SeedReconfiguration), for root only.
    let config_file = node
        .file("/ostree/deploy/rhcos_4.16.0/var/opt/openshift/cluster-configuration/manifest.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&config_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let config: Value = serde_json::from_slice(&std::fs::read(&config_file).unwrap()).unwrap();
    for (field, want) in [
        ("api_version", json!(1)),
        ("cluster_id", json!("6a0cd8a9-3e5b-4a4b-9a54-0a5ab1e8f3a2")),
        ("cluster_name", json!("sno1")),
        ("base_domain", json!("example.com")),
        ("infra_id", json!("sno1-x7k2p")),
        ("hostname", json!("sno1")),
        ("node_ips", json!(["192.168.122.10"])),
        ("machine_networks", json!(["192.168.122.0/24"])),
        ("release_registry", json!("quay.io")),
        (
            "pull_secret",
            json!("{\"auths\":{\"quay.io\":{\"auth\":\"c25vMTpwdWxs\"}}}"),
        ),
        ("chrony_config", json!("pool 2.rhel.pool.ntp.org iburst\n")),
    ] {
        assert_eq!(config[field], want, "{field}: {config:#}");
    }
    assert_eq!(
        config["KubeconfigCryptoRetention"]["IngresssCrypto"]["ingress_certificate_cn"],
        "ingress-operator@1764460800"
    );
    let signer = &config["KubeconfigCryptoRetention"]["KubeAPICrypto"]["ServingCrypto"];
    assert!(
        signer["localhost_signer_private_key"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert!(
        config["ssh_key"]
            .as_str()
            .unwrap()
            .starts_with("ssh-ed25519 ")
    );
    assert_eq!(config["server_ssh_keys"].as_array().unwrap().len(), 2);
    assert!(config.get("proxy").is_none(), "no proxy configured");
    // The agent's own objects, for the seed's reconfiguration to create on the new cluster:
    // the chart's, without what the server set, and nothing else.
    let own: Value = serde_json::from_slice(
        &std::fs::read(node.file("/ostree/deploy/rhcos_4.16.0/var/opt/openshift/cluster-configuration/manifests/spoke-agent.json"))
            .unwrap(),
    )
    .unwrap();
    let kinds: Vec<String> = own["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace/default",
            "CustomResourceDefinition/imagebasedupgrades.lca.openshift.io",
            "ServiceAccount/spoke-agent",
            "ClusterRole/spoke-agent",
            "Role/spoke-agent",
            "Secret/spoke-agent-api",
            "Service/spoke-agent",
            "Deployment/spoke-agent",
        ]
    );
    for item in own["items"].as_array().unwrap() {
        let meta: Vec<&String> = item["metadata"].as_object().unwrap().keys().collect();
        assert!(
            meta.iter()
                .all(|k| ["name", "namespace", "labels", "annotations"].contains(&k.as_str())),
            "server-set metadata carried: {item}"
        );
        assert!(item.get("status").is_none(), "status carried: {item}");
        assert!(item["spec"].get("clusterIP").is_none(), "{item}");
    }
    assert!(
        node.file("/ostree/deploy/rhcos_4.16.0/var/opt/openshift/network-configuration/system-connections/ens3.nmconnection")
            .is_file()
    );
    assert_eq!(
        std::fs::read(node.file(
            "/ostree/deploy/rhcos_4.16.0/var/opt/openshift/lvm-configuration/system.devices"
        ))
        .unwrap(),
        std::fs::read(&lvm).unwrap()
    );
    drop(child);
    node.admin(&["reboot"]);
    assert_eq!(
        osnames(&node),
        [("rhcos_4.16.0".into(), true), ("rhcos".into(), false)]
    );
    // Given its configuration, the seed's reconfiguration ran and removed its input.
    assert!(!node.file("/var/opt/openshift").exists());
    // Everything the agent read, the chart's RBAC allows.
    assert_eq!(api.denied(), Vec::<String>::new());
    let _again = start(&node, state.path(), port, &log);
    agent
        .wait_ibu(
            "Upgrade to complete",
            is_last("UpgradeCompleted", "Completed"),
        )
        .await;
    // Completed, the upgrade takes its watchdog away.
    in_order(
        &node.log(),
        &[
            &format!("systemctl is-active {WATCHDOG}"),
            &format!("systemctl stop {WATCHDOG}"),
            &format!("systemctl is-enabled {WATCHDOG}"),
            &format!("systemctl disable {WATCHDOG}"),
            "systemctl daemon-reload",
        ],
    )
    .unwrap();
    assert!(
        !node
            .file(&format!("/etc/systemd/system/{WATCHDOG}"))
            .exists()
    );

    // Finalize: the old stateroot goes.
    agent.stage("Idle").await;
    agent
        .wait_ibu("Idle after finalize", is_last("Idle", "Idle"))
        .await;
    assert_eq!(osnames(&node), [("rhcos_4.16.0".into(), true)]);
    assert!(!node.file("/ostree/deploy/rhcos").exists());
    in_order(
        &node.log(),
        &[
            "ostree admin undeploy 1",
            "unshare -m /bin/sh -c mount -o remount,rw /sysroot && rm -rf /ostree/deploy/rhcos",
            "rpm-ostree cleanup -b",
        ],
    )
    .unwrap();
}

#[test]
fn the_real_node_needs_the_cluster_version_and_a_root() {
    let node = FakeNode::new("4.15.0", &[]);
    let state = tempfile::tempdir().unwrap();
    let root = node.root.to_string_lossy().to_string();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--host-root", &root],
            "--host ostree needs --cluster-version",
        ),
        (
            &["--host-root", &root, "--cluster-version", "4.15"],
            "--cluster-version \"4.15\" is not a version x.y.z",
        ),
        (
            &[
                "--host-root",
                "/nonexistent/host",
                "--cluster-version",
                "4.15.0",
            ],
            "--host-root /nonexistent/host: not a directory",
        ),
    ];
    for (args, want) in cases {
        let out = agent_command(state.path(), free_port())
            .args(["--host", "ostree"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

fn sigkill(child: ChildGuard) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(child);
}

/// The node after a Prep that completed: the old deployment booted, one new one beside it,
/// the release images pulled and not the seed, the stateroot marked complete.
fn assert_prepared(node: &FakeNode, why: &str) {
    assert_eq!(
        osnames(node),
        [("rhcos".into(), true), ("rhcos_4.16.0".into(), false)],
        "{why}"
    );
    let images: Vec<String> = serde_json::from_value(node.status()["images"].clone()).unwrap();
    assert_eq!(images.len(), 3, "{why}: {images:?}");
    assert!(!images.iter().any(|i| i == SEED), "{why}");
    assert!(
        node.file("/ostree/deploy/rhcos_4.16.0/var/lib/lca/stateroot-setup.done")
            .is_file(),
        "{why}"
    );
    assert_eq!(
        node.status()["mounts"],
        json!({}),
        "{why}: the seed stays mounted"
    );
}

/// Starts Prep with the node holding its `k`-th command; answers that command once it is
/// held, or `None` when Prep ran fewer commands and completed.
async fn prep_held_at(node: &FakeNode, agent: &Agent, k: usize) -> Option<String> {
    node.admin(&["hold", "--at", &k.to_string()]);
    let seed = json!({"version": "4.16.0", "image": SEED});
    let (code, body) = agent
        .patch(json!({"spec": {"stage": "Prep", "seedImageRef": seed}}))
        .await;
    assert_eq!(code, 200, "{body}");
    let done = is_last("PrepCompleted", "Completed");
    held_or(node, agent, k, "the end of Prep", done).await
}

/// Waits for the node's `at`-th command (held), answering it, or for the IBU to satisfy
/// `done` first (`None`).
async fn held_or(
    node: &FakeNode,
    agent: &Agent,
    at: usize,
    end: &str,
    done: impl Fn(&Value) -> bool,
) -> Option<String> {
    fleet_e2e::wait_for(
        &format!("command {at} or {end}"),
        std::time::Duration::from_secs(30),
        || async {
            let log = node.log();
            if log.len() >= at {
                return Some(Some(log[at - 1].join(" ")));
            }
            agent.get().await.filter(|v| done(v)).map(|_| None)
        },
    )
    .await
}

#[tokio::test]
async fn a_sigkill_at_every_command_of_prep_ends_as_without_it() {
    let mut k = 1;
    while let Some(killed_at) = {
        let node = FakeNode::new("4.15.0", &[(SEED, "4.16.0")]);
        let state = tempfile::tempdir().unwrap();
        let log = ChildLog::new(state.path(), "spoke-agent");
        let port = free_port();
        let child = start(&node, state.path(), port, &log);
        let agent = Agent::at(port).await;
        let held = prep_held_at(&node, &agent, k).await;
        if let Some(command) = &held {
            sigkill(child);
            node.admin(&["hold", "--clear"]);
            let _again = start(&node, state.path(), port, &log);
            let ibu = agent
                .wait_ibu(
                    "Prep to complete after the restart",
                    is_last("PrepCompleted", "Completed"),
                )
                .await;
            let why = format!("killed at command {k}, `{command}`");
            assert_prepared(&node, &why);
            let history = ibu["status"]["history"].as_array().unwrap();
            assert_eq!(history.len(), 1, "{why}: {ibu}");
        }
        held
    } {
        let _ = killed_at;
        k += 1;
    }
    assert!(k > 20, "Prep ran only {} commands", k - 1);
}

/// Runs `stage` on a prepared node, holding the node's `k`-th command from now on; answers
/// that command once held, or `None` when the stage ran fewer commands and `done` holds.
async fn held_at(
    node: &FakeNode,
    agent: &Agent,
    stage: &str,
    k: usize,
    done: impl Fn(&Value) -> bool,
) -> Option<String> {
    let at = node.log().len() + k;
    node.admin(&["hold", "--at", &at.to_string()]);
    agent.stage(stage).await;
    held_or(node, agent, at, &format!("the end of {stage}"), done).await
}

/// A prepared node and its agent.
async fn prepared() -> Prepared {
    prepared_with(json!({})).await
}

type Prepared = (
    FakeNode,
    tempfile::TempDir,
    ChildLog,
    u16,
    ChildGuard,
    Agent,
);

/// A prepared node and its agent, Prep's spec completed with the fields of `extra`.
async fn prepared_with(extra: Value) -> Prepared {
    let node = FakeNode::new("4.15.0", &[(SEED, "4.16.0")]);
    let state = tempfile::tempdir().unwrap();
    with_cluster_api(state.path()).await;
    let log = ChildLog::new(state.path(), "spoke-agent");
    let port = free_port();
    let child = start(&node, state.path(), port, &log);
    let agent = Agent::at(port).await;
    let mut spec = json!({"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": SEED}});
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    let (code, body) = agent.patch(json!({ "spec": spec })).await;
    assert_eq!(code, 200, "{body}");
    agent
        .wait_ibu("Prep to complete", is_last("PrepCompleted", "Completed"))
        .await;
    (node, state, log, port, child, agent)
}

#[tokio::test]
async fn a_sigkill_at_every_command_of_an_abort_ends_as_without_it() {
    let idle = is_last("Idle", "Idle");
    let mut k = 1;
    loop {
        let (node, state, log, port, child, agent) = prepared().await;
        let Some(command) = held_at(&node, &agent, "Idle", k, &idle).await else {
            break;
        };
        sigkill(child);
        node.admin(&["hold", "--clear"]);
        let _again = start(&node, state.path(), port, &log);
        agent
            .wait_ibu("the abort to end after the restart", &idle)
            .await;
        let why = format!("killed at command {k} of the abort, `{command}`");
        assert_eq!(osnames(&node), [("rhcos".into(), true)], "{why}");
        assert!(!node.file("/ostree/deploy/rhcos_4.16.0").exists(), "{why}");
        assert!(!node.file("/var/lib/lca/workspace").exists(), "{why}");
        k += 1;
    }
    assert!(k > 3, "the abort ran only {} commands", k - 1);
}

#[tokio::test]
async fn a_failing_pull_deploy_or_untar_fails_prep_and_idle_cleans_up() {
    // (the command that fails, the words of Prep's failure message)
    let cases = [
        (
            vec!["podman", "pull", "--authfile"],
            "`podman pull --authfile /var/lib/kubelet/config.json quay.io/seed:4.16.0` exited with 1",
        ),
        (
            vec!["ostree", "admin", "deploy"],
            "`ostree admin deploy --os rhcos_4.16.0",
        ),
        (
            vec!["tar", "xzf"],
            "`tar xzf /var/lib/containers/storage/overlay/",
        ),
    ];
    for (words, want) in cases {
        let node = FakeNode::new("4.15.0", &[(SEED, "4.16.0")]);
        let mut fail = vec!["fail"];
        fail.extend(&words);
        node.admin(&fail);
        let state = tempfile::tempdir().unwrap();
        let log = ChildLog::new(state.path(), "spoke-agent");
        let port = free_port();
        let _agent_process = start(&node, state.path(), port, &log);
        let agent = Agent::at(port).await;
        let seed = json!({"version": "4.16.0", "image": SEED});
        agent
            .patch(json!({"spec": {"stage": "Prep", "seedImageRef": seed}}))
            .await;
        let failed = has_condition("PrepCompleted", "False", "Failed");
        let ibu = agent.wait_ibu("Prep to fail", failed).await;
        let message = ibu["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "PrepInProgress")
            .map(|c| c["message"].as_str().unwrap().to_string())
            .unwrap();
        assert!(
            message.starts_with("failed to setup stateroot rhcos_4.16.0: ")
                && message.contains(want)
                && message.contains(&format!(
                    "fake-node: injected failure of `{}`",
                    words.join(" ")
                )),
            "{words:?}: {message}"
        );
        // The way out is Idle: what the failed setup left goes.
        node.admin(&["fail", "--clear"]);
        agent.stage("Idle").await;
        agent
            .wait_ibu("Idle after the abort", is_last("Idle", "Idle"))
            .await;
        assert_eq!(osnames(&node), [("rhcos".into(), true)], "{words:?}");
        assert!(
            !node.file("/ostree/deploy/rhcos_4.16.0").exists(),
            "{words:?}"
        );
    }
}

/// Waits for the agent to ask the node to reboot.
async fn reboot_requested(node: &FakeNode, what: &str) {
    fleet_e2e::wait_for(what, std::time::Duration::from_secs(30), || async {
        node.reboot_requested().then_some(())
    })
    .await;
}

/// Plays the reboot the agent asks for: the agent goes down with the node, which comes back
/// on its default deployment.
async fn reboot_when_asked(node: &FakeNode, child: ChildGuard, what: &str) {
    reboot_requested(node, what).await;
    sigkill(child);
    node.admin(&["reboot"]);
}

/// Asks for `stage` (a pivot) and plays the node's reboot: waits for the agent to ask for
/// it, stops the agent, boots the node, starts the agent again.
async fn through_the_reboot(
    node: &FakeNode,
    agent: &Agent,
    stage: &str,
    run: (&std::path::Path, u16, &ChildLog),
    child: ChildGuard,
) -> ChildGuard {
    agent.stage(stage).await;
    reboot_when_asked(node, child, &format!("{stage}'s reboot request")).await;
    start(node, run.0, run.1, run.2)
}

/// The descriptions of the reboots asked for, in order (`"lifecycle-agent: upgrade"`).
fn reboot_descriptions(node: &FakeNode) -> Vec<String> {
    node.log()
        .iter()
        .filter(|l| l.first().is_some_and(|c| c == "systemd-run"))
        .filter_map(|l| {
            let at = l.iter().position(|a| a == "--description")?;
            l.get(at + 1).cloned()
        })
        .collect()
}

#[tokio::test]
async fn a_manual_rollback_boots_the_old_stateroot_and_keeps_both() {
    let (node, state, log, port, child, agent) = prepared().await;
    // The old stateroot's kubelet certificates: the first expires 2027-03-04T23:10:14Z.
    let pki = node.file("/ostree/deploy/rhcos/var/lib/kubelet/pki");
    std::fs::create_dir_all(&pki).unwrap();
    let fixtures =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/kubelet-pki"));
    for name in ["kubelet-client-current.pem", "kubelet-server-current.pem"] {
        std::fs::copy(fixtures.join(name), pki.join(name)).unwrap();
    }
    let child =
        through_the_reboot(&node, &agent, "Upgrade", (state.path(), port, &log), child).await;
    let upgraded = agent
        .wait_ibu(
            "Upgrade to complete",
            is_last("UpgradeCompleted", "Completed"),
        )
        .await;
    // Rollback is possible until half an hour before the first of them expires.
    assert_eq!(
        upgraded["status"]["rollbackAvailabilityExpiration"],
        "2027-03-04T22:40:14Z"
    );
    let _child =
        through_the_reboot(&node, &agent, "Rollback", (state.path(), port, &log), child).await;
    let ibu = agent
        .wait_ibu(
            "Rollback to complete",
            is_last("RollbackCompleted", "Completed"),
        )
        .await;
    assert_eq!(ibu["spec"]["stage"], "Rollback");
    assert_eq!(ibu["status"]["rollbackAvailabilityExpiration"], Value::Null);
    assert_eq!(
        osnames(&node),
        [("rhcos".into(), true), ("rhcos_4.16.0".into(), false)]
    );
    assert_eq!(
        reboot_descriptions(&node),
        [
            "\"lifecycle-agent: upgrade\"",
            "\"lifecycle-agent: rollback\""
        ]
    );
    // Finalizing the rollback removes the new stateroot.
    agent.stage("Idle").await;
    agent
        .wait_ibu("Idle after the rollback", is_last("Idle", "Idle"))
        .await;
    assert_eq!(osnames(&node), [("rhcos".into(), true)]);
    assert!(!node.file("/ostree/deploy/rhcos_4.16.0").exists());
}

/// One cluster of a fleet of real-node agents: its fake node and its agent process.
struct Sno {
    name: String,
    node: FakeNode,
    state: tempfile::TempDir,
    log: ChildLog,
    port: u16,
    child: Option<ChildGuard>,
}

impl Sno {
    fn start(&mut self, hub: &str) {
        let mut cmd = crate::spoke::agent_command_named(&self.name, self.state.path(), self.port);
        kube_mode(&mut cmd, self.state.path());
        cmd.args([
            "--host",
            "ostree",
            "--host-exec",
            "direct",
            "--cluster-version",
            "4.15.0",
        ])
        .arg("--host-root")
        .arg(&self.node.root)
        .args(["--hub-url", hub, "--join-token", crate::rollout::JOIN])
        .args(["--label", &format!("name={}", self.name)])
        .env("PATH", self.node.path())
        .stdout(Stdio::null())
        .stderr(self.log.stdio());
        self.child = Some(ChildGuard(cmd.spawn().expect("spoke-agent starts")));
    }
}

#[tokio::test]
async fn the_hub_upgrades_a_fleet_of_real_node_agents() {
    let db = fleet_e2e::TestDb::empty().await;
    let hub = crate::rollout::start_hub(&db).await;
    let mut fleet: Vec<Sno> = ["sno1", "sno2"]
        .into_iter()
        .map(|name| {
            let state = tempfile::tempdir().unwrap();
            let log = ChildLog::new(state.path(), name);
            Sno {
                name: name.into(),
                node: FakeNode::new("4.15.0", &[(SEED, "4.16.0")]),
                state,
                log,
                port: free_port(),
                child: None,
            }
        })
        .collect();
    for sno in &mut fleet {
        with_cluster_api(sno.state.path()).await;
        sno.start(&hub.url);
    }
    fleet_e2e::wait_for(
        "both clusters registered",
        std::time::Duration::from_secs(30),
        || async {
            let list = hub.get("/v1/clusters").await;
            (list["items"].as_array().map_or(0, Vec::len) == 2).then_some(())
        },
    )
    .await;
    hub.create(crate::rollout::ibgu(
        "real",
        &["sno1", "sno2"],
        json!([{"actions": ["Prep", "Upgrade", "FinalizeUpgrade"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 60}}]),
    ))
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        hub.engine.pass_all().await.unwrap();
        let g = hub.get("/v1/rollouts/default/real").await;
        if crate::rollout::done(&g) {
            for sno in &fleet {
                let done = crate::rollout::acts(
                    &crate::rollout::cluster(&g, &sno.name)["completedActions"],
                );
                assert_eq!(
                    done,
                    ["Prep", "Upgrade", "FinalizeUpgrade"],
                    "{}: {g}",
                    sno.name
                );
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rollout did not finish: {g}"
        );
        // Each node that asked for its reboot gets it: the agent goes down with the node.
        for sno in &mut fleet {
            if sno.node.reboot_requested() {
                if let Some(child) = sno.child.take() {
                    sigkill(child);
                }
                sno.node.admin(&["reboot"]);
                sno.start(&hub.url);
            }
        }
        hub.clock.advance(chrono::Duration::seconds(1));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for sno in &fleet {
        assert_eq!(
            osnames(&sno.node),
            [("rhcos_4.16.0".into(), true)],
            "{}",
            sno.name
        );
    }
}

#[tokio::test]
async fn a_failed_post_pivot_reconfiguration_rolls_the_node_back() {
    let (node, state, log, port, child, agent) = prepared().await;
    agent.stage("Upgrade").await;
    reboot_when_asked(&node, child, "the upgrade's reboot request").await;
    node.admin(&["unit-failed", "installation-configuration.service"]);
    let child = start(&node, state.path(), port, &log);
    reboot_when_asked(&node, child, "the rollback's reboot request").await;
    let (ibu, _child) = back_on_the_old_stateroot(&node, &agent, (state.path(), port, &log)).await;
    let message = ibu["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "UpgradeInProgress")
        .map(|c| c["message"].as_str().unwrap().to_string())
        .unwrap();
    assert!(
        message.starts_with("Rollback due to post-reboot configuration failure: the seed's post-pivot reconfiguration (installation-configuration.service) failed"),
        "{message}"
    );
    assert_eq!(
        reboot_descriptions(&node).last().map(String::as_str),
        Some("\"lifecycle-agent: rollback\"")
    );
}

#[tokio::test]
async fn the_watchdog_rolls_back_an_upgrade_whose_agent_never_comes_up() {
    let timeout = json!({"autoRollbackOnFailure": {"initMonitorTimeoutSeconds": 1}});
    let (node, state, log, port, child, agent) = prepared_with(timeout).await;
    agent.stage("Upgrade").await;
    reboot_when_asked(&node, child, "the upgrade's reboot request").await;
    // On the new stateroot the agent does not come up; the unit its /etc enables runs.
    assert_eq!(node.ok(&["systemctl", "is-active", WATCHDOG]), "active\n");
    let out = std::process::Command::new(fleet_e2e::binary("spoke-agent"))
        .args(["init-monitor", "--host-exec", "direct", "--host-root"])
        .arg(&node.root)
        .env("PATH", node.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(node.reboot_requested());
    assert_eq!(
        node.status()["deployments"][0]["osname"],
        "rhcos",
        "the old stateroot is the default"
    );
    node.admin(&["reboot"]);
    let (ibu, _child) = back_on_the_old_stateroot(&node, &agent, (state.path(), port, &log)).await;
    let text = ibu.to_string();
    assert!(
        text.contains("Rollback due to LCA Init Monitor timeout, after 1s"),
        "{text}"
    );
}

/// Kills the agent at every command a pivot (`stage`, after `before` went through its own
/// reboot) runs before its reboot, restarts it, plays the reboot, and checks that the stage
/// ends as without the kill: `end`, the node booted as `booted`, one `stage` in the history.
async fn sigkill_at_every_command_of_a_pivot(
    before: Option<&str>,
    stage: &str,
    end: (&'static str, &'static str),
    booted: [&str; 2],
) {
    let mut k = 1;
    loop {
        let (node, state, log, port, mut child, agent) = prepared().await;
        if let Some(first) = before {
            child =
                through_the_reboot(&node, &agent, first, (state.path(), port, &log), child).await;
            // (only Upgrade comes first)
            assert_eq!(first, "Upgrade");
            let done = has_condition("UpgradeCompleted", "True", "Completed");
            agent.wait_ibu(first, done).await;
        }
        let at = node.log().len() + k;
        node.admin(&["hold", "--at", &at.to_string()]);
        agent.stage(stage).await;
        let held = fleet_e2e::wait_for(
            "the held command or the reboot request",
            std::time::Duration::from_secs(30),
            || async {
                let log = node.log();
                if log.len() >= at {
                    Some(Some(log[at - 1].join(" ")))
                } else {
                    node.reboot_requested().then_some(None)
                }
            },
        )
        .await;
        let Some(command) = held else {
            break;
        };
        sigkill(child);
        node.admin(&["hold", "--clear"]);
        let again = start(&node, state.path(), port, &log);
        reboot_when_asked(&node, again, "the reboot request after the restart").await;
        let _after = start(&node, state.path(), port, &log);
        let why = format!("killed at command {k} of {stage}, `{command}`");
        let ibu = agent.wait_ibu(&why, is_last(end.0, end.1)).await;
        let want: Vec<(String, bool)> = vec![(booted[0].into(), true), (booted[1].into(), false)];
        assert_eq!(osnames(&node), want, "{why}");
        assert_eq!(runs_of(&ibu, stage), 1, "{why}: {ibu}");
        k += 1;
    }
    assert!(
        k > 3,
        "{stage} ran only {} commands before the reboot",
        k - 1
    );
}

#[tokio::test]
async fn a_sigkill_at_every_command_before_the_reboot_still_pivots_once() {
    let end = ("UpgradeCompleted", "Completed");
    sigkill_at_every_command_of_a_pivot(None, "Upgrade", end, ["rhcos_4.16.0", "rhcos"]).await;
}

#[tokio::test]
async fn a_sigkill_at_every_command_of_a_rollback_still_rolls_back_once() {
    let end = ("RollbackCompleted", "Completed");
    sigkill_at_every_command_of_a_pivot(
        Some("Upgrade"),
        "Rollback",
        end,
        ["rhcos", "rhcos_4.16.0"],
    )
    .await;
}

#[tokio::test]
async fn a_sigkill_at_every_command_after_the_reboot_still_completes_the_upgrade() {
    let completed = is_last("UpgradeCompleted", "Completed");
    let mut k = 1;
    loop {
        let (node, state, log, port, child, agent) = prepared().await;
        agent.stage("Upgrade").await;
        reboot_when_asked(&node, child, "the reboot request").await;
        let at = node.log().len() + k;
        node.admin(&["hold", "--at", &at.to_string()]);
        let child = start(&node, state.path(), port, &log);
        let held = held_or(&node, &agent, at, "the upgrade's end", &completed).await;
        let Some(command) = held else {
            break;
        };
        sigkill(child);
        node.admin(&["hold", "--clear"]);
        let _again = start(&node, state.path(), port, &log);
        let why = format!("killed at command {k} after the reboot, `{command}`");
        let ibu = agent.wait_ibu(&why, &completed).await;
        assert_eq!(
            osnames(&node),
            [("rhcos_4.16.0".into(), true), ("rhcos".into(), false)],
            "{why}"
        );
        assert!(
            !node
                .file(&format!("/etc/systemd/system/{WATCHDOG}"))
                .exists(),
            "{why}"
        );
        assert_eq!(runs_of(&ibu, "Upgrade"), 1, "{why}: {ibu}");
        k += 1;
    }
    assert!(
        k > 5,
        "the upgrade ran only {} commands after the reboot",
        k - 1
    );
}

#[tokio::test]
async fn a_node_that_does_not_go_down_is_asked_again_not_called_rolled_back() {
    let (node, state, log, port, child, agent) = prepared().await;
    sigkill(child);
    let _child = start_with(
        &node,
        (state.path(), port, &log),
        &["--reboot-wait-seconds", "1"],
    );
    agent
        .wait_ibu("the agent back", is_last("PrepCompleted", "Completed"))
        .await;
    agent.stage("Upgrade").await;
    let asked = |node: &FakeNode| {
        node.log()
            .iter()
            .filter(|l| l.first().is_some_and(|c| c == "systemd-run"))
            .count()
    };
    fleet_e2e::wait_for(
        "the reboot asked for twice",
        std::time::Duration::from_secs(30),
        || async { (asked(&node) >= 2).then_some(()) },
    )
    .await;
    // Meanwhile the agent says it is rebooting, never that the upgrade failed.
    let res = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v1/ibu"))
        .bearer_auth(crate::spoke::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("rebooting"),
        "{body}"
    );
}

/// A seed in a private registry, the credentials it needs (`seed:s3cret`, base64) and the
/// `.dockerconfigjson` of a Secret holding them (base64, as the API serves Secret data).
const PRIVATE_SEED: &str = "registry.example.com:5000/seed:4.16.0";
const PRIVATE_AUTH: &str = "c2VlZDpzM2NyZXQ=";
const PRIVATE_DOCKERCONFIGJSON: &str =
    "eyJhdXRocyI6eyJyZWdpc3RyeS5leGFtcGxlLmNvbTo1MDAwIjp7ImF1dGgiOiJjMlZsWkRwek0yTnlaWFE9In19fQ==";
const SEED_PULL_SECRET: &str = "/var/lib/lca/workspace/seed-pull-secret";

/// Asks for Prep of `seed` and waits for it to fail: answers PrepInProgress's message.
async fn prep_fails(agent: &Agent, seed: Value) -> String {
    let (code, body) = agent
        .patch(json!({"spec": {"stage": "Prep", "seedImageRef": seed}}))
        .await;
    assert_eq!(code, 200, "{body}");
    let ibu = agent
        .wait_ibu(
            "Prep to fail",
            has_condition("PrepCompleted", "False", "Failed"),
        )
        .await;
    ibu["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PrepInProgress")
        .map(|c| c["message"].as_str().unwrap().to_string())
        .unwrap()
}

/// What keeps an agent started by `running` going: its process, state and log.
struct AgentProcess {
    _child: ChildGuard,
    _log: ChildLog,
    _state: tempfile::TempDir,
}

/// An agent started on `node` as `start` starts it, answering.
async fn running(node: &FakeNode) -> (AgentProcess, Agent) {
    let state = tempfile::tempdir().unwrap();
    let log = ChildLog::new(state.path(), "spoke-agent");
    let port = free_port();
    let child = start(node, state.path(), port, &log);
    let agent = Agent::at(port).await;
    (
        AgentProcess {
            _child: child,
            _log: log,
            _state: state,
        },
        agent,
    )
}

/// Asks for Prep of the seed `image` (of 4.16.0) and waits for it to complete.
async fn prep_completes(agent: &Agent, image: &str) {
    let seed = json!({"version": "4.16.0", "image": image});
    let (code, body) = agent
        .patch(json!({"spec": {"stage": "Prep", "seedImageRef": seed}}))
        .await;
    assert_eq!(code, 200, "{body}");
    agent
        .wait_ibu("Prep to complete", is_last("PrepCompleted", "Completed"))
        .await;
}

/// A node whose seed is in a private registry (`PRIVATE_SEED`, needing `PRIVATE_AUTH`).
fn node_with_private_seed() -> FakeNode {
    let node = FakeNode::new("4.15.0", &[]);
    node.admin(&[
        "add-seed",
        "--image",
        PRIVATE_SEED,
        "--version",
        "4.16.0",
        "--auth",
        PRIVATE_AUTH,
    ]);
    node
}

async fn back_to_idle(agent: &Agent) {
    agent.stage("Idle").await;
    agent.wait_ibu("Idle", is_last("Idle", "Idle")).await;
}

#[tokio::test]
async fn a_private_seed_needs_its_pull_secret_which_only_kube_mode_reads() {
    let node = node_with_private_seed();
    let (_agent_process, agent) = running(&node).await;
    // With the cluster's pull secret the registry refuses.
    let message = prep_fails(&agent, json!({"version": "4.16.0", "image": PRIVATE_SEED})).await;
    assert!(
        message.contains("unauthorized: access to the requested resource is not authorized"),
        "{message}"
    );
    back_to_idle(&agent).await;
    // The Secret lives in the cluster's API, which the agent reads only with --kube.
    let seed = json!({"version": "4.16.0", "image": PRIVATE_SEED,
        "pullSecretRef": {"name": "seed-pull-secret"}});
    let message = prep_fails(&agent, seed).await;
    assert!(
        message.contains(
            "seedImageRef.pullSecretRef \"seed-pull-secret\": the agent reads pull secrets from the cluster's API: run it with --kube"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn kube_mode_inspects_and_pulls_a_private_seed_with_its_secret_then_forgets_it() {
    let kube = chart_api().await;
    kube.seed(
        "api/v1",
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "sno1"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    let node = node_with_private_seed();
    let state = tempfile::tempdir().unwrap();
    let log = ChildLog::new(state.path(), "spoke-agent");
    let port = free_port();
    let mut cmd = agent_command(&state.path().join("state"), port);
    cmd.args(["--kube", "--host", "ostree", "--host-exec", "direct"])
        .args(["--cluster-version", "4.15.0", "--host-root"])
        .arg(&node.root)
        .env("KUBECONFIG", kube.write_kubeconfig(state.path()))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("PATH", node.path())
        .stdout(Stdio::null())
        .stderr(log.stdio());
    let _child = ChildGuard(cmd.spawn().expect("spoke-agent starts"));
    let agent = Agent::at(port).await;
    let seed = json!({"version": "4.16.0", "image": PRIVATE_SEED,
        "pullSecretRef": {"name": "seed-pull-secret"}});
    // No such Secret yet: Prep says so, as the Lifecycle Agent does.
    let message = prep_fails(&agent, seed.clone()).await;
    assert!(
        message.contains("failed to retrieve pull-secret from secret seed-pull-secret, err: secrets \"seed-pull-secret\" not found in namespace default"),
        "{message}"
    );
    back_to_idle(&agent).await;
    kube.seed(
        "api/v1",
        "secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": "seed-pull-secret", "namespace": "default"},
            "data": {".dockerconfigjson": PRIVATE_DOCKERCONFIGJSON}}),
    );
    let from = node.log().len();
    let (code, body) = agent
        .patch(json!({"spec": {"stage": "Prep", "seedImageRef": seed}}))
        .await;
    assert_eq!(code, 200, "{body}");
    agent
        .wait_ibu("Prep to complete", is_last("PrepCompleted", "Completed"))
        .await;
    let lines: Vec<String> = node.log()[from..].iter().map(|l| l.join(" ")).collect();
    assert!(
        lines.contains(&format!(
            "skopeo inspect --retry-times 10 --authfile {SEED_PULL_SECRET} docker://{PRIVATE_SEED}"
        )) && lines.contains(&format!(
            "podman pull --authfile {SEED_PULL_SECRET} {PRIVATE_SEED}"
        )),
        "{lines:#?}"
    );
    // Used, then gone from the node.
    assert!(!node.file(SEED_PULL_SECRET).exists());
    assert_eq!(kube.denied(), Vec::<String>::new());
}

/// A node whose container storage (20 GiB, 6 used besides images) holds seven old images of
/// 1 GiB, one pinned by CRI-O and one run by a container: 65 % full.
fn node_with_old_images() -> FakeNode {
    let node = FakeNode::new("4.15.0", &[(SEED, "4.16.0")]);
    node.admin(&["disk", "--size", "20G", "--used", "6G"]);
    for i in 1..=5 {
        let image = format!("quay.io/old:{i}");
        let created = (1000 * i).to_string();
        node.admin(&[
            "add-image",
            "--image",
            &image,
            "--size",
            "1G",
            "--created",
            &created,
        ]);
    }
    node.admin(&[
        "add-image",
        "--image",
        "quay.io/newer:1",
        "--size",
        "1G",
        "--created",
        "9000",
    ]);
    node.admin(&[
        "add-image",
        "--image",
        "quay.io/app:1",
        "--size",
        "1G",
        "--created",
        "1",
        "--in-use",
    ]);
    node.admin(&[
        "add-image",
        "--image",
        "quay.io/infra:1",
        "--size",
        "1G",
        "--created",
        "2",
        "--pinned",
    ]);
    node
}

fn local_images(node: &FakeNode) -> Vec<String> {
    node.status()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .filter(|i| !i.contains("ocp-v4.0-art-dev"))
        .collect()
}

#[tokio::test]
async fn prep_removes_unused_images_oldest_first_until_storage_is_under_the_threshold() {
    let node = node_with_old_images();
    let (_agent_process, agent) = running(&node).await;
    prep_completes(&agent, SEED).await;
    // The five oldest unused images went in one `podman rmi`, which brought storage to 40 %:
    // the newer one stays, as do the pinned one and the one a container runs.
    assert_eq!(
        local_images(&node),
        ["quay.io/app:1", "quay.io/infra:1", "quay.io/newer:1"]
    );
    let rmi: Vec<Vec<String>> = node
        .log()
        .into_iter()
        .filter(|l| l.len() > 2 && l[0] == "podman" && l[1] == "rmi" && l[2] != SEED)
        .collect();
    assert_eq!(rmi.len(), 1, "{rmi:?}");
    let named: Vec<&String> = rmi[0]
        .iter()
        .filter(|a| a.starts_with("quay.io/"))
        .collect();
    assert_eq!(
        named,
        [
            "quay.io/old:1",
            "quay.io/old:2",
            "quay.io/old:3",
            "quay.io/old:4",
            "quay.io/old:5"
        ]
    );
    in_order(
        &node.log(),
        &[
            "stat --file-system --format=%b %a /var/lib/containers",
            "crictl ps -a -o json",
            "podman ps -a --format json --log-level error",
            "crictl images -o json",
            "podman images --format json --log-level error",
            "podman rmi",
            "stat --file-system --format=%b %a /var/lib/containers",
            &format!("podman pull --authfile /var/lib/kubelet/config.json {SEED}"),
        ],
    )
    .unwrap();
}

#[tokio::test]
async fn a_full_disk_fails_prep_with_the_pulls_error_and_disabled_cleanup_removes_nothing() {
    // Image cleanup turned off: nothing is removed, and the seed no longer fits.
    let node = node_with_old_images();
    node.admin(&["disk", "--size", "20G", "--used", "11G"]);
    let (_agent_process, agent) = running(&node).await;
    let (code, body) = agent
        .patch(json!({"metadata": {"annotations": {"image-cleanup.lca.openshift.io/on-prep": "Disabled"}}}))
        .await;
    assert_eq!(code, 200, "{body}");
    let message = prep_fails(&agent, json!({"version": "4.16.0", "image": SEED})).await;
    assert!(
        message.starts_with("failed to setup stateroot rhcos_4.16.0: ")
            && message.contains("no space left on device"),
        "{message}"
    );
    assert_eq!(local_images(&node).len(), 8);
    assert!(
        !node
            .log()
            .iter()
            .any(|l| l.first().is_some_and(|c| c == "stat"))
    );
    // Idle cleans up what the failed setup left; with cleanup on, the next Prep frees room.
    back_to_idle(&agent).await;
    assert_eq!(osnames(&node), [("rhcos".into(), true)]);
    let (code, body) = agent
        .patch(
            json!({"metadata": {"annotations": {"image-cleanup.lca.openshift.io/on-prep": null}}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    prep_completes(&agent, SEED).await;
}

#[tokio::test]
async fn without_the_clusters_api_an_upgrade_stops_before_the_pivot() {
    // Prepared without --kube: the seed's reconfiguration would wait for ever on the new
    // stateroot, so the agent refuses before making it the default.
    let node = FakeNode::new("4.15.0", &[(SEED, "4.16.0")]);
    let (_agent_process, agent) = running(&node).await;
    prep_completes(&agent, SEED).await;
    agent.stage("Upgrade").await;
    let ibu = agent
        .wait_ibu(
            "Upgrade to fail",
            has_condition("UpgradeCompleted", "False", "Failed"),
        )
        .await;
    assert!(
        ibu.to_string().contains(
            "the seed's post-pivot reconfiguration needs this cluster's configuration from its API: run the agent with --kube"
        ),
        "{ibu}"
    );
    assert!(!node.reboot_requested());
    assert_eq!(
        osnames(&node),
        [("rhcos".into(), true), ("rhcos_4.16.0".into(), false)]
    );
}

#[tokio::test]
async fn a_fips_seed_on_a_fips_node_deploys_with_the_fips_kernel_arguments() {
    const FIPS_SEED: &str = "quay.io/seed-fips:4.16.0";
    let node = FakeNode::new("4.15.0", &[]);
    node.admin(&[
        "add-seed",
        "--image",
        FIPS_SEED,
        "--version",
        "4.16.0",
        "--fips",
    ]);
    let fips = node.file("/proc/sys/crypto/fips_enabled");
    std::fs::create_dir_all(fips.parent().unwrap()).unwrap();
    std::fs::write(&fips, "1\n").unwrap();
    let (_agent_process, agent) = running(&node).await;
    prep_completes(&agent, FIPS_SEED).await;
    in_order(
        &node.log(),
        &["ostree admin deploy --os rhcos_4.16.0 --no-prune --karg-append systemd.unified_cgroup_hierarchy=1 --karg-append rcupdate.rcu_normal_after_boot=0 --karg-append fips=1 --karg-append boot=LABEL=boot --karg ibu=4.16.0 "],
    )
    .unwrap();
}

#[tokio::test]
async fn prep_enables_the_agents_own_service_in_the_new_deployment() {
    let node = FakeNode::new("4.15.0", &[(SEED, "4.16.0")]);
    let unit = "[Unit]\nDescription=spoke-agent\n[Service]\nEnvironmentFile=-/etc/spoke-agent/env\nExecStart=/usr/local/bin/spoke-agent serve --host ostree --host-root / --host-exec direct\n[Install]\nWantedBy=multi-user.target\n";
    for (path, text) in [
        ("/etc/systemd/system/spoke-agent.service", unit),
        ("/etc/spoke-agent/env", "SPOKE_CLUSTER_VERSION=4.15.0\n"),
    ] {
        let file = node.file(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let log = ChildLog::new(state.path(), "spoke-agent");
    let port = free_port();
    let _child = start_with(
        &node,
        (state.path(), port, &log),
        &["--service-unit", "spoke-agent.service"],
    );
    let agent = Agent::at(port).await;
    prep_completes(&agent, SEED).await;
    // The new deployment's /etc: the unit, its environment and the link that enables it.
    let dd = std::fs::read_dir(node.file("/ostree/deploy/rhcos_4.16.0/deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let etc = dd.join("etc");
    assert_eq!(
        std::fs::read_to_string(etc.join("systemd/system/spoke-agent.service")).unwrap(),
        unit
    );
    assert_eq!(
        std::fs::read_to_string(etc.join("spoke-agent/env")).unwrap(),
        "SPOKE_CLUSTER_VERSION=4.15.0\n"
    );
    let link = etc.join("systemd/system/multi-user.target.wants/spoke-agent.service");
    assert_eq!(
        std::fs::read_link(link).unwrap(),
        std::path::Path::new("/etc/systemd/system/spoke-agent.service")
    );
}
