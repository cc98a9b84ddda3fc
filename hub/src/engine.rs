//! The engine: for each active rollout, one pass = lock it, load its state, run the planner,
//! store the decisions in the same transaction, then push stage transitions to the spokes.
//! A pass takes no input but the stored state, so running it again (after a crash, on
//! another hub, on a timer) is always safe.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleet_types::ibgu::ImageBasedGroupUpgrade;
use fleet_types::labels::is_copied_to_spoke;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::Instrument;

use fleet_types::http::REQUEST_ID;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::planner::rollout::{self, Push};
use crate::reports::ReportWriter;
use crate::store::{self, PushOutcome, SpokeAccess};

pub use fleet_types::clock::{Clock, SystemClock};

/// Pushes to spokes in flight at once; the rest wait their turn.
const PUSH_CONCURRENCY: usize = 64;
/// A spoke that takes longer than this to answer a push counts as unreachable.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Without any trigger, look again this often (timeouts, other hubs' changes).
pub const IDLE_POLL: Duration = Duration::from_secs(1);

pub struct Engine {
    pub pool: PgPool,
    pub clock: Arc<dyn Clock>,
    pub wake: Notify,
    metrics: Metrics,
    /// Where spoke reports are stored (in groups).
    pub reports: ReportWriter,
    client: reqwest::Client,
}

