//! `--host ostree`: the image-based upgrade on the node itself, with the commands and files
//! of the Lifecycle Agent (`ibu-host.md`), over the node-OS layer in `node.rs`. What lives in
//! the cluster's API (OADP Backups and Restores, ConfigMaps) is `--kube`'s, which wraps this
//! host; without it those steps have nothing to do.
//!
//! Every step can be run again after a restart or a reboot: stateroot setup marks its end
//! in the new stateroot and, finding a stateroot without the mark, removes it and starts
//! again; precache pulls only the images not there yet; a pivot already made shows in the
//! booted deployment.

pub mod node;
pub mod runner;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleet_types::ibu::{ConfigMapRef, ImageBasedUpgrade, ImageBasedUpgradeSpec, SeedImageRef};
use futures::StreamExt;
use serde_json::Value;
use spoke_core::engine::validate::ClusterFacts;
use spoke_core::engine::{Root, Run, SpokeState};
use spoke_core::host::{ClusterConfig, Host, HostError, PrecacheSummary, RebootFor, RestoreInfo};

use node::NodeOs;
use runner::NodeError;

/// The IBU, where the Lifecycle Agent keeps it in each stateroot's `/var`.
pub const IBU_FILE: &str = "/var/lib/lca/ibu.json";
/// The engine's own state rides in the IBU file as this annotation, so that the file stays
/// one the Lifecycle Agent can read (and a node can be handed to it).
pub const RUN_ANNOTATION: &str = "spoke-agent.lca.openshift.io/run";
/// Written into a new stateroot when its setup has ended: a stateroot without it is partial.
pub const SETUP_DONE_FILE: &str = "/var/lib/lca/stateroot-setup.done";
/// The Lifecycle Agent's workspace, removed by cleanup.
pub const WORKSPACE: &str = "/var/lib/lca/workspace";
/// The seed's own registry credentials (`seedImageRef.pullSecretRef`), while they are used.
pub const SEED_PULL_SECRET: &str = "/var/lib/lca/workspace/seed-pull-secret";
/// The seed's release images, copied there by stateroot setup for precaching.
pub const CONTAINERS_LIST: &str = "/var/tmp/containers.list";
/// The agent's own watchdog on the new stateroot: it rolls the node back when the upgrade
/// has not completed in time after the reboot, even if the agent never comes up there.
pub const WATCHDOG_UNIT: &str = "spoke-agent-init-monitor.service";
/// Where the watchdog's copy of the agent lives on the new stateroot (`/usr/local` is
/// `/var/usrlocal` on RHCOS).
pub const WATCHDOG_BIN: &str = "/usr/local/bin/spoke-agent";
/// The kernel's identity of this boot.
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// Where the seed's post-pivot reconfiguration finds its input (`/var/opt/openshift` on
/// RHCOS), in the new stateroot.
pub const OPT_OPENSHIFT: &str = "/opt/openshift";
/// The node's authorized SSH key, as Ignition wrote it.
pub const SSH_AUTHORIZED_KEY: &str = "/home/core/.ssh/authorized_keys.d/ignition";
/// The seed's post-pivot reconfiguration (network, recert, kubelet).
pub const POST_PIVOT_UNIT: &str = "installation-configuration.service";
/// The kubelet's certificates in a stateroot's `/var/lib/kubelet/pki`: rolling back to a
/// stateroot whose certificates expired leaves a cluster that cannot start.
const KUBELET_CERTS: [&str; 2] = ["kubelet-client-current.pem", "kubelet-server-current.pem"];
/// Rollback is said to end this long before the first of them expires.
const ROLLBACK_EXPIRY_MARGIN: chrono::Duration = chrono::Duration::minutes(30);
/// Precache pulls at once, and tries per image (as the Lifecycle Agent's precache job).
const PRECACHE_PARALLEL: usize = 10;
const PULL_TRIES: u32 = 5;

/// What the node backend needs besides the node.
#[derive(Clone, Debug)]
pub struct OstreeConfig {
    /// The cluster's OpenShift version, which the node does not record in full.
    pub current_version: String,
    /// How long to wait for the node to go down after asking it to reboot before saying
    /// it did not (the Lifecycle Agent waits 60 minutes).
    pub reboot_wait: Duration,
    /// The systemd unit that runs the agent on the node, enabled in the new deployment.
    pub service_unit: Option<String>,
}

pub struct OstreeHost {
    node: NodeOs,
    config: OstreeConfig,
}

fn terminal(e: NodeError) -> HostError {
    HostError::Terminal(e.to_string())
}

/// A stateroot's directory: a node path under `/var` (`/var/lib/lca/ibu.json`) is in that
/// stateroot at `<dir><path>`, its `/var` being `<dir>/var`.
pub fn stateroot_dir(stateroot: &str) -> String {
    format!("/ostree/deploy/{stateroot}")
}

impl OstreeHost {
    pub fn new(node: NodeOs, config: OstreeConfig) -> OstreeHost {
        OstreeHost { node, config }
    }

