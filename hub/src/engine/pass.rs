//! One pass over one rollout, in one transaction: hold the rollout, load what the planner
//! needs, plan, save what it decided. Then, committed: count and log what was decided, and
//! send the pushes beside the next passes (`push.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tracing::Instrument;

use super::memory::KeptSteps;
use super::{ACCEPTED_HOLD, Engine};
use crate::error::Error;
use crate::planner::drive::DriveStep;
use crate::planner::rollout::{
    self, Decision, Push, PushOutcome, PushResult, Scope, StepHead, StepState,
};
use crate::planner::state::ClusterInfo;
use crate::store::{self, Fleet, Known, KnownRow, ReportId, RolloutRow};

/// What became of a pass.
pub(super) enum Passed {
    /// Another hub holds the rollout.
    Busy,
    /// Done; `held` are the push outcomes (by index) left for a later pass.
    Done { held: Vec<usize> },
}

/// What a pass read before planning.
struct Loaded {
    row: RolloutRow,
    version: i64,
    /// The heads of the steps as stored: what is written is found by comparing with them.
    heads: Vec<StepHead>,
    from_memory: bool,
    scope: Scope,
    fleet: Fleet,
    /// The clusters the planner was given, as it handed them back.
    clusters: BTreeMap<String, ClusterInfo>,
    /// For each push outcome, which report its cluster showed before this pass.
    shown_before: Vec<Option<ReportId>>,
}

/// Whether a pass records a push outcome now: an accepted push only once its spoke has
/// reported since, or after [`ACCEPTED_HOLD`]; a refused or failed one at once.
fn record_now(r: &PushResult, reported: bool, now: DateTime<Utc>) -> bool {
    !matches!(r.outcome, PushOutcome::Accepted(_)) || reported || now - r.at >= ACCEPTED_HOLD
}

impl Engine {
    pub(super) async fn pass_with(
        self: &Arc<Self>,
        id: i64,
        results: &[PushResult],
        step: &DriveStep,
    ) -> Result<Passed, Error> {
        // Postgres keeps microseconds: so do the steps kept in memory.
        let now = chrono::SubsecRound::trunc_subsecs(self.clock.now(), 6);
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let (row, version) = match store::rollout_hold_in_txn(&mut tx, id).await? {
            store::Held::Busy => return Ok(Passed::Busy),
            store::Held::Gone => return Ok(Passed::Done { held: Vec::new() }),
            // Another replica moved first (took it, renewed its term, let it go).
            store::Held::Row(_, _, driver) if !step.expects(&driver, &self.identity) => {
                return Ok(Passed::Busy);
            }
            store::Held::Row(row, version, _) => (*row, version),
        };
        if step.writes() {
            store::rollout_drive_in_txn(&mut tx, id, &self.identity, step.starts()).await?;
        }
        if step.starts() {
            // Pushes on their way were voided above: what is kept here may be older.
            self.memory.with(id, |k| k.steps = None);
        }
        let held_at = started.elapsed();
        let (mut loaded, steps) = self.load(&mut tx, id, row, version, results, now).await?;
        let loaded_at = started.elapsed();
        let (decision, recorded, held) = self
            .plan(&mut tx, id, &mut loaded, steps, results, now)
            .await?;
        let planned_at = started.elapsed();
        let version = self.save(&mut tx, id, &loaded, &decision, now).await?;
        let saved_at = started.elapsed();
        if let DriveStep::TakeOver { from, silent } = step {
            let e = rollout::Event {
                cluster: None,
                step: None,
                action: None,
                event: "RolloutTakenOver",
                message: format!(
                    "hub replica {} took the rollout over from {}, whose term stood still for {:.1} s",
                    self.identity,
                    from.name.as_deref().unwrap_or_default(),
                    silent.num_milliseconds() as f64 / 1000.0
                ),
                took: None,
            };
            store::history_insert_in_txn(&mut tx, &loaded.row, now, &[e], "controller").await?;
        }
        tx.commit().await?;
        if step.writes() {
            self.memory.with(id, |k| k.renewed_at = Some(now));
        }
        match step {
            DriveStep::TakeOver { from, silent } => {
                self.metrics.rollout_takeovers.inc();
                tracing::warn!(from = from.name.as_deref().unwrap_or_default(), silent = ?silent, "took the rollout over from a replica that stopped renewing");
            }
            DriveStep::Claim => tracing::info!(driver = %self.identity, "driving the rollout"),
            _ => {}
        }
        tracing::debug!(from_memory = loaded.from_memory, whole_fleet = loaded.scope.whole_fleet, watched = loaded.scope.reports.len(), held = ?held_at, loaded = ?loaded_at, planned = ?planned_at, saved = ?saved_at, elapsed = ?started.elapsed(), "pass committed");
        self.metrics
            .pass_duration
            .observe(started.elapsed().as_secs_f64());
        self.after(id, loaded, decision, version, &recorded, now);
        Ok(Passed::Done { held })
    }

