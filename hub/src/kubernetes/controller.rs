//! The ImageBasedGroupUpgrade reconciler: a CR becomes a rollout of the engine (and follows
//! its appended plan items), its status is written back through the status subresource, and
//! a deleted CR leaves the engine before its finalizer is removed.

use std::sync::Arc;
use std::time::Duration;

use fleet_types::ibgu::{ImageBasedGroupUpgrade, ImageBasedGroupUpgradeStatus};
use fleet_types::status::StatusCause;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::Context;
use super::decide::{self, SpecSync};
use crate::error::Error;
use crate::rollouts::{self, Verdict};
use crate::store;

/// While a rollout runs, its status is copied this often (the engine moves it).
const ACTIVE_RESYNC: Duration = Duration::from_secs(1);
/// A finished or refused rollout is looked at again this often anyway (a ConfigMap it
/// needs may have appeared).
const IDLE_RESYNC: Duration = Duration::from_secs(60);

pub async fn reconcile(
    obj: Arc<ImageBasedGroupUpgrade>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let name = obj.name_any();
    let api: Api<ImageBasedGroupUpgrade> = Api::namespaced(ctx.client.clone(), &ns);
    if obj.meta().deletion_timestamp.is_some() {
        if store::rollout_delete(&ctx.pool, &ns, &name).await? {
            tracing::info!(rollout = %format!("{ns}/{name}"), "IBGU deleted: rollout removed");
            audit(&ctx, &obj, "delete").await;
            ctx.engine.trigger();
        }
        if let Some(patch) = decide::remove_finalizer(&obj) {
            let patch: json_patch::Patch = serde_json::from_value(patch)
                .map_err(|e| Error::internal("encoding a patch", e))?;
            api.patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await?;
        }
        return Ok(Action::await_change());
    }
    if !decide::has_finalizer(&obj) {
        let patch: json_patch::Patch = serde_json::from_value(decide::add_finalizer(&obj))
            .map_err(|e| Error::internal("encoding a patch", e))?;
        api.patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await?;
        // The patch is a change: the next reconcile goes on from here.
        return Ok(Action::await_change());
    }
    let mut desired = (*obj).clone();
    desired.metadata.namespace = Some(ns.clone());
    desired.status = None;
    let stored = store::rollout_fetch_stored(&ctx.pool, &ns, &name).await?;
    let sync = decide::spec_sync(&desired, stored.as_ref().map(|r| &r.object));
    // The ConfigMaps are read when the spec is new or changed (validation needs them), not
    // at every resync of a running rollout.
    if sync != SpecSync::Same {
        copy_configmaps(&ctx, &obj).await?;
    }
    let refused = match sync {
        SpecSync::Same => None,
        SpecSync::Create => match rollouts::create(&ctx.pool, &ctx.engine, &desired).await? {
            Verdict::Stored(_) => {
                tracing::info!(rollout = %format!("{ns}/{name}"), "IBGU accepted");
                audit(&ctx, &obj, "create").await;
                None
            }
            Verdict::Refused(problems) => Some(problems),
        },
        SpecSync::Update { .. } => {
            let row = stored.as_ref().ok_or(Error::Conflict(
                "the rollout disappeared while it was being updated".into(),
            ))?;
            match rollouts::change(&ctx.pool, &ctx.engine, row, &desired, "controller").await {
                Ok(Verdict::Stored(_)) => {
                    audit(&ctx, &obj, "patch").await;
                    None
                }
                Ok(Verdict::Refused(problems)) => Some(problems),
                // Appending to a halted rollout: said in the CR's status, as a refusal.
                Err(Error::Conflict(message)) => Some(vec![StatusCause {
                    field: "spec.plan".into(),
                    message,
                }]),
                Err(e) => return Err(e),
            }
        }
    };
    let (wanted, active) = match &refused {
        Some(problems) => (
            decide::invalid_status(&obj, problems, ctx.clock.now()),
            false,
        ),
        None => {
            let row = store::rollout_fetch(&ctx.pool, &ns, &name).await?;
            let active = row.as_ref().is_some_and(|r| r.phase != "Completed");
            let status = row.and_then(|r| r.object.status).unwrap_or_default();
            (status, active)
        }
    };
    if let Some(status) = decide::status_update(&obj, &wanted) {
        write_status(&api, &obj, status).await?;
    }
    Ok(Action::requeue(if active {
        ACTIVE_RESYNC
    } else {
        IDLE_RESYNC
    }))
}

/// Writes a CR's change to the audit trail. The controller sees the object, not who changed
/// it: the entry names the field managers that last wrote it (`kubectl-edit`, `oc`, ...).
async fn audit(ctx: &Context, obj: &ImageBasedGroupUpgrade, verb: &str) {
    let mut managers: Vec<&str> = obj
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.subresource.as_deref().is_none_or(str::is_empty))
        .filter_map(|f| f.manager.as_deref())
        .collect();
    managers.dedup();
    let entry = store::AuditEntry {
        time: ctx.clock.now(),
        actor: "controller".into(),
        verb: verb.into(),
        resource: "rollouts".into(),
        namespace: obj.namespace(),
        name: Some(obj.name_any()),
        message: if managers.is_empty() {
            "from the IBGU CR".into()
        } else {
            format!("from the IBGU CR, written by {}", managers.join(", "))
        },
        ..store::AuditEntry::default()
    };
    if let Err(err) = store::audit_insert(&ctx.pool, &entry).await {
        tracing::error!(%err, "writing the audit trail failed");
    }
}

/// Replaces the status, with the resourceVersion it was read at; on a 409 (the CR changed
/// meanwhile) reads it again and retries once.
async fn write_status(
    api: &Api<ImageBasedGroupUpgrade>,
    obj: &ImageBasedGroupUpgrade,
    status: ImageBasedGroupUpgradeStatus,
) -> Result<(), Error> {
    let name = obj.name_any();
    let mut current = obj.clone();
    for attempt in 0..2 {
        current.status = Some(status.clone());
        match api
            .replace_status(&name, &PostParams::default(), &current)
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 && attempt == 0 => {
                tracing::debug!(rollout = %name, "status conflict; reading the IBGU again");
                current = api.get(&name).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The ConfigMaps the IBGU refers to, copied from the cluster into the hub's store (what the
/// hub sends to each spoke before Prep). A missing one is left to the validation to report.
async fn copy_configmaps(ctx: &Context, obj: &ImageBasedGroupUpgrade) -> Result<(), Error> {
    let spec = &obj.spec.ibu_spec;
    for r in spec.oadp_content.iter().chain(&spec.extra_manifests) {
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &r.namespace);
        if let Some(cm) = api.get_opt(&r.name).await? {
            let data = cm.data.unwrap_or_default();
            if store::configmap_fetch(&ctx.pool, &r.namespace, &r.name).await? != Some(data.clone())
            {
                store::configmap_put(&ctx.pool, &r.namespace, &r.name, &data).await?;
            }
        }
    }
    Ok(())
}

/// After an error: retry soon, a little later each time the CR keeps failing.
pub fn error_policy(obj: Arc<ImageBasedGroupUpgrade>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(rollout = %obj.name_any(), %err, "reconcile failed; retrying");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.metric_label()])
        .inc();
    Action::requeue(Duration::from_secs(2))
}
