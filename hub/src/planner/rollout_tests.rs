use std::sync::Arc;

use super::*;
use fleet_types::ibgu::{
    ActionMessage, ClusterState, ImageBasedGroupUpgradeStatus, PlanItem, RolloutStrategy,
};
use fleet_types::ibu::{
    Condition, ConditionStatus, ImageBasedUpgrade, ImageBasedUpgradeStatus, condition_type as ct,
};

fn t(minutes: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap() + Duration::minutes(minutes)
}

fn ibu(stage: Stage, conds: &[(&str, bool, &str, &str)]) -> ImageBasedUpgrade {
    let mut i = ImageBasedUpgrade::new("upgrade", Default::default());
    i.spec.stage = stage;
    i.status = Some(ImageBasedUpgradeStatus {
        conditions: conds
            .iter()
            .map(|(ty, ok, r, m)| Condition {
                type_: ty.to_string(),
                status: if *ok {
                    ConditionStatus::True
                } else {
                    ConditionStatus::False
                },
                reason: r.to_string(),
                message: m.to_string(),
                last_transition_time: None,
                observed_generation: None,
            })
            .collect(),
        ..Default::default()
    });
    i
}

fn idle() -> ImageBasedUpgrade {
    ibu(Stage::Idle, &[(ct::IDLE, true, "Idle", "Idle")])
}
fn prep_done() -> ImageBasedUpgrade {
    ibu(
        Stage::Prep,
        &[
            (ct::IDLE, false, "InProgress", "In progress"),
            (ct::PREP_IN_PROGRESS, false, "Completed", "Prep completed"),
            (
                ct::PREP_COMPLETED,
                true,
                "Completed",
                "Prep stage completed successfully",
            ),
        ],
    )
}
fn prep_failed(msg: &str) -> ImageBasedUpgrade {
    ibu(
        Stage::Prep,
        &[
            (ct::IDLE, false, "InProgress", "In progress"),
            (ct::PREP_COMPLETED, false, "Failed", "Prep failed"),
            (ct::PREP_IN_PROGRESS, false, "Failed", msg),
        ],
    )
}
fn upgrade_done() -> ImageBasedUpgrade {
    ibu(
        Stage::Upgrade,
        &[
            (ct::PREP_COMPLETED, true, "Completed", "ok"),
            (
                ct::UPGRADE_IN_PROGRESS,
                false,
                "Completed",
                "Upgrade completed",
            ),
            (
                ct::UPGRADE_COMPLETED,
                true,
                "Completed",
                "Upgrade completed",
            ),
        ],
    )
}
fn upgrade_failed(msg: &str) -> ImageBasedUpgrade {
    ibu(
        Stage::Upgrade,
        &[
            (ct::PREP_COMPLETED, true, "Completed", "ok"),
            (ct::UPGRADE_COMPLETED, false, "Failed", "Upgrade failed"),
            (ct::UPGRADE_IN_PROGRESS, false, "Failed", msg),
        ],
    )
}

fn selector_names(names: &[&str]) -> ClusterLabelSelector {
    ClusterLabelSelector {
        match_labels: BTreeMap::new(),
        match_expressions: vec![LabelSelectorRequirement {
            key: "name".into(),
            operator: SelectorOperator::In,
            values: names.iter().map(|s| s.to_string()).collect(),
        }],
    }
}

fn item(actions: &[Action], max: i64, timeout: Option<i64>) -> PlanItem {
    PlanItem {
        actions: actions.to_vec(),
        rollout_strategy: RolloutStrategy {
            max_concurrency: max,
            timeout,
            ..Default::default()
        },
    }
}

/// A fleet and one rollout, driven pass by pass.
struct World {
    spec: ImageBasedGroupUpgradeSpec,
    steps: Vec<StepState>,
    clusters: BTreeMap<String, ClusterInfo>,
    started: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    last: Option<Decision>,
}

impl World {
    fn new(names: &[&str], selected: &[&str], plan: Vec<PlanItem>) -> World {
        let clusters = names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    ClusterInfo {
                        labels: [("name".to_string(), n.to_string())].into(),
                        ibu: Some(Arc::new(idle())),
                    },
                )
            })
            .collect();
        World {
            spec: ImageBasedGroupUpgradeSpec {
                cluster_label_selectors: vec![selector_names(selected)],
                plan,
                ..Default::default()
            },
            steps: vec![],
            clusters,
            started: None,
            now: t(0),
            last: None,
        }
    }

    /// One pass; pushes are taken as accepted by the spokes. Every pass is also made as the
    /// engine makes it, given only the running batch's clusters: unless it says it needs the
    /// whole fleet, it must decide exactly the same.
    fn pass(&mut self) -> Decision {
        let d = advance_with(
            &self.spec,
            self.steps.clone(),
            &[],
            self.clusters.clone(),
            true,
            Before {
                started_at: self.started,
                waiting: self.waiting(),
            },
            self.now,
        );
        // Every scenario checks that the decision names exactly the progress it changed.
        assert!(
            d.changes_exactly(&self.steps),
            "changed progress: {:?}",
            d.changed
        );
        let partial = self.partial_pass();
        if !partial.needs_fleet {
            assert_eq!(
                partial, d,
                "a pass given only the running batch decides alike"
            );
        }
        self.steps = d.steps.clone();
        self.started = d.started_at;
        // As the store applies them: removals, then additions that keep an existing value.
        for (c, change) in &d.label_changes {
            let labels = &mut self.clusters.get_mut(c).unwrap().labels;
            labels.retain(|k, _| !change.remove.contains(k));
            for k in &change.add {
                labels.entry(k.clone()).or_default();
            }
        }
        // Each push is on its way until its outcome is recorded, as the engine records it.
        for p in &d.pushes {
            let pr = &self.steps[p.step].progress[&p.cluster];
            assert_eq!(pr.push_in_flight, Some(self.now), "{p:?}");
        }
        let accepted: Vec<PushResult> = d
            .pushes
            .iter()
            .map(|p| PushResult {
                step: p.step,
                action_index: p.action_index,
                cluster: p.cluster.clone(),
                outcome: PushOutcome::Accepted(p.stage),
                at: self.now,
            })
            .collect();
        apply_push_results(&mut self.steps, &mut Touched::default(), &accepted);
        self.last = Some(d.clone());
        d
    }

    /// The pass as the engine makes it: given what [`scope`] says the pass reads.
    fn partial_pass(&self) -> Decision {
        let scope = scope(&self.steps, self.now);
        let given = self
            .clusters
            .iter()
            .filter(|(n, _)| scope.whole_fleet || scope.reports.contains(n))
            .map(|(n, c)| {
                let ibu = c.ibu.clone().filter(|_| scope.reports.contains(n));
                let labels = c.labels.clone();
                (n.clone(), ClusterInfo { labels, ibu })
            })
            .collect();
        advance_with(
            &self.spec,
            self.steps.clone(),
            &[],
            given,
            scope.whole_fleet,
            Before {
                started_at: self.started,
                waiting: self.waiting(),
            },
            self.now,
        )
    }

    /// What held starts back after the last pass, as the rollout's row keeps it.
    fn waiting(&self) -> Option<Wait> {
        self.last.as_ref().and_then(|d| d.waiting)
    }

    fn report(&mut self, cluster: &str, ibu: ImageBasedUpgrade) {
        self.clusters.get_mut(cluster).unwrap().ibu = Some(Arc::new(ibu));
    }

    fn status(&self) -> ImageBasedGroupUpgradeStatus {
        let d = self.last.as_ref().unwrap();
        status(
            1,
            &self.steps,
            &self.spec,
            d.waiting,
            d.started_at,
            d.completed_at,
            self.now,
        )
    }

    fn ibgu_labels(&self, cluster: &str) -> Vec<String> {
        self.clusters[cluster]
            .labels
            .keys()
            .filter(|k| is_ibgu_label(k))
            .cloned()
            .collect()
    }

    fn entry(&self, cluster: &str) -> Option<ClusterState> {
        self.status()
            .clusters
            .into_iter()
            .find(|c| c.name == cluster)
    }
}

