//! A rollout's progress (`ibgu-hub.md` sections 2 to 4): given the stored state of an IBGU,
//! the fleet's labels and last reported IBUs, and the time, decide what changes: steps and
//! batches started or ended, clusters moved through their actions, labels to write, stage
//! pushes to send, history events, and the derived status.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use fleet_types::ibgu::{
    Action, ClusterLabelSelector, ImageBasedGroupUpgradeSpec, LabelSelectorRequirement,
    RolloutStrategy, SelectorOperator,
};
use fleet_types::ibu::Stage;
use fleet_types::labels::{completed_label, failed_label, is_ibgu_label};

pub use super::check::*;
use super::controls::{self, WindowState};
use super::selector;
pub use super::state::*;
pub use super::status::*;

/// A push is sent again after this when the spoke still does not show the stage; a push
/// whose outcome no pass recorded (the hub that sent it stopped) is taken over after it too.
pub const PUSH_RESEND: Duration = Duration::seconds(30);
/// Backoff for pushes to a spoke that did not answer.
pub const PUSH_BACKOFF_MAX: Duration = Duration::seconds(60);

pub fn push_backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::zero();
    }
    (Duration::milliseconds(500) * 2i32.pow(failures.min(10) - 1)).min(PUSH_BACKOFF_MAX)
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

/// How long `maxStartsPerMinute` counts starts.
pub const START_RATE_WINDOW: Duration = Duration::seconds(60);

/// Whether the item's controls shape its batches (else they are TALM's chunks).
pub fn shaped(strategy: &RolloutStrategy) -> bool {
    strategy.canary_clusters.is_some_and(|n| n > 0)
        || strategy.batch_growth_factor.is_some_and(|f| f > 1.0)
        || strategy.disruption_budget.is_some()
}

/// A step's selection (in name order) laid out batch after batch, and where each batch
/// ends; no ends when the item's batches are TALM's chunks of `maxConcurrency`.
pub fn shape(
    selected: &[String],
    fleet: &BTreeMap<String, ClusterInfo>,
    strategy: &RolloutStrategy,
) -> (Vec<String>, Vec<usize>) {
    if !shaped(strategy) {
        return (selected.to_vec(), vec![]);
    }
    let batches = controls::batches(selected, |c| fleet.get(c).map(|i| &i.labels), strategy);
    let mut ends = Vec::with_capacity(batches.len());
    let mut order = Vec::with_capacity(selected.len());
    for b in batches {
        order.extend(b);
        ends.push(order.len());
    }
    (order, ends)
}