    /// Reads the held rollout's steps (from memory when the stored version is the one this
    /// hub's last pass wrote) and the part of the fleet the planner's [`rollout::scope`]
    /// names.
    async fn load(
        &self,
        tx: &mut PgConnection,
        id: i64,
        row: RolloutRow,
        version: i64,
        results: &[PushResult],
        now: DateTime<Utc>,
    ) -> Result<(Loaded, Vec<StepState>), Error> {
        let name = format!(
            "{}/{}",
            row.object.metadata.namespace.as_deref().unwrap_or_default(),
            row.object.metadata.name.as_deref().unwrap_or_default()
        );
        tracing::Span::current().record("rollout", name);
        let uid = row.object.metadata.uid.clone().unwrap_or_default();
        let (kept, mut known) = self.memory.with(id, |k| {
            let steps = k
                .steps
                .take()
                .filter(|c| c.uid == uid && c.version == version);
            let known = Known {
                reports: std::mem::take(&mut k.reports),
                rows: std::mem::take(&mut k.rows),
            };
            (steps, known)
        });
        let from_memory = kept.is_some();
        let steps = match kept {
            Some(c) => c.steps,
            None => store::rollout_steps_in_txn(tx, id).await?,
        };
        let scope = rollout::scope(&steps, now);
        let shown_before = results
            .iter()
            .map(|r| known.reports.get(&r.cluster).map(|(rid, _)| rid.clone()))
            .collect();
        // Reports stored since, as their handlers parsed them: newer than any kept here.
        known
            .reports
            .extend(self.reports.take_fresh(&scope.reports));
        let fleet = store::fleet_in_txn(tx, &scope.reports, scope.whole_fleet, known).await?;
        let loaded = Loaded {
            row,
            version,
            heads: steps.iter().map(|s| s.head()).collect(),
            from_memory,
            scope,
            fleet,
            clusters: BTreeMap::new(),
            shown_before,
        };
        Ok((loaded, steps))
    }