fn pushed(d: &Decision) -> Vec<(String, Stage)> {
    d.pushes
        .iter()
        .map(|p| (p.cluster.clone(), p.stage))
        .collect()
}

fn actions(v: &[ActionMessage]) -> Vec<Action> {
    v.iter().map(|a| a.action).collect()
}

#[test]
fn talm_reference_scenarios() {
    use Action::*;
    let all = ["spoke1", "spoke2", "spoke4", "spoke6"];
    let mut w = World::new(
        &all,
        &["spoke1", "spoke4", "spoke6"],
        vec![item(&[Prep], 2, None)],
    );
    let d = w.pass();
    assert_eq!(w.steps[0].clusters, vec!["spoke1", "spoke4", "spoke6"]);
    assert_eq!(w.steps[0].batch_count(), 2);
    assert_eq!(
        pushed(&d),
        vec![
            ("spoke1".into(), Stage::Prep),
            ("spoke4".into(), Stage::Prep)
        ]
    );
    let st = w.status();
    assert_eq!(
        st.clusters
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        vec!["spoke1", "spoke4"]
    );
    assert!(
        st.clusters
            .iter()
            .all(|c| c.current_action.as_ref().unwrap().action == Prep)
    );
    assert_eq!(
        st.conditions[0].message,
        "Waiting for plan step 0 to be completed"
    );
    assert_eq!(st.conditions[0].reason, "InProgress");

    // a second pass with nothing new pushes nothing
    assert!(w.pass().pushes.is_empty());

    w.report("spoke1", prep_done());
    w.report("spoke4", prep_done());
    let d = w.pass();
    assert_eq!(
        pushed(&d),
        vec![("spoke6".into(), Stage::Prep)],
        "batch 2 starts"
    );
    w.report("spoke6", prep_failed("failed to precache images"));
    w.pass();
    assert_eq!(
        w.ibgu_labels("spoke1"),
        vec!["lcm.openshift.io/ibgu-prep-completed"]
    );
    assert_eq!(
        w.ibgu_labels("spoke4"),
        vec!["lcm.openshift.io/ibgu-prep-completed"]
    );
    assert_eq!(
        w.ibgu_labels("spoke6"),
        vec!["lcm.openshift.io/ibgu-prep-failed"]
    );
    assert!(w.ibgu_labels("spoke2").is_empty());
    let st = w.status();
    assert_eq!(st.conditions[0].message, "All plan steps are completed");
    assert_eq!(st.conditions[1].type_, "Succeeded");
    assert_eq!(st.conditions[1].status, ConditionStatus::False);
    assert_eq!(
        st.conditions[1].message,
        "1 of 3 cluster(s) failed an action"
    );
    let s6 = w.entry("spoke6").unwrap();
    assert_eq!(s6.failed_actions[0].message, "failed to precache images");
    assert!(st.completed_at.is_some() && st.started_at == Some(t(0)));

    // appending [AbortOnFailure] selects only spoke6
    w.spec.plan.push(item(&[AbortOnFailure], 2, None));
    let d = w.pass();
    assert_eq!(w.steps[1].clusters, vec!["spoke6"]);
    assert_eq!(pushed(&d), vec![("spoke6".into(), Stage::Idle)]);
    w.report("spoke6", idle());
    w.pass();
    assert!(w.ibgu_labels("spoke6").is_empty());
    let s6 = w.entry("spoke6").unwrap();
    assert_eq!(actions(&s6.completed_actions), vec![AbortOnFailure]);
    assert_eq!(actions(&s6.failed_actions), vec![Prep]);

    // appending [Upgrade] selects spoke1 and spoke4 only
    w.spec.plan.push(item(&[Upgrade], 2, None));
    let d = w.pass();
    assert_eq!(w.steps[2].clusters, vec!["spoke1", "spoke4"]);
    assert_eq!(
        pushed(&d),
        vec![
            ("spoke1".into(), Stage::Upgrade),
            ("spoke4".into(), Stage::Upgrade)
        ]
    );
}