struct Pass<'a> {
    spec: &'a ImageBasedGroupUpgradeSpec,
    now: DateTime<Utc>,
    /// The maintenance window at `now`, when the spec has one.
    window: Option<WindowState>,
    /// What held starts back in this pass (the first reason met), and before it.
    waiting: Option<Wait>,
    waiting_before: Option<Wait>,
    /// A cluster failed in this pass: the failure budget is to be checked.
    failed: bool,
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
    /// See [`Decision::awaiting_answers`].
    awaiting_answers: Vec<String>,
    touched: Touched,
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
        let p = self.touched.progress_mut(step, cluster).expect("present");
        p.failed = Some((action, message.clone()));
        p.phase = ClusterPhase::Failed;
        p.timed_out = timed_out;
        p.finished_at = Some(self.now);
        let started = p.action_started_at;
        let n = step.step;
        self.failed = true;
        self.label(cluster, action, false);
        self.action_ended(cluster, n, action, event, message, started);
    }

    /// What holds every start back now: the pause, then the maintenance window.
    fn held_back(&mut self) -> Option<Wait> {
        let wait = if self.spec.paused {
            Wait::Paused
        } else {
            let w = self.window.filter(|w| !w.open)?;
            self.wake_at(w.next_open);
            Wait::Window
        };
        self.hold(wait);
        Some(wait)
    }

    /// Notes what held a start back (the first reason of the pass is the one shown).
    fn hold(&mut self, wait: Wait) {
        if self.waiting.is_none() {
            self.waiting = Some(wait);
        }
    }

    /// Whether `maxStartsPerMinute` leaves room for one more first action now; when not,
    /// wakes when the oldest start of the minute leaves it.
    fn start_allowed(&mut self, step: &mut StepState) -> bool {
        let Some(limit) = self.spec.plan[step.step]
            .rollout_strategy
            .max_starts_per_minute
            .filter(|n| *n >= 1)
        else {
            return true;
        };
        let since = self.now - START_RATE_WINDOW;
        step.recent_starts.retain(|t| *t > since);
        if (step.recent_starts.len() as i64) < limit {
            return true;
        }
        let oldest = step.recent_starts.iter().min().copied().unwrap_or(self.now);
        self.wake_at(oldest + START_RATE_WINDOW);
        self.hold(Wait::Rate);
        false
    }

    /// Starts a pending cluster on the item's first action, unless something holds starts
    /// back: answers whether it started (or was no longer pending).
    fn start_cluster(&mut self, step: &mut StepState, cluster: &str) -> bool {
        let now = self.now;
        if step
            .progress
            .get(cluster)
            .is_none_or(|p| p.phase != ClusterPhase::Pending)
        {
            return true;
        }
        if self.held_back().is_some() || !self.start_allowed(step) {
            return false;
        }
        if self.spec.plan[step.step]
            .rollout_strategy
            .max_starts_per_minute
            .is_some()
        {
            step.recent_starts.push(now);
        }
        if let Some(p) = self.touched.progress_mut(step, cluster)
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
        true
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
            if p.resetting {
                if !self.drive_reset(step, cluster) {
                    return;
                }
                continue;
            }
            if let Some(msg) = p.refused.clone() {
                if self.retry(step, cluster, action, &msg) {
                    continue;
                }
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
                    let p = self.touched.progress_mut(step, cluster).expect("present");
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
                    if self.retry(step, cluster, action, &msg) {
                        continue;
                    }
                    self.fail(step, cluster, msg, false, "ActionFailed");
                    return;
                }
                Check::Waiting => {
                    let stage = ibu.map(|i| i.spec.stage);
                    // A push that begins an action is a start: held back like the others.
                    let begins = step.progress[cluster].pushed_at.is_none();
                    if begins && self.held_back().is_some() {
                        return;
                    }
                    self.maybe_push(step, cluster, action, stage);
                    return;
                }
            }
        }
    }

    /// A failed `Prep` with retries left (`rolloutStrategy.retries`): the cluster is moved
    /// to Idle and prepared again. Answers whether it is.
    fn retry(&mut self, step: &mut StepState, cluster: &str, action: Action, why: &str) -> bool {
        let allowed = self.spec.plan[step.step]
            .rollout_strategy
            .retries
            .unwrap_or(0)
            .clamp(0, 5) as u32;
        let p = &step.progress[cluster];
        if action != Action::Prep || p.retries >= allowed {
            return false;
        }
        let attempt = p.retries + 2;
        let n = step.step;
        let p = self.touched.progress_mut(step, cluster).expect("present");
        p.retries += 1;
        p.resetting = true;
        p.refused = None;
        p.pushed_stage = None;
        p.pushed_at = None;
        p.push_failures = 0;
        self.event(
            Some(cluster),
            n,
            Some(action),
            "ActionRetried",
            format!(
                "Prep failed ({why}): aborting, then attempt {attempt} of {}",
                allowed + 1
            ),
        );
        true
    }

    /// Moves a cluster whose `Prep` is retried back to Idle; answers whether it is there
    /// (its `Prep` is then pushed again, as a new start).
    fn drive_reset(&mut self, step: &mut StepState, cluster: &str) -> bool {
        let p = &step.progress[cluster];
        let ibu = self.clusters.get(cluster).and_then(|c| c.ibu.as_deref());
        let refused = p.refused.clone();
        let verdict = match refused {
            Some(why) => Check::Failed(why),
            None => check(Action::Abort, ibu),
        };
        match verdict {
            Check::Done => {
                let p = self.touched.progress_mut(step, cluster).expect("present");
                p.resetting = false;
                p.pushed_stage = None;
                p.pushed_at = None;
                p.push_failures = 0;
                p.action_started_at = Some(self.now);
                true
            }
            Check::Failed(why) => {
                let p = self.touched.progress_mut(step, cluster).expect("present");
                p.resetting = false;
                p.refused = None;
                let msg = format!("Prep failed and its abort before a retry failed: {why}");
                self.fail(step, cluster, msg, false, "ActionFailed");
                false
            }
            Check::Waiting => {
                let stage = ibu.map(|i| i.spec.stage);
                self.maybe_push(step, cluster, Action::Abort, stage);
                false
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
        if due
            && let Some(since) = p.push_in_flight
            && self.now < since + PUSH_RESEND
        {
            // One push at a time to a spoke, across hubs: its outcome triggers a pass on the
            // hub that sent it; this wakes another once the claim has lapsed.
            self.awaiting_answers.push(cluster.to_string());
            self.wake_at(since + PUSH_RESEND);
        } else if due {
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
            let now = self.now;
            let p = self.touched.progress_mut(step, cluster).expect("present");
            p.push_in_flight = Some(now);
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
        step.batch_paused_ms = 0;
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
            if !self.start_cluster(step, c) {
                break;
            }
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
        let (clusters, batch_ends) = shape(&clusters, &self.clusters, &item.rollout_strategy);
        let mut progress = BTreeMap::new();
        let mut b = 0;
        for (i, c) in clusters.iter().enumerate() {
            let batch = if batch_ends.is_empty() {
                i / max
            } else {
                while batch_ends[b] <= i {
                    b += 1;
                }
                b
            };
            progress.insert(c.clone(), ClusterProgress::pending(batch));
        }
        let mut step = StepState {
            step: n,
            actions: item.actions.clone(),
            clusters,
            batch_ends,
            max_concurrency: max,
            timeout_minutes: item.rollout_strategy.timeout_minutes(),
            started_at: self.now,
            current_batch: 0,
            batch_started_at: self.now,
            completed_at: None,
            timed_out: false,
            progress,
            halt: None,
            paused_since: None,
            paused_ms: 0,
            batch_paused_ms: 0,
            recent_starts: vec![],
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

    /// Keeps the step's pause in step with `spec.paused`: a pause starts its clock, an end
    /// of pause adds what it lasted to the deadlines.
    fn sync_pause(&mut self, step: &mut StepState) {
        match (self.spec.paused, step.paused_since) {
            (true, None) => step.paused_since = Some(self.now),
            (false, Some(since)) => {
                let ms = (self.now - since).num_milliseconds().max(0);
                step.paused_ms += ms;
                step.batch_paused_ms += ms;
                step.paused_since = None;
            }
            _ => {}
        }
    }

    /// Halts the item when its failures went above `maxFailures` (`ibgu-hub.md` section 5).
    fn check_failure_budget(&mut self, step: &mut StepState) {
        if step.halt.is_some() {
            return;
        }
        let Some(max) = &self.spec.plan[step.step].rollout_strategy.max_failures else {
            return;
        };
        let Some(allowed) = max.of(step.clusters.len()) else {
            return;
        };
        // Clusters the step timeout failed before they started are not action failures.
        let failed = step
            .progress
            .values()
            .filter(|p| p.phase == ClusterPhase::Failed && p.started_at.is_some())
            .count();
        if failed > allowed {
            let n = step.step;
            let message =
                format!("plan step {n}: {failed} cluster(s) failed, more than maxFailures {max}");
            self.halt(step, FAILURE_BUDGET_EXCEEDED, message);
        }
    }

    /// The canary batch has ended: the item goes on only if every canary completed.
    fn check_canaries(&mut self, step: &mut StepState) {
        let canaries = self.spec.plan[step.step]
            .rollout_strategy
            .canary_clusters
            .unwrap_or(0);
        if step.halt.is_some() || step.current_batch != 0 || canaries <= 0 {
            return;
        }
        let failed = step.batch_members(0).into_iter().find_map(|c| {
            let p = &step.progress[&c];
            match (&p.phase, &p.failed) {
                (ClusterPhase::Failed, Some((a, _))) => Some((c, *a)),
                _ => None,
            }
        });
        if let Some((cluster, action)) = failed {
            let n = step.step;
            let message = format!("plan step {n}: canary {cluster} failed {action}");
            self.halt(step, CANARY_FAILED, message);
        }
    }

    /// Records a cluster a timeout caught before it started.
    fn not_started(&mut self, step: &mut StepState, cluster: &str, message: String) {
        if let Some(p) = self.touched.progress_mut(step, cluster) {
            p.phase = ClusterPhase::Running;
        }
        self.fail(step, cluster, message, true, "ClusterNotStarted");
    }

    fn halt(&mut self, step: &mut StepState, reason: &str, message: String) {
        let n = step.step;
        self.event(None, n, None, "RolloutHalted", message.clone());
        step.halt = Some(Halt {
            reason: reason.to_string(),
            message,
        });
    }

    /// Drives the current batch; moves to later batches as they finish or time out.
    fn drive_step(&mut self, step: &mut StepState) {
        self.sync_pause(step);
        loop {
            if step.completed_at.is_some() {
                return;
            }
            let members = step.batch_members(step.current_batch);
            // Members a start rate, the pause or the window held back start when they may.
            if step.halt.is_none() {
                for c in &members {
                    if !self.start_cluster(step, c) {
                        break;
                    }
                }
            }
            self.failed = false;
            for c in &members {
                self.drive_cluster(step, c);
            }
            if self.failed {
                self.check_failure_budget(step);
            }
            let halted = step.halt.is_some();
            let unfinished: Vec<String> = members
                .iter()
                .filter(|c| match step.progress[*c].phase {
                    ClusterPhase::Running => true,
                    ClusterPhase::Pending => !halted,
                    _ => false,
                })
                .cloned()
                .collect();
            let n = step.step;
            let paused = step.paused_since.is_some();
            if self.now >= step.deadline(self.now) {
                for c in &unfinished {
                    let p = &step.progress[c];
                    if p.phase == ClusterPhase::Pending {
                        self.not_started(step, c, "not started before the step timeout".into());
                        continue;
                    }
                    let action = step.actions[p.action_index];
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
                if !halted {
                    for b in step.current_batch + 1..step.batch_count() {
                        for c in step.batch_members(b) {
                            self.not_started(
                                step,
                                &c,
                                "not started before the step timeout".into(),
                            );
                        }
                    }
                }
                self.check_failure_budget(step);
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
            if !unfinished.is_empty() && self.now >= step.batch_deadline(self.now) {
                let b = step.current_batch + 1;
                for c in &unfinished {
                    let p = &step.progress[c];
                    if p.phase == ClusterPhase::Pending {
                        self.not_started(
                            step,
                            c,
                            format!("not started before batch {b} timed out"),
                        );
                        continue;
                    }
                    let action = step.actions[p.action_index];
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
                self.check_failure_budget(step);
            } else if !unfinished.is_empty() {
                if !paused {
                    self.wake_at(step.batch_deadline(self.now));
                }
                return;
            }
            self.check_canaries(step);
            let next = step.current_batch + 1;
            let ended = step.halt.is_some() || next >= step.batch_count();
            if ended {
                step.completed_at = Some(self.now);
                let count = |phase| step.progress.values().filter(|p| p.phase == phase).count();
                let failed = count(ClusterPhase::Failed);
                let (event, message) = match &step.halt {
                    Some(halt) => (
                        "StepHalted",
                        format!(
                            "plan step {n} halted ({}): {failed} cluster(s) failed, {} not started",
                            halt.reason,
                            count(ClusterPhase::Pending)
                        ),
                    ),
                    None => (
                        "StepCompleted",
                        format!(
                            "plan step {n} completed: {} cluster(s), {failed} failed",
                            step.clusters.len()
                        ),
                    ),
                };
                self.event(None, n, None, event, message);
                return;
            }
            if self.held_back().is_some() {
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
        &[],
        clusters.clone(),
        true,
        Before {
            started_at,
            waiting: None,
        },
        now,
    )
}

/// What the rollout's row says of the passes before this one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Before {
    pub started_at: Option<DateTime<Utc>>,
    /// What held starts back after the last pass.
    pub waiting: Option<Wait>,
}

/// [`advance`] given only part of the fleet (`complete` false): the clusters of the running
/// batch, say. When the pass needs more (a plan step to select for, a label to set on a
/// cluster it was not given), the decision says `needs_fleet` and must not be used: pass
/// again with the whole fleet. `results` are the push outcomes to record first.
pub fn advance_with(
    spec: &ImageBasedGroupUpgradeSpec,
    steps: Vec<StepState>,
    results: &[&PushResult],
    clusters: BTreeMap<String, ClusterInfo>,
    complete: bool,
    before: Before,
    now: DateTime<Utc>,
) -> Decision {
    advance_keeping(spec, steps, results, clusters, complete, before, now).0
}

/// [`advance_with`], handing back the clusters it was given, their labels as the decision
/// leaves them.
pub fn advance_keeping(
    spec: &ImageBasedGroupUpgradeSpec,
    mut steps: Vec<StepState>,
    results: &[&PushResult],
    clusters: BTreeMap<String, ClusterInfo>,
    complete: bool,
    before: Before,
    now: DateTime<Utc>,
) -> (Decision, BTreeMap<String, ClusterInfo>) {
    let started_at = before.started_at;
    let mut pass = Pass {
        spec,
        now,
        window: spec
            .maintenance_window
            .as_ref()
            .and_then(|w| controls::window(w, now)),
        waiting: None,
        waiting_before: before.waiting,
        failed: false,
        clusters,
        changes: BTreeMap::new(),
        events: vec![],
        pushes: vec![],
        wake: None,
        complete,
        needs_fleet: false,
        reported: vec![],
        awaiting_answers: vec![],
        touched: Touched::default(),
    };
    apply_push_results(&mut steps, &mut pass.touched, results.iter().copied());
    let given = steps.len();
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
        if n >= spec.plan.len() || steps.iter().any(|s| s.halt.is_some()) {
            // Done, or halted: later items never start.
            break;
        }
        if pass.held_back().is_some() {
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
    let all_ended = steps.iter().all(|s| s.completed_at.is_some());
    let halted = steps.iter().any(|s| s.halt.is_some());
    let done = all_ended && (steps.len() == spec.plan.len() || halted);
    if done {
        pass.waiting = None;
    }
    if pass.waiting == Some(Wait::Window)
        && pass.waiting_before != Some(Wait::Window)
        && let (Some(w), Some(state)) = (&spec.maintenance_window, pass.window)
    {
        let step = steps.iter().position(|s| s.completed_at.is_none());
        pass.events.push(Event {
            cluster: None,
            step: Some(step.unwrap_or(steps.len())),
            action: None,
            event: "WaitingForMaintenanceWindow",
            message: format!(
                "waiting for the maintenance window {} {}: it opens at {}",
                w.start,
                w.time_zone(),
                state.next_open.to_rfc3339()
            ),
            took: None,
        });
    }
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
    let mut changed = pass.touched.changed(&steps);
    for started in steps.iter().skip(given) {
        changed.insert(started.step, started.progress.keys().cloned().collect());
    }
    let decision = Decision {
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
        changed,
        awaiting_answers: pass.awaiting_answers,
        waiting: pass.waiting,
    };
    (decision, pass.clusters)
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
