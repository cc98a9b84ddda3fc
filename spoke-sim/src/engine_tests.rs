//! Engine tests: the engine driven step by step against the simulated node, with time given
//! explicitly (no clock, no waiting).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use fleet_types::ibu::{ConditionStatus, ImageBasedUpgradeStatus, Stage, condition_type as ct};
use serde_json::json;

use spoke_core::engine::*;
use spoke_core::host::HostError;
use spoke_core::metrics::{Ended, ended};

use crate::sim::{Fault, SimCluster, SimConfig};

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

/// One simulated node and the engine on it, driven synchronously.
struct Node {
    sim: SimCluster,
    now: DateTime<Utc>,
    /// Work handed to the host, in order.
    log: Vec<String>,
    /// What the agent's metrics saw end, save after save.
    ended: Vec<(Ended, f64)>,
}

impl Node {
    fn new(faults: &[Fault]) -> Node {
        let mut sim = SimCluster::new(SimConfig {
            current_version: "4.15.0".into(),
            faults: faults.iter().copied().collect(),
            ..Default::default()
        });
        sim.save_state(&Root::Booted, Arc::new(initial(t0())))
            .unwrap();
        Node {
            sim,
            now: t0(),
            log: vec![],
            ended: vec![],
        }
    }

    fn state(&self) -> SpokeState {
        self.sim.load_state().unwrap()
    }

    fn put(&mut self, s: &SpokeState) {
        if let Some(old) = self.sim.load_state() {
            self.ended.extend(ended(&old.ibu, &s.ibu));
        }
        self.sim
            .save_state(&Root::Booted, Arc::new(s.clone()))
            .unwrap();
    }

    fn status(&self) -> ImageBasedUpgradeStatus {
        self.state().ibu.status.unwrap()
    }

    fn patch(&mut self, patch: serde_json::Value) -> Result<(), Refusal> {
        let next = request(&self.state(), &patch, self.now)?;
        self.put(&next);
        Ok(())
    }

    fn stage(&mut self, stage: Stage) -> Result<(), Refusal> {
        self.patch(json!({"spec": {"stage": stage}}))
    }

    fn seed(&mut self, version: &str) {
        self.patch(json!({"spec": {"seedImageRef": {"version": version, "image": format!("quay.io/seed:{version}")}}}))
            .unwrap();
    }

    /// Runs until the engine has nothing to do now (or would wait).
    fn run(&mut self) {
        for _ in 0..100 {
            let mut s = self.state();
            if tick(&mut s, self.now) {
                self.put(&s);
            }
            let Some((work, epoch)) = begin(&mut s, self.now) else {
                return;
            };
            self.put(&s);
            self.now += Duration::seconds(1);
            let reboot = work == Work::Reboot;
            let outcome = self.exec(work);
            let mut s = self.state();
            complete(&mut s, epoch, outcome, self.now);
            self.put(&s);
            if reboot {
                self.sim.reboot();
                let mut s = self.state();
                booted(&mut s, Some(self.now + Duration::days(30)), self.now);
                self.put(&s);
            }
        }
        panic!("the engine did not settle");
    }

    fn exec(&mut self, work: Work) -> Outcome {
        let host = |r: Result<(), HostError>| match r {
            Ok(()) => Outcome::Done,
            Err(HostError::Terminal(e)) => Outcome::Failed(e),
            Err(HostError::Transient(e)) => Outcome::Transient(e),
        };
        let name = format!("{work:?}");
        self.log
            .push(name.split(['(', ' ', '{']).next().unwrap().to_string());
        match work {
            Work::Health | Work::CheckDpa | Work::Reboot | Work::ClusterConfig { .. } => {
                Outcome::Done
            }
            Work::GatherFacts(spec) => Outcome::Facts(Box::new(self.sim.cluster_facts(&spec))),
            Work::InspectSeed(seed) => match self.sim.inspect_seed(&seed) {
                Ok(labels) => Outcome::SeedLabels(labels),
                Err(e) => Outcome::Failed(e.to_string()),
            },
            Work::SetupStateroot {
                stateroot, seed, ..
            } => host(self.sim.setup_stateroot(&stateroot, &seed)),
            Work::Precache { .. } => match self.sim.precache() {
                Ok(p) => Outcome::Precached {
                    total: p.total,
                    pulled: p.pulled,
                    failed: p.failed,
                },
                Err(e) => Outcome::Failed(e.to_string()),
            },
            Work::Backup(g) => host(self.sim.backup(&g)),
            Work::Pivot { saves, default } => {
                for (root, state) in saves {
                    if let Err(e) = self.sim.save_state(&root, Arc::new(state)) {
                        return host(Err(e));
                    }
                }
                host(self.sim.set_default(&default))
            }
            Work::ApplyExtraManifests(_) => host(self.sim.apply_extra_manifests()),
            Work::Restore(g) => host(self.sim.restore(&g)),
            Work::DisarmWatchdog => Outcome::Done,
            Work::DeferredHealth => match self.sim.deferred_health() {
                Ok(()) => Outcome::Done,
                Err(why) => Outcome::Waiting(why),
            },
            Work::Cleanup { manual } => match self.sim.cleanup(manual) {
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::CleanupFailed(e),
            },
        }
    }

