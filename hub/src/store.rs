//! Postgres access, named resource first (`cluster_register`, `rollout_fetch`, ...). The
//! functions run single statements or short transactions; the engine's pass uses the
//! `_in_txn` ones inside its own transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use fleet_types::ibgu::{Action, ImageBasedGroupUpgrade, ImageBasedGroupUpgradeStatus};
use fleet_types::ibu::{ImageBasedUpgrade, Stage};
use fleet_types::messages::RegisterRequest;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};

use crate::error::Error;
use crate::metrics::{FleetSnapshot, ProgressGroup, StepSnapshot};
use crate::planner::rollout::{
    ClusterInfo, ClusterPhase, ClusterProgress, Event, LabelChange, StepHead, StepState,
};

fn db(e: sqlx::Error) -> Error {
    Error::Database(e)
}

// ---------------------------------------------------------------------------------------
// Credentials

/// The key of each database this process talks to, read once: it never changes after it
/// is created, and every registration and push round needs it.
static HUB_KEYS: std::sync::Mutex<BTreeMap<String, Vec<u8>>> =
    std::sync::Mutex::new(BTreeMap::new());

fn database_identity(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "{}:{}:{:?}/{}",
        o.get_host(),
        o.get_port(),
        o.get_socket(),
        o.get_database().unwrap_or_default()
    )
}

async fn hub_key(pool: &PgPool) -> Result<Vec<u8>, Error> {
    let id = database_identity(pool);
    if let Some(k) = HUB_KEYS.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
        return Ok(k.clone());
    }
    let key = hub_key_load(pool).await?;
    HUB_KEYS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, key.clone());
    Ok(key)
}

async fn hub_key_load(pool: &PgPool) -> Result<Vec<u8>, Error> {
    let fresh: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
        .iter()
        .flat_map(|u| u.as_bytes().to_vec())
        .collect();
    sqlx::query("INSERT INTO hub_secret (id, key) VALUES (true, $1) ON CONFLICT (id) DO NOTHING")
        .bind(&fresh)
        .execute(pool)
        .await
        .map_err(db)?;
    sqlx::query_scalar("SELECT key FROM hub_secret WHERE id")
        .fetch_one(pool)
        .await
        .map_err(db)
}

fn derive(key: &[u8], cluster: &str, nonce: &str) -> String {
    let mut h = Sha256::new();
    h.update(key);
    h.update(cluster.as_bytes());
    h.update([0]);
    h.update(nonce.as_bytes());
    hex::encode(h.finalize())
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

// ---------------------------------------------------------------------------------------
// Clusters

#[derive(Clone, Debug, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub endpoint: String,
    pub last_seen: Option<DateTime<Utc>>,
    pub ibu: Option<ImageBasedUpgrade>,
}

/// Registers (or re-registers) a spoke: announced labels are merged over the stored ones
/// (the hub's own `lcm.openshift.io/ibgu-*` labels stay). A new run of the agent (a new
/// agent id) gets a new credential and restarts the report sequence; the same run
/// registering again gets the same credential and keeps its sequence, so a registration
/// that reaches the hub late (its answer lost to a client timeout, the retry already served)
/// cannot replace the credential the agent holds. Answers the credential.
pub async fn cluster_register(pool: &PgPool, req: &RegisterRequest) -> Result<String, Error> {
    let key = hub_key(pool).await?;
    let fresh = uuid::Uuid::new_v4().simple().to_string();
    let labels = serde_json::to_value(&req.labels).map_err(|e| Error::Config(e.to_string()))?;
    let nonce: String = sqlx::query_scalar(
        "INSERT INTO clusters (name, labels, endpoint, credential_hash, credential_nonce, agent_id, last_report_seq, last_seen)
         VALUES ($1, $2, $3, $4, $5, $6, 0, now())
         ON CONFLICT (name) DO UPDATE SET
           labels = clusters.labels || EXCLUDED.labels, endpoint = EXCLUDED.endpoint,
           credential_hash = CASE WHEN clusters.agent_id = EXCLUDED.agent_id AND EXCLUDED.agent_id <> ''
             THEN clusters.credential_hash ELSE EXCLUDED.credential_hash END,
           credential_nonce = CASE WHEN clusters.agent_id = EXCLUDED.agent_id AND EXCLUDED.agent_id <> ''
             THEN clusters.credential_nonce ELSE EXCLUDED.credential_nonce END,
           last_report_seq = CASE WHEN clusters.agent_id = EXCLUDED.agent_id AND EXCLUDED.agent_id <> ''
             THEN clusters.last_report_seq ELSE 0 END,
           agent_id = EXCLUDED.agent_id, last_seen = now()
         RETURNING credential_nonce",
    )
    .bind(&req.name)
    .bind(labels)
    .bind(&req.endpoint)
    .bind(hash(&derive(&key, &req.name, &fresh)))
    .bind(&fresh)
    .bind(&req.agent_id)
    .fetch_one(pool)
    .await
    .map_err(db)?;
    Ok(derive(&key, &req.name, &nonce))
}

