//! `/openapi.json`: the REST API described from the code. Paths come from [`OPERATIONS`],
//! which a test checks against the router; schemas come from the Rust types themselves.

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Value, json};

use fleet_types::Status;
use fleet_types::ibgu::ImageBasedGroupUpgrade;
use fleet_types::messages::{RegisterRequest, RegisterResponse, StatusReport};

use super::api::ConfigMap;
use crate::store::{ClusterRecord, HistoryEntry};

/// Who may call an operation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Open,
    Admin,
    Join,
    ClusterCredential,
}

#[derive(Clone, Copy)]
pub enum Body {
    None,
    Ibgu,
    IbguList,
    Cluster,
    ClusterList,
    Register,
    Registered,
    Report,
    ConfigMap,
    History,
    Audit,
    Patch,
    Text,
    Any,
}

pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub auth: Auth,
    pub request: Body,
    pub response: (u16, Body),
}

const fn op(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    auth: Auth,
    request: Body,
    response: (u16, Body),
) -> Operation {
    Operation {
        method,
        path,
        summary,
        auth,
        request,
        response,
    }
}

/// Every operation of the hub's HTTP API.
pub const OPERATIONS: &[Operation] = &[
    op(
        "post",
        "/v1/clusters/register",
        "Register a spoke; answers its credential",
        Auth::Join,
        Body::Register,
        (200, Body::Registered),
    ),
    op(
        "post",
        "/v1/clusters/{name}/status",
        "A spoke's IBU after a change; stale and duplicate reports are ignored",
        Auth::ClusterCredential,
        Body::Report,
        (200, Body::Any),
    ),
    op(
        "post",
        "/v1/clusters/{name}/credential",
        "Trade the cluster's valid credential for a new one; the old one is refused from then on",
        Auth::ClusterCredential,
        Body::None,
        (200, Body::Registered),
    ),
    op(
        "get",
        "/v1/clusters",
        "List clusters, optionally by labelSelector",
        Auth::Admin,
        Body::None,
        (200, Body::ClusterList),
    ),
    op(
        "get",
        "/v1/clusters/{name}",
        "One cluster",
        Auth::Admin,
        Body::None,
        (200, Body::Cluster),
    ),
    op(
        "patch",
        "/v1/clusters/{name}",
        "Merge labels ({\"labels\":{...}}, null removes)",
        Auth::Admin,
        Body::Patch,
        (200, Body::Cluster),
    ),
    op(
        "delete",
        "/v1/clusters/{name}",
        "Remove a cluster from the inventory (409 while a running rollout has it); its history stays",
        Auth::Admin,
        Body::None,
        (200, Body::Any),
    ),
    op(
        "post",
        "/v1/rollouts",
        "Create an ImageBasedGroupUpgrade (dryRun=All: answer the plan, store nothing; fieldValidation=Strict|Warn|Ignore: unknown fields refused, warned of, or dropped)",
        Auth::Admin,
        Body::Ibgu,
        (201, Body::Ibgu),
    ),
    op(
        "get",
        "/v1/rollouts",
        "List rollouts",
        Auth::Admin,
        Body::None,
        (200, Body::IbguList),
    ),
    op(
        "get",
        "/v1/rollouts/{namespace}/{name}",
        "One rollout with its status",
        Auth::Admin,
        Body::None,
        (200, Body::Ibgu),
    ),
    op(
        "patch",
        "/v1/rollouts/{namespace}/{name}",
        "JSON patch or merge patch; append-only plan, immutable ibuSpec and selectors; fieldValidation as for create",
        Auth::Admin,
        Body::Patch,
        (200, Body::Ibgu),
    ),
    op(
        "delete",
        "/v1/rollouts/{namespace}/{name}",
        "Delete a rollout; its history and the labels stay",
        Auth::Admin,
        Body::None,
        (200, Body::Any),
    ),
    op(
        "post",
        "/v1/rollouts/{namespace}/{name}/pause",
        "Pause: the merge patch {\"spec\":{\"paused\":true}}, in history with who asked",
        Auth::Admin,
        Body::None,
        (200, Body::Ibgu),
    ),
    op(
        "post",
        "/v1/rollouts/{namespace}/{name}/resume",
        "Resume: the merge patch {\"spec\":{\"paused\":false}}, in history with who asked",
        Auth::Admin,
        Body::None,
        (200, Body::Ibgu),
    ),
    op(
        "get",
        "/v1/rollouts/{namespace}/{name}/history",
        "Every recorded transition, oldest first (cluster= filters)",
        Auth::Admin,
        Body::None,
        (200, Body::History),
    ),
    op(
        "get",
        "/v1/audit",
        "Every change made through the API or a CR, oldest first: who, from where, with which request id (since=RFC 3339 time, limit=1..5000, default 500)",
        Auth::Admin,
        Body::None,
        (200, Body::Audit),
    ),
    op(
        "get",
        "/v1/configmaps/{namespace}/{name}",
        "A ConfigMap rollouts refer to",
        Auth::Admin,
        Body::None,
        (200, Body::ConfigMap),
    ),
    op(
        "put",
        "/v1/configmaps/{namespace}/{name}",
        "Create or replace a ConfigMap",
        Auth::Admin,
        Body::ConfigMap,
        (200, Body::ConfigMap),
    ),
    op(
        "delete",
        "/v1/configmaps/{namespace}/{name}",
        "Delete a ConfigMap",
        Auth::Admin,
        Body::None,
        (204, Body::None),
    ),
    op(
        "get",
        "/healthz",
        "Liveness",
        Auth::Open,
        Body::None,
        (200, Body::Any),
    ),
    op(
        "get",
        "/readyz",
        "Database reachable and migrated",
        Auth::Open,
        Body::None,
        (200, Body::Any),
    ),
    op(
        "get",
        "/metrics",
        "Prometheus metrics",
        Auth::Open,
        Body::None,
        (200, Body::Text),
    ),
    op(
        "get",
        "/openapi.json",
        "This document",
        Auth::Open,
        Body::None,
        (200, Body::Any),
    ),
];