    fn last(&self) -> (String, ConditionStatus, String, String) {
        let st = self.status();
        let c = st.current().unwrap();
        (
            c.type_.clone(),
            c.status,
            c.reason.clone(),
            c.message.clone(),
        )
    }

    /// Asserts the last condition: what `oc get ibu` shows as State and Details.
    #[track_caller]
    fn expect_last(&self, type_: &str, status: ConditionStatus, reason: &str, message: &str) {
        assert_eq!(
            self.last(),
            (type_.into(), status, reason.into(), message.into())
        );
    }

    /// Asserts the whole condition list, in order, as (type, status, reason, message).
    #[track_caller]
    fn expect_conditions(&self, want: &[(&str, ConditionStatus, &str, &str)]) {
        let got: Vec<(String, ConditionStatus, String, String)> = self
            .status()
            .conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status,
                    c.reason.clone(),
                    c.message.clone(),
                )
            })
            .collect();
        let want: Vec<(String, ConditionStatus, String, String)> = want
            .iter()
            .map(|(t, s, r, m)| (t.to_string(), *s, r.to_string(), m.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    fn next_stages(&self) -> Vec<Stage> {
        self.status().valid_next_stages
    }

    fn cond(&self, type_: &str) -> (ConditionStatus, String, String) {
        let st = self.status();
        let c = st
            .condition(type_)
            .unwrap_or_else(|| panic!("no {type_} condition"));
        (c.status, c.reason.clone(), c.message.clone())
    }

    fn prep(&mut self) {
        self.seed("4.16.0");
        self.stage(Stage::Prep).unwrap();
        self.run();
    }

    fn upgrade(&mut self) {
        self.prep();
        self.stage(Stage::Upgrade).unwrap();
        self.run();
    }
}

use ConditionStatus::{False, True};

fn c(s: ConditionStatus, r: &str, m: &str) -> (ConditionStatus, String, String) {
    (s, r.to_string(), m.to_string())
}

#[test]
fn a_new_ibu_is_idle_with_prep_next() {
    let n = Node::new(&[]);
    let s = n.state();
    assert_eq!(s.ibu.metadata.name.as_deref(), Some("upgrade"));
    assert_eq!(s.ibu.spec.stage, Stage::Idle);
    assert_eq!(n.cond(ct::IDLE), c(True, "Idle", "Idle"));
    assert_eq!(n.next_stages(), vec![Stage::Prep]);
    assert_eq!(s.ibu.status.unwrap().observed_generation, Some(1));
}

#[test]
fn prep_runs_its_steps_and_phases_in_order() {
    let mut n = Node::new(&[]);
    n.prep();
    assert_eq!(
        n.log,
        vec![
            "Health",
            "GatherFacts",
            "InspectSeed",
            "SetupStateroot",
            "Precache"
        ]
    );
    n.expect_conditions(&[
        (ct::IDLE, False, "InProgress", "In progress"),
        (ct::PREP_IN_PROGRESS, False, "Completed", "Prep completed"),
        (
            ct::PREP_COMPLETED,
            True,
            "Completed",
            "Prep stage completed successfully",
        ),
    ]);
    assert_eq!(n.next_stages(), vec![Stage::Idle, Stage::Upgrade]);
    let h = &n.status().history;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].stage, Stage::Prep);
    assert!(h[0].completion_time.is_some());
    let phases: Vec<_> = h[0]
        .phases
        .iter()
        .map(|p| (p.phase.as_str(), p.completion_time.is_some()))
        .collect();
    assert_eq!(phases, vec![("Stateroot", true), ("Precache", true)]);
    assert!(n.sim.stateroots.contains_key("rhcos_4.16.0"));
}

#[test]
fn prep_in_progress_offers_idle_only() {
    let mut n = Node::new(&[]);
    n.seed("4.16.0");
    n.stage(Stage::Prep).unwrap();
    n.expect_conditions(&[
        (ct::IDLE, False, "InProgress", "In progress"),
        (ct::PREP_IN_PROGRESS, True, "InProgress", "In progress"),
    ]);
    assert_eq!(n.next_stages(), vec![Stage::Idle]);
}

