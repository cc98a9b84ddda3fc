//! A stage's steps: what to run next ([`next`], [`begin`]), what its outcome changes
//! ([`complete`]), timers ([`tick`]), and the way back after a reboot ([`booted`], [`resume`]).

use super::*;

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

/// The watchdog's timeout: `spec.autoRollbackOnFailure.initMonitorTimeoutSeconds`, or 1800.
pub fn init_monitor_seconds(s: &SpokeState) -> i64 {
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

pub(super) fn seed(s: &SpokeState) -> SeedImageRef {
    s.ibu.spec.seed_image_ref.clone().unwrap_or_default()
}

pub(super) fn work_for(s: &SpokeState, step: Step, now: DateTime<Utc>) -> Work {
    match step {
        Step::Health => Work::Health,
        Step::Validate => Work::GatherFacts(s.ibu.spec.clone()),
        Step::InspectSeed => Work::InspectSeed(seed(s)),
        Step::Stateroot => Work::SetupStateroot {
            stateroot: stateroot_name(&seed(s).version),
            seed: seed(s),
            image_cleanup: super::image_cleanup_threshold(s),
        },
        Step::Precache => Work::Precache {
            seed: seed(s),
            release_registry: s.run.release_registry.clone(),
        },
        Step::Backup => Work::Backup(groups(&s.run.backups)),
        Step::ClusterConfig => Work::ClusterConfig {
            stateroot: stateroot_name(&seed(s).version),
        },
        Step::Pivot => pivot_work(s, now),
        Step::Reboot => Work::Reboot,
        Step::CheckDpa => Work::CheckDpa,
        Step::ApplyExtraManifests => Work::ApplyExtraManifests(groups(&s.run.extra_manifests)),
        Step::Restore => Work::Restore(groups(&s.run.restores)),
        Step::DeferredHealth => Work::DeferredHealth,
        Step::DisarmWatchdog => Work::DisarmWatchdog,
        Step::Cleanup => Work::Cleanup {
            manual: s.run.manual_cleanup,
        },
    }
}

pub(super) fn groups(docs: &[Value]) -> Vec<Vec<Value>> {
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
pub(super) fn pivot_work(s: &SpokeState, t: DateTime<Utc>) -> Work {
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

pub(super) fn uncontrolled_rollback(s: &mut SpokeState, now: DateTime<Utc>) {
    *s = failed_on_old_stateroot(s, "Uncontrolled rollback", now);
}

/// The IBU as it must read on the old stateroot after the node went back there: the upgrade
/// failed, for `why`, nothing running.
pub(super) fn failed_on_old_stateroot(s: &SpokeState, why: &str, now: DateTime<Utc>) -> SpokeState {
    let mut old = s.clone();
    old.run = Run {
        epoch: s.run.epoch,
        ..Run::default()
    };
    mark_upgrade_failed(&mut old, why, now);
    refresh(&mut old);
    old
}

pub(super) fn mark_upgrade_failed(s: &mut SpokeState, why: &str, now: DateTime<Utc>) {
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

pub(super) fn open_phase(s: &mut SpokeState, phase: &str, now: DateTime<Utc>) {
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

pub(super) fn close_phase(s: &mut SpokeState, phase: &str, now: DateTime<Utc>) {
    if let Some(p) = status(s)
        .history
        .last_mut()
        .and_then(|h| h.phases.iter_mut().find(|p| p.phase == phase))
    {
        p.completion_time.get_or_insert(now);
    }
}

/// Writes the "what is happening" message where this operation shows it.
pub(super) fn in_progress_message(s: &mut SpokeState, op: &Op, message: &str, now: DateTime<Utc>) {
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

pub(super) fn cleanup_failed(s: &mut SpokeState, op: &Op, errors: &[String], now: DateTime<Utc>) {
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

pub(super) fn validate_prep(s: &mut SpokeState, facts: &ClusterFacts) -> Result<(), String> {
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

pub(super) fn extra_manifest_bodies(
    spec: &ImageBasedUpgradeSpec,
    facts: &ClusterFacts,
) -> Vec<Value> {
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

pub(super) fn advance(s: &mut SpokeState, op: &Op, step: Step, now: DateTime<Utc>) {
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

pub(super) fn finish_history(s: &mut SpokeState, now: DateTime<Utc>) {
    if let Some(h) = status(s).history.last_mut() {
        h.completion_time = Some(now);
    }
}

pub(super) fn back_to_idle(s: &mut SpokeState, now: DateTime<Utc>) {
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

pub(super) fn fail(s: &mut SpokeState, op: &Op, step: Step, error: String, now: DateTime<Utc>) {
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

pub(super) fn upgrade_failed(s: &mut SpokeState, error: &str, now: DateTime<Utc>) {
    mark_upgrade_failed(s, error, now);
    s.run.watchdog_deadline = None;
    s.run.op = None;
}

/// Rolls the node back to the old stateroot: the old deployment becomes default and the
/// node reboots; the IBU restored there shows the failed upgrade with `reason`.
pub(super) fn auto_rollback(s: &mut SpokeState, why: String, _now: DateTime<Utc>) {
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

/// The agent restarted (not rebooted) with a step in flight: every step runs again. Each is
/// idempotent on the host; stateroot setup and precache resume rather than fail (the host
/// sets a partial stateroot up again and pulls only the images still missing), so a node
/// that loses its agent during a long Prep needs nobody. The Lifecycle Agent's setup Job
/// cannot resume; ours does.
pub fn resume(s: &mut SpokeState, _now: DateTime<Utc>) {
    s.run.in_flight = false;
    refresh(s);
}
