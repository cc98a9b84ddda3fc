//! Property tests of the planner's rollout controls (`ibgu-hub.md` section 5): for random
//! fleets, plans, failure patterns and clocks, no control is ever violated.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use fleet_types::ibgu::{
    Action, ClusterLabelSelector, DisruptionBudget, ImageBasedGroupUpgradeSpec, IntOrPercent,
    MaintenanceWindow, PlanItem, RolloutStrategy,
};
use fleet_types::ibu::{
    Condition, ConditionStatus, ImageBasedUpgrade, ImageBasedUpgradeStatus, Stage,
    condition_type as ct,
};
use fleet_types::labels::CANARY_LABEL;
use proptest::prelude::*;

use super::controls;
use super::rollout::*;

/// How a simulated spoke answers.
#[derive(Clone, Copy, Debug)]
enum Pattern {
    Good,
    /// Fails this many Prep attempts, then prepares.
    FailsPrep(u32),
    FailsUpgrade,
    /// Never reports anything new.
    Silent,
}

fn pattern() -> impl Strategy<Value = Pattern> {
    prop_oneof![
        6 => Just(Pattern::Good),
        2 => (1u32..4).prop_map(Pattern::FailsPrep),
        1 => Just(Pattern::FailsUpgrade),
        1 => Just(Pattern::Silent),
    ]
}

#[derive(Clone, Debug)]
struct Fleet {
    /// Name, market, canary, pattern.
    clusters: Vec<(String, u8, bool, Pattern)>,
}

fn fleet() -> impl Strategy<Value = Fleet> {
    prop::collection::vec((0u8..3, prop::bool::weighted(0.15), pattern()), 1..24).prop_map(|v| {
        Fleet {
            clusters: v
                .into_iter()
                .enumerate()
                .map(|(i, (m, c, p))| (format!("c{i:02}"), m, c, p))
                .collect(),
        }
    })
}

fn strategy() -> impl Strategy<Value = RolloutStrategy> {
    (
        1i64..6,
        prop::option::of(prop_oneof![
            (0i64..4).prop_map(IntOrPercent::Int),
            (0u8..60).prop_map(|p| IntOrPercent::String(format!("{p}%"))),
        ]),
        prop::option::of(0i64..4),
        prop::option::of(prop_oneof![Just(1.0), Just(1.5), Just(2.0), Just(3.0)]),
        prop::option::of(1i64..4),
        prop::option::of(0i64..3),
        prop::option::of(1i64..3),
        prop::option::of(30i64..300),
    )
        .prop_map(
            |(max, failures, canaries, growth, rate, retries, budget, timeout)| RolloutStrategy {
                max_concurrency: max,
                timeout,
                max_failures: failures,
                canary_clusters: canaries,
                batch_growth_factor: growth,
                max_starts_per_minute: rate,
                retries,
                disruption_budget: budget.map(|m| DisruptionBudget {
                    group_by: vec!["market".into()],
                    max_unavailable: m,
                }),
            },
        )
}

fn window() -> impl Strategy<Value = Option<MaintenanceWindow>> {
    prop::option::of(
        (
            0u32..24,
            prop_oneof![Just(0u32), Just(30)],
            30i64..600,
            prop_oneof![
                Just("UTC"),
                Just("Europe/Paris"),
                Just("America/New_York"),
                Just("Australia/Sydney")
            ],
        )
            .prop_map(|(h, m, d, tz)| MaintenanceWindow {
                start: format!("{h:02}:{m:02}"),
                duration_minutes: d,
                time_zone: Some(tz.into()),
            }),
    )
}

fn cond(type_: &str, ok: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: reason.into(),
        message: message.into(),
        last_transition_time: None,
        observed_generation: None,
    }
}

fn ibu(stage: Stage, conditions: Vec<Condition>) -> ImageBasedUpgrade {
    let mut i = ImageBasedUpgrade::new("upgrade", Default::default());
    i.spec.stage = stage;
    i.status = Some(ImageBasedUpgradeStatus {
        conditions,
        ..Default::default()
    });
    i
}