#[test]
fn seed_version_must_be_semver_and_higher() {
    for (v, msg) in [
        (
            "4.15.0",
            "failed to validate IBU spec: failed to validate seed image OCP version: seed OCP version (4.15.0) must be higher than current OCP version (4.15.0)",
        ),
        (
            "4.14.9",
            "failed to validate IBU spec: failed to validate seed image OCP version: seed OCP version (4.14.9) must be higher than current OCP version (4.15.0)",
        ),
    ] {
        let mut n = Node::new(&[]);
        n.seed(v);
        n.stage(Stage::Prep).unwrap();
        n.run();
        assert_eq!(
            n.cond(ct::PREP_COMPLETED),
            c(False, "Failed", "Prep failed")
        );
        n.expect_last(ct::PREP_IN_PROGRESS, False, "Failed", msg);
        assert_eq!(n.next_stages(), vec![Stage::Idle]);
    }
    let mut n = Node::new(&[]);
    n.seed("four");
    n.stage(Stage::Prep).unwrap();
    n.run();
    assert!(
        n.last()
            .3
            .contains("seed OCP version (four) is not a valid semantic version"),
        "{:?}",
        n.last()
    );
}

#[test]
fn a_seed_missing_from_the_registry_fails_prep_as_skopeo_says() {
    let mut n = Node::new(&[]);
    n.sim
        .config
        .missing_images
        .insert("quay.io/seed:4.16.0".into());
    n.prep();
    assert_eq!(
        n.cond(ct::PREP_COMPLETED),
        c(False, "Failed", "Prep failed")
    );
    assert!(
        n.last().3.contains(
            "failed to inspect the seed image quay.io/seed:4.16.0: reading manifest 4.16.0: \
             manifest unknown"
        ),
        "{:?}",
        n.last()
    );
    // Another seed is there.
    n.stage(Stage::Idle).unwrap();
    n.run();
    n.seed("4.16.1");
    n.stage(Stage::Prep).unwrap();
    n.run();
    assert_eq!(n.cond(ct::PREP_COMPLETED).0, True);
}

#[test]
fn prep_fault_fails_prep_and_idle_aborts() {
    let mut n = Node::new(&[Fault::Prep]);
    n.prep();
    assert_eq!(
        n.cond(ct::PREP_COMPLETED),
        c(False, "Failed", "Prep failed")
    );
    assert!(n.last().3.contains("failed to setup stateroot"));
    // re-sending Prep is a no-op: Prep failed must go to Idle
    let before = n.state();
    n.patch(json!({"spec": {"stage": "Prep"}})).unwrap();
    n.run();
    assert_eq!(n.state().ibu.status, before.ibu.status);
    n.stage(Stage::Idle).unwrap();
    n.expect_last(ct::IDLE, False, "Aborting", "Aborting");
    assert_eq!(n.next_stages(), Vec::<Stage>::new());
    n.run();
    n.expect_last(ct::IDLE, True, "Idle", "Idle");
    assert_eq!(n.status().conditions.len(), 1);
    assert!(n.status().history.is_empty());
    assert_eq!(n.next_stages(), vec![Stage::Prep]);
}

#[test]
fn precache_fault_fails_prep() {
    let mut n = Node::new(&[Fault::Precache]);
    n.prep();
    assert!(
        n.last()
            .3
            .contains("failed to precache images: total: 120 (pulled: 117, failed: 3)"),
        "{:?}",
        n.last()
    );
    let h = &n.status().history[0];
    assert!(
        h.completion_time.is_none(),
        "completionTime only on success"
    );
    assert!(h.phases[0].completion_time.is_some() && h.phases[1].completion_time.is_none());
}

#[test]
fn upgrade_reboots_into_the_new_stateroot_and_completes() {
    let mut n = Node::new(&[]);
    n.upgrade();
    assert_eq!(n.sim.booted, "rhcos_4.16.0");
    let s = n.state();
    assert_eq!(
        s.ibu.metadata.generation,
        Some(1),
        "generation starts again at 1"
    );
    assert!(s.run.post_reboot);
    assert_eq!(
        n.cond(ct::UPGRADE_IN_PROGRESS),
        c(False, "Completed", "Upgrade completed")
    );
    n.expect_last(
        ct::UPGRADE_COMPLETED,
        True,
        "Completed",
        "Upgrade completed",
    );
    assert_eq!(n.next_stages(), vec![Stage::Idle, Stage::Rollback]);
    let st = n.status();
    assert!(st.rollback_availability_expiration.is_some());
    let up = &st.history[1];
    assert_eq!(up.stage, Stage::Upgrade);
    let phases: Vec<_> = up
        .phases
        .iter()
        .map(|p| (p.phase.as_str(), p.completion_time.is_some()))
        .collect();
    assert_eq!(phases, vec![("PrePivot", true), ("PostPivot", true)]);
    // the old stateroot holds the "uncontrolled rollback" copy
    let old = n.sim.stateroots["rhcos"]
        .state
        .as_ref()
        .unwrap()
        .ibu
        .status
        .clone()
        .unwrap();
    assert_eq!(
        old.condition(ct::UPGRADE_IN_PROGRESS).unwrap().message,
        "Uncontrolled rollback"
    );
    assert_eq!(old.valid_next_stages, vec![Stage::Idle]);
}

