//! The audit trail of the REST API: each change, and each refused attempt at one by a caller
//! the hub knows, is written with who made it, from which address and with which request
//! id, once it is answered. Reads, reports, dry runs and callers without a valid token (401)
//! are not: the request log has those.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::Shared;
use crate::store::{self, AuditEntry};

/// What a handler knows better than the route: set as a response extension.
#[derive(Clone, Debug, Default)]
pub struct AuditNote {
    pub actor: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub message: String,
}

/// The verb and resource of a change, by method and route; `None`: not audited.
fn change(method: &Method, route: &str) -> Option<(&'static str, &'static str)> {
    Some(match (method.as_str(), route) {
        ("POST", "/v1/rollouts") => ("create", "rollouts"),
        ("PATCH", "/v1/rollouts/{namespace}/{name}") => ("patch", "rollouts"),
        ("DELETE", "/v1/rollouts/{namespace}/{name}") => ("delete", "rollouts"),
        ("POST", "/v1/rollouts/{namespace}/{name}/pause") => ("pause", "rollouts"),
        ("POST", "/v1/rollouts/{namespace}/{name}/resume") => ("resume", "rollouts"),
        ("PATCH", "/v1/clusters/{name}") => ("patch", "clusters"),
        ("DELETE", "/v1/clusters/{name}") => ("delete", "clusters"),
        ("POST", "/v1/clusters/register") => ("register", "clusters"),
        ("POST", "/v1/clusters/{name}/credential") => ("renew", "credentials"),
        ("PUT", "/v1/configmaps/{namespace}/{name}") => ("update", "configmaps"),
        ("DELETE", "/v1/configmaps/{namespace}/{name}") => ("delete", "configmaps"),
        _ => return None,
    })
}

/// The `{namespace}` and `{name}` of a path, by its route.
fn path_names(route: &str, path: &str) -> (Option<String>, Option<String>) {
    let (mut namespace, mut name) = (None, None);
    for (t, p) in route.split('/').zip(path.split('/')) {
        let value = percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned();
        match t {
            "{namespace}" => namespace = Some(value),
            "{name}" => name = Some(value),
            _ => {}
        }
    }
    (namespace, name)
}

pub async fn record(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let Some((verb, resource)) = route.as_deref().and_then(|r| change(req.method(), r)) else {
        return next.run(req).await;
    };
    if req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "dryRun=All"))
    {
        return next.run(req).await;
    }
    let route = route.unwrap_or_default();
    let (namespace, name) = path_names(&route, req.uri().path());
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let request_id = req
        .headers()
        .get(fleet_types::http::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let headers = req.headers().clone();
    let response = next.run(req).await;
    let code = response.status();
    if code == axum::http::StatusCode::UNAUTHORIZED {
        return response;
    }
    // Named after the answer: a Kubernetes caller is known once its token was reviewed.
    let (actor, groups) = super::auth::actor(&state, &headers, name.as_deref());
    let note = response
        .extensions()
        .get::<AuditNote>()
        .cloned()
        .unwrap_or_default();
    let entry = AuditEntry {
        time: state.engine.clock.now(),
        actor: note.actor.unwrap_or(actor),
        groups,
        source,
        request_id,
        verb: verb.into(),
        resource: resource.into(),
        namespace: note.namespace.or(namespace),
        name: note.name.or(name),
        code: Some(i32::from(code.as_u16())),
        message: note.message,
    };
    if let Err(err) = store::audit_insert(&state.pool, &entry).await {
        tracing::error!(%err, verb, resource, "writing the audit trail failed");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_path_by_its_route() {
        assert_eq!(
            path_names(
                "/v1/rollouts/{namespace}/{name}",
                "/v1/rollouts/edge/wave%2D1"
            ),
            (Some("edge".into()), Some("wave-1".into()))
        );
        assert_eq!(
            path_names(
                "/v1/clusters/{name}/credential",
                "/v1/clusters/sno1/credential"
            ),
            (None, Some("sno1".into()))
        );
        assert_eq!(change(&Method::GET, "/v1/rollouts"), None);
        assert_eq!(change(&Method::POST, "/v1/clusters/{name}/status"), None);
        assert_eq!(
            change(&Method::DELETE, "/v1/clusters/{name}"),
            Some(("delete", "clusters"))
        );
    }
}