#[test]
fn failing_upgrade_and_finalize_clearing_labels() {
    use Action::*;
    let mut w = World::new(
        &["a", "b"],
        &["a", "b"],
        vec![
            item(&[Prep, Upgrade], 2, None),
            item(&[FinalizeUpgrade], 2, None),
        ],
    );
    w.pass();
    w.report("a", prep_done());
    w.report("b", prep_done());
    let d = w.pass();
    assert_eq!(
        pushed(&d),
        vec![("a".into(), Stage::Upgrade), ("b".into(), Stage::Upgrade)],
        "next action of the item"
    );
    w.report("a", upgrade_done());
    w.report("b", upgrade_failed("Failed restore CRs: r1"));
    let d = w.pass();
    assert_eq!(
        w.ibgu_labels("a"),
        vec![
            "lcm.openshift.io/ibgu-prep-completed",
            "lcm.openshift.io/ibgu-upgrade-completed"
        ]
    );
    // credit for the action completed before the failure, and labelled
    assert_eq!(
        w.ibgu_labels("b"),
        vec![
            "lcm.openshift.io/ibgu-prep-completed",
            "lcm.openshift.io/ibgu-upgrade-failed"
        ]
    );
    let b = w.entry("b").unwrap();
    assert_eq!(actions(&b.completed_actions), vec![Prep]);
    assert_eq!(b.failed_actions[0].message, "Failed restore CRs: r1");
    // step 1 (FinalizeUpgrade) selects only the cluster with upgrade-completed
    assert_eq!(w.steps[1].clusters, vec!["a"]);
    assert_eq!(pushed(&d), vec![("a".into(), Stage::Idle)]);
    w.report("a", idle());
    w.pass();
    assert!(
        w.ibgu_labels("a").is_empty(),
        "finalize removes every ibgu label"
    );
    assert_eq!(w.last.as_ref().unwrap().phase, Phase::Completed);
}

#[test]
fn a_failed_action_skips_the_rest_of_the_item() {
    use Action::*;
    let mut w = World::new(
        &["a"],
        &["a"],
        vec![item(&[Prep, Upgrade, FinalizeUpgrade], 1, None)],
    );
    w.pass();
    w.report("a", prep_failed("boom"));
    let d = w.pass();
    assert!(d.pushes.is_empty());
    let a = w.entry("a").unwrap();
    assert!(a.completed_actions.is_empty());
    assert_eq!(actions(&a.failed_actions), vec![Prep]);
    assert!(a.current_action.is_none());
    assert_eq!(d.phase, Phase::Completed);
}

#[test]
fn batch_timeout_formula_examples() {
    assert_eq!(
        batch_timeout(240, Duration::zero(), 5, 0),
        Duration::minutes(48)
    );
    assert_eq!(
        batch_timeout(240, Duration::minutes(40), 5, 1),
        Duration::minutes(50)
    );
    assert_eq!(
        batch_timeout(240, Duration::minutes(100), 5, 4),
        Duration::minutes(140)
    );
    assert_eq!(
        batch_timeout(240, Duration::minutes(300), 5, 4),
        Duration::zero()
    );
}

#[test]
fn batch_timeout_fails_the_unfinished_and_starts_the_next_batch() {
    use Action::*;
    let names = ["c1", "c2", "c3", "c4", "c5"];
    let mut w = World::new(&names, &names, vec![item(&[Prep], 1, Some(240))]);
    let d = w.pass();
    assert_eq!(
        d.wake_at,
        Some(t(48)),
        "the planner asks to look again at the batch deadline"
    );
    w.report("c1", prep_done());
    w.now = t(40);
    w.pass();
    assert_eq!(w.steps[0].current_batch, 1);
    assert_eq!(
        w.steps[0].batch_deadline(w.now),
        t(90),
        "batch 2 starting at +40 min gets 50 min"
    );
    w.now = t(90);
    let d = w.pass();
    assert_eq!(w.steps[0].current_batch, 2);
    assert!(d.events.iter().any(|e| e.event == "BatchTimedOut"));
    let c2 = w.entry("c2").unwrap();
    assert_eq!(
        c2.failed_actions[0].message,
        "Prep timed out: batch 2 timeout passed"
    );
    assert_eq!(
        w.ibgu_labels("c2"),
        vec!["lcm.openshift.io/ibgu-prep-failed"]
    );
    assert_eq!(w.status().summary[0].timed_out, 1);
}

#[test]
fn step_timeout_records_clusters_that_never_started() {
    use Action::*;
    let names = ["c1", "c2", "c3", "c4"];
    let mut w = World::new(
        &names,
        &names,
        vec![item(&[Prep], 2, Some(60)), item(&[Upgrade], 2, None)],
    );
    w.pass();
    // the first batch takes the whole item timeout (its batch deadline is 30 min)
    w.report("c1", prep_done());
    w.now = t(29);
    w.pass();
    assert_eq!(w.steps[0].current_batch, 0);
    w.now = t(60);
    let d = w.pass();
    let step = &w.steps[0];
    assert!(step.timed_out);
    let c3 = w.entry("c3").unwrap();
    assert_eq!(
        c3.failed_actions[0].message,
        "not started before the step timeout"
    );
    assert!(d.events.iter().any(|e| e.event == "StepTimedOut"));
    let s = &w.status().summary[0];
    assert_eq!(
        (
            s.selected,
            s.completed,
            s.failed,
            s.timed_out,
            s.in_progress,
            s.pending
        ),
        (4, 1, 0, 3, 0, 0)
    );
    // the next item starts and selects the prep-completed cluster only
    assert_eq!(w.steps[1].clusters, vec!["c1"]);
}

#[test]
fn an_item_selecting_nothing_finishes_at_once() {
    use Action::*;
    let mut w = World::new(&["a"], &["a"], vec![item(&[Upgrade], 1, None)]);
    let d = w.pass();
    assert_eq!(w.steps[0].clusters, Vec::<String>::new());
    assert_eq!(d.phase, Phase::Completed);
    assert_eq!(w.status().conditions[1].status, ConditionStatus::True);
}

#[test]
fn selection_is_frozen_when_the_step_starts() {
    use Action::*;
    let mut w = World::new(&["a", "b"], &["a"], vec![item(&[Prep], 5, None)]);
    w.pass();
    // b gets a label that would match, but the running step keeps its selection
    w.spec.cluster_label_selectors = vec![selector_names(&["a", "b"])];
    let d = w.pass();
    assert_eq!(w.steps[0].clusters, vec!["a"]);
    assert!(d.pushes.is_empty());
}

#[test]
fn existing_labels_are_never_overwritten() {
    use Action::*;
    let mut w = World::new(&["a"], &["a"], vec![item(&[Prep], 1, None)]);
    w.clusters
        .get_mut("a")
        .unwrap()
        .labels
        .insert("lcm.openshift.io/ibgu-prep-completed".into(), "kept".into());
    w.pass();
    w.report("a", prep_done());
    let d = w.pass();
    assert_eq!(
        w.clusters["a"].labels["lcm.openshift.io/ibgu-prep-completed"],
        "kept"
    );
    assert!(d.label_changes.is_empty());
}

