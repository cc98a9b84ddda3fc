//! Spoke reports are stored in groups: every report waiting when the writer is free goes into
//! one statement and one commit, and each sender gets its answer only once that commit is
//! durable. At fleet scale this is the difference between one fsync per report and one per
//! group, with nothing acknowledged that could be lost. The same statement checks each
//! report's credential against the cluster's, so a report costs no query of its own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use fleet_types::ibu::ImageBasedUpgrade;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::store::{ReportCache, ReportId};

/// Most reports stored by one statement.
const MAX_GROUP: usize = 1000;
/// Reports waiting for the writer before senders are slowed down.
const QUEUE: usize = 10_000;
/// Most stored reports kept for the engine between its passes, a few KiB each: the running
/// batches' reports fit; reports of clusters no pass is watching (after a registration
/// storm, say) do not pile up. Beyond it they are all dropped, and read from Postgres.
const FRESH_KEPT: usize = 4096;

/// A report as the writer stores it.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub cluster: String,
    /// The hash of the credential the report came with.
    pub credential_hash: String,
    pub agent_id: String,
    pub sequence: i64,
    /// The IBU as JSON text, as the spoke sent it.
    pub ibu: String,
}

struct Pending {
    report: Incoming,
    parsed: Arc<ImageBasedUpgrade>,
    reply: oneshot::Sender<Result<Stored, String>>,
}

/// What became of a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Yes,
    /// Older than, or the same as, the last report of this agent run (or from an agent run
    /// the hub no longer knows): ignored.
    Stale,
    /// The credential is not this cluster's (or there is no such cluster): nothing stored.
    Forbidden,
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
        self.tx
            .send(pending)
            .await
            .map_err(|_| Error::Config("the report writer stopped".into()))?;
        answer
            .await
            .map_err(|_| Error::Config("the report writer stopped".into()))?
            .map_err(Error::Config)
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
        let result = write_group(&pool, &reports).await;
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

/// One statement for the group, and a second only when some report was not stored: a report
/// whose credential is not its cluster's is refused, one from another agent run than the
/// registered one is stale, and of a cluster's others the newest wins (one of them, should a
/// run send two under one number). Answers each report's outcome, in the group's order.
///
/// Only the newest report of each cluster, credential and run is offered to the update (so
/// that one row meets one report at most); the others are stale when their credential is
/// the cluster's. Whether it is, is asked only of the reports the update did not take, which
/// in a healthy fleet are none.
pub async fn write_group(pool: &PgPool, group: &[Incoming]) -> Result<Vec<Stored>, String> {
    let failed = |e: sqlx::Error| {
        tracing::error!(error = %e, "storing spoke reports failed");
        "storing the report failed".to_string()
    };
    // The newest of each (cluster, credential, run), the first of equals.
    let mut newest: HashMap<(&str, &str, &str), usize> = HashMap::new();
    for (i, p) in group.iter().enumerate() {
        let key = (
            p.cluster.as_str(),
            p.credential_hash.as_str(),
            p.agent_id.as_str(),
        );
        let best = newest.entry(key).or_insert(i);
        if p.sequence > group[*best].sequence {
            *best = i;
        }
    }
    let offered: Vec<usize> = {
        let mut v: Vec<usize> = newest.into_values().collect();
        v.sort_unstable();
        v
    };
    let column =
        |f: fn(&Incoming) -> &str| -> Vec<&str> { offered.iter().map(|&i| f(&group[i])).collect() };
    let seqs: Vec<i64> = offered.iter().map(|&i| group[i].sequence).collect();
    let index: Vec<i32> = offered.iter().map(|&i| i as i32).collect();
    let stored: Vec<i32> = sqlx::query_scalar(
        "UPDATE clusters c SET last_report = u.ibu::json, last_report_seq = u.seq, last_seen = now()
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int4[])
           AS u(name, hash, agent, seq, ibu, i)
         WHERE c.name = u.name AND c.credential_hash = u.hash AND c.agent_id = u.agent
           AND c.last_report_seq < u.seq
         RETURNING u.i",
    )
    .bind(column(|p| &p.cluster))
    .bind(column(|p| &p.credential_hash))
    .bind(column(|p| &p.agent_id))
    .bind(&seqs)
    .bind(column(|p| &p.ibu))
    .bind(&index)
    .fetch_all(pool)
    .await
    .map_err(failed)?;
    let mut outcomes = vec![Stored::Forbidden; group.len()];
    // (cluster, credential) pairs known to be the cluster's: those of the stored reports.
    let mut authorized: HashSet<(&str, &str)> = HashSet::new();
    for i in stored {
        let Some(i) = usize::try_from(i).ok().filter(|&i| i < group.len()) else {
            continue;
        };
        outcomes[i] = Stored::Yes;
        authorized.insert((group[i].cluster.as_str(), group[i].credential_hash.as_str()));
    }
    let unknown: Vec<usize> = (0..group.len())
        .filter(|&i| outcomes[i] != Stored::Yes)
        .filter(|&i| {
            !authorized.contains(&(group[i].cluster.as_str(), group[i].credential_hash.as_str()))
        })
        .collect();
    if !unknown.is_empty() {
        let names: Vec<&str> = unknown.iter().map(|&i| group[i].cluster.as_str()).collect();
        let hashes: Vec<&str> = unknown
            .iter()
            .map(|&i| group[i].credential_hash.as_str())
            .collect();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.name, c.credential_hash FROM clusters c
             JOIN UNNEST($1::text[], $2::text[]) AS u(name, hash)
               ON c.name = u.name AND c.credential_hash = u.hash",
        )
        .bind(&names)
        .bind(&hashes)
        .fetch_all(pool)
        .await
        .map_err(failed)?;
        let known: HashSet<(&str, &str)> =
            rows.iter().map(|(n, h)| (n.as_str(), h.as_str())).collect();
        authorized.extend(
            unknown
                .iter()
                .map(|&i| (group[i].cluster.as_str(), group[i].credential_hash.as_str()))
                .filter(|k| known.contains(k)),
        );
    }
    for (i, p) in group.iter().enumerate() {
        if outcomes[i] != Stored::Yes
            && authorized.contains(&(p.cluster.as_str(), p.credential_hash.as_str()))
        {
            outcomes[i] = Stored::Stale;
        }
    }
    Ok(outcomes)
}
