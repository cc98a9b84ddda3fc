//! The CustomResourceDefinitions of both programs, generated from the Rust types and
//! completed with what the types cannot say: the CEL `x-kubernetes-validations` of
//! `ibgu-hub.md` section 1 and `ibu-spoke.md` section 3, list bounds and printer columns.
//! `crdgen` writes them into the charts; a test fails when the committed files differ.

use fleet_types::ibgu::ImageBasedGroupUpgrade;
use fleet_types::ibu::ImageBasedUpgrade;
use kube::CustomResourceExt;
use serde_json::{Value, json};

use crate::planner::validate::{ALLOWED_PLANS, MAX_ACTIONS_PER_ITEM, MAX_NAME_LEN, MAX_PLAN_ITEMS};

/// Where `crdgen` writes each CRD, relative to the repository root.
pub const IBGU_PATH: &str = "charts/fleet-hub/crds/imagebasedgroupupgrades.lcm.openshift.io.yaml";
pub const IBU_PATH: &str = "charts/spoke-agent/crds/imagebasedupgrades.lca.openshift.io.yaml";

/// The message of the API-level stage check (`ibu-spoke.md` section 3).
pub const TRANSITION_NOT_PERMITTED: &str = "the stage transition is not permitted. Please refer to status.validNextStages for valid transitions. If status.validNextStages is not present, it indicates that no transitions are currently allowed";

fn rule(rule: impl Into<String>, message: impl Into<String>) -> Value {
    json!({"rule": rule.into(), "message": message.into()})
}

/// The schema object at `path` (a JSON pointer below the version's `openAPIV3Schema`).
fn at<'a>(crd: &'a mut Value, path: &str) -> &'a mut Value {
    let full = format!("/spec/versions/0/schema/openAPIV3Schema{path}");
    crd.pointer_mut(&full)
        .unwrap_or_else(|| panic!("the generated schema has no {full}"))
}

fn add_rules(schema: &mut Value, rules: Vec<Value>) {
    let list = schema
        .as_object_mut()
        .expect("a schema object")
        .entry("x-kubernetes-validations")
        .or_insert_with(|| json!([]));
    if let Some(l) = list.as_array_mut() {
        l.extend(rules);
    }
}

fn set(schema: &mut Value, key: &str, value: Value) {
    if let Some(o) = schema.as_object_mut() {
        o.insert(key.to_string(), value);
    }
}

/// A CEL list literal of the allowed plans: `[[['Prep']], [['Prep'], ['Upgrade']], ...]`.
fn allowed_plans_literal() -> String {
    let plans: Vec<String> = ALLOWED_PLANS
        .iter()
        .map(|plan| {
            let items: Vec<String> = plan
                .iter()
                .map(|item| {
                    let actions: Vec<String> =
                        item.iter().map(|a| format!("'{}'", a.as_str())).collect();
                    format!("[{}]", actions.join(", "))
                })
                .collect();
            format!("[{}]", items.join(", "))
        })
        .collect();
    format!("[{}]", plans.join(", "))
}