fn cluster_from_row(r: &sqlx::postgres::PgRow) -> Result<ClusterRecord, Error> {
    let labels: Value = r.try_get("labels").map_err(db)?;
    let ibu: Option<Value> = r.try_get("last_report").map_err(db)?;
    Ok(ClusterRecord {
        name: r.try_get("name").map_err(db)?,
        labels: serde_json::from_value(labels).unwrap_or_default(),
        endpoint: r.try_get("endpoint").map_err(db)?,
        last_seen: r.try_get("last_seen").map_err(db)?,
        ibu: ibu.and_then(|v| serde_json::from_value(v).ok()),
    })
}

/// Every cluster, in natural name order (`spoke2` before `spoke10`).
pub async fn cluster_list(pool: &PgPool) -> Result<Vec<ClusterRecord>, Error> {
    let rows = sqlx::query("SELECT name, labels, endpoint, last_seen, last_report FROM clusters")
        .fetch_all(pool)
        .await
        .map_err(db)?;
    let mut list = rows
        .iter()
        .map(cluster_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    list.sort_by(|a, b| fleet_types::names::natural_cmp(&a.name, &b.name));
    Ok(list)
}

pub async fn cluster_fetch(pool: &PgPool, name: &str) -> Result<Option<ClusterRecord>, Error> {
    let row = sqlx::query(
        "SELECT name, labels, endpoint, last_seen, last_report FROM clusters WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    row.as_ref().map(cluster_from_row).transpose()
}

/// Merges labels (a `null` value removes the label). Answers the updated cluster.
pub async fn cluster_patch_labels(
    pool: &PgPool,
    name: &str,
    patch: &serde_json::Map<String, Value>,
) -> Result<Option<ClusterRecord>, Error> {
    let mut tx = pool.begin().await.map_err(db)?;
    let labels: Option<Value> =
        sqlx::query_scalar("SELECT labels FROM clusters WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
    let Some(mut labels) = labels else {
        return Ok(None);
    };
    json_patch::merge(&mut labels, &Value::Object(patch.clone()));
    sqlx::query("UPDATE clusters SET labels = $2 WHERE name = $1")
        .bind(name)
        .bind(labels)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    cluster_fetch(pool, name).await
}

/// What became of a cluster's deletion.
#[derive(Debug, PartialEq, Eq)]
pub enum ClusterDeleted {
    Deleted,
    NotFound,
    /// Refused: rollouts not completed still have the cluster to start or at work.
    InRollouts(Vec<String>),
}

/// Removes a cluster from the inventory, unless a rollout still has it pending or at work.
/// Its history and the progress rows of finished rollouts are kept. A live agent registers
/// again on its next report (the hub no longer knows its credential).
pub async fn cluster_delete(pool: &PgPool, name: &str) -> Result<ClusterDeleted, Error> {
    let mut tx = pool.begin().await.map_err(db)?;
    // The row is locked first, so a registration or report of the cluster waits for the end.
    let exists: Option<String> =
        sqlx::query_scalar("SELECT name FROM clusters WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
    if exists.is_none() {
        return Ok(ClusterDeleted::NotFound);
    }
    let busy: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT r.namespace || '/' || r.name
         FROM rollout_clusters c JOIN rollouts r ON r.id = c.rollout_id
         WHERE c.cluster = $1 AND c.state IN ('pending', 'running') AND r.phase <> 'Completed'
         ORDER BY 1",
    )
    .bind(name)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    if !busy.is_empty() {
        return Ok(ClusterDeleted::InRollouts(busy));
    }
    sqlx::query("DELETE FROM clusters WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(ClusterDeleted::Deleted)
}

/// Where and how the hub reaches a spoke.
pub struct SpokeAccess {
    pub endpoint: String,
    pub credential: String,
}

pub async fn cluster_access(
    pool: &PgPool,
    names: &[String],
) -> Result<HashMap<String, SpokeAccess>, Error> {
    let key = hub_key(pool).await?;
    let rows =
        sqlx::query("SELECT name, endpoint, credential_nonce FROM clusters WHERE name = ANY($1)")
            .bind(names)
            .fetch_all(pool)
            .await
            .map_err(db)?;
    rows.iter()
        .map(|r| {
            let name: String = r.try_get("name").map_err(db)?;
            let nonce: String = r.try_get("credential_nonce").map_err(db)?;
            Ok((
                name.clone(),
                SpokeAccess {
                    endpoint: r.try_get("endpoint").map_err(db)?,
                    credential: derive(&key, &name, &nonce),
                },
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// ConfigMaps

pub async fn configmap_fetch(
    pool: &PgPool,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, Error> {
    let v: Option<Value> =
        sqlx::query_scalar("SELECT data FROM configmaps WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .fetch_optional(pool)
            .await
            .map_err(db)?;
    Ok(v.map(|v| serde_json::from_value(v).unwrap_or_default()))
}

pub async fn configmap_put(
    pool: &PgPool,
    namespace: &str,
    name: &str,
    data: &BTreeMap<String, String>,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO configmaps (namespace, name, data) VALUES ($1, $2, $3)
         ON CONFLICT (namespace, name) DO UPDATE SET data = EXCLUDED.data, updated_at = now()",
    )
    .bind(namespace)
    .bind(name)
    .bind(serde_json::to_value(data).map_err(|e| Error::Config(e.to_string()))?)
    .execute(pool)
    .await
    .map_err(db)?;
    Ok(())
}

pub async fn configmap_delete(pool: &PgPool, namespace: &str, name: &str) -> Result<bool, Error> {
    let r = sqlx::query("DELETE FROM configmaps WHERE namespace = $1 AND name = $2")
        .bind(namespace)
        .bind(name)
        .execute(pool)
        .await
        .map_err(db)?;
    Ok(r.rows_affected() == 1)
}

pub async fn configmap_names(pool: &PgPool) -> Result<Vec<(String, String)>, Error> {
    let rows = sqlx::query("SELECT namespace, name FROM configmaps")
        .fetch_all(pool)
        .await
        .map_err(db)?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("namespace").map_err(db)?,
                r.try_get("name").map_err(db)?,
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Rollouts

pub struct RolloutRow {
    pub id: i64,
    pub object: ImageBasedGroupUpgrade,
    pub phase: String,
    pub started_at: Option<DateTime<Utc>>,
}

fn rollout_from_row(r: &sqlx::postgres::PgRow) -> Result<RolloutRow, Error> {
    let spec: Value = r.try_get("spec").map_err(db)?;
    let status: Value = r.try_get("status").map_err(db)?;
    let labels: Value = r.try_get("labels").map_err(db)?;
    let annotations: Value = r.try_get("annotations").map_err(db)?;
    let uid: uuid::Uuid = r.try_get("uid").map_err(db)?;
    let name: String = r.try_get("name").map_err(db)?;
    let created: DateTime<Utc> = r.try_get("created_at").map_err(db)?;
    let mut object = ImageBasedGroupUpgrade::new(
        &name,
        serde_json::from_value(spec).map_err(|e| Error::Config(format!("stored spec: {e}")))?,
    );
    object.metadata.namespace = Some(r.try_get("namespace").map_err(db)?);
    object.metadata.uid = Some(uid.to_string());
    object.metadata.generation = Some(r.try_get("generation").map_err(db)?);
    object.metadata.labels = serde_json::from_value(labels)
        .ok()
        .filter(|m: &BTreeMap<String, String>| !m.is_empty());
    object.metadata.annotations = serde_json::from_value(annotations)
        .ok()
        .filter(|m: &BTreeMap<String, String>| !m.is_empty());
    object.metadata.creation_timestamp = serde_json::from_value(Value::String(
        created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    ))
    .ok();
    let status: ImageBasedGroupUpgradeStatus = serde_json::from_value(status).unwrap_or_default();
    object.status = (status != ImageBasedGroupUpgradeStatus::default()).then_some(status);
    Ok(RolloutRow {
        id: r.try_get("id").map_err(db)?,
        object,
        phase: r.try_get("phase").map_err(db)?,
        started_at: r.try_get("started_at").map_err(db)?,
    })
}

const ROLLOUT_COLUMNS: &str = "id, uid, namespace, name, generation, labels, annotations, spec, status, phase, created_at, started_at";

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
    .bind(serde_json::to_value(&obj.spec).map_err(|e| Error::Config(e.to_string()))?)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
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
    .await
    .map_err(db)?;
    row.as_ref().map(rollout_from_row).transpose()
}

pub async fn rollout_list(pool: &PgPool) -> Result<Vec<RolloutRow>, Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY namespace, name"
    )))
    .fetch_all(pool)
    .await
    .map_err(db)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(with_cluster_states(pool, rollout_from_row(r)?).await?);
    }
    Ok(out)
}

/// Fills `status.clusters` from the progress rows: the engine stores the status without it.
async fn with_cluster_states(pool: &PgPool, mut row: RolloutRow) -> Result<RolloutRow, Error> {
    if let Some(status) = row.object.status.as_mut() {
        let mut conn = pool.acquire().await.map_err(db)?;
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
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE rollouts SET spec = $2, labels = $3, annotations = $4,
           generation = generation + CASE WHEN $5 THEN 1 ELSE 0 END,
           phase = CASE WHEN $5 THEN 'Progressing' ELSE phase END,
           completed_at = CASE WHEN $5 THEN NULL ELSE completed_at END, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(serde_json::to_value(&obj.spec).map_err(|e| Error::Config(e.to_string()))?)
    .bind(serde_json::to_value(obj.metadata.labels.clone().unwrap_or_default()).unwrap_or_default())
    .bind(
        serde_json::to_value(obj.metadata.annotations.clone().unwrap_or_default())
            .unwrap_or_default(),
    )
    .bind(spec_changed)
    .execute(pool)
    .await
    .map_err(db)?;
    Ok(())
}

pub async fn rollout_delete(pool: &PgPool, namespace: &str, name: &str) -> Result<bool, Error> {
    let r = sqlx::query("DELETE FROM rollouts WHERE namespace = $1 AND name = $2")
        .bind(namespace)
        .bind(name)
        .execute(pool)
        .await
        .map_err(db)?;
    Ok(r.rows_affected() == 1)
}

pub async fn rollout_active_ids(pool: &PgPool) -> Result<Vec<i64>, Error> {
    sqlx::query_scalar("SELECT id FROM rollouts WHERE phase <> 'Completed' ORDER BY id")
        .fetch_all(pool)
        .await
        .map_err(db)
}

/// What a pass finds when it asks for a rollout.
pub enum Held {
    /// Another hub holds the rollout's pass lock.
    Busy,
    /// The rollout is gone.
    Gone,
    /// The row, locked for this transaction, with its state version (see the migration that
    /// added it).
    Row(Box<RolloutRow>, i64),
}

/// Takes the rollout's pass lock for this transaction and, when it is free, locks and reads
/// the row with its state version: one round trip for what a pass needs first. A lock held
/// by another hub leaves the row alone (it is not even read, let alone waited for).
pub async fn rollout_hold_in_txn(conn: &mut PgConnection, id: i64) -> Result<Held, Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH pass_lock AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(1717658484, $1::int4) AS held)
         SELECT pass_lock.held, r.* FROM pass_lock LEFT JOIN LATERAL
           (SELECT {ROLLOUT_COLUMNS}, state_version FROM rollouts WHERE id = $2 AND pass_lock.held FOR UPDATE) r ON true"
    )))
    .bind(id as i32)
    .bind(id)
    .fetch_one(conn)
    .await
    .map_err(db)?;
    if !row.try_get::<bool, _>("held").map_err(db)? {
        return Ok(Held::Busy);
    }
    match row.try_get::<Option<i64>, _>("state_version").map_err(db)? {
        None => Ok(Held::Gone),
        Some(version) => Ok(Held::Row(Box::new(rollout_from_row(&row)?), version)),
    }
}

fn parse_action(s: &str) -> Result<Action, Error> {
    s.parse().map_err(Error::Config)
}

fn parse_phase(s: &str) -> ClusterPhase {
    match s {
        "running" => ClusterPhase::Running,
        "completed" => ClusterPhase::Completed,
        "failed" => ClusterPhase::Failed,
        _ => ClusterPhase::Pending,
    }
}

fn phase_str(p: ClusterPhase) -> &'static str {
    match p {
        ClusterPhase::Pending => "pending",
        ClusterPhase::Running => "running",
        ClusterPhase::Completed => "completed",
        ClusterPhase::Failed => "failed",
    }
}