#[test]
fn a_refused_push_fails_fast() {
    use Action::*;
    let mut w = World::new(&["a", "b"], &["a", "b"], vec![item(&[Upgrade], 2, None)]);
    for c in ["a", "b"] {
        w.clusters
            .get_mut(c)
            .unwrap()
            .labels
            .insert(completed_label(Prep), String::new());
    }
    w.pass();
    w.steps[0].progress.get_mut("a").unwrap().refused =
        Some("the stage transition is not permitted".into());
    w.pass();
    let a = w.entry("a").unwrap();
    assert_eq!(
        a.failed_actions[0].message,
        "the stage transition is not permitted"
    );
    assert_eq!(
        w.ibgu_labels("a"),
        vec![completed_label(Prep), failed_label(Upgrade)]
    );
    assert!(
        w.entry("b").unwrap().current_action.is_some(),
        "b is not held by a's failure"
    );
}

#[test]
fn pushes_back_off_while_a_spoke_is_unreachable() {
    use Action::*;
    let mut w = World::new(&["a"], &["a"], vec![item(&[Prep], 1, None)]);
    let d = w.pass();
    assert_eq!(d.pushes.len(), 1);
    // the push failed
    let p = w.steps[0].progress.get_mut("a").unwrap();
    p.pushed_stage = None;
    p.push_failures = 3;
    p.pushed_at = Some(w.now);
    let d = w.pass();
    assert!(d.pushes.is_empty());
    assert_eq!(
        d.wake_at.unwrap(),
        t(0) + Duration::seconds(2),
        "backoff after 3 failures"
    );
    w.now = t(0) + Duration::seconds(2);
    assert_eq!(w.pass().pushes.len(), 1);
}

#[test]
fn a_push_is_sent_again_if_the_spoke_never_shows_the_stage() {
    use Action::*;
    let mut w = World::new(&["a"], &["a"], vec![item(&[Prep], 1, None)]);
    w.pass();
    assert!(w.pass().pushes.is_empty());
    w.now = t(0) + PUSH_RESEND;
    assert_eq!(w.pass().pushes.len(), 1);
    // once the spoke shows the stage, no more pushes
    let mut running = prep_done();
    running.status = None;
    w.report("a", running);
    w.now = t(10);
    assert!(w.pass().pushes.is_empty());
}

#[test]
fn stale_failures_from_before_the_push_do_not_count() {
    use Action::*;
    // a cluster whose earlier upgrade failed is selected by a later [Upgrade] item: until
    // the push is answered, its old UpgradeCompleted=False is not this item's failure
    let mut w = World::new(&["a"], &["a"], vec![item(&[Upgrade], 1, None)]);
    w.clusters
        .get_mut("a")
        .unwrap()
        .labels
        .insert(completed_label(Prep), String::new());
    let mut old = upgrade_failed("old failure");
    old.spec.stage = Stage::Idle;
    w.report("a", old);
    let d = advance(&w.spec, &w.steps, &w.clusters, None, w.now);
    assert_eq!(d.pushes.len(), 1);
    assert_eq!(d.steps[0].progress["a"].phase, ClusterPhase::Running);
}

#[test]
fn abort_on_failure_splits_each_selector_in_two() {
    let sels = item_selectors(&[selector_names(&["a"])], Action::AbortOnFailure);
    assert_eq!(sels.len(), 2);
    let keys: Vec<&str> = sels
        .iter()
        .map(|s| s.match_expressions[1].key.as_str())
        .collect();
    assert_eq!(
        keys,
        vec![
            "lcm.openshift.io/ibgu-prep-failed",
            "lcm.openshift.io/ibgu-upgrade-failed"
        ]
    );
    let abort = item_selectors(&[selector_names(&["a"])], Action::Abort);
    assert_eq!(
        abort[0].match_expressions[1].operator,
        SelectorOperator::DoesNotExist
    );
}

#[test]
fn checks_follow_the_action_table() {
    use Action::*;
    assert_eq!(check(Prep, Some(&prep_done())), Check::Done);
    assert_eq!(
        check(Prep, Some(&prep_failed("x"))),
        Check::Failed("x".into())
    );
    assert_eq!(check(Prep, Some(&idle())), Check::Waiting);
    assert_eq!(check(Upgrade, Some(&upgrade_done())), Check::Done);
    let rb = ibu(
        Stage::Rollback,
        &[(
            ct::ROLLBACK_COMPLETED,
            true,
            "Completed",
            "Rollback completed",
        )],
    );
    assert_eq!(check(Rollback, Some(&rb)), Check::Done);
    for a in [FinalizeUpgrade, FinalizeRollback, Abort, AbortOnFailure] {
        assert_eq!(check(a, Some(&idle())), Check::Done);
    }
    let failed = ibu(
        Stage::Idle,
        &[(
            ct::IDLE,
            false,
            "FinalizeFailed",
            "busy Perform cleanup manually",
        )],
    );
    assert_eq!(
        check(FinalizeUpgrade, Some(&failed)),
        Check::Failed("busy Perform cleanup manually".into())
    );
    let invalid = ibu(
        Stage::Upgrade,
        &[(
            ct::UPGRADE_IN_PROGRESS,
            false,
            "InvalidTransition",
            "Previous stage not succeeded",
        )],
    );
    assert_eq!(
        check(Upgrade, Some(&invalid)),
        Check::Failed("Previous stage not succeeded".into())
    );
    assert_eq!(check(Prep, None), Check::Waiting);
    // An IPConfig change holds the stage: a clear failure at once.
    let blocked = ibu(
        Stage::Prep,
        &[(ct::PREP_IN_PROGRESS, false, "Blocked", "IPC is not idle")],
    );
    assert_eq!(
        check(Prep, Some(&blocked)),
        Check::Failed(
            "Prep blocked by the cluster's Lifecycle Agent: IPC is not idle (an IPConfig \
             change is in progress; the stage can run once it is Idle)"
                .into()
        )
    );
}

