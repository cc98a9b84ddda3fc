//! A rollout's progress (`ibgu-hub.md` sections 2 to 4): given the stored state of an IBGU,
//! the fleet's labels and last reported IBUs, and the time, decide what changes: steps and
//! batches started or ended, clusters moved through their actions, labels to write, stage
//! pushes to send, history events, and the derived status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use fleet_types::ibgu::{
    Action, ActionMessage, ClusterLabelSelector, ClusterState, ImageBasedGroupUpgradeSpec,
    ImageBasedGroupUpgradeStatus, LabelSelectorRequirement, SelectorOperator, StepSummary,
};
use fleet_types::ibu::{
    Condition, ConditionStatus, ImageBasedUpgrade, Stage, condition_type as ct, reason,
};
use fleet_types::labels::{completed_label, failed_label, is_ibgu_label};
use serde::{Deserialize, Serialize};

use super::selector;

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
    /// The spoke refused the last push (422): the action fails with this message.
    pub refused: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub action_started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
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
            refused: None,
            started_at: None,
            action_started_at: None,
            finished_at: None,
        }
    }
}

/// A started plan step: its frozen selection and where its batches are.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StepState {
    pub step: usize,
    pub actions: Vec<Action>,
    /// Selected clusters, in name order, frozen at the start.
    pub clusters: Vec<String>,
    pub max_concurrency: usize,
    pub timeout_minutes: i64,
    pub started_at: DateTime<Utc>,
    pub current_batch: usize,
    pub batch_started_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub timed_out: bool,
    pub progress: BTreeMap<String, ClusterProgress>,
    /// Progress entries as they were before the planner first changed them since the
    /// journal was last cleared: what to write is found among these, not among all of a
    /// step's clusters (10,000 at fleet scale). Change progress only through
    /// [`StepState::progress_mut`].
    #[serde(skip)]
    pub journal: Journal,
}

/// See [`StepState::head`].
#[derive(Clone, Debug, PartialEq)]
pub struct StepHead {
    pub current_batch: usize,
    pub batch_started_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub timed_out: bool,
}

/// See [`StepState::journal`]. Bookkeeping of one pass, not state: it never makes two steps
/// differ.
#[derive(Clone, Debug, Default)]
pub struct Journal(BTreeMap<String, ClusterProgress>);

impl PartialEq for Journal {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl StepState {
    /// The cluster's progress, to change; the first time since the journal was cleared, the
    /// entry as it was goes into the journal.
    pub fn progress_mut(&mut self, cluster: &str) -> Option<&mut ClusterProgress> {
        if !self.journal.0.contains_key(cluster)
            && let Some(p) = self.progress.get(cluster)
        {
            self.journal.0.insert(cluster.to_string(), p.clone());
        }
        self.progress.get_mut(cluster)
    }

    /// The entries changed since the journal was cleared (one changed and changed back is
    /// not among them).
    pub fn journal_changes(&self) -> Vec<(&String, &ClusterProgress)> {
        self.journal
            .0
            .iter()
            .filter_map(|(c, old)| self.progress.get_key_value(c).filter(|(_, p)| *p != old))
            .collect()
    }

    pub fn clear_journal(&mut self) {
        self.journal.0.clear();
    }

    /// Whether the journal names exactly the entries that differ from `before` (this step
    /// when its journal was cleared), found by comparing every entry: the check, in tests
    /// and debug builds, that all changes to progress go through [`StepState::progress_mut`].
    pub fn journal_matches(&self, before: &StepState) -> bool {
        let journal = self.journal_changes().into_iter().map(|(c, _)| c);
        let compared = self
            .progress
            .iter()
            .filter(|(c, p)| before.progress.get(*c) != Some(*p))
            .map(|(c, _)| c);
        journal.eq(compared)
    }

    /// What of the step is stored apart from its progress, and moves during a rollout.
    pub fn head(&self) -> StepHead {
        StepHead {
            current_batch: self.current_batch,
            batch_started_at: self.batch_started_at,
            completed_at: self.completed_at,
            timed_out: self.timed_out,
        }
    }

    pub fn batch_count(&self) -> usize {
        self.clusters.len().div_ceil(self.max_concurrency.max(1))
    }

