//! Errors as HTTP: a Kubernetes `Status` body with the contract's reason and code. This is
//! the one place the hub's [`Error`] becomes an HTTP answer; a fault of the server or of its
//! database is never answered 4xx. Internal details are logged, never returned.

use fleet_server::ApiError;
use fleet_types::Reason;

use crate::error::Error;

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(msg) => ApiError::new(Reason::Invalid, msg),
            Error::Unauthorized(msg) => ApiError::new(Reason::Unauthorized, msg),
            Error::Forbidden(msg) => ApiError::new(Reason::Forbidden, msg),
            Error::NotFound(msg) => ApiError::new(Reason::NotFound, msg),
            Error::Conflict(msg) => ApiError::new(Reason::Conflict, msg),
            Error::Unavailable(_) => {
                tracing::warn!(error = %err, "answering 503");
                ApiError::new(
                    Reason::ServiceUnavailable,
                    "the hub's database is unavailable; try again shortly",
                )
            }
            Error::Internal(_) | Error::Interrupted(_) => {
                tracing::error!(error = %err, "internal error");
                ApiError::new(Reason::InternalError, "internal error; see the hub's log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;

    use super::*;

    #[test]
    fn server_faults_are_5xx_and_503_says_when_to_retry() {
        let answer = |e: Error| ApiError::from(e).into_response();
        let unavailable = answer(Error::from(sqlx::Error::PoolTimedOut));
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unavailable.headers()[header::RETRY_AFTER], "5");
        let internal = answer(Error::internal("encoding", "boom"));
        assert_eq!(internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!internal.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(
            answer(Error::Invalid("bad".into())).status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            answer(Error::Conflict("taken".into())).status(),
            StatusCode::CONFLICT
        );
    }
}
