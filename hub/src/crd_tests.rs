use super::*;
use kube::core::cel::Validator;

fn schema(crd: &Value) -> Value {
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The messages of the rules an object (and its old version, for an update) breaks.
fn broken(crd: &Value, new: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema(crd), new, old) {
        Ok(()) => vec![],
        Err(errors) => errors.into_vec().into_iter().map(|e| e.message).collect(),
    }
}

fn ibgu_object(plan: Value) -> Value {
    json!({
        "apiVersion": "lcm.openshift.io/v1alpha1",
        "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": "upgrade-4-16", "namespace": "default"},
        "spec": {
            "clusterLabelSelectors": [{"matchLabels": {"common": "true"}}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
            "plan": plan,
        }
    })
}

fn item(actions: &[&str]) -> Value {
    json!({"actions": actions, "rolloutStrategy": {"maxConcurrency": 2, "timeout": 30}})
}

#[test]
fn committed_crds_are_what_the_types_generate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (path, crd) in [(IBGU_PATH, ibgu()), (IBU_PATH, ibu())] {
        let committed = std::fs::read_to_string(root.join(path)).unwrap_or_default();
        assert!(
            committed == to_yaml(&crd),
            "{path} differs from the types: run `cargo run -p hub --bin crdgen` and commit"
        );
    }
}

#[test]
fn ibgu_rules_accept_a_talm_manifest_and_appending() {
    let crd = ibgu();
    let old = ibgu_object(json!([item(&["Prep"])]));
    assert_eq!(broken(&crd, &old, None), Vec::<String>::new());
    let new = ibgu_object(json!([item(&["Prep"]), item(&["Upgrade"])]));
    assert_eq!(broken(&crd, &new, Some(&old)), Vec::<String>::new());
}

#[test]
fn ibgu_rules_refuse_with_the_spec_messages() {
    let crd = ibgu();
    let old = ibgu_object(json!([item(&["Prep"]), item(&["Upgrade"])]));
    let mut changed = old.clone();
    changed["spec"]["ibuSpec"]["seedImageRef"]["version"] = json!("4.17.0");
    assert_eq!(
        broken(&crd, &changed, Some(&old)),
        vec!["ibuSpec is immutable"]
    );
    let mut changed = old.clone();
    changed["spec"]["clusterLabelSelectors"] = json!([{"matchLabels": {"other": "true"}}]);
    assert_eq!(
        broken(&crd, &changed, Some(&old)),
        vec!["clusterLabelSelectors is immutable"]
    );
    let shorter = ibgu_object(json!([item(&["Prep"])]));
    assert_eq!(
        broken(&crd, &shorter, Some(&old)),
        vec!["plan is append only"]
    );
    let not_allowed = ibgu_object(json!([item(&["Upgrade", "Prep"])]));
    assert_eq!(
        broken(&crd, &not_allowed, None),
        vec!["invalid combinations of actions in the plan"]
    );
    let mut long = ibgu_object(json!([item(&["Prep"])]));
    long["metadata"]["name"] = json!("x".repeat(230));
    assert_eq!(
        broken(&crd, &long, None),
        vec!["name must be shorter than 230 characters"]
    );
}

#[test]
fn ibgu_schema_bounds_plans_actions_and_concurrency() {
    let crd = ibgu();
    let s = schema(&crd);
    let plan = &s["properties"]["spec"]["properties"]["plan"];
    assert_eq!(plan["maxItems"], 6);
    assert_eq!(plan["items"]["properties"]["actions"]["maxItems"], 4);
    assert_eq!(
        plan["items"]["properties"]["rolloutStrategy"]["properties"]["maxConcurrency"]["minimum"],
        1
    );
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert!(crd["spec"]["versions"][0]["subresources"]["status"].is_object());
    // Every allowed plan is in the rule, none other.
    let rules = plan["x-kubernetes-validations"].as_array().unwrap();
    let allowed = rules[1]["rule"].as_str().unwrap();
    assert_eq!(allowed.matches("]]").count(), ALLOWED_PLANS.len());
}