#[test]
fn ended_actions_carry_how_long_they_ran() {
    use Action::*;
    let mut w = World::new(
        &["a", "b"],
        &["a", "b"],
        vec![item(&[Prep, Upgrade], 2, None)],
    );
    w.pass();
    w.now = t(7);
    w.report("a", prep_done());
    w.report("b", prep_failed("seed image not found"));
    let d = w.pass();
    let took: Vec<(Option<String>, &str, Option<f64>)> = d
        .events
        .iter()
        .map(|e| (e.cluster.clone(), e.event, e.took))
        .collect();
    assert!(
        took.contains(&(Some("a".into()), "ActionCompleted", Some(420.0))),
        "{took:?}"
    );
    assert!(
        took.contains(&(Some("b".into()), "ActionFailed", Some(420.0))),
        "{took:?}"
    );
    // The next action starts now: it has no duration yet.
    assert!(
        took.contains(&(Some("a".into()), "ActionStarted", None)),
        "{took:?}"
    );
    w.now = t(10);
    w.report("a", upgrade_done());
    let d = w.pass();
    let upgrade = d
        .events
        .iter()
        .find(|e| e.event == "ActionCompleted")
        .unwrap();
    assert_eq!((upgrade.action, upgrade.took), (Some(Upgrade), Some(180.0)));
}

#[test]
fn a_push_outcome_lands_only_on_the_action_it_was_for() {
    let running = |action_index: usize| ClusterProgress {
        phase: ClusterPhase::Running,
        action_index,
        completed: vec![Action::Prep; action_index],
        started_at: Some(t(0)),
        action_started_at: Some(t(0)),
        ..ClusterProgress::pending(0)
    };
    let mut steps = vec![StepState {
        step: 0,
        actions: vec![Action::Prep, Action::Upgrade],
        clusters: vec!["a".into(), "b".into(), "c".into()],
        max_concurrency: 3,
        timeout_minutes: 240,
        started_at: t(0),
        current_batch: 0,
        batch_started_at: t(0),
        completed_at: None,
        timed_out: false,
        progress: [
            ("a".to_string(), running(1)),
            ("b".to_string(), running(1)),
            (
                "c".to_string(),
                ClusterProgress {
                    push_failures: 2,
                    ..running(1)
                },
            ),
        ]
        .into(),
        batch_ends: vec![],
        halt: None,
        paused_since: None,
        paused_ms: 0,
        batch_paused_ms: 0,
        recent_starts: vec![],
    }];
    let result = |cluster: &str, action_index: usize, outcome: PushOutcome| PushResult {
        step: 0,
        action_index,
        cluster: cluster.into(),
        outcome,
        at: t(1),
    };
    let mut touched = Touched::default();
    apply_push_results(
        &mut steps,
        &mut touched,
        &[
            // a late refusal of the Prep push must not fail the Upgrade "a" is on
            result("a", 0, PushOutcome::Refused("late".into())),
            result("b", 1, PushOutcome::Refused("now".into())),
            result("c", 1, PushOutcome::Accepted(Stage::Upgrade)),
            result("nobody", 1, PushOutcome::Accepted(Stage::Upgrade)),
        ],
    );
    let p = &steps[0].progress;
    assert_eq!(
        p["a"],
        running(1),
        "an outcome for another action changes nothing"
    );
    assert_eq!(
        touched.changed(&steps),
        BTreeMap::from([(0, vec!["b".to_string(), "c".to_string()])]),
        "what changed, for the engine to write"
    );
    let p = &steps[0].progress;
    assert_eq!(p["b"].refused.as_deref(), Some("now"));
    assert_eq!(p["b"].pushed_at, Some(t(1)));
    assert_eq!(
        (p["c"].pushed_stage, p["c"].push_failures, p["c"].pushed_at),
        (Some(Stage::Upgrade), 0, Some(t(1)))
    );
    apply_push_results(
        &mut steps,
        &mut touched,
        &[result("c", 1, PushOutcome::Unreachable("timeout".into()))],
    );
    let c = &steps[0].progress["c"];
    assert_eq!((c.pushed_stage, c.push_failures), (None, 1));
    // the next pass backs off from an unreachable spoke, then tries again
    let spec = ImageBasedGroupUpgradeSpec {
        cluster_label_selectors: vec![selector_names(&["a", "b", "c"])],
        plan: vec![item(&[Action::Prep, Action::Upgrade], 3, None)],
        ..Default::default()
    };
    let fleet: BTreeMap<String, ClusterInfo> = ["a", "b", "c"]
        .iter()
        .map(|n| (n.to_string(), ClusterInfo::default()))
        .collect();
    let d = advance(&spec, &steps, &fleet, Some(t(0)), t(1));
    assert!(!d.pushes.iter().any(|p| p.cluster == "c"), "{:?}", d.pushes);
    let later = t(1) + push_backoff(1);
    let d = advance(&spec, &steps, &fleet, Some(t(0)), later);
    assert!(d.pushes.iter().any(|p| p.cluster == "c"), "{:?}", d.pushes);
    assert!(d.changes_exactly(&steps));
    // A change the decision does not name is caught by the check every scenario makes.
    let mut unnamed = d.clone();
    unnamed.changed.get_mut(&0).unwrap().retain(|c| c != "c");
    assert!(!unnamed.changes_exactly(&steps));
}