    /// The IBU file of a stateroot (the booted one: its `/var` is the node's `/var`).
    async fn ibu_file(&self, root: &Root) -> Result<String, NodeError> {
        Ok(match root {
            Root::Booted => IBU_FILE.to_string(),
            Root::Seed(s) => format!("{}{IBU_FILE}", stateroot_dir(s)),
            Root::Previous => {
                let all = self.node.deployments().await?;
                let booted = all.iter().find(|d| d.booted).map(|d| d.osname.as_str());
                let previous = all
                    .iter()
                    .find(|d| Some(d.osname.as_str()) != booted)
                    .ok_or_else(|| {
                        NodeError::Refused("no stateroot besides the booted one".into())
                    })?;
                format!("{}{IBU_FILE}", stateroot_dir(&previous.osname))
            }
        })
    }

    /// The credentials the seed is inspected and pulled with: its own Secret's when the IBU
    /// names one (lent by `--kube`), else the cluster's pull secret.
    fn seed_auth(&self, seed: &SeedImageRef) -> Result<&'static str, HostError> {
        let Some(secret) = &seed.pull_secret_ref else {
            return Ok(node::AUTH_FILE);
        };
        if self.node.runner.path(SEED_PULL_SECRET).is_file() {
            Ok(SEED_PULL_SECRET)
        } else {
            Err(HostError::Terminal(format!(
                "seedImageRef.pullSecretRef {:?}: the agent reads pull secrets from the cluster's API: run it with --kube",
                secret.name
            )))
        }
    }

    /// Sets up the seed's stateroot from its image (`ibu-host.md` section 1, steps 1 to 11).
    async fn setup(&self, stateroot: &str, seed: &SeedImageRef) -> Result<(), HostError> {
        let node = &self.node;
        node.pull_seed(&seed.image, self.seed_auth(seed)?)
            .await
            .map_err(terminal)?;
        node.remount_sysroot_rw().await.map_err(terminal)?;
        let at = node.mount_image(&seed.image).await.map_err(terminal)?;
        let ws = format!("/var/tmp/ibu-stateroot-setup-{stateroot}");
        let result = self.setup_from(stateroot, seed, &at, &ws).await;
        let _ = tokio::fs::remove_dir_all(node.runner.path(&ws)).await;
        let removed = node.unmount_remove_image(&seed.image).await;
        result?;
        removed.map_err(terminal)
    }

    async fn setup_from(
        &self,
        stateroot: &str,
        seed: &SeedImageRef,
        at: &str,
        ws: &str,
    ) -> Result<(), HostError> {
        let (node, runner) = (&self.node, &self.node.runner);
        let seed_file = |name: &str| format!("{at}/{name}");
        let read_json = |name: &'static str| async move {
            let path = seed_file(name);
            let text = runner
                .read(&path)
                .await
                .map_err(terminal)?
                .ok_or_else(|| HostError::Terminal(format!("the seed image has no {name}")))?;
            serde_json::from_str::<Value>(&text)
                .map_err(|e| HostError::Terminal(format!("the seed's {name}: {e}")))
        };
        let _ = tokio::fs::remove_dir_all(runner.path(ws)).await;
        let repo = format!("{ws}/ostree");
        tokio::fs::create_dir_all(runner.path(&repo))
            .await
            .map_err(|e| terminal(runner::file_error(&repo, e)))?;
        node.untar(&seed_file("ostree.tgz"), &repo)
            .await
            .map_err(terminal)?;
        let rpm = read_json("rpm-ostree.json").await?;
        let seed_booted = rpm["deployments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["booted"] == true)
            .ok_or_else(|| {
                HostError::Terminal("the seed's rpm-ostree.json has no booted deployment".into())
            })?;
        let checksum = seed_booted["checksum"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let seed_id = seed_booted["id"].as_str().unwrap_or_default().to_string();
        let manifest = read_json("manifest.json").await?;
        let seed_version = manifest["seed_cluster_ocp_version"]
            .as_str()
            .unwrap_or_default();
        if seed_version != seed.version {
            return Err(HostError::Terminal(format!(
                "seed image version mismatch: the image is of {seed_version}, seedImageRef.version says {}",
                seed.version
            )));
        }
        node.pull_local(&repo).await.map_err(terminal)?;
        node.os_init(stateroot).await.map_err(terminal)?;
        let mco = read_json("mco-currentconfig.json").await?;
        let mut kargs: Vec<String> = mco["spec"]["kernelArguments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(String::from))
            .collect();
        // A FIPS seed boots in FIPS mode, from the boot partition by label.
        if mco["spec"]["fips"] == true {
            kargs.extend(["fips=1".to_string(), "boot=LABEL=boot".to_string()]);
        }
        // The mark of a deployment made by an image-based upgrade.
        let ibu_karg = [format!("ibu={}", seed.version)];
        let not_default = node.supports_set_default().await.map_err(terminal)?;
        let deployment = node
            .deploy(stateroot, &checksum, &kargs, &ibu_karg, not_default)
            .await
            .map_err(terminal)?;
        let dd = deployment.dir();
        // The seed's origin, its /var and /etc, and the /etc files it deleted.
        let origin_name = seed_id
            .strip_prefix("rhcos-")
            .map(|rest| format!("ostree-{rest}.origin"))
            .unwrap_or_default();
        if let Ok(Some(origin)) = runner.read(&seed_file(&origin_name)).await {
            runner
                .write(&format!("{dd}.origin"), origin.as_bytes())
                .await
                .map_err(terminal)?;
        }
        node.untar(&seed_file("var.tgz"), &stateroot_dir(stateroot))
            .await
            .map_err(terminal)?;
        node.untar(&seed_file("etc.tgz"), &dd)
            .await
            .map_err(terminal)?;
        if let Ok(Some(deletions)) = runner.read(&seed_file("etc.deletions")).await {
            for path in deletions
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with('/'))
            {
                let _ = tokio::fs::remove_file(runner.path(&format!("{dd}{path}"))).await;
            }
        }
        for (name, to) in [
            ("containers.list", CONTAINERS_LIST),
            ("manifest.json", "/var/tmp/manifest.json"),
        ] {
            if let Ok(Some(text)) = runner.read(&seed_file(name)).await {
                runner.write(to, text.as_bytes()).await.map_err(terminal)?;
            }
        }
        self.install_watchdog(stateroot, &dd).await?;
        if let Some(unit) = &self.config.service_unit {
            self.carry_service(unit, &dd).await?;
        }
        runner
            .write(
                &format!("{}{SETUP_DONE_FILE}", stateroot_dir(stateroot)),
                seed.image.as_bytes(),
            )
            .await
            .map_err(terminal)
    }

    /// Installs the watchdog into the new deployment: a copy of this agent in its
    /// `/usr/local/bin` and a unit its `/etc` enables (the Lifecycle Agent's own comes with
    /// the seed image; ours does not depend on the seed).
    async fn install_watchdog(&self, stateroot: &str, dd: &str) -> Result<(), HostError> {
        let runner = &self.node.runner;
        let bin = format!("{}/var/usrlocal/bin/spoke-agent", stateroot_dir(stateroot));
        let target = runner.path(&bin);
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| terminal(runner::file_error(&bin, e)))?;
        }
        let me = std::env::current_exe()
            .map_err(|e| HostError::Terminal(format!("the agent's own binary: {e}")))?;
        let _ = tokio::fs::remove_file(&target).await;
        if tokio::fs::hard_link(&me, &target).await.is_err() {
            tokio::fs::copy(&me, &target)
                .await
                .map_err(|e| terminal(runner::file_error(&bin, e)))?;
        }
        let unit = format!(
            "[Unit]\nDescription=spoke-agent: roll back an image-based upgrade that does not complete\n\
             After=network-online.target\n\n[Service]\nType=simple\n\
             ExecStart={WATCHDOG_BIN} init-monitor --host-root / --host-exec direct\n\n\
             [Install]\nWantedBy=multi-user.target\n"
        );
        runner
            .write(
                &format!("{dd}/etc/systemd/system/{WATCHDOG_UNIT}"),
                unit.as_bytes(),
            )
            .await
            .map_err(terminal)?;
        let link = runner.path(&format!(
            "{dd}/etc/systemd/system/multi-user.target.wants/{WATCHDOG_UNIT}"
        ));
        if let Some(dir) = link.parent() {
            let _ = tokio::fs::create_dir_all(dir).await;
        }
        let _ = tokio::fs::remove_file(&link).await;
        tokio::fs::symlink(format!("/etc/systemd/system/{WATCHDOG_UNIT}"), &link)
            .await
            .map_err(|e| HostError::Terminal(format!("enabling {WATCHDOG_UNIT}: {e}")))
    }

    /// Enables the agent's own unit in the new deployment `dd`: its unit file, the files under
    /// `/etc` it reads as `EnvironmentFile`, and the link its `WantedBy` target wants (the
    /// agent's binary is the watchdog's copy in the new `/usr/local/bin`).
    async fn carry_service(&self, unit: &str, dd: &str) -> Result<(), HostError> {
        let runner = &self.node.runner;
        let file = format!("/etc/systemd/system/{unit}");
        let text = runner.read(&file).await.map_err(terminal)?.ok_or_else(|| {
            HostError::Terminal(format!(
                "--service-unit {unit}: {file} not found: the agent's unit must be there to be enabled in the new stateroot"
            ))
        })?;
        runner
            .write(&format!("{dd}{file}"), text.as_bytes())
            .await
            .map_err(terminal)?;
        let value = |key: &str| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix(key))
                .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .collect::<Vec<String>>()
        };
        for env in value("EnvironmentFile=") {
            let env = env.trim_start_matches('-');
            if env.starts_with("/etc/")
                && let Some(content) = runner.read(env).await.map_err(terminal)?
            {
                runner
                    .write(&format!("{dd}{env}"), content.as_bytes())
                    .await
                    .map_err(terminal)?;
            }
        }
        if let Some(exec) = value("ExecStart=").first()
            && exec.trim_start_matches(['-', '@', '+', '!']) != WATCHDOG_BIN
        {
            tracing::warn!(unit, exec = %exec, "the agent's unit does not run {WATCHDOG_BIN}, the copy the new stateroot has");
        }
        let mut targets = value("WantedBy=");
        if targets.is_empty() {
            targets.push("multi-user.target".into());
        }
        for target in targets {
            let link = runner.path(&format!("{dd}/etc/systemd/system/{target}.wants/{unit}"));
            if let Some(dir) = link.parent() {
                let _ = tokio::fs::create_dir_all(dir).await;
            }
            let _ = tokio::fs::remove_file(&link).await;
            tokio::fs::symlink(&file, &link)
                .await
                .map_err(|e| HostError::Terminal(format!("enabling {unit}: {e}")))?;
        }
        Ok(())
    }

    /// Stops and removes the watchdog (the upgrade completed): each step only if needed.
    async fn disable_watchdog(&self) -> Result<(), NodeError> {
        let runner = &self.node.runner;
        if self.node.unit_active(WATCHDOG_UNIT).await? {
            runner.run(&["systemctl", "stop", WATCHDOG_UNIT]).await?;
        }
        let enabled = runner
            .output(&["systemctl", "is-enabled", WATCHDOG_UNIT])
            .await?;
        if enabled.stdout.trim() == "enabled" {
            runner.run(&["systemctl", "disable", WATCHDOG_UNIT]).await?;
        }
        let file = format!("/etc/systemd/system/{WATCHDOG_UNIT}");
        if runner.path(&file).exists() {
            tokio::fs::remove_file(runner.path(&file))
                .await
                .map_err(|e| runner::file_error(&file, e))?;
            runner.run(&["systemctl", "daemon-reload"]).await?;
        }
        Ok(())
    }

    /// `spoke-agent init-monitor`, run by the watchdog unit at the new stateroot's boot:
    /// waits the IBU's init-monitor timeout; if the upgrade has not completed by then (the
    /// agent did not come up, or is stuck), rolls the node back as the agent would (the
    /// failed IBU on the old stateroot, that stateroot the default, a reboot).
    pub async fn init_monitor(&self) -> Result<(), HostError> {
        use spoke_core::engine::{self, Op, Outcome, Work};
        let watching = |s: &Option<SpokeState>| {
            s.as_ref()
                .is_some_and(|s| s.run.op == Some(Op::UpgradePost))
        };
        let state = self.load_state().await?;
        if !watching(&state) {
            tracing::info!("no upgrade to watch on this stateroot");
            return Ok(());
        }
        let secs = state
            .as_ref()
            .map(engine::init_monitor_seconds)
            .unwrap_or_default();
        tracing::info!(timeout_seconds = secs, "watching the upgrade");
        tokio::time::sleep(Duration::from_secs(secs.max(0) as u64)).await;
        let mut state = self.load_state().await?;
        if !watching(&state) {
            tracing::info!("the upgrade ended in time");
            return Ok(());
        }
        let Some(s) = state.as_mut() else {
            return Ok(());
        };
        let now = Utc::now();
        s.run.watchdog_deadline = Some(now);
        if !engine::tick(s, now) {
            tracing::info!("automatic rollback on init-monitor timeout is disabled");
            return Ok(());
        }
        while let Some((work, epoch)) = engine::begin(s, now) {
            match work {
                Work::Pivot { saves, default } => {
                    for (root, saved) in saves {
                        self.save_state(&root, &Arc::new(saved)).await?;
                    }
                    self.set_default(&default).await?;
                    engine::complete(s, epoch, Outcome::Done, now);
                }
                Work::Reboot => {
                    tracing::warn!("the upgrade did not complete in time: rolling back");
                    return self
                        .node
                        .reboot(RebootFor::Rollback.word())
                        .await
                        .map_err(terminal);
                }
                other => {
                    return Err(HostError::Terminal(format!(
                        "unexpected step of the rollback: {other:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The Lifecycle Agent's `cluster-configuration` in the new stateroot's `/var/opt/openshift`
    /// (its `/opt/openshift`): `manifest.json`, the API's part completed with the node's SSH
    /// keys and chrony configuration, the manifests, and the node's network connections.
    async fn write_reconfiguration(
        &self,
        stateroot: &str,
        from_api: ClusterConfig,
    ) -> Result<(), NodeError> {
        let runner = &self.node.runner;
        self.node.remount_sysroot_rw().await?;
        let opt = format!("{}/var{OPT_OPENSHIFT}", stateroot_dir(stateroot));
        let mut c = from_api.reconfiguration;
        let ssh_key = runner.read(SSH_AUTHORIZED_KEY).await?.ok_or_else(|| {
            NodeError::Refused(format!(
                "failed to read sshKey: {SSH_AUTHORIZED_KEY} is missing"
            ))
        })?;
        c.insert("ssh_key".into(), Value::String(ssh_key));
        let mut server_keys = Vec::new();
        if let Ok(mut entries) = tokio::fs::read_dir(runner.path("/etc/ssh")).await {
            while let Ok(Some(e)) = entries.next_entry().await {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("ssh_host_") && name.contains("_key") {
                    let content = runner.read(&format!("/etc/ssh/{name}")).await?;
                    server_keys.push((name, content.unwrap_or_default()));
                }
            }
        }
        server_keys.sort();
        c.insert(
            "server_ssh_keys".into(),
            server_keys
                .into_iter()
                .map(|(name, content)| serde_json::json!({"file_name": name, "file_content": content}))
                .collect(),
        );
        if let Some(chrony) = runner.read("/etc/chrony.conf").await? {
            c.insert("chrony_config".into(), Value::String(chrony));
        }
        let text = serde_json::to_vec_pretty(&c)
            .map_err(|e| NodeError::Refused(format!("the cluster configuration: {e}")))?;
        let dir = format!("{opt}/cluster-configuration");
        runner
            .write_private(&format!("{dir}/manifest.json"), &text)
            .await?;
        // The post-pivot reads this directory even when there is nothing to apply.
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(runner.path(&format!("{dir}/manifests")))
            .await
            .map_err(|e| runner::file_error(&format!("{dir}/manifests"), e))?;
        for (file, manifest) in &from_api.manifests {
            let text = serde_json::to_vec_pretty(manifest)
                .map_err(|e| NodeError::Refused(format!("{file}: {e}")))?;
            runner
                .write_private(&format!("{dir}/manifests/{file}"), &text)
                .await?;
        }
        // LVM's devices file, so that LVM storage finds its volumes again.
        if let Some(devices) = runner.read("/etc/lvm/devices/system.devices").await? {
            runner
                .write_private(
                    &format!("{opt}/lvm-configuration/system.devices"),
                    devices.as_bytes(),
                )
                .await?;
        }
        // The network connections, as files (NetworkManager's keyfiles).
        let connections = "/etc/NetworkManager/system-connections";
        let to = format!("{opt}/network-configuration/system-connections");
        if let Ok(mut entries) = tokio::fs::read_dir(runner.path(connections)).await {
            while let Ok(Some(e)) = entries.next_entry().await {
                let name = e.file_name().to_string_lossy().to_string();
                if let Some(content) = runner.read(&format!("{connections}/{name}")).await? {
                    runner
                        .write_private(&format!("{to}/{name}"), content.as_bytes())
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Removes every trace of a stateroot that is not booted: its deployments (the highest
    /// index first, so the others keep theirs), then its directory.
    async fn remove_unbooted(&self, stateroot: &str) -> Result<(), NodeError> {
        let mut found: Vec<usize> = self
            .node
            .deployments()
            .await?
            .into_iter()
            .filter(|d| d.osname == stateroot && !d.booted)
            .map(|d| d.index)
            .collect();
        found.sort_unstable_by(|a, b| b.cmp(a));
        for index in found {
            self.node.undeploy(index).await?;
        }
        if self.node.runner.path(&stateroot_dir(stateroot)).exists() {
            self.node.remove_stateroot(stateroot).await?;
        }
        Ok(())
    }

    async fn precache_one(&self, image: &str) -> bool {
        for _ in 0..PULL_TRIES {
            if self.node.image_exists(image).await.unwrap_or(false) {
                return true;
            }
            match self.node.pull_image(image).await {
                Ok(()) => return true,
                Err(NodeError::Command { output, .. }) if output.contains("manifest unknown") => {
                    return false;
                }
                Err(_) => {}
            }
        }
        self.node.image_exists(image).await.unwrap_or(false)
    }
}

impl Host for OstreeHost {
    async fn load_state(&self) -> Result<Option<SpokeState>, HostError> {
        let Some(text) = self.node.runner.read(IBU_FILE).await.map_err(terminal)? else {
            return Ok(None);
        };
        let mut ibu: ImageBasedUpgrade = serde_json::from_str(&text)
            .map_err(|e| HostError::Terminal(format!("{IBU_FILE}: {e}")))?;
        let run = ibu
            .metadata
            .annotations
            .as_mut()
            .and_then(|a| a.remove(RUN_ANNOTATION))
            .map(|r| serde_json::from_str::<Run>(&r))
            .transpose()
            .map_err(|e| HostError::Terminal(format!("{IBU_FILE}: {RUN_ANNOTATION}: {e}")))?
            .unwrap_or_default();
        if ibu
            .metadata
            .annotations
            .as_ref()
            .is_some_and(BTreeMap::is_empty)
        {
            ibu.metadata.annotations = None;
        }
        Ok(Some(SpokeState { ibu, run }))
    }

    async fn save_state(&self, root: &Root, state: &Arc<SpokeState>) -> Result<(), HostError> {
        let file = self.ibu_file(root).await.map_err(terminal)?;
        if *root != Root::Booted {
            self.node.remount_sysroot_rw().await.map_err(terminal)?;
        }
        let mut ibu = state.ibu.clone();
        let run = serde_json::to_string(&state.run)
            .map_err(|e| HostError::Terminal(format!("the agent's state: {e}")))?;
        ibu.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(RUN_ANNOTATION.to_string(), run);
        let text = serde_json::to_vec_pretty(&ibu)
            .map_err(|e| HostError::Terminal(format!("the IBU: {e}")))?;
        self.node.runner.write(&file, &text).await.map_err(terminal)
    }

    async fn health(&self) -> Result<(), String> {
        match self.node.unit_active(POST_PIVOT_UNIT).await {
            Ok(true) => Err(format!(
                "the seed's post-pivot reconfiguration ({POST_PIVOT_UNIT}) is still running"
            )),
            Ok(false) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn cluster_facts(
        &self,
        _spec: &ImageBasedUpgradeSpec,
    ) -> Result<ClusterFacts, HostError> {
        let target = self
            .node
            .container_storage_target()
            .await
            .map_err(terminal)?
            .ok_or_else(|| {
                HostError::Terminal("container storage mountpoint target not found".into())
            })?;
        let fips = self
            .node
            .runner
            .read("/proc/sys/crypto/fips_enabled")
            .await
            .ok()
            .flatten()
            .is_some_and(|v| v.trim() == "1");
        Ok(ClusterFacts {
            version: self.config.current_version.clone(),
            namespaces: BTreeSet::new(),
            api_versions: BTreeSet::new(),
            crds: BTreeSet::new(),
            oadp_installed: false,
            data_protection_applications: 0,
            lvms_volumes: false,
            configmaps: BTreeMap::new(),
            dry_run_errors: BTreeMap::new(),
            has_proxy: false,
            fips,
            container_storage_mount: target,
        })
    }

    async fn inspect_seed(
        &self,
        seed: &SeedImageRef,
    ) -> Result<BTreeMap<String, String>, HostError> {
        let auth = self.seed_auth(seed)?;
        self.node
            .inspect_labels(&seed.image, auth)
            .await
            .map_err(|e| {
                HostError::Terminal(format!(
                    "failed to inspect the seed image {}: {e}",
                    seed.image
                ))
            })
    }

    async fn seed_pull_secret(&self, auth: Option<&[u8]>) -> Result<(), HostError> {
        let runner = &self.node.runner;
        match auth {
            Some(auth) => runner
                .write_private(SEED_PULL_SECRET, auth)
                .await
                .map_err(terminal),
            None => match tokio::fs::remove_file(runner.path(SEED_PULL_SECRET)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(terminal(runner::file_error(SEED_PULL_SECRET, e)))
                }
                _ => Ok(()),
            },
        }
    }

    /// As the Lifecycle Agent before Prep pulls: unused, unpinned images go, dangling ones
    /// first, then the oldest, five at a time, until container storage is under the
    /// threshold or nothing is left to remove.
    async fn free_container_storage(&self, threshold: u8) -> Result<(), HostError> {
        let node = &self.node;
        let used = node
            .container_storage_used_percent()
            .await
            .map_err(terminal)?;
        if used <= u64::from(threshold) {
            return Ok(());
        }
        tracing::info!(
            used_percent = used,
            threshold_percent = threshold,
            "container storage is above the threshold: removing unused images"
        );
        let in_use = node.images_in_use().await.map_err(terminal)?;
        let pinned = node.pinned_images().await.map_err(terminal)?;
        let mut images = node.images().await.map_err(terminal)?;
        images.sort_by_key(|i| (!i.dangling, i.created));
        let candidates: Vec<_> = images
            .iter()
            .filter(|i| !pinned.contains(&i.id) && !i.refs().any(|r| in_use.contains(r)))
            .collect();
        for batch in candidates.chunks(5) {
            let refs: Vec<&str> = batch
                .iter()
                .flat_map(|i| {
                    std::iter::once(i.id.as_str()).chain(
                        [&i.repo_tags, &i.repo_digests]
                            .into_iter()
                            .flatten()
                            .flatten()
                            .map(String::as_str),
                    )
                })
                .collect();
            let said = node.remove_images(&refs).await.map_err(terminal)?;
            tracing::info!(output = %said.trim(), "removed unused images");
            let used = node
                .container_storage_used_percent()
                .await
                .map_err(terminal)?;
            if used <= u64::from(threshold) {
                tracing::info!(
                    used_percent = used,
                    "container storage is under the threshold"
                );
                return Ok(());
            }
        }
        Err(HostError::Terminal(format!(
            "container storage is still above {threshold}% with every unused image removed"
        )))
    }

    async fn setup_stateroot(&self, stateroot: &str, seed: &SeedImageRef) -> Result<(), HostError> {
        let runner = &self.node.runner;
        let done = runner
            .read(&format!("{}{SETUP_DONE_FILE}", stateroot_dir(stateroot)))
            .await
            .map_err(terminal)?;
        let deployed = self
            .node
            .deployments()
            .await
            .map_err(terminal)?
            .iter()
            .any(|d| d.osname == stateroot);
        if done.as_deref() == Some(seed.image.as_str()) && deployed {
            // Set up, and stopped before (or while) letting go of the seed image.
            return self
                .node
                .unmount_remove_image(&seed.image)
                .await
                .map_err(terminal);
        }
        // A setup cut short (a restart, a reboot, a failure) left a partial stateroot.
        self.remove_unbooted(stateroot).await.map_err(|e| {
            HostError::Terminal(format!(
                "failed to remove the partial stateroot {stateroot}: {e}"
            ))
        })?;
        self.setup(stateroot, seed).await.map_err(|e| match e {
            HostError::Terminal(why) => {
                HostError::Terminal(format!("failed to setup stateroot {stateroot}: {why}"))
            }
            other => other,
        })
    }

    async fn precache(
        &self,
        _seed: &SeedImageRef,
        _registry: &str,
    ) -> Result<PrecacheSummary, HostError> {
        let list = self
            .node
            .runner
            .read(CONTAINERS_LIST)
            .await
            .map_err(terminal)?
            .ok_or_else(|| {
                HostError::Terminal(format!(
                    "{CONTAINERS_LIST} is missing: the stateroot setup did not finish"
                ))
            })?;
        let images: Vec<&str> = list
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let total = images.len() as u32;
        let pulls: Vec<_> = images.iter().map(|i| self.precache_one(i)).collect();
        let done: Vec<bool> = futures::stream::iter(pulls)
            .buffer_unordered(PRECACHE_PARALLEL)
            .collect()
            .await;
        let pulled = done.iter().filter(|ok| **ok).count() as u32;
        let failed = total - pulled;
        if failed > 0 {
            return Err(HostError::Terminal(format!(
                "failed to precache images: total: {total} (pulled: {pulled}, failed: {failed})"
            )));
        }
        Ok(PrecacheSummary {
            total,
            pulled,
            failed,
        })
    }

    async fn backup(&self, _groups: &[Vec<Value>]) -> Result<(), HostError> {
        Ok(())
    }

    fn needs_cluster_config(&self) -> bool {
        true
    }

    async fn cluster_config(&self, _stateroot: &str) -> Result<(), HostError> {
        Err(HostError::Terminal(
            "the seed's post-pivot reconfiguration needs this cluster's configuration from its API: run the agent with --kube".into(),
        ))
    }

    async fn write_cluster_config(
        &self,
        stateroot: &str,
        from_api: ClusterConfig,
    ) -> Result<(), HostError> {
        self.write_reconfiguration(stateroot, from_api)
            .await
            .map_err(|e| {
                HostError::Terminal(format!(
                    "failed to write the cluster configuration into {stateroot}: {e}"
                ))
            })
    }

    async fn set_default(&self, root: &Root) -> Result<(), HostError> {
        let deployments = self.node.deployments().await.map_err(terminal)?;
        let booted = deployments
            .iter()
            .find(|d| d.booted)
            .map(|d| d.osname.clone())
            .unwrap_or_default();
        let target = deployments.iter().find(|d| match root {
            Root::Booted => d.booted,
            Root::Seed(s) => d.osname == *s,
            Root::Previous => d.osname != booted,
        });
        let Some(target) = target else {
            return Err(HostError::Terminal(format!(
                "no deployment to boot for {root:?}"
            )));
        };
        self.node.remount_sysroot_rw().await.map_err(terminal)?;
        if target.index != 0 && !self.node.supports_set_default().await.map_err(terminal)? {
            return Err(HostError::Terminal(
                "default deployment must be manually set for next boot".into(),
            ));
        }
        self.node.set_default(target.index).await.map_err(terminal)
    }

    async fn boot_id(&self) -> Option<String> {
        // The node's (a pod may not see the host's /proc under the root: its own is the
        // same kernel's).
        for path in [self.node.runner.path(BOOT_ID), BOOT_ID.into()] {
            if let Ok(id) = tokio::fs::read_to_string(&path).await {
                return Some(id.trim().to_string());
            }
        }
        None
    }

    async fn reboot(&self, why: RebootFor) -> Result<(), HostError> {
        self.node
            .reboot(why.word())
            .await
            .map_err(|e| HostError::Transient(e.to_string()))?;
        // The node goes down with the agent; still here after this, it did not.
        tokio::time::sleep(self.config.reboot_wait).await;
        Err(HostError::Transient(format!(
            "the node did not reboot within {:?} of being asked to",
            self.config.reboot_wait
        )))
    }

    /// The first step after the reboot: the seed's post-pivot reconfiguration must have
    /// worked (its failure is the upgrade's, an automatic rollback unless disabled).
    async fn check_dpa(&self) -> Result<(), HostError> {
        let failed = self
            .node
            .runner
            .output(&["systemctl", "is-failed", POST_PIVOT_UNIT])
            .await
            .map_err(|e| HostError::Transient(e.to_string()))?;
        if failed.code == 0 {
            return Err(HostError::Terminal(format!(
                "the seed's post-pivot reconfiguration ({POST_PIVOT_UNIT}) failed: see `journalctl -u {POST_PIVOT_UNIT}` on the node"
            )));
        }
        Ok(())
    }

    async fn apply_extra_manifests(&self, _groups: &[Vec<Value>]) -> Result<(), HostError> {
        Ok(())
    }

    async fn restore(&self, _groups: &[Vec<Value>]) -> Result<(), HostError> {
        Ok(())
    }

    async fn deferred_health(&self) -> Result<(), String> {
        self.health().await
    }

    async fn disarm_watchdog(&self) -> Result<(), HostError> {
        self.disable_watchdog()
            .await
            .map_err(|e| HostError::Transient(format!("removing {WATCHDOG_UNIT}: {e}")))
    }

    async fn cleanup(&self, _manual: bool) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        match self.node.booted().await {
            Ok(booted) => {
                let others: BTreeSet<String> = match self.node.deployments().await {
                    Ok(all) => all
                        .into_iter()
                        .filter(|d| d.osname != booted.osname)
                        .map(|d| d.osname)
                        .collect(),
                    Err(e) => {
                        errors.push(e.to_string());
                        BTreeSet::new()
                    }
                };
                for s in &others {
                    if let Err(e) = self.remove_unbooted(s).await {
                        errors.push(format!("failed to remove stateroot {s}: {e}"));
                    }
                }
                if let Err(e) = self.node.rpm_ostree_cleanup().await {
                    errors.push(e.to_string());
                }
                // Directories of stateroots with no deployment (a setup that failed early).
                if let Ok(mut entries) =
                    tokio::fs::read_dir(self.node.runner.path("/ostree/deploy")).await
                {
                    while let Ok(Some(e)) = entries.next_entry().await {
                        let name = e.file_name().to_string_lossy().to_string();
                        if name != booted.osname
                            && let Err(e) = self.node.remove_stateroot(&name).await
                        {
                            errors.push(format!("failed to remove stateroot {name}: {e}"));
                        }
                    }
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
        match tokio::fs::remove_dir_all(self.node.runner.path(WORKSPACE)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                errors.push(format!("{WORKSPACE}: {e}"))
            }
            _ => {}
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The old stateroot's kubelet certificates must still be valid to roll back to it:
    /// the earliest of their expiries, less a margin (as the Lifecycle Agent reckons it).
    async fn rollback_availability_expiration(&self, _now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let deployments = self.node.deployments().await.ok()?;
        let old = deployments.iter().find(|d| !d.booted)?;
        let mut earliest: Option<DateTime<Utc>> = None;
        for name in KUBELET_CERTS {
            let file = format!("{}/var/lib/kubelet/pki/{name}", stateroot_dir(&old.osname));
            match self.node.runner.read(&file).await {
                Ok(Some(pem)) => match certificate_not_after(pem.as_bytes()) {
                    Ok(t) => earliest = Some(earliest.map_or(t, |e| e.min(t))),
                    Err(why) => tracing::warn!(%file, %why, "reading a kubelet certificate"),
                },
                Ok(None) => tracing::warn!(%file, "no kubelet certificate"),
                Err(e) => tracing::warn!(%file, %e, "reading a kubelet certificate"),
            }
        }
        earliest.map(|t| t - ROLLBACK_EXPIRY_MARGIN)
    }

    async fn restores(&self) -> Vec<RestoreInfo> {
        Vec::new()
    }

    async fn configmap_get(&self, r: &ConfigMapRef) -> Option<BTreeMap<String, String>> {
        let text = self
            .node
            .runner
            .read(&configmap_file(r).ok()?)
            .await
            .ok()??;
        serde_json::from_str(&text).ok()
    }

    async fn configmap_put(
        &self,
        r: &ConfigMapRef,
        data: BTreeMap<String, String>,
    ) -> Result<(), HostError> {
        let text = serde_json::to_vec(&data).map_err(|e| HostError::Terminal(e.to_string()))?;
        self.node
            .runner
            .write(&configmap_file(r)?, &text)
            .await
            .map_err(terminal)
    }

    async fn configmap_delete(&self, r: &ConfigMapRef) -> Result<bool, HostError> {
        match tokio::fs::remove_file(self.node.runner.path(&configmap_file(r)?)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(HostError::Terminal(e.to_string())),
        }
    }

    async fn describe(&self) -> String {
        match self.node.runner.run(&["ostree", "admin", "status"]).await {
            Ok(status) => format!("$ ostree admin status\n{status}"),
            Err(e) => e.to_string(),
        }
    }
}

/// What `read` finds in the first certificate of a PEM text (other blocks, such as the key
/// the kubelet keeps with its certificate, are passed over).
pub(crate) fn first_certificate<T>(
    pem: &[u8],
    read: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> Result<T, String>,
) -> Result<T, String> {
    let pem = x509_parser::pem::Pem::iter_from_buffer(pem)
        .map_while(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .ok_or("no CERTIFICATE in the PEM")?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    read(&cert)
}

/// The `notAfter` of the first certificate in a PEM file.
fn certificate_not_after(pem: &[u8]) -> Result<DateTime<Utc>, String> {
    first_certificate(pem, |cert| {
        DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
            .ok_or_else(|| "notAfter out of range".to_string())
    })
}

/// The ConfigMaps the hub hands the agent (without `--kube`) live in the booted `/var`;
/// none whose names Kubernetes would refuse (and which could leave the directory).
fn configmap_file(r: &ConfigMapRef) -> Result<String, HostError> {
    fleet_types::names::dns1123_label(&r.namespace)
        .and_then(|()| fleet_types::names::dns1123_subdomain(&r.name))
        .map_err(|why| {
            HostError::Terminal(format!("ConfigMap {}/{}: {why}", r.namespace, r.name))
        })?;
    Ok(format!(
        "/var/lib/lca/spoke-agent/configmaps/{}/{}.json",
        r.namespace, r.name
    ))
}
