//! Rollouts: the IBGU objects, the lock a pass holds, and the end of a pass on the row.

use super::*;

pub struct RolloutRow {
    pub id: i64,
    pub object: ImageBasedGroupUpgrade,
    pub phase: String,
    pub started_at: Option<DateTime<Utc>>,
    /// What held the rollout's starts back after its last pass.
    pub waiting: Option<Wait>,
}

/// The columns of [`ROLLOUT_COLUMNS`].
#[derive(sqlx::FromRow)]
struct RolloutColumns {
    id: i64,
    uid: uuid::Uuid,
    namespace: String,
    name: String,
    generation: i64,
    labels: Value,
    annotations: Value,
    spec: Value,
    status: Value,
    phase: String,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    waiting: Option<String>,
}

pub(super) fn rollout_from_row(r: &sqlx::postgres::PgRow) -> Result<RolloutRow, Error> {
    let c = RolloutColumns::from_row(r)?;
    let spec = serde_json::from_value(c.spec).map_err(|e| Error::internal("stored spec", e))?;
    let mut object = ImageBasedGroupUpgrade::new(&c.name, spec);
    let meta = &mut object.metadata;
    meta.namespace = Some(c.namespace);
    meta.uid = Some(c.uid.to_string());
    meta.generation = Some(c.generation);
    meta.labels = serde_json::from_value(c.labels)
        .ok()
        .filter(|m: &BTreeMap<String, String>| !m.is_empty());
    meta.annotations = serde_json::from_value(c.annotations)
        .ok()
        .filter(|m: &BTreeMap<String, String>| !m.is_empty());
    meta.creation_timestamp = serde_json::from_value(Value::String(
        c.created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    ))
    .ok();
    let status: ImageBasedGroupUpgradeStatus = serde_json::from_value(c.status).unwrap_or_default();
    object.status = (status != ImageBasedGroupUpgradeStatus::default()).then_some(status);
    Ok(RolloutRow {
        id: c.id,
        object,
        phase: c.phase,
        started_at: c.started_at,
        waiting: c.waiting.as_deref().and_then(Wait::parse),
    })
}

pub(super) const ROLLOUT_COLUMNS: &str = "id, uid, namespace, name, generation, labels, annotations, spec, status, phase, created_at, started_at, waiting";

pub async fn rollout_insert(
    pool: &PgPool,
    obj: &ImageBasedGroupUpgrade,
) -> Result<Option<RolloutRow>, Error> {
    let ns = obj
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO rollouts (uid, namespace, name, labels, annotations, spec)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (namespace, name) DO NOTHING RETURNING {ROLLOUT_COLUMNS}"
    )))
    .bind(uuid::Uuid::new_v4())
    .bind(ns)
    .bind(obj.metadata.name.clone().unwrap_or_default())
    .bind(serde_json::to_value(obj.metadata.labels.clone().unwrap_or_default()).unwrap_or_default())
    .bind(serde_json::to_value(obj.metadata.annotations.clone().unwrap_or_default()).unwrap_or_default())
    .bind(serde_json::to_value(&obj.spec).map_err(|e| Error::internal("encoding", e))?)
    .fetch_optional(pool)
    .await
    ?;
    row.as_ref().map(rollout_from_row).transpose()
}

/// The rollout as users see it: its status with `clusters`.
pub async fn rollout_fetch(
    pool: &PgPool,
    namespace: &str,
    name: &str,
) -> Result<Option<RolloutRow>, Error> {
    match rollout_fetch_stored(pool, namespace, name).await? {
        Some(r) => Ok(Some(with_cluster_states(pool, r).await?)),
        None => Ok(None),
    }
}

/// The rollout as stored: its status without `clusters` (for who needs the spec or the
/// phase, without reading every cluster's progress).
pub async fn rollout_fetch_stored(
    pool: &PgPool,
    namespace: &str,
    name: &str,
) -> Result<Option<RolloutRow>, Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE namespace = $1 AND name = $2"
    )))
    .bind(namespace)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(rollout_from_row).transpose()
}

