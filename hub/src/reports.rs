//! Spoke reports are stored in groups: every report waiting when the writer is free goes into
//! one statement and one commit, and each sender gets its answer only once that commit is
//! durable. At fleet scale this is the difference between one fsync per report and one per
//! group, with nothing acknowledged that could be lost.

use fleet_types::ibu::ImageBasedUpgrade;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;

/// Most reports stored by one statement.
const MAX_GROUP: usize = 1000;
/// Reports waiting for the writer before senders are slowed down.
const QUEUE: usize = 10_000;

struct Pending {
    cluster: String,
    agent_id: String,
    sequence: i64,
    ibu: serde_json::Value,
    reply: oneshot::Sender<Result<bool, String>>,
}

#[derive(Clone)]
pub struct ReportWriter {
    tx: mpsc::Sender<Pending>,
}

impl ReportWriter {
    pub fn start(pool: PgPool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(pool, rx));
        ReportWriter { tx }
    }

    /// Stores the report unless it is older than, or the same as, the last one of this agent;
    /// answers whether it was stored, once it is durable.
    pub async fn store(
        &self,
        cluster: &str,
        agent_id: &str,
        sequence: u64,
        ibu: &ImageBasedUpgrade,
    ) -> Result<bool, Error> {
        let (reply, answer) = oneshot::channel();
        let ibu = serde_json::to_value(ibu).map_err(|e| Error::Config(e.to_string()))?;
        let pending = Pending {
            cluster: cluster.to_string(),
            agent_id: agent_id.to_string(),
            sequence: i64::try_from(sequence).unwrap_or(i64::MAX),
            ibu,
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

async fn write_loop(pool: PgPool, mut rx: mpsc::Receiver<Pending>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let result = write_group(&pool, &group).await;
        for p in group.drain(..) {
            let answer = match &result {
                Ok(stored) => Ok(stored
                    .iter()
                    .any(|(c, s)| *c == p.cluster && *s == p.sequence)),
                Err(e) => Err(e.clone()),
            };
            let _ = p.reply.send(answer);
        }
    }
}

/// One statement for the group; for a cluster reported twice, the newest report wins.
async fn write_group(pool: &PgPool, group: &[Pending]) -> Result<Vec<(String, i64)>, String> {
    let clusters: Vec<&str> = group.iter().map(|p| p.cluster.as_str()).collect();
    let agents: Vec<&str> = group.iter().map(|p| p.agent_id.as_str()).collect();
    let seqs: Vec<i64> = group.iter().map(|p| p.sequence).collect();
    let ibus: Vec<&serde_json::Value> = group.iter().map(|p| &p.ibu).collect();
    sqlx::query_as::<_, (String, i64)>(
        "UPDATE clusters c SET last_report = u.ibu, last_report_seq = u.seq, last_seen = now()
         FROM (SELECT DISTINCT ON (name) name, agent, seq, ibu
               FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::jsonb[]) AS r(name, agent, seq, ibu)
               ORDER BY name, seq DESC) u
         WHERE c.name = u.name AND c.agent_id = u.agent AND c.last_report_seq < u.seq
         RETURNING c.name, c.last_report_seq",
    )
    .bind(&clusters)
    .bind(&agents)
    .bind(&seqs)
    .bind(&ibus)
    .fetch_all(pool)
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "storing spoke reports failed");
        "storing the report failed".to_string()
    })
}
