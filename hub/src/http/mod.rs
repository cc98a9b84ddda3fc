//! The hub's HTTP surface. Handlers are thin: they read, call the layer that decides, and
//! turn errors into the contract's `Status` bodies here, at the edge.

pub mod api;
pub mod audit;
pub mod auth;
mod error;
pub mod fields;
pub mod listen;
pub mod openapi;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleet_types::Reason;
use sqlx::PgPool;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

pub use fleet_server::ApiError;

use crate::db;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::store;

/// Largest request body accepted. An IBGU or a spoke report is a few KiB; 1 MiB leaves room
/// for ConfigMaps of extra manifests without letting a peer exhaust memory.
pub const BODY_LIMIT_BYTES: usize = 1024 * 1024;
/// A request taking longer than this is answered 503 (slow database, stuck peer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub metrics: Metrics,
    pub engine: Arc<Engine>,
    pub admin_token: Option<String>,
    /// Tokens that read every GET of the API and change nothing.
    pub viewer_tokens: Vec<String>,
    pub join_token: Option<String>,
    /// `--join-token-file`: the join token, read again when the file changes (it replaces
    /// `join_token`).
    pub join_token_file: Option<Arc<TokenFile>>,
    /// How long a cluster credential is valid after it is issued.
    pub credential_ttl: chrono::Duration,
    /// `--kube`: other bearer tokens are Kubernetes identities, checked with the API server.
    pub kube_auth: Option<Arc<crate::kubernetes::auth::KubeAuth>>,
}

/// The default of `--cluster-credential-ttl`.
pub const CREDENTIAL_TTL: chrono::Duration = chrono::Duration::days(30);

/// A token kept in a file (a mounted Secret), read again when the file changes, so that it
/// can be replaced without a restart. A change that cannot be read keeps the token in use.
pub struct TokenFile {
    path: std::path::PathBuf,
    cached: std::sync::Mutex<(Option<std::time::SystemTime>, String)>,
}

impl TokenFile {
    /// Reads it now: a missing or empty file is an error naming it.
    pub fn open(path: std::path::PathBuf) -> Result<TokenFile, String> {
        let stamp = Self::stamp(&path);
        let token = Self::read(&path)?;
        Ok(TokenFile {
            path,
            cached: std::sync::Mutex::new((stamp, token)),
        })
    }

    fn stamp(path: &std::path::Path) -> Option<std::time::SystemTime> {
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    fn read(path: &std::path::Path) -> Result<String, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(format!("{}: empty", path.display()));
        }
        Ok(token)
    }

    /// The token as the file holds it now.
    pub fn current(&self) -> String {
        let stamp = Self::stamp(&self.path);
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.0 != stamp {
            cached.0 = stamp;
            match Self::read(&self.path) {
                Ok(token) => {
                    tracing::info!(file = %self.path.display(), "join token replaced");
                    cached.1 = token;
                }
                Err(why) => {
                    tracing::warn!(%why, "the changed join token file cannot be used; keeping the token")
                }
            }
        }
        cached.1.clone()
    }
}

impl AppState {
    /// The join token as it is now: the file's (read again when it changed), else the flag's.
    pub fn join_token_now(&self) -> Option<String> {
        match &self.join_token_file {
            Some(file) => Some(file.current()),
            None => self.join_token.clone(),
        }
    }

    /// A hub on `pool` with the system clock, fresh metrics and an open API: the fixture of
    /// the tests, changed with the builders below.
    pub fn test(pool: PgPool) -> AppState {
        let metrics = Metrics::new().expect("metrics register");
        let engine = Engine::new(
            pool.clone(),
            Arc::new(crate::engine::SystemClock),
            metrics.clone(),
        );
        AppState {
            pool,
            metrics,
            engine,
            admin_token: None,
            viewer_tokens: Vec::new(),
            join_token: None,
            join_token_file: None,
            credential_ttl: CREDENTIAL_TTL,
            kube_auth: None,
        }
    }

    /// The API guarded by these tokens.
    pub fn with_tokens(mut self, admin: &str, join: &str) -> AppState {
        self.admin_token = Some(admin.to_string());
        self.join_token = Some(join.to_string());
        self
    }
}

/// The state as handlers get it: one shared copy, not a clone per request and extractor.
pub type Shared = Arc<AppState>;

pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .route("/v1/clusters/register", post(api::register))
        .route("/v1/clusters/{name}/status", post(api::report))
        .route(
            "/v1/clusters/{name}/credential",
            post(api::renew_credential),
        )
        .route("/v1/clusters", get(api::cluster_list))
        .route(
            "/v1/clusters/{name}",
            get(api::cluster_get)
                .patch(api::cluster_patch)
                .delete(api::cluster_delete),
        )
        .route(
            "/v1/rollouts",
            get(api::rollout_list).post(api::rollout_create),
        )
        .route(
            "/v1/rollouts/{namespace}/{name}",
            get(api::rollout_get)
                .patch(api::rollout_patch)
                .delete(api::rollout_delete),
        )
        .route("/v1/rollouts/{namespace}/{name}/history", get(api::history))
        .route(
            "/v1/rollouts/{namespace}/{name}/pause",
            post(api::rollout_pause),
        )
        .route(
            "/v1/rollouts/{namespace}/{name}/resume",
            post(api::rollout_resume),
        )
        .route(
            "/v1/configmaps/{namespace}/{name}",
            get(api::configmap_get)
                .put(api::configmap_put)
                .delete(api::configmap_delete),
        )
        .route("/v1/audit", get(api::audit_list))
        .fallback(fleet_server::no_such_endpoint)
        .layer(middleware::from_fn_with_state(state.clone(), audit::record))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_metrics,
        ))
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ));
    fleet_server::traced(routes).with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// How long `/readyz` waits for the database: a probe must learn at once that it is down,
/// not after the pool has tried to connect for its whole acquire timeout.
pub const READY_WAIT: Duration = Duration::from_secs(1);

async fn readyz(State(state): State<Shared>) -> Result<Json<serde_json::Value>, ApiError> {
    tokio::time::timeout(READY_WAIT, db::check_ready(&state.pool))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the database did not answer within {} s",
                READY_WAIT.as_secs()
            ))
        })
        .map_err(|why| ApiError::new(Reason::ServiceUnavailable, why))?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

async fn metrics(State(state): State<Shared>) -> Response {
    {
        let _one_at_a_time = state.metrics.refresh_lock.lock().await;
        state.metrics.set_pool(&state.pool);
        match store::metrics_snapshot(&state.pool).await {
            Ok(snapshot) => {
                state.metrics.set_fleet(&snapshot);
                state.metrics.database_up.set(1);
            }
            Err(err) => {
                state.metrics.database_up.set(0);
                tracing::warn!(%err, "reading the fleet gauges failed; serving their last values")
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Counts every request by route template (never the raw path: bounded labels).
async fn record_metrics(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    state
        .metrics
        .http_request_duration
        .with_label_values(&[method.as_str(), route.as_str()])
        .observe(start.elapsed().as_secs_f64());
    state
        .metrics
        .http_requests
        .with_label_values(&[method.as_str(), route.as_str(), response.status().as_str()])
        .inc();
    response
}