pub async fn rollout_list(pool: &PgPool) -> Result<Vec<RolloutRow>, Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY namespace, name"
    )))
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(with_cluster_states(pool, rollout_from_row(r)?).await?);
    }
    Ok(out)
}

/// Fills `status.clusters` from the progress rows: the engine stores the status without it.
pub(super) async fn with_cluster_states(
    pool: &PgPool,
    mut row: RolloutRow,
) -> Result<RolloutRow, Error> {
    if let Some(status) = row.object.status.as_mut() {
        let mut conn = pool.acquire().await?;
        let steps = rollout_steps_in_txn(&mut conn, row.id).await?;
        status.clusters = crate::planner::rollout::cluster_states(&steps);
    }
    Ok(row)
}

/// Stores a changed object (spec, labels, annotations) with the next generation, and marks
/// the rollout active again so an appended step starts.
pub async fn rollout_update(
    pool: &PgPool,
    id: i64,
    obj: &ImageBasedGroupUpgrade,
    spec_changed: bool,
) -> Result<Option<RolloutRow>, Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE rollouts SET spec = $2, labels = $3, annotations = $4,
           generation = generation + CASE WHEN $5 THEN 1 ELSE 0 END,
           phase = CASE WHEN $5 THEN 'Progressing' ELSE phase END,
           completed_at = CASE WHEN $5 THEN NULL ELSE completed_at END, updated_at = now()
         WHERE id = $1 RETURNING {ROLLOUT_COLUMNS}"
    )))
    .bind(id)
    .bind(serde_json::to_value(&obj.spec).map_err(|e| Error::internal("encoding", e))?)
    .bind(serde_json::to_value(obj.metadata.labels.clone().unwrap_or_default()).unwrap_or_default())
    .bind(
        serde_json::to_value(obj.metadata.annotations.clone().unwrap_or_default())
            .unwrap_or_default(),
    )
    .bind(spec_changed)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(rollout_from_row).transpose()
}

/// Whether a plan item of the rollout halted (final: `ibgu-hub.md` section 5).
pub async fn rollout_halted(pool: &PgPool, id: i64) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM rollout_steps WHERE rollout_id = $1 AND halt_reason IS NOT NULL)",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

/// Appends events that a person (or the controller) caused to a rollout's history.
pub async fn history_append(
    pool: &PgPool,
    rollout: &RolloutRow,
    events: &[Event],
    actor: &str,
) -> Result<(), Error> {
    let mut conn = pool.acquire().await?;
    history_insert_in_txn(&mut conn, rollout, Utc::now(), events, actor).await
}

pub async fn rollout_delete(pool: &PgPool, namespace: &str, name: &str) -> Result<bool, Error> {
    let r = sqlx::query("DELETE FROM rollouts WHERE namespace = $1 AND name = $2")
        .bind(namespace)
        .bind(name)
        .execute(pool)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// The active rollouts, with who drives each.
pub async fn rollout_active(pool: &PgPool) -> Result<Vec<(i64, Driver)>, Error> {
    let rows: Vec<(i64, Option<String>, i64)> = sqlx::query_as(
        "SELECT id, driver, driver_term FROM rollouts WHERE phase <> 'Completed' ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, term)| (id, Driver { name, term }))
        .collect())
}

/// What a pass finds when it asks for a rollout.
pub enum Held {
    /// Another hub holds the rollout's pass lock.
    Busy,
    /// The rollout is gone.
    Gone,
    /// The row, locked for this transaction, with its state version (see the migration that
    /// added it) and its driver.
    Row(Box<RolloutRow>, i64, Driver),
}

/// Takes the rollout's pass lock for this transaction and, when it is free, locks and reads
/// the row with its state version: one round trip for what a pass needs first. A lock held
/// by another hub leaves the row alone (it is not even read, let alone waited for).
pub async fn rollout_hold_in_txn(conn: &mut PgConnection, id: i64) -> Result<Held, Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH pass_lock AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(1717658484, $1::int4) AS held)
         SELECT pass_lock.held, r.* FROM pass_lock LEFT JOIN LATERAL
           (SELECT {ROLLOUT_COLUMNS}, state_version, driver, driver_term FROM rollouts
            WHERE id = $2 AND pass_lock.held FOR UPDATE) r ON true"
    )))
    .bind(id as i32)
    .bind(id)
    .fetch_one(conn)
    .await
    ?;
    if !row.try_get::<bool, _>("held")? {
        return Ok(Held::Busy);
    }
    match row.try_get::<Option<i64>, _>("state_version")? {
        None => Ok(Held::Gone),
        Some(version) => {
            let driver = Driver {
                name: row.try_get("driver")?,
                term: row.try_get("driver_term")?,
            };
            Ok(Held::Row(
                Box::new(rollout_from_row(&row)?),
                version,
                driver,
            ))
        }
    }
}

