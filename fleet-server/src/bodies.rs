//! Every error answer is a `Status`: those of the handlers already are; this layer rewrites
//! the rest (axum's extractor rejections, an unknown method on a known path, the body limit,
//! the request timeout) from their plain-text form, keeping their code, their text as the
//! message, and headers such as `Allow` and `Retry-After`.

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fleet_types::{Reason, Status};
use http::{StatusCode, header};

use crate::ApiError;

/// Longest plain-text error body kept as the message.
const MESSAGE_LIMIT: usize = 4096;

fn reason(code: StatusCode) -> Reason {
    match code.as_u16() {
        401 => Reason::Unauthorized,
        403 => Reason::Forbidden,
        404 => Reason::NotFound,
        405 => Reason::MethodNotAllowed,
        408 => Reason::Timeout,
        409 => Reason::Conflict,
        413 => Reason::RequestEntityTooLarge,
        415 => Reason::UnsupportedMediaType,
        422 => Reason::Invalid,
        429 => Reason::TooManyRequests,
        503 => Reason::ServiceUnavailable,
        c if c >= 500 => Reason::InternalError,
        _ => Reason::BadRequest,
    }
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

pub async fn status_bodies(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = next.run(req).await;
    let code = response.status();
    if !(code.is_client_error() || code.is_server_error()) || is_json(&response) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MESSAGE_LIMIT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match code {
        // The router adds `Allow` after this layer: the header lists the methods.
        StatusCode::METHOD_NOT_ALLOWED => {
            format!(
                "method {method} is not allowed on {path} (the Allow header lists those that are)"
            )
        }
        StatusCode::PAYLOAD_TOO_LARGE => format!("the request body is too large: {text}"),
        _ if text.is_empty() => code.canonical_reason().unwrap_or("error").to_string(),
        _ => text,
    };
    let mut status = Status::failure(reason(code), message);
    // The code stays the one the layer chose (a timeout answered 503, say).
    status.code = code.as_u16();
    let rewritten = ApiError::from(status).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let (new_parts, body) = rewritten.into_parts();
    for (k, v) in new_parts.headers.iter() {
        parts.headers.insert(k.clone(), v.clone());
    }
    Response::from_parts(parts, Body::new(body))
}
