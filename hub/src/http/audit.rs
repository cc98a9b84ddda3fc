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
    /// The handler wrote the entry itself, in the transaction of its change
    /// ([`AuditContext::entry`]).
    pub written: bool,
}

/// What the trail knows of a request before it is answered, handed to the handler as a
/// request extension: a handler that writes its change in a transaction of its own
/// making (a registration) writes the entry in it too, so neither is ever without the other.
#[derive(Clone, Debug)]
pub struct AuditContext {
    verb: &'static str,
    resource: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    source: Option<String>,
    request_id: Option<String>,
}

impl AuditContext {
    /// The entry of this request, answered `code`, by `actor` (with its `groups`); the
    /// note's names and message where it has them.
    pub fn entry(
        &self,
        time: chrono::DateTime<chrono::Utc>,
        (actor, groups): (String, Vec<String>),
        code: axum::http::StatusCode,
        note: AuditNote,
    ) -> AuditEntry {
        AuditEntry {
            time,
            actor: note.actor.unwrap_or(actor),
            groups,
            source: self.source.clone(),
            request_id: self.request_id.clone(),
            verb: self.verb.into(),
            resource: self.resource.into(),
            namespace: note.namespace.or_else(|| self.namespace.clone()),
            name: note.name.or_else(|| self.name.clone()),
            code: Some(i32::from(code.as_u16())),
            message: note.message,
        }
    }
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

pub async fn record(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
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
    let context = AuditContext {
        verb,
        resource,
        namespace,
        name,
        source: req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.to_string()),
        request_id: req
            .headers()
            .get(fleet_types::http::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    req.extensions_mut().insert(context.clone());
    let headers = req.headers().clone();
    let response = next.run(req).await;
    let code = response.status();
    if code == axum::http::StatusCode::UNAUTHORIZED {
        return response;
    }
    let note = response
        .extensions()
        .get::<AuditNote>()
        .cloned()
        .unwrap_or_default();
    if note.written {
        return response;
    }
    // Named after the answer: a Kubernetes caller is known once its token was reviewed.
    let actor = super::auth::actor(&state, &headers, context.name.as_deref());
    let entry = context.entry(state.engine.clock.now(), actor, code, note);
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
