//! What the planner keeps of a rollout between passes (steps, each cluster's progress) and
//! what one pass decides (events, pushes, label changes): plain data, stored by the engine.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use fleet_types::ibgu::Action;
use fleet_types::ibu::{ImageBasedUpgrade, Stage};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClusterPhase {
    Pending,
    Running,
    Completed,
    Failed,
}

/// One cluster's progress through the actions of one plan step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ClusterProgress {
    pub batch: usize,
    pub phase: ClusterPhase,
    pub action_index: usize,
    pub completed: Vec<Action>,
    pub failed: Option<(Action, String)>,
    pub timed_out: bool,
    /// The stage last pushed successfully, and when a push was last tried.
    pub pushed_stage: Option<Stage>,
    pub pushed_at: Option<DateTime<Utc>>,
    pub push_failures: u32,
    /// When the pass that decided the last push ran, while no pass has recorded that push's
    /// outcome: the push may still be on its way. No other push goes to the cluster
    /// meanwhile, from this hub or another on the same database, until the outcome is
    /// recorded or [`PUSH_RESEND`](super::rollout::PUSH_RESEND) has passed (the hub that
    /// sent it stopped before recording it).
    pub push_in_flight: Option<DateTime<Utc>>,
    /// The spoke refused the last push (422): the action fails with this message.
    pub refused: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub action_started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `Prep` attempts made again after a failure (`rolloutStrategy.retries`).
    #[serde(default)]
    pub retries: u32,
    /// The failed `Prep` is being aborted (the spoke moved to Idle) before it is tried again.
    #[serde(default)]
    pub resetting: bool,
}

impl ClusterProgress {
    /// A selected cluster whose batch has not started yet.
    pub fn pending(batch: usize) -> Self {
        ClusterProgress {
            batch,
            phase: ClusterPhase::Pending,
            action_index: 0,
            completed: vec![],
            failed: None,
            timed_out: false,
            pushed_stage: None,
            pushed_at: None,
            push_failures: 0,
            push_in_flight: None,
            refused: None,
            started_at: None,
            action_started_at: None,
            finished_at: None,
            retries: 0,
            resetting: false,
        }
    }
}

/// Why a plan item stopped for good (`ibgu-hub.md` section 5): no cluster of it starts
/// again, later items never start.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Halt {
    /// `FailureBudgetExceeded` or `CanaryFailed`.
    pub reason: String,
    pub message: String,
}

pub const FAILURE_BUDGET_EXCEEDED: &str = "FailureBudgetExceeded";
pub const CANARY_FAILED: &str = "CanaryFailed";

/// What holds a rollout's starts back for now.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// `spec.paused`.
    Paused,
    /// Outside `spec.maintenanceWindow`.
    Window,
    /// `maxStartsPerMinute` reached.
    Rate,
}

impl Wait {
    pub fn as_str(self) -> &'static str {
        match self {
            Wait::Paused => "paused",
            Wait::Window => "window",
            Wait::Rate => "rate",
        }
    }

    pub fn parse(s: &str) -> Option<Wait> {
        [Wait::Paused, Wait::Window, Wait::Rate]
            .into_iter()
            .find(|w| w.as_str() == s)
    }
}

/// A started plan step: its frozen selection and where its batches are.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StepState {
    pub step: usize,
    pub actions: Vec<Action>,
    /// Selected clusters, frozen at the start, batch after batch (by name within each):
    /// in name order unless the item's rollout controls shape its batches.
    pub clusters: Vec<String>,
    /// Where each batch ends in `clusters`; empty: chunks of `max_concurrency`.
    #[serde(default)]
    pub batch_ends: Vec<usize>,
    pub max_concurrency: usize,
    pub timeout_minutes: i64,
    pub started_at: DateTime<Utc>,
    pub current_batch: usize,
    pub batch_started_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub timed_out: bool,
    pub progress: BTreeMap<String, ClusterProgress>,
    /// Set once the item halted (decided at once; the step completes when the clusters
    /// still running have finished).
    #[serde(default)]
    pub halt: Option<Halt>,
    /// Since when the rollout is paused, while it is.
    #[serde(default)]
    pub paused_since: Option<DateTime<Utc>>,
    /// Milliseconds the step was paused (ended pauses), and of those since its current
    /// batch started: added to the deadlines.
    #[serde(default)]
    pub paused_ms: i64,
    #[serde(default)]
    pub batch_paused_ms: i64,
    /// When clusters started their first action, within the last minute, while
    /// `maxStartsPerMinute` is set.
    #[serde(default)]
    pub recent_starts: Vec<DateTime<Utc>>,
}