pub async fn rollout_steps_in_txn(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Vec<StepState>, Error> {
    let rows = sqlx::query(
        "SELECT step, actions, clusters, max_concurrency, timeout_minutes, current_batch, batch_started_at,
                started_at, completed_at, timed_out
         FROM rollout_steps WHERE rollout_id = $1 ORDER BY step",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let mut steps = Vec::with_capacity(rows.len());
    for r in rows {
        let actions: Vec<String> = r.try_get("actions").map_err(db)?;
        let started_at: DateTime<Utc> = r.try_get("started_at").map_err(db)?;
        steps.push(StepState {
            step: r.try_get::<i32, _>("step").map_err(db)? as usize,
            actions: actions
                .iter()
                .map(|a| parse_action(a))
                .collect::<Result<_, _>>()?,
            clusters: r.try_get("clusters").map_err(db)?,
            max_concurrency: r.try_get::<i32, _>("max_concurrency").map_err(db)? as usize,
            timeout_minutes: r.try_get::<i32, _>("timeout_minutes").map_err(db)? as i64,
            started_at,
            current_batch: r.try_get::<i32, _>("current_batch").map_err(db)? as usize,
            batch_started_at: r
                .try_get::<Option<DateTime<Utc>>, _>("batch_started_at")
                .map_err(db)?
                .unwrap_or(started_at),
            completed_at: r.try_get("completed_at").map_err(db)?,
            timed_out: r.try_get("timed_out").map_err(db)?,
            progress: BTreeMap::new(),
            journal: Default::default(),
        });
    }
    let rows = sqlx::query(
        "SELECT step, cluster, batch, state, action_index, completed_actions, failed_action, failure_message,
                timed_out, pushed_stage, pushed_at, push_attempts, refused, started_at, action_started_at, finished_at
         FROM rollout_clusters WHERE rollout_id = $1",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    for r in rows {
        let step: i32 = r.try_get("step").map_err(db)?;
        let completed: Vec<String> = r.try_get("completed_actions").map_err(db)?;
        let failed_action: Option<String> = r.try_get("failed_action").map_err(db)?;
        let pushed_stage: Option<String> = r.try_get("pushed_stage").map_err(db)?;
        let progress = ClusterProgress {
            batch: r.try_get::<i32, _>("batch").map_err(db)? as usize,
            phase: parse_phase(r.try_get::<String, _>("state").map_err(db)?.as_str()),
            action_index: r.try_get::<i32, _>("action_index").map_err(db)? as usize,
            completed: completed
                .iter()
                .map(|a| parse_action(a))
                .collect::<Result<_, _>>()?,
            failed: match failed_action {
                Some(a) => Some((
                    parse_action(&a)?,
                    r.try_get::<Option<String>, _>("failure_message")
                        .map_err(db)?
                        .unwrap_or_default(),
                )),
                None => None,
            },
            timed_out: r.try_get("timed_out").map_err(db)?,
            pushed_stage: pushed_stage
                .and_then(|s| serde_json::from_value::<Stage>(Value::String(s)).ok()),
            pushed_at: r.try_get("pushed_at").map_err(db)?,
            push_failures: r.try_get::<i32, _>("push_attempts").map_err(db)? as u32,
            refused: r.try_get("refused").map_err(db)?,
            started_at: r.try_get("started_at").map_err(db)?,
            action_started_at: r.try_get("action_started_at").map_err(db)?,
            finished_at: r.try_get("finished_at").map_err(db)?,
        };
        let cluster: String = r.try_get("cluster").map_err(db)?;
        if let Some(s) = steps.get_mut(step as usize) {
            s.progress.insert(cluster, progress);
        }
    }
    Ok(steps)
}

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
    }
    .map_err(db)?;
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
type FleetRow = (
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

/// Writes what changed of the steps: heads that differ from `before` (the heads of the
/// steps as stored), steps that are new, and the progress entries each step's journal says
/// changed (all of a new step's). Answers whether anything was written (the rollout's state
/// version is then to move on: [`rollout_save_pass_in_txn`]).
pub async fn rollout_save_steps_in_txn(
    conn: &mut PgConnection,
    id: i64,
    before: &[StepHead],
    after: &[StepState],
) -> Result<bool, Error> {
    let mut wrote = false;
    for s in after {
        let old = before.get(s.step);
        if old != Some(&s.head()) {
            wrote = true;
            let actions: Vec<&str> = s.actions.iter().map(|a| a.as_str()).collect();
            sqlx::query(
                "INSERT INTO rollout_steps (rollout_id, step, actions, clusters, max_concurrency, timeout_minutes,
                   current_batch, batch_started_at, started_at, completed_at, timed_out)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (rollout_id, step) DO UPDATE SET current_batch = EXCLUDED.current_batch,
                   batch_started_at = EXCLUDED.batch_started_at, completed_at = EXCLUDED.completed_at,
                   timed_out = EXCLUDED.timed_out",
            )
            .bind(id)
            .bind(s.step as i32)
            .bind(&actions)
            .bind(&s.clusters)
            .bind(s.max_concurrency as i32)
            .bind(s.timeout_minutes as i32)
            .bind(s.current_batch as i32)
            .bind(s.batch_started_at)
            .bind(s.started_at)
            .bind(s.completed_at)
            .bind(s.timed_out)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        }
        let changed = match old {
            Some(_) => s.journal_changes(),
            None => s.progress.iter().collect(),
        };
        if changed.is_empty() {
            continue;
        }
        wrote = true;
        progress_upsert(&mut *conn, id, s, &changed).await?;
    }
    Ok(wrote)
}

/// One statement for all changed rows of a step (the engine writes in batches).
async fn progress_upsert(
    conn: &mut PgConnection,
    id: i64,
    s: &StepState,
    rows: &[(&String, &ClusterProgress)],
) -> Result<(), Error> {
    let mut clusters = Vec::new();
    let mut batch = Vec::new();
    let mut state = Vec::new();
    let mut action_index = Vec::new();
    let mut completed = Vec::new();
    let mut failed_action = Vec::new();
    let mut failure_message = Vec::new();
    let mut timed_out = Vec::new();
    let mut pushed_stage = Vec::new();
    let mut pushed_at = Vec::new();
    let mut attempts = Vec::new();
    let mut refused = Vec::new();
    let mut started = Vec::new();
    let mut action_started = Vec::new();
    let mut finished = Vec::new();
    for (c, p) in rows {
        clusters.push((*c).clone());
        batch.push(p.batch as i32);
        state.push(phase_str(p.phase).to_string());
        action_index.push(p.action_index as i32);
        completed.push(
            p.completed
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(","),
        );
        failed_action.push(p.failed.as_ref().map(|(a, _)| a.as_str().to_string()));
        failure_message.push(p.failed.as_ref().map(|(_, m)| m.clone()));
        timed_out.push(p.timed_out);
        pushed_stage.push(p.pushed_stage.map(|s| s.as_str().to_string()));
        pushed_at.push(p.pushed_at);
        attempts.push(p.push_failures as i32);
        refused.push(p.refused.clone());
        started.push(p.started_at);
        action_started.push(p.action_started_at);
        finished.push(p.finished_at);
    }
    sqlx::query(
        "INSERT INTO rollout_clusters (rollout_id, step, cluster, batch, state, action_index, completed_actions,
           failed_action, failure_message, timed_out, pushed_stage, pushed_at, push_attempts, refused,
           started_at, action_started_at, finished_at)
         SELECT $1, $2, u.cluster, u.batch, u.state, u.action_index,
           CASE WHEN u.completed = '' THEN '{}'::text[] ELSE string_to_array(u.completed, ',') END,
           u.failed_action, u.failure_message, u.timed_out, u.pushed_stage, u.pushed_at, u.attempts, u.refused,
           u.started, u.action_started, u.finished
         FROM UNNEST($3::text[], $4::int4[], $5::text[], $6::int4[], $7::text[], $8::text[], $9::text[],
                     $10::bool[], $11::text[], $12::timestamptz[], $13::int4[], $14::text[],
                     $15::timestamptz[], $16::timestamptz[], $17::timestamptz[])
           AS u(cluster, batch, state, action_index, completed, failed_action, failure_message, timed_out,
                pushed_stage, pushed_at, attempts, refused, started, action_started, finished)
         ON CONFLICT (rollout_id, step, cluster) DO UPDATE SET batch = EXCLUDED.batch, state = EXCLUDED.state,
           action_index = EXCLUDED.action_index, completed_actions = EXCLUDED.completed_actions,
           failed_action = EXCLUDED.failed_action, failure_message = EXCLUDED.failure_message,
           timed_out = EXCLUDED.timed_out, pushed_stage = EXCLUDED.pushed_stage, pushed_at = EXCLUDED.pushed_at,
           push_attempts = EXCLUDED.push_attempts, refused = EXCLUDED.refused, started_at = EXCLUDED.started_at,
           action_started_at = EXCLUDED.action_started_at, finished_at = EXCLUDED.finished_at",
    )
    .bind(id)
    .bind(s.step as i32)
    .bind(&clusters)
    .bind(&batch)
    .bind(&state)
    .bind(&action_index)
    .bind(&completed)
    .bind(&failed_action)
    .bind(&failure_message)
    .bind(&timed_out)
    .bind(&pushed_stage)
    .bind(&pushed_at)
    .bind(&attempts)
    .bind(&refused)
    .bind(&started)
    .bind(&action_started)
    .bind(&finished)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Applies the planner's label changes: removals first, then additions that never
/// overwrite a label already there. Changes, not whole label sets: a label someone else
/// sets meanwhile stays.
pub async fn cluster_labels_change_in_txn(
    conn: &mut PgConnection,
    changes: &BTreeMap<String, LabelChange>,
) -> Result<(), Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let names: Vec<&String> = changes.keys().collect();
    let adds: Vec<Value> = changes
        .values()
        .map(|c| Value::Object(c.add.iter().map(|k| (k.clone(), Value::from(""))).collect()))
        .collect();
    let removes: Vec<Value> = changes
        .values()
        .map(|c| Value::from_iter(c.remove.iter().cloned()))
        .collect();
    sqlx::query(
        "UPDATE clusters c SET labels = u.add || (c.labels - ARRAY(SELECT jsonb_array_elements_text(u.remove)))
         FROM UNNEST($1::text[], $2::jsonb[], $3::jsonb[]) AS u(name, add, remove) WHERE c.name = u.name",
    )
    .bind(&names)
    .bind(&adds)
    .bind(&removes)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

pub async fn history_insert_in_txn(
    conn: &mut PgConnection,
    rollout: &RolloutRow,
    now: DateTime<Utc>,
    events: &[Event],
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
        "INSERT INTO history (rollout_id, rollout_namespace, rollout_name, time, cluster, step, action, event, message)
         SELECT $1, $2, $3, $4, u.cluster, u.step, u.action, u.event, u.message
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
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// A rollout's status as a pass leaves it.
pub struct PassStatus<'a> {
    pub status: &'a ImageBasedGroupUpgradeStatus,
    pub phase: &'a str,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
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
    let (value, phase, started_at, completed_at) = match &status {
        Some(s) => (
            Some(serde_json::to_value(s.status).map_err(|e| Error::Config(e.to_string()))?),
            Some(s.phase),
            s.started_at,
            s.completed_at,
        ),
        None => (None, None, None, None),
    };
    // Without a status ($3 and $4 null) the status columns keep what they hold.
    sqlx::query_scalar(
        "UPDATE rollouts SET state_version = state_version + $2,
           status = COALESCE($3, status), phase = COALESCE($4, phase),
           started_at = CASE WHEN $4 IS NULL THEN started_at ELSE $5 END,
           completed_at = CASE WHEN $4 IS NULL THEN completed_at ELSE $6 END,
           updated_at = CASE WHEN $4 IS NULL THEN updated_at ELSE now() END
         WHERE id = $1 RETURNING state_version",
    )
    .bind(id)
    .bind(i64::from(steps_changed))
    .bind(value)
    .bind(phase)
    .bind(started_at)
    .bind(completed_at)
    .fetch_one(conn)
    .await
    .map_err(db)
}

#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct HistoryEntry {
    pub time: DateTime<Utc>,
    pub cluster: Option<String>,
    pub step: Option<i32>,
    pub action: Option<String>,
    pub event: String,
    pub message: String,
}

