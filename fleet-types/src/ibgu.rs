//! The hub's `ImageBasedGroupUpgrade` (`lcm.openshift.io/v1alpha1`), the resource TALM
//! reconciles on an ACM hub. TALM manifests must deserialize and serialize back unchanged,
//! so everything TALM leaves out stays out. The hub's own extensions are optional fields.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ibu::{AutoRollbackOnFailure, Condition, ConfigMapRef, SeedImageRef, Stage};

/// Default `rolloutStrategy.timeout`, in minutes, as in TALM's CRD.
pub const DEFAULT_STEP_TIMEOUT_MINUTES: i64 = 240;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "lcm.openshift.io",
    version = "v1alpha1",
    kind = "ImageBasedGroupUpgrade",
    shortname = "ibgu",
    namespaced,
    status = "ImageBasedGroupUpgradeStatus",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct ImageBasedGroupUpgradeSpec {
    /// The IBU spec sent to every selected spoke; its `stage` is ignored.
    #[serde(default)]
    pub ibu_spec: IbuSpecTemplate,
    #[serde(default)]
    pub cluster_label_selectors: Vec<ClusterLabelSelector>,
    #[serde(default)]
    pub plan: Vec<PlanItem>,
}

/// `spec.ibuSpec`: the fields of an IBU spec; `stage` is accepted and ignored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IbuSpecTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_image_ref: Option<SeedImageRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oadp_content: Vec<ConfigMapRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_manifests: Vec<ConfigMapRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback_on_failure: Option<AutoRollbackOnFailure>,
}

/// A Kubernetes label selector; a cluster matching any selector of the list is selected.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterLabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanItem {
    pub actions: Vec<Action>,
    #[serde(default)]
    pub rollout_strategy: RolloutStrategy,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// Clusters per batch. Kept signed so that `0` or a negative value reaches validation
    /// and is reported with the other problems instead of failing deserialization.
    #[serde(default)]
    pub max_concurrency: i64,
    /// Minutes for the whole step across all its batches; absent means 240.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

impl RolloutStrategy {
    pub fn timeout_minutes(&self) -> i64 {
        self.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT_MINUTES)
    }
}

/// The plan actions, spelled as TALM spells them.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum Action {
    Prep,
    Upgrade,
    Rollback,
    FinalizeUpgrade,
    FinalizeRollback,
    Abort,
    AbortOnFailure,
}

impl Action {
    pub const ALL: [Action; 7] = [
        Action::Prep,
        Action::Upgrade,
        Action::Rollback,
        Action::FinalizeUpgrade,
        Action::FinalizeRollback,
        Action::Abort,
        Action::AbortOnFailure,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Prep => "Prep",
            Action::Upgrade => "Upgrade",
            Action::Rollback => "Rollback",
            Action::FinalizeUpgrade => "FinalizeUpgrade",
            Action::FinalizeRollback => "FinalizeRollback",
            Action::Abort => "Abort",
            Action::AbortOnFailure => "AbortOnFailure",
        }
    }

    /// The stage the hub sets on the spoke's IBU for this action.
    pub fn spoke_stage(self) -> Stage {
        match self {
            Action::Prep => Stage::Prep,
            Action::Upgrade => Stage::Upgrade,
            Action::Rollback => Stage::Rollback,
            Action::FinalizeUpgrade
            | Action::FinalizeRollback
            | Action::Abort
            | Action::AbortOnFailure => Stage::Idle,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown action {s:?}"))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageBasedGroupUpgradeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Improvement over TALM: when the rollout started and ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterState>,
    /// Improvement over TALM: counts per plan step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub summary: Vec<StepSummary>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterState {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completed_actions: Vec<ActionMessage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_actions: Vec<ActionMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_action: Option<ActionMessage>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ActionMessage {
    pub action: Action,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepSummary {
    pub step: u32,
    pub actions: Vec<Action>,
    pub selected: u32,
    pub completed: u32,
    pub failed: u32,
    pub timed_out: u32,
    pub in_progress: u32,
    pub pending: u32,
}