#[test]
fn upgrade_in_progress_before_the_reboot_offers_idle_after_it_rollback() {
    let mut n = Node::new(&[]);
    n.prep();
    n.stage(Stage::Upgrade).unwrap();
    assert_eq!(n.next_stages(), vec![Stage::Idle], "pre-reboot");
    let mut n = Node::new(&[Fault::InitMonitor]);
    n.upgrade();
    assert_eq!(n.cond(ct::UPGRADE_IN_PROGRESS).0, True);
    assert!(
        n.last()
            .3
            .starts_with("Waiting for system to stabilize: cluster operators"),
        "{:?}",
        n.last()
    );
    assert_eq!(n.next_stages(), vec![Stage::Rollback], "post-reboot");
}

#[test]
fn backup_failure_fails_upgrade_before_the_reboot_and_idle_aborts() {
    let mut n = Node::new(&[Fault::Backup]);
    n.upgrade();
    assert_eq!(n.sim.booted, "rhcos");
    assert_eq!(
        n.cond(ct::UPGRADE_COMPLETED),
        c(False, "Failed", "Upgrade failed")
    );
    assert_eq!(n.last().3, "Failed backup CRs: sim-backup");
    assert_eq!(n.next_stages(), vec![Stage::Idle]);
    n.stage(Stage::Idle).unwrap();
    n.run();
    n.expect_last(ct::IDLE, True, "Idle", "Idle");
    assert_eq!(
        n.sim.stateroots.keys().collect::<Vec<_>>(),
        vec!["rhcos"],
        "abort removes the new stateroot"
    );
}

#[test]
fn manual_rollback_returns_to_the_old_stateroot_then_finalizes() {
    let mut n = Node::new(&[]);
    n.upgrade();
    assert!(n.status().rollback_availability_expiration.is_some());
    n.stage(Stage::Rollback).unwrap();
    // Used up, as the Lifecycle Agent says by clearing it.
    assert!(n.status().rollback_availability_expiration.is_none());
    assert_eq!(
        n.cond(ct::UPGRADE_IN_PROGRESS),
        c(False, "Failed", "Rollback requested")
    );
    assert_eq!(
        n.cond(ct::UPGRADE_COMPLETED),
        c(False, "Failed", "Rollback requested")
    );
    n.expect_last(ct::ROLLBACK_IN_PROGRESS, True, "InProgress", "In progress");
    assert_eq!(n.next_stages(), Vec::<Stage>::new());
    n.run();
    assert_eq!(n.sim.booted, "rhcos");
    assert_eq!(
        n.cond(ct::ROLLBACK_IN_PROGRESS),
        c(False, "Completed", "Rollback completed")
    );
    n.expect_last(
        ct::ROLLBACK_COMPLETED,
        True,
        "Completed",
        "Rollback completed",
    );
    assert_eq!(n.next_stages(), vec![Stage::Idle]);
    let h = n.status().history;
    assert_eq!(h.last().unwrap().stage, Stage::Rollback);
    assert!(h.last().unwrap().completion_time.is_some());
    n.stage(Stage::Idle).unwrap();
    n.expect_last(ct::IDLE, False, "Finalizing", "Finalizing");
    n.run();
    n.expect_last(ct::IDLE, True, "Idle", "Idle");
    assert_eq!(n.sim.stateroots.keys().collect::<Vec<_>>(), vec!["rhcos"]);
}

#[test]
fn rollback_failure_is_terminal() {
    let mut n = Node::new(&[Fault::Rollback]);
    n.upgrade();
    n.stage(Stage::Rollback).unwrap();
    n.run();
    assert_eq!(
        n.cond(ct::ROLLBACK_COMPLETED),
        c(False, "Failed", "Rollback failed")
    );
    assert!(
        n.last()
            .3
            .contains("failed to set stateroot rhcos as default"),
        "{:?}",
        n.last()
    );
    assert_eq!(n.next_stages(), Vec::<Stage>::new());
    // an Idle request that got past the API is refused by the engine
    let mut s = n.state();
    s.ibu.spec.stage = Stage::Idle;
    reconcile(&mut s, n.now);
    n.put(&s);
    assert_eq!(
        n.cond(ct::IDLE),
        c(
            False,
            "InvalidTransition",
            "Transition to Idle not allowed - Rollback failed"
        )
    );
}

#[test]
fn finalize_after_upgrade_removes_the_old_stateroot() {
    let mut n = Node::new(&[]);
    n.upgrade();
    n.stage(Stage::Idle).unwrap();
    n.expect_last(ct::IDLE, False, "Finalizing", "Finalizing");
    assert_eq!(n.next_stages(), Vec::<Stage>::new(), "finalizing");
    n.run();
    n.expect_last(ct::IDLE, True, "Idle", "Idle");
    assert_eq!(
        n.sim.stateroots.keys().collect::<Vec<_>>(),
        vec!["rhcos_4.16.0"]
    );
    let st = n.status();
    assert!(st.history.is_empty() && st.rollback_availability_expiration.is_none());
    assert_eq!(st.valid_next_stages, vec![Stage::Prep]);
}