/// See [`StepState::head`].
#[derive(Clone, Debug, PartialEq)]
pub struct StepHead {
    pub current_batch: usize,
    pub batch_started_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub timed_out: bool,
    pub halt: Option<Halt>,
    pub paused_since: Option<DateTime<Utc>>,
    pub paused_ms: i64,
    pub batch_paused_ms: i64,
    pub recent_starts: Vec<DateTime<Utc>>,
}

/// The progress entries one pass changed, each as it was before its first change: what is
/// written is found among these (a batch at most), not among all of a step's clusters
/// (10,000 at fleet scale). The planner changes progress only through
/// [`Touched::progress_mut`]; [`Decision::changes_exactly`] checks that it did.
#[derive(Debug, Default)]
pub struct Touched(BTreeMap<usize, BTreeMap<String, ClusterProgress>>);

impl Touched {
    /// The cluster's progress in the step, to change.
    pub fn progress_mut<'s>(
        &mut self,
        step: &'s mut StepState,
        cluster: &str,
    ) -> Option<&'s mut ClusterProgress> {
        let p = step.progress.get_mut(cluster)?;
        let before = self.0.entry(step.step).or_default();
        if !before.contains_key(cluster) {
            before.insert(cluster.to_string(), p.clone());
        }
        Some(p)
    }

    /// By step, the clusters whose progress now differs from before.
    pub fn changed(&self, steps: &[StepState]) -> BTreeMap<usize, Vec<String>> {
        let mut out = BTreeMap::new();
        for (&n, before) in &self.0 {
            let Some(step) = steps.get(n) else { continue };
            let differ: Vec<String> = before
                .iter()
                .filter(|(c, old)| step.progress.get(*c).is_some_and(|p| p != *old))
                .map(|(c, _)| c.clone())
                .collect();
            if !differ.is_empty() {
                out.insert(n, differ);
            }
        }
        out
    }
}

impl StepState {
    /// What of the step is stored apart from its progress, and moves during a rollout.
    pub fn head(&self) -> StepHead {
        StepHead {
            current_batch: self.current_batch,
            batch_started_at: self.batch_started_at,
            completed_at: self.completed_at,
            timed_out: self.timed_out,
            halt: self.halt.clone(),
            paused_since: self.paused_since,
            paused_ms: self.paused_ms,
            batch_paused_ms: self.batch_paused_ms,
            recent_starts: self.recent_starts.clone(),
        }
    }

    pub fn batch_count(&self) -> usize {
        if self.batch_ends.is_empty() {
            self.clusters.len().div_ceil(self.max_concurrency.max(1))
        } else {
            self.batch_ends.len()
        }
    }

    /// Where batch `b` lies in `clusters`.
    fn batch_range(&self, b: usize) -> std::ops::Range<usize> {
        let n = self.clusters.len();
        if self.batch_ends.is_empty() {
            let max = self.max_concurrency.max(1);
            return (b * max).min(n)..((b + 1) * max).min(n);
        }
        let start = if b == 0 {
            0
        } else {
            self.batch_ends.get(b - 1).copied().unwrap_or(n)
        };
        let end = self.batch_ends.get(b).copied().unwrap_or(n);
        start.min(n)..end.min(n).max(start.min(n))
    }

    pub fn batch_members(&self, b: usize) -> Vec<String> {
        self.clusters[self.batch_range(b)].to_vec()
    }

    /// Time the step has been paused by `now` (ended pauses and the current one).
    fn pause_now(&self, now: DateTime<Utc>) -> Duration {
        self.paused_since.map_or(Duration::zero(), |since| {
            (now - since).max(Duration::zero())
        })
    }

