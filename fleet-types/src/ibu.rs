//! The spoke's `ImageBasedUpgrade` (`lca.openshift.io/v1`), a cluster-scoped singleton named
//! `upgrade`. Field names follow the Lifecycle Agent exactly; optional fields are omitted
//! when empty so that objects round-trip unchanged.

use std::fmt;

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The name of the one IBU object each cluster has.
pub const IBU_NAME: &str = "upgrade";

/// Desired stage of the upgrade (`spec.stage`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum Stage {
    #[default]
    Idle,
    Prep,
    Upgrade,
    Rollback,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Idle, Stage::Prep, Stage::Upgrade, Stage::Rollback];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Idle => "Idle",
            Stage::Prep => "Prep",
            Stage::Upgrade => "Upgrade",
            Stage::Rollback => "Rollback",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "lca.openshift.io",
    version = "v1",
    kind = "ImageBasedUpgrade",
    shortname = "ibu",
    status = "ImageBasedUpgradeStatus",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct ImageBasedUpgradeSpec {
    #[serde(default)]
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_image_ref: Option<SeedImageRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oadp_content: Vec<ConfigMapRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_manifests: Vec<ConfigMapRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback_on_failure: Option<AutoRollbackOnFailure>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeedImageRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secret_ref: Option<PullSecretRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct PullSecretRef {
    pub name: String,
}

/// A reference to a ConfigMap (`oadpContent[]`, `extraManifests[]`).
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub struct ConfigMapRef {
    pub name: String,
    pub namespace: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoRollbackOnFailure {
    /// Watchdog after the first reboot into the new stateroot; `0` or unset means 1800.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_monitor_timeout_seconds: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageBasedUpgradeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Always serialized (an empty list means "no transition allowed now").
    #[serde(default)]
    pub valid_next_stages: Vec<Stage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<StageHistory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_availability_expiration: Option<DateTime<Utc>>,
}

/// The condition types of the IBU, in the spelling of the Lifecycle Agent.
pub mod condition_type {
    pub const IDLE: &str = "Idle";
    pub const PREP_IN_PROGRESS: &str = "PrepInProgress";
    pub const PREP_COMPLETED: &str = "PrepCompleted";
    pub const UPGRADE_IN_PROGRESS: &str = "UpgradeInProgress";
    pub const UPGRADE_COMPLETED: &str = "UpgradeCompleted";
    pub const ROLLBACK_IN_PROGRESS: &str = "RollbackInProgress";
    pub const ROLLBACK_COMPLETED: &str = "RollbackCompleted";
}

/// Condition reasons used by the IBU.
pub mod reason {
    pub const IDLE: &str = "Idle";
    pub const IN_PROGRESS: &str = "InProgress";
    pub const COMPLETED: &str = "Completed";
    pub const FAILED: &str = "Failed";
    pub const ABORTING: &str = "Aborting";
    pub const ABORT_FAILED: &str = "AbortFailed";
    pub const FINALIZING: &str = "Finalizing";
    pub const FINALIZE_FAILED: &str = "FinalizeFailed";
    pub const INVALID_TRANSITION: &str = "InvalidTransition";
    /// The Lifecycle Agent holds the stage while an IPConfig change is not Idle (the stage's
    /// in-progress condition, False, message `IPC is not idle`).
    pub const BLOCKED: &str = "Blocked";
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// A `metav1.Condition` as the Lifecycle Agent writes it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageHistory {
    pub stage: Stage,
    pub start_time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseHistory>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseHistory {
    pub phase: String,
    pub start_time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<DateTime<Utc>>,
}

impl ImageBasedUpgradeStatus {
    /// The condition of that type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// The last condition: what `oc get ibu` shows as State (reason) and Details (message).
    pub fn current(&self) -> Option<&Condition> {
        self.conditions.last()
    }
}
