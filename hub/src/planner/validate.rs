//! IBGU validation (`ibgu-hub.md` section 1): every rule, every problem reported, as the
//! causes of one 422 `Status`.

use std::collections::BTreeSet;

use fleet_types::ibgu::{Action, ImageBasedGroupUpgrade, RolloutStrategy};
use fleet_types::ibu::ConfigMapRef;
use fleet_types::status::StatusCause;

use super::{controls, selector};

/// The 26 plans TALM allows, as sequences of action lists.
pub const ALLOWED_PLANS: &[&[&[Action]]] = {
    use Action::*;
    &[
        &[&[Prep]],
        &[&[Prep], &[Upgrade]],
        &[&[Prep, Upgrade]],
        &[&[Prep], &[Upgrade], &[FinalizeUpgrade]],
        &[&[Prep], &[Upgrade, FinalizeUpgrade]],
        &[&[Prep, Upgrade], &[FinalizeUpgrade]],
        &[&[Prep, Upgrade, FinalizeUpgrade]],
        &[&[Rollback]],
        &[&[Rollback], &[FinalizeRollback]],
        &[&[Rollback, FinalizeRollback]],
        &[&[Upgrade]],
        &[&[Upgrade], &[FinalizeUpgrade]],
        &[&[Upgrade, FinalizeUpgrade]],
        &[&[FinalizeUpgrade]],
        &[&[FinalizeRollback]],
        &[&[Abort]],
        &[&[AbortOnFailure]],
        &[&[Prep], &[Abort]],
        &[&[Prep], &[AbortOnFailure]],
        &[&[Prep], &[AbortOnFailure], &[Upgrade]],
        &[&[Prep], &[AbortOnFailure], &[Upgrade], &[AbortOnFailure]],
        &[&[Prep], &[Upgrade], &[AbortOnFailure]],
        &[&[Prep, Upgrade], &[AbortOnFailure]],
        &[
            &[Prep],
            &[AbortOnFailure],
            &[Upgrade],
            &[AbortOnFailure],
            &[FinalizeUpgrade],
        ],
        &[&[Prep], &[Upgrade], &[AbortOnFailure], &[FinalizeUpgrade]],
        &[&[Prep, Upgrade], &[AbortOnFailure], &[FinalizeUpgrade]],
    ]
};

pub const MAX_PLAN_ITEMS: usize = 6;
pub const MAX_ACTIONS_PER_ITEM: usize = 4;
/// `rolloutStrategy.retries` at most.
pub const MAX_RETRIES: i64 = 5;
/// Names must be shorter than this (TALM derives child object names from it).
pub const MAX_NAME_LEN: usize = 230;