#[test]
fn a_push_on_its_way_is_sent_once_until_recorded_or_lapsed() {
    let spec = ImageBasedGroupUpgradeSpec {
        cluster_label_selectors: vec![selector_names(&["a", "b"])],
        plan: vec![item(&[Action::Prep], 2, None)],
        ..Default::default()
    };
    let fleet = World::new(&["a", "b"], &["a", "b"], vec![]).clusters;
    let d = advance(&spec, &[], &fleet, None, t(0));
    assert_eq!(
        pushed(&d),
        vec![("a".into(), Stage::Prep), ("b".into(), Stage::Prep)]
    );
    let claims = |d: &Decision| -> Vec<Option<DateTime<Utc>>> {
        d.steps[0]
            .progress
            .values()
            .map(|p| p.push_in_flight)
            .collect()
    };
    assert_eq!(claims(&d), vec![Some(t(0)); 2], "stored with the decision");
    // Another pass (this hub's or another's) before any outcome is recorded sends nothing
    // and names the clusters whose answers it waits on.
    let again = advance(
        &spec,
        &d.steps,
        &fleet,
        Some(t(0)),
        t(0) + Duration::seconds(5),
    );
    assert!(again.pushes.is_empty(), "{:?}", again.pushes);
    assert_eq!(
        again.awaiting_answers,
        vec!["a".to_string(), "b".to_string()]
    );
    assert_eq!(again.wake_at, Some(t(0) + PUSH_RESEND));
    assert!(again.changed.is_empty(), "waiting writes nothing");
    // An outcome clears the claim of the push it answers, not one made by a later pass.
    let answer = |cluster: &str, at| PushResult {
        step: 0,
        action_index: 0,
        cluster: cluster.into(),
        outcome: PushOutcome::Accepted(Stage::Prep),
        at,
    };
    let (a, stale) = (answer("a", t(0)), answer("b", t(0) - Duration::seconds(40)));
    let later = advance_with(
        &spec,
        d.steps.clone(),
        &[&a, &stale],
        fleet.clone(),
        true,
        Before {
            started_at: Some(t(0)),
            waiting: None,
        },
        t(0) + Duration::seconds(5),
    );
    let p = &later.steps[0].progress;
    assert_eq!(
        (p["a"].push_in_flight, p["a"].pushed_stage),
        (None, Some(Stage::Prep))
    );
    assert_eq!(
        p["b"].push_in_flight,
        Some(t(0)),
        "not the stale answer's claim"
    );
    assert_eq!(
        later.changed,
        BTreeMap::from([(0, vec!["a".to_string(), "b".to_string()])])
    );
    // A claim whose outcome is never recorded (its hub stopped) lapses after PUSH_RESEND.
    let lapsed = advance(&spec, &d.steps, &fleet, Some(t(0)), t(0) + PUSH_RESEND);
    assert_eq!(pushed(&lapsed), pushed(&d));
    assert_eq!(claims(&lapsed), vec![Some(t(0) + PUSH_RESEND); 2]);
}

#[test]
fn a_pass_given_part_of_the_fleet_asks_for_the_rest_when_it_needs_it() {
    let mut w = World::new(
        &["a", "b", "c"],
        &["a", "b", "c"],
        vec![item(&[Action::Prep], 2, None)],
    );
    // Selecting for a step needs every cluster: the scope says so up front, and a pass given
    // less says it needed more.
    assert!(scope(&w.steps, w.now).whole_fleet);
    let given_none = advance_with(
        &w.spec,
        vec![],
        &[],
        BTreeMap::new(),
        false,
        Before::default(),
        w.now,
    );
    assert!(
        given_none.needs_fleet,
        "selecting for a step needs every cluster"
    );
    w.pass();
    w.report("a", prep_done());
    let d = w.partial_pass();
    assert!(!d.needs_fleet, "the running batch is enough: {d:?}");
    assert_eq!(d.label_changes.keys().collect::<Vec<_>>(), vec!["a"]);
    // once a cluster has finished the step, a pass needs only those still at work
    assert_eq!(w.steps[0].batch_at_work(), ["a", "b"]);
    w.pass();
    assert_eq!(w.steps[0].batch_at_work(), ["b"]);
    let d = w.partial_pass();
    assert!(!d.needs_fleet, "b alone is enough: {d:?}");
    assert!(!scope(&w.steps, w.now).whole_fleet);
    // a step timeout fails (and labels) clusters of batches that never started: the scope
    // reads the whole fleet for it
    w.now = t(60 * 24);
    assert!(scope(&w.steps, w.now).whole_fleet);
    assert!(!w.partial_pass().needs_fleet);
    let d = w.pass();
    assert!(d.label_changes.contains_key("c"), "{:?}", d.label_changes);
}

#[test]
fn decisions_on_reports_name_their_cause_and_status_lists_clusters_naturally() {
    let names = ["c1", "c2", "c10"];
    let plan = vec![
        item(&[Action::Prep], 2, None),
        item(&[Action::Upgrade], 3, None),
    ];
    let mut w = World::new(&names, &names, plan);
    let causes = |d: &Decision| -> Vec<(String, PushCause)> {
        d.pushes
            .iter()
            .map(|p| (p.cluster.clone(), p.cause))
            .collect()
    };
    // Batches keep the plain name order: c1, c10 first, then c2.
    let d = w.pass();
    assert_eq!(
        causes(&d),
        [
            ("c1".into(), PushCause::Other),
            ("c10".into(), PushCause::Other)
        ],
        "a new rollout is no report's doing"
    );
    assert!(d.reported.is_empty());
    // A report that ends an action and leads to no push is still a decision.
    w.report("c1", prep_done());
    let d = w.pass();
    assert_eq!(d.reported, ["c1"]);
    assert!(d.pushes.is_empty(), "c10 is still at work");
    // The report that ends the batch starts the next one.
    w.report("c10", prep_done());
    let d = w.pass();
    assert_eq!(d.reported, ["c10"]);
    assert_eq!(causes(&d), [("c2".into(), PushCause::Reports)]);
    // The report that ends the step starts the next step.
    w.report("c2", prep_failed("no space left"));
    let d = w.pass();
    assert_eq!(d.reported, ["c2"]);
    assert_eq!(
        causes(&d),
        [
            ("c1".into(), PushCause::Reports),
            ("c10".into(), PushCause::Reports)
        ]
    );
    let listed: Vec<String> = w.status().clusters.into_iter().map(|c| c.name).collect();
    assert_eq!(listed, ["c1", "c2", "c10"], "natural order for people");
}

#[test]
fn the_next_action_of_an_item_follows_the_clusters_own_report() {
    let mut w = World::new(
        &["a"],
        &["a"],
        vec![item(&[Action::Prep, Action::Upgrade], 1, None)],
    );
    w.pass();
    w.report("a", prep_done());
    let d = w.pass();
    assert_eq!(d.reported, ["a"]);
    assert_eq!(d.pushes.len(), 1);
    assert_eq!(
        (d.pushes[0].action, d.pushes[0].cause),
        (Action::Upgrade, PushCause::OwnReport)
    );
}

#[test]
fn condition_times_move_only_when_the_condition_changes() {
    let cond = |message: &str, at: i64| Condition {
        type_: "Progressing".into(),
        status: ConditionStatus::True,
        reason: "InProgress".into(),
        message: message.into(),
        last_transition_time: Some(t(at)),
        observed_generation: Some(1),
    };
    let before = ImageBasedGroupUpgradeStatus {
        conditions: vec![cond("Waiting for plan step 0 to be completed", 0)],
        ..Default::default()
    };
    let mut same = ImageBasedGroupUpgradeStatus {
        conditions: vec![cond("Waiting for plan step 0 to be completed", 5)],
        ..Default::default()
    };
    keep_transition_times(&mut same, &before);
    assert_eq!(same.conditions[0].last_transition_time, Some(t(0)));
    let mut moved = ImageBasedGroupUpgradeStatus {
        conditions: vec![cond("Waiting for plan step 1 to be completed", 5)],
        ..Default::default()
    };
    keep_transition_times(&mut moved, &before);
    assert_eq!(moved.conditions[0].last_transition_time, Some(t(5)));
}