    /// Runs the planner on the loaded state and the push outcomes it may record now (an
    /// accepted push whose spoke has not reported since waits for the pass that has its
    /// report, so that the cluster's row is written once for both; an outcome for an action
    /// the cluster is no longer on changes nothing and is let go). Answers the decision,
    /// the outcomes recorded, and those held back (by index).
    async fn plan<'r>(
        &self,
        tx: &mut PgConnection,
        id: i64,
        loaded: &mut Loaded,
        steps: Vec<StepState>,
        results: &'r [PushResult],
        now: DateTime<Utc>,
    ) -> Result<(Decision, Vec<&'r PushResult>, Vec<usize>), Error> {
        let (mut recorded, mut held) = (Vec::new(), Vec::new());
        for (i, (r, before)) in results.iter().zip(&loaded.shown_before).enumerate() {
            let shown = loaded.fleet.reports.get(&r.cluster).map(|(rid, _)| rid);
            let waiting = rollout::awaits_push_result(&steps, r);
            if !waiting || record_now(r, shown != before.as_ref(), now) {
                recorded.push(r);
            } else {
                held.push(i);
            }
        }
        let spec = &loaded.row.object.spec;
        let before = rollout::Before {
            started_at: loaded.row.started_at,
            waiting: loaded.row.waiting,
        };
        // The steps as given, to check what the planner says it changed (debug builds).
        #[cfg(debug_assertions)]
        let given = steps.clone();
        let clusters = std::mem::take(&mut loaded.fleet.clusters);
        let whole = loaded.scope.whole_fleet;
        let (mut decision, mut clusters) =
            rollout::advance_keeping(spec, steps, &recorded, clusters, whole, before, now);
        if decision.needs_fleet {
            // Rare (the batch's last report ends the step): again, from the steps as stored
            // (the same as those the first attempt was given), with the whole fleet.
            let known = Known {
                reports: std::mem::take(&mut loaded.fleet.reports),
                rows: Default::default(),
            };
            let reports = &loaded.scope.reports;
            let mut fleet = store::fleet_in_txn(tx, reports, true, known).await?;
            let steps = store::rollout_steps_in_txn(tx, id).await?;
            let all = std::mem::take(&mut fleet.clusters);
            loaded.fleet = fleet;
            (decision, clusters) =
                rollout::advance_keeping(spec, steps, &recorded, all, true, before, now);
        }
        loaded.clusters = clusters;
        #[cfg(debug_assertions)]
        debug_assert!(
            decision.changes_exactly(&given),
            "the planner changed progress it did not name"
        );
        Ok((decision, recorded, held))
    }

    /// Writes what the pass decided: the changed steps and progress rows, labels, history
    /// and the rollout's status. Answers the rollout's new state version.
    async fn save(
        &self,
        tx: &mut PgConnection,
        id: i64,
        loaded: &Loaded,
        d: &Decision,
        now: DateTime<Utc>,
    ) -> Result<i64, Error> {
        let steps_changed =
            store::rollout_save_steps_in_txn(tx, id, &loaded.heads, &d.steps, &d.changed).await?;
        store::cluster_labels_change_in_txn(tx, &d.label_changes).await?;
        store::history_insert_in_txn(tx, &loaded.row, now, &d.events, "controller").await?;
        let object = &loaded.row.object;
        let before = object.status.clone().unwrap_or_default();
        let generation = object.metadata.generation.unwrap_or(1);
        let status = rollout::pass_status(generation, d, &object.spec, &before, now);
        let status_changed = status != before
            || loaded.row.phase != d.phase.as_str()
            || loaded.row.waiting != d.waiting;
        store::rollout_save_pass_in_txn(
            tx,
            id,
            loaded.version,
            steps_changed,
            status_changed.then_some(store::PassStatus {
                status: &status,
                phase: d.phase.as_str(),
                started_at: d.started_at,
                completed_at: d.completed_at,
                waiting: d.waiting,
            }),
        )
        .await
    }

    /// With the pass committed: keep its steps and reports, count and log what it decided,
    /// and send its pushes, but not to clusters with a push still on its way.
    fn after(
        self: &Arc<Self>,
        id: i64,
        mut loaded: Loaded,
        d: Decision,
        version: i64,
        recorded: &[&PushResult],
        now: DateTime<Utc>,
    ) {
        let report_times = self.decided_on_reports(&d.reported, &d.pushes, &loaded.fleet.last_seen);
        self.count_events(&d);
        let uid = loaded.row.object.metadata.uid.clone().unwrap_or_default();
        let rows = kept_rows(&mut loaded.fleet, std::mem::take(&mut loaded.clusters), &d);
        let (pushes, blocked_waits) = self.memory.with(id, |k| {
            k.reports = loaded.fleet.reports;
            k.rows = rows;
            k.steps = Some(KeptSteps {
                uid,
                version,
                steps: d.steps,
            });
            for r in recorded {
                k.in_flight.remove(&r.cluster);
            }
            // The planner held back pushes to clusters with a push still on its way (the
            // claim is stored, so every hub does); this hub's own such pushes are flagged
            // so that their answers trigger a pass. The filter below stops a push of this
            // hub's that is still queued after its claim lapsed.
            // A set: the planner names every cluster whose push is on its way (thousands
            // while a large batch runs), and each answer that came meanwhile is looked up.
            let mut blocked = HashSet::with_capacity(d.awaiting_answers.len());
            for c in d.awaiting_answers {
                if let Some(waited_on) = k.in_flight.get_mut(&c) {
                    *waited_on = true;
                }
                blocked.insert(c);
            }
            let pushes: Vec<Push> = d
                .pushes
                .into_iter()
                .filter(|p| match k.in_flight.get_mut(&p.cluster) {
                    None => {
                        k.in_flight.insert(p.cluster.clone(), false);
                        true
                    }
                    Some(waited_on) => {
                        *waited_on = true;
                        blocked.insert(p.cluster.clone());
                        false
                    }
                })
                .collect();
            // The answer a blocked push waits on may have come while this pass ran, before
            // the flag was up: then this pass wakes the next one (the answer checks the flag
            // after handing itself over, so one of the two sees the other).
            let waits = k.results.iter().any(|r| blocked.contains(&r.cluster));
            (pushes, waits)
        });
        if blocked_waits {
            self.wake.notify_one();
        }
        if pushes.is_empty() {
            return;
        }
        let engine = self.clone();
        let ibgu = loaded.row.object;
        tokio::spawn(
            async move {
                let sent = Instant::now();
                let count = pushes.len();
                engine.push_all(id, &ibgu, pushes, now, &report_times).await;
                tracing::debug!(count, elapsed = ?sent.elapsed(), "pushes sent");
            }
            .in_current_span(),
        );
    }

    fn count_events(&self, d: &Decision) {
        for e in &d.events {
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
                rollout::PushCause::OwnReport => last_seen.get(&p.cluster),
                rollout::PushCause::Reports => newest,
                rollout::PushCause::Other => None,
            };
            if let Some(&t) = seen {
                times.insert(p.cluster.clone(), t);
            }
        }
        let batch_pushed = pushes
            .iter()
            .any(|p| p.cause == rollout::PushCause::Reports);
        for c in reported {
            let own_push = pushes
                .iter()
                .any(|p| &p.cluster == c && p.cause == rollout::PushCause::OwnReport);
            if !own_push
                && !batch_pushed
                && let Some(&seen) = last_seen.get(c)
            {
                self.observe_decision_latency(seen);
            }
        }
        times
    }
}

/// The watched rows to keep for the next pass: as read, with the labels the planner handed
/// back, but for the clusters whose labels this pass changed (their stored version moved
/// on: the next pass reads them again anyway).
fn kept_rows(
    fleet: &mut Fleet,
    clusters: BTreeMap<String, ClusterInfo>,
    d: &Decision,
) -> HashMap<String, KnownRow> {
    let mut versions = std::mem::take(&mut fleet.versions);
    let mut rows = HashMap::with_capacity(versions.len());
    // By the planner's clusters (handed over whole, in order) rather than by looking each
    // up in them: a hash lookup per cluster instead of a walk down a tree of names.
    for (name, info) in clusters {
        let Some((labels_version, report)) = versions.remove(&name) else {
            continue;
        };
        if d.label_changes.contains_key(&name) {
            continue;
        }
        let row = KnownRow {
            labels_version,
            labels: info.labels,
            report,
            last_seen: fleet.last_seen.get(&name).copied(),
        };
        rows.insert(name, row);
    }
    rows
}