fn cause(field: &str, message: impl Into<String>) -> StatusCause {
    StatusCause {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Whether the sequence of action lists is one of the allowed plans.
pub fn plan_allowed(plan: &[Vec<Action>]) -> bool {
    ALLOWED_PLANS.iter().any(|allowed| {
        allowed.len() == plan.len() && allowed.iter().zip(plan).all(|(a, p)| *a == p.as_slice())
    })
}

/// Validates an IBGU being created (`old` is `None`) or changed. `configmap_exists` answers
/// whether a referenced ConfigMap is stored.
pub fn validate(
    new: &ImageBasedGroupUpgrade,
    old: Option<&ImageBasedGroupUpgrade>,
    configmap_exists: &dyn Fn(&ConfigMapRef) -> bool,
) -> Vec<StatusCause> {
    let mut out = Vec::new();
    let name = new.metadata.name.as_deref().unwrap_or("");
    if name.is_empty() {
        out.push(cause("metadata.name", "name is required"));
    } else if name.len() >= MAX_NAME_LEN {
        out.push(cause(
            "metadata.name",
            format!("name must be shorter than {MAX_NAME_LEN} characters"),
        ));
    } else if let Err(why) = fleet_types::names::dns1123_subdomain(name) {
        out.push(cause("metadata.name", why));
    }
    if let Some(ns) = new.metadata.namespace.as_deref()
        && let Err(why) = fleet_types::names::dns1123_label(ns)
    {
        out.push(cause("metadata.namespace", why));
    }
    let spec = &new.spec;
    if spec.cluster_label_selectors.is_empty() {
        out.push(cause(
            "spec.clusterLabelSelectors",
            "at least one cluster label selector is required",
        ));
    }
    for (i, sel) in spec.cluster_label_selectors.iter().enumerate() {
        for p in selector::problems(sel) {
            out.push(cause(&format!("spec.clusterLabelSelectors[{i}]"), p));
        }
    }
    if spec.plan.is_empty() {
        out.push(cause("spec.plan", "the plan needs at least one item"));
    }
    if spec.plan.len() > MAX_PLAN_ITEMS {
        out.push(cause(
            "spec.plan",
            format!(
                "the plan may have at most {MAX_PLAN_ITEMS} items, it has {}",
                spec.plan.len()
            ),
        ));
    }
    for (i, item) in spec.plan.iter().enumerate() {
        let n = item.actions.len();
        if n == 0 || n > MAX_ACTIONS_PER_ITEM {
            out.push(cause(
                &format!("spec.plan[{i}].actions"),
                format!("an item has 1 to {MAX_ACTIONS_PER_ITEM} actions, this one has {n}"),
            ));
        }
        if item.rollout_strategy.max_concurrency < 1 {
            out.push(cause(
                &format!("spec.plan[{i}].rolloutStrategy.maxConcurrency"),
                format!(
                    "maxConcurrency must be at least 1, got {}",
                    item.rollout_strategy.max_concurrency
                ),
            ));
        }
        if item.rollout_strategy.timeout.is_some_and(|t| t < 1) {
            out.push(cause(
                &format!("spec.plan[{i}].rolloutStrategy.timeout"),
                "timeout must be at least 1 minute",
            ));
        }
        out.extend(strategy_problems(i, &item.rollout_strategy));
    }
    if let Some(w) = &spec.maintenance_window {
        if controls::parse_start(&w.start).is_none() {
            out.push(cause(
                "spec.maintenanceWindow.start",
                "maintenanceWindow.start must be HH:MM",
            ));
        }
        if !(1..=1440).contains(&w.duration_minutes) {
            out.push(cause(
                "spec.maintenanceWindow.durationMinutes",
                "maintenanceWindow.durationMinutes must be between 1 and 1440",
            ));
        }
        if controls::parse_time_zone(w.time_zone()).is_none() {
            out.push(cause(
                "spec.maintenanceWindow.timeZone",
                format!("unknown time zone {}", w.time_zone()),
            ));
        }
    }
    let actions: Vec<Vec<Action>> = spec.plan.iter().map(|p| p.actions.clone()).collect();
    if !actions.is_empty() && !plan_allowed(&actions) {
        out.push(cause(
            "spec.plan",
            "invalid combinations of actions in the plan",
        ));
    }
    let needs_seed = actions.iter().flatten().any(|a| *a == Action::Prep);
    let seed = spec.ibu_spec.seed_image_ref.clone().unwrap_or_default();
    if needs_seed && (seed.version.is_empty() || seed.image.is_empty()) {
        out.push(cause(
            "spec.ibuSpec.seedImageRef",
            "seedImageRef.version and seedImageRef.image are required by a plan with Prep",
        ));
    }
    let refs: BTreeSet<&ConfigMapRef> = spec
        .ibu_spec
        .oadp_content
        .iter()
        .chain(&spec.ibu_spec.extra_manifests)
        .collect();
    for r in refs {
        if !configmap_exists(r) {
            out.push(cause(
                "spec.ibuSpec",
                format!(
                    "configmap {}/{} not found: create it first (PUT /v1/configmaps/{}/{})",
                    r.namespace, r.name, r.namespace, r.name
                ),
            ));
        }
    }
    if let Some(old) = old {
        let strip_stage = |s: &fleet_types::ibgu::IbuSpecTemplate| {
            let mut s = s.clone();
            s.stage = None;
            s
        };
        if strip_stage(&old.spec.ibu_spec) != strip_stage(&spec.ibu_spec) {
            out.push(cause("spec.ibuSpec", "ibuSpec is immutable"));
        }
        if old.spec.cluster_label_selectors != spec.cluster_label_selectors {
            out.push(cause(
                "spec.clusterLabelSelectors",
                "clusterLabelSelectors is immutable",
            ));
        }
        let prefix_kept = old.spec.plan.len() <= spec.plan.len()
            && old.spec.plan.iter().zip(&spec.plan).all(|(a, b)| a == b);
        if !prefix_kept {
            out.push(cause("spec.plan", "plan is append only"));
        }
    }
    out
}

/// The problems of a plan item's rollout controls (`ibgu-hub.md` section 5).
fn strategy_problems(i: usize, s: &RolloutStrategy) -> Vec<StatusCause> {
    let at = |field: &str| format!("spec.plan[{i}].rolloutStrategy.{field}");
    let mut out = Vec::new();
    if s.max_failures.as_ref().is_some_and(|m| m.of(0).is_none()) {
        out.push(cause(
            &at("maxFailures"),
            "maxFailures must be a count or a percentage between 0% and 100%",
        ));
    }
    if s.canary_clusters.is_some_and(|n| n < 0) {
        out.push(cause(
            &at("canaryClusters"),
            "canaryClusters must not be negative",
        ));
    }
    if s.batch_growth_factor
        .is_some_and(|f| !f.is_finite() || f < 1.0)
    {
        out.push(cause(
            &at("batchGrowthFactor"),
            "batchGrowthFactor must be at least 1",
        ));
    }
    if s.max_starts_per_minute.is_some_and(|n| n < 1) {
        out.push(cause(
            &at("maxStartsPerMinute"),
            "maxStartsPerMinute must be at least 1",
        ));
    }
    if s.retries.is_some_and(|n| !(0..=MAX_RETRIES).contains(&n)) {
        out.push(cause(&at("retries"), "retries must be between 0 and 5"));
    }
    if let Some(b) = &s.disruption_budget {
        if b.max_unavailable < 1 {
            out.push(cause(
                &at("disruptionBudget.maxUnavailable"),
                "disruptionBudget.maxUnavailable must be at least 1",
            ));
        }
        if b.group_by.is_empty() {
            out.push(cause(
                &at("disruptionBudget.groupBy"),
                "disruptionBudget.groupBy must name at least one label key",
            ));
        }
    }
    out
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
