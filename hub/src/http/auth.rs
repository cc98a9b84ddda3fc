//! Who may call the REST API and what they may do. Standalone: the admin token changes
//! anything, viewer tokens read (every GET); without an admin token the API is open. With
//! `--kube`, any other bearer token is a Kubernetes identity: reviewed with TokenReview, and
//! each request with a SubjectAccessReview of what it needs on the Kubernetes resource.

use axum::http::HeaderMap;
use fleet_types::Reason;

use super::{ApiError, AppState};
use crate::kubernetes::auth::{Attributes, KubeUser};

/// The REST resources, and the Kubernetes resource each stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `imagebasedgroupupgrades.lcm.openshift.io`
    Rollouts,
    /// `managedclusters.cluster.open-cluster-management.io` (cluster-scoped)
    Clusters,
    /// `configmaps`
    ConfigMaps,
    /// The non-resource path `/v1/audit`.
    Audit,
}

/// What a request needs: a Kubernetes verb on a resource.
#[derive(Clone, Copy, Debug)]
pub struct Access<'a> {
    pub verb: &'static str,
    pub kind: Kind,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

impl<'a> Access<'a> {
    pub fn new(verb: &'static str, kind: Kind) -> Access<'a> {
        Access {
            verb,
            kind,
            namespace: None,
            name: None,
        }
    }

    pub fn at(mut self, namespace: &'a str, name: Option<&'a str>) -> Access<'a> {
        self.namespace = Some(namespace);
        self.name = name;
        self
    }

    pub fn named(mut self, name: &'a str) -> Access<'a> {
        self.name = Some(name);
        self
    }

    fn reads(&self) -> bool {
        matches!(self.verb, "get" | "list")
    }

    pub fn attributes(&self) -> Attributes {
        let (group, resource) = match self.kind {
            Kind::Rollouts => ("lcm.openshift.io", "imagebasedgroupupgrades"),
            Kind::Clusters => ("cluster.open-cluster-management.io", "managedclusters"),
            Kind::ConfigMaps => ("", "configmaps"),
            Kind::Audit => {
                return Attributes::NonResource {
                    verb: self.verb.into(),
                    path: "/v1/audit".into(),
                };
            }
        };
        Attributes::Resource {
            verb: self.verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: self.namespace.map(str::to_string),
            name: self.name.map(str::to_string),
        }
    }
}

/// Who a request's bearer token says it is.
pub enum Caller {
    Admin,
    Viewer,
    Kube(KubeUser),
}

fn unavailable(e: kube::Error) -> ApiError {
    ApiError::new(
        Reason::ServiceUnavailable,
        format!("checking the caller with the Kubernetes API failed: {e}"),
    )
}

/// Who the caller is: 401 when the token is missing or nobody's.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let presented = super::api::bearer(headers);
    let open = state.admin_token.is_none() && state.kube_auth.is_none();
    let Some(token) = presented else {
        if open {
            return Ok(Caller::Admin);
        }
        return Err(ApiError::new(Reason::Unauthorized, "missing bearer token"));
    };
    let matches = |t: &str| fleet_types::http::tokens_match(token, t);
    if state.admin_token.as_deref().is_some_and(matches) {
        return Ok(Caller::Admin);
    }
    if state.viewer_tokens.iter().any(|v| matches(v)) {
        return Ok(Caller::Viewer);
    }
    if let Some(kube) = &state.kube_auth {
        return match kube.authenticate(token).await.map_err(unavailable)? {
            Some(user) => Ok(Caller::Kube(user)),
            None => Err(ApiError::new(
                Reason::Unauthorized,
                "the Kubernetes API did not authenticate this token",
            )),
        };
    }
    if state.admin_token.is_none() {
        return Ok(Caller::Admin);
    }
    Err(ApiError::new(Reason::Unauthorized, "invalid bearer token"))
}

/// Whether `caller` may do `access`: 403 naming what is missing when not.
pub async fn permit(state: &AppState, caller: &Caller, access: Access<'_>) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Viewer if access.reads() => Ok(()),
        Caller::Viewer => Err(ApiError::new(
            Reason::Forbidden,
            "a viewer token may only read: this change needs the admin token",
        )),
        Caller::Kube(user) => {
            let kube = state.kube_auth.as_ref().ok_or_else(|| {
                ApiError::new(Reason::InternalError, "a Kubernetes caller without --kube")
            })?;
            let attrs = access.attributes();
            let (allowed, reason) = kube.authorize(user, &attrs).await.map_err(unavailable)?;
            if allowed {
                Ok(())
            } else {
                Err(ApiError::new(
                    Reason::Forbidden,
                    attrs.forbidden(user, &reason),
                ))
            }
        }
    }
}

/// `authenticate`, then `permit`.
pub async fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    access: Access<'_>,
) -> Result<Caller, ApiError> {
    let caller = authenticate(state, headers).await?;
    permit(state, &caller, access).await?;
    Ok(caller)
}

/// Who a change's caller is, for the audit trail, by the token it presented (`name`: the
/// cluster of the path, whose credential a spoke presents), and its Kubernetes groups.
pub fn actor(state: &AppState, headers: &HeaderMap, name: Option<&str>) -> (String, Vec<String>) {
    let presented = super::api::bearer(headers);
    let is = |t: Option<&str>| matches!((presented, t), (Some(p), Some(t)) if fleet_types::http::tokens_match(p, t));
    if is(state.admin_token.as_deref()) {
        return ("admin".into(), vec![]);
    }
    if presented.is_some_and(|p| {
        state
            .viewer_tokens
            .iter()
            .any(|v| fleet_types::http::tokens_match(p, v))
    }) {
        return ("viewer".into(), vec![]);
    }
    let join = state.join_token_now();
    if is(join.as_deref()) {
        return ("join-token".into(), vec![]);
    }
    if let (Some(kube), Some(token)) = (&state.kube_auth, presented)
        && let Some(user) = kube.known_user(token)
    {
        return (format!("kubernetes:{}", user.username), user.groups);
    }
    if state.admin_token.is_none() && state.kube_auth.is_none() && presented.is_none() {
        return ("anonymous".into(), vec![]);
    }
    match name {
        Some(name) => (format!("cluster:{name}"), vec![]),
        None => ("unknown".into(), vec![]),
    }
}