impl Engine {
    pub fn new(pool: PgPool, clock: Arc<dyn Clock>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Engine {
            reports: ReportWriter::start(pool.clone()),
            pool,
            clock,
            wake: Notify::new(),
            metrics,
            client: reqwest::Client::builder()
                .timeout(PUSH_TIMEOUT)
                .build()
                .unwrap_or_default(),
        })
    }

    /// Something changed (a report, an API call): run a pass soon.
    pub fn trigger(&self) {
        self.wake.notify_one();
    }

    /// Runs passes until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        loop {
            if let Err(err) = self.pass_all().await {
                tracing::warn!(%err, "engine pass failed; retrying");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }

    /// One pass over every active rollout.
    pub async fn pass_all(&self) -> Result<(), Error> {
        for id in store::rollout_active_ids(&self.pool).await? {
            self.pass(id).await?;
        }
        Ok(())
    }

    /// One pass over one rollout. Answers `false` when another hub holds it.
    pub async fn pass(&self, id: i64) -> Result<bool, Error> {
        let span = tracing::info_span!("rollout", id, rollout = tracing::field::Empty);
        self.pass_in_span(id).instrument(span).await
    }

    async fn pass_in_span(&self, id: i64) -> Result<bool, Error> {
        let now = self.clock.now();
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await.map_err(Error::Database)?;
        if !store::rollout_try_lock_in_txn(&mut tx, id).await? {
            return Ok(false);
        }
        let Some(row) = store::rollout_fetch_for_update_in_txn(&mut tx, id).await? else {
            return Ok(true);
        };
        tracing::Span::current().record(
            "rollout",
            format!(
                "{}/{}",
                row.object.metadata.namespace.as_deref().unwrap_or_default(),
                row.object.metadata.name.as_deref().unwrap_or_default()
            ),
        );
        let steps = store::rollout_steps_in_txn(&mut tx, id).await?;
        // Only the running batch needs its clusters' IBUs (a few KiB each): loading the whole
        // fleet's on every pass would cost the most at the largest scale.
        let watched: Vec<String> = steps
            .last()
            .filter(|s| s.completed_at.is_none())
            .map(|s| s.batch_members(s.current_batch))
            .unwrap_or_default();
        let (fleet, last_seen) = store::fleet_in_txn(&mut tx, &watched).await?;
        let spec = &row.object.spec;
        let decision = rollout::advance(spec, &steps, &fleet, row.started_at, now);
        store::rollout_save_steps_in_txn(&mut tx, id, &steps, &decision.steps).await?;
        store::cluster_labels_set_in_txn(&mut tx, &decision.labels).await?;
        store::history_insert_in_txn(&mut tx, &row, now, &decision.events).await?;
        let generation = row.object.metadata.generation.unwrap_or(1);
        let old_status = row.object.status.clone().unwrap_or_default();
        let mut status = rollout::status(
            generation,
            &decision.steps,
            spec.plan.len(),
            decision.started_at,
            decision.completed_at,
            now,
        );
        // Condition times move only when the condition changes.
        for c in &mut status.conditions {
            if let Some(old) = old_status.conditions.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
                && old.reason == c.reason
                && old.message == c.message
            {
                c.last_transition_time = old.last_transition_time;
            }
        }
        if status != old_status || row.phase != decision.phase.as_str() {
            store::rollout_save_status_in_txn(
                &mut tx,
                id,
                &status,
                decision.phase.as_str(),
                decision.started_at,
                decision.completed_at,
            )
            .await?;
        }
        tx.commit().await.map_err(Error::Database)?;
        self.metrics
            .pass_duration
            .observe(started.elapsed().as_secs_f64());
        for e in &decision.events {
            self.metrics.events.with_label_values(&[e.event]).inc();
            if let (Some(action), Some(took)) = (e.action, e.took) {
                let result = match e.event {
                    "ActionCompleted" => "completed",
                    "ActionTimedOut" => "timed_out",
                    _ => "failed",
                };
                self.metrics
                    .action_duration
                    .with_label_values(&[action.as_str(), result])
                    .observe(took);
            }
            tracing::info!(step = ?e.step, cluster = ?e.cluster, action = ?e.action, event = e.event, "{}", e.message);
        }
        if !decision.pushes.is_empty() {
            let pushed = std::time::Instant::now();
            let count = decision.pushes.len();
            self.push_all(&row.object, id, decision.pushes, now, &last_seen)
                .await?;
            tracing::debug!(count, elapsed = ?pushed.elapsed(), pass = ?started.elapsed(), "pushes sent");
            // What the pushes changed is for the next pass.
            self.trigger();
        }
        Ok(true)
    }

    async fn push_all(
        &self,
        ibgu: &ImageBasedGroupUpgrade,
        id: i64,
        pushes: Vec<Push>,
        now: DateTime<Utc>,
        last_seen: &HashMap<String, DateTime<Utc>>,
    ) -> Result<(), Error> {
        let names: Vec<String> = pushes.iter().map(|p| p.cluster.clone()).collect();
        let access = store::cluster_access(&self.pool, &names).await?;
        let configmaps = self.configmaps(ibgu).await?;
        let body = Arc::new(patch_body(ibgu));
        let mut set = JoinSet::new();
        let mut results = Vec::new();
        for push in pushes {
            if set.len() >= PUSH_CONCURRENCY
                && let Some(r) = set.join_next().await
            {
                results.extend(r.ok());
            }
            let Some(SpokeAccess {
                endpoint,
                credential,
            }) = access.get(&push.cluster).map(|a| SpokeAccess {
                endpoint: a.endpoint.clone(),
                credential: a.credential.clone(),
            })
            else {
                results.push((
                    push.clone(),
                    PushOutcome::Unreachable("cluster not registered".into()),
                ));
                continue;
            };
            let client = self.client.clone();
            let body = body.clone();
            let configmaps = configmaps.clone();
            // One id per push, sent as X-Request-Id: the spoke's log lines of the request
            // carry it too.
            let request_id = uuid::Uuid::new_v4().to_string();
            let span = tracing::info_span!(
                "push",
                cluster = %push.cluster,
                step = push.step,
                action = %push.action,
                stage = %push.stage,
                request_id = %request_id,
            );
            set.spawn(
                async move {
                    let outcome = push_one(
                        &client,
                        &endpoint,
                        &credential,
                        &request_id,
                        &push,
                        &body,
                        &configmaps,
                    )
                    .await;
                    match &outcome {
                        PushOutcome::Accepted(_) => tracing::info!("stage pushed"),
                        PushOutcome::Refused(why) => {
                            tracing::warn!(%why, "the spoke refused the stage")
                        }
                        PushOutcome::Unreachable(why) => {
                            tracing::debug!(%why, "push failed; will retry with backoff")
                        }
                    }
                    (push, outcome)
                }
                .instrument(span),
            );
        }
        while let Some(r) = set.join_next().await {
            results.extend(r.ok());
        }
        let mut rows = Vec::with_capacity(results.len());
        for (push, outcome) in results {
            let result = match &outcome {
                PushOutcome::Accepted(_) => "accepted",
                PushOutcome::Refused(_) => "refused",
                PushOutcome::Unreachable(_) => "unreachable",
            };
            self.metrics.pushes.with_label_values(&[result]).inc();
            if push.follows_report
                && let Some(seen) = last_seen.get(&push.cluster)
            {
                // Wall time, not the engine's clock: this measures the hub itself.
                let latency = (Utc::now() - *seen).num_microseconds().unwrap_or(0) as f64 / 1e6;
                if latency >= 0.0 {
                    self.metrics.decision_latency.observe(latency);
                    if latency > self.metrics.decision_latency_max.get() {
                        self.metrics.decision_latency_max.set(latency);
                    }
                }
            }
            rows.push((push.step, push.action_index, push.cluster, outcome));
        }
        store::push_results(&self.pool, id, &rows, now).await?;
        Ok(())
    }

    async fn configmaps(
        &self,
        ibgu: &ImageBasedGroupUpgrade,
    ) -> Result<Vec<(String, String, BTreeMap<String, String>)>, Error> {
        let mut out = Vec::new();
        let spec = &ibgu.spec.ibu_spec;
        for r in spec.oadp_content.iter().chain(&spec.extra_manifests) {
            if let Some(data) = store::configmap_fetch(&self.pool, &r.namespace, &r.name).await? {
                out.push((r.namespace.clone(), r.name.clone(), data));
            }
        }
        Ok(out)
    }
}

