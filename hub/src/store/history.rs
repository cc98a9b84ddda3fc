//! The append-only history of every transition, and its reading for the API and Events.

use super::*;

/// Appends events of a rollout; `actor` caused them (`controller` for the planner's).
pub async fn history_insert_in_txn(
    conn: &mut PgConnection,
    rollout: &RolloutRow,
    now: DateTime<Utc>,
    events: &[Event],
    actor: &str,
) -> Result<(), Error> {
    if events.is_empty() {
        return Ok(());
    }
    let clusters: Vec<Option<String>> = events.iter().map(|e| e.cluster.clone()).collect();
    let steps: Vec<Option<i32>> = events.iter().map(|e| e.step.map(|s| s as i32)).collect();
    let actions: Vec<Option<String>> = events
        .iter()
        .map(|e| e.action.map(|a| a.as_str().to_string()))
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.event).collect();
    let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
    sqlx::query(
        "INSERT INTO history (rollout_id, rollout_namespace, rollout_name, time, cluster, step, action, event, message,
                              actor)
         SELECT $1, $2, $3, $4, u.cluster, u.step, u.action, u.event, u.message, $10
         FROM UNNEST($5::text[], $6::int4[], $7::text[], $8::text[], $9::text[]) WITH ORDINALITY
           AS u(cluster, step, action, event, message, n) ORDER BY u.n",
    )
    .bind(rollout.id)
    .bind(rollout.object.metadata.namespace.clone().unwrap_or_default())
    .bind(rollout.object.metadata.name.clone().unwrap_or_default())
    .bind(now)
    .bind(&clusters)
    .bind(&steps)
    .bind(&actions)
    .bind(&kinds)
    .bind(&messages)
    .bind(actor)
    .execute(conn)
    .await
    ?;
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema, sqlx::FromRow)]
pub struct HistoryEntry {
    pub time: DateTime<Utc>,
    pub cluster: Option<String>,
    pub step: Option<i32>,
    pub action: Option<String>,
    pub event: String,
    pub message: String,
    /// Who caused it: `controller` (the hub's own decisions), `admin`, `viewer`,
    /// `kubernetes:<user>`.
    pub actor: String,
}

pub async fn history_list(
    pool: &PgPool,
    rollout_id: i64,
    cluster: Option<&str>,
) -> Result<Vec<HistoryEntry>, Error> {
    // Two statements, not one with `$2 IS NULL OR cluster = $2`: a prepared statement's
    // generic plan could not use the (rollout_id, cluster, id) index for a cluster, and read
    // the rollout's every row to find one cluster's (0.3 s at 100,000 clusters).
    let rows = match cluster {
        Some(cluster) => {
            sqlx::query_as(
                "SELECT time, cluster, step, action, event, message, actor FROM history
                 WHERE rollout_id = $1 AND cluster = $2 ORDER BY id",
            )
            .bind(rollout_id)
            .bind(cluster)
            .fetch_all(pool)
            .await?
        }
        None => {
            sqlx::query_as(
                "SELECT time, cluster, step, action, event, message, actor FROM history
                 WHERE rollout_id = $1 ORDER BY id",
            )
            .bind(rollout_id)
            .fetch_all(pool)
            .await?
        }
    };
    Ok(rows)
}

/// A history row for Kubernetes Events.
#[derive(sqlx::FromRow)]
pub struct HistoryEvent {
    pub id: i64,
    #[sqlx(rename = "rollout_namespace")]
    pub namespace: String,
    #[sqlx(rename = "rollout_name")]
    pub rollout: String,
    pub cluster: Option<String>,
    pub event: String,
    pub message: String,
}

/// History rows after `after` whose event is one of `events`, oldest first.
pub async fn history_since(
    pool: &PgPool,
    after: i64,
    events: &[&str],
    limit: i64,
) -> Result<Vec<HistoryEvent>, Error> {
    let rows = sqlx::query_as(
        "SELECT id, rollout_namespace, rollout_name, cluster, event, message FROM history
         WHERE id > $1 AND event = ANY($2) ORDER BY id LIMIT $3",
    )
    .bind(after)
    .bind(events)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// The newest history id (0 when empty).
pub async fn history_last_id(pool: &PgPool) -> Result<i64, Error> {
    sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM history")
        .fetch_one(pool)
        .await
        .map_err(Error::from)
}

/// What one pass of history upkeep did.
#[derive(Debug, Default, PartialEq)]
pub struct HistoryUpkeep {
    /// Monthly partitions made ahead (this month's and next month's, when missing).
    pub made: Vec<String>,
    /// Monthly partitions dropped by the retention, oldest first.
    pub dropped: Vec<String>,
}

/// The first instant of the month after the one a monthly partition `history_YYYY_MM`
/// holds: every row of it is older than that.
pub fn history_partition_end(name: &str) -> Option<DateTime<Utc>> {
    let ym = name.strip_prefix("history_")?;
    let (y, m) = ym.split_once('_')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    chrono::NaiveDate::from_ymd_opt(y, m, 1)?
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc())
}

/// Keeps the history partitioned: makes this month's and next month's partitions ahead of
/// the rows, and with a retention drops every monthly partition all of whose rows are older
/// than `now - retention` (whole months: rows are never deleted one by one).
pub async fn history_upkeep(
    pool: &PgPool,
    now: DateTime<Utc>,
    retention: Option<chrono::Duration>,
) -> Result<HistoryUpkeep, Error> {
    let mut upkeep = HistoryUpkeep::default();
    let next_month = now + chrono::Duration::days(31);
    for at in [now, next_month] {
        let existed: bool = sqlx::query_scalar(
            "SELECT to_regclass('history_' || to_char($1 AT TIME ZONE 'UTC', 'YYYY_MM')) IS NOT NULL",
        )
        .bind(at)
        .fetch_one(pool)
        .await?;
        let made: Option<String> = sqlx::query_scalar("SELECT history_partition_for($1)")
            .bind(at)
            .fetch_one(pool)
            .await?;
        if let Some(name) = made.filter(|_| !existed) {
            upkeep.made.push(name);
        }
    }
    let Some(retention) = retention else {
        return Ok(upkeep);
    };
    let cutoff = now - retention;
    let mut parts: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'history'::regclass",
    )
    .fetch_all(pool)
    .await?;
    parts.sort();
    for part in parts {
        let Some(end) = history_partition_end(&part) else {
            continue;
        };
        if end <= cutoff {
            // The name comes from the catalog and has the shape checked above.
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {part}")))
                .execute(pool)
                .await?;
            upkeep.dropped.push(part);
        }
    }
    Ok(upkeep)
}
