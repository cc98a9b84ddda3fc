//! The IBU engine: a pure state machine over the persisted [`SpokeState`].
//!
//! The runner asks [`next`] what to do, marks the step started with [`begin`], hands the
//! [`Work`] to the host backend, and feeds the outcome to [`complete`]. Requests from the API
//! go through [`request`] (the CEL-equivalent checks) and then [`reconcile`] (the engine's own
//! transition checks). Timers (the init-monitor watchdog, retries) fire in [`tick`]. Nothing
//! here does IO or reads the clock: `now` is always an argument.

pub mod conditions;
mod request;
mod steps;
pub mod validate;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use fleet_types::ibu::{
    ConditionStatus, ImageBasedUpgrade, ImageBasedUpgradeSpec, ImageBasedUpgradeStatus,
    PhaseHistory, SeedImageRef, Stage, StageHistory, condition_type as ct, reason,
};
use fleet_types::labels::{
    AUTO_ROLLBACK_INIT_MONITOR, AUTO_ROLLBACK_POST_REBOOT_CONFIG, AUTO_ROLLBACK_UPGRADE_COMPLETION,
    DISABLED, EXTRA_MANIFEST_WARNING_ANNOTATION, MANUAL_CLEANUP_DONE_ANNOTATION,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use conditions::{completed, failed, idle, in_progress, set, valid_next_stages};
use validate::ClusterFacts;

pub use conditions::valid_next_stages as compute_valid_next_stages;
pub use request::*;
pub use steps::*;

/// Default init-monitor watchdog, as in the Lifecycle Agent.
pub const DEFAULT_INIT_MONITOR_SECONDS: i64 = 1800;
/// Cleanup that failed is retried this often without a person's signal.
pub const CLEANUP_RETRY: Duration = Duration::minutes(5);
/// An unhealthy cluster is checked again this often.
pub const HEALTH_POLL: Duration = Duration::seconds(5);
/// Transient host errors back off up to this.
pub const MAX_BACKOFF: Duration = Duration::seconds(60);

/// What the agent persists, per stateroot: the IBU and where the engine is in it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SpokeState {
    pub ibu: ImageBasedUpgrade,
    #[serde(default)]
    pub run: Run,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    /// The operation under way, if any.
    pub op: Option<Op>,
    /// Index of the next step of `op`.
    pub step: usize,
    /// The step at `step` was handed to the host and has not reported back.
    pub in_flight: bool,
    /// Bumped at every start of an operation; outcomes of older work are dropped.
    pub epoch: u64,
    pub retry_at: Option<DateTime<Utc>>,
    pub attempts: u32,
    /// This IBU lives on the new stateroot, after the upgrade's reboot.
    pub post_reboot: bool,
    pub watchdog_deadline: Option<DateTime<Utc>>,
    /// The next cleanup follows `lca.openshift.io/manual-cleanup-done`.
    pub manual_cleanup: bool,
    /// Prep validation warnings, written to the annotation when Prep completes.
    pub warnings: Vec<String>,
    /// OADP documents and extra manifests validated at Prep, carried into the new stateroot.
    pub backups: Vec<Value>,
    pub restores: Vec<Value>,
    pub extra_manifests: Vec<Value>,
    /// `release_registry` of the seed, for precache.
    pub release_registry: String,
    /// What the seed's cluster info must agree with (proxy, FIPS, container storage).
    pub cluster: Option<validate::SeedCompat>,
    /// On the copy saved on the booted stateroot as the node goes down for a pivot: the boot
    /// it was saved in (hosts that know it). Found again in the same boot, the node never
    /// went down (the agent stopped before or while asking it to): the reboot is asked for
    /// again, and the copy stays what the old stateroot says if the node comes back there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_boot_id: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Prep,
    /// Upgrade, before the reboot into the new stateroot.
    UpgradePre,
    /// Upgrade, after the reboot.
    UpgradePost,
    Rollback,
    /// On the old stateroot after a manual rollback's reboot.
    RollbackPost,
    /// Automatic rollback from the new stateroot, with the reason shown afterwards.
    AutoRollback(String),
    Abort,
    Finalize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Health,
    Validate,
    InspectSeed,
    Stateroot,
    Precache,
    Backup,
    /// What the new stateroot's own reconfiguration needs from this cluster.
    ClusterConfig,
    Pivot,
    Reboot,
    CheckDpa,
    ApplyExtraManifests,
    Restore,
    DeferredHealth,
    DisarmWatchdog,
    Cleanup,
}

impl Op {
    fn steps(&self) -> &'static [Step] {
        use Step::*;
        match self {
            Op::Prep => &[Health, Validate, InspectSeed, Stateroot, Precache],
            Op::UpgradePre => &[Health, Backup, ClusterConfig, Pivot, Reboot],
            Op::UpgradePost => &[
                Health,
                CheckDpa,
                ApplyExtraManifests,
                Restore,
                DeferredHealth,
                DisarmWatchdog,
            ],
            Op::Rollback | Op::AutoRollback(_) => &[Pivot, Reboot],
            Op::RollbackPost => &[],
            Op::Abort => &[Cleanup],
            Op::Finalize => &[Health, Cleanup],
        }
    }
}

/// A stateroot, as the engine names it; the host resolves it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Root {
    /// The booted one.
    Booted,
    /// The stateroot of the seed, `rhcos_<version>`.
    Seed(String),
    /// The one booted before the last pivot.
    Previous,
}

