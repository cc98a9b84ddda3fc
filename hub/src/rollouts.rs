//! What the REST API and the Kubernetes controller share when a rollout arrives or changes:
//! the validation against what is stored (the ConfigMaps it refers to).

use std::collections::BTreeSet;

use fleet_types::ibgu::ImageBasedGroupUpgrade;
use fleet_types::ibu::ConfigMapRef;
use fleet_types::status::StatusCause;
use sqlx::PgPool;

use crate::error::Error;
use crate::planner::validate;
use crate::store;

/// Every problem of a new (`old` is `None`) or changed IBGU; empty when it is valid.
pub async fn problems(
    pool: &PgPool,
    new: &ImageBasedGroupUpgrade,
    old: Option<&ImageBasedGroupUpgrade>,
) -> Result<Vec<StatusCause>, Error> {
    let existing: BTreeSet<(String, String)> =
        store::configmap_names(pool).await?.into_iter().collect();
    let exists = |r: &ConfigMapRef| existing.contains(&(r.namespace.clone(), r.name.clone()));
    Ok(validate::validate(new, old, &exists))
}
