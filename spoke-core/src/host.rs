//! The host backend: everything the agent does to the node, behind one trait, so the engine
//! and the runner are the same for the real node and the simulated one.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use fleet_types::ibu::{ConfigMapRef, ImageBasedUpgradeSpec, SeedImageRef};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::validate::ClusterFacts;
use crate::engine::{Root, SpokeState};

/// A host operation that did not succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HostError {
    /// The stage fails.
    #[error("{0}")]
    Terminal(String),
    /// Worth retrying with backoff (a registry or API hiccup).
    #[error("{0}")]
    Transient(String),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PrecacheSummary {
    pub total: u32,
    pub pulled: u32,
    pub failed: u32,
}

/// One OADP Restore as `oc get restores -n openshift-adp` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreInfo {
    pub name: String,
    pub phase: String,
    #[serde(default)]
    pub failure_reason: String,
}

/// A cluster's configuration as its API tells it, for the seed's post-pivot
/// reconfiguration: the fields of the Lifecycle Agent's `SeedReconfiguration`
/// (`cluster-configuration/manifest.json`) and the manifests it applies
/// (`cluster-configuration/manifests/<file>`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterConfig {
    pub reconfiguration: serde_json::Map<String, Value>,
    pub manifests: Vec<(String, Value)>,
}

/// What a reboot is for, said in its description (`lifecycle-agent: upgrade`) as the
/// Lifecycle Agent says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebootFor {
    /// Into the new stateroot.
    Upgrade,
    /// Back to the old stateroot, asked for or automatic.
    Rollback,
}

impl RebootFor {
    pub fn word(self) -> &'static str {
        match self {
            RebootFor::Upgrade => "upgrade",
            RebootFor::Rollback => "rollback",
        }
    }
}

