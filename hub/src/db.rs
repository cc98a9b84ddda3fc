//! The database: where it is (a URL or the embedded instance), the pool, the migrations and
//! the readiness check.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::embedded_pg::EmbeddedPostgres;
use crate::error::Error;

/// The schema, embedded at build time from `migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Connections per hub process. The engine writes in batches, so a handful is enough; the
/// rest is headroom for API reads.
const POOL_SIZE: u32 = 16;
/// A request that cannot get a connection in this time fails with 503 instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The database the hub runs on, and the private server behind it when there is one.
pub struct Database {
    pub pool: PgPool,
    pub url: String,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `url`, or starts the embedded instance under `data_dir` when there is no
    /// URL; then applies the migrations.
    pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Self, Error> {
        let (options, url, embedded) = match url {
            Some(url) => {
                let options = PgConnectOptions::from_str(url).map_err(|e| {
                    Error::Invalid(format!("--database-url is not a Postgres URL: {e}"))
                })?;
                (options, redact(url), None)
            }
            None => {
                let pg = EmbeddedPostgres::start(data_dir).await?;
                (pg.connect_options(), pg.url(), Some(pg))
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(custom_plans(options))
            .await?;
        migrate(&pool).await?;
        Ok(Database {
            pool,
            url,
            embedded,
        })
    }

    /// Whether the database is the embedded instance.
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Closes the pool and stops the embedded server if this process started it.
    pub async fn close(self) -> Result<(), Error> {
        self.pool.close().await;
        if let Some(pg) = self.embedded {
            pg.stop().await?;
        }
        Ok(())
    }
}

/// Every statement planned for the values it is run with, never from a plan cached for the
/// connection: the hub's statements take their clusters as arrays, and a generic plan made
/// while the fleet was still registering (a few hundred rows) kept scanning the whole
/// `clusters` table for each group of reports once it held 100,000 (Postgres's CPU doubled
/// in such runs). Planning these statements costs far less than running them. A
/// `plan_cache_mode` given in the URL's `options` is left as it is.
pub fn custom_plans(options: PgConnectOptions) -> PgConnectOptions {
    if options
        .get_options()
        .is_some_and(|o| o.contains("plan_cache_mode"))
    {
        return options;
    }
    options.options([("plan_cache_mode", "force_custom_plan")])
}

/// Applies every migration not yet applied. Safe to run from several hubs at once: sqlx
/// serializes them with an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    Ok(MIGRATOR.run(pool).await?)
}

/// Ready means: the database answers, and every migration this build knows is applied.
pub async fn check_ready(pool: &PgPool) -> Result<(), String> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .map_err(|e| format!("database not reachable or not migrated: {e}"))?;
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| format!("{} {}", m.version, m.description))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("migrations not applied: {}", missing.join(", ")))
    }
}

/// A URL fit for logs: the password, if any, is replaced.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://fleet:s3cret@db:5432/fleet"),
            "postgres://fleet:***@db:5432/fleet"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(redact("not a url"), "not a url");
    }
}
