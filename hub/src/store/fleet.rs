//! What a pass reads of the fleet: labels, last reports and when each cluster was seen.

use std::collections::HashSet;

use futures::TryStreamExt;

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

/// A watched cluster's row as a pass read it, kept for the next pass: taken again only while
/// the stored row still shows the same labels version and report.
#[derive(Clone, Debug, PartialEq)]
pub struct KnownRow {
    pub labels_version: i64,
    pub labels: BTreeMap<String, String>,
    pub report: ReportId,
    pub last_seen: Option<DateTime<Utc>>,
}

/// What a pass already has of the fleet.
#[derive(Clone, Default)]
pub struct Known {
    /// Reports parsed before (by the last pass, or by their handler since): such a report is
    /// not sent again while the row holds it.
    pub reports: ReportCache,
    /// The watched rows the last pass read: such a row is not sent again at all while its
    /// labels version and its report are the same (and its report is in `reports`).
    pub rows: HashMap<String, KnownRow>,
}

/// What the planner needs of the fleet: the labels of every cluster (`all`) or only of those
/// in `with_ibu`, and the last IBU of those in `with_ibu`, when they were last seen. A report
/// in `known` that the row still holds is neither sent again nor parsed again, and a watched
/// row known as it is stored is not sent at all; the answer's cache holds the reports of
/// `with_ibu`, its `versions` their rows' identities.
pub async fn fleet_in_txn(
    conn: &mut PgConnection,
    with_ibu: &[String],
    all: bool,
    known: Known,
) -> Result<Fleet, Error> {
    let Known {
        reports: mut known_reports,
        rows: mut known_rows,
    } = known;
    let reusable = |n: &String| known_reports.get(n).filter(|(id, _)| id.reusable());
    let mut agents = Vec::with_capacity(with_ibu.len());
    let mut seqs = Vec::with_capacity(with_ibu.len());
    let mut versions = Vec::with_capacity(with_ibu.len());
    // Whether the row the last pass read may stand for the stored one: it showed the report
    // known now (not one stored since, whose row is read for when it was seen).
    let mut keep = Vec::with_capacity(with_ibu.len());
    for n in with_ibu {
        let report = reusable(n).map(|(id, _)| id);
        agents.push(report.map(|id| id.agent.as_str()));
        seqs.push(report.map(|id| id.seq));
        let row = known_rows.get(n);
        versions.push(row.map(|r| r.labels_version));
        keep.push(row.is_some_and(|r| Some(&r.report) == report));
    }
    // Two statements, not one with `$4 OR name = ANY($1)`: under a generic plan that form
    // scans every cluster and tests each against the whole list (0.1 s at 10,000 clusters);
    // the whole fleet is joined to the list for the same reason. The hub's connections plan
    // each statement for its values (`db::custom_plans`); the two stay the cheaper form.
    // Streamed, not collected: the whole fleet's rows are never held at once besides what
    // is made of them.
    let query = if all {
        sqlx::query_as(
            "SELECT c.name, c.labels_version, c.labels::text, w.name IS NOT NULL, c.agent_id, c.last_report_seq,
                    CASE WHEN w.name IS NOT NULL AND (c.agent_id, c.last_report_seq) IS DISTINCT FROM (w.agent, w.seq)
                         THEN c.last_report::text END,
                    CASE WHEN w.name IS NOT NULL THEN c.last_seen END
             FROM clusters c LEFT JOIN UNNEST($1::text[], $2::text[], $3::int8[]) AS w(name, agent, seq)
               ON w.name = c.name",
        )
        .bind(with_ibu)
        .bind(&agents)
        .bind(&seqs)
    } else {
        // Only the rows that changed since the last pass (and those it did not read, or
        // that are gone: without a row, `labels_version` is null).
        sqlx::query_as(
            "SELECT w.name, c.labels_version,
                    CASE WHEN c.labels_version IS DISTINCT FROM w.version THEN c.labels::text END,
                    true, c.agent_id, c.last_report_seq,
                    CASE WHEN (c.agent_id, c.last_report_seq) IS DISTINCT FROM (w.agent, w.seq)
                         THEN c.last_report::text END,
                    c.last_seen
             FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::bool[])
                    AS w(name, agent, seq, version, keep)
               LEFT JOIN clusters c ON c.name = w.name
             WHERE NOT w.keep OR c.name IS NULL OR c.labels_version IS DISTINCT FROM w.version
                OR (c.agent_id, c.last_report_seq) IS DISTINCT FROM (w.agent, w.seq)",
        )
        .bind(with_ibu)
        .bind(&agents)
        .bind(&seqs)
        .bind(&versions)
        .bind(&keep)
    };
    let mut rows = query.fetch(conn);
    let mut fleet = Fleet::default();
    let mut read = HashSet::new();
    while let Some(row) = rows.try_next().await? {
        let (name, version, labels, watched, agent, seq, report, last_seen): FleetRow = row;
        if !all {
            read.insert(name.clone());
        }
        // The watched cluster has no row (any more).
        let Some(version) = version else { continue };
        // What was kept of the row is used up here (its labels moved, not copied).
        let known_row = known_rows
            .remove(&name)
            .filter(|r| r.labels_version == version);
        let labels = match labels {
            Some(text) => serde_json::from_str(&text).unwrap_or_default(),
            None => known_row.map(|r| r.labels).unwrap_or_default(),
        };
        let id = ReportId {
            agent: agent.unwrap_or_default(),
            seq: seq.unwrap_or_default(),
        };
        let ibu = match report {
            _ if !watched => None,
            Some(text) => serde_json::from_str(&text).ok().map(Arc::new),
            None => reusable(&name)
                .filter(|(known_id, _)| *known_id == id)
                .map(|(_, ibu)| ibu.clone()),
        };
        let identity = watched.then_some((version, id));
        fleet.add(name, ClusterInfo { labels, ibu }, last_seen, identity);
    }
    // The statement's arguments borrow the known reports: done with them.
    drop(rows);
    if !all {
        // The rows not sent: as the last pass read them, moved over.
        for name in with_ibu.iter().filter(|n| !read.contains(*n)) {
            let (Some((name, row)), Some((_, (id, ibu)))) = (
                known_rows.remove_entry(name),
                known_reports
                    .remove_entry(name)
                    .filter(|(_, (id, _))| id.reusable()),
            ) else {
                continue;
            };
            let info = ClusterInfo {
                labels: row.labels,
                ibu: Some(ibu),
            };
            fleet.add(name, info, row.last_seen, Some((row.labels_version, id)));
        }
    }
    Ok(fleet)
}