/// Makes `me` the rollout's driver at a new term. A replica that starts driving it (`starts`)
/// also voids the pushes the last driver left on their way: their outcomes would only ever
/// have been recorded by that replica.
pub async fn rollout_drive_in_txn(
    conn: &mut PgConnection,
    id: i64,
    me: &str,
    starts: bool,
) -> Result<(), Error> {
    sqlx::query("UPDATE rollouts SET driver = $2, driver_term = driver_term + 1 WHERE id = $1")
        .bind(id)
        .bind(me)
        .execute(&mut *conn)
        .await?;
    if starts {
        sqlx::query(
            "UPDATE rollout_clusters SET push_in_flight_since = NULL
             WHERE rollout_id = $1 AND push_in_flight_since IS NOT NULL",
        )
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Lets go of every rollout `me` drives (a clean stop): other replicas take them at once.
pub async fn rollout_release_all(pool: &PgPool, me: &str) -> Result<u64, Error> {
    let r = sqlx::query(
        "UPDATE rollouts SET driver = NULL, driver_term = driver_term + 1 WHERE driver = $1",
    )
    .bind(me)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// A rollout's status as a pass leaves it.
pub struct PassStatus<'a> {
    pub status: &'a ImageBasedGroupUpgradeStatus,
    pub phase: &'a str,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub waiting: Option<Wait>,
}

/// The end of a pass on the rollout's row, in one statement: the state version moves on when
/// the steps changed, the status is written when it changed. Answers the state version after
/// the pass (`version`, the one read under the row lock, when nothing is written).
pub async fn rollout_save_pass_in_txn(
    conn: &mut PgConnection,
    id: i64,
    version: i64,
    steps_changed: bool,
    status: Option<PassStatus<'_>>,
) -> Result<i64, Error> {
    if !steps_changed && status.is_none() {
        return Ok(version);
    }
    let (value, phase, started_at, completed_at, waiting) = match &status {
        Some(s) => (
            Some(serde_json::to_value(s.status).map_err(|e| Error::internal("encoding", e))?),
            Some(s.phase),
            s.started_at,
            s.completed_at,
            s.waiting.map(Wait::as_str),
        ),
        None => (None, None, None, None, None),
    };
    // Without a status ($3 and $4 null) the status columns keep what they hold.
    sqlx::query_scalar(
        "UPDATE rollouts SET state_version = state_version + $2,
           status = COALESCE($3, status), phase = COALESCE($4, phase),
           started_at = CASE WHEN $4 IS NULL THEN started_at ELSE $5 END,
           completed_at = CASE WHEN $4 IS NULL THEN completed_at ELSE $6 END,
           waiting = CASE WHEN $4 IS NULL THEN waiting ELSE $7 END,
           updated_at = CASE WHEN $4 IS NULL THEN updated_at ELSE now() END
         WHERE id = $1 RETURNING state_version",
    )
    .bind(id)
    .bind(i64::from(steps_changed))
    .bind(value)
    .bind(phase)
    .bind(started_at)
    .bind(completed_at)
    .bind(waiting)
    .fetch_one(conn)
    .await
    .map_err(Error::from)
}
