//! The simulated host: a node with stateroots, OADP and ConfigMaps, held in memory and saved
//! to one JSON file, with configurable step durations and fault points (`contract.md`).
//!
//! [`SimCluster`] is the node itself, synchronous and without IO, so engine tests drive it
//! directly; [`SimHost`] adds durations and persistence and implements [`Host`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleet_types::ibu::{ConfigMapRef, ImageBasedUpgradeSpec, SeedImageRef};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use spoke_core::engine::validate::{
    ClusterFacts, SEED_CLUSTER_INFO_LABEL, SEED_FORMAT_LABEL, SEED_FORMAT_VERSION,
};
use spoke_core::engine::{Root, SpokeState};
use spoke_core::host::{Host, HostError, PrecacheSummary, RebootFor, RestoreInfo};

/// The fault points of the contract.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    Prep,
    Precache,
    Backup,
    PostReboot,
    InitMonitor,
    Restore,
    Rollback,
    Cleanup,
    Unreachable,
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "prep" => Fault::Prep,
            "precache" => Fault::Precache,
            "backup" => Fault::Backup,
            "post-reboot" => Fault::PostReboot,
            "init-monitor" => Fault::InitMonitor,
            "restore" => Fault::Restore,
            "rollback" => Fault::Rollback,
            "cleanup" => Fault::Cleanup,
            "unreachable" => Fault::Unreachable,
            other => {
                return Err(format!(
                    "unknown fault point {other:?}; known: prep, precache, backup, post-reboot, \
                     init-monitor, restore, rollback, cleanup, unreachable"
                ));
            }
        })
    }
}

/// What the simulated cluster is and how it misbehaves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimConfig {
    pub current_version: String,
    pub step: Duration,
    pub reboot: Duration,
    pub faults: BTreeSet<Fault>,
    pub namespaces: Vec<String>,
    pub crds: Vec<String>,
    pub lvms: bool,
    /// Keep the node in memory only (benchmarks of the hub, where the simulator's disk is not
    /// the subject).
    pub in_memory: bool,
    /// Seed images the registry does not have (a mistyped tag, say): inspecting one fails
    /// as `skopeo inspect` does, on every cluster that tries.
    pub missing_images: BTreeSet<String>,
}

const BUILTIN_NAMESPACES: &[&str] = &[
    "default",
    "kube-system",
    "openshift-adp",
    "openshift-config",
    "openshift-lifecycle-agent",
];

/// Built-in API group versions of a Kubernetes/OpenShift cluster, plus OADP's.
const BUILTIN_API_VERSIONS: &[&str] = &[
    "v1",
    "apps/v1",
    "batch/v1",
    "autoscaling/v2",
    "policy/v1",
    "networking.k8s.io/v1",
    "rbac.authorization.k8s.io/v1",
    "storage.k8s.io/v1",
    "apiextensions.k8s.io/v1",
    "admissionregistration.k8s.io/v1",
    "scheduling.k8s.io/v1",
    "coordination.k8s.io/v1",
    "discovery.k8s.io/v1",
    "config.openshift.io/v1",
    "operator.openshift.io/v1",
    "machineconfiguration.openshift.io/v1",
    "operators.coreos.com/v1",
    "operators.coreos.com/v1alpha1",
    "route.openshift.io/v1",
    "security.openshift.io/v1",
    "image.openshift.io/v1",
    "apps.openshift.io/v1",
    "monitoring.coreos.com/v1",
    "velero.io/v1",
    "oadp.openshift.io/v1alpha1",
];

/// Seconds of a simulated old stateroot's certificate lifetime left after the pivot.
const ROLLBACK_WINDOW_DAYS: i64 = 30;
const PRECACHE_IMAGES: u32 = 120;

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SimRoot {
    pub version: String,
    pub deployed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Arc<SpokeState>>,
}

/// The simulated node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SimCluster {
    pub booted: String,
    pub default: String,
    pub previous: Option<String>,
    pub stateroots: BTreeMap<String, SimRoot>,
    pub configmaps: BTreeMap<String, BTreeMap<String, String>>,
    pub backups: BTreeMap<String, String>,
    pub restores: Vec<RestoreInfo>,
    pub precached: bool,
    /// How many times each host step ran, to show that none runs twice.
    pub runs: BTreeMap<String, u32>,
    #[serde(skip)]
    pub config: SimConfig,
}

fn cm_key(r: &ConfigMapRef) -> String {
    format!("{}/{}", r.namespace, r.name)
}