// The rollout controls of `ibgu-hub.md` section 5.

fn events<'d>(d: &'d Decision, kind: &str) -> Vec<&'d str> {
    d.events
        .iter()
        .filter(|e| e.event == kind)
        .map(|e| e.message.as_str())
        .collect()
}

fn condition<'s>(st: &'s ImageBasedGroupUpgradeStatus, type_: &str) -> Option<&'s Condition> {
    st.conditions.iter().find(|c| c.type_ == type_)
}

#[test]
fn the_failure_budget_halts_the_item_and_every_later_one() {
    use Action::*;
    use fleet_types::ibgu::IntOrPercent;
    let names = ["a", "b", "c", "d", "e", "f"];
    let mut first = item(&[Prep], 2, None);
    first.rollout_strategy.max_failures = Some(IntOrPercent::Int(1));
    let mut w = World::new(&names, &names, vec![first, item(&[Upgrade], 2, None)]);
    w.pass();
    w.report("a", prep_failed("no space left"));
    w.report("b", prep_done());
    let d = w.pass();
    assert!(
        events(&d, "RolloutHalted").is_empty(),
        "one failure is allowed"
    );
    assert_eq!(
        pushed(&d),
        vec![("c".into(), Stage::Prep), ("d".into(), Stage::Prep)]
    );
    w.report("c", prep_failed("pull failed"));
    let d = w.pass();
    assert_eq!(
        events(&d, "RolloutHalted"),
        vec!["plan step 0: 2 cluster(s) failed, more than maxFailures 1"]
    );
    assert!(d.pushes.is_empty());
    // The running cluster finishes; nothing else starts, no later item either.
    let st = w.status();
    assert_eq!(
        condition(&st, "Progressing").unwrap().status,
        ConditionStatus::True
    );
    w.report("d", prep_done());
    let d = w.pass();
    assert!(d.pushes.is_empty());
    assert_eq!(events(&d, "StepHalted").len(), 1);
    assert_eq!(d.phase, Phase::Completed);
    assert_eq!(w.steps.len(), 1, "the second item never starts");
    let st = w.status();
    let progressing = condition(&st, "Progressing").unwrap();
    assert_eq!(
        (
            progressing.status,
            progressing.reason.as_str(),
            progressing.message.as_str()
        ),
        (
            ConditionStatus::False,
            FAILURE_BUDGET_EXCEEDED,
            "plan step 0: 2 cluster(s) failed, more than maxFailures 1"
        )
    );
    assert_eq!(
        condition(&st, "Succeeded").unwrap().reason,
        FAILURE_BUDGET_EXCEEDED
    );
    assert_eq!(st.summary[0].pending, 2);
    // Later passes change nothing.
    w.now = t(500);
    let d = w.pass();
    assert!(d.pushes.is_empty() && d.events.is_empty());
}

#[test]
fn a_percentage_budget_is_of_the_items_clusters_rounded_down() {
    use Action::*;
    use fleet_types::ibgu::IntOrPercent;
    let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut it = item(&[Prep], 10, None);
    it.rollout_strategy.max_failures = Some(IntOrPercent::String("15%".into()));
    let mut w = World::new(&names, &names, vec![it]);
    w.pass();
    w.report("c0", prep_failed("x"));
    assert!(
        events(&w.pass(), "RolloutHalted").is_empty(),
        "1 <= 15% of 10"
    );
    w.report("c1", prep_failed("x"));
    assert_eq!(
        events(&w.pass(), "RolloutHalted"),
        vec!["plan step 0: 2 cluster(s) failed, more than maxFailures 15%"]
    );
}

#[test]
fn a_failed_canary_halts_before_any_other_cluster_starts() {
    use Action::*;
    let names = ["a", "b", "c", "d", "e"];
    let mut it = item(&[Prep, Upgrade], 2, None);
    it.rollout_strategy.canary_clusters = Some(1);
    let mut w = World::new(&names, &names, vec![it]);
    w.clusters
        .get_mut("d")
        .unwrap()
        .labels
        .insert(fleet_types::labels::CANARY_LABEL.into(), String::new());
    let d = w.pass();
    assert_eq!(
        pushed(&d),
        vec![("d".into(), Stage::Prep)],
        "the labelled canary first"
    );
    assert_eq!(w.steps[0].batch_count(), 3);
    w.report("d", prep_done());
    let d = w.pass();
    assert_eq!(pushed(&d), vec![("d".into(), Stage::Upgrade)]);
    w.report("d", upgrade_failed("the new release did not come up"));
    let d = w.pass();
    assert_eq!(
        events(&d, "RolloutHalted"),
        vec!["plan step 0: canary d failed Upgrade"]
    );
    assert!(d.pushes.is_empty());
    assert_eq!(d.phase, Phase::Completed);
    let st = w.status();
    assert_eq!(condition(&st, "Progressing").unwrap().reason, CANARY_FAILED);
    assert_eq!(st.summary[0].pending, 4);
}