#[test]
fn watchdog_rolls_back_after_the_init_monitor_timeout() {
    let mut n = Node::new(&[Fault::InitMonitor]);
    n.upgrade();
    assert_eq!(n.sim.booted, "rhcos_4.16.0");
    let deadline = n
        .state()
        .run
        .watchdog_deadline
        .expect("watchdog armed at the first boot");
    let boot = n.status().history[1].phases[1].start_time;
    assert_eq!(deadline - boot, Duration::seconds(1800));
    assert_eq!(
        next(&n.state(), n.now),
        Next::WaitUntil(n.now + HEALTH_POLL),
        "polls health meanwhile"
    );
    n.now = deadline - Duration::seconds(10);
    n.run();
    assert_eq!(n.sim.booted, "rhcos_4.16.0", "not yet");
    n.now = deadline;
    n.run();
    assert_eq!(n.sim.booted, "rhcos", "rolled back to the old stateroot");
    assert_eq!(
        n.cond(ct::UPGRADE_COMPLETED),
        c(False, "Failed", "Upgrade failed")
    );
    assert_eq!(
        n.last().3,
        "Rollback due to LCA Init Monitor timeout, after 30m0s"
    );
    assert_eq!(n.next_stages(), vec![Stage::Idle]);
    assert!(
        n.status().condition(ct::ROLLBACK_IN_PROGRESS).is_none(),
        "Rollback stage not entered"
    );
}

#[test]
fn watchdog_uses_the_configured_timeout_and_can_be_disabled() {
    let mut n = Node::new(&[Fault::InitMonitor]);
    n.patch(json!({"spec": {"autoRollbackOnFailure": {"initMonitorTimeoutSeconds": 2400}}}))
        .unwrap();
    n.upgrade();
    n.now += Duration::seconds(2400);
    n.run();
    assert_eq!(
        n.last().3,
        "Rollback due to LCA Init Monitor timeout, after 40m0s"
    );

    let mut n = Node::new(&[Fault::InitMonitor]);
    n.patch(json!({"metadata": {"annotations": {"auto-rollback-on-failure.lca.openshift.io/init-monitor": "Disabled"}}}))
        .unwrap();
    n.upgrade();
    n.now += Duration::hours(5);
    n.run();
    assert_eq!(n.sim.booted, "rhcos_4.16.0", "no watchdog");
    assert_eq!(n.cond(ct::UPGRADE_IN_PROGRESS).0, True);
}

#[test]
fn post_reboot_failures_roll_back_unless_disabled() {
    let mut n = Node::new(&[Fault::Restore]);
    n.upgrade();
    assert_eq!(n.sim.booted, "rhcos");
    assert_eq!(
        n.last().3,
        "Rollback due to restore failure: Failed restore CRs: sim-restore"
    );
    assert_eq!(n.next_stages(), vec![Stage::Idle]);

    let mut n = Node::new(&[Fault::PostReboot]);
    n.upgrade();
    assert_eq!(n.sim.booted, "rhcos");
    assert!(n.last().3.starts_with(
        "Rollback due to post-reboot configuration failure: failed to apply extra manifests"
    ));

    let mut n = Node::new(&[Fault::Restore]);
    n.patch(json!({"metadata": {"annotations": {"auto-rollback-on-failure.lca.openshift.io/upgrade-completion": "Disabled"}}}))
        .unwrap();
    n.upgrade();
    assert_eq!(n.sim.booted, "rhcos_4.16.0", "stays on the new stateroot");
    assert_eq!(
        n.cond(ct::UPGRADE_COMPLETED),
        c(False, "Failed", "Upgrade failed")
    );
    assert_eq!(n.last().3, "Failed restore CRs: sim-restore");
    assert_eq!(n.next_stages(), vec![Stage::Rollback]);

    let mut n = Node::new(&[Fault::PostReboot]);
    n.patch(json!({"metadata": {"annotations": {"auto-rollback-on-failure.lca.openshift.io/post-reboot-config": "Disabled"}}}))
        .unwrap();
    n.upgrade();
    assert_eq!(n.sim.booted, "rhcos_4.16.0");
    assert_eq!(n.next_stages(), vec![Stage::Rollback]);
}

