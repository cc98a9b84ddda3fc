use super::*;
use fleet_types::ibgu::{ClusterLabelSelector, PlanItem, RolloutStrategy};
use fleet_types::ibu::SeedImageRef;

fn ibgu(plan: &[&[Action]]) -> ImageBasedGroupUpgrade {
    let mut g = ImageBasedGroupUpgrade::new("upgrade-4-16", Default::default());
    g.metadata.namespace = Some("default".into());
    g.spec.cluster_label_selectors = vec![ClusterLabelSelector {
        match_labels: [("common".to_string(), "true".to_string())].into(),
        match_expressions: vec![],
    }];
    g.spec.ibu_spec.seed_image_ref = Some(SeedImageRef {
        version: "4.16.0".into(),
        image: "quay.io/seed:4.16.0".into(),
        pull_secret_ref: None,
    });
    g.spec.plan = plan
        .iter()
        .map(|a| PlanItem {
            actions: a.to_vec(),
            rollout_strategy: RolloutStrategy {
                max_concurrency: 2,
                timeout: None,
                ..Default::default()
            },
        })
        .collect();
    g
}

fn none(_: &ConfigMapRef) -> bool {
    false
}

fn messages(c: &[StatusCause]) -> Vec<String> {
    c.iter().map(|c| c.message.clone()).collect()
}

#[test]
fn all_26_plans_are_allowed_and_reachable_by_appending() {
    assert_eq!(ALLOWED_PLANS.len(), 26);
    for plan in ALLOWED_PLANS {
        let g = ibgu(plan);
        assert!(validate(&g, None, &none).is_empty(), "{plan:?}");
        // every prefix is itself allowed, so each plan can be built by appending
        for n in 1..plan.len() {
            assert!(
                plan_allowed(&plan[..n].iter().map(|a| a.to_vec()).collect::<Vec<_>>()),
                "{plan:?} prefix {n}"
            );
        }
    }
}

#[test]
fn other_combinations_are_refused() {
    use Action::*;
    for plan in [
        &[&[Upgrade, Prep][..]][..],
        &[&[Prep], &[Prep]],
        &[&[Abort], &[Prep]],
        &[&[Prep], &[FinalizeRollback]],
        &[&[Rollback], &[FinalizeUpgrade]],
    ] {
        let causes = validate(&ibgu(plan), None, &none);
        assert_eq!(
            messages(&causes),
            vec!["invalid combinations of actions in the plan"],
            "{plan:?}"
        );
    }
}

#[test]
fn item_and_action_counts() {
    use Action::*;
    let mut g = ibgu(&[&[Prep]]);
    g.spec.plan = (0..7).map(|_| g.spec.plan[0].clone()).collect();
    let m = messages(&validate(&g, None, &none));
    assert!(
        m.contains(&"the plan may have at most 6 items, it has 7".to_string()),
        "{m:?}"
    );
    let g = ibgu(&[&[Prep, Upgrade, FinalizeUpgrade, Abort, Rollback]]);
    let m = messages(&validate(&g, None, &none));
    assert!(
        m.contains(&"an item has 1 to 4 actions, this one has 5".to_string()),
        "{m:?}"
    );
    let g = ibgu(&[&[]]);
    assert!(
        messages(&validate(&g, None, &none))
            .contains(&"an item has 1 to 4 actions, this one has 0".to_string())
    );
    let mut g = ibgu(&[]);
    g.spec.plan.clear();
    assert!(
        messages(&validate(&g, None, &none))
            .contains(&"the plan needs at least one item".to_string())
    );
}

#[test]
fn name_selectors_concurrency_and_every_problem_at_once() {
    let mut g = ibgu(&[&[Action::Prep]]);
    g.metadata.name = Some("x".repeat(230));
    g.spec.cluster_label_selectors.clear();
    g.spec.plan[0].rollout_strategy.max_concurrency = 0;
    g.spec.plan[0].rollout_strategy.timeout = Some(0);
    let causes = validate(&g, None, &none);
    assert_eq!(
        messages(&causes),
        vec![
            "name must be shorter than 230 characters",
            "at least one cluster label selector is required",
            "maxConcurrency must be at least 1, got 0",
            "timeout must be at least 1 minute",
        ]
    );
    assert_eq!(
        causes[2].field,
        "spec.plan[0].rolloutStrategy.maxConcurrency"
    );
    g.metadata.name = Some("x".repeat(229));
    assert_eq!(validate(&g, None, &none).len(), 3);
}

#[test]
fn names_and_namespaces_are_dns_names() {
    for (name, namespace) in [
        ("../x", "default"),
        ("up", "../../etc"),
        ("a'; drop table clusters;--", "ns"),
    ] {
        let mut g = ibgu(&[&[Action::Prep]]);
        g.metadata.name = Some(name.into());
        g.metadata.namespace = Some(namespace.into());
        let causes = validate(&g, None, &none);
        assert_eq!(causes.len(), 1, "{name} {namespace}: {causes:?}");
        let field = if name == "up" {
            "metadata.namespace"
        } else {
            "metadata.name"
        };
        assert_eq!(causes[0].field, field);
        assert!(
            causes[0].message.contains("RFC 1123"),
            "{}",
            causes[0].message
        );
    }
}

