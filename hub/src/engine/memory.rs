//! The one thing the engine keeps between passes, by rollout. One rule makes it safe: every
//! entry is a hint, checked against what is stored before it is used (steps by the
//! rollout's uid and state version, reports by their identity, rows by their labels
//! version and report, push outcomes by the action their cluster is on), so a stale entry
//! costs a read or a repeated push, never a wrong decision; and all of a rollout's entries go when it stops being active. Losing it all (a
//! restart) costs the same.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::planner::drive::Seen;
use crate::planner::rollout::{PushResult, StepState};
use crate::store::{KnownRow, ReportCache};

/// What is kept of one active rollout.
#[derive(Default)]
pub struct Kept {
    /// Its steps as this hub's last pass committed them, and the state version that commit
    /// made: a pass reloads them from Postgres only when the stored version moved on.
    pub steps: Option<KeptSteps>,
    /// The running batch's reports as the last pass parsed them: a pass reads again only
    /// those whose stored report changed.
    pub reports: ReportCache,
    /// The running batch's rows as the last pass read them (labels and their version,
    /// report identity, when last seen): a pass is sent only the rows that changed since.
    pub rows: HashMap<String, KnownRow>,
    /// Outcomes of finished pushes until a pass records them (in its own transaction, with
    /// everything else it writes).
    pub results: Vec<PushResult>,
    /// Clusters with a push of this hub's on its way or its outcome not yet recorded. The
    /// stored claim (`ClusterProgress::push_in_flight`) keeps every hub from pushing to them
    /// again; this copy also stops a push of this hub's still queued when its claim lapses.
    /// The flag says a pass has a push for the cluster
    /// waiting on this one (the spoke reported the action done before its answer came): the
    /// answer then triggers a pass, however it went.
    pub in_flight: HashMap<String, bool>,
    /// Another replica's term as this one last saw it, and since when.
    pub seen: Option<Seen>,
    /// When this replica last wrote its term as the rollout's driver.
    pub renewed_at: Option<DateTime<Utc>>,
}

pub struct KeptSteps {
    pub uid: String,
    pub version: i64,
    pub steps: Vec<StepState>,
}

#[derive(Default)]
pub struct Memory(Mutex<HashMap<i64, Kept>>);

impl Memory {
    /// Runs `f` on what is kept of the rollout (created empty when there is nothing yet).
    pub fn with<T>(&self, id: i64, f: impl FnOnce(&mut Kept) -> T) -> T {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(id).or_default())
    }

    /// Forgets the rollouts that are no longer active.
    pub fn keep_only(&self, active: &[i64]) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|id, _| active.contains(id));
    }
}