    pub fn batch_members(&self, b: usize) -> Vec<String> {
        self.clusters
            .iter()
            .skip(b * self.max_concurrency)
            .take(self.max_concurrency)
            .cloned()
            .collect()
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

    /// When the step as a whole times out.
    pub fn deadline(&self) -> DateTime<Utc> {
        self.started_at + Duration::minutes(self.timeout_minutes)
    }

    /// When the current batch times out: it gets an equal share of what is left of the
    /// step's time among the batches still to run; the last gets all of it.
    pub fn batch_deadline(&self) -> DateTime<Utc> {
        self.batch_started_at
            + batch_timeout(
                self.timeout_minutes,
                self.batch_started_at - self.started_at,
                self.batch_count(),
                self.current_batch,
            )
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
    results: impl IntoIterator<Item = &'a PushResult>,
) {
    for r in results {
        if !awaits_push_result(steps, r) {
            continue;
        }
        let Some(p) = steps
            .get_mut(r.step)
            .and_then(|s| s.progress_mut(&r.cluster))
        else {
            continue;
        };
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
}

/// A push is sent again after this when the spoke still does not show the stage.
pub const PUSH_RESEND: Duration = Duration::seconds(30);
/// Backoff for pushes to a spoke that did not answer.
pub const PUSH_BACKOFF_MAX: Duration = Duration::seconds(60);

pub fn push_backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::zero();
    }
    (Duration::milliseconds(500) * 2i32.pow(failures.min(10) - 1)).min(PUSH_BACKOFF_MAX)
}

/// How an action stands on a spoke.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    Done,
    Failed(String),
    Waiting,
}

fn cond<'a>(ibu: &'a ImageBasedUpgrade, type_: &str) -> Option<&'a Condition> {
    ibu.status.as_ref().and_then(|s| s.condition(type_))
}

/// Whether the spoke shows the action complete or failed (fail fast on an explicit failure).
pub fn check(action: Action, ibu: Option<&ImageBasedUpgrade>) -> Check {
    let Some(ibu) = ibu else {
        return Check::Waiting;
    };
    let stage_pair = match action.spoke_stage() {
        Stage::Prep => Some((ct::PREP_IN_PROGRESS, ct::PREP_COMPLETED)),
        Stage::Upgrade => Some((ct::UPGRADE_IN_PROGRESS, ct::UPGRADE_COMPLETED)),
        Stage::Rollback => Some((ct::ROLLBACK_IN_PROGRESS, ct::ROLLBACK_COMPLETED)),
        Stage::Idle => None,
    };
    match stage_pair {
        Some((in_progress, completed)) => {
            if let Some(c) = cond(ibu, in_progress)
                && c.reason == reason::INVALID_TRANSITION
                && ibu.spec.stage == action.spoke_stage()
            {
                return Check::Failed(c.message.clone());
            }
            match cond(ibu, completed).map(|c| c.status) {
                Some(ConditionStatus::True) => Check::Done,
                Some(ConditionStatus::False) => {
                    let why = cond(ibu, in_progress)
                        .filter(|c| c.status == ConditionStatus::False && !c.message.is_empty())
                        .or_else(|| cond(ibu, completed))
                        .map(|c| c.message.clone())
                        .unwrap_or_default();
                    Check::Failed(why)
                }
                _ => Check::Waiting,
            }
        }
        None => match cond(ibu, ct::IDLE) {
            Some(c) if c.status == ConditionStatus::True => Check::Done,
            Some(c)
                if ibu.spec.stage == Stage::Idle
                    && [
                        reason::ABORT_FAILED,
                        reason::FINALIZE_FAILED,
                        reason::INVALID_TRANSITION,
                    ]
                    .contains(&c.reason.as_str()) =>
            {
                Check::Failed(c.message.clone())
            }
            _ => Check::Waiting,
        },
    }
}