#[test]
fn cleanup_failure_waits_for_manual_cleanup_done() {
    let mut n = Node::new(&[Fault::Cleanup]);
    n.prep();
    n.stage(Stage::Idle).unwrap();
    n.run();
    let (type_, status, reason, message) = n.last();
    assert_eq!(
        (type_.as_str(), status, reason.as_str()),
        (ct::IDLE, False, "AbortFailed")
    );
    assert_eq!(
        message,
        "failed to remove rhcos_4.16.0: device or resource busy (simulated fault) Perform cleanup manually then add 'lca.openshift.io/manual-cleanup-done' annotation to ibu CR to transition back to Idle"
    );
    assert_eq!(n.next_stages(), Vec::<Stage>::new());
    // without the annotation, retried every 5 minutes (and failing again)
    assert_eq!(
        next(&n.state(), n.now),
        Next::WaitUntil(n.now + CLEANUP_RETRY)
    );
    n.now += CLEANUP_RETRY;
    n.run();
    assert_eq!(n.last().2, "AbortFailed");
    assert_eq!(n.sim.runs["cleanup"], 2);
    // the annotation makes the agent remove it and run the cleanup again
    n.patch(json!({"metadata": {"annotations": {"lca.openshift.io/manual-cleanup-done": ""}}}))
        .unwrap();
    assert!(
        n.state().ibu.metadata.annotations.is_none(),
        "annotation removed"
    );
    n.run();
    n.expect_last(ct::IDLE, True, "Idle", "Idle");
}

#[test]
fn finalize_cleanup_failure_is_finalize_failed() {
    let mut n = Node::new(&[Fault::Cleanup]);
    n.upgrade();
    n.stage(Stage::Idle).unwrap();
    n.run();
    assert_eq!(n.last().2, "FinalizeFailed");
}

#[test]
fn api_refuses_stages_not_in_valid_next_stages() {
    let mut n = Node::new(&[]);
    for stage in [Stage::Upgrade, Stage::Rollback] {
        let err = n.stage(stage).unwrap_err();
        assert_eq!(err.0, TRANSITION_NOT_PERMITTED);
    }
    // same stage as now is not a transition
    n.stage(Stage::Idle).unwrap();
    n.prep();
    assert_eq!(
        n.stage(Stage::Rollback).unwrap_err().0,
        TRANSITION_NOT_PERMITTED
    );
    assert!(n.stage(Stage::Upgrade).is_ok());
}

#[test]
fn api_refuses_spec_changes_while_not_idle_unless_moving_to_idle() {
    let mut n = Node::new(&[]);
    n.prep();
    for (patch, field) in [
        (
            json!({"spec": {"seedImageRef": {"version": "4.17.0", "image": "x"}}}),
            "seedImageRef",
        ),
        (
            json!({"spec": {"oadpContent": [{"name": "a", "namespace": "b"}]}}),
            "oadpContent",
        ),
        (
            json!({"spec": {"extraManifests": [{"name": "a", "namespace": "b"}]}}),
            "extraManifests",
        ),
        (
            json!({"spec": {"autoRollbackOnFailure": {"initMonitorTimeoutSeconds": 5}}}),
            "autoRollbackOnFailure",
        ),
    ] {
        let before = n.state();
        let err = n.patch(patch).unwrap_err();
        assert_eq!(
            err.0,
            format!("can not change spec.{field} while ibu is in progress")
        );
        assert_eq!(n.state(), before, "nothing changed");
    }
    n.patch(
        json!({"spec": {"stage": "Idle", "seedImageRef": {"version": "4.17.0", "image": "x"}}}),
    )
    .expect("allowed together with a move to Idle");
}

#[test]
fn api_refuses_unknown_stages_and_other_fields() {
    let mut n = Node::new(&[]);
    let err = n.patch(json!({"spec": {"stage": "Finalize"}})).unwrap_err();
    assert!(
        err.0.starts_with("spec: unknown variant `Finalize`"),
        "{err}"
    );
    let err = n.patch(json!({"status": {}})).unwrap_err();
    assert!(err.0.contains("not status"), "{err}");
    let err = n.patch(json!({"metadata": {"name": "other"}})).unwrap_err();
    assert!(err.0.contains("not metadata.name"), "{err}");
}

#[test]
fn generation_moves_with_spec_changes_only() {
    let mut n = Node::new(&[]);
    n.patch(json!({"metadata": {"annotations": {"a": "b"}}}))
        .unwrap();
    assert_eq!(n.state().ibu.metadata.generation, Some(1));
    n.seed("4.16.0");
    assert_eq!(n.state().ibu.metadata.generation, Some(2));
    assert_eq!(n.status().observed_generation, Some(2));
}

/// Puts a state past the API as a restored file or an old request would, and reconciles.
fn force(n: &mut Node, stage: Stage) {
    let mut s = n.state();
    s.ibu.spec.stage = stage;
    reconcile(&mut s, n.now);
    n.put(&s);
}

