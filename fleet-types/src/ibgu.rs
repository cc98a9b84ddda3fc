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
    /// The hub's extension (`ibgu-hub.md` section 5): while true no cluster starts an
    /// action; running ones go on and timeouts stop.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The hub's extension: clusters start actions only inside this daily window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<MaintenanceWindow>,
}

/// `spec.maintenanceWindow`: a daily window, in a time zone of the tz database.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    /// Local start time, `HH:MM`.
    pub start: String,
    /// Minutes the window stays open (1 to 1440).
    pub duration_minutes: i64,
    /// An IANA time zone name; absent means UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

impl MaintenanceWindow {
    pub fn time_zone(&self) -> &str {
        self.time_zone.as_deref().unwrap_or("UTC")
    }
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

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// Clusters per batch. Kept signed so that `0` or a negative value reaches validation
    /// and is reported with the other problems instead of failing deserialization.
    #[serde(default)]
    pub max_concurrency: i64,
    /// Minutes for the whole step across all its batches; absent means 240.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Failures allowed in this item before it halts: a count or `"N%"` of its clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<IntOrPercent>,
    /// The first batch holds this many clusters (`lcm.openshift.io/canary` ones first);
    /// the item goes on only if all of them completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_clusters: Option<i64>,
    /// Each batch after the first is this many times the size of the one before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_growth_factor: Option<f64>,
    /// At most this many clusters start their first action in any 60 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_starts_per_minute: Option<i64>,
    /// Times a failed `Prep` is aborted and tried again (0 to 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
    /// At most `maxUnavailable` clusters of one group (same `groupBy` label values) per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudget>,
}

/// `rolloutStrategy.disruptionBudget`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudget {
    #[serde(default)]
    pub group_by: Vec<String>,
    #[serde(default)]
    pub max_unavailable: i64,
}

/// A count or a percentage (`"10%"`), as Kubernetes' `IntOrString` for such fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrPercent {
    Int(i64),
    String(String),
}

impl JsonSchema for IntOrPercent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrPercent".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"x-kubernetes-int-or-string": true})
    }
}

impl IntOrPercent {
    /// The count this allows out of `total` (a percentage rounded down), or `None` when it
    /// is neither a count >= 0 nor a percentage between 0% and 100%.
    pub fn of(&self, total: usize) -> Option<usize> {
        match self {
            IntOrPercent::Int(n) => usize::try_from(*n).ok(),
            IntOrPercent::String(s) => {
                let pct: u64 = s.strip_suffix('%')?.parse().ok()?;
                (pct <= 100).then(|| (total as u64 * pct / 100) as usize)
            }
        }
    }
}

impl fmt::Display for IntOrPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrPercent::Int(n) => write!(f, "{n}"),
            IntOrPercent::String(s) => f.write_str(s),
        }
    }
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