fn names(groups: &[Vec<Value>]) -> Vec<String> {
    groups
        .iter()
        .flatten()
        .filter_map(|d| d.pointer("/metadata/name").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

impl SimCluster {
    pub fn new(config: SimConfig) -> Self {
        let root = "rhcos".to_string();
        let mut stateroots = BTreeMap::new();
        stateroots.insert(
            root.clone(),
            SimRoot {
                version: config.current_version.clone(),
                deployed: true,
                state: None,
            },
        );
        SimCluster {
            booted: root.clone(),
            default: root,
            stateroots,
            config,
            ..Default::default()
        }
    }

    fn count(&mut self, step: &str) {
        *self.runs.entry(step.to_string()).or_default() += 1;
    }

    fn fault(&self, f: Fault) -> bool {
        self.config.faults.contains(&f)
    }

    pub fn resolve(&self, root: &Root) -> Option<String> {
        match root {
            Root::Booted => Some(self.booted.clone()),
            Root::Seed(name) => Some(name.clone()),
            Root::Previous => self
                .previous
                .clone()
                .or_else(|| self.stateroots.keys().find(|k| **k != self.booted).cloned()),
        }
    }

    pub fn load_state(&self) -> Option<SpokeState> {
        self.stateroots
            .get(&self.booted)
            .and_then(|r| r.state.as_deref().cloned())
    }

    pub fn save_state(&mut self, root: &Root, state: Arc<SpokeState>) -> Result<(), HostError> {
        let name = self
            .resolve(root)
            .ok_or_else(|| HostError::Terminal("no previous stateroot to save into".into()))?;
        let r = self
            .stateroots
            .get_mut(&name)
            .ok_or_else(|| HostError::Terminal(format!("stateroot {name} does not exist")))?;
        r.state = Some(state);
        Ok(())
    }

    pub fn cluster_facts(&mut self, spec: &ImageBasedUpgradeSpec) -> ClusterFacts {
        self.count("validate");
        let mut namespaces: BTreeSet<String> =
            BUILTIN_NAMESPACES.iter().map(|s| s.to_string()).collect();
        namespaces.extend(self.config.namespaces.iter().cloned());
        let configmaps = spec
            .oadp_content
            .iter()
            .chain(&spec.extra_manifests)
            .filter_map(|r| {
                self.configmaps
                    .get(&cm_key(r))
                    .map(|d| (r.clone(), d.clone()))
            })
            .collect();
        ClusterFacts {
            version: self
                .stateroots
                .get(&self.booted)
                .map(|r| r.version.clone())
                .unwrap_or_default(),
            namespaces,
            api_versions: BUILTIN_API_VERSIONS.iter().map(|s| s.to_string()).collect(),
            crds: self.config.crds.iter().cloned().collect(),
            oadp_installed: true,
            data_protection_applications: 1,
            lvms_volumes: self.config.lvms,
            configmaps,
            dry_run_errors: BTreeMap::new(),
            has_proxy: false,
            fips: false,
            container_storage_mount: "/var/lib/containers".into(),
        }
    }

    /// A seed built for the requested version, format 4, from a cluster like this one;
    /// the registry's answer for a missing image.
    pub fn inspect_seed(
        &mut self,
        seed: &SeedImageRef,
    ) -> Result<BTreeMap<String, String>, HostError> {
        self.count("inspect-seed");
        if self.config.missing_images.contains(&seed.image) {
            return Err(HostError::Terminal(format!(
                "failed to inspect the seed image {}: reading manifest {}: manifest unknown",
                seed.image,
                seed.image.rsplit_once(':').map_or("latest", |(_, tag)| tag)
            )));
        }
        let info = serde_json::json!({
            "seed_cluster_ocp_version": seed.version,
            "release_registry": "quay.io",
            "has_proxy": false,
            "has_fips": false,
            "container_storage_mountpoint_target": "/var/lib/containers",
        });
        Ok(BTreeMap::from([
            (
                SEED_FORMAT_LABEL.to_string(),
                SEED_FORMAT_VERSION.to_string(),
            ),
            (SEED_CLUSTER_INFO_LABEL.to_string(), info.to_string()),
        ]))
    }

    pub fn setup_stateroot(
        &mut self,
        stateroot: &str,
        seed: &SeedImageRef,
    ) -> Result<(), HostError> {
        self.count("stateroot");
        if self.fault(Fault::Prep) {
            return Err(HostError::Terminal(format!(
                "failed to setup stateroot {stateroot}: ostree admin deploy failed (simulated fault)"
            )));
        }
        self.stateroots.insert(
            stateroot.to_string(),
            SimRoot {
                version: seed.version.clone(),
                deployed: true,
                state: None,
            },
        );
        Ok(())
    }

    pub fn precache(&mut self) -> Result<PrecacheSummary, HostError> {
        self.count("precache");
        if self.fault(Fault::Precache) {
            return Err(HostError::Terminal(format!(
                "failed to precache images: total: {PRECACHE_IMAGES} (pulled: {}, failed: 3) (simulated fault)",
                PRECACHE_IMAGES - 3
            )));
        }
        self.precached = true;
        Ok(PrecacheSummary {
            total: PRECACHE_IMAGES,
            pulled: PRECACHE_IMAGES,
            failed: 0,
        })
    }

    pub fn backup(&mut self, groups: &[Vec<Value>]) -> Result<(), HostError> {
        self.count("backup");
        let all = names(groups);
        if self.fault(Fault::Backup) {
            let failed = if all.is_empty() {
                vec!["sim-backup".to_string()]
            } else {
                all
            };
            for n in &failed {
                self.backups.insert(n.clone(), "Failed".into());
            }
            return Err(HostError::Terminal(format!(
                "Failed backup CRs: {}",
                failed.join(", ")
            )));
        }
        for n in all {
            self.backups.insert(n, "Completed".into());
        }
        Ok(())
    }

    pub fn set_default(&mut self, root: &Root) -> Result<(), HostError> {
        self.count("set-default");
        let name = self
            .resolve(root)
            .ok_or_else(|| HostError::Terminal("no previous stateroot to roll back to".into()))?;
        if *root == Root::Previous && self.fault(Fault::Rollback) {
            return Err(HostError::Terminal(format!(
                "failed to set stateroot {name} as default deployment (simulated fault)"
            )));
        }
        if !self.stateroots.contains_key(&name) {
            return Err(HostError::Terminal(format!(
                "stateroot {name} does not exist"
            )));
        }
        if name != self.default {
            self.previous = Some(self.booted.clone());
        }
        self.default = name;
        Ok(())
    }

    pub fn reboot(&mut self) {
        self.count("reboot");
        if self.default != self.booted {
            self.previous = Some(self.booted.clone());
        }
        self.booted = self.default.clone();
    }

    pub fn apply_extra_manifests(&mut self) -> Result<(), HostError> {
        self.count("extra-manifests");
        if self.fault(Fault::PostReboot) {
            return Err(HostError::Terminal(
                "failed to apply extra manifests: admission webhook denied the request (simulated fault)".into(),
            ));
        }
        Ok(())
    }

    pub fn restore(&mut self, groups: &[Vec<Value>]) -> Result<(), HostError> {
        self.count("restore");
        let all = names(groups);
        let failing = self.fault(Fault::Restore);
        let all = if all.is_empty() && failing {
            vec!["sim-restore".to_string()]
        } else {
            all
        };
        for n in &all {
            self.restores.retain(|r| r.name != *n);
            self.restores.push(RestoreInfo {
                name: n.clone(),
                phase: if failing { "Failed" } else { "Completed" }.into(),
                failure_reason: if failing {
                    "simulated fault".into()
                } else {
                    String::new()
                },
            });
        }
        if failing {
            return Err(HostError::Terminal(format!(
                "Failed restore CRs: {}",
                all.join(", ")
            )));
        }
        Ok(())
    }

    pub fn deferred_health(&mut self) -> Result<(), String> {
        self.count("deferred-health");
        if self.fault(Fault::InitMonitor) {
            return Err("cluster operators are not available yet (simulated fault)".into());
        }
        Ok(())
    }

    pub fn cleanup(&mut self, manual: bool) -> Result<(), Vec<String>> {
        self.count("cleanup");
        if self.fault(Fault::Cleanup) && !manual {
            let others: Vec<String> = self
                .stateroots
                .keys()
                .filter(|k| **k != self.booted)
                .cloned()
                .collect();
            let what = others.first().cloned().unwrap_or_else(|| "precache".into());
            return Err(vec![format!(
                "failed to remove {what}: device or resource busy (simulated fault)"
            )]);
        }
        let booted = self.booted.clone();
        self.stateroots.retain(|k, _| *k == booted);
        self.default = booted;
        self.previous = None;
        self.precached = false;
        self.backups.clear();
        Ok(())
    }

    /// `ostree admin status`, as the simulated node would print it.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, (name, r)) in self.stateroots.iter().enumerate() {
            let mark = if *name == self.booted { "*" } else { " " };
            let default = if *name == self.default {
                " (default)"
            } else {
                ""
            };
            out.push_str(&format!(
                "{mark} {name} {i} version {}{default}\n",
                r.version
            ));
        }
        out
    }
}