#[test]
fn engine_invalid_transitions_have_their_messages() {
    let mut n = Node::new(&[]);
    force(&mut n, Stage::Upgrade);
    assert_eq!(
        n.cond(ct::UPGRADE_IN_PROGRESS),
        c(False, "InvalidTransition", "Previous stage not succeeded")
    );
    force(&mut n, Stage::Rollback);
    assert_eq!(
        n.cond(ct::ROLLBACK_IN_PROGRESS),
        c(
            False,
            "InvalidTransition",
            "Upgrade not started or already finalized"
        )
    );
    // a later valid request clears the stale ones
    n.prep();
    assert!(
        n.status()
            .conditions
            .iter()
            .all(|c| c.reason != "InvalidTransition")
    );

    let mut n = Node::new(&[Fault::Prep]);
    n.prep();
    force(&mut n, Stage::Upgrade);
    assert_eq!(
        n.cond(ct::UPGRADE_IN_PROGRESS),
        c(False, "InvalidTransition", "Previous stage not succeeded")
    );

    let mut n = Node::new(&[]);
    force(&mut n, Stage::Prep);
    n.run();
    force(&mut n, Stage::Prep);
    assert!(
        n.status()
            .conditions
            .iter()
            .all(|c| c.reason != "InvalidTransition")
    );

    let mut n = Node::new(&[Fault::InitMonitor]);
    n.upgrade();
    force(&mut n, Stage::Idle);
    assert_eq!(
        n.cond(ct::IDLE),
        c(
            False,
            "InvalidTransition",
            "Transition to Idle not allowed - Rollback first"
        )
    );
    n.stage(Stage::Rollback).unwrap();
    assert_eq!(
        n.cond(ct::IDLE),
        c(False, "InProgress", "In progress"),
        "cleared by the valid request"
    );
    force(&mut n, Stage::Idle);
    assert_eq!(
        n.cond(ct::IDLE),
        c(
            False,
            "InvalidTransition",
            "Transition to Idle not allowed - Rollback is in progress"
        )
    );
}

#[test]
fn abort_or_finalize_not_allowed_when_nothing_ran() {
    let mut n = Node::new(&[]);
    // an IBU whose status lost its Idle condition (restored by hand) cannot abort
    let mut s = n.state();
    s.ibu.status.as_mut().unwrap().conditions.clear();
    s.ibu.spec.stage = Stage::Idle;
    reconcile(&mut s, n.now);
    n.put(&s);
    assert_eq!(
        n.cond(ct::IDLE),
        c(False, "InvalidTransition", "Abort or finalize not allowed")
    );
    // nor start Prep: it is not idle
    force(&mut n, Stage::Prep);
    assert_eq!(
        n.cond(ct::PREP_IN_PROGRESS),
        c(False, "InvalidTransition", "Previous stage not succeeded")
    );
}

#[test]
fn restart_mid_stateroot_resumes_prep_other_steps_run_again() {
    let mut n = Node::new(&[]);
    n.seed("4.16.0");
    n.stage(Stage::Prep).unwrap();
    // begin steps up to the stateroot, leaving it in flight
    for _ in 0..3 {
        let mut s = n.state();
        let (w, e) = begin(&mut s, n.now).unwrap();
        n.put(&s);
        let out = n.exec(w);
        let mut s = n.state();
        complete(&mut s, e, out, n.now);
        n.put(&s);
    }
    let mut s = n.state();
    let (w, _) = begin(&mut s, n.now).unwrap();
    assert!(matches!(w, Work::SetupStateroot { .. }));
    let before = s.ibu.status.clone().unwrap().history;
    resume(&mut s, n.now);
    n.put(&s);
    // The same stateroot setup is handed out again, and Prep goes on to complete.
    let mut s = n.state();
    let (again, _) = begin(&mut s, n.now).unwrap();
    assert_eq!(again, w);
    n.run();
    assert_eq!(
        n.cond(ct::PREP_COMPLETED),
        c(True, "Completed", "Prep stage completed successfully")
    );
    let history = n.status().history;
    assert_eq!(history.len(), 1, "one Prep in the history");
    assert_eq!(history[0].start_time, before[0].start_time);

    // a health check in flight just runs again
    let mut n = Node::new(&[]);
    n.prep();
    n.stage(Stage::Upgrade).unwrap();
    let mut s = n.state();
    let (w, _) = begin(&mut s, n.now).unwrap();
    assert_eq!(w, Work::Health);
    resume(&mut s, n.now);
    assert!(!s.run.in_flight);
    assert_eq!(next(&s, n.now), Next::Work(Work::Health));
}

#[test]
fn outcomes_of_superseded_work_are_dropped() {
    let mut n = Node::new(&[]);
    n.seed("4.16.0");
    n.stage(Stage::Prep).unwrap();
    let mut s = n.state();
    let (_, epoch) = begin(&mut s, n.now).unwrap();
    n.put(&s);
    n.stage(Stage::Idle).unwrap(); // abort while the health check runs
    let mut s = n.state();
    complete(&mut s, epoch, Outcome::Failed("late".into()), n.now);
    assert_eq!(
        s.ibu.status.as_ref().unwrap().current().unwrap().reason,
        "Aborting"
    );
}

