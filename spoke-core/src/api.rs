//! The agent's HTTP API (`contract.md`, "Spoke HTTP API"). One router serves a single agent at
//! `/v1/...` or a simulated fleet at `/clusters/<name>/v1/...`; handlers are thin and
//! errors leave as Kubernetes `Status` bodies.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fleet_server::ApiError;
use fleet_types::Reason;
use fleet_types::ibu::ConfigMapRef;
use serde::{Deserialize, Serialize};
use tower_http::limit::RequestBodyLimitLayer;

use crate::Error;
use crate::metrics::AgentMetrics;
use crate::spoke::Spoke;

/// Largest request body: a ConfigMap of extra manifests fits easily, a flood does not.
pub const BODY_LIMIT_BYTES: usize = 1024 * 1024;

pub struct ApiState<S: Spoke> {
    pub agents: HashMap<String, Arc<S>>,
    /// The cluster served at `/v1` (single-agent mode).
    pub single: Option<String>,
    pub api_token: Option<String>,
    pub metrics: AgentMetrics,
}

type Shared<S> = Arc<ApiState<S>>;

/// The one place the agent's [`Error`] becomes an HTTP answer.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(why) => ApiError::new(Reason::Invalid, why),
            Error::Unavailable(why) => ApiError::new(Reason::ServiceUnavailable, why),
            Error::Internal { what, detail } => {
                tracing::error!(%detail, "{what}");
                ApiError::new(Reason::InternalError, what)
            }
        }
    }
}

pub fn router<S: Spoke>(state: Shared<S>) -> Router {
    let v1 = Router::new()
        .route("/v1/ibu", get(get_ibu::<S>).patch(patch_ibu::<S>))
        .route("/v1/restores", get(restores::<S>))
        .route(
            "/v1/configmaps/{namespace}/{name}",
            get(cm_get::<S>).put(cm_put::<S>).delete(cm_delete::<S>),
        )
        .route("/v1/must-gather", get(must_gather::<S>))
        .route("/readyz", get(readyz::<S>));
    let routes = if state.single.is_some() {
        v1
    } else {
        Router::new().nest("/clusters/{cluster}", v1)
    };
    let routes = routes
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/metrics", get(metrics::<S>))
        .fallback(fleet_server::no_such_endpoint)
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT_BYTES));
    fleet_server::traced(routes).with_state(state)
}

/// The agent a request is for, after its bearer token was checked.
struct Authed<S: Spoke> {
    agent: Arc<S>,
    params: HashMap<String, String>,
}

impl<S: Spoke> FromRequestParts<Shared<S>> for Authed<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared<S>) -> Result<Self, ApiError> {
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(Reason::BadRequest, e.to_string()))?;
        let name = params
            .get("cluster")
            .or(state.single.as_ref())
            .cloned()
            .unwrap_or_default();
        let agent =
            state.agents.get(&name).cloned().ok_or_else(|| {
                ApiError::new(Reason::NotFound, format!("no cluster named {name:?}"))
            })?;
        authorize(
            &parts.headers,
            state.api_token.as_deref(),
            &agent.session().accepted_credentials(),
        )?;
        Ok(Authed { agent, params })
    }
}

/// Accepts the API token and the credentials the hub got for this cluster. With neither
/// configured the API is open (a lab agent on loopback).
fn authorize(
    headers: &HeaderMap,
    api_token: Option<&str>,
    credentials: &[String],
) -> Result<(), ApiError> {
    if api_token.is_none() && credentials.is_empty() {
        return Ok(());
    }
    let presented = fleet_types::http::bearer(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
    .ok_or_else(|| ApiError::new(Reason::Unauthorized, "missing bearer token"))?;
    let ok = api_token
        .into_iter()
        .chain(credentials.iter().map(String::as_str))
        .any(|t| fleet_types::http::tokens_match(t, presented));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(Reason::Unauthorized, "invalid bearer token"))
    }
}

async fn get_ibu<S: Spoke>(a: Authed<S>) -> Result<Response, ApiError> {
    Ok(Json(&*a.agent.ibu().await?).into_response())
}

