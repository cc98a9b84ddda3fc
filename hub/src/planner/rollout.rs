//! A rollout's progress (`ibgu-hub.md` sections 2 to 4): given the stored state of an IBGU,
//! the fleet's labels and last reported IBUs, and the time, decide what changes: steps and
//! batches started or ended, clusters moved through their actions, labels to write, stage
//! pushes to send, history events, and the derived status.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use fleet_types::ibgu::{
    Action, ClusterLabelSelector, ImageBasedGroupUpgradeSpec, LabelSelectorRequirement,
    SelectorOperator,
};
use fleet_types::ibu::Stage;
use fleet_types::labels::{completed_label, failed_label, is_ibgu_label};

pub use super::check::*;
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
        self.label(cluster, action, false);
        self.action_ended(cluster, n, action, event, message, started);
    }

    fn start_cluster(&mut self, step: &mut StepState, cluster: &str) {
        let now = self.now;
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
                        let p = self.touched.progress_mut(step, &c).expect("present");
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
        &[],
        clusters.clone(),
        true,
        started_at,
        now,
    )
}

/// [`advance`] given only part of the fleet (`complete` false): the clusters of the running
/// batch, say. When the pass needs more (a plan step to select for, a label to set on a
/// cluster it was not given), the decision says `needs_fleet` and must not be used: pass
/// again with the whole fleet. `results` are the push outcomes to record first.
pub fn advance_with(
    spec: &ImageBasedGroupUpgradeSpec,
    mut steps: Vec<StepState>,
    results: &[&PushResult],
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
    let mut changed = pass.touched.changed(&steps);
    for started in steps.iter().skip(given) {
        changed.insert(started.step, started.progress.keys().cloned().collect());
    }
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
        changed,
        awaiting_answers: pass.awaiting_answers,
    }
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
