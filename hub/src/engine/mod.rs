//! The engine: for each active rollout, one pass = lock it, load its state, run the planner,
//! store the decisions in the same transaction, then send the stage pushes beside the next
//! passes; the pass after them records their outcomes. What a pass reads beyond the stored
//! state (its own steps of the last pass, checked against the stored version; push outcomes
//! not yet recorded) only saves reading or repeating work, so running a pass again (after a
//! crash, on another hub, on a timer) is always safe.
//!
//! How a push travels to a spoke is `push.rs` (the [`push::SpokeClient`]).

mod push;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use fleet_types::ibgu::ImageBasedGroupUpgrade;
use fleet_types::ibu::Stage;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::planner::rollout::{self, Push, PushCause, PushOutcome, PushResult, StepState};
use crate::reports::ReportWriter;
use crate::store::{self, SpokeAccess};
use push::{SpokeClient, Target, join_pushes, patch_body, stage_body};

pub use fleet_types::clock::{Clock, SystemClock};

/// Without any trigger, look again this often (timeouts, other hubs' changes).
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// An accepted push waits this long at most for the pass that records it with the spoke's
/// next report, so that the cluster's progress row is written once for both.
pub const ACCEPTED_HOLD: chrono::Duration = chrono::Duration::seconds(1);

pub struct Engine {
    pub pool: PgPool,
    pub clock: Arc<dyn Clock>,
    pub wake: Notify,
    metrics: Metrics,
    /// Where spoke reports are stored (in groups).
    pub reports: ReportWriter,
    spokes: SpokeClient,
    /// Clusters (by rollout) with a push on its way or its outcome not yet recorded: a pass
    /// that runs meanwhile does not push to them again. Pushes run beside the passes, not
    /// inside them, so a report that arrives while a round of pushes is still going out is
    /// acted on at once. The flag says a pass has a push for the cluster waiting on this
    /// one (the spoke reported the action done before its answer came): the answer then
    /// triggers a pass, however it went.
    in_flight: Mutex<HashMap<(i64, String), bool>>,
    /// Outcomes of finished pushes, by rollout, until a pass records them (in its own
    /// transaction, with everything else it writes). Lost in a crash, they cost nothing but
    /// a push made again.
    results: Mutex<HashMap<i64, Vec<PushResult>>>,
    /// The steps of each rollout as this hub's last pass left them, with the state version
    /// they belong to: a pass reloads them from Postgres only when the version moved on.
    steps: Mutex<HashMap<i64, CachedSteps>>,
    /// The running batch's reports as this hub's last pass of each rollout parsed them: a
    /// pass reads again only the ones whose row changed.
    parsed: Mutex<HashMap<i64, store::ReportCache>>,
}

/// What became of a pass.
enum Passed {
    /// Another hub holds the rollout.
    Busy,
    /// Done; `held` are the push outcomes (by index) left for a later pass.
    Done { held: Vec<usize> },
}

/// Whether a pass records a push outcome now: an accepted push only once its spoke has
/// reported since, or after [`ACCEPTED_HOLD`]; a refused or failed one at once.
fn record_now(r: &PushResult, reported: bool, now: DateTime<Utc>) -> bool {
    !matches!(r.outcome, PushOutcome::Accepted(_)) || reported || now - r.at >= ACCEPTED_HOLD
}