/// What the spoke shows after being moved to `stage` (its `attempt`th Prep).
fn answer(p: Pattern, stage: Stage, prep_attempt: u32) -> Option<ImageBasedUpgrade> {
    let idle = || ibu(Stage::Idle, vec![cond(ct::IDLE, true, "Idle", "Idle")]);
    Some(match (p, stage) {
        (Pattern::Silent, _) => return None,
        (_, Stage::Idle) => idle(),
        (Pattern::FailsPrep(n), Stage::Prep) if prep_attempt <= n => ibu(
            Stage::Prep,
            vec![
                cond(ct::PREP_COMPLETED, false, "Failed", "Prep failed"),
                cond(ct::PREP_IN_PROGRESS, false, "Failed", "pull failed"),
            ],
        ),
        (_, Stage::Prep) => ibu(
            Stage::Prep,
            vec![cond(ct::PREP_COMPLETED, true, "Completed", "done")],
        ),
        (Pattern::FailsUpgrade, Stage::Upgrade) => ibu(
            Stage::Upgrade,
            vec![
                cond(ct::UPGRADE_COMPLETED, false, "Failed", "Upgrade failed"),
                cond(ct::UPGRADE_IN_PROGRESS, false, "Failed", "did not come up"),
            ],
        ),
        (_, Stage::Upgrade) => ibu(
            Stage::Upgrade,
            vec![
                cond(ct::PREP_COMPLETED, true, "Completed", "done"),
                cond(ct::UPGRADE_COMPLETED, true, "Completed", "done"),
            ],
        ),
        (_, Stage::Rollback) => return None,
    })
}

fn t0() -> DateTime<Utc> {
    // A Saturday before Europe's change to summer time (2027-03-28).
    "2027-03-27T20:00:00Z".parse().unwrap()
}

#[derive(Debug)]
struct Run {
    spec: ImageBasedGroupUpgradeSpec,
    fleet: Fleet,
    /// Seconds between passes, and passes at which `spec.paused` flips.
    ticks: Vec<i64>,
    flips: BTreeSet<usize>,
}

fn run() -> impl Strategy<Value = Run> {
    (
        fleet(),
        strategy(),
        prop::bool::ANY,
        window(),
        prop::collection::vec(5i64..900, 20..160),
        prop::collection::btree_set(0usize..160, 0..4),
    )
        .prop_map(|(fleet, strategy, split, window, ticks, flips)| {
            let plan = if split {
                vec![
                    PlanItem {
                        actions: vec![Action::Prep],
                        rollout_strategy: strategy.clone(),
                    },
                    PlanItem {
                        actions: vec![Action::Upgrade],
                        rollout_strategy: strategy,
                    },
                ]
            } else {
                vec![PlanItem {
                    actions: vec![Action::Prep, Action::Upgrade],
                    rollout_strategy: strategy,
                }]
            };
            Run {
                spec: ImageBasedGroupUpgradeSpec {
                    cluster_label_selectors: vec![ClusterLabelSelector::default()],
                    plan,
                    maintenance_window: window,
                    ..Default::default()
                },
                fleet,
                ticks,
                flips,
            }
        })
}