    /// The current batch's clusters still at work (pending or running): all a pass of a
    /// running batch needs of the fleet. A cluster that has finished the step is not driven
    /// again, and the planner asks for the whole fleet should it need one that is not given.
    pub fn batch_at_work(&self) -> Vec<String> {
        self.batch_members(self.current_batch)
            .into_iter()
            .filter(|c| {
                self.progress.get(c).is_none_or(|p| {
                    matches!(p.phase, ClusterPhase::Pending | ClusterPhase::Running)
                })
            })
            .collect()
    }

    /// When the step as a whole times out, as of `now`: paused time does not count.
    pub fn deadline(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.started_at
            + Duration::minutes(self.timeout_minutes)
            + Duration::milliseconds(self.paused_ms)
            + self.pause_now(now)
    }

    /// When the current batch times out: it gets an equal share of what is left of the
    /// step's time among the batches still to run; the last gets all of it. Paused time
    /// does not count.
    pub fn batch_deadline(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let paused_before = Duration::milliseconds(self.paused_ms - self.batch_paused_ms);
        self.batch_started_at
            + batch_timeout(
                self.timeout_minutes,
                self.batch_started_at - self.started_at - paused_before,
                self.batch_count(),
                self.current_batch,
            )
            + Duration::milliseconds(self.batch_paused_ms)
            + self.pause_now(now)
    }
}

/// `(T - (t_b - t_0)) / (n - b + 1)` with `b` counted from 1; here `b` counts from 0.
pub fn batch_timeout(
    timeout_minutes: i64,
    elapsed: Duration,
    batches: usize,
    b: usize,
) -> Duration {
    let left = Duration::minutes(timeout_minutes) - elapsed;
    let remaining = (batches.saturating_sub(b)).max(1) as i32;
    (left / remaining).max(Duration::zero())
}

/// Which part of the fleet a pass reads, said before it runs: the last IBU of the running
/// batch's clusters still at work (a few KiB each; those that finished the step are not
/// driven again), and the labels of only those, or of every cluster when the pass will
/// select for a plan step or time a step out (labels beyond the batch). A pass given part
/// that finds it needs more after all (the batch's last report ends the step) says so in
/// [`Decision::needs_fleet`].
#[derive(Clone, Debug, PartialEq)]
pub struct Scope {
    pub reports: Vec<String>,
    pub whole_fleet: bool,
}

pub fn scope(steps: &[StepState], now: DateTime<Utc>) -> Scope {
    match steps.last().filter(|s| s.completed_at.is_none()) {
        None => Scope {
            reports: Vec::new(),
            whole_fleet: true,
        },
        Some(s) => Scope {
            reports: s.batch_at_work(),
            whole_fleet: now >= s.deadline(now),
        },
    }
}

/// What the hub knows of a cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterInfo {
    pub labels: BTreeMap<String, String>,
    /// Shared: the engine keeps the reports it parsed between passes.
    pub ibu: Option<Arc<ImageBasedUpgrade>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub cluster: Option<String>,
    pub step: Option<usize>,
    pub action: Option<Action>,
    pub event: &'static str,
    pub message: String,
    /// For an action that ended (completed, failed, timed out): how long it ran, in
    /// seconds of the planner's clock.
    #[serde(skip)]
    pub took: Option<f64>,
}

/// A stage the spoke of `cluster` must be moved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    pub cluster: String,
    pub step: usize,
    pub action: Action,
    pub stage: Stage,
    /// What led to the push: the decision-latency metric measures from that report.
    pub cause: PushCause,
    /// Which of the item's actions the push is for: its outcome is recorded only while the
    /// cluster is still on it (another hub's pass may have moved it on meanwhile).
    pub action_index: usize,
}

/// Why the planner pushes: which spoke reports, if any, made the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushCause {
    /// The cluster's own report that its previous action ended.
    OwnReport,
    /// The reports of this pass that ended the batch or plan step before
    /// ([`Decision::reported`]): the push starts the next one.
    Reports,
    /// No report: a new rollout, a retry, a timeout.
    Other,
}

/// How the spoke answered a push.
#[derive(Debug, Clone, PartialEq)]
pub enum PushOutcome {
    Accepted(Stage),
    /// The spoke refused the stage (422): the action fails with this message.
    Refused(String),
    /// No answer, or not one that says anything about the stage: retried with backoff.
    Unreachable(String),
}

/// The outcome of one push, for the pass that next holds the rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct PushResult {
    pub step: usize,
    pub action_index: usize,
    pub cluster: String,
    pub outcome: PushOutcome,
    /// When the push was decided.
    pub at: DateTime<Utc>,
}