struct CachedSteps {
    uid: String,
    version: i64,
    steps: Vec<StepState>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    pub fn new(pool: PgPool, clock: Arc<dyn Clock>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Engine {
            reports: ReportWriter::start(pool.clone()),
            pool,
            clock,
            wake: Notify::new(),
            metrics,
            spokes: SpokeClient::new(),
            in_flight: Mutex::new(HashMap::new()),
            results: Mutex::new(HashMap::new()),
            steps: Mutex::new(HashMap::new()),
            parsed: Mutex::new(HashMap::new()),
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
    pub async fn pass_all(self: &Arc<Self>) -> Result<(), Error> {
        let active = store::rollout_active_ids(&self.pool).await?;
        // What is kept for rollouts that ended or went away is no longer needed.
        locked(&self.results).retain(|id, _| active.contains(id));
        locked(&self.steps).retain(|id, _| active.contains(id));
        locked(&self.parsed).retain(|id, _| active.contains(id));
        locked(&self.in_flight).retain(|(id, _), _| active.contains(id));
        for id in active {
            self.pass(id).await?;
        }
        Ok(())
    }

    /// One pass over one rollout. Answers `false` when another hub holds it.
    pub async fn pass(self: &Arc<Self>, id: i64) -> Result<bool, Error> {
        let span = tracing::info_span!("rollout", id, rollout = tracing::field::Empty);
        self.pass_in_span(id).instrument(span).await
    }

    async fn pass_in_span(self: &Arc<Self>, id: i64) -> Result<bool, Error> {
        let results = locked(&self.results).remove(&id).unwrap_or_default();
        let passed = self.pass_with(id, &results).await;
        let unrecorded: Vec<PushResult> = match &passed {
            Ok(Passed::Done { held }) => held.iter().map(|&i| results[i].clone()).collect(),
            _ => results,
        };
        if !unrecorded.is_empty() {
            // Not recorded: the next pass that holds the rollout does it.
            let mut pending = locked(&self.results);
            let list = pending.entry(id).or_default();
            let newer = std::mem::replace(list, unrecorded);
            list.extend(newer);
        }
        passed.map(|p| !matches!(p, Passed::Busy))
    }

    async fn pass_with(self: &Arc<Self>, id: i64, results: &[PushResult]) -> Result<Passed, Error> {
        // Postgres keeps microseconds: so do the steps kept in memory.
        let now = chrono::SubsecRound::trunc_subsecs(self.clock.now(), 6);
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let (row, version) = match store::rollout_hold_in_txn(&mut tx, id).await? {
            store::Held::Busy => return Ok(Passed::Busy),
            store::Held::Gone => return Ok(Passed::Done { held: Vec::new() }),
            store::Held::Row(row, version) => (*row, version),
        };
        tracing::Span::current().record(
            "rollout",
            format!(
                "{}/{}",
                row.object.metadata.namespace.as_deref().unwrap_or_default(),
                row.object.metadata.name.as_deref().unwrap_or_default()
            ),
        );
        let uid = row.object.metadata.uid.clone().unwrap_or_default();
        let cached = locked(&self.steps)
            .remove(&id)
            .filter(|c| c.uid == uid && c.version == version);
        let from_memory = cached.is_some();
        let mut steps = match cached {
            Some(c) => c.steps,
            None => store::rollout_steps_in_txn(&mut tx, id).await?,
        };
        // What is written is found from the step heads as stored and the progress entries the
        // steps' journals (cleared here) say changed: the steps are not copied.
        let heads: Vec<_> = steps.iter().map(|s| s.head()).collect();
        #[cfg(debug_assertions)]
        let stored = steps.clone();
        steps.iter_mut().for_each(|s| s.clear_journal());
        let t_steps = started.elapsed();
        // Only the running batch's clusters still at work need their IBUs (a few KiB each)
        // and labels: loading the whole fleet's on every pass would cost the most at the
        // largest scale, and those that finished the step are not driven again.
        let running = steps.last().filter(|s| s.completed_at.is_none());
        let watched: Vec<String> = running.map(|s| s.batch_at_work()).unwrap_or_default();
        // A pass of a running batch needs only its clusters; one that starts a plan step (or
        // sets labels beyond the batch, as a step timeout does) needs the whole fleet, and
        // the planner says so.
        let spec = &row.object.spec;
        let mut known = locked(&self.parsed).remove(&id).unwrap_or_default();
        // Which report each cluster with a push outcome showed before this pass.
        let shown_before: Vec<Option<store::ReportId>> = results
            .iter()
            .map(|r| known.get(&r.cluster).map(|(rid, _)| rid.clone()))
            .collect();
        // Reports stored since, as their handlers parsed them: newer than any kept here.
        known.extend(self.reports.take_fresh(&watched));
        let mut all = running.is_none();
        let store::Fleet {
            clusters,
            mut last_seen,
            mut reports,
        } = store::fleet_in_txn(&mut tx, &watched, all, &known).await?;
        let t_read = started.elapsed();
        // The planner's input: the steps with the push outcomes since the last pass, but for
        // accepted pushes whose spoke has not reported since: the pass that has its report
        // records both (held ones stay in flight, so nothing is pushed to them meanwhile). An
        // outcome for an action the cluster is no longer on changes nothing: it is let go.
        let (mut recorded, mut held) = (Vec::new(), Vec::new());
        for (i, (r, before)) in results.iter().zip(&shown_before).enumerate() {
            let reported = reports.get(&r.cluster).map(|(rid, _)| rid) != before.as_ref();
            let waiting = rollout::awaits_push_result(&steps, r);
            if !waiting || record_now(r, reported, now) {
                recorded.push(r);
            } else {
                held.push(i);
            }
        }
        rollout::apply_push_results(&mut steps, recorded.iter().copied());
        let mut decision = rollout::advance_with(spec, steps, clusters, all, row.started_at, now);
        if decision.needs_fleet {
            // Rare (a plan step to select for, a step timeout): the steps as stored again,
            // the same as those the first attempt changed.
            all = true;
            let whole = store::fleet_in_txn(&mut tx, &watched, all, &reports).await?;
            (last_seen, reports) = (whole.last_seen, whole.reports);
            let mut steps = store::rollout_steps_in_txn(&mut tx, id).await?;
            rollout::apply_push_results(&mut steps, recorded.iter().copied());
            decision = rollout::advance_with(spec, steps, whole.clusters, all, row.started_at, now);
        }
        #[cfg(debug_assertions)]
        for s in &decision.steps {
            if let Some(old) = stored.get(s.step) {
                debug_assert!(s.journal_matches(old), "journal of step {}", s.step);
            }
        }
        let t_fleet = started.elapsed();
        let steps_changed =
            store::rollout_save_steps_in_txn(&mut tx, id, &heads, &decision.steps).await?;
        let t_progress = started.elapsed();
        store::cluster_labels_change_in_txn(&mut tx, &decision.label_changes).await?;
        let t_labels = started.elapsed();
        store::history_insert_in_txn(&mut tx, &row, now, &decision.events).await?;
        let t_write = started.elapsed();
        let generation = row.object.metadata.generation.unwrap_or(1);
        let old_status = row.object.status.clone().unwrap_or_default();
        let mut status = rollout::status_without_clusters(
            generation,
            &decision.steps,
            spec.plan.len(),
            decision.started_at,
            decision.completed_at,
            now,
        );
        rollout::keep_transition_times(&mut status, &old_status);
        let status_changed = status != old_status || row.phase != decision.phase.as_str();
        let version = store::rollout_save_pass_in_txn(
            &mut tx,
            id,
            version,
            steps_changed,
            status_changed.then_some(store::PassStatus {
                status: &status,
                phase: decision.phase.as_str(),
                started_at: decision.started_at,
                completed_at: decision.completed_at,
            }),
        )
        .await?;
        let t_status = started.elapsed();
        tx.commit().await?;
        locked(&self.parsed).insert(id, reports);
        locked(&self.steps).insert(
            id,
            CachedSteps {
                uid,
                version,
                steps: decision.steps,
            },
        );
        tracing::debug!(from_memory, all, ?t_steps, ?t_read, ?t_fleet, ?t_progress, ?t_labels, ?t_write, ?t_status, commit = ?started.elapsed(), "pass timings");
        let report_times =
            self.decided_on_reports(&decision.reported, &decision.pushes, &last_seen);
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
        let mut blocked = Vec::new();
        let pushes: Vec<Push> = {
            let mut in_flight = locked(&self.in_flight);
            for r in &recorded {
                in_flight.remove(&(id, r.cluster.clone()));
            }
            decision
                .pushes
                .into_iter()
                .filter(|p| match in_flight.entry((id, p.cluster.clone())) {
                    Entry::Vacant(e) => {
                        e.insert(false);
                        true
                    }
                    Entry::Occupied(mut e) => {
                        *e.get_mut() = true;
                        blocked.push(p.cluster.clone());
                        false
                    }
                })
                .collect()
        };
        // The answer a blocked push waits on may have come while this pass ran, before the
        // flag was up: then this pass wakes the next one (the answer checks the flag after
        // handing itself over, so one of the two sees the other).
        if !blocked.is_empty()
            && locked(&self.results)
                .get(&id)
                .is_some_and(|waiting| waiting.iter().any(|r| blocked.contains(&r.cluster)))
        {
            self.trigger();
        }
        if !pushes.is_empty() {
            let engine = self.clone();
            let ibgu = row.object;
            tokio::spawn(
                async move {
                    let sent = std::time::Instant::now();
                    let count = pushes.len();
                    engine.push_all(id, &ibgu, pushes, now, &report_times).await;
                    tracing::debug!(count, elapsed = ?sent.elapsed(), "pushes sent");
                }
                .in_current_span(),
            );
        }
        Ok(Passed::Done { held })
    }

    /// The decision latency of a pass's decisions made on reports (`Decision::reported`):
    /// a decision that pushes is measured when its push is sent (the time of the report
    /// that caused it is answered, by cluster pushed to); one that pushes nothing (the
    /// cluster finished, or failed, and its batch waits for others) is measured now, with
    /// the pass committed.
    fn decided_on_reports(
        &self,
        reported: &[String],
        pushes: &[Push],
        last_seen: &HashMap<String, DateTime<Utc>>,
    ) -> HashMap<String, DateTime<Utc>> {
        let newest = reported.iter().filter_map(|c| last_seen.get(c)).max();
        let mut times = HashMap::new();
        for p in pushes {
            let seen = match p.cause {
                PushCause::OwnReport => last_seen.get(&p.cluster),
                PushCause::Reports => newest,
                PushCause::Other => None,
            };
            if let Some(&t) = seen {
                times.insert(p.cluster.clone(), t);
            }
        }
        let batch_pushed = pushes.iter().any(|p| p.cause == PushCause::Reports);
        for c in reported {
            let own_push = pushes
                .iter()
                .any(|p| &p.cluster == c && p.cause == PushCause::OwnReport);
            if !own_push
                && !batch_pushed
                && let Some(&seen) = last_seen.get(c)
            {
                self.observe_decision_latency(seen);
            }
        }
        times
    }

    /// Wall time, not the engine's clock: this measures the hub itself.
    fn observe_decision_latency(&self, report_seen: DateTime<Utc>) {
        let latency = (Utc::now() - report_seen).num_microseconds().unwrap_or(0) as f64 / 1e6;
        if latency >= 0.0 {
            self.metrics.decision_latency.observe(latency);
            if latency > self.metrics.decision_latency_max.get() {
                self.metrics.decision_latency_max.set(latency);
            }
        }
    }

    /// Sends a round of pushes. Each outcome goes to the next pass as soon as it is known:
    /// a cluster whose push was answered early moves on without waiting for the round's
    /// slowest spoke. `report_times` holds, by cluster, the report a push was decided on.
    async fn push_all(
        &self,
        id: i64,
        ibgu: &ImageBasedGroupUpgrade,
        pushes: Vec<Push>,
        now: DateTime<Utc>,
        report_times: &HashMap<String, DateTime<Utc>>,
    ) {
        let names: Vec<String> = pushes.iter().map(|p| p.cluster.clone()).collect();
        let prepared = async {
            Ok::<_, Error>((
                store::cluster_access(&self.pool, &names).await?,
                self.configmaps(ibgu).await?,
            ))
        };
        let (access, configmaps) = match prepared.await {
            Ok(p) => p,
            Err(err) => {
                let why = format!("reading what to push: {err}");
                for p in pushes {
                    self.record_push(
                        id,
                        p,
                        PushOutcome::Unreachable(why.clone()),
                        now,
                        report_times,
                    );
                }
                return;
            }
        };
        let patch = patch_body(ibgu);
        // The body of each stage of the round, written once and shared by its pushes.
        let mut bodies: HashMap<Stage, Bytes> = HashMap::new();
        let configmaps = Arc::new(configmaps);
        let mut set = JoinSet::new();
        let mut sent = HashMap::new();
        for push in pushes {
            let Some(SpokeAccess {
                endpoint,
                credential,
            }) = access.get(&push.cluster).map(|a| SpokeAccess {
                endpoint: a.endpoint.clone(),
                credential: a.credential.clone(),
            })
            else {
                let outcome = PushOutcome::Unreachable("cluster not registered".into());
                self.record_push(id, push, outcome, now, report_times);
                continue;
            };
            let ibu_url = match self.spokes.ibu_url(&push.cluster, &endpoint) {
                Ok(url) => url,
                Err(why) => {
                    self.record_push(id, push, PushOutcome::Unreachable(why), now, report_times);
                    continue;
                }
            };
            let body = bodies
                .entry(push.stage)
                .or_insert_with(|| stage_body(&patch, push.stage))
                .clone();
            let spokes = self.spokes.clone();
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
            let task = push.clone();
            let handle = set.spawn(
                async move {
                    let target = Target {
                        endpoint: &endpoint,
                        ibu_url,
                        credential: &credential,
                        request_id: &request_id,
                    };
                    let outcome = spokes.send(target, &push, body, &configmaps).await;
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
            sent.insert(handle.id(), task);
        }
        join_pushes(set, sent, |push, outcome| {
            self.record_push(id, push, outcome, now, report_times)
        })
        .await;
    }

    /// Counts a push's outcome and hands it to the next pass.
    fn record_push(
        &self,
        id: i64,
        push: Push,
        outcome: PushOutcome,
        now: DateTime<Utc>,
        report_times: &HashMap<String, DateTime<Utc>>,
    ) {
        let result = match &outcome {
            PushOutcome::Accepted(_) => "accepted",
            PushOutcome::Refused(_) => "refused",
            PushOutcome::Unreachable(_) => "unreachable",
        };
        self.metrics.pushes.with_label_values(&[result]).inc();
        let accepted = matches!(outcome, PushOutcome::Accepted(_));
        if let Some(&seen) = report_times.get(&push.cluster) {
            self.observe_decision_latency(seen);
        }
        let key = (id, push.cluster.clone());
        locked(&self.results)
            .entry(id)
            .or_default()
            .push(PushResult {
                step: push.step,
                action_index: push.action_index,
                cluster: push.cluster,
                outcome,
                at: now,
            });
        let awaited = locked(&self.in_flight).get(&key).copied().unwrap_or(false);
        // An accepted push waits for the spoke's report (which triggers a pass of its own) or
        // for the idle pass, unless a push is waiting on it; any other outcome is acted on
        // at once.
        if !accepted || awaited {
            self.trigger();
        }
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
