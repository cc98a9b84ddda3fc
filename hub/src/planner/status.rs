//! The IBGU status derived from the steps (`ibgu-hub.md` section 4, with the improvements):
//! conditions, the per-step summary, each cluster's actions.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use fleet_types::ibgu::{
    ActionMessage, ClusterState, ImageBasedGroupUpgradeSpec, ImageBasedGroupUpgradeStatus,
    StepSummary,
};
use fleet_types::ibu::{Condition, ConditionStatus};

use super::rollout::*;

/// The IBGU status for these steps (`ibgu-hub.md` section 4, with the improvements).
pub fn status(
    generation: i64,
    steps: &[StepState],
    spec: &ImageBasedGroupUpgradeSpec,
    waiting: Option<Wait>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    transition_time: DateTime<Utc>,
) -> ImageBasedGroupUpgradeStatus {
    ImageBasedGroupUpgradeStatus {
        clusters: cluster_states(steps),
        ..status_without_clusters(
            generation,
            steps,
            spec,
            waiting,
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

/// Condition times move only when the condition changes: each condition of `status` that
/// reads as it did in `before` keeps the time it had.
/// The rollout's status after a pass (without the per-cluster list, which the API builds
/// when asked), keeping the transition time of every condition that did not change.
pub fn pass_status(
    generation: i64,
    d: &Decision,
    spec: &ImageBasedGroupUpgradeSpec,
    before: &ImageBasedGroupUpgradeStatus,
    now: DateTime<Utc>,
) -> ImageBasedGroupUpgradeStatus {
    let mut status = status_without_clusters(
        generation,
        &d.steps,
        spec,
        d.waiting,
        d.started_at,
        d.completed_at,
        now,
    );
    keep_transition_times(&mut status, before);
    status
}

pub fn keep_transition_times(
    status: &mut ImageBasedGroupUpgradeStatus,
    before: &ImageBasedGroupUpgradeStatus,
) {
    for c in &mut status.conditions {
        if let Some(old) = before.conditions.iter().find(|o| o.type_ == c.type_)
            && old.status == c.status
            && old.reason == c.reason
            && old.message == c.message
        {
            c.last_transition_time = old.last_transition_time;
        }
    }
}

/// The status without `clusters`: what the engine stores on every pass (the per-cluster
/// part, the largest at fleet scale, is derived from the progress rows when read).
pub fn status_without_clusters(
    generation: i64,
    steps: &[StepState],
    spec: &ImageBasedGroupUpgradeSpec,
    waiting: Option<Wait>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    transition_time: DateTime<Utc>,
) -> ImageBasedGroupUpgradeStatus {
    let plan_len = spec.plan.len();
    let done = completed_at.is_some();
    let halt = steps.iter().find_map(|s| s.halt.as_ref());
    let running = steps
        .iter()
        .position(|s| s.completed_at.is_none())
        .unwrap_or(steps.len().min(plan_len.saturating_sub(1)));
    let (reason, message) = match (done, halt) {
        (true, Some(h)) => (h.reason.clone(), h.message.clone()),
        (true, None) => ("Completed".into(), "All plan steps are completed".into()),
        (false, Some(h)) => (
            "InProgress".into(),
            format!(
                "{}: halting, waiting for the clusters still running",
                h.message
            ),
        ),
        (false, None) => {
            let mut m = format!("Waiting for plan step {running} to be completed");
            if let (Some(Wait::Window), Some(w)) = (waiting, &spec.maintenance_window) {
                m.push_str(&format!(
                    "; waiting for the maintenance window {} {}",
                    w.start,
                    w.time_zone()
                ));
            }
            ("InProgress".into(), m)
        }
    };
    let mut conditions = vec![Condition {
        type_: "Progressing".into(),
        status: if done {
            ConditionStatus::False
        } else {
            ConditionStatus::True
        },
        reason,
        message,
        last_transition_time: Some(transition_time),
        observed_generation: Some(generation),
    }];
    if spec.paused && !done {
        conditions.push(Condition {
            type_: "Paused".into(),
            status: ConditionStatus::True,
            reason: "Paused".into(),
            message: "spec.paused is true: no cluster starts an action, timeouts are stopped"
                .into(),
            last_transition_time: Some(transition_time),
            observed_generation: Some(generation),
        });
    }
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
            reason: match halt {
                Some(h) => h.reason.as_str(),
                None if failed == 0 => "Completed",
                None => "Failed",
            }
            .into(),
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
