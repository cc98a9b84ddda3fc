//! What a spoke's last report says of one plan action: done, failed (with the spoke's
//! message), or still to wait for (`ibgu-hub.md`: the conditions each action waits on).

use fleet_types::ibgu::Action;
use fleet_types::ibu::{
    Condition, ConditionStatus, ImageBasedUpgrade, Stage, condition_type as ct, reason,
};

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
                && ibu.spec.stage == action.spoke_stage()
            {
                if c.reason == reason::INVALID_TRANSITION {
                    return Check::Failed(c.message.clone());
                }
                // The Lifecycle Agent holds the stage for as long as an IPConfig change runs:
                // said at once, not found out at the step's timeout.
                if c.reason == reason::BLOCKED {
                    return Check::Failed(format!(
                        "{} blocked by the cluster's Lifecycle Agent: {} (an IPConfig change is \
                         in progress; the stage can run once it is Idle)",
                        action.spoke_stage(),
                        c.message
                    ));
                }
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
