//! The fleet from ManagedClusters: their labels (and the spoke endpoint annotation) go into
//! the hub's cluster table, and the hub's `lcm.openshift.io/ibgu-*` labels go back onto
//! them. A pass takes no input but the two sides, so it is repeated, never resumed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};

use super::Context;
use super::decide;
use crate::error::Error;
use crate::store;

/// How often the two sides are compared when nothing is said to have changed.
const PASS_EVERY: Duration = Duration::from_secs(2);

pub fn managed_cluster_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cluster.open-cluster-management.io", "v1", "ManagedCluster"),
        "managedclusters",
    )
}

/// Watches ManagedClusters and runs a pass at every change and every few seconds.
pub async fn run(ctx: Arc<Context>) {
    let resource = managed_cluster_resource();
    let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &resource);
    let writer = reflector::store::Writer::new(resource.clone());
    let reader = writer.as_reader();
    let changes = reflector::reflector(writer, watcher(api.clone(), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let watch = tokio::spawn(async move {
        changes
            .for_each(|r| async move {
                if let Err(err) = r {
                    tracing::warn!(%err, "watching ManagedClusters failed; retrying");
                }
            })
            .await;
    });
    if reader.wait_until_ready().await.is_err() {
        watch.abort();
        return;
    }
    loop {
        if let Err(err) = pass(&ctx, &api, &reader).await {
            tracing::warn!(%err, "ManagedCluster sync failed; retrying");
        }
        tokio::time::sleep(PASS_EVERY).await;
    }
}

/// One comparison of the ManagedClusters with the stored clusters, both ways.
pub async fn pass(
    ctx: &Context,
    api: &Api<DynamicObject>,
    reader: &Store<DynamicObject>,
) -> Result<(), Error> {
    let managed = reader.state();
    let stored = store::cluster_labels_all(&ctx.pool).await?;
    let mut changed = Vec::new();
    for mc in &managed {
        let name = mc.name_any();
        let labels = mc.labels().clone();
        let endpoint = mc
            .annotations()
            .get(decide::ENDPOINT_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        let same = stored.get(&name).is_some_and(|(l, e)| {
            decide::fleet_labels(&labels, l) == *l && (endpoint.is_empty() || *e == endpoint)
        });
        if !same {
            changed.push((name, labels, endpoint));
        }
    }
    if !changed.is_empty() {
        tracing::info!(
            count = changed.len(),
            "clusters updated from ManagedClusters"
        );
        store::cluster_sync_from_kube(&ctx.pool, &changed).await?;
    }
    for mc in &managed {
        let name = mc.name_any();
        let Some((hub_labels, _)) = stored.get(&name) else {
            continue;
        };
        write_labels(api, mc, hub_labels).await?;
    }
    Ok(())
}

/// Patches the ibgu labels of one ManagedCluster, at the resourceVersion they were compared
/// at; after a 409 it reads the object again and compares once more.
async fn write_labels(
    api: &Api<DynamicObject>,
    mc: &DynamicObject,
    hub_labels: &BTreeMap<String, String>,
) -> Result<(), Error> {
    let name = mc.name_any();
    let mut current = mc.clone();
    for attempt in 0..2 {
        let Some(patch) = decide::label_patch(
            current.labels(),
            current.resource_version().as_deref(),
            hub_labels,
        ) else {
            return Ok(());
        };
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(cluster = %name, "ibgu labels written to the ManagedCluster");
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 && attempt == 0 => {
                current = api.get(&name).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
