//! The inventory: registration, labels (the planner's changes, Kubernetes sync), deletion,
//! and how to reach each spoke.

use super::*;

#[derive(Clone, Debug, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub endpoint: String,
    /// The serving certificate the hub accepts from this spoke, when it pinned one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
    pub last_seen: Option<DateTime<Utc>>,
    pub ibu: Option<ImageBasedUpgrade>,
}

/// A credential the hub issued: what the agent presents, and until when.
#[derive(Clone, Debug, PartialEq)]
pub struct Issued {
    pub credential: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Registers (or re-registers) a spoke: announced labels are merged over the stored ones
/// (the hub's own `lcm.openshift.io/ibgu-*` labels stay). A new run of the agent (a new
/// agent id) gets a new credential, valid for `ttl` from `now`, and restarts the report
/// sequence; the same run registering again gets the same credential (while it has not
/// expired) and keeps its sequence, so a registration that reaches the hub late (its answer
/// lost to a client timeout, the retry already served) cannot replace the credential the
/// agent holds.
pub async fn cluster_register(pool: &PgPool, registering: &Registering) -> Result<Issued, Error> {
    let mut issued = cluster_register_group(pool, std::slice::from_ref(registering)).await?;
    issued
        .pop()
        .ok_or_else(|| Error::Internal("a registration gave no answer".into()))
}

/// One registration of a group: the request, when the hub took it, the credential's life,
/// and the audit trail's entry for it, written in the same transaction.
#[derive(Clone, Debug)]
pub struct Registering {
    pub request: RegisterRequest,
    pub now: DateTime<Utc>,
    pub ttl: chrono::Duration,
    pub audit: Option<AuditEntry>,
}

/// Registers a group in one transaction, as [`cluster_register`] does each (a name twice in
/// the group: the later registration is applied over the earlier), and answers each in
/// order. It fails whole: a value Postgres refuses in one fails them all (the caller tries
/// them one by one then).
pub async fn cluster_register_group(
    pool: &PgPool,
    group: &[Registering],
) -> Result<Vec<Issued>, Error> {
    let key = hub_key(pool).await?;
    // One statement may change a row once: a name's second registration goes in the next.
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, r) in group.iter().enumerate() {
        let round = seen.entry(r.request.name.as_str()).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(i);
        *round += 1;
    }
    let fresh: Vec<String> = group
        .iter()
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let now = group.iter().map(|r| r.now).max().unwrap_or_else(Utc::now);
    let mut given: Vec<Option<(String, Option<DateTime<Utc>>)>> = vec![None; group.len()];
    let mut tx = pool.begin().await?;
    // The same run, holding a credential still valid: it keeps it.
    const SAME: &str = "clusters.agent_id = EXCLUDED.agent_id AND EXCLUDED.agent_id <> ''
             AND (clusters.credential_expires_at IS NULL OR clusters.credential_expires_at > $9)";
    for round in &rounds {
        let column =
            |f: &dyn Fn(usize) -> String| -> Vec<String> { round.iter().map(|&i| f(i)).collect() };
        let request = |i: usize| &group[i].request;
        let labels =
            column(&|i| serde_json::to_string(&request(i).labels).unwrap_or_else(|_| "{}".into()));
        let pins: Vec<Option<&str>> = round
            .iter()
            .map(|&i| request(i).certificate_sha256.as_deref())
            .collect();
        let expires: Vec<DateTime<Utc>> =
            round.iter().map(|&i| group[i].now + group[i].ttl).collect();
        let rows: Vec<(String, String, Option<DateTime<Utc>>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO clusters (name, labels, endpoint, credential_hash, credential_nonce, agent_id, last_report_seq, last_seen, certificate_sha256, credential_expires_at)
             SELECT u.name, u.labels::jsonb, u.endpoint, u.hash, u.nonce, u.agent, 0, now(), u.pin, u.expires
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
               AS u(name, labels, endpoint, hash, nonce, agent, pin, expires)
             ON CONFLICT (name) DO UPDATE SET
               labels = clusters.labels || EXCLUDED.labels, endpoint = EXCLUDED.endpoint,
               certificate_sha256 = EXCLUDED.certificate_sha256,
               credential_hash = CASE WHEN {SAME} THEN clusters.credential_hash ELSE EXCLUDED.credential_hash END,
               credential_nonce = CASE WHEN {SAME} THEN clusters.credential_nonce ELSE EXCLUDED.credential_nonce END,
               credential_expires_at = CASE WHEN {SAME} THEN clusters.credential_expires_at ELSE EXCLUDED.credential_expires_at END,
               last_report_seq = CASE WHEN {SAME} THEN clusters.last_report_seq ELSE 0 END,
               agent_id = EXCLUDED.agent_id, last_seen = now()
             RETURNING name, credential_nonce, credential_expires_at"
        )))
        .bind(column(&|i| request(i).name.clone()))
        .bind(labels)
        .bind(column(&|i| request(i).endpoint.clone()))
        .bind(column(&|i| hash(&derive(&key, &request(i).name, &fresh[i]))))
        .bind(column(&|i| fresh[i].clone()))
        .bind(column(&|i| request(i).agent_id.clone()))
        .bind(pins)
        .bind(expires)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let by_name: HashMap<String, (String, Option<DateTime<Utc>>)> = rows
            .into_iter()
            .map(|(name, nonce, expires)| (name, (nonce, expires)))
            .collect();
        for &i in round {
            given[i] = by_name.get(&group[i].request.name).cloned();
        }
    }
    let entries: Vec<AuditEntry> = group.iter().filter_map(|r| r.audit.clone()).collect();
    audit_insert_all(&mut *tx, &entries).await?;
    tx.commit().await?;
    group
        .iter()
        .zip(given)
        .map(|(r, given)| {
            let (nonce, expires_at) = given.ok_or_else(|| {
                Error::Internal(format!("registering {}: no row", r.request.name))
            })?;
            let credential = derive(&key, &r.request.name, &nonce);
            super::credentials::remember_credential(pool, &r.request.name, &credential, expires_at);
            Ok(Issued {
                credential,
                expires_at,
            })
        })
        .collect()
}