/// The selectors of an item, each augmented by its first action (`ibgu-hub.md` table).
pub fn item_selectors(
    selectors: &[ClusterLabelSelector],
    first: Action,
) -> Vec<ClusterLabelSelector> {
    let with = |s: &ClusterLabelSelector, key: String, op| {
        let mut s = s.clone();
        s.match_expressions.push(LabelSelectorRequirement {
            key,
            operator: op,
            values: vec![],
        });
        s
    };
    selectors
        .iter()
        .flat_map(|s| match first {
            Action::Prep => vec![s.clone()],
            Action::Upgrade => vec![with(
                s,
                completed_label(Action::Prep),
                SelectorOperator::Exists,
            )],
            Action::Rollback | Action::FinalizeUpgrade => {
                vec![with(
                    s,
                    completed_label(Action::Upgrade),
                    SelectorOperator::Exists,
                )]
            }
            Action::FinalizeRollback => {
                vec![with(
                    s,
                    completed_label(Action::Rollback),
                    SelectorOperator::Exists,
                )]
            }
            Action::Abort => vec![with(
                s,
                completed_label(Action::Upgrade),
                SelectorOperator::DoesNotExist,
            )],
            Action::AbortOnFailure => vec![
                with(s, failed_label(Action::Prep), SelectorOperator::Exists),
                with(s, failed_label(Action::Upgrade), SelectorOperator::Exists),
            ],
        })
        .collect()
}

/// The clusters an item selects, in name order.
pub fn select(
    selectors: &[ClusterLabelSelector],
    first: Action,
    clusters: &BTreeMap<String, ClusterInfo>,
) -> Vec<String> {
    let sels = item_selectors(selectors, first);
    clusters
        .iter()
        .filter(|(_, c)| sels.iter().any(|s| selector::matches(s, &c.labels)))
        .map(|(n, _)| n.clone())
        .collect()
}

struct Pass<'a> {
    spec: &'a ImageBasedGroupUpgradeSpec,
    now: DateTime<Utc>,
    clusters: BTreeMap<String, ClusterInfo>,
    changes: BTreeMap<String, LabelChange>,
    events: Vec<Event>,
    pushes: Vec<Push>,
    wake: Option<DateTime<Utc>>,
    /// `clusters` holds the whole fleet (else only the clusters the pass is expected to
    /// touch, and `needs_fleet` says when it needed more).
    complete: bool,
    needs_fleet: bool,
    /// See [`Decision::reported`].
    reported: Vec<String>,
}