/// Whether the outcome is for the action its cluster is still running: only then does
/// recording it change the cluster's progress.
pub fn awaits_push_result(steps: &[StepState], r: &PushResult) -> bool {
    steps
        .get(r.step)
        .and_then(|s| s.progress.get(&r.cluster))
        .is_some_and(|p| p.phase == ClusterPhase::Running && p.action_index == r.action_index)
}

/// Records push outcomes in the clusters' progress, each only while the cluster is still
/// running the action it was for (a pass may have moved it on meanwhile, on the spoke's own
/// report or on another hub).
pub fn apply_push_results<'a>(
    steps: &mut [StepState],
    touched: &mut Touched,
    results: impl IntoIterator<Item = &'a PushResult>,
) {
    for r in results {
        let waiting = awaits_push_result(steps, r);
        let Some(step) = steps.get_mut(r.step) else {
            continue;
        };
        // The push this outcome answers is no longer on its way, whatever the cluster does
        // now (a claim made since, by a later pass, is not this push's to clear).
        let answered = step
            .progress
            .get(&r.cluster)
            .is_some_and(|p| p.push_in_flight == Some(r.at));
        if !waiting && !answered {
            continue;
        }
        let Some(p) = touched.progress_mut(step, &r.cluster) else {
            continue;
        };
        if answered {
            p.push_in_flight = None;
        }
        if !waiting {
            continue;
        }
        p.pushed_at = Some(r.at);
        match &r.outcome {
            PushOutcome::Accepted(stage) => {
                p.pushed_stage = Some(*stage);
                p.push_failures = 0;
                p.refused = None;
            }
            PushOutcome::Refused(why) => p.refused = Some(why.clone()),
            PushOutcome::Unreachable(_) => {
                p.pushed_stage = None;
                p.push_failures += 1;
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelChange {
    pub add: BTreeSet<String>,
    pub remove: BTreeSet<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Progressing,
    Completed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Progressing => "Progressing",
            Phase::Completed => "Completed",
        }
    }
}

/// Everything one pass decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub steps: Vec<StepState>,
    pub label_changes: BTreeMap<String, LabelChange>,
    pub pushes: Vec<Push>,
    pub events: Vec<Event>,
    pub phase: Phase,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// When the planner wants to look again even if nothing is reported (timeouts, retries).
    pub wake_at: Option<DateTime<Utc>>,
    /// Given part of the fleet, the pass needed the rest: nothing here may be used.
    pub needs_fleet: bool,
    /// The clusters whose reports ended an action in this pass (completed or failed): each
    /// is a decision the hub made on a report.
    pub reported: Vec<String>,
    /// By step, the clusters whose progress is to be written: those the pass changed, and
    /// every cluster of a step it started.
    pub changed: BTreeMap<usize, Vec<String>>,
    /// Clusters the pass would have pushed to but for a push still on its way to them
    /// ([`ClusterProgress::push_in_flight`]): its outcome is to trigger the next pass.
    pub awaiting_answers: Vec<String>,
    /// What held starts back in this pass (pause, maintenance window, start rate).
    pub waiting: Option<Wait>,
}

impl Decision {
    /// The halt of the rollout, once an item halted.
    pub fn halt(&self) -> Option<&Halt> {
        self.steps.iter().find_map(|s| s.halt.as_ref())
    }
}

impl Decision {
    /// Whether [`Decision::changed`] names exactly the progress entries that differ from
    /// `before` (the steps the pass was given), found by comparing every entry: the check,
    /// in tests and debug builds, that the planner changes progress only through
    /// [`Touched::progress_mut`].
    pub fn changes_exactly(&self, before: &[StepState]) -> bool {
        self.steps.iter().all(|s| {
            let named: Vec<&String> = self.changed.get(&s.step).into_iter().flatten().collect();
            let differ: Vec<&String> = match before.get(s.step) {
                Some(old) => s
                    .progress
                    .iter()
                    .filter(|(c, p)| old.progress.get(*c) != Some(*p))
                    .map(|(c, _)| c)
                    .collect(),
                None => s.progress.keys().collect(),
            };
            named == differ
        })
    }
}