/// Drives the rollout pass by pass and checks every control after each pass.
fn check_run(mut r: Run) -> Result<(), TestCaseError> {
    let mut clusters: BTreeMap<String, ClusterInfo> = r
        .fleet
        .clusters
        .iter()
        .map(|(n, m, canary, _)| {
            let mut labels: BTreeMap<String, String> = [("market".into(), format!("m{m}"))].into();
            if *canary {
                labels.insert(CANARY_LABEL.into(), String::new());
            }
            (n.clone(), ClusterInfo { labels, ibu: None })
        })
        .collect();
    let patterns: HashMap<String, Pattern> = r
        .fleet
        .clusters
        .iter()
        .map(|(n, _, _, p)| (n.clone(), *p))
        .collect();
    let mut prep_attempts: HashMap<String, u32> = HashMap::new();
    let mut steps: Vec<StepState> = vec![];
    let mut before = Before::default();
    let mut now = t0();
    // First pushes of each (step, cluster, action, attempt): the starts of actions.
    let mut begun: BTreeSet<(usize, String, usize, u32)> = BTreeSet::new();
    // When each cluster started its item's first action, by step.
    let mut first_starts: Vec<Vec<DateTime<Utc>>> = vec![];
    let mut halted_at: Option<DateTime<Utc>> = None;
    for (i, tick) in r.ticks.iter().enumerate() {
        if r.flips.contains(&i) {
            r.spec.paused = !r.spec.paused;
        }
        let d = advance_with(
            &r.spec,
            steps.clone(),
            &[],
            clusters.clone(),
            true,
            before,
            now,
        );
        let window_open = r
            .spec
            .maintenance_window
            .as_ref()
            .is_none_or(|w| controls::window(w, now).unwrap().open);
        for p in &d.pushes {
            let step = &d.steps[p.step];
            let pr = &step.progress[&p.cluster];
            let reset = p.action != step.actions[p.action_index];
            let key = (p.step, p.cluster.clone(), p.action_index, pr.retries);
            if !reset && begun.insert(key) {
                prop_assert!(!r.spec.paused, "{} started while paused", p.cluster);
                prop_assert!(window_open, "{} started outside the window", p.cluster);
            }
        }
        for s in &d.steps {
            let strategy = &r.spec.plan[s.step].rollout_strategy;
            let max = strategy.max_concurrency as usize;
            let canaries = if strategy.canary_clusters.unwrap_or(0) > 0 {
                s.batch_members(0).len()
            } else {
                0
            };
            // Batches: none larger than maxConcurrency but the canary batch, none with
            // more than maxUnavailable of one group.
            for b in 0..s.batch_count() {
                let members = s.batch_members(b);
                if b > 0 || canaries == 0 {
                    prop_assert!(members.len() <= max, "batch {b} of {}", members.len());
                }
                if let Some(budget) = &strategy.disruption_budget {
                    let mut per: HashMap<&String, i64> = HashMap::new();
                    for c in &members {
                        *per.entry(&clusters[c].labels["market"]).or_default() += 1;
                    }
                    prop_assert!(per.values().all(|n| *n <= budget.max_unavailable));
                }
            }
            let running = s
                .progress
                .values()
                .filter(|p| p.phase == ClusterPhase::Running)
                .count();
            prop_assert!(running <= max.max(canaries), "{running} running");
            // Starts per rolling minute.
            while first_starts.len() <= s.step {
                first_starts.push(vec![]);
            }
            let before_step = steps.get(s.step);
            for (c, p) in &s.progress {
                let was_pending = before_step
                    .and_then(|b| b.progress.get(c))
                    .is_none_or(|b| b.phase == ClusterPhase::Pending);
                if was_pending && p.phase == ClusterPhase::Running && p.started_at == Some(now) {
                    first_starts[s.step].push(now);
                    // Halted: clusters already running finish, no other starts.
                    prop_assert!(halted_at.is_none(), "{c} started after a halt");
                }
            }
            if let Some(limit) = strategy.max_starts_per_minute {
                let recent = first_starts[s.step]
                    .iter()
                    .filter(|t| **t > now - Duration::seconds(60))
                    .count();
                prop_assert!(recent as i64 <= limit, "{recent} starts in a minute");
            }
        }
        if halted_at.is_none() && d.halt().is_some() {
            halted_at = Some(now);
        }
        // The spokes answer the pushes.
        for p in &d.pushes {
            if p.stage == Stage::Prep {
                *prep_attempts.entry(p.cluster.clone()).or_default() += 1;
            }
            let attempt = prep_attempts.get(&p.cluster).copied().unwrap_or(0);
            if let Some(ibu) = answer(patterns[&p.cluster], p.stage, attempt) {
                clusters.get_mut(&p.cluster).unwrap().ibu = Some(Arc::new(ibu));
            }
        }
        for (c, change) in &d.label_changes {
            let labels = &mut clusters.get_mut(c).unwrap().labels;
            labels.retain(|k, _| !change.remove.contains(k));
            for k in &change.add {
                labels.entry(k.clone()).or_default();
            }
        }
        let mut next = d.steps.clone();
        let accepted: Vec<PushResult> = d
            .pushes
            .iter()
            .map(|p| PushResult {
                step: p.step,
                action_index: p.action_index,
                cluster: p.cluster.clone(),
                outcome: PushOutcome::Accepted(p.stage),
                at: now,
            })
            .collect();
        apply_push_results(&mut next, &mut Touched::default(), &accepted);
        steps = next;
        before = Before {
            started_at: d.started_at,
            waiting: d.waiting,
        };
        if d.phase == Phase::Completed {
            break;
        }
        now += Duration::seconds(*tick);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn no_control_is_ever_violated(r in run()) {
        check_run(r)?;
    }

    /// Without the new fields, batches are TALM's: chunks of maxConcurrency by name.
    #[test]
    fn without_controls_batches_are_talms(n in 0usize..40, max in 1i64..8) {
        let names: Vec<String> = (0..n).map(|i| format!("c{i:02}")).collect();
        let strategy = RolloutStrategy { max_concurrency: max, ..Default::default() };
        let (order, ends) = shape(&names, &BTreeMap::new(), &strategy);
        prop_assert_eq!(order, names);
        prop_assert!(ends.is_empty());
    }

    /// Shaped batches hold every selected cluster exactly once.
    #[test]
    fn shaped_batches_hold_every_cluster_once(f in fleet(), s in strategy()) {
        let names: Vec<String> = f.clusters.iter().map(|c| c.0.clone()).collect();
        let fleet: BTreeMap<String, ClusterInfo> = f.clusters.iter().map(|(n, m, c, _)| {
            let mut labels: BTreeMap<String, String> = [("market".into(), format!("m{m}"))].into();
            if *c { labels.insert(CANARY_LABEL.into(), String::new()); }
            (n.clone(), ClusterInfo { labels, ibu: None })
        }).collect();
        let (mut order, ends) = shape(&names, &fleet, &s);
        if shaped(&s) {
            prop_assert_eq!(*ends.last().unwrap_or(&0), names.len());
        }
        order.sort();
        prop_assert_eq!(order, names);
    }
}
