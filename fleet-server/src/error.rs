//! Errors as HTTP: a Kubernetes `Status` body with the contract's reason and code. Each
//! program maps its own error enum (by meaning) to this once, at its HTTP edge.

use axum::Json;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use fleet_types::{Reason, Status};
use http::{HeaderValue, StatusCode, header};

/// What a client is told to wait before trying again after a 503.
pub const RETRY_AFTER_SECONDS: u32 = 5;

/// A failed request's answer: the `Status` body, its code, and `Retry-After` on a 503.
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

    pub fn status(&self) -> &Status {
        &self.0
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.0.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (code, Json(*self.0)).into_response();
        if code == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

/// The request's media type when it is one of `accepted`; else a 415 that names them.
pub fn accept_media_type<'a>(
    headers: &http::HeaderMap,
    accepted: &[&'a str],
    what: &str,
) -> Result<&'a str, ApiError> {
    let given = fleet_types::http::media_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    if let Some(found) = accepted.iter().find(|a| a.eq_ignore_ascii_case(given)) {
        return Ok(*found);
    }
    let said = if given.is_empty() {
        "no Content-Type".to_string()
    } else {
        format!("Content-Type {given:?}")
    };
    Err(ApiError::new(
        Reason::UnsupportedMediaType,
        format!(
            "{what}: {said} is not accepted; send {}",
            accepted.join(" or ")
        ),
    ))
}

/// The fallback of both routers: an unknown route is a `Status` 404 naming it.
pub async fn no_such_endpoint(req: Request) -> ApiError {
    ApiError::new(
        Reason::NotFound,
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_must_say_it_is_one_of_the_accepted_types() {
        let mut headers = http::HeaderMap::new();
        let accepted = ["application/json", "application/yaml"];
        let refused = accept_media_type(&headers, &accepted, "an IBGU").unwrap_err();
        assert_eq!(refused.status().code, 415);
        assert_eq!(
            refused.status().message,
            "an IBGU: no Content-Type is not accepted; send application/json or application/yaml"
        );
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let refused = accept_media_type(&headers, &accepted, "an IBGU").unwrap_err();
        assert!(
            refused
                .status()
                .message
                .contains("Content-Type \"text/plain\"")
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/YAML; charset=utf-8"),
        );
        assert_eq!(
            accept_media_type(&headers, &accepted, "x").unwrap(),
            "application/yaml"
        );
    }

    #[test]
    fn a_503_says_when_to_retry_and_other_codes_do_not() {
        let unavailable = ApiError::new(Reason::ServiceUnavailable, "later").into_response();
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unavailable.headers()[header::RETRY_AFTER], "5");
        let internal = ApiError::new(Reason::InternalError, "boom").into_response();
        assert_eq!(internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!internal.headers().contains_key(header::RETRY_AFTER));
    }
}
