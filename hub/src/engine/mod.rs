//! The engine: for each active rollout, one pass (`pass.rs`) = hold it, load its state, run
//! the planner, store the decisions in the same transaction; then send the stage pushes
//! (`push.rs`) beside the next passes, whose first act is to record their outcomes. What a
//! pass takes from memory (`memory.rs`) only saves reading or repeating work, so running a
//! pass again (after a crash, on another hub, on a timer) is always safe.
//!
//! Hub replicas on one database share the rollouts: each is driven by one replica at a time
//! (`planner::drive`), which takes it over in seconds when that replica dies. A change that
//! comes in at another replica (a report, an API call) wakes the driver through Postgres
//! (`LISTEN`/`NOTIFY`) rather than on its next idle look.

mod memory;
mod pass;
mod push;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::planner::drive::{self, DriveStep};
use crate::planner::rollout::PushResult;
use crate::registrations::Registrations;
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
/// The Postgres channel on which replicas wake each other.
const WAKE_CHANNEL: &str = "fleet_hub_wake";
/// Between two wakes sent to the other replicas, at least this long (they coalesce).
const PEER_WAKE_SPACING: Duration = Duration::from_millis(5);

pub struct Engine {
    pub pool: PgPool,
    pub clock: Arc<dyn Clock>,
    pub wake: Notify,
    metrics: Metrics,
    /// Where spoke reports are stored (in groups); it hands the reports it just stored to
    /// the next pass.
    pub reports: ReportWriter,
    /// Where registrations are written (in groups, each with its audit entry).
    pub registrations: Registrations,
    spokes: SpokeClient,
    memory: Memory,
    /// This replica's name as a rollout's driver: the host (the pod's name in Kubernetes)
    /// and a token of this process, so a restarted hub is a new driver.
    identity: String,
    /// Whether the last pass over all rollouts saw one that another replica drives: then
    /// changes that come in here are passed on to the other replicas.
    others_drive: AtomicBool,
    peer_wake: Notify,
}

/// This replica's name: the pod's in Kubernetes, else the host's (the Lease's holder, and
/// the first part of the engine's identity).
pub fn replica_name() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "fleet-hub".into())
}

/// The replica's name and a token of this process.
fn replica_identity() -> String {
    let token = uuid::Uuid::new_v4().simple().to_string();
    format!("{}/{}", replica_name(), &token[..8])
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    pub fn new(pool: PgPool, clock: Arc<dyn Clock>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Engine {
            reports: ReportWriter::start(pool.clone()),
            registrations: Registrations::start(pool.clone()),
            pool,
            clock,
            wake: Notify::new(),
            metrics,
            spokes: SpokeClient::new(),
            memory: Memory::default(),
            identity: replica_identity(),
            others_drive: AtomicBool::new(false),
            peer_wake: Notify::new(),
        })
    }

    /// This replica's name as a driver of rollouts.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Something changed (a report, an API call): run a pass soon, here and, when another
    /// replica drives a rollout, there.
    pub fn trigger(&self) {
        self.wake.notify_one();
        if self.others_drive.load(Ordering::Relaxed) {
            self.peer_wake.notify_one();
        }
    }

    /// Starts the wakes to and from the other replicas; they stop when the answer is dropped.
    #[must_use]
    pub fn talk_to_peers(self: &Arc<Self>) -> tokio::task::JoinSet<()> {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().listen_to_peers());
        tasks.spawn(self.clone().wake_peers());
        tasks
    }

    /// Runs passes until the task is dropped, with the wakes to and from other replicas.
    pub async fn run(self: Arc<Self>) {
        let _peers = self.talk_to_peers();
        loop {
            if let Err(err) = self.pass_all().await {
                tracing::warn!(%err, "engine pass failed; retrying");
            }
            // Following another replica's rollouts: look often enough to see its last term.
            let idle = if self.others_drive.load(Ordering::Relaxed) {
                drive::FOLLOW_POLL
            } else {
                IDLE_POLL
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// Wakes this engine when another replica says something changed.
    async fn listen_to_peers(self: Arc<Self>) {
        loop {
            let Err(err) = self.listen_once().await;
            if self.pool.is_closed() {
                // The hub is stopping.
                return;
            }
            tracing::warn!(%err, "listening to the other replicas failed; trying again");
            tokio::time::sleep(IDLE_POLL).await;
        }
    }

    async fn listen_once(&self) -> Result<std::convert::Infallible, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(WAKE_CHANNEL).await?;
        loop {
            let n = listener.recv().await?;
            if n.payload() != self.identity {
                self.wake.notify_one();
            }
        }
    }

    /// Tells the other replicas that something changed here, coalescing what comes together.
    async fn wake_peers(self: Arc<Self>) {
        loop {
            self.peer_wake.notified().await;
            self.notify_peers().await;
            tokio::time::sleep(PEER_WAKE_SPACING).await;
        }
    }

    /// One wake to every replica listening (this one ignores its own).
    async fn notify_peers(&self) {
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(WAKE_CHANNEL)
            .bind(&self.identity)
            .execute(&self.pool)
            .await;
        if let Err(err) = sent {
            tracing::debug!(%err, "waking the other replicas failed");
        }
    }

    /// Lets go of the rollouts this replica drives (it is stopping): another replica takes
    /// them at its next look rather than after the lease.
    pub async fn release(&self) {
        match store::rollout_release_all(&self.pool, &self.identity).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(rollouts = n, "let go of the rollouts this replica drove");
                self.notify_peers().await;
            }
            Err(err) => tracing::warn!(%err, "letting go of the rollouts failed"),
        }
    }

    /// One pass over every active rollout this replica drives or may take.
    pub async fn pass_all(self: &Arc<Self>) -> Result<(), Error> {
        let active = store::rollout_active(&self.pool).await?;
        let ids: Vec<i64> = active.iter().map(|(id, _)| *id).collect();
        self.memory.keep_only(&ids);
        let now = self.clock.now();
        let (mut driven, mut others) = (0, false);
        for (id, driver) in active {
            let step = self.memory.with(id, |k| {
                drive::drive_step(&driver, &self.identity, &mut k.seen, k.renewed_at, now)
            });
            if matches!(step, DriveStep::Follow { .. }) {
                others = true;
                continue;
            }
            if self.pass(id, step).await? {
                driven += 1;
            } else {
                others = true;
            }
        }
        self.others_drive.store(others, Ordering::Relaxed);
        self.metrics.rollouts_driven.set(driven);
        Ok(())
    }

    /// One pass over one rollout, as `step` says this replica may. Answers `false` when
    /// another replica holds it.
    async fn pass(self: &Arc<Self>, id: i64, step: DriveStep) -> Result<bool, Error> {
        let span = tracing::info_span!("rollout", id, rollout = tracing::field::Empty);
        self.pass_in_span(id, step).instrument(span).await
    }

    async fn pass_in_span(self: &Arc<Self>, id: i64, step: DriveStep) -> Result<bool, Error> {
        let results = self.memory.with(id, |k| std::mem::take(&mut k.results));
        let passed = self.pass_with(id, &results, &step).await;
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
