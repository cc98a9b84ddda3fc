//! Spoke reports are stored in groups (see [`crate::grouped`]): one statement and one commit
//! per group, each sender answered once it is durable. The same statement checks each
//! report's credential against the cluster's, so a report costs no query of its own.

use std::sync::{Arc, Mutex};

use fleet_types::ibu::ImageBasedUpgrade;
use sqlx::PgPool;

use crate::error::Error;
use crate::grouped::{Grouped, WriteGroup, each};
use crate::store::{Incoming, ReportCache, ReportId, Stored, report_write_group};

/// Most reports stored by one statement.
const MAX_GROUP: usize = 1000;
/// Reports waiting for the writer before senders are slowed down.
const QUEUE: usize = 10_000;
/// Most stored reports kept for the engine between its passes, a few KiB each: the running
/// batches' reports fit; reports of clusters no pass is watching (after a registration
/// storm, say) do not pile up. Beyond it they are all dropped, and read from Postgres.
const FRESH_KEPT: usize = 4096;

/// A report to store, and the same as its handler parsed it.
struct Pending {
    report: Incoming,
    parsed: Arc<ImageBasedUpgrade>,
}

#[derive(Clone)]
pub struct ReportWriter {
    writer: Grouped<Groups>,
    /// Reports just stored, as their handlers parsed them: the engine's next pass takes them
    /// instead of reading and parsing the same JSON back from Postgres. Only a saving: a row
    /// that holds another report by then is read as before.
    fresh: Arc<Mutex<ReportCache>>,
}

impl ReportWriter {
    pub fn start(pool: PgPool) -> Self {
        let fresh = Arc::new(Mutex::new(ReportCache::new()));
        let groups = Groups {
            pool,
            fresh: fresh.clone(),
        };
        let writer = Grouped::start(groups, MAX_GROUP, QUEUE, "the report writer");
        ReportWriter { writer, fresh }
    }

    /// Takes the just stored reports of these clusters, kept for the engine.
    pub fn take_fresh(&self, clusters: &[String]) -> ReportCache {
        let mut kept = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
        clusters
            .iter()
            .filter_map(|c| kept.remove_entry(c))
            .collect()
    }

    /// Stores the report when `credential` is the cluster's, unless it is older than, or the
    /// same as, the last one of this agent; answers what became of it once that is durable.
    /// `ibu` is the report's IBU as parsed, `text` the same as the spoke wrote it: the text
    /// is stored, not the parsed IBU written out again.
    pub async fn store(
        &self,
        cluster: &str,
        credential: &str,
        agent_id: &str,
        sequence: u64,
        ibu: ImageBasedUpgrade,
        text: String,
    ) -> Result<Stored, Error> {
        let pending = Pending {
            report: Incoming {
                cluster: cluster.to_string(),
                credential_hash: crate::store::hash(credential),
                agent_id: agent_id.to_string(),
                sequence: i64::try_from(sequence).unwrap_or(i64::MAX),
                ibu: text,
            },
            parsed: Arc::new(ibu),
        };
        self.writer.submit(pending).await
    }
}

struct Groups {
    pool: PgPool,
    fresh: Arc<Mutex<ReportCache>>,
}

impl WriteGroup for Groups {
    type Item = Pending;
    type Outcome = Stored;

    async fn write(&mut self, group: Vec<Pending>) -> Vec<Result<Stored, Error>> {
        let group_len = group.len();
        let (reports, parsed): (Vec<_>, Vec<_>) =
            group.into_iter().map(|p| (p.report, p.parsed)).unzip();
        let result = report_write_group(&self.pool, &reports).await;
        if let Ok(outcomes) = &result {
            let mut kept = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() + outcomes.len() > FRESH_KEPT {
                kept.clear();
            }
            for ((outcome, report), parsed) in outcomes.iter().zip(reports).zip(parsed) {
                if *outcome == Stored::Yes {
                    let id = ReportId {
                        agent: report.agent_id,
                        seq: report.sequence,
                    };
                    kept.insert(report.cluster, (id, parsed));
                }
            }
        }
        each(group_len, result)
    }
}
