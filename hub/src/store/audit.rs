//! The audit trail: every change made through the API or a CR, by whom, from where.

use super::*;

/// One change, or one refused attempt at it.
#[derive(
    Clone, Debug, Default, PartialEq, serde::Serialize, schemars::JsonSchema, sqlx::FromRow,
)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub time: DateTime<Utc>,
    /// `admin`, `viewer`, `anonymous` (an open API), `join-token`, `cluster:<name>` (its
    /// credential), `kubernetes:<user>` or `controller` (an IBGU CR's change).
    pub actor: String,
    /// The Kubernetes groups of the actor, when known.
    pub groups: Vec<String>,
    /// The client's address, as the hub's listener saw it.
    pub source: Option<String>,
    pub request_id: Option<String>,
    /// `create`, `patch`, `delete`, `update`, `register`, `renew`.
    pub verb: String,
    /// `rollouts`, `clusters`, `credentials`, `configmaps`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The HTTP status of the answer (absent for a CR's change).
    pub code: Option<i32>,
    pub message: String,
}

pub async fn audit_insert(pool: &PgPool, e: &AuditEntry) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO audit (time, actor, groups, source, request_id, verb, resource, namespace, name, code, message)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(e.time)
    .bind(&e.actor)
    .bind(&e.groups)
    .bind(&e.source)
    .bind(&e.request_id)
    .bind(&e.verb)
    .bind(&e.resource)
    .bind(&e.namespace)
    .bind(&e.name)
    .bind(e.code)
    .bind(&e.message)
    .execute(pool)
    .await?;
    Ok(())
}

/// The entries from `since` on, oldest first, `limit` at most.
pub async fn audit_list(
    pool: &PgPool,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<AuditEntry>, Error> {
    let rows = sqlx::query_as(
        "SELECT time, actor, groups, source, request_id, verb, resource, namespace, name, code, message
         FROM audit WHERE $1::timestamptz IS NULL OR time >= $1 ORDER BY time, id LIMIT $2",
    )
    .bind(since)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}