/// Replaces a cluster's credential with a new one valid for `ttl` from `now`, when
/// `current` is its credential and has not expired (`None` otherwise). The report sequence
/// and everything else stay: the agent renews without a pause in reporting.
pub async fn cluster_renew_credential(
    pool: &PgPool,
    name: &str,
    current: &str,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Result<Option<Issued>, Error> {
    let key = hub_key(pool).await?;
    let fresh = uuid::Uuid::new_v4().simple().to_string();
    let expires_at: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
        "UPDATE clusters SET credential_hash = $3, credential_nonce = $4, credential_expires_at = $5
         WHERE name = $1 AND credential_hash = $2
           AND (credential_expires_at IS NULL OR credential_expires_at > $6)
         RETURNING credential_expires_at",
    )
    .bind(name)
    .bind(hash(current))
    .bind(hash(&derive(&key, name, &fresh)))
    .bind(&fresh)
    .bind(now + ttl)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    let Some(expires_at) = expires_at else {
        return Ok(None);
    };
    let credential = derive(&key, name, &fresh);
    super::credentials::remember_credential(pool, name, &credential, expires_at);
    Ok(Some(Issued {
        credential,
        expires_at,
    }))
}

/// The columns of a cluster that [`ClusterRecord`] shows.
#[derive(sqlx::FromRow)]
struct ClusterColumns {
    name: String,
    labels: Value,
    endpoint: String,
    certificate_sha256: Option<String>,
    last_seen: Option<DateTime<Utc>>,
    last_report: Option<Value>,
}

pub(super) fn cluster_from_row(r: &sqlx::postgres::PgRow) -> Result<ClusterRecord, Error> {
    let c = ClusterColumns::from_row(r)?;
    Ok(ClusterRecord {
        name: c.name,
        labels: serde_json::from_value(c.labels).unwrap_or_default(),
        endpoint: c.endpoint,
        certificate_sha256: c.certificate_sha256,
        last_seen: c.last_seen,
        ibu: c.last_report.and_then(|v| serde_json::from_value(v).ok()),
    })
}

/// Every cluster, in natural name order (`spoke2` before `spoke10`).
pub async fn cluster_list(pool: &PgPool) -> Result<Vec<ClusterRecord>, Error> {
    let rows = sqlx::query(
        "SELECT name, labels, endpoint, certificate_sha256, last_seen, last_report FROM clusters",
    )
    .fetch_all(pool)
    .await?;
    let mut list = rows
        .iter()
        .map(cluster_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    list.sort_by(|a, b| fleet_types::names::natural_cmp(&a.name, &b.name));
    Ok(list)
}

pub async fn cluster_fetch(pool: &PgPool, name: &str) -> Result<Option<ClusterRecord>, Error> {
    let row = sqlx::query(
        "SELECT name, labels, endpoint, certificate_sha256, last_seen, last_report FROM clusters WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(cluster_from_row).transpose()
}

/// Merges labels (a `null` value removes the label). Answers the updated cluster.
pub async fn cluster_patch_labels(
    pool: &PgPool,
    name: &str,
    patch: &serde_json::Map<String, Value>,
) -> Result<Option<ClusterRecord>, Error> {
    let mut tx = pool.begin().await?;
    let labels: Option<Value> =
        sqlx::query_scalar("SELECT labels FROM clusters WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(mut labels) = labels else {
        return Ok(None);
    };
    json_patch::merge(&mut labels, &Value::Object(patch.clone()));
    sqlx::query("UPDATE clusters SET labels = $2 WHERE name = $1")
        .bind(name)
        .bind(labels)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
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
    let mut tx = pool.begin().await?;
    // The row is locked first, so a registration or report of the cluster waits for the end.
    let exists: Option<String> =
        sqlx::query_scalar("SELECT name FROM clusters WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
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
    .await?;
    if !busy.is_empty() {
        return Ok(ClusterDeleted::InRollouts(busy));
    }
    sqlx::query("DELETE FROM clusters WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ClusterDeleted::Deleted)
}

/// Where and how the hub reaches a spoke.
pub struct SpokeAccess {
    pub endpoint: String,
    pub credential: String,
    /// The certificate the spoke registered, when it serves TLS.
    pub certificate_sha256: Option<String>,
}

pub async fn cluster_access(
    pool: &PgPool,
    names: &[String],
) -> Result<HashMap<String, SpokeAccess>, Error> {
    let key = hub_key(pool).await?;
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT name, endpoint, credential_nonce, certificate_sha256 FROM clusters WHERE name = ANY($1)",
    )
    .bind(names)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, endpoint, nonce, certificate_sha256)| {
            let credential = derive(&key, &name, &nonce);
            (
                name,
                SpokeAccess {
                    endpoint,
                    credential,
                    certificate_sha256,
                },
            )
        })
        .collect())
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
    ?;
    Ok(())
}

/// Every cluster's labels and endpoint, to compare with the ManagedClusters.
pub async fn cluster_labels_all(
    pool: &PgPool,
) -> Result<HashMap<String, (BTreeMap<String, String>, String)>, Error> {
    let rows: Vec<(String, Value, String)> =
        sqlx::query_as("SELECT name, labels, endpoint FROM clusters")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(name, labels, endpoint)| {
            let labels = serde_json::from_value(labels).unwrap_or_default();
            (name, (labels, endpoint))
        })
        .collect())
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
    ?;
    Ok(())
}
