//! The hub's one error type. Variants say what went wrong in the hub's terms; the HTTP
//! mapping lives in `http::error` at the edge.

use crate::embedded_pg::EmbeddedError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    #[error("database migrations: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("stopped by {}", .0.name())]
    Interrupted(crate::shutdown::Signal),
}
