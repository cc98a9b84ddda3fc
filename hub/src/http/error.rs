//! Errors as HTTP: a Kubernetes `Status` body with the contract's reason and code. Internal
//! details are logged, never returned.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleet_types::{Reason, Status};

use crate::error::Error;

#[derive(Debug)]
pub struct ApiError(pub Box<Status>);

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        ApiError(Box::new(s))
    }
}

impl ApiError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        ApiError(Box::new(Status::failure(reason, message)))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.0.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, Json(*self.0)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Config(msg) => ApiError::new(Reason::BadRequest, msg),
            Error::Database(ref e) if is_pool_exhausted(e) => {
                tracing::warn!(error = %err, "database busy");
                ApiError::new(Reason::ServiceUnavailable, "database busy, try again")
            }
            other => {
                tracing::error!(error = %other, "internal error");
                ApiError::new(Reason::InternalError, "internal error; see the hub's log")
            }
        }
    }
}

fn is_pool_exhausted(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)
}
