//! ConfigMaps that rollouts name in `oadpContent` and `extraManifests`.

use super::*;

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
            .await?;
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
    .bind(serde_json::to_value(data).map_err(|e| Error::internal("encoding", e))?)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn configmap_delete(pool: &PgPool, namespace: &str, name: &str) -> Result<bool, Error> {
    let r = sqlx::query("DELETE FROM configmaps WHERE namespace = $1 AND name = $2")
        .bind(namespace)
        .bind(name)
        .execute(pool)
        .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn configmap_names(pool: &PgPool) -> Result<Vec<(String, String)>, Error> {
    Ok(sqlx::query_as("SELECT namespace, name FROM configmaps")
        .fetch_all(pool)
        .await?)
}