/// Host work, one step at a time.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    Health,
    GatherFacts(ImageBasedUpgradeSpec),
    InspectSeed(SeedImageRef),
    /// With `image_cleanup`, unused images go first while container storage is fuller than
    /// that percentage.
    SetupStateroot {
        stateroot: String,
        seed: SeedImageRef,
        image_cleanup: Option<u8>,
    },
    Precache {
        seed: SeedImageRef,
        release_registry: String,
    },
    /// Velero Backups, in apply-wave groups.
    Backup(Vec<Vec<Value>>),
    /// Hand the seed's stateroot this cluster's configuration for its post-pivot
    /// reconfiguration.
    ClusterConfig {
        stateroot: String,
    },
    /// Save these states into these stateroots, then make `default` the default deployment.
    Pivot {
        saves: Vec<(Root, SpokeState)>,
        default: Root,
    },
    Reboot,
    CheckDpa,
    ApplyExtraManifests(Vec<Vec<Value>>),
    Restore(Vec<Vec<Value>>),
    DeferredHealth,
    /// The upgrade is about to complete: the host's own watchdog (if it has one) goes.
    DisarmWatchdog,
    /// Remove every stateroot not booted, precache leftovers, this cluster's Backups and the
    /// workspace. `manual` after `lca.openshift.io/manual-cleanup-done`.
    Cleanup {
        manual: bool,
    },
}

/// How host work ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done,
    Facts(Box<ClusterFacts>),
    SeedLabels(BTreeMap<String, String>),
    Precached {
        total: u32,
        pulled: u32,
        failed: u32,
    },
    /// The cluster is not healthy yet: wait and check again.
    Waiting(String),
    /// Retry with backoff.
    Transient(String),
    /// The stage fails.
    Failed(String),
    /// Cleanup collected these errors.
    CleanupFailed(Vec<String>),
}

/// What the runner should do now.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    Work(Work),
    WaitUntil(DateTime<Utc>),
    Nothing,
}

/// The IBU a new agent creates: `Idle`, with `validNextStages: [Prep]`.
pub fn initial(now: DateTime<Utc>) -> SpokeState {
    let mut ibu = ImageBasedUpgrade::new(fleet_types::ibu::IBU_NAME, Default::default());
    ibu.metadata.generation = Some(1);
    ibu.metadata.creation_timestamp = Some(k8s_time(now));
    let mut state = SpokeState {
        ibu,
        run: Run::default(),
    };
    back_to_idle(&mut state, now);
    state
}

fn k8s_time(now: DateTime<Utc>) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    serde_json::from_value(Value::String(
        now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    ))
    .expect("an RFC 3339 timestamp is a valid Time")
}

fn generation(s: &SpokeState) -> i64 {
    s.ibu.metadata.generation.unwrap_or(1)
}

fn status(s: &mut SpokeState) -> &mut ImageBasedUpgradeStatus {
    s.ibu.status.get_or_insert_with(Default::default)
}

/// The status to read, the empty one when there is none yet.
fn status_view(s: &SpokeState) -> &ImageBasedUpgradeStatus {
    static NONE: std::sync::LazyLock<ImageBasedUpgradeStatus> =
        std::sync::LazyLock::new(ImageBasedUpgradeStatus::default);
    s.ibu.status.as_ref().unwrap_or(&NONE)
}

fn cond(
    s: &mut SpokeState,
    type_: &str,
    v: ConditionStatus,
    why: &str,
    msg: &str,
    now: DateTime<Utc>,
) {
    let g = generation(s);
    set(status(s), type_, v, why, msg, g, now);
}

/// Recomputes `validNextStages` and `observedGeneration`; called after every change.
fn refresh(s: &mut SpokeState) {
    let g = generation(s);
    let post = s.run.post_reboot;
    let st = status(s);
    st.valid_next_stages = valid_next_stages(st, post);
    st.observed_generation = Some(g);
}

fn annotation<'a>(s: &'a SpokeState, key: &str) -> Option<&'a str> {
    s.ibu
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn set_annotation(s: &mut SpokeState, key: &str, value: Option<String>) {
    let annotations = s
        .ibu
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    match value {
        Some(v) => {
            annotations.insert(key.to_string(), v);
        }
        None => {
            annotations.remove(key);
        }
    }
    if annotations.is_empty() {
        s.ibu.metadata.annotations = None;
    }
}

/// The container storage usage above which Prep removes unused images, unless turned off
/// by the annotations (a threshold that is not a percentage turns it off, as in the
/// Lifecycle Agent).
pub fn image_cleanup_threshold(s: &SpokeState) -> Option<u8> {
    use fleet_types::labels::{
        IMAGE_CLEANUP_ON_PREP, IMAGE_CLEANUP_THRESHOLD, IMAGE_CLEANUP_THRESHOLD_DEFAULT,
    };
    if disabled(s, IMAGE_CLEANUP_ON_PREP) {
        return None;
    }
    match annotation(s, IMAGE_CLEANUP_THRESHOLD) {
        None => Some(IMAGE_CLEANUP_THRESHOLD_DEFAULT),
        Some(v) => v.trim().parse::<u8>().ok().filter(|p| *p <= 100),
    }
}

fn disabled(s: &SpokeState, key: &str) -> bool {
    annotation(s, key) == Some(DISABLED)
}

/// The stateroot of a seed version: `rhcos_<version with - replaced by _>`.
pub fn stateroot_name(version: &str) -> String {
    format!("rhcos_{}", version.replace('-', "_"))
}

/// Go's `time.Duration` formatting, which the Lifecycle Agent's messages use (`30m0s`).
pub fn go_duration(seconds: i64) -> String {
    let (h, m, s) = (seconds / 3600, (seconds % 3600) / 60, seconds % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}
