//! Kubernetes identities on the REST API (`--kube`), as kube-rbac-proxy checks them: a
//! caller's bearer token is reviewed with a TokenReview, and each request with a
//! SubjectAccessReview of the verb a user would need on the Kubernetes resource, so `oc`
//! users and service accounts have exactly the rights their RBAC gives them. Both answers
//! are kept for `CACHE_FOR`, so a busy client costs the API server little.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;
use sha2::{Digest, Sha256};

/// How long a review's answer is reused.
pub const CACHE_FOR: Duration = Duration::from_secs(10);
/// Entries kept at most; beyond, the cache starts over.
const CACHE_MAX: usize = 10_000;

/// Who the Kubernetes API says a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KubeUser {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
}

/// What a request needs, as Kubernetes names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Attributes {
    Resource {
        verb: String,
        group: String,
        resource: String,
        namespace: Option<String>,
        name: Option<String>,
    },
    NonResource {
        verb: String,
        path: String,
    },
}

impl Attributes {
    /// The API server's words for a refusal of `user`.
    pub fn forbidden(&self, user: &KubeUser, reason: &str) -> String {
        let because = if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        };
        match self {
            Attributes::Resource {
                verb,
                group,
                resource,
                namespace,
                name,
            } => {
                let what = match group.as_str() {
                    "" => resource.clone(),
                    g => format!("{resource}.{g}"),
                };
                let object = match name {
                    Some(n) => format!("{what} \"{n}\""),
                    None => what,
                };
                let scope = match namespace {
                    Some(ns) => format!(" in the namespace \"{ns}\""),
                    None => " at the cluster scope".to_string(),
                };
                format!(
                    "{object} is forbidden: User \"{}\" cannot {verb} resource \"{resource}\" in API group \"{group}\"{scope}{because}",
                    user.username
                )
            }
            Attributes::NonResource { verb, path } => format!(
                "forbidden: User \"{}\" cannot {verb} path \"{path}\"{because}",
                user.username
            ),
        }
    }
}

type Cached<T> = Mutex<HashMap<String, (Instant, T)>>;

pub struct KubeAuth {
    client: kube::Client,
    tokens: Cached<Option<KubeUser>>,
    decisions: Cached<(bool, String)>,
}

fn remembered<T: Clone>(cache: &Cached<T>, key: &str) -> Option<T> {
    let cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .get(key)
        .filter(|(at, _)| at.elapsed() < CACHE_FOR)
        .map(|(_, v)| v.clone())
}

fn remember<T>(cache: &Cached<T>, key: String, value: T) {
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= CACHE_MAX {
        cache.clear();
    }
    cache.insert(key, (Instant::now(), value));
}

impl KubeAuth {
    pub fn new(client: kube::Client) -> KubeAuth {
        KubeAuth {
            client,
            tokens: Mutex::new(HashMap::new()),
            decisions: Mutex::new(HashMap::new()),
        }
    }

    fn token_key(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    /// The user of a token the hub reviewed lately (for the audit trail), without asking.
    pub fn known_user(&self, token: &str) -> Option<KubeUser> {
        remembered(&self.tokens, &Self::token_key(token)).flatten()
    }

    /// Who `token` is, or `None` when the Kubernetes API does not authenticate it.
    pub async fn authenticate(&self, token: &str) -> Result<Option<KubeUser>, kube::Error> {
        let key = Self::token_key(token);
        if let Some(known) = remembered(&self.tokens, &key) {
            return Ok(known);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await?;
        let user = answer
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .map(|u| KubeUser {
                username: u.username.unwrap_or_default(),
                uid: u.uid.unwrap_or_default(),
                groups: u.groups.unwrap_or_default(),
            });
        remember(&self.tokens, key, user.clone());
        Ok(user)
    }

    /// Whether `user` may do what `attrs` names, and the authorizer's reason.
    pub async fn authorize(
        &self,
        user: &KubeUser,
        attrs: &Attributes,
    ) -> Result<(bool, String), kube::Error> {
        let key = format!("{user:?}|{attrs:?}");
        if let Some(known) = remembered(&self.decisions, &key) {
            return Ok(known);
        }
        let mut spec = SubjectAccessReviewSpec {
            user: Some(user.username.clone()),
            uid: Some(user.uid.clone()).filter(|u| !u.is_empty()),
            groups: Some(user.groups.clone()),
            ..SubjectAccessReviewSpec::default()
        };
        match attrs {
            Attributes::Resource {
                verb,
                group,
                resource,
                namespace,
                name,
            } => {
                spec.resource_attributes = Some(ResourceAttributes {
                    verb: Some(verb.clone()),
                    group: Some(group.clone()),
                    resource: Some(resource.clone()),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    ..ResourceAttributes::default()
                })
            }
            Attributes::NonResource { verb, path } => {
                spec.non_resource_attributes = Some(NonResourceAttributes {
                    verb: Some(verb.clone()),
                    path: Some(path.clone()),
                })
            }
        }
        let review = SubjectAccessReview {
            spec,
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await?;
        let decision = answer
            .status
            .map(|s| (s.allowed, s.reason.unwrap_or_default()))
            .unwrap_or((false, String::new()));
        remember(&self.decisions, key, decision.clone());
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_worded_as_the_api_server_words_them() {
        let alice = KubeUser {
            username: "alice".into(),
            uid: String::new(),
            groups: vec![],
        };
        let patch = Attributes::Resource {
            verb: "patch".into(),
            group: "lcm.openshift.io".into(),
            resource: "imagebasedgroupupgrades".into(),
            namespace: Some("ztp".into()),
            name: Some("wave1".into()),
        };
        assert_eq!(
            patch.forbidden(&alice, ""),
            "imagebasedgroupupgrades.lcm.openshift.io \"wave1\" is forbidden: User \"alice\" cannot patch resource \"imagebasedgroupupgrades\" in API group \"lcm.openshift.io\" in the namespace \"ztp\""
        );
        let list = Attributes::Resource {
            verb: "list".into(),
            group: "cluster.open-cluster-management.io".into(),
            resource: "managedclusters".into(),
            namespace: None,
            name: None,
        };
        assert_eq!(
            list.forbidden(&alice, "no RBAC policy matched"),
            "managedclusters.cluster.open-cluster-management.io is forbidden: User \"alice\" cannot list resource \"managedclusters\" in API group \"cluster.open-cluster-management.io\" at the cluster scope: no RBAC policy matched"
        );
    }
}
