//! Conditions of the IBU: writing them with the ordering rule, reading the stage predicates,
//! and deriving `validNextStages` (`ibu-spoke.md` sections 2 and 3).

use chrono::{DateTime, Utc};
use fleet_types::ibu::{Condition, ConditionStatus, ImageBasedUpgradeStatus, Stage};
use fleet_types::ibu::{condition_type as ct, reason};

/// Sets a condition. The last condition is the IBU's current state, so a condition whose
/// status changes, and the `Idle` condition whenever it is written, moves to the end.
/// `lastTransitionTime` changes only with the status.
pub fn set(
    status: &mut ImageBasedUpgradeStatus,
    type_: &str,
    value: ConditionStatus,
    why: &str,
    message: &str,
    generation: i64,
    now: DateTime<Utc>,
) {
    let new = |time| Condition {
        type_: type_.to_string(),
        status: value,
        reason: why.to_string(),
        message: message.to_string(),
        last_transition_time: Some(time),
        observed_generation: Some(generation),
    };
    match status.conditions.iter().position(|c| c.type_ == type_) {
        None => status.conditions.push(new(now)),
        Some(i) => {
            let changed = status.conditions[i].status != value;
            let time = if changed {
                now
            } else {
                status.conditions[i].last_transition_time.unwrap_or(now)
            };
            let last = status.conditions.len() - 1;
            if (changed || type_ == ct::IDLE) && i != last {
                status.conditions.remove(i);
                status.conditions.push(new(time));
            } else {
                status.conditions[i] = new(time);
            }
        }
    }
}

pub fn is(status: &ImageBasedUpgradeStatus, type_: &str, value: ConditionStatus) -> bool {
    status.condition(type_).is_some_and(|c| c.status == value)
}

fn has_reason(status: &ImageBasedUpgradeStatus, type_: &str, reasons: &[&str]) -> bool {
    status
        .condition(type_)
        .is_some_and(|c| reasons.contains(&c.reason.as_str()))
}

/// The condition types (in progress, completed) of a stage.
pub fn types_of(stage: Stage) -> (&'static str, &'static str) {
    match stage {
        Stage::Idle => (ct::IDLE, ct::IDLE),
        Stage::Prep => (ct::PREP_IN_PROGRESS, ct::PREP_COMPLETED),
        Stage::Upgrade => (ct::UPGRADE_IN_PROGRESS, ct::UPGRADE_COMPLETED),
        Stage::Rollback => (ct::ROLLBACK_IN_PROGRESS, ct::ROLLBACK_COMPLETED),
    }
}

pub fn completed(status: &ImageBasedUpgradeStatus, stage: Stage) -> bool {
    is(status, types_of(stage).1, ConditionStatus::True)
}

/// A stage failed: its Completed condition is False (for Idle: abort or finalize failed).
pub fn failed(status: &ImageBasedUpgradeStatus, stage: Stage) -> bool {
    match stage {
        Stage::Idle => has_reason(
            status,
            ct::IDLE,
            &[reason::ABORT_FAILED, reason::FINALIZE_FAILED],
        ),
        _ => is(status, types_of(stage).1, ConditionStatus::False),
    }
}

/// A stage is running: its InProgress condition is True (for Idle: aborting or finalizing,
/// including their failed states, which retry).
pub fn in_progress(status: &ImageBasedUpgradeStatus, stage: Stage) -> bool {
    match stage {
        Stage::Idle => {
            is(status, ct::IDLE, ConditionStatus::False)
                && has_reason(
                    status,
                    ct::IDLE,
                    &[
                        reason::ABORTING,
                        reason::ABORT_FAILED,
                        reason::FINALIZING,
                        reason::FINALIZE_FAILED,
                    ],
                )
        }
        _ => is(status, types_of(stage).0, ConditionStatus::True),
    }
}

pub fn idle(status: &ImageBasedUpgradeStatus) -> bool {
    is(status, ct::IDLE, ConditionStatus::True)
}

/// `validNextStages`, first matching row of the table wins. `post_reboot` says whether this
/// IBU lives on the new stateroot after the upgrade's reboot. The branches mirror the spec's
/// table row by row, so two rows with the same answer stay apart.
#[allow(clippy::if_same_then_else)]
pub fn valid_next_stages(status: &ImageBasedUpgradeStatus, post_reboot: bool) -> Vec<Stage> {
    use Stage::*;
    let running = |s| in_progress(status, s);
    let failed_ = |s| failed(status, s);
    if running(Idle) || running(Rollback) || failed_(Rollback) {
        vec![]
    } else if running(Prep) || failed_(Prep) {
        vec![Idle]
    } else if (running(Upgrade) || failed_(Upgrade)) && post_reboot {
        vec![Rollback]
    } else if running(Upgrade) || failed_(Upgrade) {
        vec![Idle]
    } else if completed(status, Rollback) {
        vec![Idle]
    } else if completed(status, Upgrade) {
        vec![Idle, Rollback]
    } else if completed(status, Prep) {
        vec![Idle, Upgrade]
    } else if idle(status) {
        vec![Prep]
    } else {
        vec![]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConditionStatus::{False, True};

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn types(st: &ImageBasedUpgradeStatus) -> Vec<&str> {
        st.conditions.iter().map(|c| c.type_.as_str()).collect()
    }

    #[test]
    fn a_changed_condition_moves_to_the_end_an_unchanged_one_stays() {
        let mut st = ImageBasedUpgradeStatus::default();
        set(
            &mut st,
            ct::PREP_IN_PROGRESS,
            True,
            "InProgress",
            "a",
            1,
            t(0),
        );
        set(&mut st, ct::PREP_COMPLETED, False, "Failed", "b", 1, t(1));
        // same status: stays in place, message updated, time kept
        set(
            &mut st,
            ct::PREP_IN_PROGRESS,
            True,
            "InProgress",
            "c",
            1,
            t(2),
        );
        assert_eq!(types(&st), vec![ct::PREP_IN_PROGRESS, ct::PREP_COMPLETED]);
        assert_eq!(st.conditions[0].message, "c");
        assert_eq!(st.conditions[0].last_transition_time, Some(t(0)));
        // changed status: moves to the end, new time
        set(&mut st, ct::PREP_IN_PROGRESS, False, "Failed", "d", 1, t(3));
        assert_eq!(types(&st), vec![ct::PREP_COMPLETED, ct::PREP_IN_PROGRESS]);
        assert_eq!(st.conditions[1].last_transition_time, Some(t(3)));
    }

    #[test]
    fn the_idle_condition_always_moves_to_the_end() {
        let mut st = ImageBasedUpgradeStatus::default();
        set(
            &mut st,
            ct::IDLE,
            False,
            "InProgress",
            "In progress",
            1,
            t(0),
        );
        set(
            &mut st,
            ct::PREP_COMPLETED,
            True,
            "Completed",
            "done",
            1,
            t(1),
        );
        set(&mut st, ct::IDLE, False, "Aborting", "Aborting", 1, t(2));
        assert_eq!(types(&st), vec![ct::PREP_COMPLETED, ct::IDLE]);
        assert_eq!(
            st.conditions[1].last_transition_time,
            Some(t(0)),
            "status unchanged: time kept"
        );
    }
}
