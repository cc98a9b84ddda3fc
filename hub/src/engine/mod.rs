//! The engine: for each active rollout, one pass (`pass.rs`) = hold it, load its state, run
//! the planner, store the decisions in the same transaction; then send the stage pushes
//! (`push.rs`) beside the next passes, whose first act is to record their outcomes. What a
//! pass takes from memory (`memory.rs`) only saves reading or repeating work, so running a
//! pass again (after a crash, on another hub, on a timer) is always safe.

mod memory;
mod pass;
mod push;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::planner::rollout::PushResult;
use crate::reports::ReportWriter;
use crate::store;
use memory::Memory;
use pass::Passed;
use push::SpokeClient;

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
    /// Where spoke reports are stored (in groups); it hands the reports it just stored to
    /// the next pass.
    pub reports: ReportWriter,
    spokes: SpokeClient,
    memory: Memory,
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
            memory: Memory::default(),
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
        self.memory.keep_only(&active);
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
        let results = self.memory.with(id, |k| std::mem::take(&mut k.results));
        let passed = self.pass_with(id, &results).await;
        let unrecorded: Vec<PushResult> = match &passed {
            Ok(Passed::Done { held }) => held.iter().map(|&i| results[i].clone()).collect(),
            _ => results,
        };
        if !unrecorded.is_empty() {
            // Not recorded: the next pass that holds the rollout does it.
            self.memory.with(id, |k| {
                let newer = std::mem::replace(&mut k.results, unrecorded);
                k.results.extend(newer);
            });
        }
        passed.map(|p| !matches!(p, Passed::Busy))
    }

    /// Wall time, not the engine's clock: this measures the hub itself.
    fn observe_decision_latency(&self, report_seen: chrono::DateTime<Utc>) {
        let latency = (Utc::now() - report_seen).num_microseconds().unwrap_or(0) as f64 / 1e6;
        if latency >= 0.0 {
            self.metrics.decision_latency.observe(latency);
            if latency > self.metrics.decision_latency_max.get() {
                self.metrics.decision_latency_max.set(latency);
            }
        }
    }
}