/// The ImageBasedGroupUpgrade CRD (`lcm.openshift.io/v1alpha1`, namespaced, status
/// subresource).
pub fn ibgu() -> Value {
    let mut crd = serde_json::to_value(ImageBasedGroupUpgrade::crd()).expect("a CRD is JSON");
    add_rules(
        at(&mut crd, ""),
        vec![rule(
            format!("size(self.metadata.name) < {MAX_NAME_LEN}"),
            format!("name must be shorter than {MAX_NAME_LEN} characters"),
        )],
    );
    add_rules(
        at(&mut crd, "/properties/spec/properties/ibuSpec"),
        vec![rule("self == oldSelf", "ibuSpec is immutable")],
    );
    let selectors = at(
        &mut crd,
        "/properties/spec/properties/clusterLabelSelectors",
    );
    set(selectors, "minItems", json!(1));
    add_rules(
        selectors,
        vec![rule(
            "self == oldSelf",
            "clusterLabelSelectors is immutable",
        )],
    );
    let plan = at(&mut crd, "/properties/spec/properties/plan");
    set(plan, "minItems", json!(1));
    set(plan, "maxItems", json!(MAX_PLAN_ITEMS));
    add_rules(
        plan,
        vec![
            rule(
                "size(self) >= size(oldSelf) && oldSelf.all(x, x in self)",
                "plan is append only",
            ),
            rule(
                format!("self.map(x, x.actions) in {}", allowed_plans_literal()),
                "invalid combinations of actions in the plan",
            ),
        ],
    );
    let actions = at(
        &mut crd,
        "/properties/spec/properties/plan/items/properties/actions",
    );
    set(actions, "minItems", json!(1));
    set(actions, "maxItems", json!(MAX_ACTIONS_PER_ITEM));
    let strategy = "/properties/spec/properties/plan/items/properties/rolloutStrategy/properties";
    set(
        at(&mut crd, &format!("{strategy}/maxConcurrency")),
        "minimum",
        json!(1),
    );
    set(
        at(&mut crd, &format!("{strategy}/timeout")),
        "minimum",
        json!(1),
    );
    // The rollout controls (`ibgu-hub.md` section 5), with the messages of the REST API.
    for (field, check, message) in [
        (
            "maxFailures",
            "string(self).matches('^([0-9]+|([0-9]|[1-9][0-9]|100)%)$')",
            "maxFailures must be a count or a percentage between 0% and 100%",
        ),
        (
            "canaryClusters",
            "self >= 0",
            "canaryClusters must not be negative",
        ),
        (
            "batchGrowthFactor",
            "self >= 1.0",
            "batchGrowthFactor must be at least 1",
        ),
        (
            "maxStartsPerMinute",
            "self >= 1",
            "maxStartsPerMinute must be at least 1",
        ),
        (
            "retries",
            "self >= 0 && self <= 5",
            "retries must be between 0 and 5",
        ),
    ] {
        add_rules(
            at(&mut crd, &format!("{strategy}/{field}")),
            vec![rule(check, message)],
        );
    }
    add_rules(
        at(&mut crd, &format!("{strategy}/disruptionBudget")),
        vec![
            rule(
                "has(self.maxUnavailable) && self.maxUnavailable >= 1",
                "disruptionBudget.maxUnavailable must be at least 1",
            ),
            rule(
                "has(self.groupBy) && size(self.groupBy) >= 1",
                "disruptionBudget.groupBy must name at least one label key",
            ),
        ],
    );
    let window = "/properties/spec/properties/maintenanceWindow/properties";
    add_rules(
        at(&mut crd, &format!("{window}/start")),
        vec![rule(
            "self.matches('^([01][0-9]|2[0-3]):[0-5][0-9]$')",
            "maintenanceWindow.start must be HH:MM",
        )],
    );
    add_rules(
        at(&mut crd, &format!("{window}/durationMinutes")),
        vec![rule(
            "self >= 1 && self <= 1440",
            "maintenanceWindow.durationMinutes must be between 1 and 1440",
        )],
    );
    let zones: Vec<String> = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|z| format!("'{}'", z.name()))
        .collect();
    add_rules(
        at(&mut crd, &format!("{window}/timeZone")),
        vec![json!({
            "rule": format!("self in [{}]", zones.join(", ")),
            "messageExpression": "'unknown time zone ' + self",
        })],
    );
    crd
}

/// The ImageBasedUpgrade CRD (`lca.openshift.io/v1`, cluster-scoped singleton `upgrade`,
/// status subresource, the columns `oc get ibu` prints).
pub fn ibu() -> Value {
    let mut crd = serde_json::to_value(ImageBasedUpgrade::crd()).expect("a CRD is JSON");
    let mut rules = vec![
        rule(
            "self.metadata.name == 'upgrade'",
            "ibu is a singleton, metadata.name must be 'upgrade'",
        ),
        rule(
            "!has(oldSelf.spec.stage) || !has(self.spec.stage) || self.spec.stage == oldSelf.spec.stage || (has(oldSelf.status) && has(oldSelf.status.validNextStages) && self.spec.stage in oldSelf.status.validNextStages)",
            TRANSITION_NOT_PERMITTED,
        ),
    ];
    // Spec fields frozen while an upgrade is in progress, unless the same change moves
    // the stage to Idle.
    for field in [
        "seedImageRef",
        "oadpContent",
        "extraManifests",
        "autoRollbackOnFailure",
    ] {
        rules.push(rule(
            format!(
                "!has(oldSelf.status) || !has(oldSelf.status.conditions) || \
                 oldSelf.status.conditions.exists(c, c.type == 'Idle' && c.status == 'True') || \
                 (has(self.spec.stage) && self.spec.stage == 'Idle') || \
                 (has(self.spec.{field}) == has(oldSelf.spec.{field}) && \
                 (!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field}))"
            ),
            format!("can not change spec.{field} while ibu is in progress"),
        ));
    }
    add_rules(at(&mut crd, ""), rules);
    set(
        at(&mut crd, ""),
        "description",
        json!(
            "ImageBasedUpgrade is the image-based upgrade of this single-node cluster (a singleton named upgrade)."
        ),
    );
    if let Some(version) = crd.pointer_mut("/spec/versions/0") {
        version["additionalPrinterColumns"] = json!([
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Desired Stage", "type": "string", "jsonPath": ".spec.stage"},
            {"name": "State", "type": "string", "jsonPath": ".status.conditions[-1:].reason"},
            {"name": "Details", "type": "string", "jsonPath": ".status.conditions[-1:].message"}
        ]);
    }
    crd
}

/// A CRD as the YAML file committed in the chart.
pub fn to_yaml(crd: &Value) -> String {
    let body = serde_yaml::to_string(crd).expect("a CRD is YAML");
    format!(
        "# Generated by `cargo run -p hub --bin crdgen` from the Rust types; do not edit.\n{body}"
    )
}

#[cfg(test)]
#[path = "crd_tests.rs"]
mod tests;
