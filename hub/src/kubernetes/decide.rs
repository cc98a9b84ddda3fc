//! What Kubernetes mode must do, decided without IO: finalizer patches, whether a CR's spec
//! is new or changed for the engine, which status to write back, which labels a
//! ManagedCluster needs, which history rows become Events, and who holds the Lease.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use fleet_types::ibgu::{ImageBasedGroupUpgrade, ImageBasedGroupUpgradeStatus};
use fleet_types::ibu::{Condition, ConditionStatus};
use fleet_types::labels::is_ibgu_label;
use fleet_types::status::StatusCause;
use serde_json::{Value, json};

/// Held on every IBGU the hub drives, so a deleted CR leaves the engine before it goes.
pub const FINALIZER: &str = "lcm.openshift.io/fleet-hub";
/// On a ManagedCluster: where its spoke agent listens (the registration says it too).
pub const ENDPOINT_ANNOTATION: &str = "fleet-hub.lcm.openshift.io/spoke-endpoint";

pub fn has_finalizer(obj: &ImageBasedGroupUpgrade) -> bool {
    obj.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
}

/// JSON patch adding the finalizer; `test`s the resourceVersion so a concurrent change
/// makes it fail (and the reconcile run again) rather than clobber the list.
pub fn add_finalizer(obj: &ImageBasedGroupUpgrade) -> Value {
    let rv = obj.metadata.resource_version.clone().unwrap_or_default();
    match &obj.metadata.finalizers {
        Some(list) if !list.is_empty() => json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}
        ]),
        _ => json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
        ]),
    }
}

/// JSON patch removing the finalizer (checked in place first), or `None` when absent.
pub fn remove_finalizer(obj: &ImageBasedGroupUpgrade) -> Option<Value> {
    let i = obj
        .metadata
        .finalizers
        .iter()
        .flatten()
        .position(|f| f == FINALIZER)?;
    Some(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")}
    ]))
}

#[derive(Debug, PartialEq)]
pub enum SpecSync {
    /// The engine does not know this IBGU yet.
    Create,
    /// The CR's spec, labels or annotations changed (a plan item appended, ...).
    Update {
        spec_changed: bool,
    },
    Same,
}

pub fn spec_sync(cr: &ImageBasedGroupUpgrade, stored: Option<&ImageBasedGroupUpgrade>) -> SpecSync {
    let Some(stored) = stored else {
        return SpecSync::Create;
    };
    let meta = |o: &ImageBasedGroupUpgrade| {
        (
            o.metadata.labels.clone().unwrap_or_default(),
            o.metadata.annotations.clone().unwrap_or_default(),
        )
    };
    let spec_changed = cr.spec != stored.spec;
    if spec_changed || meta(cr) != meta(stored) {
        SpecSync::Update { spec_changed }
    } else {
        SpecSync::Same
    }
}

/// The status the CR should show when the engine refused its spec: every problem, in a
/// `Progressing=False/InvalidSpec` condition with the CR's generation.
pub fn invalid_status(
    cr: &ImageBasedGroupUpgrade,
    causes: &[StatusCause],
    now: DateTime<Utc>,
) -> ImageBasedGroupUpgradeStatus {
    let message = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect::<Vec<_>>()
        .join("; ");
    let mut status = cr.status.clone().unwrap_or_default();
    status.observed_generation = cr.metadata.generation;
    let condition = Condition {
        type_: "Progressing".into(),
        status: ConditionStatus::False,
        reason: "InvalidSpec".into(),
        message,
        last_transition_time: Some(now),
        observed_generation: cr.metadata.generation,
    };
    match status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == "Progressing")
    {
        Some(c) if c.reason == condition.reason && c.message == condition.message => {}
        Some(c) => *c = condition,
        None => status.conditions.push(condition),
    }
    status
}

/// The status to write, when it differs from what the CR shows.
pub fn status_update(
    cr: &ImageBasedGroupUpgrade,
    wanted: &ImageBasedGroupUpgradeStatus,
) -> Option<ImageBasedGroupUpgradeStatus> {
    let shown = cr.status.clone().unwrap_or_default();
    (shown != *wanted).then(|| wanted.clone())
}

/// The labels the hub keeps for a cluster known from a ManagedCluster: the ManagedCluster's
/// own labels, except the `lcm.openshift.io/ibgu-*` ones, which the hub owns.
pub fn fleet_labels(
    managed: &BTreeMap<String, String>,
    stored: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    managed
        .iter()
        .filter(|(k, _)| !is_ibgu_label(k))
        .chain(stored.iter().filter(|(k, _)| is_ibgu_label(k)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Merge patch putting the hub's `lcm.openshift.io/ibgu-*` labels on a ManagedCluster (and
/// removing the others), with the resourceVersion it was computed from; `None` when they
/// already match.
pub fn label_patch(
    managed: &BTreeMap<String, String>,
    resource_version: Option<&str>,
    stored: &BTreeMap<String, String>,
) -> Option<Value> {
    let mut labels = serde_json::Map::new();
    for (k, v) in stored.iter().filter(|(k, _)| is_ibgu_label(k)) {
        if managed.get(k) != Some(v) {
            labels.insert(k.clone(), json!(v));
        }
    }
    for k in managed.keys().filter(|k| is_ibgu_label(k)) {
        if !stored.contains_key(k) {
            labels.insert(k.clone(), Value::Null);
        }
    }
    if labels.is_empty() {
        return None;
    }
    let mut metadata = json!({"labels": labels});
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    Some(json!({"metadata": metadata}))
}

/// A Kubernetes Event for a history row: step and batch starts, timeouts and failures.
#[derive(Debug, PartialEq)]
pub struct EventNote {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

pub fn event_for(event: &str, cluster: Option<&str>, message: &str) -> Option<EventNote> {
    let warning = match event {
        "StepStarted" | "BatchStarted" | "StepCompleted" => false,
        "StepTimedOut" | "BatchTimedOut" | "ActionFailed" | "ActionTimedOut"
        | "ClusterNotStarted" => true,
        _ => return None,
    };
    let note = match cluster {
        Some(c) => format!("{c}: {message}"),
        None => message.to_string(),
    };
    Some(EventNote {
        warning,
        reason: event.to_string(),
        // Event notes are limited to 1 kB.
        note: note.chars().take(1000).collect(),
    })
}

/// What a replica does with the Lease.
#[derive(Debug, PartialEq)]
pub enum LeaseStep {
    /// Nobody holds it, or the holder let it expire: take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Another replica holds it until then.
    Follow {
        holder: String,
        until: DateTime<Utc>,
    },
}

pub fn lease_step(
    holder: Option<&str>,
    renewed: Option<DateTime<Utc>>,
    duration_seconds: i64,
    me: &str,
    now: DateTime<Utc>,
) -> LeaseStep {
    match (holder.filter(|h| !h.is_empty()), renewed) {
        (Some(h), _) if h == me => LeaseStep::Renew,
        (Some(h), Some(t)) if t + chrono::Duration::seconds(duration_seconds) > now => {
            LeaseStep::Follow {
                holder: h.to_string(),
                until: t + chrono::Duration::seconds(duration_seconds),
            }
        }
        _ => LeaseStep::Acquire,
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