fn items(item: Schema) -> Value {
    json!({"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": item}}})
}

fn schema_for(generator: &mut SchemaGenerator, body: Body) -> Option<Value> {
    let s = |s: Schema| Some(s.to_value());
    match body {
        Body::None => None,
        Body::Ibgu => s(generator.subschema_for::<ImageBasedGroupUpgrade>()),
        Body::IbguList => Some(items(generator.subschema_for::<ImageBasedGroupUpgrade>())),
        Body::Cluster => s(generator.subschema_for::<ClusterRecord>()),
        Body::ClusterList => Some(items(generator.subschema_for::<ClusterRecord>())),
        Body::Register => s(generator.subschema_for::<RegisterRequest>()),
        Body::Registered => s(generator.subschema_for::<RegisterResponse>()),
        Body::Report => s(generator.subschema_for::<StatusReport>()),
        Body::ConfigMap => s(generator.subschema_for::<ConfigMap>()),
        Body::History => Some(items(generator.subschema_for::<HistoryEntry>())),
        Body::Audit => Some(items(generator.subschema_for::<crate::store::AuditEntry>())),
        Body::Patch | Body::Any => Some(json!({})),
        Body::Text => Some(json!({"type": "string"})),
    }
}

fn ref_to<T: JsonSchema>(generator: &mut SchemaGenerator) -> Value {
    generator.subschema_for::<T>().to_value()
}

pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut generator = settings.into_generator();
    let status = ref_to::<Status>(&mut generator);
    let mut paths = serde_json::Map::new();
    for o in OPERATIONS {
        let mut operation = json!({
            "summary": o.summary,
            "operationId": format!("{}{}", o.method, o.path.replace(['/', '{', '}', '.'], "_")),
        });
        let params: Vec<Value> = o
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            operation["parameters"] = Value::Array(params);
        }
        if o.auth != Auth::Open {
            operation["security"] = json!([{"bearer": []}]);
            operation["description"] = Value::String(
                match o.auth {
                    Auth::Admin => "Bearer: the admin token.",
                    Auth::Join => {
                        "Bearer: the join token, or the credential already issued to this cluster (to register a renewed certificate or a new endpoint)."
                    }
                    Auth::ClusterCredential => "Bearer: the credential issued to this cluster.",
                    Auth::Open => "",
                }
                .into(),
            );
        }
        if let Some(req) = schema_for(&mut generator, o.request) {
            operation["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": req}}});
        }
        let (code, body) = o.response;
        let mut ok = json!({"description": "success"});
        if let Some(res) = schema_for(&mut generator, body) {
            let media = if matches!(body, Body::Text) {
                "text/plain"
            } else {
                "application/json"
            };
            ok["content"] = json!({ media: {"schema": res} });
        }
        operation["responses"] = json!({
            code.to_string(): ok,
            "default": {"description": "a Kubernetes Status", "content": {"application/json": {"schema": status.clone()}}},
        });
        let entry = paths.entry(o.path.to_string()).or_insert_with(|| json!({}));
        entry[o.method] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "fleet-hub",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Rolls ImageBasedGroupUpgrades across a fleet of single-node OpenShift clusters.",
        },
        "paths": paths,
        "components": {
            "schemas": generator.take_definitions(true),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}