/// The merge patch of the spoke's IBU: the IBGU's ibuSpec fields, its `lca.openshift.io`
/// annotations; the stage is added per push.
fn patch_body(ibgu: &ImageBasedGroupUpgrade) -> serde_json::Value {
    let mut spec = serde_json::to_value(&ibgu.spec.ibu_spec).unwrap_or_default();
    if let Some(o) = spec.as_object_mut() {
        o.remove("stage");
    }
    let annotations: BTreeMap<String, String> = ibgu
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| is_copied_to_spoke(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut body = serde_json::json!({ "spec": spec });
    if !annotations.is_empty() {
        body["metadata"] = serde_json::json!({ "annotations": annotations });
    }
    body
}

async fn push_one(
    client: &reqwest::Client,
    endpoint: &str,
    credential: &str,
    request_id: &str,
    push: &Push,
    body: &serde_json::Value,
    configmaps: &[(String, String, BTreeMap<String, String>)],
) -> PushOutcome {
    let base = endpoint.trim_end_matches('/');
    if push.action == fleet_types::Action::Prep {
        for (ns, name, data) in configmaps {
            let cm = serde_json::json!({"metadata": {"name": name, "namespace": ns}, "data": data});
            let res = client
                .put(format!("{base}/v1/configmaps/{ns}/{name}"))
                .bearer_auth(credential)
                .header(REQUEST_ID, request_id)
                .json(&cm)
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    return PushOutcome::Unreachable(format!(
                        "configmap {ns}/{name}: {}",
                        r.status()
                    ));
                }
                Err(e) => return PushOutcome::Unreachable(e.to_string()),
            }
        }
    }
    let mut body = body.clone();
    body["spec"]["stage"] = serde_json::Value::String(push.stage.as_str().to_string());
    let res = client
        .patch(format!("{base}/v1/ibu"))
        .bearer_auth(credential)
        .header(REQUEST_ID, request_id)
        .header("Content-Type", "application/merge-patch+json")
        .body(body.to_string())
        .send()
        .await;
    match res {
        Ok(r) if r.status().is_success() => PushOutcome::Accepted(push.stage),
        Ok(r) if r.status().as_u16() == 422 => {
            let status: Option<fleet_types::Status> = r.json().await.ok();
            PushOutcome::Refused(
                status
                    .map(|s| s.message)
                    .unwrap_or_else(|| "refused by the spoke".into()),
            )
        }
        Ok(r) => PushOutcome::Unreachable(format!("spoke answered {}", r.status())),
        Err(e) => PushOutcome::Unreachable(e.to_string()),
    }
}
