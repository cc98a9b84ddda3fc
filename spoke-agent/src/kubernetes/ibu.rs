//! The `ImageBasedUpgrade` named `upgrade` on the agent's own cluster, kept the same as the
//! agent's: created at start, its status written after every change, its spec and
//! `lca.openshift.io` annotations taken from `oc patch` (through the same request checks as
//! the local API) and written back when the hub changed them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_types::ibu::{ImageBasedUpgrade, ImageBasedUpgradeSpec};
use futures::StreamExt;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};

use spoke_core::Error;
use spoke_core::host::Host;
use spoke_core::runner::Agent;

pub const NAME: &str = "upgrade";
/// Without any change, look again this often anyway.
const RESYNC: Duration = Duration::from_secs(30);

/// What the CR and the agent are compared on: the spec and the annotations the agent reads
/// or writes (those of `lca.openshift.io`).
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub spec: ImageBasedUpgradeSpec,
    pub annotations: BTreeMap<String, String>,
}

impl Desired {
    pub fn of(ibu: &ImageBasedUpgrade) -> Desired {
        Desired {
            spec: ibu.spec.clone(),
            annotations: ibu
                .metadata
                .annotations
                .iter()
                .flatten()
                .filter(|(k, _)| k.contains("lca.openshift.io"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// The merge patch turning `from`'s annotations and spec into these.
    pub fn patch_from(&self, from: &Desired) -> Value {
        let mut annotations = serde_json::Map::new();
        for (k, v) in &self.annotations {
            annotations.insert(k.clone(), json!(v));
        }
        for k in from.annotations.keys() {
            if !self.annotations.contains_key(k) {
                annotations.insert(k.clone(), Value::Null);
            }
        }
        let mut spec = serde_json::to_value(&self.spec).unwrap_or_default();
        // Fields the user removed are removed (a merge patch needs an explicit null).
        let old = serde_json::to_value(&from.spec).unwrap_or_default();
        if let (Some(s), Some(o)) = (spec.as_object_mut(), old.as_object()) {
            for k in o.keys() {
                s.entry(k.clone()).or_insert(Value::Null);
            }
        }
        json!({"metadata": {"annotations": annotations}, "spec": spec})
    }
}

#[derive(Debug, PartialEq)]
pub enum SyncStep {
    /// No CR yet: create it from the agent's.
    Create,
    /// The CR shows what the agent has.
    InSync,
    /// The agent changed (a hub push, an annotation it writes): write that to the CR.
    WriteToCr,
    /// Someone changed the CR (`oc patch`): ask the agent for it.
    ApplyToAgent,
}

/// `last` is what the CR and the agent last agreed on (none after a restart).
pub fn sync_step(cr: Option<&Desired>, agent: &Desired, last: Option<&Desired>) -> SyncStep {
    match cr {
        None => SyncStep::Create,
        Some(cr) if cr == agent => SyncStep::InSync,
        Some(cr) if Some(cr) == last => SyncStep::WriteToCr,
        Some(_) => SyncStep::ApplyToAgent,
    }
}

/// The agent's IBU as the CR shows it: its status, with the generation the CR has (the API
/// server counts the CR's generations).
pub fn status_for_cr(agent: &ImageBasedUpgrade, cr_generation: Option<i64>) -> Value {
    let mut status = serde_json::to_value(&agent.status).unwrap_or(Value::Null);
    let local = agent.metadata.generation;
    if let (Some(g), Some(obj)) = (cr_generation, status.as_object_mut())
        && obj.get("observedGeneration").and_then(Value::as_i64) == local
    {
        obj.insert("observedGeneration".into(), json!(g));
        if let Some(conds) = obj.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in conds {
                if c.get("observedGeneration").and_then(Value::as_i64) == local {
                    c["observedGeneration"] = json!(g);
                }
            }
        }
    }
    status
}

/// Keeps the CR and the agent the same until the task is dropped.
pub async fn run<H: Host>(agent: Arc<Agent<H>>, client: kube::Client) {
    let api: Api<ImageBasedUpgrade> = Api::all(client);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watch = {
        let api = api.clone();
        tokio::spawn(async move {
            let config = watcher::Config::default().fields(&format!("metadata.name={NAME}"));
            let mut events = watcher(api, config).boxed();
            while let Some(e) = events.next().await {
                if let Err(err) = e {
                    tracing::debug!(%err, "watching the IBU failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let _ = tx.try_send(());
            }
        })
    };
    let mut changes = agent.session().subscribe();
    let mut last: Option<Desired> = None;
    loop {
        if let Err(err) = pass(&agent, &api, &mut last).await {
            tracing::warn!(%err, "syncing the ImageBasedUpgrade CR failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = rx.recv() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        if watch.is_finished() {
            return;
        }
    }
}

/// One comparison of the CR with the agent, and what it calls for. The spec and the status
/// written come from one snapshot of the agent, so the CR never shows a status its spec has
/// not reached (the API's stage rule reads the old status).
pub async fn pass<H: Host>(
    agent: &Agent<H>,
    api: &Api<ImageBasedUpgrade>,
    last: &mut Option<Desired>,
) -> Result<(), kube::Error> {
    let Ok(local) = agent.visible().await else {
        if agent.is_rebooting() && api.get_opt(NAME).await?.is_some() {
            // As the Lifecycle Agent across a reboot: the CR goes, and is created again
            // from the saved IBU once the node is back (a new UID, the generation
            // restarting), which `oc get ibu` and a delegate watching it both see.
            tracing::info!("rebooting: deleting the ImageBasedUpgrade CR until the node is back");
            api.delete(NAME, &Default::default()).await?;
            *last = None;
        }
        return Ok(());
    };
    let mine = Desired::of(&local.ibu);
    let cr = api.get_opt(NAME).await?;
    let step = sync_step(cr.as_ref().map(Desired::of).as_ref(), &mine, last.as_ref());
    let mut cr = match (step, cr) {
        (SyncStep::Create, _) | (_, None) => {
            let obj = ImageBasedUpgrade {
                metadata: ObjectMeta {
                    name: Some(NAME.into()),
                    annotations: Some(mine.annotations.clone()),
                    ..Default::default()
                },
                spec: mine.spec.clone(),
                status: None,
            };
            tracing::info!("creating the ImageBasedUpgrade CR");
            let created = api.create(&PostParams::default(), &obj).await?;
            *last = Some(mine.clone());
            created
        }
        (SyncStep::InSync, Some(cr)) => {
            *last = Some(mine.clone());
            cr
        }
        (SyncStep::WriteToCr, Some(mut cr)) => {
            write_desired(&mut cr, &mine);
            let written = api.replace(NAME, &PostParams::default(), &cr).await?;
            *last = Some(mine.clone());
            written
        }
        (SyncStep::ApplyToAgent, Some(mut cr)) => {
            let wanted = Desired::of(&cr);
            match agent.patch(&wanted.patch_from(&mine)).await {
                Ok(_) => {
                    tracing::info!(stage = %wanted.spec.stage, "IBU change from the cluster accepted");
                    *last = Some(wanted);
                    // The agent changed: the next pass shows its new status.
                    return Ok(());
                }
                Err(Error::Invalid(why)) => {
                    // What the API would have refused: the CR goes back to the agent's.
                    tracing::warn!(%why, "IBU change from the cluster refused; restoring the CR");
                    write_desired(&mut cr, &mine);
                    let written = api.replace(NAME, &PostParams::default(), &cr).await?;
                    *last = Some(mine.clone());
                    written
                }
                Err(err) => {
                    tracing::warn!(%err, "IBU change from the cluster not applied yet");
                    return Ok(());
                }
            }
        }
    };
    let status = status_for_cr(&local.ibu, cr.metadata.generation);
    if serde_json::to_value(&cr.status).unwrap_or(Value::Null) != status {
        cr.status = serde_json::from_value(status).ok();
        api.replace_status(NAME, &PostParams::default(), &cr)
            .await?;
    }
    Ok(())
}

fn write_desired(cr: &mut ImageBasedUpgrade, d: &Desired) {
    cr.spec = d.spec.clone();
    let annotations = cr.metadata.annotations.get_or_insert_with(Default::default);
    annotations.retain(|k, _| !k.contains("lca.openshift.io"));
    annotations.extend(d.annotations.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_types::ibu::Stage;

    fn desired(stage: Stage, ann: &[(&str, &str)]) -> Desired {
        Desired {
            spec: ImageBasedUpgradeSpec {
                stage,
                ..Default::default()
            },
            annotations: ann
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn who_changed_what_decides_the_direction() {
        let idle = desired(Stage::Idle, &[]);
        let prep = desired(Stage::Prep, &[]);
        assert_eq!(sync_step(None, &idle, None), SyncStep::Create);
        assert_eq!(sync_step(Some(&idle), &idle, None), SyncStep::InSync);
        // The hub moved the agent to Prep; the CR still shows what both agreed on.
        assert_eq!(
            sync_step(Some(&idle), &prep, Some(&idle)),
            SyncStep::WriteToCr
        );
        // `oc patch` moved the CR to Prep.
        assert_eq!(
            sync_step(Some(&prep), &idle, Some(&idle)),
            SyncStep::ApplyToAgent
        );
        // After a restart nothing is known: the CR is taken as the user's wish.
        assert_eq!(sync_step(Some(&prep), &idle, None), SyncStep::ApplyToAgent);
    }

    #[test]
    fn patches_set_and_remove_annotations_and_spec_fields() {
        let key = "auto-rollback-on-failure.lca.openshift.io/post-reboot-config";
        let mut from = desired(Stage::Prep, &[(key, "Disabled")]);
        from.spec.seed_image_ref = Some(Default::default());
        let to = desired(Stage::Idle, &[]);
        let patch = to.patch_from(&from);
        assert_eq!(patch["metadata"]["annotations"][key], Value::Null);
        assert_eq!(patch["spec"]["stage"], "Idle");
        assert_eq!(patch["spec"]["seedImageRef"], Value::Null);
        let other = desired(Stage::Idle, &[("example.com/x", "1")]);
        assert!(
            Desired::of(&{
                let mut i = ImageBasedUpgrade::new(NAME, other.spec.clone());
                i.metadata.annotations = Some(other.annotations.clone());
                i
            })
            .annotations
            .is_empty(),
            "only lca.openshift.io annotations are compared"
        );
    }

    #[test]
    fn the_cr_status_carries_the_crs_generation() {
        let mut ibu = ImageBasedUpgrade::new(NAME, Default::default());
        ibu.metadata.generation = Some(3);
        ibu.status = serde_json::from_value(json!({
            "observedGeneration": 3,
            "conditions": [{"type": "Idle", "status": "True", "reason": "Idle", "message": "Idle", "observedGeneration": 3}]
        }))
        .unwrap();
        let s = status_for_cr(&ibu, Some(5));
        assert_eq!(s["observedGeneration"], 5);
        assert_eq!(s["conditions"][0]["observedGeneration"], 5);
        ibu.metadata.generation = Some(4);
        assert_eq!(
            status_for_cr(&ibu, Some(5))["observedGeneration"],
            3,
            "not caught up yet"
        );
    }
}
