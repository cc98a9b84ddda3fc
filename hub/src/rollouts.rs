//! Creating and changing a rollout, the one way both the REST API and the Kubernetes
//! controller do it: validate against what is stored (the ConfigMaps it refers to), store,
//! wake the engine. Each edge only turns the answer into its own (a `Status`, a CR status).

use std::collections::BTreeSet;

use fleet_types::ibgu::ImageBasedGroupUpgrade;
use fleet_types::ibu::ConfigMapRef;
use fleet_types::status::StatusCause;
use sqlx::PgPool;

use crate::engine::Engine;
use crate::error::Error;
use crate::planner::rollout::Event;
use crate::planner::validate;
use crate::store::{self, RolloutRow};

/// What became of a new or changed rollout.
pub enum Verdict {
    /// Stored (as the row now reads), and the engine woken.
    Stored(Box<RolloutRow>),
    /// Not valid: every problem, nothing stored.
    Refused(Vec<StatusCause>),
}

/// Stores a new rollout when it is valid; one of that name already stored is a conflict.
pub async fn create(
    pool: &PgPool,
    engine: &Engine,
    obj: &ImageBasedGroupUpgrade,
) -> Result<Verdict, Error> {
    let causes = problems(pool, obj, None).await?;
    if !causes.is_empty() {
        return Ok(Verdict::Refused(causes));
    }
    let Some(row) = store::rollout_insert(pool, obj).await? else {
        return Err(Error::Conflict(format!(
            "rollout {}/{} already exists",
            obj.metadata.namespace.as_deref().unwrap_or_default(),
            obj.metadata.name.as_deref().unwrap_or_default()
        )));
    };
    engine.trigger();
    Ok(Verdict::Stored(Box::new(row)))
}

/// Stores a stored rollout's new version (spec, labels, annotations) when the change is
/// valid; a changed spec is planned again by the engine. The row answered is as stored,
/// without the per-cluster status (the REST API reads that for its answer). A pause or a
/// resume is a history event of `actor`'s. A plan item appended to a halted rollout is a
/// conflict.
pub async fn change(
    pool: &PgPool,
    engine: &Engine,
    stored: &RolloutRow,
    new: &ImageBasedGroupUpgrade,
    actor: &str,
) -> Result<Verdict, Error> {
    let causes = problems(pool, new, Some(&stored.object)).await?;
    if !causes.is_empty() {
        return Ok(Verdict::Refused(causes));
    }
    if new.spec.plan.len() > stored.object.spec.plan.len()
        && store::rollout_halted(pool, stored.id).await?
    {
        return Err(Error::Conflict(format!(
            "rollout {} is halted: create a new ImageBasedGroupUpgrade",
            new.metadata.name.as_deref().unwrap_or_default()
        )));
    }
    let spec_changed = new.spec != stored.object.spec;
    let row = store::rollout_update(pool, stored.id, new, spec_changed)
        .await?
        .ok_or_else(|| {
            Error::Conflict(format!(
                "rollout {}/{} was deleted meanwhile",
                new.metadata.namespace.as_deref().unwrap_or_default(),
                new.metadata.name.as_deref().unwrap_or_default()
            ))
        })?;
    if new.spec.paused != stored.object.spec.paused {
        let (event, message) = if new.spec.paused {
            (
                "Paused",
                format!("paused by {actor}: no cluster starts an action"),
            )
        } else {
            ("Resumed", format!("resumed by {actor}"))
        };
        let e = Event {
            cluster: None,
            step: None,
            action: None,
            event,
            message,
            took: None,
        };
        store::history_append(pool, &row, &[e], actor).await?;
    }
    engine.trigger();
    Ok(Verdict::Stored(Box::new(row)))
}

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