#[test]
fn referenced_configmaps_must_exist() {
    let mut g = ibgu(&[&[Action::Prep]]);
    g.spec.ibu_spec.oadp_content = vec![ConfigMapRef {
        name: "oadp-cm".into(),
        namespace: "openshift-adp".into(),
    }];
    let m = messages(&validate(&g, None, &none));
    assert_eq!(m.len(), 1);
    assert!(m[0].starts_with("configmap openshift-adp/oadp-cm not found"));
    assert!(validate(&g, None, &|_| true).is_empty());
}

#[test]
fn prep_needs_a_seed() {
    let mut g = ibgu(&[&[Action::Prep]]);
    g.spec.ibu_spec.seed_image_ref = None;
    assert_eq!(validate(&g, None, &none).len(), 1);
    let mut g = ibgu(&[&[Action::Abort]]);
    g.spec.ibu_spec.seed_image_ref = None;
    assert!(validate(&g, None, &none).is_empty());
}

#[test]
fn updates_append_only_and_immutable_fields() {
    use Action::*;
    let old = ibgu(&[&[Prep]]);
    let appended = ibgu(&[&[Prep], &[Upgrade]]);
    assert!(validate(&appended, Some(&old), &none).is_empty());

    let changed = ibgu(&[&[Upgrade]]);
    assert!(
        messages(&validate(&changed, Some(&old), &none))
            .contains(&"plan is append only".to_string())
    );
    let removed = ibgu(&[&[Prep]]);
    assert!(
        messages(&validate(&removed, Some(&appended), &none))
            .contains(&"plan is append only".to_string())
    );

    let mut other_seed = appended.clone();
    other_seed
        .spec
        .ibu_spec
        .seed_image_ref
        .as_mut()
        .unwrap()
        .version = "4.17.0".into();
    assert_eq!(
        messages(&validate(&other_seed, Some(&old), &none)),
        vec!["ibuSpec is immutable"]
    );
    // ibuSpec.stage is ignored
    let mut staged = appended.clone();
    staged.spec.ibu_spec.stage = Some(fleet_types::Stage::Prep);
    assert!(validate(&staged, Some(&old), &none).is_empty());

    let mut other_sel = appended.clone();
    other_sel.spec.cluster_label_selectors[0]
        .match_labels
        .insert("x".into(), "y".into());
    assert_eq!(
        messages(&validate(&other_sel, Some(&old), &none)),
        vec!["clusterLabelSelectors is immutable"]
    );
}

#[test]
fn rollout_controls_are_checked_and_every_problem_listed() {
    use Action::*;
    use fleet_types::ibgu::{DisruptionBudget, IntOrPercent, MaintenanceWindow};
    let mut g = ibgu(&[&[Prep]]);
    let s = &mut g.spec.plan[0].rollout_strategy;
    s.max_failures = Some(IntOrPercent::String("150%".into()));
    s.canary_clusters = Some(-1);
    s.batch_growth_factor = Some(0.5);
    s.max_starts_per_minute = Some(0);
    s.retries = Some(6);
    s.disruption_budget = Some(DisruptionBudget {
        group_by: vec![],
        max_unavailable: 0,
    });
    g.spec.maintenance_window = Some(MaintenanceWindow {
        start: "25:00".into(),
        duration_minutes: 1441,
        time_zone: Some("Mars/Olympus".into()),
    });
    assert_eq!(
        messages(&validate(&g, None, &none)),
        vec![
            "maxFailures must be a count or a percentage between 0% and 100%",
            "canaryClusters must not be negative",
            "batchGrowthFactor must be at least 1",
            "maxStartsPerMinute must be at least 1",
            "retries must be between 0 and 5",
            "disruptionBudget.maxUnavailable must be at least 1",
            "disruptionBudget.groupBy must name at least one label key",
            "maintenanceWindow.start must be HH:MM",
            "maintenanceWindow.durationMinutes must be between 1 and 1440",
            "unknown time zone Mars/Olympus",
        ]
    );
    for bad in [
        IntOrPercent::Int(-1),
        IntOrPercent::String("ten".into()),
        IntOrPercent::String("-5%".into()),
    ] {
        let s = &mut g.spec.plan[0].rollout_strategy;
        s.max_failures = Some(bad);
        assert!(messages(&validate(&g, None, &none)).contains(
            &"maxFailures must be a count or a percentage between 0% and 100%".to_string()
        ));
    }
    let mut ok = ibgu(&[&[Prep]]);
    let s = &mut ok.spec.plan[0].rollout_strategy;
    s.max_failures = Some(IntOrPercent::String("10%".into()));
    s.canary_clusters = Some(2);
    s.batch_growth_factor = Some(1.5);
    s.max_starts_per_minute = Some(5);
    s.retries = Some(5);
    s.disruption_budget = Some(DisruptionBudget {
        group_by: vec!["market".into()],
        max_unavailable: 1,
    });
    ok.spec.maintenance_window = Some(MaintenanceWindow {
        start: "01:30".into(),
        duration_minutes: 1440,
        time_zone: Some("America/New_York".into()),
    });
    assert!(validate(&ok, None, &none).is_empty());
    // Pausing and moving the window are changes like any other field's.
    let mut moved = ok.clone();
    moved.spec.paused = true;
    moved.spec.maintenance_window.as_mut().unwrap().start = "03:00".into();
    assert!(validate(&moved, Some(&ok), &none).is_empty());
}
