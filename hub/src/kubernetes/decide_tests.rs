use super::*;

/// A CR as the API server would hand it over; chainable tweaks in the controller-rs style.
pub fn ibgu() -> ImageBasedGroupUpgrade {
    serde_json::from_value(json!({
        "apiVersion": "lcm.openshift.io/v1alpha1",
        "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": "upgrade-4-16", "namespace": "ztp", "uid": "u-1",
                     "resourceVersion": "7", "generation": 1},
        "spec": {
            "clusterLabelSelectors": [{"matchLabels": {"common": "true"}}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
            "plan": [{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 30}}]
        }
    }))
    .unwrap()
}

trait Tweak {
    fn finalized(self) -> Self;
    fn with_finalizers(self, f: &[&str]) -> Self;
}

impl Tweak for ImageBasedGroupUpgrade {
    fn finalized(self) -> Self {
        self.with_finalizers(&[FINALIZER])
    }
    fn with_finalizers(mut self, f: &[&str]) -> Self {
        self.metadata.finalizers = Some(f.iter().map(|s| s.to_string()).collect());
        self
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn finalizer_patches_append_or_create_the_list_and_remove_by_index() {
    let fresh = ibgu();
    assert!(!has_finalizer(&fresh));
    assert_eq!(
        add_finalizer(&fresh),
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
        ])
    );
    let other = ibgu().with_finalizers(&["example.com/keep"]);
    assert_eq!(add_finalizer(&other)[1]["path"], "/metadata/finalizers/-");
    assert_eq!(remove_finalizer(&other), None);
    let both = ibgu().with_finalizers(&["example.com/keep", FINALIZER]);
    assert!(has_finalizer(&both));
    assert_eq!(
        remove_finalizer(&both),
        Some(json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/1"}
        ]))
    );
    assert!(has_finalizer(&ibgu().finalized()));
}

#[test]
fn spec_sync_creates_updates_on_append_and_ignores_status() {
    let cr = ibgu();
    assert_eq!(spec_sync(&cr, None), SpecSync::Create);
    assert_eq!(spec_sync(&cr, Some(&ibgu())), SpecSync::Same);
    let mut appended = ibgu();
    appended.spec.plan.push(appended.spec.plan[0].clone());
    assert_eq!(
        spec_sync(&appended, Some(&cr)),
        SpecSync::Update { spec_changed: true }
    );
    let mut annotated = ibgu();
    annotated.metadata.annotations = Some(labels(&[("a", "b")]));
    assert_eq!(
        spec_sync(&annotated, Some(&cr)),
        SpecSync::Update {
            spec_changed: false
        }
    );
    let mut with_status = ibgu();
    with_status.status = Some(Default::default());
    assert_eq!(spec_sync(&with_status, Some(&cr)), SpecSync::Same);
}

#[test]
fn invalid_specs_show_every_problem_once() {
    let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let causes = vec![
        StatusCause {
            field: "spec.ibuSpec".into(),
            message: "configmap ztp/oadp not found".into(),
        },
        StatusCause {
            field: "spec.plan".into(),
            message: "plan is append only".into(),
        },
    ];
    let mut cr = ibgu();
    let s = invalid_status(&cr, &causes, t);
    assert_eq!(s.conditions.len(), 1);
    assert_eq!(s.conditions[0].reason, "InvalidSpec");
    assert_eq!(
        s.conditions[0].message,
        "spec.ibuSpec: configmap ztp/oadp not found; spec.plan: plan is append only"
    );
    // Written once: the same problems later change nothing (no status write loop).
    cr.status = Some(s.clone());
    let later = t + chrono::Duration::minutes(5);
    assert_eq!(
        status_update(&cr, &invalid_status(&cr, &causes, later)),
        None
    );
}

#[test]
fn fleet_labels_take_the_managed_cluster_and_keep_the_hubs_ibgu_labels() {
    let managed = labels(&[
        ("common", "true"),
        ("lcm.openshift.io/ibgu-prep-completed", ""),
    ]);
    let stored = labels(&[
        ("old", "x"),
        ("lcm.openshift.io/ibgu-upgrade-completed", ""),
    ]);
    assert_eq!(
        fleet_labels(&managed, &stored),
        labels(&[
            ("common", "true"),
            ("lcm.openshift.io/ibgu-upgrade-completed", "")
        ])
    );
}

#[test]
fn label_patches_set_and_remove_only_ibgu_labels() {
    let managed = labels(&[
        ("common", "true"),
        ("lcm.openshift.io/ibgu-prep-completed", ""),
    ]);
    let stored = labels(&[
        ("common", "false"),
        ("lcm.openshift.io/ibgu-upgrade-completed", ""),
    ]);
    assert_eq!(
        label_patch(&managed, Some("42"), &stored),
        Some(json!({"metadata": {"resourceVersion": "42", "labels": {
            "lcm.openshift.io/ibgu-upgrade-completed": "",
            "lcm.openshift.io/ibgu-prep-completed": null
        }}}))
    );
    assert_eq!(label_patch(&managed, None, &managed), None);
}

#[test]
fn events_for_starts_timeouts_and_failures_only() {
    assert_eq!(
        event_for("ActionFailed", Some("sno3"), "Prep failed: seed missing"),
        Some(EventNote {
            warning: true,
            reason: "ActionFailed".into(),
            note: "sno3: Prep failed: seed missing".into()
        })
    );
    assert!(
        !event_for("BatchStarted", None, "batch 1 of 2")
            .unwrap()
            .warning
    );
    assert!(event_for("StepTimedOut", None, "x").unwrap().warning);
    assert_eq!(event_for("ActionCompleted", Some("sno1"), "done"), None);
    assert_eq!(
        event_for("ActionFailed", None, &"x".repeat(5000))
            .unwrap()
            .note
            .len(),
        1000
    );
}

#[test]
fn the_lease_is_taken_when_free_or_expired_and_renewed_by_its_holder() {
    let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    assert_eq!(lease_step(None, None, 15, "a", t), LeaseStep::Acquire);
    assert_eq!(
        lease_step(Some(""), Some(t), 15, "a", t),
        LeaseStep::Acquire
    );
    assert_eq!(lease_step(Some("a"), Some(t), 15, "a", t), LeaseStep::Renew);
    let renewed = t - chrono::Duration::seconds(10);
    assert_eq!(
        lease_step(Some("b"), Some(renewed), 15, "a", t),
        LeaseStep::Follow {
            holder: "b".into(),
            until: renewed + chrono::Duration::seconds(15)
        }
    );
    let stale = t - chrono::Duration::seconds(16);
    assert_eq!(
        lease_step(Some("b"), Some(stale), 15, "a", t),
        LeaseStep::Acquire
    );
}