#[test]
fn waiting_on_health_shows_why_and_polls() {
    let mut n = Node::new(&[]);
    n.seed("4.16.0");
    n.stage(Stage::Prep).unwrap();
    let mut s = n.state();
    let (_, e) = begin(&mut s, n.now).unwrap();
    complete(&mut s, e, Outcome::Waiting("node not ready".into()), n.now);
    assert_eq!(
        s.ibu
            .status
            .as_ref()
            .unwrap()
            .condition(ct::PREP_IN_PROGRESS)
            .unwrap()
            .message,
        "Waiting for system to stabilize before Prep stage can continue: node not ready"
    );
    assert_eq!(next(&s, n.now), Next::WaitUntil(n.now + HEALTH_POLL));
    assert_eq!(next(&s, n.now + HEALTH_POLL), Next::Work(Work::Health));
}

#[test]
fn extra_manifest_warnings_go_to_the_annotation() {
    let mut n = Node::new(&[]);
    n.sim.configmaps.insert(
        "openshift-lifecycle-agent/em".into(),
        BTreeMap::from([(
            "a.yaml".to_string(),
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm1\n  namespace: ns1\n---\napiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n".to_string(),
        )]),
    );
    n.patch(json!({"spec": {"extraManifests": [{"name": "em", "namespace": "openshift-lifecycle-agent"}]}})).unwrap();
    n.prep();
    assert_eq!(
        n.last().3,
        "Prep stage completed with extramanifests validation warning. Please check the annotation 'extra-manifest.lca.openshift.io/validation-warning' for details."
    );
    let ann = n.state().ibu.metadata.annotations.unwrap();
    assert_eq!(
        ann["extra-manifest.lca.openshift.io/validation-warning"],
        "ConfigMap[cm1] - namespace ns1 not found on cluster or not added in configmap in right order; Widget[w] - CRD not deployed on cluster"
    );
    // abort clears the annotation
    n.stage(Stage::Idle).unwrap();
    n.run();
    assert!(n.state().ibu.metadata.annotations.is_none());
}

#[test]
fn go_durations() {
    assert_eq!(go_duration(1800), "30m0s");
    assert_eq!(go_duration(90), "1m30s");
    assert_eq!(go_duration(45), "45s");
    assert_eq!(go_duration(3600), "1h0m0s");
}

#[test]
fn stateroot_names() {
    assert_eq!(stateroot_name("4.16.0-rc.1"), "rhcos_4.16.0_rc.1");
}

#[test]
fn metrics_see_stages_and_phases_end_with_their_durations() {
    let stage = |s: &str, r: &'static str| Ended::Stage(s.into(), r);
    let phase = |s: &str, p: &str| Ended::Phase(s.into(), p.into());
    let mut n = Node::new(&[]);
    n.prep();
    // One simulated second per step of work: Health, facts, seed, stateroot, precache; the
    // stage ends with its last phase, in the same save.
    assert_eq!(
        n.ended,
        vec![
            (phase("Prep", "Stateroot"), 1.0),
            (stage("Prep", "completed"), 5.0),
            (phase("Prep", "Precache"), 1.0),
        ]
    );
    let mut n = Node::new(&[Fault::Prep]);
    n.prep();
    assert_eq!(n.ended.last(), Some(&(stage("Prep", "failed"), 4.0)));
    assert!(
        !n.ended
            .iter()
            .any(|(e, _)| *e == stage("Prep", "completed"))
    );
}

#[test]
fn prep_frees_container_storage_above_the_annotated_threshold_unless_disabled() {
    use fleet_types::labels::{IMAGE_CLEANUP_ON_PREP, IMAGE_CLEANUP_THRESHOLD};
    let cleanup_of = |annotations: &[(&str, &str)]| {
        let mut n = Node::new(&[]);
        n.seed("4.16.0");
        let mut s = n.state();
        s.ibu.metadata.annotations = (!annotations.is_empty()).then(|| {
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        n.put(&s);
        n.stage(Stage::Prep).unwrap();
        loop {
            let mut s = n.state();
            let (w, e) = begin(&mut s, n.now).unwrap();
            if let Work::SetupStateroot { image_cleanup, .. } = w {
                return image_cleanup;
            }
            n.put(&s);
            let out = n.exec(w);
            let mut s = n.state();
            complete(&mut s, e, out, n.now);
            n.put(&s);
        }
    };
    assert_eq!(cleanup_of(&[]), Some(50));
    assert_eq!(cleanup_of(&[(IMAGE_CLEANUP_THRESHOLD, "75")]), Some(75));
    assert_eq!(cleanup_of(&[(IMAGE_CLEANUP_ON_PREP, "Disabled")]), None);
    // Not a percentage: off, as in the Lifecycle Agent.
    assert_eq!(cleanup_of(&[(IMAGE_CLEANUP_THRESHOLD, "lots")]), None);
    assert_eq!(cleanup_of(&[(IMAGE_CLEANUP_THRESHOLD, "101")]), None);
}