fn ibu_object(stage: &str, idle: bool, next: &[&str]) -> Value {
    json!({
        "apiVersion": "lca.openshift.io/v1",
        "kind": "ImageBasedUpgrade",
        "metadata": {"name": "upgrade"},
        "spec": {"stage": stage, "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
        "status": {
            "conditions": [{"type": "Idle", "status": if idle { "True" } else { "False" }, "reason": "Idle", "message": "Idle"}],
            "validNextStages": next,
        }
    })
}

#[test]
fn ibu_rules_follow_valid_next_stages_and_freeze_the_spec() {
    let crd = ibu();
    let idle = ibu_object("Idle", true, &["Prep"]);
    let prep = ibu_object("Prep", true, &["Prep"]);
    assert_eq!(broken(&crd, &prep, Some(&idle)), Vec::<String>::new());
    let upgrade = ibu_object("Upgrade", true, &[]);
    assert_eq!(
        broken(&crd, &upgrade, Some(&idle)),
        vec![TRANSITION_NOT_PERMITTED]
    );
    // In progress: the seed cannot change, unless the same change goes back to Idle.
    let running = ibu_object("Prep", false, &["Idle"]);
    let mut reseeded = running.clone();
    reseeded["spec"]["seedImageRef"]["version"] = json!("4.17.0");
    assert_eq!(
        broken(&crd, &reseeded, Some(&running)),
        vec!["can not change spec.seedImageRef while ibu is in progress"]
    );
    reseeded["spec"]["stage"] = json!("Idle");
    assert_eq!(
        broken(&crd, &reseeded, Some(&running)),
        Vec::<String>::new()
    );
    let mut added = running.clone();
    added["spec"]["extraManifests"] = json!([{"name": "m", "namespace": "ns"}]);
    assert_eq!(
        broken(&crd, &added, Some(&running)),
        vec!["can not change spec.extraManifests while ibu is in progress"]
    );
    let mut other = idle.clone();
    other["metadata"]["name"] = json!("second");
    assert_eq!(
        broken(&crd, &other, None),
        vec!["ibu is a singleton, metadata.name must be 'upgrade'"]
    );
}

#[test]
fn ibu_prints_stage_state_and_details() {
    let crd = ibu();
    let columns = &crd["spec"]["versions"][0]["additionalPrinterColumns"];
    let names: Vec<&str> = columns
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["Age", "Desired Stage", "State", "Details"]);
    assert_eq!(crd["spec"]["scope"], "Cluster");
}

#[test]
fn ibgu_rules_check_the_rollout_controls_with_the_api_messages() {
    let crd = ibgu();
    let mut good = ibgu_object(json!([{"actions": ["Prep"], "rolloutStrategy": {
        "maxConcurrency": 2, "maxFailures": "10%", "canaryClusters": 1, "batchGrowthFactor": 2,
        "maxStartsPerMinute": 5, "retries": 2,
        "disruptionBudget": {"groupBy": ["market"], "maxUnavailable": 1}}}]));
    good["spec"]["paused"] = json!(true);
    good["spec"]["maintenanceWindow"] =
        json!({"start": "01:30", "durationMinutes": 120, "timeZone": "Europe/Paris"});
    assert_eq!(broken(&crd, &good, None), Vec::<String>::new());
    let mut counted = good.clone();
    counted["spec"]["plan"][0]["rolloutStrategy"]["maxFailures"] = json!(3);
    assert_eq!(broken(&crd, &counted, None), Vec::<String>::new());

    let mut bad = ibgu_object(json!([{"actions": ["Prep"], "rolloutStrategy": {
        "maxConcurrency": 2, "maxFailures": "150%", "canaryClusters": -1,
        "batchGrowthFactor": 0.5, "maxStartsPerMinute": 0, "retries": 6,
        "disruptionBudget": {"groupBy": [], "maxUnavailable": 0}}}]));
    bad["spec"]["maintenanceWindow"] =
        json!({"start": "7:00", "durationMinutes": 0, "timeZone": "Mars/Olympus"});
    let mut got = broken(&crd, &bad, None);
    got.sort();
    let mut want = vec![
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
    ];
    want.sort();
    assert_eq!(got, want);
    // Pausing is a change like any other (the merge patch `{"spec":{"paused":true}}`).
    let mut paused = good.clone();
    paused["spec"]["paused"] = json!(false);
    assert_eq!(broken(&crd, &paused, Some(&good)), Vec::<String>::new());
}