#[test]
fn after_good_canaries_batches_grow() {
    use Action::*;
    let names: Vec<String> = (0..12).map(|i| format!("c{i:02}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut it = item(&[Prep], 4, None);
    it.rollout_strategy.canary_clusters = Some(1);
    it.rollout_strategy.batch_growth_factor = Some(2.0);
    let mut w = World::new(&names, &names, vec![it]);
    let mut sizes = vec![];
    loop {
        let d = w.pass();
        if d.phase == Phase::Completed {
            break;
        }
        sizes.push(d.pushes.len());
        for p in &d.pushes {
            w.report(&p.cluster, prep_done());
        }
    }
    assert_eq!(sizes, vec![1, 1, 2, 4, 4]);
}

#[test]
fn paused_rollouts_start_nothing_and_their_timeouts_wait() {
    use Action::*;
    let names = ["a", "b", "c", "d"];
    let mut w = World::new(&names, &names, vec![item(&[Prep], 2, Some(60))]);
    w.spec.paused = true;
    let d = w.pass();
    assert!(
        d.pushes.is_empty() && w.steps.is_empty(),
        "no item starts while paused"
    );
    assert_eq!(d.waiting, Some(Wait::Paused));
    assert_eq!(condition(&w.status(), "Paused").unwrap().reason, "Paused");
    w.spec.paused = false;
    w.now = t(10);
    let d = w.pass();
    assert_eq!(d.pushes.len(), 2);
    assert!(condition(&w.status(), "Paused").is_none());
    // Paused mid-batch: the running clusters go on; the next batch waits.
    w.spec.paused = true;
    w.now = t(20);
    w.pass();
    w.report("a", prep_done());
    w.report("b", prep_done());
    w.now = t(30);
    let d = w.pass();
    assert!(d.pushes.is_empty());
    assert_eq!(w.steps[0].completed_at, None);
    // An hour paused: past the step's 60 minutes, yet nothing times out.
    w.now = t(90);
    let d = w.pass();
    assert!(events(&d, "StepTimedOut").is_empty());
    w.spec.paused = false;
    w.now = t(100);
    let d = w.pass();
    assert_eq!(
        pushed(&d),
        vec![("c".into(), Stage::Prep), ("d".into(), Stage::Prep)]
    );
    // 80 minutes paused: the step (started at 10, 60 minutes) now ends at 150.
    assert_eq!(w.steps[0].deadline(w.now), t(150));
    w.now = t(149);
    assert!(events(&w.pass(), "StepTimedOut").is_empty());
    w.now = t(150);
    assert_eq!(events(&w.pass(), "StepTimedOut").len(), 1);
}

fn preparing() -> ImageBasedUpgrade {
    ibu(
        Stage::Prep,
        &[
            (ct::IDLE, false, "InProgress", "In progress"),
            (
                ct::PREP_IN_PROGRESS,
                true,
                "InProgress",
                "Pulling the seed image",
            ),
        ],
    )
}

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

#[test]
fn starts_happen_only_inside_the_maintenance_window() {
    use Action::*;
    use fleet_types::ibgu::MaintenanceWindow;
    let names = ["a", "b", "c"];
    let mut w = World::new(&names, &names, vec![item(&[Prep, Upgrade], 2, Some(4000))]);
    w.spec.maintenance_window = Some(MaintenanceWindow {
        start: "01:00".into(),
        duration_minutes: 60,
        time_zone: Some("America/New_York".into()),
    });
    // New York is on EST (UTC-5) until 2027-03-14: 01:00 local is 06:00 UTC.
    w.now = at("2027-03-13T12:00:00Z");
    let d = w.pass();
    assert!(d.pushes.is_empty() && w.steps.is_empty());
    assert_eq!(d.wake_at, Some(at("2027-03-14T06:00:00Z")));
    assert_eq!(
        events(&d, "WaitingForMaintenanceWindow"),
        vec![
            "waiting for the maintenance window 01:00 America/New_York: it opens at \
             2027-03-14T06:00:00+00:00"
        ]
    );
    assert!(
        condition(&w.status(), "Progressing")
            .unwrap()
            .message
            .ends_with("; waiting for the maintenance window 01:00 America/New_York")
    );
    w.now = at("2027-03-13T18:00:00Z");
    assert!(
        events(&w.pass(), "WaitingForMaintenanceWindow").is_empty(),
        "said once"
    );
    w.now = at("2027-03-14T06:00:00Z");
    let d = w.pass();
    assert_eq!(d.pushes.len(), 2);
    // The window closes while a and b prepare; their Upgrade waits for the next window,
    // which after the change to EDT (UTC-4) opens at 05:00 UTC.
    w.report("a", prep_done());
    w.report("b", preparing());
    w.now = at("2027-03-14T07:00:00Z");
    let d = w.pass();
    assert!(d.pushes.is_empty(), "no Upgrade starts outside the window");
    assert_eq!(d.wake_at, Some(at("2027-03-15T05:00:00Z")));
    w.now = at("2027-03-15T05:00:00Z");
    let d = w.pass();
    assert_eq!(pushed(&d), vec![("a".into(), Stage::Upgrade)]);
}

#[test]
fn starts_keep_to_the_rate_per_minute() {
    use Action::*;
    let names = ["a", "b", "c", "d", "e"];
    let mut it = item(&[Prep], 5, None);
    it.rollout_strategy.max_starts_per_minute = Some(2);
    let mut w = World::new(&names, &names, vec![it]);
    let d = w.pass();
    assert_eq!(d.pushes.len(), 2);
    assert_eq!(d.waiting, Some(Wait::Rate));
    assert_eq!(d.wake_at.unwrap(), t(1));
    w.report("a", preparing());
    w.report("b", preparing());
    w.now = t(0) + Duration::seconds(30);
    assert!(w.pass().pushes.is_empty());
    w.now = t(1);
    assert_eq!(
        pushed(&w.pass()),
        vec![("c".into(), Stage::Prep), ("d".into(), Stage::Prep)]
    );
    w.report("c", preparing());
    w.report("d", preparing());
    w.now = t(2);
    let d = w.pass();
    assert_eq!(pushed(&d), vec![("e".into(), Stage::Prep)]);
    assert_eq!(d.waiting, None);
}

#[test]
fn a_failed_prep_is_aborted_and_tried_again_up_to_retries() {
    use Action::*;
    let names = ["a"];
    let mut it = item(&[Prep], 1, None);
    it.rollout_strategy.retries = Some(1);
    let mut w = World::new(&names, &names, vec![it]);
    w.pass();
    w.report("a", prep_failed("registry timeout"));
    let d = w.pass();
    assert_eq!(
        events(&d, "ActionRetried"),
        vec!["Prep failed (registry timeout): aborting, then attempt 2 of 2"]
    );
    assert_eq!(pushed(&d), vec![("a".into(), Stage::Idle)]);
    assert!(w.ibgu_labels("a").is_empty(), "not failed yet");
    w.report("a", idle());
    let d = w.pass();
    assert_eq!(pushed(&d), vec![("a".into(), Stage::Prep)]);
    w.report("a", prep_failed("registry timeout again"));
    let d = w.pass();
    assert!(events(&d, "ActionRetried").is_empty());
    assert_eq!(events(&d, "ActionFailed"), vec!["registry timeout again"]);
    assert_eq!(
        w.ibgu_labels("a"),
        vec!["lcm.openshift.io/ibgu-prep-failed"]
    );
}
