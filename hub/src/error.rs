//! The hub's one error type, named by what went wrong for whoever asked, not by the library
//! that noticed. It is turned into an answer once per edge: a `Status` and its HTTP code in
//! `http::error`, an exit code in `main`, a bounded label in the metrics.

use std::fmt::Display;

use crate::embedded_pg::EmbeddedError;
use crate::shutdown::Signal;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The input, or the hub's own configuration, is wrong; the message says what.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (a name taken, a cluster in a rollout).
    #[error("{0}")]
    Conflict(String),
    /// Something the hub needs (its database above all) is down, busy or unreachable: the
    /// same request may well succeed a little later.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of the hub itself; the details are logged, not shown to callers.
    #[error("{0}")]
    Internal(String),
    /// A signal asked the process to stop before its work was done.
    #[error("stopped by {}", .0.name())]
    Interrupted(Signal),
}

impl Error {
    /// The error's kind as a bounded metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
            Error::Interrupted(_) => "interrupted",
        }
    }

    /// A fault of the hub while doing `what`.
    pub fn internal(what: &str, err: impl Display) -> Error {
        Error::Internal(format!("{what}: {err}"))
    }

    /// Something needed while doing `what` is not there (a port taken, a peer down).
    pub fn unavailable(what: &str, err: impl Display) -> Error {
        Error::Unavailable(format!("{what}: {err}"))
    }
}

/// Losing the database (connection refused or dropped, the server shutting down, no
/// connection free in time) is worth a retry; anything else it says is the hub's fault.
impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        if database_unavailable(&err) {
            Error::unavailable("database unavailable", err)
        } else {
            Error::internal("database", err)
        }
    }
}

fn database_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        // SQLSTATE class 08 (connection exception), 57P0x (the server shutting down or
        // restarting: admin_shutdown, crash_shutdown, cannot_connect_now), 53300
        // (too_many_connections).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P0") || c == "53300"),
        _ => false,
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Execute(e) => Error::from(e),
            other => Error::internal("database migrations", other),
        }
    }
}

impl From<prometheus::Error> for Error {
    fn from(err: prometheus::Error) -> Self {
        Error::internal("metrics", err)
    }
}

/// What the operator must change is `Invalid` (a missing program, an unusable directory);
/// a server that would not start or answer is `Unavailable`.
impl From<EmbeddedError> for Error {
    fn from(err: EmbeddedError) -> Self {
        match err {
            EmbeddedError::BinariesMissing
            | EmbeddedError::NoPostgresUser
            | EmbeddedError::Unreachable { .. }
            | EmbeddedError::NotADataDir(_) => Error::Invalid(err.to_string()),
            EmbeddedError::Io { .. }
            | EmbeddedError::Command { .. }
            | EmbeddedError::Connect(_) => Error::Unavailable(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_database_is_unavailable_other_database_errors_internal() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(
            matches!(Error::from(refused), Error::Unavailable(m) if m.starts_with("database unavailable: "))
        );
        assert!(matches!(
            Error::from(sqlx::Error::PoolTimedOut),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            Error::from(sqlx::Error::RowNotFound),
            Error::Internal(_)
        ));
        assert_eq!(
            Error::Unavailable(String::new()).metric_label(),
            "unavailable"
        );
        assert_eq!(
            Error::from(EmbeddedError::BinariesMissing).metric_label(),
            "invalid"
        );
    }
}