impl Pass<'_> {
    fn event(
        &mut self,
        cluster: Option<&str>,
        step: usize,
        action: Option<Action>,
        event: &'static str,
        message: String,
    ) {
        self.events.push(Event {
            cluster: cluster.map(str::to_string),
            step: Some(step),
            action,
            event,
            message,
            took: None,
        });
    }

    /// Records the end of a cluster's action that started at `started`.
    fn action_ended(
        &mut self,
        cluster: &str,
        step: usize,
        action: Action,
        event: &'static str,
        message: String,
        started: Option<DateTime<Utc>>,
    ) {
        self.event(Some(cluster), step, Some(action), event, message);
        if let (Some(e), Some(t)) = (self.events.last_mut(), started) {
            e.took = Some((self.now - t).num_milliseconds().max(0) as f64 / 1000.0);
        }
    }

    fn wake_at(&mut self, t: DateTime<Utc>) {
        self.wake = Some(self.wake.map_or(t, |w| w.min(t)));
    }

    fn label(&mut self, cluster: &str, action: Action, ok: bool) {
        let Some(info) = self.clusters.get_mut(cluster) else {
            self.needs_fleet |= !self.complete;
            return;
        };
        let change = self.changes.entry(cluster.to_string()).or_default();
        let clears = matches!(
            action,
            Action::Abort
                | Action::AbortOnFailure
                | Action::FinalizeUpgrade
                | Action::FinalizeRollback
        );
        if ok && clears {
            let ours: Vec<String> = info
                .labels
                .keys()
                .filter(|k| is_ibgu_label(k))
                .cloned()
                .collect();
            for k in ours {
                info.labels.remove(&k);
                change.add.remove(&k);
                change.remove.insert(k);
            }
            return;
        }
        let key = if ok {
            if !matches!(action, Action::Prep | Action::Upgrade | Action::Rollback) {
                return;
            }
            completed_label(action)
        } else {
            failed_label(action)
        };
        // Existing labels are never overwritten.
        if !info.labels.contains_key(&key) {
            info.labels.insert(key.clone(), String::new());
            change.remove.remove(&key);
            change.add.insert(key);
        }
    }

    /// Records the failure of the cluster's current action.
    fn fail(
        &mut self,
        step: &mut StepState,
        cluster: &str,
        message: String,
        timed_out: bool,
        event: &'static str,
    ) {
        let Some(index) = step.progress.get(cluster).map(|p| p.action_index) else {
            return;
        };
        let action = step.actions[index.min(step.actions.len() - 1)];
        let p = step.progress_mut(cluster).expect("present");
        p.failed = Some((action, message.clone()));
        p.phase = ClusterPhase::Failed;
        p.timed_out = timed_out;
        p.finished_at = Some(self.now);
        let started = p.action_started_at;
        let n = step.step;
        self.label(cluster, action, false);
        self.action_ended(cluster, n, action, event, message, started);
    }

    fn start_cluster(&mut self, step: &mut StepState, cluster: &str) {
        let now = self.now;
        if let Some(p) = step.progress_mut(cluster)
            && p.phase == ClusterPhase::Pending
        {
            p.phase = ClusterPhase::Running;
            p.started_at = Some(now);
            p.action_started_at = Some(now);
            let action = step.actions[0];
            let n = step.step;
            self.event(
                Some(cluster),
                n,
                Some(action),
                "ActionStarted",
                format!("{action} started"),
            );
        }
    }

    /// Moves one running cluster as far as its spoke's state allows.
    fn drive_cluster(&mut self, step: &mut StepState, cluster: &str) {
        loop {
            let Some(p) = step.progress.get(cluster) else {
                return;
            };
            if p.phase != ClusterPhase::Running {
                return;
            }
            let action = step.actions[p.action_index];
            if let Some(msg) = p.refused.clone() {
                self.fail(step, cluster, msg, false, "ActionFailed");
                return;
            }
            let ibu = self.clusters.get(cluster).and_then(|c| c.ibu.as_deref());
            let verdict = if p.pushed_stage == Some(action.spoke_stage())
                || ibu.is_some_and(|i| i.spec.stage == action.spoke_stage())
                || action.spoke_stage() == Stage::Idle
            {
                check(action, ibu)
            } else {
                // Not asked yet: only an action already complete counts (TALM selects by
                // what the spoke shows), never a stale failure of an earlier request.
                match check(action, ibu) {
                    Check::Done => Check::Done,
                    _ => Check::Waiting,
                }
            };
            if matches!(verdict, Check::Done | Check::Failed(_))
                && self.reported.last().map(String::as_str) != Some(cluster)
            {
                self.reported.push(cluster.to_string());
            }
            match verdict {
                Check::Done => {
                    let now = self.now;
                    let n = step.step;
                    let actions = step.actions.len();
                    let p = step.progress_mut(cluster).expect("present");
                    p.completed.push(action);
                    p.action_index += 1;
                    p.refused = None;
                    p.push_failures = 0;
                    // The next action starts with no push made for it.
                    p.pushed_stage = None;
                    p.pushed_at = None;
                    let started = p.action_started_at.replace(now);
                    let last = p.action_index == actions;
                    if last {
                        p.phase = ClusterPhase::Completed;
                        p.finished_at = Some(now);
                    }
                    self.label(cluster, action, true);
                    self.action_ended(
                        cluster,
                        n,
                        action,
                        "ActionCompleted",
                        format!("{action} completed"),
                        started,
                    );
                    if last {
                        return;
                    }
                    let next = step.actions[step.progress[cluster].action_index];
                    self.event(
                        Some(cluster),
                        n,
                        Some(next),
                        "ActionStarted",
                        format!("{next} started"),
                    );
                }
                Check::Failed(msg) => {
                    self.fail(step, cluster, msg, false, "ActionFailed");
                    return;
                }
                Check::Waiting => {
                    self.maybe_push(step, cluster, action, ibu.map(|i| i.spec.stage));
                    return;
                }
            }
        }
    }

    fn maybe_push(
        &mut self,
        step: &mut StepState,
        cluster: &str,
        action: Action,
        spoke_stage: Option<Stage>,
    ) {
        let stage = action.spoke_stage();
        let p = step.progress.get(cluster).expect("present");
        let shown = spoke_stage == Some(stage);
        let due = match p.pushed_at {
            None => true,
            Some(at) if p.push_failures > 0 => self.now >= at + push_backoff(p.push_failures),
            Some(at) => !shown && (p.pushed_stage != Some(stage) || self.now >= at + PUSH_RESEND),
        };
        if shown && p.pushed_stage == Some(stage) {
            return;
        }
        if due {
            let cause = match (p.pushed_at, p.action_index) {
                (None, 1..) => PushCause::OwnReport,
                (None, 0) if !self.reported.is_empty() => PushCause::Reports,
                _ => PushCause::Other,
            };
            self.pushes.push(Push {
                cluster: cluster.to_string(),
                step: step.step,
                action,
                stage,
                cause,
                action_index: p.action_index,
            });
        } else if let Some(at) = p.pushed_at {
            let next = if p.push_failures > 0 {
                at + push_backoff(p.push_failures)
            } else {
                at + PUSH_RESEND
            };
            self.wake_at(next);
        }
    }

    fn start_batch(&mut self, step: &mut StepState, b: usize) {
        step.current_batch = b;
        step.batch_started_at = self.now;
        let members = step.batch_members(b);
        let n = step.step;
        self.event(
            None,
            n,
            None,
            "BatchStarted",
            format!(
                "batch {} of {} started: {}",
                b + 1,
                step.batch_count(),
                members.join(", ")
            ),
        );
        for c in &members {
            self.start_cluster(step, c);
        }
    }

    fn start_step(&mut self, n: usize) -> StepState {
        let item = &self.spec.plan[n];
        let clusters = select(
            &self.spec.cluster_label_selectors,
            item.actions[0],
            &self.clusters,
        );
        let max = item.rollout_strategy.max_concurrency.max(1) as usize;
        let progress = clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), ClusterProgress::pending(i / max)))
            .collect();
        let mut step = StepState {
            step: n,
            actions: item.actions.clone(),
            clusters,
            max_concurrency: max,
            timeout_minutes: item.rollout_strategy.timeout_minutes(),
            started_at: self.now,
            current_batch: 0,
            batch_started_at: self.now,
            completed_at: None,
            timed_out: false,
            progress,
            journal: Journal::default(),
        };
        let names: Vec<&str> = step.actions.iter().map(|a| a.as_str()).collect();
        self.event(
            None,
            n,
            None,
            "StepStarted",
            format!(
                "plan step {n} [{}] started: {} cluster(s) in {} batch(es)",
                names.join(", "),
                step.clusters.len(),
                step.batch_count()
            ),
        );
        if step.clusters.is_empty() {
            step.completed_at = Some(self.now);
            self.event(
                None,
                n,
                None,
                "StepCompleted",
                format!("plan step {n} selected no cluster"),
            );
        } else {
            self.start_batch(&mut step, 0);
        }
        step
    }

    /// Drives the current batch; moves to later batches as they finish or time out.
    fn drive_step(&mut self, step: &mut StepState) {
        loop {
            if step.completed_at.is_some() {
                return;
            }
            let members = step.batch_members(step.current_batch);
            for c in &members {
                self.drive_cluster(step, c);
            }
            let unfinished: Vec<String> = members
                .iter()
                .filter(|c| step.progress[*c].phase == ClusterPhase::Running)
                .cloned()
                .collect();
            let n = step.step;
            if self.now >= step.deadline() {
                for c in &unfinished {
                    let action = step.actions[step.progress[c].action_index];
                    self.fail(
                        step,
                        c,
                        format!(
                            "{action} timed out: the plan step's timeout of {} minutes passed",
                            step.timeout_minutes
                        ),
                        true,
                        "ActionTimedOut",
                    );
                }
                for b in step.current_batch + 1..step.batch_count() {
                    for c in step.batch_members(b) {
                        let p = step.progress_mut(&c).expect("present");
                        p.phase = ClusterPhase::Running;
                        self.fail(
                            step,
                            &c,
                            "not started before the step timeout".into(),
                            true,
                            "ClusterNotStarted",
                        );
                    }
                }
                step.timed_out = true;
                step.completed_at = Some(self.now);
                self.event(
                    None,
                    n,
                    None,
                    "StepTimedOut",
                    format!(
                        "plan step {n} timed out after {} minutes",
                        step.timeout_minutes
                    ),
                );
                return;
            }
            if !unfinished.is_empty() && self.now >= step.batch_deadline() {
                let b = step.current_batch + 1;
                for c in &unfinished {
                    let action = step.actions[step.progress[c].action_index];
                    self.fail(
                        step,
                        c,
                        format!("{action} timed out: batch {b} timeout passed"),
                        true,
                        "ActionTimedOut",
                    );
                }
                self.event(
                    None,
                    n,
                    None,
                    "BatchTimedOut",
                    format!("batch {b} of {} timed out", step.batch_count()),
                );
            } else if !unfinished.is_empty() {
                self.wake_at(step.batch_deadline());
                return;
            }
            let next = step.current_batch + 1;
            if next >= step.batch_count() {
                step.completed_at = Some(self.now);
                let failed = step
                    .progress
                    .values()
                    .filter(|p| p.phase == ClusterPhase::Failed)
                    .count();
                self.event(
                    None,
                    n,
                    None,
                    "StepCompleted",
                    format!(
                        "plan step {n} completed: {} cluster(s), {failed} failed",
                        step.clusters.len()
                    ),
                );
                return;
            }
            self.start_batch(step, next);
        }
    }
}