/// The node's side of an image-based upgrade. Methods are the steps of `ibu-spoke.md`
/// section 4; each is idempotent, because a restarted agent runs an interrupted step again.
pub trait Host: Send + Sync + 'static {
    /// The IBU state saved on the booted stateroot, if any.
    fn load_state(&self) -> impl Future<Output = Result<Option<SpokeState>, HostError>> + Send;
    /// Saves the state on a stateroot, atomically. Shared: a host that keeps it in memory
    /// holds it without copying.
    fn save_state(
        &self,
        root: &Root,
        state: &Arc<SpokeState>,
    ) -> impl Future<Output = Result<(), HostError>> + Send;

    /// `Err(why)` while the cluster is not healthy: the stage waits.
    fn health(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// What Prep validation needs to know about the cluster and the referenced ConfigMaps.
    fn cluster_facts(
        &self,
        spec: &ImageBasedUpgradeSpec,
    ) -> impl Future<Output = Result<ClusterFacts, HostError>> + Send;
    /// The seed image's labels, read without pulling it (`skopeo inspect`).
    fn inspect_seed(
        &self,
        seed: &SeedImageRef,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, HostError>> + Send;
    /// Registry credentials for the seed image (the `.dockerconfigjson` of the Secret
    /// `seedImageRef.pullSecretRef` names) that the seed's inspect and pull use instead of
    /// the cluster's pull secret, until called again with `None`. A host that does not read
    /// the cluster's API gets them from one that does (`--kube`).
    fn seed_pull_secret(
        &self,
        _auth: Option<&[u8]>,
    ) -> impl Future<Output = Result<(), HostError>> + Send {
        std::future::ready(Ok(()))
    }
    /// Removes unused images while container storage is fuller than `threshold_percent`
    /// (before the seed's pull). Errors are reported, never the stage's failure.
    fn free_container_storage(
        &self,
        _threshold_percent: u8,
    ) -> impl Future<Output = Result<(), HostError>> + Send {
        std::future::ready(Ok(()))
    }
    /// Pulls the seed, creates and deploys the stateroot (not as default), writes the
    /// auto-rollback configuration into it.
    fn setup_stateroot(
        &self,
        stateroot: &str,
        seed: &SeedImageRef,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Pulls every image the target release needs.
    fn precache(
        &self,
        seed: &SeedImageRef,
        release_registry: &str,
    ) -> impl Future<Output = Result<PrecacheSummary, HostError>> + Send;
    /// Runs Velero Backups group by group; a failed group is terminal (`Failed backup CRs: ...`).
    fn backup(&self, groups: &[Vec<Value>]) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Gives the seed's stateroot what its post-pivot reconfiguration needs from this
    /// cluster (the Lifecycle Agent's `cluster-configuration`), before the pivot.
    fn cluster_config(
        &self,
        _stateroot: &str,
    ) -> impl Future<Output = Result<(), HostError>> + Send {
        std::future::ready(Ok(()))
    }
    /// Whether the host's new stateroot needs the cluster configuration from the cluster's
    /// API (the real node does; a simulated one does not).
    fn needs_cluster_config(&self) -> bool {
        false
    }
    /// Writes into the seed's stateroot the cluster configuration gathered from the
    /// cluster's API (by `--kube`), completed with what the node itself holds.
    fn write_cluster_config(
        &self,
        _stateroot: &str,
        _from_api: ClusterConfig,
    ) -> impl Future<Output = Result<(), HostError>> + Send {
        std::future::ready(Ok(()))
    }
    /// Makes the stateroot's deployment the default one for the next boot.
    fn set_default(&self, root: &Root) -> impl Future<Output = Result<(), HostError>> + Send;
    /// This boot's identity (`/proc/sys/kernel/random/boot_id`), for hosts that reboot for
    /// real: it tells the agent whether the node went down since it last saved.
    fn boot_id(&self) -> impl Future<Output = Option<String>> + Send {
        std::future::ready(None)
    }
    /// Reboots into the default deployment. The simulated host returns when the node is
    /// back; the real one never returns.
    fn reboot(&self, why: RebootFor) -> impl Future<Output = Result<(), HostError>> + Send;
    /// The DataProtectionApplication saved before the reboot exists again.
    fn check_dpa(&self) -> impl Future<Output = Result<(), HostError>> + Send;
    fn apply_extra_manifests(
        &self,
        groups: &[Vec<Value>],
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Runs Velero Restores group by group (`Failed restore CRs: ...`).
    fn restore(&self, groups: &[Vec<Value>]) -> impl Future<Output = Result<(), HostError>> + Send;
    /// The deferred health checks that end an upgrade; `Err(why)` waits.
    fn deferred_health(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// The upgrade has passed its deferred health checks: a host that watches it from
    /// outside the agent (the real node's init-monitor unit) stops and removes that watch.
    /// Errors are worth retrying: a completed upgrade is not rolled back for them.
    fn disarm_watchdog(&self) -> impl Future<Output = Result<(), HostError>> + Send {
        std::future::ready(Ok(()))
    }
    /// Every cleanup step of abort and finalize, collecting errors.
    fn cleanup(&self, manual: bool) -> impl Future<Output = Result<(), Vec<String>>> + Send;

    /// When rollback to the old stateroot stops being possible.
    fn rollback_availability_expiration(
        &self,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Option<DateTime<Utc>>> + Send;
    fn restores(&self) -> impl Future<Output = Vec<RestoreInfo>> + Send;
    fn configmap_get(
        &self,
        r: &ConfigMapRef,
    ) -> impl Future<Output = Option<BTreeMap<String, String>>> + Send;
    fn configmap_put(
        &self,
        r: &ConfigMapRef,
        data: BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn configmap_delete(
        &self,
        r: &ConfigMapRef,
    ) -> impl Future<Output = Result<bool, HostError>> + Send;
    /// The host's view for must-gather (`ostree admin status`, OADP objects).
    fn describe(&self) -> impl Future<Output = String> + Send;
}