pub async fn history_list(
    pool: &PgPool,
    rollout_id: i64,
    cluster: Option<&str>,
) -> Result<Vec<HistoryEntry>, Error> {
    let rows = sqlx::query(
        "SELECT time, cluster, step, action, event, message FROM history
         WHERE rollout_id = $1 AND ($2::text IS NULL OR cluster = $2) ORDER BY id",
    )
    .bind(rollout_id)
    .bind(cluster)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|r| {
            Ok(HistoryEntry {
                time: r.try_get("time").map_err(db)?,
                cluster: r.try_get("cluster").map_err(db)?,
                step: r.try_get("step").map_err(db)?,
                action: r.try_get("action").map_err(db)?,
                event: r.try_get("event").map_err(db)?,
                message: r.try_get("message").map_err(db)?,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Metrics

/// What the fleet gauges of `/metrics` show, in a few grouped queries (no per-cluster rows
/// leave the database).
pub async fn metrics_snapshot(pool: &PgPool) -> Result<FleetSnapshot, Error> {
    let mut snap = FleetSnapshot::default();
    for r in sqlx::query("SELECT phase, count(*) AS n FROM rollouts GROUP BY phase")
        .fetch_all(pool)
        .await
        .map_err(db)?
    {
        snap.rollouts
            .insert(r.try_get("phase").map_err(db)?, r.try_get("n").map_err(db)?);
    }
    let rows = sqlx::query(
        "SELECT r.namespace, r.name, s.step, s.actions, s.current_batch, s.completed_at,
                cardinality(s.clusters) AS members, s.max_concurrency,
                rc.completed_actions, rc.action_index, rc.state, rc.timed_out, count(*) AS n
         FROM rollouts r
         JOIN rollout_steps s ON s.rollout_id = r.id
         JOIN rollout_clusters rc ON rc.rollout_id = s.rollout_id AND rc.step = s.step
         WHERE r.phase <> 'Completed'
         GROUP BY r.namespace, r.name, s.step, s.actions, s.current_batch, s.completed_at,
                  cardinality(s.clusters), s.max_concurrency,
                  rc.completed_actions, rc.action_index, rc.state, rc.timed_out
         ORDER BY r.namespace, r.name, s.step",
    )
    .fetch_all(pool)
    .await
    .map_err(db)?;
    for r in rows {
        let group = ProgressGroup {
            actions: r.try_get("actions").map_err(db)?,
            completed: r.try_get("completed_actions").map_err(db)?,
            action_index: r.try_get::<i32, _>("action_index").map_err(db)?.max(0) as usize,
            state: r.try_get("state").map_err(db)?,
            timed_out: r.try_get("timed_out").map_err(db)?,
            count: r.try_get("n").map_err(db)?,
        };
        group.add_action_states(&mut snap.cluster_actions);
        let namespace: String = r.try_get("namespace").map_err(db)?;
        let rollout: String = r.try_get("name").map_err(db)?;
        let step = i64::from(r.try_get::<i32, _>("step").map_err(db)?);
        let same = snap
            .steps
            .last()
            .is_some_and(|s| s.namespace == namespace && s.rollout == rollout && s.step == step);
        if !same {
            let members = i64::from(r.try_get::<i32, _>("members").map_err(db)?);
            let max = i64::from(r.try_get::<i32, _>("max_concurrency").map_err(db)?).max(1);
            let batches = (members + max - 1) / max;
            let done: Option<DateTime<Utc>> = r.try_get("completed_at").map_err(db)?;
            let current = i64::from(r.try_get::<i32, _>("current_batch").map_err(db)?);
            snap.steps.push(StepSnapshot {
                namespace,
                rollout,
                step,
                clusters: BTreeMap::new(),
                batch: if done.is_some() { batches } else { current + 1 },
                batches,
            });
        }
        if let Some(s) = snap.steps.last_mut() {
            *s.clusters.entry(group.cluster_state()).or_insert(0) += group.count;
        }
    }
    snap.registered = sqlx::query_scalar("SELECT count(*) FROM clusters")
        .fetch_one(pool)
        .await
        .map_err(db)?;
    // The hub's only sign of an unreachable spoke: its last push failed (a push that works
    // resets the attempts).
    snap.unreachable = sqlx::query_scalar(
        "SELECT count(DISTINCT rc.cluster) FROM rollout_clusters rc
         JOIN rollouts r ON r.id = rc.rollout_id
         WHERE r.phase <> 'Completed' AND rc.state = 'running' AND rc.push_attempts > 0",
    )
    .fetch_one(pool)
    .await
    .map_err(db)?;
    Ok(snap)
}

// ---------------------------------------------------------------------------------------
// Kubernetes mode

/// Every cluster's labels and endpoint, to compare with the ManagedClusters.
pub async fn cluster_labels_all(
    pool: &PgPool,
) -> Result<HashMap<String, (BTreeMap<String, String>, String)>, Error> {
    let rows = sqlx::query("SELECT name, labels, endpoint FROM clusters")
        .fetch_all(pool)
        .await
        .map_err(db)?;
    rows.iter()
        .map(|r| {
            let labels: Value = r.try_get("labels").map_err(db)?;
            Ok((
                r.try_get("name").map_err(db)?,
                (
                    serde_json::from_value(labels).unwrap_or_default(),
                    r.try_get("endpoint").map_err(db)?,
                ),
            ))
        })
        .collect()
}

/// Clusters known from ManagedClusters: their labels replace the stored ones except the
/// hub's `lcm.openshift.io/ibgu-*` labels, which are kept as they are in the row at that
/// moment (the engine may be writing them); an empty endpoint keeps the stored one. A new
/// cluster has no credential until its agent registers.
pub async fn cluster_sync_from_kube(
    pool: &PgPool,
    clusters: &[(String, BTreeMap<String, String>, String)],
) -> Result<(), Error> {
    if clusters.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = clusters.iter().map(|c| c.0.as_str()).collect();
    let labels: Vec<Value> = clusters
        .iter()
        .map(|c| {
            let own: BTreeMap<&String, &String> =
                c.1.iter()
                    .filter(|(k, _)| !fleet_types::labels::is_ibgu_label(k))
                    .collect();
            serde_json::to_value(own).unwrap_or_default()
        })
        .collect();
    let endpoints: Vec<&str> = clusters.iter().map(|c| c.2.as_str()).collect();
    sqlx::query(
        "INSERT INTO clusters (name, labels, endpoint, credential_hash)
         SELECT u.name, u.labels, u.endpoint, '' FROM UNNEST($1::text[], $2::jsonb[], $3::text[])
           AS u(name, labels, endpoint)
         ON CONFLICT (name) DO UPDATE SET
           labels = EXCLUDED.labels || (SELECT COALESCE(jsonb_object_agg(key, value), '{}'::jsonb)
                                        FROM jsonb_each(clusters.labels)
                                        WHERE key LIKE 'lcm.openshift.io/ibgu-%'),
           endpoint = CASE WHEN EXCLUDED.endpoint = '' THEN clusters.endpoint ELSE EXCLUDED.endpoint END",
    )
    .bind(&names)
    .bind(&labels)
    .bind(&endpoints)
    .execute(pool)
    .await
    .map_err(db)?;
    Ok(())
}

/// A history row for Kubernetes Events.
pub struct HistoryEvent {
    pub id: i64,
    pub namespace: String,
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
    let rows = sqlx::query(
        "SELECT id, rollout_namespace, rollout_name, cluster, event, message FROM history
         WHERE id > $1 AND event = ANY($2) ORDER BY id LIMIT $3",
    )
    .bind(after)
    .bind(events)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|r| {
            Ok(HistoryEvent {
                id: r.try_get("id").map_err(db)?,
                namespace: r.try_get("rollout_namespace").map_err(db)?,
                rollout: r.try_get("rollout_name").map_err(db)?,
                cluster: r.try_get("cluster").map_err(db)?,
                event: r.try_get("event").map_err(db)?,
                message: r.try_get("message").map_err(db)?,
            })
        })
        .collect()
}

/// The newest history id (0 when empty).
pub async fn history_last_id(pool: &PgPool) -> Result<i64, Error> {
    sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM history")
        .fetch_one(pool)
        .await
        .map_err(db)
}