/// Name, labels version (none: no such cluster), labels as JSON text when they are not the
/// known ones, whether it is watched, the identity of its report, that report as JSON text
/// when it is not the known one (parsed by the caller; a bad one reads as none), last seen.
pub(super) type FleetRow = (
    String,
    Option<i64>,
    Option<String>,
    bool,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<DateTime<Utc>>,
);

/// What [`fleet_in_txn`] read.
#[derive(Default)]
pub struct Fleet {
    pub clusters: BTreeMap<String, ClusterInfo>,
    pub last_seen: HashMap<String, DateTime<Utc>>,
    pub reports: ReportCache,
    /// The watched clusters' labels versions and report identities.
    pub versions: HashMap<String, (i64, ReportId)>,
}

impl Fleet {
    /// Adds a cluster; a watched one (`identity`: its labels version and report identity)
    /// with its report in the cache.
    fn add(
        &mut self,
        name: String,
        info: ClusterInfo,
        last_seen: Option<DateTime<Utc>>,
        identity: Option<(i64, ReportId)>,
    ) {
        if let Some((version, id)) = identity {
            if let Some(ibu) = &info.ibu {
                self.reports.insert(name.clone(), (id.clone(), ibu.clone()));
            }
            self.versions.insert(name.clone(), (version, id));
        }
        if let Some(t) = last_seen {
            self.last_seen.insert(name.clone(), t);
        }
        self.clusters.insert(name, info);
    }
}
