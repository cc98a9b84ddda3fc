//! Types that the hub and the spoke agent both speak.
//!
//! The two resources mirror the Lifecycle Agent's `ImageBasedUpgrade` and TALM's
//! `ImageBasedGroupUpgrade` field for field, so that manifests and `oc get -o yaml` output
//! written for those tools round-trip through ours unchanged. Everything here is plain data:
//! no IO, no tokio, so both engines can depend on it.

pub mod clock;
pub mod http;
pub mod ibgu;
pub mod ibu;
pub mod labels;
pub mod messages;
pub mod names;
pub mod status;

pub use ibgu::{
    Action, ClusterLabelSelector, ImageBasedGroupUpgrade, ImageBasedGroupUpgradeSpec,
    ImageBasedGroupUpgradeStatus, PlanItem, RolloutStrategy,
};
pub use ibu::{
    Condition, ConditionStatus, ImageBasedUpgrade, ImageBasedUpgradeSpec, ImageBasedUpgradeStatus,
    Stage,
};
pub use status::{Reason, Status};
