//! What a pass reads of the fleet: labels, last reports and when each cluster was seen.

use super::*;

/// Which report a cluster's row holds: the agent run that sent it and its sequence number.
/// A row's report changes only with a higher sequence of the registered run, and a run never
/// sends two reports under one number, so the same identity means the same report, unlike
/// the row's version, which the hub's own label changes move on too. Rows without a run
/// (an agent without an id) or without a report of this run (sequence 0: just registered,
/// possibly with an earlier run's report) are always read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportId {
    pub agent: String,
    pub seq: i64,
}

impl ReportId {
    fn reusable(&self) -> bool {
        !self.agent.is_empty() && self.seq > 0
    }
}

/// Reports already parsed, by cluster, with their identity.
pub type ReportCache = HashMap<String, (ReportId, Arc<ImageBasedUpgrade>)>;

/// What the planner needs of the fleet: the labels of every cluster (`all`) or only of those
/// in `with_ibu`, and the last IBU of those in `with_ibu`, when they were last seen. A report
/// in `known` that the row still holds is neither sent again nor parsed again; the answer's
/// cache holds the reports of `with_ibu`.
pub async fn fleet_in_txn(
    conn: &mut PgConnection,
    with_ibu: &[String],
    all: bool,
    known: &ReportCache,
) -> Result<Fleet, Error> {
    let reusable = |n: &String| known.get(n).filter(|(id, _)| id.reusable());
    let (agents, seqs): (Vec<Option<&str>>, Vec<Option<i64>>) = with_ibu
        .iter()
        .map(|n| {
            reusable(n)
                .map(|(id, _)| (id.agent.as_str(), id.seq))
                .unzip()
        })
        .unzip();
    // Two statements, not one with `$4 OR name = ANY($1)`: under a generic plan that form
    // scans every cluster and tests each against the whole list (0.1 s at 10,000 clusters);
    // the whole fleet is joined to the list for the same reason.
    let rows: Vec<FleetRow> = if all {
        sqlx::query_as(
            "SELECT c.name, c.labels::text, w.name IS NOT NULL, c.agent_id, c.last_report_seq,
                    CASE WHEN w.name IS NOT NULL AND (c.agent_id, c.last_report_seq) IS DISTINCT FROM (w.agent, w.seq)
                         THEN c.last_report::text END,
                    CASE WHEN w.name IS NOT NULL THEN c.last_seen END
             FROM clusters c LEFT JOIN UNNEST($1::text[], $2::text[], $3::int8[]) AS w(name, agent, seq)
               ON w.name = c.name",
        )
        .bind(with_ibu)
        .bind(&agents)
        .bind(&seqs)
        .fetch_all(conn)
        .await
    } else {
        sqlx::query_as(
            "SELECT c.name, c.labels::text, true, c.agent_id, c.last_report_seq,
                    CASE WHEN (c.agent_id, c.last_report_seq) IS DISTINCT FROM (w.agent, w.seq)
                         THEN c.last_report::text END,
                    c.last_seen
             FROM UNNEST($1::text[], $2::text[], $3::int8[]) AS w(name, agent, seq)
               JOIN clusters c ON c.name = w.name",
        )
        .bind(with_ibu)
        .bind(&agents)
        .bind(&seqs)
        .fetch_all(conn)
        .await
    }?;
    let mut fleet = Fleet::default();
    for (name, labels, watched, agent, seq, report, last_seen) in rows {
        let mut ibu = None;
        let id = ReportId { agent, seq };
        if watched {
            ibu = match report {
                Some(text) => serde_json::from_str(&text).ok().map(Arc::new),
                None => reusable(&name)
                    .filter(|(known_id, _)| *known_id == id)
                    .map(|(_, ibu)| ibu.clone()),
            };
            if let Some(i) = &ibu {
                fleet.reports.insert(name.clone(), (id, i.clone()));
            }
        }
        if let Some(t) = last_seen {
            fleet.last_seen.insert(name.clone(), t);
        }
        fleet.clusters.insert(
            name,
            ClusterInfo {
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                ibu,
            },
        );
    }
    Ok(fleet)
}

/// Name, labels, whether it is watched, the identity of its report, that report as JSON text
/// when it is not the known one (parsed by the caller; a bad one reads as none), last seen.
pub(super) type FleetRow = (
    String,
    String,
    bool,
    String,
    i64,
    Option<String>,
    Option<DateTime<Utc>>,
);

/// What [`fleet_in_txn`] read.
#[derive(Default)]
pub struct Fleet {
    pub clusters: BTreeMap<String, ClusterInfo>,
    pub last_seen: HashMap<String, DateTime<Utc>>,
    pub reports: ReportCache,
}
