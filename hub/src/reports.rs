//! Spoke reports are stored in groups: every report waiting when the writer is free goes into
//! one statement and one commit, and each sender gets its answer only once that commit is
//! durable. At fleet scale this is the difference between one fsync per report and one per
//! group, with nothing acknowledged that could be lost. The same statement checks each
//! report's credential against the cluster's, so a report costs no query of its own.

use std::sync::{Arc, Mutex};

use fleet_types::ibu::ImageBasedUpgrade;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::store::{Incoming, ReportCache, ReportId, Stored, report_write_group};

/// Most reports stored by one statement.
const MAX_GROUP: usize = 1000;
/// Reports waiting for the writer before senders are slowed down.
const QUEUE: usize = 10_000;
/// Most stored reports kept for the engine between its passes, a few KiB each: the running
/// batches' reports fit; reports of clusters no pass is watching (after a registration
/// storm, say) do not pile up. Beyond it they are all dropped, and read from Postgres.
const FRESH_KEPT: usize = 4096;

struct Pending {
    report: Incoming,
    parsed: Arc<ImageBasedUpgrade>,
    reply: oneshot::Sender<Result<Stored, Error>>,
}

#[derive(Clone)]
pub struct ReportWriter {
    tx: mpsc::Sender<Pending>,
    /// Reports just stored, as their handlers parsed them: the engine's next pass takes them
    /// instead of reading and parsing the same JSON back from Postgres. Only a saving: a row
    /// that holds another report by then is read as before.
    fresh: Arc<Mutex<ReportCache>>,
}

impl ReportWriter {
    pub fn start(pool: PgPool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let fresh = Arc::new(Mutex::new(ReportCache::new()));
        tokio::spawn(write_loop(pool, rx, fresh.clone()));
        ReportWriter { tx, fresh }
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
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            report: Incoming {
                cluster: cluster.to_string(),
                credential_hash: crate::store::hash(credential),
                agent_id: agent_id.to_string(),
                sequence: i64::try_from(sequence).unwrap_or(i64::MAX),
                ibu: text,
            },
            parsed: Arc::new(ibu),
            reply,
        };
        let stopped = || Error::Internal("the report writer stopped".into());
        self.tx.send(pending).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn write_loop(pool: PgPool, mut rx: mpsc::Receiver<Pending>, fresh: Arc<Mutex<ReportCache>>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let mut reports = Vec::with_capacity(group.len());
        let mut rest = Vec::with_capacity(group.len());
        for p in group.drain(..) {
            reports.push(p.report);
            rest.push((p.parsed, p.reply));
        }
        let result = report_write_group(&pool, &reports).await;
        if let Ok(outcomes) = &result {
            let mut kept = fresh.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() + outcomes.len() > FRESH_KEPT {
                kept.clear();
            }
            for (outcome, (report, (parsed, _))) in outcomes.iter().zip(reports.iter().zip(&rest)) {
                if *outcome == Stored::Yes {
                    let id = ReportId {
                        agent: report.agent_id.clone(),
                        seq: report.sequence,
                    };
                    kept.insert(report.cluster.clone(), (id, parsed.clone()));
                }
            }
        }
        for (i, (_, reply)) in rest.into_iter().enumerate() {
            let answer = match &result {
                Ok(outcomes) => Ok(outcomes.get(i).copied().unwrap_or(Stored::Stale)),
                Err(e) => Err(e.clone()),
            };
            let _ = reply.send(answer);
        }
    }
}