/// One planning pass over a rollout.
pub fn advance(
    spec: &ImageBasedGroupUpgradeSpec,
    steps: &[StepState],
    clusters: &BTreeMap<String, ClusterInfo>,
    started_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Decision {
    advance_with(
        spec,
        steps.to_vec(),
        clusters.clone(),
        true,
        started_at,
        now,
    )
}

/// [`advance`] given only part of the fleet (`complete` false): the clusters of the running
/// batch, say. When the pass needs more (a plan step to select for, a label to set on a
/// cluster it was not given), the decision says `needs_fleet` and must not be used: pass
/// again with the whole fleet.
pub fn advance_with(
    spec: &ImageBasedGroupUpgradeSpec,
    mut steps: Vec<StepState>,
    clusters: BTreeMap<String, ClusterInfo>,
    complete: bool,
    started_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Decision {
    let mut pass = Pass {
        spec,
        now,
        clusters,
        changes: BTreeMap::new(),
        events: vec![],
        pushes: vec![],
        wake: None,
        complete,
        needs_fleet: false,
        reported: vec![],
    };
    loop {
        if let Some(last) = steps.last_mut()
            && last.completed_at.is_none()
        {
            pass.drive_step(last);
            if last.completed_at.is_none() {
                break;
            }
            continue;
        }
        let n = steps.len();
        if n >= spec.plan.len() {
            break;
        }
        if !pass.complete {
            // Selecting for a step takes every cluster's labels.
            pass.needs_fleet = true;
            break;
        }
        let step = pass.start_step(n);
        steps.push(step);
    }
    let done = steps.len() == spec.plan.len() && steps.iter().all(|s| s.completed_at.is_some());
    let started_at = started_at.or_else(|| steps.first().map(|s| s.started_at));
    let completed_at = if done {
        steps.iter().filter_map(|s| s.completed_at).max()
    } else {
        None
    };
    let phase = if done {
        Phase::Completed
    } else if steps.is_empty() {
        Phase::Pending
    } else {
        Phase::Progressing
    };
    Decision {
        steps,
        label_changes: pass
            .changes
            .into_iter()
            .filter(|(_, c)| !c.add.is_empty() || !c.remove.is_empty())
            .collect(),
        pushes: pass.pushes,
        events: pass.events,
        phase,
        started_at,
        completed_at,
        wake_at: pass.wake,
        needs_fleet: pass.needs_fleet,
        reported: pass.reported,
    }
}

/// The IBGU status for these steps (`ibgu-hub.md` section 4, with the improvements).
pub fn status(
    generation: i64,
    steps: &[StepState],
    plan_len: usize,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    transition_time: DateTime<Utc>,
) -> ImageBasedGroupUpgradeStatus {
    ImageBasedGroupUpgradeStatus {
        clusters: cluster_states(steps),
        ..status_without_clusters(
            generation,
            steps,
            plan_len,
            started_at,
            completed_at,
            transition_time,
        )
    }
}

/// `status.clusters`: every cluster a step started, with its completed and failed actions
/// and the action it is on.
pub fn cluster_states(steps: &[StepState]) -> Vec<ClusterState> {
    let mut clusters: BTreeMap<String, ClusterState> = BTreeMap::new();
    for step in steps {
        for (name, p) in &step.progress {
            if p.phase == ClusterPhase::Pending {
                continue;
            }
            let entry = clusters
                .entry(name.clone())
                .or_insert_with(|| ClusterState {
                    name: name.clone(),
                    ..Default::default()
                });
            entry
                .completed_actions
                .extend(p.completed.iter().map(|a| ActionMessage {
                    action: *a,
                    message: String::new(),
                }));
            if let Some((a, m)) = &p.failed {
                entry.failed_actions.push(ActionMessage {
                    action: *a,
                    message: m.clone(),
                });
            }
            entry.current_action = (p.phase == ClusterPhase::Running).then(|| ActionMessage {
                action: step.actions[p.action_index],
                message: String::new(),
            });
        }
    }
    let mut out: Vec<ClusterState> = clusters.into_values().collect();
    out.sort_by(|a, b| fleet_types::names::natural_cmp(&a.name, &b.name));
    out
}

/// The status without `clusters`: what the engine stores on every pass (the per-cluster
/// part, the largest at fleet scale, is derived from the progress rows when read).
pub fn status_without_clusters(
    generation: i64,
    steps: &[StepState],
    plan_len: usize,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    transition_time: DateTime<Utc>,
) -> ImageBasedGroupUpgradeStatus {
    let done = completed_at.is_some();
    let running = steps
        .iter()
        .position(|s| s.completed_at.is_none())
        .unwrap_or(steps.len().min(plan_len.saturating_sub(1)));
    let mut conditions = vec![Condition {
        type_: "Progressing".into(),
        status: if done {
            ConditionStatus::False
        } else {
            ConditionStatus::True
        },
        reason: if done { "Completed" } else { "InProgress" }.into(),
        message: if done {
            "All plan steps are completed".into()
        } else {
            format!("Waiting for plan step {running} to be completed")
        },
        last_transition_time: Some(transition_time),
        observed_generation: Some(generation),
    }];
    if done {
        let mut started = BTreeSet::new();
        let mut failing = BTreeSet::new();
        for step in steps {
            for (name, p) in &step.progress {
                if p.phase != ClusterPhase::Pending {
                    started.insert(name.as_str());
                }
                if p.failed.is_some() {
                    failing.insert(name.as_str());
                }
            }
        }
        let (failed, total) = (failing.len(), started.len());
        conditions.push(Condition {
            type_: "Succeeded".into(),
            status: if failed == 0 {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            reason: if failed == 0 { "Completed" } else { "Failed" }.into(),
            message: if failed == 0 {
                format!("All {total} cluster(s) completed the plan")
            } else {
                format!("{failed} of {total} cluster(s) failed an action")
            },
            last_transition_time: Some(transition_time),
            observed_generation: Some(generation),
        });
    }
    let summary = steps
        .iter()
        .map(|s| {
            // One walk over the step's clusters (every pass, thousands of them).
            let mut sum = StepSummary {
                step: s.step as u32,
                actions: s.actions.clone(),
                selected: s.clusters.len() as u32,
                completed: 0,
                failed: 0,
                timed_out: 0,
                in_progress: 0,
                pending: 0,
            };
            for p in s.progress.values() {
                *match p.phase {
                    ClusterPhase::Completed => &mut sum.completed,
                    ClusterPhase::Failed if p.timed_out => &mut sum.timed_out,
                    ClusterPhase::Failed => &mut sum.failed,
                    ClusterPhase::Running => &mut sum.in_progress,
                    ClusterPhase::Pending => &mut sum.pending,
                } += 1;
            }
            sum
        })
        .collect();
    ImageBasedGroupUpgradeStatus {
        observed_generation: Some(generation),
        started_at,
        completed_at,
        conditions,
        clusters: vec![],
        summary,
    }
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
