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
    audit_insert_all(pool, std::slice::from_ref(e)).await
}

/// Writes these entries with one statement (in the caller's transaction, given one).
pub async fn audit_insert_all<'c>(
    db: impl sqlx::PgExecutor<'c>,
    entries: &[AuditEntry],
) -> Result<(), Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let text = |f: fn(&AuditEntry) -> &str| -> Vec<&str> { entries.iter().map(f).collect() };
    let maybe = |f: fn(&AuditEntry) -> Option<&str>| -> Vec<Option<&str>> {
        entries.iter().map(f).collect()
    };
    // An array of arrays would have to be rectangular: each entry's groups go as JSON.
    let groups: Vec<String> = entries
        .iter()
        .map(|e| serde_json::to_string(&e.groups).unwrap_or_else(|_| "[]".into()))
        .collect();
    sqlx::query(
        "INSERT INTO audit (time, actor, groups, source, request_id, verb, resource, namespace, name, code, message)
         SELECT u.time, u.actor, ARRAY(SELECT jsonb_array_elements_text(u.groups::jsonb)), u.source, u.request_id,
                u.verb, u.resource, u.namespace, u.name, u.code, u.message
         FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::text[], $10::int4[], $11::text[])
           AS u(time, actor, groups, source, request_id, verb, resource, namespace, name, code, message)",
    )
    .bind(entries.iter().map(|e| e.time).collect::<Vec<_>>())
    .bind(text(|e| &e.actor))
    .bind(groups)
    .bind(maybe(|e| e.source.as_deref()))
    .bind(maybe(|e| e.request_id.as_deref()))
    .bind(text(|e| &e.verb))
    .bind(text(|e| &e.resource))
    .bind(maybe(|e| e.namespace.as_deref()))
    .bind(maybe(|e| e.name.as_deref()))
    .bind(entries.iter().map(|e| e.code).collect::<Vec<_>>())
    .bind(text(|e| &e.message))
    .execute(db)
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
