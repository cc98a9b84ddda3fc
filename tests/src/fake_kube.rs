//! An in-process fake Kubernetes API server, enough for the hub's Kubernetes mode: any
//! resource under `/api/v1` and `/apis/<group>/<version>`, cluster-scoped or namespaced,
//! with list, watch (newline-delimited events from a resourceVersion), get, create, replace
//! (with the `status` subresource), JSON and merge patches, delete with finalizers, and
//! resourceVersion semantics (a stale version is a 409). Objects of a kind with a CRD given
//! to it are checked against the CRD's CEL rules, as the real API server would. Requests can
//! be checked against ClusterRoles: a request no rule allows is answered 403 and recorded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// A request with this header is a cluster admin's, not checked against the ClusterRoles.
pub const ADMIN_HEADER: &str = "x-fake-cluster-admin";
/// A bearer token the server takes as a cluster admin's (see [`FakeKube::write_admin_kubeconfig`]).
pub const ADMIN_TOKEN: &str = "fake-cluster-admin";

/// Where an object lives: api prefix (`api/v1`, `apis/g/v`), plural, namespace, name.
type Key = (String, String, String, String);

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: &'static str,
    prefix: String,
    plural: String,
    namespace: String,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Change>,
    denied: Vec<String>,
    requests: Vec<String>,
    /// Resources this cluster does not have (their CRD is not installed).
    absent: Vec<(String, String)>,
    /// Bearer tokens of users, for TokenReviews: token -> (username, groups).
    users: BTreeMap<String, (String, Vec<String>)>,
    /// What users and groups may do, for SubjectAccessReviews: (`user:<name>` or
    /// `group:<name>`, rule). A non-resource rule has no API groups and its paths as
    /// resources, as `nonResourceURLs` are written.
    grants: Vec<(String, Rule)>,
    /// The SubjectAccessReviews asked, as `<user> <verb> <group>/<resource> <namespace>`.
    reviews: Vec<String>,
}

/// A RBAC rule: API groups, resources (with `/status` for subresources), verbs.
#[derive(Clone, Debug)]
pub struct Rule {
    pub groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    /// A Role's rule holds only in its namespace; a ClusterRole's everywhere.
    pub namespace: Option<String>,
    /// `resourceNames`: when given, the rule holds for those objects only.
    pub names: Vec<String>,
}

#[derive(Clone)]
pub struct FakeKube {
    inner: Arc<Mutex<Inner>>,
    changes: broadcast::Sender<Change>,
    /// By (prefix, plural): the kind's `Kind.group` and its schema.
    schemas: Arc<BTreeMap<(String, String), (String, Value)>>,
    rules: Arc<Option<Vec<Rule>>>,
    pub url: String,
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "code": code, "reason": reason, "message": message.into()});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