/// [`SimCluster`] with durations, persisted to `<state-dir>/host.json` after every change.
pub struct SimHost {
    cluster: Mutex<SimCluster>,
    path: PathBuf,
    step: Duration,
    reboot: Duration,
    in_memory: bool,
}

impl SimHost {
    /// Opens the simulated node saved in `state_dir`, or a new one.
    pub fn open(state_dir: &Path, config: SimConfig) -> Result<Self, HostError> {
        let path = state_dir.join("host.json");
        let cluster = match std::fs::read(&path) {
            Ok(bytes) => {
                let mut c: SimCluster = serde_json::from_slice(&bytes).map_err(|e| {
                    HostError::Terminal(format!("{} is corrupt: {e}", path.display()))
                })?;
                c.config = config.clone();
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SimCluster::new(config.clone()),
            Err(e) => return Err(HostError::Terminal(format!("{}: {e}", path.display()))),
        };
        Ok(SimHost {
            cluster: Mutex::new(cluster),
            path,
            step: config.step,
            reboot: config.reboot,
            in_memory: config.in_memory,
        })
    }

    /// A copy of the node, for tests and must-gather.
    pub fn snapshot(&self) -> SimCluster {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimCluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the node and saves it.
    fn with<T>(&self, f: impl FnOnce(&mut SimCluster) -> T) -> Result<T, HostError> {
        let mut c = self.lock();
        let out = f(&mut c);
        if !self.in_memory {
            spoke_core::store::write_atomic(&self.path, &*c)
                .map_err(|e| HostError::Transient(e.to_string()))?;
        }
        Ok(out)
    }

    async fn step(&self) {
        if !self.step.is_zero() {
            tokio::time::sleep(self.step).await;
        }
    }
}

impl Host for SimHost {
    async fn load_state(&self) -> Result<Option<SpokeState>, HostError> {
        Ok(self.lock().load_state())
    }

    async fn save_state(&self, root: &Root, state: &Arc<SpokeState>) -> Result<(), HostError> {
        self.with(|c| c.save_state(root, state.clone()))?
    }

    async fn health(&self) -> Result<(), String> {
        Ok(())
    }

    async fn cluster_facts(&self, spec: &ImageBasedUpgradeSpec) -> Result<ClusterFacts, HostError> {
        self.with(|c| c.cluster_facts(spec))
    }

    async fn inspect_seed(
        &self,
        seed: &SeedImageRef,
    ) -> Result<BTreeMap<String, String>, HostError> {
        self.with(|c| c.inspect_seed(seed))?
    }

    async fn setup_stateroot(&self, stateroot: &str, seed: &SeedImageRef) -> Result<(), HostError> {
        self.step().await;
        self.with(|c| c.setup_stateroot(stateroot, seed))?
    }

    async fn precache(
        &self,
        _seed: &SeedImageRef,
        _registry: &str,
    ) -> Result<PrecacheSummary, HostError> {
        self.step().await;
        self.with(|c| c.precache())?
    }

    async fn backup(&self, groups: &[Vec<Value>]) -> Result<(), HostError> {
        self.step().await;
        self.with(|c| c.backup(groups))?
    }

    async fn set_default(&self, root: &Root) -> Result<(), HostError> {
        self.with(|c| c.set_default(root))?
    }

    async fn reboot(&self, _why: RebootFor) -> Result<(), HostError> {
        self.with(|c| c.reboot())?;
        if !self.reboot.is_zero() {
            tokio::time::sleep(self.reboot).await;
        }
        Ok(())
    }

    async fn check_dpa(&self) -> Result<(), HostError> {
        Ok(())
    }

    async fn apply_extra_manifests(&self, _groups: &[Vec<Value>]) -> Result<(), HostError> {
        self.step().await;
        self.with(|c| c.apply_extra_manifests())?
    }

    async fn restore(&self, groups: &[Vec<Value>]) -> Result<(), HostError> {
        self.step().await;
        self.with(|c| c.restore(groups))?
    }

    async fn deferred_health(&self) -> Result<(), String> {
        self.with(|c| c.deferred_health())
            .map_err(|e| e.to_string())?
    }

    async fn cleanup(&self, manual: bool) -> Result<(), Vec<String>> {
        self.step().await;
        self.with(|c| c.cleanup(manual))
            .map_err(|e| vec![e.to_string()])?
    }

    async fn rollback_availability_expiration(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        Some(now + chrono::Duration::days(ROLLBACK_WINDOW_DAYS))
    }

    async fn restores(&self) -> Vec<RestoreInfo> {
        self.lock().restores.clone()
    }

    async fn configmap_get(&self, r: &ConfigMapRef) -> Option<BTreeMap<String, String>> {
        self.lock().configmaps.get(&cm_key(r)).cloned()
    }

    async fn configmap_put(
        &self,
        r: &ConfigMapRef,
        data: BTreeMap<String, String>,
    ) -> Result<(), HostError> {
        self.with(|c| {
            c.configmaps.insert(cm_key(r), data);
        })
    }

    async fn configmap_delete(&self, r: &ConfigMapRef) -> Result<bool, HostError> {
        self.with(|c| c.configmaps.remove(&cm_key(r)).is_some())
    }

    async fn describe(&self) -> String {
        self.lock().describe()
    }
}
