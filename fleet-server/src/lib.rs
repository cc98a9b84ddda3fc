//! What the hub's and the agent's HTTP servers share, so that both answer and log alike:
//! errors as Kubernetes `Status` bodies ([`ApiError`]), the request-id and trace layers
//! ([`traced`]), the fallback for unknown routes, the log set-up ([`init_logs`]), the accept
//! loop ([`listen`]) and TLS ([`tls`]).

mod bodies;
mod error;
pub mod listen;
mod logs;
pub mod tls;

pub use error::{ApiError, RETRY_AFTER_SECONDS, accept_media_type, no_such_endpoint};
pub use logs::{LogFormat, init_logs};

use axum::Router;
use http::HeaderName;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// Wraps a router in the layers every request of both programs goes through: every error
/// answered as a `Status` (also those of the layers inside, such as the body limit and the
/// timeout); an `X-Request-Id` (the caller's, or a new UUID) that is answered back and
/// carried by every log line of the request, inside a span naming method and path.
pub fn traced<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    let header = HeaderName::from_static(fleet_types::http::REQUEST_ID);
    router
        .layer(axum::middleware::from_fn(bodies::status_bodies))
        .layer(TraceLayer::new_for_http().make_span_with(fleet_types::http::request_span))
        .layer(PropagateRequestIdLayer::new(header.clone()))
        .layer(SetRequestIdLayer::new(header, MakeRequestUuid))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    async fn status_of(
        app: Router,
        req: Request<Body>,
    ) -> (StatusCode, http::HeaderMap, fleet_types::Status) {
        let answer = app.oneshot(req).await.unwrap();
        let (code, headers) = (answer.status(), answer.headers().clone());
        assert_eq!(headers["content-type"], "application/json");
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16)
            .await
            .unwrap();
        (code, headers, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn the_layers_and_extractors_answer_status_bodies_too() {
        let app = traced(
            Router::new()
                .route(
                    "/body",
                    axum::routing::post(|b: axum::body::Bytes| async move { b.len().to_string() }),
                )
                .route(
                    "/json",
                    axum::routing::post(|_: axum::Json<serde_json::Value>| async { "ok" }),
                )
                .layer(tower_http::limit::RequestBodyLimitLayer::new(16)),
        );
        let big = Request::post("/body")
            .body(Body::from(vec![b'x'; 64]))
            .unwrap();
        let (code, _, status) = status_of(app.clone(), big).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(status.reason, fleet_types::Reason::RequestEntityTooLarge);
        assert!(
            status.message.starts_with("the request body is too large"),
            "{}",
            status.message
        );
        let wrong = Request::delete("/body").body(Body::empty()).unwrap();
        let (code, headers, status) = status_of(app.clone(), wrong).await;
        assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers["allow"], "POST");
        assert_eq!(
            status.message,
            "method DELETE is not allowed on /body (the Allow header lists those that are)"
        );
        let plain = Request::post("/json")
            .header("content-type", "text/plain")
            .body(Body::from("{}"))
            .unwrap();
        let (code, _, status) = status_of(app, plain).await;
        assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(status.reason, fleet_types::Reason::UnsupportedMediaType);
        assert_eq!(status.code, 415);
    }

    #[tokio::test]
    async fn request_ids_are_kept_or_made_and_unknown_routes_are_status_bodies() {
        let app = traced(
            Router::new()
                .route("/ok", get(|| async { "ok" }))
                .fallback(no_such_endpoint),
        );
        let given = Request::get("/ok")
            .header("x-request-id", "abc")
            .body(Body::empty())
            .unwrap();
        let answer = app.clone().oneshot(given).await.unwrap();
        assert_eq!(answer.headers()["x-request-id"], "abc");
        let made = app
            .clone()
            .oneshot(Request::get("/ok").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(made.headers()["x-request-id"].len(), 36, "a UUID");
        let missing = app
            .oneshot(Request::post("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(missing.headers()["content-type"], "application/json");
        let body = axum::body::to_bytes(missing.into_body(), 4096)
            .await
            .unwrap();
        let status: fleet_types::Status = serde_json::from_slice(&body).unwrap();
        assert_eq!(status.message, "no such endpoint: POST /nope");
        assert_eq!(status.reason, fleet_types::Reason::NotFound);
    }
}
