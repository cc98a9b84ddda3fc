//! The IBU engine: a pure state machine over the persisted [`SpokeState`].
//!
//! The runner asks [`next`] what to do, marks the step started with [`begin`], hands the
//! [`Work`] to the host backend, and feeds the outcome to [`complete`]. Requests from the API
//! go through [`request`] (the CEL-equivalent checks) and then [`reconcile`] (the engine's own
//! transition checks). Timers (the init-monitor watchdog, retries) fire in [`tick`]. Nothing
//! here does IO or reads the clock: `now` is always an argument.

pub mod conditions;
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
    Pivot,
    Reboot,
    CheckDpa,
    ApplyExtraManifests,
    Restore,
    DeferredHealth,
    Cleanup,
}

impl Op {
    fn steps(&self) -> &'static [Step] {
        use Step::*;
        match self {
            Op::Prep => &[Health, Validate, InspectSeed, Stateroot, Precache],
            Op::UpgradePre => &[Health, Backup, Pivot, Reboot],
            Op::UpgradePost => &[
                Health,
                CheckDpa,
                ApplyExtraManifests,
                Restore,
                DeferredHealth,
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
    SetupStateroot {
        stateroot: String,
        seed: SeedImageRef,
    },
    Precache {
        seed: SeedImageRef,
        release_registry: String,
    },
    /// Velero Backups, in apply-wave groups.
    Backup(Vec<Vec<Value>>),
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

// ---------------------------------------------------------------------------------------
// Requests

/// A refused request: the CEL-equivalent message; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

pub const TRANSITION_NOT_PERMITTED: &str = "the stage transition is not permitted. Please refer to status.validNextStages for valid transitions. If status.validNextStages is not present, it indicates that no transitions are currently allowed";

/// Applies a JSON merge patch of `metadata.annotations` and `spec` with the checks the
/// Kubernetes CEL rules make, then lets the engine react. Answers the new state, or the
/// refusal with nothing changed.
pub fn request(
    current: &SpokeState,
    patch: &Value,
    now: DateTime<Utc>,
) -> Result<SpokeState, Refusal> {
    let Value::Object(top) = patch else {
        return Err(Refusal("the patch must be a JSON object".into()));
    };
    for key in top.keys() {
        if key != "metadata" && key != "spec" && key != "apiVersion" && key != "kind" {
            return Err(Refusal(format!(
                "only metadata.annotations and spec can be changed, not {key}"
            )));
        }
    }
    if let Some(meta) = top.get("metadata") {
        let Value::Object(meta) = meta else {
            return Err(Refusal("metadata must be an object".into()));
        };
        if let Some(k) = meta.keys().find(|k| *k != "annotations") {
            return Err(Refusal(format!(
                "only metadata.annotations and spec can be changed, not metadata.{k}"
            )));
        }
    }
    let mut doc = serde_json::json!({
        "metadata": {"annotations": current.ibu.metadata.annotations.clone().unwrap_or_default()},
        "spec": serde_json::to_value(&current.ibu.spec).map_err(|e| Refusal(e.to_string()))?,
    });
    json_patch::merge(&mut doc, patch);
    let annotations: BTreeMap<String, String> =
        serde_json::from_value(doc["metadata"]["annotations"].take())
            .map_err(|e| Refusal(format!("metadata.annotations: {e}")))?;
    let spec: ImageBasedUpgradeSpec =
        serde_json::from_value(doc["spec"].take()).map_err(|e| Refusal(format!("spec: {e}")))?;

    let st = status_view(current);
    let old = &current.ibu.spec;
    if spec.stage != old.stage && !st.valid_next_stages.contains(&spec.stage) {
        return Err(Refusal(TRANSITION_NOT_PERMITTED.into()));
    }
    if !idle(st) && spec.stage != Stage::Idle {
        let changed = [
            ("seedImageRef", spec.seed_image_ref != old.seed_image_ref),
            ("oadpContent", spec.oadp_content != old.oadp_content),
            (
                "extraManifests",
                spec.extra_manifests != old.extra_manifests,
            ),
            (
                "autoRollbackOnFailure",
                spec.auto_rollback_on_failure != old.auto_rollback_on_failure,
            ),
        ];
        if let Some((field, _)) = changed.iter().find(|(_, c)| *c) {
            return Err(Refusal(format!(
                "can not change spec.{field} while ibu is in progress"
            )));
        }
    }

    let mut next = current.clone();
    if spec != next.ibu.spec {
        next.ibu.spec = spec;
        next.ibu.metadata.generation = Some(generation(current) + 1);
    }
    next.ibu.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    reconcile(&mut next, now);
    Ok(next)
}

/// The engine's own transition checks: start what `spec.stage` asks when it is allowed, mark
/// `InvalidTransition` when it is not, and pick up `manual-cleanup-done`.
pub fn reconcile(s: &mut SpokeState, now: DateTime<Utc>) {
    if annotation(s, MANUAL_CLEANUP_DONE_ANNOTATION).is_some() {
        set_annotation(s, MANUAL_CLEANUP_DONE_ANNOTATION, None);
        if failed(status_view(s), Stage::Idle) {
            s.run.manual_cleanup = true;
            s.run.retry_at = None;
            s.run.attempts = 0;
        }
    }
    match transition(status_view(s), s.ibu.spec.stage, s.run.post_reboot) {
        Act::Keep => {}
        Act::Start(op) => start(s, op, now),
        Act::Invalid(stage, message) => invalid(s, stage, message, now),
    }
    refresh(s);
}

/// What a requested stage does, given the status: nothing, start an operation, or refuse.
enum Act {
    Keep,
    Start(Op),
    Invalid(Stage, &'static str),
}

fn transition(st: &ImageBasedUpgradeStatus, stage: Stage, post: bool) -> Act {
    use Stage::*;
    match stage {
        Idle => {
            if idle(st) || in_progress(st, Idle) {
                Act::Keep
            } else if in_progress(st, Rollback) {
                Act::Invalid(
                    Idle,
                    "Transition to Idle not allowed - Rollback is in progress",
                )
            } else if failed(st, Rollback) {
                Act::Invalid(Idle, "Transition to Idle not allowed - Rollback failed")
            } else if completed(st, Rollback) || completed(st, Upgrade) {
                Act::Start(Op::Finalize)
            } else if (in_progress(st, Upgrade) || failed(st, Upgrade)) && post {
                Act::Invalid(Idle, "Transition to Idle not allowed - Rollback first")
            } else if in_progress(st, Prep)
                || completed(st, Prep)
                || failed(st, Prep)
                || in_progress(st, Upgrade)
                || failed(st, Upgrade)
            {
                Act::Start(Op::Abort)
            } else {
                Act::Invalid(Idle, "Abort or finalize not allowed")
            }
        }
        Prep => {
            if in_progress(st, Prep) || completed(st, Prep) || failed(st, Prep) {
                Act::Keep
            } else if idle(st) {
                Act::Start(Op::Prep)
            } else {
                Act::Invalid(Prep, "Previous stage not succeeded")
            }
        }
        Upgrade => {
            if in_progress(st, Upgrade) || completed(st, Upgrade) || failed(st, Upgrade) {
                Act::Keep
            } else if completed(st, Prep) {
                Act::Start(Op::UpgradePre)
            } else {
                Act::Invalid(Upgrade, "Previous stage not succeeded")
            }
        }
        Rollback => {
            if in_progress(st, Rollback) || completed(st, Rollback) || failed(st, Rollback) {
                Act::Keep
            } else if post
                && (in_progress(st, Upgrade) || failed(st, Upgrade) || completed(st, Upgrade))
            {
                Act::Start(Op::Rollback)
            } else {
                Act::Invalid(Rollback, "Upgrade not started or already finalized")
            }
        }
    }
}

fn invalid(s: &mut SpokeState, stage: Stage, message: &str, now: DateTime<Utc>) {
    let (type_, _) = conditions::types_of(stage);
    cond(
        s,
        type_,
        ConditionStatus::False,
        reason::INVALID_TRANSITION,
        message,
        now,
    );
}

/// Starts an operation after a valid request.
fn start(s: &mut SpokeState, op: Op, now: DateTime<Utc>) {
    use ConditionStatus::{False, True};
    // A valid request clears stale InvalidTransition conditions.
    let idle_was_invalid = status_view(s)
        .condition(ct::IDLE)
        .is_some_and(|c| c.reason == reason::INVALID_TRANSITION);
    status(s)
        .conditions
        .retain(|c| c.type_ == ct::IDLE || c.reason != reason::INVALID_TRANSITION);
    if idle_was_invalid && matches!(op, Op::UpgradePre | Op::Rollback) {
        cond(s, ct::IDLE, False, reason::IN_PROGRESS, "In progress", now);
    }
    let keep = Run {
        post_reboot: s.run.post_reboot,
        watchdog_deadline: s.run.watchdog_deadline,
        backups: std::mem::take(&mut s.run.backups),
        restores: std::mem::take(&mut s.run.restores),
        extra_manifests: std::mem::take(&mut s.run.extra_manifests),
        release_registry: std::mem::take(&mut s.run.release_registry),
        warnings: std::mem::take(&mut s.run.warnings),
        epoch: s.run.epoch + 1,
        ..Run::default()
    };
    s.run = keep;
    let history_stage = match op {
        Op::Prep => {
            cond(s, ct::IDLE, False, reason::IN_PROGRESS, "In progress", now);
            cond(
                s,
                ct::PREP_IN_PROGRESS,
                True,
                reason::IN_PROGRESS,
                "In progress",
                now,
            );
            s.run.warnings.clear();
            Some(Stage::Prep)
        }
        Op::UpgradePre => {
            cond(
                s,
                ct::UPGRADE_IN_PROGRESS,
                True,
                reason::IN_PROGRESS,
                "In progress",
                now,
            );
            Some(Stage::Upgrade)
        }
        Op::Rollback => {
            cond(
                s,
                ct::UPGRADE_IN_PROGRESS,
                False,
                reason::FAILED,
                "Rollback requested",
                now,
            );
            cond(
                s,
                ct::UPGRADE_COMPLETED,
                False,
                reason::FAILED,
                "Rollback requested",
                now,
            );
            cond(
                s,
                ct::ROLLBACK_IN_PROGRESS,
                True,
                reason::IN_PROGRESS,
                "In progress",
                now,
            );
            s.run.watchdog_deadline = None;
            Some(Stage::Rollback)
        }
        Op::Abort => {
            cond(s, ct::IDLE, False, reason::ABORTING, "Aborting", now);
            None
        }
        Op::Finalize => {
            cond(s, ct::IDLE, False, reason::FINALIZING, "Finalizing", now);
            None
        }
        Op::UpgradePost | Op::RollbackPost | Op::AutoRollback(_) => None,
    };
    if let Some(stage) = history_stage {
        status(s).history.push(StageHistory {
            stage,
            start_time: now,
            completion_time: None,
            phases: vec![],
        });
    }
    s.run.op = Some(op);
}

// ---------------------------------------------------------------------------------------
// Timers and steps

/// Fires the timers that change state: the init-monitor watchdog. Answers whether the
/// state changed.
pub fn tick(s: &mut SpokeState, now: DateTime<Utc>) -> bool {
    if !timer_due(s, now) {
        return false;
    }
    let secs = init_monitor_seconds(s);
    auto_rollback(
        s,
        format!(
            "Rollback due to LCA Init Monitor timeout, after {}",
            go_duration(secs)
        ),
        now,
    );
    true
}

/// Whether [`tick`] would change anything now (read-only).
pub fn timer_due(s: &SpokeState, now: DateTime<Utc>) -> bool {
    s.run.op == Some(Op::UpgradePost)
        && s.run.watchdog_deadline.is_some_and(|d| d <= now)
        && !disabled(s, AUTO_ROLLBACK_INIT_MONITOR)
}

fn init_monitor_seconds(s: &SpokeState) -> i64 {
    s.ibu
        .spec
        .auto_rollback_on_failure
        .as_ref()
        .and_then(|a| a.init_monitor_timeout_seconds)
        .filter(|v| *v > 0)
        .unwrap_or(DEFAULT_INIT_MONITOR_SECONDS)
}

/// What to do now. Read-only: call [`tick`] first so timers have fired.
pub fn next(s: &SpokeState, now: DateTime<Utc>) -> Next {
    let Some(op) = &s.run.op else {
        return Next::Nothing;
    };
    let mut wake = s.run.retry_at.filter(|t| *t > now);
    if *op == Op::UpgradePost
        && !disabled(s, AUTO_ROLLBACK_INIT_MONITOR)
        && let Some(d) = s.run.watchdog_deadline
    {
        wake = Some(wake.map_or(d, |w| w.min(d)));
    }
    if s.run.retry_at.is_some_and(|t| t > now) {
        return Next::WaitUntil(wake.unwrap_or(now));
    }
    match op.steps().get(s.run.step) {
        Some(step) => Next::Work(work_for(s, *step, now)),
        None => Next::Nothing,
    }
}

fn seed(s: &SpokeState) -> SeedImageRef {
    s.ibu.spec.seed_image_ref.clone().unwrap_or_default()
}

fn work_for(s: &SpokeState, step: Step, now: DateTime<Utc>) -> Work {
    match step {
        Step::Health => Work::Health,
        Step::Validate => Work::GatherFacts(s.ibu.spec.clone()),
        Step::InspectSeed => Work::InspectSeed(seed(s)),
        Step::Stateroot => Work::SetupStateroot {
            stateroot: stateroot_name(&seed(s).version),
            seed: seed(s),
        },
        Step::Precache => Work::Precache {
            seed: seed(s),
            release_registry: s.run.release_registry.clone(),
        },
        Step::Backup => Work::Backup(groups(&s.run.backups)),
        Step::Pivot => pivot_work(s, now),
        Step::Reboot => Work::Reboot,
        Step::CheckDpa => Work::CheckDpa,
        Step::ApplyExtraManifests => Work::ApplyExtraManifests(groups(&s.run.extra_manifests)),
        Step::Restore => Work::Restore(groups(&s.run.restores)),
        Step::DeferredHealth => Work::DeferredHealth,
        Step::Cleanup => Work::Cleanup {
            manual: s.run.manual_cleanup,
        },
    }
}

fn groups(docs: &[Value]) -> Vec<Vec<Value>> {
    let manifests: Vec<validate::Manifest> = docs
        .iter()
        .map(|d| validate::Manifest {
            api_version: String::new(),
            kind: String::new(),
            name: String::new(),
            namespace: String::new(),
            body: d.clone(),
        })
        .collect();
    validate::wave_groups(&manifests)
        .into_iter()
        .map(|g| g.into_iter().map(|m| m.body).collect())
        .collect()
}

/// The states a pivot saves. Upgrade: the new stateroot gets the IBU to continue after the
/// reboot (generation back to 1). Rollback: the old stateroot gets the IBU that completes the
/// rollback. Automatic rollback: the old stateroot gets the failed upgrade with its reason.
fn pivot_work(s: &SpokeState, t: DateTime<Utc>) -> Work {
    match s.run.op.clone() {
        Some(Op::UpgradePre) => {
            let mut new = s.clone();
            close_phase(&mut new, "PrePivot", t);
            new.ibu.metadata.generation = Some(1);
            new.run.op = Some(Op::UpgradePost);
            new.run.step = 0;
            new.run.in_flight = false;
            new.run.post_reboot = true;
            new.run.watchdog_deadline = None;
            refresh(&mut new);
            let root = Root::Seed(stateroot_name(&seed(s).version));
            Work::Pivot {
                saves: vec![(root.clone(), new)],
                default: root,
            }
        }
        Some(Op::Rollback) => {
            let mut old = s.clone();
            old.run.op = Some(Op::RollbackPost);
            old.run.step = 0;
            old.run.in_flight = false;
            old.run.post_reboot = false;
            in_progress_message(&mut old, &Op::Rollback, "Initiating rollback", t);
            Work::Pivot {
                saves: vec![(Root::Previous, old)],
                default: Root::Previous,
            }
        }
        Some(Op::AutoRollback(why)) => {
            let old = failed_on_old_stateroot(s, &why, t);
            Work::Pivot {
                saves: vec![(Root::Previous, old)],
                default: Root::Previous,
            }
        }
        _ => Work::Pivot {
            saves: vec![],
            default: Root::Booted,
        },
    }
}

/// Marks the next step started (persist this before doing the work): sets its message and
/// opens its history phase. Answers the work and the epoch its outcome must carry.
pub fn begin(s: &mut SpokeState, now: DateTime<Utc>) -> Option<(Work, u64)> {
    let Next::Work(work) = next(s, now) else {
        return None;
    };
    let op = s.run.op.clone()?;
    let step = op.steps()[s.run.step];
    s.run.in_flight = true;
    let message = match step {
        Step::Stateroot => Some("Setting up stateroot"),
        Step::Precache => Some("Precaching release images"),
        Step::Backup => Some("Backing up Application Data"),
        Step::Pivot if op == Op::Rollback => Some("Initiating rollback"),
        Step::Pivot => Some("Preparing the new stateroot"),
        Step::Reboot => Some("Rebooting"),
        Step::ApplyExtraManifests => Some("Applying extra manifests"),
        Step::Restore => Some("Restoring Application Data"),
        _ => None,
    };
    if let Some(m) = message {
        in_progress_message(s, &op, m, now);
    }
    let phase = match (&op, step) {
        (Op::Prep, Step::Stateroot) => Some("Stateroot"),
        (Op::Prep, Step::Precache) => Some("Precache"),
        (Op::UpgradePre, Step::Health) => Some("PrePivot"),
        (Op::UpgradePost, Step::Health) => Some("PostPivot"),
        _ => None,
    };
    if let Some(p) = phase {
        open_phase(s, p, now);
    }
    refresh(s);
    let epoch = s.run.epoch;
    if op == Op::UpgradePre && step == Step::Reboot {
        // What stays on the old stateroot: if the node ever comes back there without a
        // controlled rollback, the IBU found there says so.
        uncontrolled_rollback(s, now);
    }
    Some((work, epoch))
}

fn uncontrolled_rollback(s: &mut SpokeState, now: DateTime<Utc>) {
    *s = failed_on_old_stateroot(s, "Uncontrolled rollback", now);
}

/// The IBU as it must read on the old stateroot after the node went back there: the upgrade
/// failed, for `why`, nothing running.
fn failed_on_old_stateroot(s: &SpokeState, why: &str, now: DateTime<Utc>) -> SpokeState {
    let mut old = s.clone();
    old.run = Run {
        epoch: s.run.epoch,
        ..Run::default()
    };
    mark_upgrade_failed(&mut old, why, now);
    refresh(&mut old);
    old
}

fn mark_upgrade_failed(s: &mut SpokeState, why: &str, now: DateTime<Utc>) {
    use ConditionStatus::False;
    cond(
        s,
        ct::UPGRADE_COMPLETED,
        False,
        reason::FAILED,
        "Upgrade failed",
        now,
    );
    cond(s, ct::UPGRADE_IN_PROGRESS, False, reason::FAILED, why, now);
}

fn open_phase(s: &mut SpokeState, phase: &str, now: DateTime<Utc>) {
    if let Some(h) = status(s).history.last_mut()
        && !h.phases.iter().any(|p| p.phase == phase)
    {
        h.phases.push(PhaseHistory {
            phase: phase.to_string(),
            start_time: now,
            completion_time: None,
        });
    }
}

fn close_phase(s: &mut SpokeState, phase: &str, now: DateTime<Utc>) {
    if let Some(p) = status(s)
        .history
        .last_mut()
        .and_then(|h| h.phases.iter_mut().find(|p| p.phase == phase))
    {
        p.completion_time.get_or_insert(now);
    }
}

/// Writes the "what is happening" message where this operation shows it.
fn in_progress_message(s: &mut SpokeState, op: &Op, message: &str, now: DateTime<Utc>) {
    let (type_, why) = match op {
        Op::Prep => (ct::PREP_IN_PROGRESS, reason::IN_PROGRESS),
        Op::UpgradePre | Op::UpgradePost | Op::AutoRollback(_) => {
            (ct::UPGRADE_IN_PROGRESS, reason::IN_PROGRESS)
        }
        Op::Rollback | Op::RollbackPost => (ct::ROLLBACK_IN_PROGRESS, reason::IN_PROGRESS),
        Op::Abort => (ct::IDLE, reason::ABORTING),
        Op::Finalize => (ct::IDLE, reason::FINALIZING),
    };
    let value = if type_ == ct::IDLE {
        ConditionStatus::False
    } else {
        ConditionStatus::True
    };
    if matches!(op, Op::AutoRollback(_)) {
        // The automatic rollback shows its reason only on the old stateroot.
        return;
    }
    cond(s, type_, value, why, message, now);
}

/// Applies the outcome of the work started by [`begin`] with this `epoch`. Outcomes of
/// superseded work (an abort arrived meanwhile) are dropped.
pub fn complete(s: &mut SpokeState, epoch: u64, outcome: Outcome, now: DateTime<Utc>) {
    if epoch != s.run.epoch || !s.run.in_flight {
        return;
    }
    s.run.in_flight = false;
    let Some(op) = s.run.op.clone() else {
        return;
    };
    let step = op.steps()[s.run.step];
    match outcome {
        Outcome::Done | Outcome::Precached { .. } => {
            if let Outcome::Precached {
                total,
                pulled,
                failed,
            } = outcome
            {
                in_progress_message(
                    s,
                    &op,
                    &format!(
                        "Precaching done: total: {total} (pulled: {pulled}, failed: {failed})"
                    ),
                    now,
                );
            }
            advance(s, &op, step, now);
        }
        Outcome::Facts(facts) => match validate_prep(s, &facts) {
            Ok(()) => advance(s, &op, step, now),
            Err(e) => fail(s, &op, step, e, now),
        },
        Outcome::SeedLabels(labels) => {
            let cluster = s.run.cluster.clone().unwrap_or_default();
            match validate::seed_labels(&labels, &cluster) {
                Ok(info) => {
                    s.run.release_registry = info.release_registry;
                    advance(s, &op, step, now);
                }
                Err(e) => fail(s, &op, step, e, now),
            }
        }
        Outcome::Waiting(why) => {
            let message = match op {
                Op::Prep => {
                    format!("Waiting for system to stabilize before Prep stage can continue: {why}")
                }
                Op::Finalize => format!(
                    "Waiting for system to stabilize before finalize (idle) stage can continue: {why}"
                ),
                _ => format!("Waiting for system to stabilize: {why}"),
            };
            in_progress_message(s, &op, &message, now);
            s.run.retry_at = Some(now + HEALTH_POLL);
        }
        Outcome::Transient(why) => {
            s.run.attempts += 1;
            let backoff = Duration::seconds(1i64 << s.run.attempts.min(6)).min(MAX_BACKOFF);
            in_progress_message(s, &op, &format!("{why} (retrying)"), now);
            s.run.retry_at = Some(now + backoff);
        }
        Outcome::Failed(e) => fail(s, &op, step, e, now),
        Outcome::CleanupFailed(errors) => cleanup_failed(s, &op, &errors, now),
    }
    refresh(s);
}

fn cleanup_failed(s: &mut SpokeState, op: &Op, errors: &[String], now: DateTime<Utc>) {
    let why = if *op == Op::Abort {
        reason::ABORT_FAILED
    } else {
        reason::FINALIZE_FAILED
    };
    let message = format!(
        "{} Perform cleanup manually then add '{MANUAL_CLEANUP_DONE_ANNOTATION}' annotation to ibu CR to transition back to Idle",
        errors.join("; ")
    );
    cond(s, ct::IDLE, ConditionStatus::False, why, &message, now);
    s.run.manual_cleanup = false;
    s.run.retry_at = Some(now + CLEANUP_RETRY);
}

fn validate_prep(s: &mut SpokeState, facts: &ClusterFacts) -> Result<(), String> {
    let spec = s.ibu.spec.clone();
    validate::seed_version(
        &spec.seed_image_ref.clone().unwrap_or_default(),
        &facts.version,
    )?;
    let (oadp, mut warnings) = validate::oadp(&spec.oadp_content, facts)?;
    let em_warnings = validate::extra_manifests(&spec.extra_manifests, facts)?;
    warnings.extend(em_warnings);
    s.run.warnings = warnings;
    s.run.backups = oadp.backups.into_iter().map(|m| m.body).collect();
    s.run.restores = oadp.restores.into_iter().map(|m| m.body).collect();
    s.run.extra_manifests = extra_manifest_bodies(&spec, facts);
    s.run.cluster = Some(validate::SeedCompat {
        has_proxy: facts.has_proxy,
        fips: facts.fips,
        container_storage_mount: facts.container_storage_mount.clone(),
    });
    Ok(())
}

fn extra_manifest_bodies(spec: &ImageBasedUpgradeSpec, facts: &ClusterFacts) -> Vec<Value> {
    let mut out = Vec::new();
    for r in &spec.extra_manifests {
        for text in facts.configmaps.get(r).into_iter().flat_map(|d| d.values()) {
            for doc in serde_yaml::Deserializer::from_str(text) {
                // Validation already refused undecodable streams.
                let Ok(v) = Value::deserialize(doc) else {
                    break;
                };
                if !v.is_null() {
                    out.push(v);
                }
            }
        }
    }
    out
}

fn advance(s: &mut SpokeState, op: &Op, step: Step, now: DateTime<Utc>) {
    s.run.attempts = 0;
    s.run.retry_at = None;
    match (op, step) {
        (Op::Prep, Step::Stateroot) => close_phase(s, "Stateroot", now),
        (Op::Prep, Step::Precache) => close_phase(s, "Precache", now),
        (Op::UpgradePre, Step::Backup) => {
            in_progress_message(s, op, "Backup of Application Data is in progress", now)
        }
        (Op::UpgradePre, Step::Pivot) => close_phase(s, "PrePivot", now),
        _ => {}
    }
    s.run.step += 1;
    if s.run.step < op.steps().len() {
        return;
    }
    use ConditionStatus::{False, True};
    match op {
        Op::Prep => {
            let warnings = std::mem::take(&mut s.run.warnings);
            let message = if warnings.is_empty() {
                "Prep stage completed successfully"
            } else {
                set_annotation(
                    s,
                    EXTRA_MANIFEST_WARNING_ANNOTATION,
                    Some(warnings.join("; ")),
                );
                "Prep stage completed with extramanifests validation warning. Please check the annotation 'extra-manifest.lca.openshift.io/validation-warning' for details."
            };
            cond(
                s,
                ct::PREP_IN_PROGRESS,
                False,
                reason::COMPLETED,
                "Prep completed",
                now,
            );
            cond(s, ct::PREP_COMPLETED, True, reason::COMPLETED, message, now);
            finish_history(s, now);
            s.run.op = None;
        }
        Op::UpgradePost => {
            close_phase(s, "PostPivot", now);
            cond(
                s,
                ct::UPGRADE_IN_PROGRESS,
                False,
                reason::COMPLETED,
                "Upgrade completed",
                now,
            );
            cond(
                s,
                ct::UPGRADE_COMPLETED,
                True,
                reason::COMPLETED,
                "Upgrade completed",
                now,
            );
            finish_history(s, now);
            s.run.watchdog_deadline = None;
            s.run.op = None;
        }
        Op::Abort | Op::Finalize => back_to_idle(s, now),
        // Ends with a reboot; the boot continues them.
        Op::UpgradePre | Op::Rollback | Op::AutoRollback(_) | Op::RollbackPost => {}
    }
}

fn finish_history(s: &mut SpokeState, now: DateTime<Utc>) {
    if let Some(h) = status(s).history.last_mut() {
        h.completion_time = Some(now);
    }
}

fn back_to_idle(s: &mut SpokeState, now: DateTime<Utc>) {
    let st = status(s);
    st.conditions.retain(|c| c.type_ == ct::IDLE);
    st.history.clear();
    st.rollback_availability_expiration = None;
    cond(
        s,
        ct::IDLE,
        ConditionStatus::True,
        reason::IDLE,
        "Idle",
        now,
    );
    set_annotation(s, EXTRA_MANIFEST_WARNING_ANNOTATION, None);
    s.run = Run {
        epoch: s.run.epoch + 1,
        ..Run::default()
    };
    refresh(s);
}

fn fail(s: &mut SpokeState, op: &Op, step: Step, error: String, now: DateTime<Utc>) {
    use ConditionStatus::False;
    match op {
        Op::Prep => {
            cond(
                s,
                ct::PREP_COMPLETED,
                False,
                reason::FAILED,
                "Prep failed",
                now,
            );
            cond(s, ct::PREP_IN_PROGRESS, False, reason::FAILED, &error, now);
            s.run.op = None;
        }
        Op::UpgradePost => {
            let (annotation, what) = match step {
                Step::Restore => (AUTO_ROLLBACK_UPGRADE_COMPLETION, "restore failure"),
                Step::DeferredHealth => (
                    AUTO_ROLLBACK_UPGRADE_COMPLETION,
                    "upgrade completion failure",
                ),
                _ => (
                    AUTO_ROLLBACK_POST_REBOOT_CONFIG,
                    "post-reboot configuration failure",
                ),
            };
            if disabled(s, annotation) {
                upgrade_failed(s, &error, now);
            } else {
                auto_rollback(s, format!("Rollback due to {what}: {error}"), now);
            }
        }
        Op::UpgradePre => upgrade_failed(s, &error, now),
        Op::AutoRollback(_) => upgrade_failed(s, &error, now),
        Op::Rollback | Op::RollbackPost => {
            cond(
                s,
                ct::ROLLBACK_COMPLETED,
                False,
                reason::FAILED,
                "Rollback failed",
                now,
            );
            cond(
                s,
                ct::ROLLBACK_IN_PROGRESS,
                False,
                reason::FAILED,
                &error,
                now,
            );
            s.run.op = None;
        }
        Op::Abort | Op::Finalize => cleanup_failed(s, op, &[error], now),
    }
}

fn upgrade_failed(s: &mut SpokeState, error: &str, now: DateTime<Utc>) {
    mark_upgrade_failed(s, error, now);
    s.run.watchdog_deadline = None;
    s.run.op = None;
}

/// Rolls the node back to the old stateroot: the old deployment becomes default and the
/// node reboots; the IBU restored there shows the failed upgrade with `reason`.
fn auto_rollback(s: &mut SpokeState, why: String, _now: DateTime<Utc>) {
    s.run.watchdog_deadline = None;
    s.run.op = Some(Op::AutoRollback(why));
    s.run.step = 0;
    s.run.in_flight = false;
    s.run.retry_at = None;
    s.run.epoch += 1;
}

/// The agent came up on a stateroot after a reboot (or a restart): continue what the saved
/// state says. `rollback_expiration` is when rollback stops being possible (the host knows).
pub fn booted(s: &mut SpokeState, rollback_expiration: Option<DateTime<Utc>>, now: DateTime<Utc>) {
    match s.run.op.clone() {
        Some(Op::UpgradePost) if s.run.step == 0 && !s.run.in_flight => {
            if s.run.watchdog_deadline.is_none() {
                s.run.watchdog_deadline = Some(now + Duration::seconds(init_monitor_seconds(s)));
            }
            let st = status(s);
            if st.rollback_availability_expiration.is_none() {
                st.rollback_availability_expiration = rollback_expiration;
            }
        }
        Some(Op::RollbackPost) => {
            use ConditionStatus::{False, True};
            cond(
                s,
                ct::ROLLBACK_IN_PROGRESS,
                False,
                reason::COMPLETED,
                "Rollback completed",
                now,
            );
            cond(
                s,
                ct::ROLLBACK_COMPLETED,
                True,
                reason::COMPLETED,
                "Rollback completed",
                now,
            );
            finish_history(s, now);
            s.run.op = None;
        }
        _ => {}
    }
    refresh(s);
}

/// The agent restarted (not rebooted) with a step in flight. Stateroot setup and precache
/// cannot resume half-done: Prep fails and the way out is Idle. Other steps are
/// idempotent and run again.
pub fn resume(s: &mut SpokeState, now: DateTime<Utc>) {
    if !s.run.in_flight {
        return;
    }
    let Some(op) = s.run.op.clone() else {
        s.run.in_flight = false;
        return;
    };
    let step = op.steps()[s.run.step];
    if op == Op::Prep && matches!(step, Step::Stateroot | Step::Precache) {
        let what = if step == Step::Stateroot {
            "stateroot setup"
        } else {
            "precaching"
        };
        let epoch = s.run.epoch;
        complete(
            s,
            epoch,
            Outcome::Failed(format!(
                "{what} was interrupted by an agent restart; move to Idle to clean up and start again"
            )),
            now,
        );
    } else {
        s.run.in_flight = false;
    }
    refresh(s);
}

#[cfg(test)]
mod tests;
