//! Kubernetes mode (`fleet-hub serve --kube`): ImageBasedGroupUpgrade CRs reconciled into
//! the engine with their status written back, the fleet read from ManagedClusters and the
//! `lcm.openshift.io/ibgu-*` labels written onto them, Events for steps, batches, timeouts
//! and failures. Every Kubernetes request goes through one rate-limited, counted client; one
//! replica at a time does the Kubernetes writes (a Lease).

pub mod auth;
pub mod client;
pub mod controller;
pub mod decide;
pub mod events;
pub mod fleet;
pub mod lease;

use std::sync::Arc;

use fleet_types::ibgu::ImageBasedGroupUpgrade;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::runtime::{Controller, watcher};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::engine::{Clock, Engine};
use crate::error::Error;
use crate::metrics::Metrics;

/// What the reconcilers share.
pub struct Context {
    pub client: kube::Client,
    /// For the Lease alone: counted, rate-limited apart from the other writes.
    pub lease_client: kube::Client,
    pub pool: PgPool,
    pub engine: Arc<Engine>,
    pub metrics: Metrics,
    pub clock: Arc<dyn Clock>,
    /// This replica's name in the Lease and in Events.
    pub identity: String,
}

/// How Kubernetes mode runs (from `serve`'s flags).
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespaces whose IBGUs are reconciled; empty: all.
    pub namespaces: Vec<String>,
    pub lease_namespace: String,
    pub lease_name: String,
}

/// A client for `config` whose every request is counted and rate-limited.
pub fn client(
    config: kube::Config,
    metrics: &Metrics,
    qps: f64,
    burst: u32,
) -> Result<kube::Client, Error> {
    let layer = client::KubeLayer {
        metrics: metrics.clone(),
        limiter: client::Limiter::new(qps, burst),
    };
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| Error::Invalid(format!("--kube: building the Kubernetes client: {e}")))?;
    Ok(builder.with_layer(&layer).build())
}

/// Runs Kubernetes mode until the task is dropped: the Lease always, the rest while this
/// replica leads.
pub async fn run(ctx: Arc<Context>, options: Options) {
    let (tx, mut leading) = watch::channel(false);
    let lease_api: Api<Lease> = Api::namespaced(ctx.lease_client.clone(), &options.lease_namespace);
    // Dropped (the hub stops): the Lease is no longer renewed (`stop` lets it go).
    let mut renewing = tokio::task::JoinSet::new();
    renewing.spawn(lease::run(
        lease_api,
        options.lease_name.clone(),
        ctx.identity.clone(),
        ctx.clock.clone(),
        tx,
    ));
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        tracing::info!(identity = %ctx.identity, "leading: reconciling IBGUs and ManagedClusters");
        let work = tokio::spawn(lead(ctx.clone(), options.namespaces.clone()));
        let _ = leading.wait_for(|l| !*l).await;
        tracing::warn!(identity = %ctx.identity, "no longer leading: Kubernetes writes stop");
        work.abort();
    }
}

/// Ends Kubernetes mode (`task` runs [`run`]) and lets go of the Lease when this replica
/// holds it, so another replica leads at once.
pub async fn stop(task: tokio::task::JoinHandle<()>, ctx: &Context, options: &Options) {
    task.abort();
    let _ = task.await;
    let api: Api<Lease> = Api::namespaced(ctx.lease_client.clone(), &options.lease_namespace);
    lease::release(&api, &options.lease_name, &ctx.identity).await;
}

/// The leader's work: one controller per watched namespace (or one for all), the fleet
/// sync, the Events.
async fn lead(ctx: Arc<Context>, namespaces: Vec<String>) {
    let apis: Vec<Api<ImageBasedGroupUpgrade>> = if namespaces.is_empty() {
        vec![Api::all(ctx.client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(ctx.client.clone(), ns))
            .collect()
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut stores = Vec::new();
    for api in apis {
        let controller = Controller::new(api, watcher::Config::default());
        stores.push(controller.store());
        let ctx = ctx.clone();
        tasks.spawn(async move {
            controller
                .shutdown_on_signal()
                .run(controller::reconcile, controller::error_policy, ctx)
                .for_each(|_| async {})
                .await;
        });
    }
    tasks.spawn(fleet::run(ctx.clone()));
    tasks.spawn(events::run(ctx.clone(), stores));
    while tasks.join_next().await.is_some() {}
}
