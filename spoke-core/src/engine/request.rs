//! Requests to change the IBU: the CEL-equivalent checks of the API ([`request`]) and the
//! engine's own transition checks ([`reconcile`]) that start a stage or refuse it.

use super::*;

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
pub(super) enum Act {
    Keep,
    Start(Op),
    Invalid(Stage, &'static str),
}

pub(super) fn transition(st: &ImageBasedUpgradeStatus, stage: Stage, post: bool) -> Act {
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

pub(super) fn invalid(s: &mut SpokeState, stage: Stage, message: &str, now: DateTime<Utc>) {
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
pub(super) fn start(s: &mut SpokeState, op: Op, now: DateTime<Utc>) {
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
            // Rolling back uses up the possibility (the Lifecycle Agent clears it too).
            status(s).rollback_availability_expiration = None;
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
