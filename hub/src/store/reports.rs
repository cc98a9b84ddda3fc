//! Spoke reports written in groups: one statement checks each report's credential, agent run
//! and sequence against its cluster's and stores the newest (the writer in `crate::reports`
//! gathers the groups).

use std::collections::HashSet;

use super::*;

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

/// One statement for the group, and a second only when some report was not stored: a report
/// whose credential is not its cluster's is refused, one from another agent run than the
/// registered one is stale, and of a cluster's others the newest wins (one of them, should a
/// run send two under one number). Answers each report's outcome, in the group's order.
///
/// Only the newest report of each cluster, credential and run is offered to the update (so
/// that one row meets one report at most); the others are stale when their credential is
/// the cluster's. Whether it is, is asked only of the reports the update did not take, which
/// in a healthy fleet are none.
pub async fn report_write_group(pool: &PgPool, group: &[Incoming]) -> Result<Vec<Stored>, Error> {
    let failed = |e: sqlx::Error| {
        let err = Error::from(e);
        tracing::error!(error = %err, "storing spoke reports failed");
        err
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
