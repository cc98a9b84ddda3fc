//! The hub's secret key and the per-cluster credentials derived from it: the hub keeps
//! only their hashes and re-derives a credential when it pushes to a spoke.

use super::*;

/// The key of each database this process talks to, read once: it never changes after it
/// is created, and every registration and push round needs it.
pub(super) static HUB_KEYS: std::sync::Mutex<BTreeMap<String, Vec<u8>>> =
    std::sync::Mutex::new(BTreeMap::new());

pub(super) fn database_identity(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "{}:{}:{:?}/{}",
        o.get_host(),
        o.get_port(),
        o.get_socket(),
        o.get_database().unwrap_or_default()
    )
}

pub(super) async fn hub_key(pool: &PgPool) -> Result<Vec<u8>, Error> {
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

pub(super) async fn hub_key_load(pool: &PgPool) -> Result<Vec<u8>, Error> {
    let fresh: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
        .iter()
        .flat_map(|u| u.as_bytes().to_vec())
        .collect();
    sqlx::query("INSERT INTO hub_secret (id, key) VALUES (true, $1) ON CONFLICT (id) DO NOTHING")
        .bind(&fresh)
        .execute(pool)
        .await?;
    sqlx::query_scalar("SELECT key FROM hub_secret WHERE id")
        .fetch_one(pool)
        .await
        .map_err(Error::from)
}

pub(super) fn derive(key: &[u8], cluster: &str, nonce: &str) -> String {
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

/// The credential hash each cluster last showed that matched its row, and its expiry, by
/// database and cluster: a report's credential is checked before its body is read, without
/// a query for every report. Only a first check: the statement that stores the report checks
/// the credential again (a cluster that registered again meanwhile has another).
#[allow(clippy::type_complexity)]
static KNOWN_CREDENTIALS: std::sync::Mutex<
    BTreeMap<(String, String), (String, Option<DateTime<Utc>>)>,
> = std::sync::Mutex::new(BTreeMap::new());

/// Notes the credential a cluster was just given.
pub(super) fn remember_credential(
    pool: &PgPool,
    name: &str,
    credential: &str,
    expires_at: Option<DateTime<Utc>>,
) {
    KNOWN_CREDENTIALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            (database_identity(pool), name.to_string()),
            (hash(credential), expires_at),
        );
}

/// What a presented credential is worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialCheck {
    /// The cluster's, and valid.
    Valid,
    /// The cluster's, but expired at that time: the agent must register again.
    Expired(DateTime<Utc>),
    /// Not the cluster's (or no such cluster).
    Unknown,
}

/// What `credential` is worth for cluster `name` at `now`.
pub async fn cluster_credential_check(
    pool: &PgPool,
    name: &str,
    credential: &str,
    now: DateTime<Utc>,
) -> Result<CredentialCheck, Error> {
    let verdict = |expires_at: Option<DateTime<Utc>>| match expires_at {
        Some(at) if at <= now => CredentialCheck::Expired(at),
        _ => CredentialCheck::Valid,
    };
    let presented = hash(credential);
    let key = (database_identity(pool), name.to_string());
    let known = KNOWN_CREDENTIALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .filter(|(h, _)| *h == presented)
        .map(|(_, expires_at)| *expires_at);
    if let Some(expires_at) = known {
        return Ok(verdict(expires_at));
    }
    let stored: Option<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT credential_hash, credential_expires_at FROM clusters WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    let Some((stored, expires_at)) = stored else {
        return Ok(CredentialCheck::Unknown);
    };
    if !fleet_types::http::tokens_match(&stored, &presented) {
        return Ok(CredentialCheck::Unknown);
    }
    KNOWN_CREDENTIALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, (presented, expires_at));
    Ok(verdict(expires_at))
}

/// The credential cluster `name` holds now, when it is registered and its credential has not
/// expired at `now`: what a spoke authenticated by its client certificate reports with.
pub async fn cluster_current_credential(
    pool: &PgPool,
    name: &str,
    now: DateTime<Utc>,
) -> Result<Option<String>, Error> {
    let key = hub_key(pool).await?;
    let nonce: Option<String> = sqlx::query_scalar(
        "SELECT credential_nonce FROM clusters WHERE name = $1
           AND (credential_expires_at IS NULL OR credential_expires_at > $2)",
    )
    .bind(name)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    Ok(nonce.map(|n| derive(&key, name, &n)))
}