async fn patch_ibu<S: Spoke>(
    a: Authed<S>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    fleet_server::accept_media_type(
        &headers,
        &["application/merge-patch+json", "application/json"],
        "an IBU patch",
    )?;
    let patch: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(Reason::BadRequest, format!("the body is not JSON: {e}")))?;
    match a.agent.patch(&patch).await {
        Ok(ibu) => {
            tracing::info!(cluster = %a.agent.name(), stage = %ibu.spec.stage, "IBU change accepted");
            let prefer = headers.get_all(fleet_types::http::PREFER).iter();
            if fleet_types::http::prefers_minimal(prefer.filter_map(|v| v.to_str().ok())) {
                // The hub's pushes: the new object is not read, so it is not written.
                return Ok((
                    StatusCode::NO_CONTENT,
                    [(
                        fleet_types::http::PREFERENCE_APPLIED,
                        fleet_types::http::RETURN_MINIMAL,
                    )],
                )
                    .into_response());
            }
            Ok(Json(&*ibu).into_response())
        }
        Err(err) => {
            tracing::warn!(cluster = %a.agent.name(), %err, "IBU change refused");
            Err(err.into())
        }
    }
}

#[derive(Serialize)]
struct Items<T> {
    items: Vec<T>,
}

async fn restores<S: Spoke>(a: Authed<S>) -> Result<Response, ApiError> {
    Ok(Json(Items {
        items: a.agent.restores().await?,
    })
    .into_response())
}

#[derive(Serialize, Deserialize)]
struct ConfigMap {
    metadata: ConfigMapRef,
    #[serde(default)]
    data: BTreeMap<String, String>,
}

fn cm_ref(params: &HashMap<String, String>) -> ConfigMapRef {
    ConfigMapRef {
        name: params.get("name").cloned().unwrap_or_default(),
        namespace: params.get("namespace").cloned().unwrap_or_default(),
    }
}

async fn cm_get<S: Spoke>(a: Authed<S>) -> Result<Response, ApiError> {
    let r = cm_ref(&a.params);
    match a.agent.configmap_get(&r).await? {
        Some(data) => Ok(Json(ConfigMap { metadata: r, data }).into_response()),
        None => Err(ApiError::new(
            Reason::NotFound,
            format!("configmap {}/{} not found", r.namespace, r.name),
        )),
    }
}

async fn cm_put<S: Spoke>(
    a: Authed<S>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    fleet_server::accept_media_type(&headers, &["application/json"], "a ConfigMap")?;
    let r = cm_ref(&a.params);
    let cm: ConfigMap = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(Reason::Invalid, format!("not a ConfigMap ({{\"metadata\":{{\"name\",\"namespace\"}},\"data\":{{...}}}}): {e}"))
    })?;
    if cm.metadata != r {
        return Err(ApiError::new(
            Reason::Invalid,
            format!(
                "metadata names {}/{} but the path names {}/{}",
                cm.metadata.namespace, cm.metadata.name, r.namespace, r.name
            ),
        ));
    }
    a.agent.configmap_put(&r, cm.data.clone()).await?;
    Ok(Json(cm).into_response())
}

async fn cm_delete<S: Spoke>(a: Authed<S>) -> Result<Response, ApiError> {
    let r = cm_ref(&a.params);
    match a.agent.configmap_delete(&r).await? {
        true => Ok(Json(fleet_types::status::success(format!(
            "configmap {}/{} deleted",
            r.namespace, r.name
        )))
        .into_response()),
        false => Err(ApiError::new(
            Reason::NotFound,
            format!("configmap {}/{} not found", r.namespace, r.name),
        )),
    }
}

async fn must_gather<S: Spoke>(a: Authed<S>) -> Result<Response, ApiError> {
    let files = a.agent.gather().await?;
    let bundle = crate::must_gather::pack(a.agent.name(), files)
        .map_err(|e| Error::internal("building the bundle", e))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/gzip".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"must-gather-{}.tar.gz\"",
                    a.agent.name()
                ),
            ),
        ],
        bundle,
    )
        .into_response())
}

async fn readyz<S: Spoke>(a: Authed<S>) -> Result<Response, ApiError> {
    a.agent.check_reachable()?;
    Ok(Json(serde_json::json!({"status": "ready"})).into_response())
}

async fn metrics<S: Spoke>(State(state): State<Shared<S>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
