//! The hub's one error type, named by what went wrong for whoever asked, not by the library
//! that noticed. It is turned into an answer once per edge: a `Status` and its HTTP code in
//! `http::error`, an exit code in `main`, a bounded label in the metrics.

use std::fmt::Display;

use crate::shutdown::Signal;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The input, or the hub's own configuration, is wrong; the message says what.
    #[error("{0}")]
    Invalid(String),
    /// No credential, or one the hub does not know.
    #[error("{0}")]
    Unauthorized(String),
    /// A known caller that may not do this.
    #[error("{0}")]
    Forbidden(String),
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
    /// Every [`Error::metric_label`], for series that start at zero.
    pub const METRIC_LABELS: [&'static str; 8] = [
        "invalid",
        "unauthorized",
        "forbidden",
        "not_found",
        "conflict",
        "unavailable",
        "internal",
        "interrupted",
    ];

    /// The error's kind as a bounded metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
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
/// A value the database cannot hold (SQLSTATE class 22, data exception: a NUL byte in a
/// name, say) came from the request: it is the caller's to fix.
impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        if database_unavailable(&err) {
            Error::unavailable("database unavailable", err)
        } else if let sqlx::Error::Database(db) = &err
            && db.code().is_some_and(|c| c.starts_with("22"))
        {
            Error::Invalid(format!(
                "a value of the request cannot be stored: {}",
                db.message()
            ))
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

/// The Kubernetes API's answers by meaning: its own 4xx keep theirs; a server that is down,
/// overloaded or unreachable is worth a retry; anything else is the hub's fault.
impl From<kube::Error> for Error {
    fn from(err: kube::Error) -> Self {
        let message = format!("Kubernetes API: {err}");
        match &err {
            kube::Error::Api(status) => match status.code {
                400 | 422 => Error::Invalid(message),
                401 => Error::Unauthorized(message),
                403 => Error::Forbidden(message),
                404 | 410 => Error::NotFound(message),
                409 => Error::Conflict(message),
                429 | 500..=599 => Error::Unavailable(message),
                _ => Error::Internal(message),
            },
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => {
                Error::Unavailable(message)
            }
            _ => Error::Internal(message),
        }
    }
}

impl From<prometheus::Error> for Error {
    fn from(err: prometheus::Error) -> Self {
        Error::internal("metrics", err)
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
        for e in [
            Error::Invalid(String::new()),
            Error::Unavailable(String::new()),
            Error::Forbidden(String::new()),
        ] {
            assert!(Error::METRIC_LABELS.contains(&e.metric_label()));
        }
    }

    #[test]
    fn kubernetes_answers_keep_their_meaning() {
        let api = |code: u16| {
            Error::from(kube::Error::Api(Box::new(kube::core::Status {
                code,
                message: "m".into(),
                ..Default::default()
            })))
            .metric_label()
        };
        assert_eq!(api(404), "not_found");
        assert_eq!(api(409), "conflict");
        assert_eq!(api(422), "invalid");
        assert_eq!(api(403), "forbidden");
        assert_eq!(api(503), "unavailable");
        assert_eq!(api(418), "internal");
    }
}