/// The parts of a request path.
struct Target {
    prefix: String,
    group: String,
    namespace: String,
    plural: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, group, rest) = match *parts.first()? {
        "api" => (parts.get(..2)?.join("/"), String::new(), parts.get(2..)?),
        "apis" => (
            parts.get(..3)?.join("/"),
            parts[1].to_string(),
            parts.get(3..)?,
        ),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (rest[1].to_string(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    Some(Target {
        prefix,
        group,
        namespace,
        plural: rest.first()?.to_string(),
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl FakeKube {
    /// Serves on a free loopback port until the runtime ends. `crds` are CRD objects
    /// whose CEL rules apply; `rules`, when given, is what the client may do.
    pub async fn start(crds: &[Value], rules: Option<Vec<Rule>>) -> FakeKube {
        let mut schemas = BTreeMap::new();
        for crd in crds {
            let group = crd["spec"]["group"].as_str().unwrap_or_default();
            let version = crd["spec"]["versions"][0]["name"]
                .as_str()
                .unwrap_or_default();
            let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default();
            schemas.insert(
                (format!("apis/{group}/{version}"), plural.to_string()),
                (
                    format!("{kind}.{group}"),
                    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone(),
                ),
            );
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = FakeKube {
            inner: Default::default(),
            changes: broadcast::channel(4096).0,
            schemas: Arc::new(schemas),
            rules: Arc::new(rules),
            url,
        };
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    /// From now on the server does not know this resource, as when its CRD is not
    /// installed: every request for it answers 404.
    pub fn remove_resource(&self, prefix: &str, plural: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.absent.push((prefix.to_string(), plural.to_string()));
    }

    /// A kubeconfig that points a client at this server (no authentication).
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_with("{}")
    }

    fn kubeconfig_with(&self, user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user: {user}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url
        )
    }

    /// Writes a kubeconfig of a cluster admin (the RBAC rules do not apply to it) into
    /// `dir/<name>`: for a stand-in of another controller that shares the server.
    pub fn write_admin_kubeconfig(&self, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        let user = format!("{{token: {ADMIN_TOKEN}}}");
        std::fs::write(&path, self.kubeconfig_with(&user)).expect("write the kubeconfig");
        path
    }

    /// Writes `kubeconfig()` into `dir`; answers the file's path (for `KUBECONFIG`).
    pub fn write_kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig()).expect("write the kubeconfig");
        path
    }

    /// Puts an object as a user would (`oc apply` of a new object).
    pub fn seed(&self, prefix: &str, plural: &str, object: Value) {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut inner = self.inner.lock().unwrap();
        let key = (prefix.to_string(), plural.to_string(), ns.clone(), name);
        let obj = self.stamp(&mut inner, object, true);
        inner.objects.insert(key, obj.clone());
        self.publish(&mut inner, "ADDED", prefix, plural, &ns, obj);
    }

    pub fn get(&self, prefix: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (
            prefix.to_string(),
            plural.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.inner.lock().unwrap().objects.get(&key).cloned()
    }

    pub fn list(&self, prefix: &str, plural: &str) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|((p, r, _, _), _)| p == prefix && r == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A user the API server authenticates by this bearer token (a TokenReview answers it).
    pub fn add_user(&self, token: &str, username: &str, groups: &[&str]) {
        self.inner.lock().unwrap().users.insert(
            token.to_string(),
            (
                username.to_string(),
                groups.iter().map(|g| g.to_string()).collect(),
            ),
        );
    }

    /// Binds rules to `subject` (`user:<name>` or `group:<name>`), as a (Cluster)RoleBinding
    /// would, for SubjectAccessReviews.
    pub fn grant(&self, subject: &str, rules: Vec<Rule>) {
        let mut inner = self.inner.lock().unwrap();
        inner
            .grants
            .extend(rules.into_iter().map(|r| (subject.to_string(), r)));
    }

    /// The SubjectAccessReviews asked so far.
    pub fn reviews(&self) -> Vec<String> {
        self.inner.lock().unwrap().reviews.clone()
    }

    /// Requests refused because no ClusterRole rule allowed them.
    pub fn denied(&self) -> Vec<String> {
        self.inner.lock().unwrap().denied.clone()
    }

    /// Every request served, as `VERB group/resource`.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().unwrap().requests.clone()
    }

    fn stamp(&self, inner: &mut Inner, mut obj: Value, created: bool) -> Value {
        inner.rv += 1;
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(inner.rv.to_string());
        if created {
            meta["uid"] = json!(format!("uid-{}", inner.rv));
            meta["creationTimestamp"] = json!(now());
            meta["generation"] = json!(1);
        }
        obj
    }

    fn publish(
        &self,
        inner: &mut Inner,
        kind: &'static str,
        prefix: &str,
        plural: &str,
        ns: &str,
        object: Value,
    ) {
        let change = Change {
            rv: inner.rv,
            kind,
            prefix: prefix.to_string(),
            plural: plural.to_string(),
            namespace: ns.to_string(),
            object,
        };
        inner.log.push(change.clone());
        let _ = self.changes.send(change);
    }

    fn allowed(&self, t: &Target, resource: &str, verb: &str) -> bool {
        let (group, namespace) = (t.group.as_str(), t.namespace.as_str());
        match self.rules.as_ref() {
            None => true,
            Some(rules) => rules.iter().any(|r| {
                r.namespace.as_deref().is_none_or(|ns| ns == namespace)
                    && (r.names.is_empty() || t.name.as_ref().is_some_and(|n| r.names.contains(n)))
                    && r.groups.iter().any(|g| g == group || g == "*")
                    && r.resources.iter().any(|x| x == resource || x == "*")
                    && r.verbs.iter().any(|v| v == verb || v == "*")
            }),
        }
    }

    /// The CRD's CEL verdict: the messages of every rule broken, or nothing.
    fn validate(&self, t: &Target, new: &Value, old: Option<&Value>) -> Result<(), String> {
        let Some((kind, schema)) = self.schemas.get(&(t.prefix.clone(), t.plural.clone())) else {
            return Ok(());
        };
        // As the API server words it: `<Kind.group> "<name>" is invalid: <cause>`, causes of
        // the root object's rules as `<nil>: Invalid value: "object": <message>`, several in
        // brackets.
        kube::core::cel::Validator::new()
            .validate(schema, new, old)
            .map_err(|errors| {
                let causes: Vec<String> = errors
                    .into_vec()
                    .into_iter()
                    .map(|e| format!("<nil>: Invalid value: \"object\": {}", e.message))
                    .collect();
                let name = new["metadata"]["name"].as_str().unwrap_or_default();
                let cause = match causes.as_slice() {
                    [one] => one.clone(),
                    many => format!("[{}]", many.join(", ")),
                };
                format!("{kind} \"{name}\" is invalid: {cause}")
            })
    }
}

fn verb(method: &Method, t: &Target, query: &str) -> &'static str {
    match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ if query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1") =>
        {
            "watch"
        }
        _ if t.name.is_none() => "list",
        _ => "get",
    }
}

async fn handle(State(fake): State<FakeKube>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // The test itself acts as a cluster admin (`oc` of a user); RBAC is for the program.
    let admin = req.headers().contains_key(ADMIN_HEADER)
        || req
            .headers()
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == format!("Bearer {ADMIN_TOKEN}").as_bytes());
    let Some(t) = parse(&path) else {
        return status(404, "NotFound", format!("no such path {path}"));
    };
    let verb = verb(&method, &t, &query);
    let resource = match &t.sub {
        Some(sub) => format!("{}/{sub}", t.plural),
        None => t.plural.clone(),
    };
    {
        let mut inner = fake.inner.lock().unwrap();
        inner
            .requests
            .push(format!("{verb} {}/{resource}", t.group));
        if inner.absent.contains(&(t.prefix.clone(), t.plural.clone())) {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        if !admin && !fake.allowed(&t, &resource, verb) {
            let what = format!("{verb} {}/{resource}", t.group);
            inner.denied.push(what.clone());
            return status(403, "Forbidden", format!("RBAC: {what} is not allowed"));
        }
    }
    let body: Bytes = match axum::body::to_bytes(req.into_body(), 4 << 20).await {
        Ok(b) => b,
        Err(e) => return status(400, "BadRequest", e.to_string()),
    };
    match (t.group.as_str(), t.plural.as_str(), verb) {
        ("authentication.k8s.io", "tokenreviews", "create") => return token_review(&fake, &body),
        ("authorization.k8s.io", "subjectaccessreviews", "create") => {
            return access_review(&fake, &body);
        }
        _ => {}
    }
    match verb {
        "watch" => watch(&fake, &t, &query),
        "list" => {
            let inner = fake.inner.lock().unwrap();
            let items: Vec<Value> = inner
                .objects
                .iter()
                .filter(|((p, r, ns, _), obj)| {
                    *p == t.prefix
                        && *r == t.plural
                        && (t.namespace.is_empty() || *ns == t.namespace)
                        && selects(&query, obj)
                })
                .map(|(_, v)| v.clone())
                .collect();
            axum::Json(json!({"apiVersion": "v1", "kind": "List",
                              "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}))
            .into_response()
        }
        _ => write(&fake, &t, verb, &content_type, &body),
    }
}

/// A TokenReview, answered as the API server does: `status.authenticated` and the user.
fn token_review(fake: &FakeKube, body: &[u8]) -> Response {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "not a TokenReview");
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let user = fake.inner.lock().unwrap().users.get(token).cloned();
    let status = match user {
        Some((username, groups)) => json!({"authenticated": true, "user": {
            "username": username, "uid": format!("uid-{username}"), "groups": groups}}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    let mut answer = review;
    answer["status"] = status;
    (StatusCode::CREATED, axum::Json(answer)).into_response()
}

/// A SubjectAccessReview, decided by the rules granted to the user and its groups.
fn access_review(fake: &FakeKube, body: &[u8]) -> Response {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "not a SubjectAccessReview");
    };
    let spec = &review["spec"].clone();
    let user = spec["user"].as_str().unwrap_or_default();
    let mut subjects = vec![format!("user:{user}")];
    subjects.extend(
        spec["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|g| format!("group:{g}")),
    );
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let (verb, group, resource, namespace, name) = match spec.get("resourceAttributes") {
        Some(r) => (
            s(&r["verb"]),
            s(&r["group"]),
            s(&r["resource"]),
            s(&r["namespace"]),
            r["name"].as_str().map(str::to_string),
        ),
        None => {
            let n = &spec["nonResourceAttributes"];
            (
                s(&n["verb"]),
                String::new(),
                s(&n["path"]),
                String::new(),
                None,
            )
        }
    };
    let mut inner = fake.inner.lock().unwrap();
    inner
        .reviews
        .push(format!("{user} {verb} {group}/{resource} {namespace}"));
    let non_resource = spec.get("resourceAttributes").is_none();
    let allowed = inner.grants.iter().any(|(subject, r)| {
        subjects.contains(subject)
            && r.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && (r.names.is_empty() || name.as_ref().is_some_and(|n| r.names.contains(n)))
            && (non_resource == r.groups.is_empty())
            && (non_resource || r.groups.iter().any(|g| *g == group || g == "*"))
            && r.resources.iter().any(|x| *x == resource || x == "*")
            && r.verbs.iter().any(|v| *v == verb || v == "*")
    });
    let mut answer = review;
    answer["status"] = if allowed {
        json!({"allowed": true, "reason": format!("RBAC: allowed by a binding of {user}")})
    } else {
        json!({"allowed": false})
    };
    (StatusCode::CREATED, axum::Json(answer)).into_response()
}

/// Whether the `labelSelector` of a list's query (equality and existence terms) selects
/// `obj`; no selector selects everything.
fn selects(query: &str, obj: &Value) -> bool {
    let Some(selector) = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
        .map(percent_decode)
    else {
        return true;
    };
    let labels = &obj["metadata"]["labels"];
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        match term.split_once("!=").or_else(|| term.split_once('=')) {
            Some((k, v)) if term.contains("!=") => labels[k.trim()] != v.trim(),
            Some((k, v)) => labels[k.trim()] == v.trim_start_matches('=').trim(),
            None => !labels[term.trim()].is_null(),
        }
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A new object (create, or server-side apply of a missing one): checked against its CRD,
/// stamped, stored, announced.
fn insert_new(fake: &FakeKube, inner: &mut Inner, t: &Target, k: Key, obj: Value) -> Response {
    if let Err(why) = fake.validate(t, &obj, None) {
        return status(422, "Invalid", why);
    }
    let obj = fake.stamp(inner, obj, true);
    inner.objects.insert(k, obj.clone());
    fake.publish(
        inner,
        "ADDED",
        &t.prefix,
        &t.plural,
        &t.namespace,
        obj.clone(),
    );
    (StatusCode::CREATED, axum::Json(obj)).into_response()
}

fn key(t: &Target, name: &str) -> Key {
    (
        t.prefix.clone(),
        t.plural.clone(),
        t.namespace.clone(),
        name.to_string(),
    )
}

fn write(fake: &FakeKube, t: &Target, verb: &str, content_type: &str, body: &[u8]) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let mut inner = fake.inner.lock().unwrap();
    if verb == "create" {
        let Some(obj) = parsed else {
            return status(400, "BadRequest", "the body is not JSON");
        };
        let mut obj = obj;
        if !t.namespace.is_empty() {
            obj["metadata"]["namespace"] = json!(t.namespace);
        }
        let name = match obj["metadata"]["name"].as_str() {
            Some(n) => n.to_string(),
            None => match obj["metadata"]["generateName"].as_str() {
                Some(g) => format!("{g}{}", inner.rv + 1),
                None => return status(422, "Invalid", "metadata.name is required"),
            },
        };
        obj["metadata"]["name"] = json!(name);
        let k = key(t, &name);
        if inner.objects.contains_key(&k) {
            return status(
                409,
                "AlreadyExists",
                format!("{} {name:?} already exists", t.plural),
            );
        }
        return insert_new(fake, &mut inner, t, k, obj);
    }
    let Some(name) = t.name.clone() else {
        return status(405, "MethodNotAllowed", "a collection cannot be changed");
    };
    let k = key(t, &name);
    // Server-side apply creates what does not exist yet.
    if verb == "patch"
        && content_type.starts_with("application/apply-patch")
        && !inner.objects.contains_key(&k)
        && let Some(mut obj) = parsed.clone()
    {
        obj["metadata"]["name"] = json!(name);
        if !t.namespace.is_empty() {
            obj["metadata"]["namespace"] = json!(t.namespace);
        }
        return insert_new(fake, &mut inner, t, k, obj);
    }
    let Some(current) = inner.objects.get(&k).cloned() else {
        return status(404, "NotFound", format!("{} {name:?} not found", t.plural));
    };
    if verb == "get" {
        return axum::Json(current).into_response();
    }
    let mut next = match verb {
        "update" => {
            let Some(obj) = parsed else {
                return status(400, "BadRequest", "the body is not JSON");
            };
            if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            obj
        }
        "patch" => {
            let mut doc = current.clone();
            if content_type.starts_with("application/json-patch+json") {
                let patch: json_patch::Patch = match parsed.map(serde_json::from_value) {
                    Some(Ok(p)) => p,
                    _ => return status(400, "BadRequest", "not a JSON patch"),
                };
                if let Err(e) = json_patch::patch(&mut doc, &patch) {
                    return status(
                        422,
                        "Invalid",
                        format!("the JSON patch does not apply: {e}"),
                    );
                }
            } else {
                let Some(patch) = parsed else {
                    return status(400, "BadRequest", "the body is not JSON");
                };
                let wanted_rv = patch["metadata"]["resourceVersion"].clone();
                if !wanted_rv.is_null() && wanted_rv != current["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                json_patch::merge(&mut doc, &patch);
            }
            doc
        }
        "delete" => {
            let finalizers = current["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            if !finalizers {
                inner.objects.remove(&k);
                inner.rv += 1;
                fake.publish(
                    &mut inner,
                    "DELETED",
                    &t.prefix,
                    &t.plural,
                    &t.namespace,
                    current.clone(),
                );
                return axum::Json(current).into_response();
            }
            let mut doc = current.clone();
            doc["metadata"]["deletionTimestamp"] = json!(now());
            doc
        }
        _ => return status(405, "MethodNotAllowed", verb.to_string()),
    };
    // For a kind with a status subresource (the CRDs given), /status changes the status
    // only and the object itself never the status; other kinds are written whole.
    let has_status = fake
        .schemas
        .contains_key(&(t.prefix.clone(), t.plural.clone()));
    match t.sub.as_deref() {
        Some("status") => {
            let mut only = current.clone();
            only["status"] = next["status"].clone();
            next = only;
        }
        _ if has_status => next["status"] = current["status"].clone(),
        _ => {}
    }
    if next.get("status").is_some_and(Value::is_null) {
        next.as_object_mut().map(|o| o.remove("status"));
    }
    if next["spec"] != current["spec"] {
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        next["metadata"]["generation"] = json!(generation);
    }
    for field in ["uid", "creationTimestamp", "deletionTimestamp"] {
        if next["metadata"][field].is_null() && !current["metadata"][field].is_null() {
            next["metadata"][field] = current["metadata"][field].clone();
        }
    }
    if next == current {
        return axum::Json(current).into_response();
    }
    if let Err(why) = fake.validate(t, &next, Some(&current)) {
        return status(422, "Invalid", why);
    }
    let gone = !next["metadata"]["deletionTimestamp"].is_null()
        && next["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
    let next = fake.stamp(&mut inner, next, false);
    if gone {
        inner.objects.remove(&k);
        fake.publish(
            &mut inner,
            "DELETED",
            &t.prefix,
            &t.plural,
            &t.namespace,
            next.clone(),
        );
    } else {
        inner.objects.insert(k, next.clone());
        fake.publish(
            &mut inner,
            "MODIFIED",
            &t.prefix,
            &t.plural,
            &t.namespace,
            next.clone(),
        );
    }
    axum::Json(next).into_response()
}

/// Newline-delimited watch events after the requested resourceVersion, then live ones.
fn watch(fake: &FakeKube, t: &Target, query: &str) -> Response {
    let from: u64 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let matches = {
        let (prefix, plural, ns) = (t.prefix.clone(), t.plural.clone(), t.namespace.clone());
        move |c: &Change| {
            c.prefix == prefix && c.plural == plural && (ns.is_empty() || c.namespace == ns)
        }
    };
    let rx = fake.changes.subscribe();
    let backlog: Vec<Change> = {
        let inner = fake.inner.lock().unwrap();
        inner
            .log
            .iter()
            .filter(|c| c.rv > from && matches(c))
            .cloned()
            .collect()
    };
    let last = backlog.last().map_or(from, |c| c.rv);
    let line = |c: &Change| {
        let mut s =
            serde_json::to_string(&json!({"type": c.kind, "object": c.object})).unwrap_or_default();
        s.push('\n');
        Ok::<_, std::io::Error>(Bytes::from(s))
    };
    let first: Vec<Result<Bytes, std::io::Error>> = backlog.iter().map(line).collect();
    let live = futures::stream::unfold((rx, last), move |(mut rx, last)| {
        let matches = matches.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(c) if c.rv > last && matches(&c) => {
                        let rv = c.rv;
                        return Some((line(&c), (rx, rv)));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    let stream = futures::StreamExt::chain(futures::stream::iter(first), live);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

/// The rules of the ClusterRoles in a YAML file of several documents.
pub fn cluster_role_rules(yaml: &str) -> Vec<Rule> {
    rules_of(yaml, "ClusterRole", None)
}

/// The rules of the Roles in a YAML file, each bound in its namespace (`namespace`, the
/// agent's, for a Role that names none).
pub fn role_rules(yaml: &str, namespace: &str) -> Vec<Rule> {
    rules_of(yaml, "Role", Some(namespace))
}

fn rules_of(yaml: &str, kind: &str, namespace: Option<&str>) -> Vec<Rule> {
    let mut rules = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let Ok(v) = <Value as serde::Deserialize>::deserialize(doc) else {
            continue;
        };
        if v["kind"] != kind {
            continue;
        }
        let namespace = v["metadata"]["namespace"].as_str().or(namespace);
        for r in v["rules"].as_array().into_iter().flatten() {
            let list = |k: &str| -> Vec<String> {
                r[k].as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            };
            rules.push(Rule {
                groups: list("apiGroups"),
                resources: list("resources"),
                verbs: list("verbs"),
                namespace: namespace.map(str::to_string),
                names: list("resourceNames"),
            });
        }
    }
    rules
}

/// A ConfigMap for `oadpContent`: one Velero Backup `apps` (namespace `app`) and the Restore
/// of it, as the Prep validation wants them paired.
pub fn oadp_configmap(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
    "metadata": {"name": name, "namespace": namespace},
    "data": {
        "backup.yaml": "apiVersion: velero.io/v1\nkind: Backup\nmetadata:\n  name: apps\n  namespace: openshift-adp\nspec:\n  includedNamespaces: [app]\n",
        "restore.yaml": "apiVersion: velero.io/v1\nkind: Restore\nmetadata:\n  name: apps\n  namespace: openshift-adp\nspec:\n  backupName: apps\n"
    }})
}

/// A Secret with `data` (base64, as the API serves Secrets).
pub fn secret(namespace: &str, name: &str, type_: &str, data: &[(&str, &str)]) -> Value {
    use base64::Engine as _;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            let encoded = base64::engine::general_purpose::STANDARD.encode(v.as_bytes());
            (k.to_string(), Value::String(encoded))
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": type_,
        "metadata": {"name": name, "namespace": namespace}, "data": data})
}

impl FakeKube {
    /// The objects of a healthy single-node OpenShift cluster `sno1` that the real-node agent
    /// reads before a pivot (`ibu-host.md` section 2, cluster-configuration): its node, the
    /// ClusterVersion, Infrastructure, Proxy, install-config, pull secret, kubeadmin hash,
    /// serving signers, ingress CA and the cluster-version-operator.
    pub fn seed_openshift_sno(&self) {
        let fixture = |name: &str| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cluster");
            std::fs::read_to_string(dir.join(name)).expect("a cluster fixture")
        };
        let config = "apis/config.openshift.io/v1";
        self.seed(
            "api/v1",
            "nodes",
            json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "sno1", "labels": {"node-role.kubernetes.io/master": "",
                "kubernetes.io/hostname": "sno1"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": "192.168.122.10"},
                    {"type": "Hostname", "address": "sno1"}]}}),
        );
        self.seed(
            config,
            "clusterversions",
            json!({"apiVersion": "config.openshift.io/v1",
            "kind": "ClusterVersion", "metadata": {"name": "version"},
            "spec": {"clusterID": "6a0cd8a9-3e5b-4a4b-9a54-0a5ab1e8f3a2"}}),
        );
        self.seed(
            config,
            "infrastructures",
            json!({"apiVersion": "config.openshift.io/v1",
            "kind": "Infrastructure", "metadata": {"name": "cluster"},
            "status": {"infrastructureName": "sno1-x7k2p"}}),
        );
        self.seed(
            config,
            "proxies",
            json!({"apiVersion": "config.openshift.io/v1",
            "kind": "Proxy", "metadata": {"name": "cluster"}, "spec": {"trustedCA": {"name": ""}},
            "status": {}}),
        );
        let install_config = "apiVersion: v1\nbaseDomain: example.com\nmetadata:\n  name: sno1\nnetworking:\n  machineNetwork:\n  - cidr: 192.168.122.0/24\n  networkType: OVNKubernetes\n";
        self.seed(
            "api/v1",
            "configmaps",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cluster-config-v1", "namespace": "kube-system"},
            "data": {"install-config": install_config}}),
        );
        self.seed(
            "api/v1",
            "configmaps",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "admin-kubeconfig-client-ca", "namespace": "openshift-config"},
            "data": {"ca-bundle.crt": fixture("admin-kubeconfig-client-ca.crt")}}),
        );
        self.seed(
            "api/v1",
            "secrets",
            secret(
                "openshift-config",
                "pull-secret",
                "kubernetes.io/dockerconfigjson",
                &[(
                    ".dockerconfigjson",
                    "{\"auths\":{\"quay.io\":{\"auth\":\"c25vMTpwdWxs\"}}}",
                )],
            ),
        );
        self.seed(
            "api/v1",
            "secrets",
            secret(
                "kube-system",
                "kubeadmin",
                "Opaque",
                &[(
                    "kubeadmin",
                    "$2a$10$fakeKubeadminPasswordHashForTheSno1Cluster0123456789",
                )],
            ),
        );
        let key = fixture("serving-signer.key");
        for name in [
            "localhost-serving-signer",
            "service-network-serving-signer",
            "loadbalancer-serving-signer",
        ] {
            self.seed(
                "api/v1",
                "secrets",
                secret(
                    "openshift-kube-apiserver-operator",
                    name,
                    "kubernetes.io/tls",
                    &[("tls.key", &key), ("tls.crt", "")],
                ),
            );
        }
        self.seed(
            "api/v1",
            "secrets",
            secret(
                "openshift-ingress-operator",
                "router-ca",
                "kubernetes.io/tls",
                &[
                    ("tls.key", &fixture("router-ca.key")),
                    ("tls.crt", &fixture("router-ca.crt")),
                ],
            ),
        );
        self.seed("apis/apps/v1", "deployments", json!({"apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "cluster-version-operator", "namespace": "openshift-cluster-version"},
            "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "cluster-version-operator",
                "image": "quay.io/openshift-release-dev/ocp-release@sha256:4d5c7a1e"}]}}}}));
    }
}
