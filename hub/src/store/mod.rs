//! Postgres access, named resource first (`cluster_register`, `rollout_fetch`, ...). The
//! functions run single statements or short transactions; the engine's pass uses the
//! `_in_txn` ones inside its own transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use fleet_types::ibgu::{Action, ImageBasedGroupUpgrade, ImageBasedGroupUpgradeStatus};
use fleet_types::ibu::{ImageBasedUpgrade, Stage};
use fleet_types::messages::RegisterRequest;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{FromRow, PgConnection, PgPool, Row};

use crate::error::Error;
use crate::planner::drive::Driver;
use crate::planner::rollout::{
    ClusterInfo, ClusterPhase, ClusterProgress, Event, Halt, LabelChange, StepHead, StepState, Wait,
};

mod audit;
mod clusters;
mod configmaps;
mod credentials;
mod fleet;
mod history;
mod progress;
mod reports;
mod rollouts;
mod snapshot;

pub use audit::*;
pub use clusters::*;
pub use configmaps::*;
pub use credentials::*;
pub use fleet::*;
pub use history::*;
pub use progress::*;
pub use reports::*;
pub use rollouts::*;
pub use snapshot::*;
