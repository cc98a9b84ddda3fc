//! The REST API of the contract: clusters (registration, reports, labels), rollouts,
//! history, ConfigMaps. Handlers check, call the store, and trigger the engine.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use fleet_types::ibgu::ImageBasedGroupUpgrade;
use fleet_types::ibu::ConfigMapRef;
use fleet_types::messages::{RegisterRequest, RegisterResponse, StatusReport};

use super::audit::{AuditContext, AuditNote};
use super::auth::{Access, Kind, authorize};
use crate::store::CredentialCheck;
use fleet_server::tls::ClientCert;
use fleet_types::{Reason, Status};
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, AppState, Shared};
use crate::planner::{rollout, selector};
use crate::rollouts::{self, Verdict};
use crate::store;
use crate::store::Stored;

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    fleet_types::http::bearer(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
}

#[derive(Deserialize)]
pub struct AuditQuery {
    since: Option<String>,
    limit: Option<i64>,
}

/// Most audit entries one answer holds.
const AUDIT_LIMIT: i64 = 5000;

/// `GET /v1/audit?since=RFC3339&limit=N`: the changes from then on, oldest first.
pub async fn audit_list(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Items<store::AuditEntry>>, ApiError> {
    authorize(&state, &headers, Access::new("get", Kind::Audit)).await?;
    let since = q
        .since
        .as_deref()
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.to_utc())
                .map_err(|e| {
                    ApiError::new(
                        Reason::BadRequest,
                        format!("since={s:?} is not an RFC 3339 time (2026-12-05T10:00:00Z): {e}"),
                    )
                })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(500);
    if !(1..=AUDIT_LIMIT).contains(&limit) {
        return Err(ApiError::new(
            Reason::BadRequest,
            format!("limit={limit}: between 1 and {AUDIT_LIMIT}"),
        ));
    }
    Ok(Json(Items {
        items: store::audit_list(&state.pool, since, limit).await?,
    }))
}

fn json_body<'a, T: Deserialize<'a>>(body: &'a Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(Reason::Invalid, format!("{what}: {e}")))
}

/// A manifest as users of `oc` and `kubectl` write it: JSON or YAML, as the body says.
fn manifest_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
    what: &str,
) -> Result<T, ApiError> {
    const MANIFESTS: [&str; 4] = [
        "application/json",
        "application/yaml",
        "application/x-yaml",
        "text/yaml",
    ];
    match fleet_server::accept_media_type(headers, &MANIFESTS, what)? {
        "application/json" => serde_json::from_slice(body)
            .map_err(|e| ApiError::new(Reason::Invalid, format!("{what}: {e}"))),
        _ => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::new(Reason::Invalid, format!("{what}: {e}"))),
    }
}

/// A status report's IBU, unparsed.
#[derive(Deserialize)]
struct ReportText<'a> {
    #[serde(borrow)]
    ibu: &'a serde_json::value::RawValue,
}

/// The text of the report's IBU to store: as the spoke wrote it (a second, shallow read of a
/// body already found valid), not written out again from what was parsed. Unless it holds a
/// `\u` escape: serde_json lets a lone surrogate escape by in a field the hub does not read,
/// and Postgres's `json` keeps it, but no later read of the row could parse it. Those few are
/// written out from what was parsed.
fn report_text(body: &Bytes, report: &StatusReport) -> Result<String, ApiError> {
    let received: ReportText = json_body(body, "status report")?;
    let text = received.ibu.get();
    if !text.contains("\\u") {
        return Ok(text.to_string());
    }
    serde_json::to_string(&report.ibu)
        .map_err(|e| ApiError::new(Reason::InternalError, format!("status report: {e}")))
}

/// The client certificate the connection's handshake verified (`--client-ca-file`).
type ClientCertExt = Option<Extension<Option<ClientCert>>>;

fn client_cert(ext: ClientCertExt) -> Option<ClientCert> {
    ext.and_then(|Extension(c)| c)
}

pub async fn register(
    State(state): State<Shared>,
    client: ClientCertExt,
    audit: Option<Extension<AuditContext>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(Extension<AuditNote>, Json<RegisterResponse>), ApiError> {
    let join = state.join_token_now();
    let presented = bearer(&headers);
    let cert = client_cert(client);
    // The join token, a client certificate naming the cluster, or (a spoke registering its
    // renewed certificate or a new endpoint) the cluster's own credential: the last two are
    // checked once the name is known.
    let joined = match (join.as_deref(), presented) {
        (None, _) => true,
        (Some(join), Some(t)) => fleet_types::http::tokens_match(t, join),
        (Some(_), None) => false,
    };
    let needs_join = || ApiError::new(Reason::Unauthorized, "registration needs the join token");
    if !joined && presented.is_none() && cert.is_none() {
        return Err(needs_join());
    }
    let req: RegisterRequest = json_body(&body, "registration")?;
    let now = state.engine.clock.now();
    let by_cert = !joined && cert.as_ref().is_some_and(|c| c.names(&req.name));
    if !joined && !by_cert {
        let Some(credential) = presented else {
            return Err(needs_join());
        };
        let check = store::cluster_credential_check(&state.pool, &req.name, credential, now);
        if check.await? != CredentialCheck::Valid {
            return Err(needs_join());
        }
    }
    let mut problems = Vec::new();
    // A cluster's name is a DNS-1123 label, as a ManagedCluster's is.
    if let Err(why) = fleet_types::names::dns1123_label(&req.name) {
        problems.push(("name", why));
    }
    if !(req.endpoint.starts_with("http://") || req.endpoint.starts_with("https://")) {
        problems.push(("endpoint", "endpoint must be an http(s) URL".into()));
    }
    if let Some(pin) = &req.certificate_sha256 {
        if !fleet_server::tls::is_fingerprint(pin) {
            problems.push((
                "certificateSha256",
                "certificateSha256 must be the 64 lowercase hex digits of the certificate's SHA-256".into(),
            ));
        } else if !req.endpoint.starts_with("https://") {
            problems.push((
                "certificateSha256",
                "certificateSha256 is for an https endpoint".into(),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::from(Status::invalid(
            problems
                .into_iter()
                .map(|(field, message)| fleet_types::status::StatusCause {
                    field: field.into(),
                    message,
                })
                .collect(),
        )));
    }
    let mut note = AuditNote {
        actor: Some(if joined {
            "join-token".into()
        } else if by_cert {
            format!("cert:{}", req.name)
        } else {
            format!("cluster:{}", req.name)
        }),
        name: Some(req.name.clone()),
        message: match &req.certificate_sha256 {
            Some(pin) => format!("endpoint {}, certificate sha256:{pin}", req.endpoint),
            None => format!("endpoint {}", req.endpoint),
        },
        ..AuditNote::default()
    };
    // The entry goes into the registration's own transaction.
    let entry = audit.map(|Extension(context)| {
        let actor = super::auth::actor(&state, &headers, Some(&req.name));
        context.entry(now, actor, axum::http::StatusCode::OK, note.clone())
    });
    note.written = entry.is_some();
    let registering = store::Registering {
        request: req,
        now,
        ttl: state.credential_ttl,
        audit: entry,
    };
    let name = registering.request.name.clone();
    let endpoint = registering.request.endpoint.clone();
    let issued = state.engine.registrations.register(registering).await?;
    tracing::info!(cluster = %name, %endpoint, "spoke registered");
    Ok((
        Extension(note),
        Json(RegisterResponse {
            name,
            credential: issued.credential,
            expires_at: issued.expires_at,
        }),
    ))
}

/// Refuses a credential that is not valid for the cluster: an expired one with 401 (the
/// agent registers again), another cluster's or an unknown one with 403 saying it may not
/// `act` (`report for`, `renew the credential of`) the cluster.
async fn check_credential(
    state: &AppState,
    name: &str,
    credential: &str,
    act: &str,
) -> Result<(), ApiError> {
    let now = state.engine.clock.now();
    match store::cluster_credential_check(&state.pool, name, credential, now).await? {
        CredentialCheck::Valid => Ok(()),
        CredentialCheck::Expired(at) => Err(ApiError::new(
            Reason::Unauthorized,
            format!(
                "the credential of cluster {name} expired at {}; register again",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        )),
        CredentialCheck::Unknown => Err(ApiError::new(
            Reason::Forbidden,
            format!("this credential may not {act} cluster {name}"),
        )),
    }
}

/// `POST /v1/clusters/{name}/credential`: the agent trades its valid credential for a new
/// one (at two thirds of its life); the old one is refused from then on.
pub async fn renew_credential(
    State(state): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<RegisterResponse>, ApiError> {
    let Some(credential) = bearer(&headers) else {
        return Err(ApiError::new(Reason::Unauthorized, "missing bearer token"));
    };
    const RENEW: &str = "renew the credential of";
    check_credential(&state, &name, credential, RENEW).await?;
    let now = state.engine.clock.now();
    let renewed =
        store::cluster_renew_credential(&state.pool, &name, credential, now, state.credential_ttl)
            .await?;
    // Checked above; replaced meanwhile (a concurrent renewal or registration): refused.
    let issued = renewed.ok_or_else(|| {
        ApiError::new(
            Reason::Forbidden,
            format!("this credential may not {RENEW} cluster {name}"),
        )
    })?;
    tracing::info!(cluster = %name, expires_at = ?issued.expires_at, "credential renewed");
    Ok(Json(RegisterResponse {
        name,
        credential: issued.credential,
        expires_at: issued.expires_at,
    }))
}

pub async fn report(
    State(state): State<Shared>,
    Path(name): Path<String>,
    client: ClientCertExt,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let counted = |result: &str| state.metrics.reports.with_label_values(&[result]).inc();
    // A client certificate naming the cluster stands for its credential.
    let by_cert = match client_cert(client) {
        Some(cert) if cert.names(&name) && bearer(&headers).is_none() => {
            let now = state.engine.clock.now();
            store::cluster_current_credential(&state.pool, &name, now).await?
        }
        _ => None,
    };
    let Some(credential) = by_cert.as_deref().or_else(|| bearer(&headers)) else {
        counted("rejected");
        return Err(ApiError::new(Reason::Unauthorized, "missing bearer token"));
    };
    // Who sends it first: a caller without this cluster's valid credential costs no parsing
    // and learns nothing of what a report must hold.
    check_credential(&state, &name, credential, "report for")
        .await
        .inspect_err(|_| counted("rejected"))?;
    let report: StatusReport =
        json_body(&body, "status report").inspect_err(|_| counted("rejected"))?;
    let text = report_text(&body, &report).inspect_err(|_| counted("rejected"))?;
    // The credential is checked by the statement that stores the report (one query for a
    // whole group of reports rather than one per report).
    let stored = match state
        .engine
        .reports
        .store(
            &name,
            credential,
            &report.agent_id,
            report.sequence,
            report.ibu,
            text,
        )
        .await?
    {
        Stored::Forbidden => {
            counted("rejected");
            // A spoke can report only for itself.
            return Err(ApiError::new(
                Reason::Forbidden,
                format!("this credential may not report for cluster {name}"),
            ));
        }
        Stored::Yes => {
            counted("stored");
            state.engine.trigger();
            true
        }
        Stored::Stale => {
            counted("stale");
            false
        }
    };
    Ok((
        StatusCode::OK,
        Json(serde_json::json!({"accepted": stored})),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct ClusterQuery {
    #[serde(rename = "labelSelector")]
    label_selector: Option<String>,
}

#[derive(serde::Serialize)]
pub struct Items<T> {
    pub items: Vec<T>,
}

pub async fn cluster_list(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<ClusterQuery>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::new("list", Kind::Clusters)).await?;
    let sel = match q.label_selector.as_deref() {
        Some(s) => Some(
            selector::parse(s)
                .map_err(|e| ApiError::new(Reason::BadRequest, format!("labelSelector: {e}")))?,
        ),
        None => None,
    };
    let items: Vec<_> = store::cluster_list(&state.pool)
        .await?
        .into_iter()
        .filter(|c| sel.as_ref().is_none_or(|s| selector::matches(s, &c.labels)))
        .collect();
    Ok(Json(Items { items }).into_response())
}

fn cluster_not_found(name: &str) -> ApiError {
    ApiError::new(Reason::NotFound, format!("cluster {name} not found"))
}

pub async fn cluster_get(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("get", Kind::Clusters).named(&name),
    )
    .await?;
    match store::cluster_fetch(&state.pool, &name).await? {
        Some(c) => Ok(Json(c).into_response()),
        None => Err(cluster_not_found(&name)),
    }
}

pub async fn cluster_patch(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("patch", Kind::Clusters).named(&name),
    )
    .await?;
    fleet_server::accept_media_type(
        &headers,
        &["application/merge-patch+json", "application/json"],
        "a cluster patch",
    )?;
    let patch: Value = json_body(&body, "patch")?;
    let labels = patch
        .get("labels")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::new(Reason::Invalid, "the patch must be {\"labels\": {...}}"))?;
    if let Some((k, _)) = labels.iter().find(|(_, v)| !(v.is_string() || v.is_null())) {
        return Err(ApiError::new(
            Reason::Invalid,
            format!("label {k}: values are strings (or null to remove)"),
        ));
    }
    match store::cluster_patch_labels(&state.pool, &name, labels).await? {
        Some(c) => Ok(Json(c).into_response()),
        None => Err(cluster_not_found(&name)),
    }
}

pub async fn cluster_delete(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("delete", Kind::Clusters).named(&name),
    )
    .await?;
    match store::cluster_delete(&state.pool, &name).await? {
        store::ClusterDeleted::Deleted => {
            let note = AuditNote {
                message: "its credential is revoked".into(),
                ..AuditNote::default()
            };
            Ok((
                Extension(note),
                Json(fleet_types::status::success(format!(
                    "cluster {name} deleted; its history is kept"
                ))),
            )
                .into_response())
        }
        store::ClusterDeleted::NotFound => Err(cluster_not_found(&name)),
        store::ClusterDeleted::InRollouts(rollouts) => Err(ApiError::new(
            Reason::Conflict,
            format!(
                "cluster {name} is in a running rollout ({}): delete it when the rollout \
                 completes, or delete the rollout first",
                rollouts.join(", ")
            ),
        )),
    }
}

#[derive(Deserialize)]
pub struct CreateQuery {
    #[serde(rename = "dryRun")]
    dry_run: Option<String>,
    #[serde(rename = "fieldValidation")]
    field_validation: Option<String>,
}

#[derive(Deserialize)]
pub struct PatchQuery {
    #[serde(rename = "fieldValidation")]
    field_validation: Option<String>,
}

/// An IBGU document checked for fields its schema does not declare (`?fieldValidation=`),
/// then read: answers it and the `Warning` headers to answer with.
fn ibgu_from(
    doc: Value,
    field_validation: Option<&str>,
) -> Result<(ImageBasedGroupUpgrade, HeaderMap), ApiError> {
    use super::fields::{FieldValidation, apply, unknown_ibgu_fields};
    let mode = FieldValidation::parse(field_validation)?;
    let warnings = apply(mode, unknown_ibgu_fields(&doc))?;
    let obj = serde_json::from_value(doc)
        .map_err(|e| ApiError::new(Reason::Invalid, format!("ImageBasedGroupUpgrade: {e}")))?;
    Ok((obj, warnings))
}

/// The checks of a create, for a dry run (which stores nothing).
async fn validation(state: &AppState, new: &ImageBasedGroupUpgrade) -> Result<(), ApiError> {
    let causes = rollouts::problems(&state.pool, new, None).await?;
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::from(Status::invalid(causes)))
    }
}

pub async fn rollout_create(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<CreateQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = super::auth::authenticate(&state, &headers).await?;
    // A Kubernetes user's right depends on the namespace, which the body names; the others'
    // do not, and are checked before the body is read.
    let kube_user = matches!(caller, super::auth::Caller::Kube(_));
    if !kube_user {
        super::auth::permit(&state, &caller, Access::new("create", Kind::Rollouts)).await?;
    }
    let doc: Value = manifest_body(&headers, &body, "ImageBasedGroupUpgrade")?;
    let (mut obj, warnings) = ibgu_from(doc, q.field_validation.as_deref())?;
    if obj.metadata.namespace.as_deref().is_none_or(str::is_empty) {
        obj.metadata.namespace = Some("default".into());
    }
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    if kube_user {
        let access = Access::new("create", Kind::Rollouts).at(&ns, obj.metadata.name.as_deref());
        super::auth::permit(&state, &caller, access).await?;
    }
    match q.dry_run.as_deref() {
        Some("All") => {
            validation(&state, &obj).await?;
            let mut answer = dry_run(&state, &obj).await?;
            answer.headers_mut().extend(warnings);
            return Ok(answer);
        }
        Some(other) => {
            return Err(ApiError::new(
                Reason::BadRequest,
                format!("dryRun={other}: only dryRun=All is supported"),
            ));
        }
        None => {}
    }
    match rollouts::create(&state.pool, &state.engine, &obj).await? {
        Verdict::Stored(row) => {
            let note = AuditNote {
                namespace: row.object.metadata.namespace.clone(),
                name: row.object.metadata.name.clone(),
                ..AuditNote::default()
            };
            Ok((
                StatusCode::CREATED,
                warnings,
                Extension(note),
                Json(row.object),
            )
                .into_response())
        }
        Verdict::Refused(causes) => Err(ApiError::from(Status::invalid(causes))),
    }
}

/// The plan computed without storing anything: the first step's selection and batches as
/// the rollout controls shape them (canary batch, growing batches, disruption budget; later
/// steps select by the labels earlier ones leave, so they show their selectors), and when
/// the maintenance window next lets clusters start.
async fn dry_run(state: &AppState, obj: &ImageBasedGroupUpgrade) -> Result<Response, ApiError> {
    let fleet: BTreeMap<String, rollout::ClusterInfo> = store::cluster_list(&state.pool)
        .await?
        .into_iter()
        .map(|c| {
            (
                c.name,
                rollout::ClusterInfo {
                    labels: c.labels,
                    ibu: None,
                },
            )
        })
        .collect();
    let steps: Vec<Value> = obj
        .spec
        .plan
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let first = item.actions[0];
            let max = item.rollout_strategy.max_concurrency.max(1) as usize;
            let strategy = &item.rollout_strategy;
            let mut step = serde_json::json!({
                "step": i,
                "actions": item.actions,
                "maxConcurrency": max,
                "timeoutMinutes": strategy.timeout_minutes(),
                "rolloutStrategy": strategy,
                "selectors": rollout::item_selectors(&obj.spec.cluster_label_selectors, first),
            });
            if i == 0 {
                let clusters = rollout::select(&obj.spec.cluster_label_selectors, first, &fleet);
                let (order, ends) = rollout::shape(&clusters, &fleet, strategy);
                let batches: Vec<Vec<String>> = if ends.is_empty() {
                    order.chunks(max).map(|c| c.to_vec()).collect()
                } else {
                    let mut start = 0;
                    ends.iter()
                        .map(|&end| {
                            let b = order[start..end].to_vec();
                            start = end;
                            b
                        })
                        .collect()
                };
                step["clusters"] = serde_json::json!(clusters);
                step["batches"] = serde_json::json!(batches);
                if strategy.canary_clusters.unwrap_or(0) > 0 && !batches.is_empty() {
                    step["canaryBatch"] = serde_json::json!(batches[0]);
                }
            }
            step
        })
        .collect();
    let mut plan = serde_json::json!({"kind": "RolloutPlan", "dryRun": true, "steps": steps});
    if obj.spec.paused {
        plan["paused"] = serde_json::json!(true);
    }
    if let Some(w) = &obj.spec.maintenance_window
        && let Some(at) = crate::planner::controls::window(w, chrono::Utc::now())
    {
        plan["maintenanceWindow"] = serde_json::json!({
            "open": at.open,
            "nextOpen": at.next_open,
        });
    }
    Ok(Json(plan).into_response())
}

pub async fn rollout_list(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Access::new("list", Kind::Rollouts)).await?;
    let items: Vec<ImageBasedGroupUpgrade> = store::rollout_list(&state.pool)
        .await?
        .into_iter()
        .map(|r| r.object)
        .collect();
    Ok(Json(Items { items }).into_response())
}

async fn fetch(state: &AppState, ns: &str, name: &str) -> Result<store::RolloutRow, ApiError> {
    store::rollout_fetch(&state.pool, ns, name)
        .await?
        .ok_or_else(|| rollout_not_found(ns, name))
}

/// The rollout as stored, without the per-cluster status (a row per cluster to read).
async fn fetch_stored(
    state: &AppState,
    ns: &str,
    name: &str,
) -> Result<store::RolloutRow, ApiError> {
    store::rollout_fetch_stored(&state.pool, ns, name)
        .await?
        .ok_or_else(|| rollout_not_found(ns, name))
}

fn rollout_not_found(ns: &str, name: &str) -> ApiError {
    ApiError::new(Reason::NotFound, format!("rollout {ns}/{name} not found"))
}

pub async fn rollout_get(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("get", Kind::Rollouts).at(&ns, Some(&name)),
    )
    .await?;
    Ok(Json(fetch(&state, &ns, &name).await?.object).into_response())
}

pub async fn rollout_patch(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<PatchQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("patch", Kind::Rollouts).at(&ns, Some(&name)),
    )
    .await?;
    const PATCHES: [&str; 3] = [
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/json",
    ];
    let media_type = fleet_server::accept_media_type(&headers, &PATCHES, "a rollout patch")?;
    let row = fetch(&state, &ns, &name).await?;
    let mut doc = serde_json::to_value(&row.object)
        .map_err(|e| ApiError::new(Reason::InternalError, e.to_string()))?;
    match media_type {
        "application/json-patch+json" => {
            let patch: json_patch::Patch = json_body(&body, "JSON patch")?;
            json_patch::patch(&mut doc, &patch)
                .map_err(|e| ApiError::new(Reason::Invalid, format!("JSON patch: {e}")))?;
        }
        _ => {
            let patch: Value = json_body(&body, "merge patch")?;
            json_patch::merge(&mut doc, &patch);
        }
    }
    let (mut new, warnings) = ibgu_from(doc, q.field_validation.as_deref())?;
    if new.metadata.name != row.object.metadata.name
        || new.metadata.namespace != row.object.metadata.namespace
    {
        return Err(ApiError::new(
            Reason::Invalid,
            "metadata.name and metadata.namespace cannot change",
        ));
    }
    new.status = row.object.status.clone();
    let (actor, _) = super::auth::actor(&state, &headers, None);
    match rollouts::change(&state.pool, &state.engine, &row, &new, &actor).await? {
        Verdict::Stored(_) => {
            let answer = fetch(&state, &ns, &name).await?.object;
            Ok((warnings, Json(answer)).into_response())
        }
        Verdict::Refused(causes) => Err(ApiError::from(Status::invalid(causes))),
    }
}

/// `POST .../pause`: the merge patch `{"spec":{"paused":true}}`, recorded with who asked.
pub async fn rollout_pause(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    set_paused(&state, &headers, &ns, &name, true).await
}

/// `POST .../resume`: the merge patch `{"spec":{"paused":false}}`.
pub async fn rollout_resume(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    set_paused(&state, &headers, &ns, &name, false).await
}

async fn set_paused(
    state: &AppState,
    headers: &HeaderMap,
    ns: &str,
    name: &str,
    paused: bool,
) -> Result<Response, ApiError> {
    authorize(
        state,
        headers,
        Access::new("patch", Kind::Rollouts).at(ns, Some(name)),
    )
    .await?;
    let row = fetch_stored(state, ns, name).await?;
    let mut new = row.object.clone();
    new.spec.paused = paused;
    let (actor, _) = super::auth::actor(state, headers, None);
    match rollouts::change(&state.pool, &state.engine, &row, &new, &actor).await? {
        Verdict::Stored(_) => Ok(Json(fetch(state, ns, name).await?.object).into_response()),
        Verdict::Refused(causes) => Err(ApiError::from(Status::invalid(causes))),
    }
}

pub async fn rollout_delete(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("delete", Kind::Rollouts).at(&ns, Some(&name)),
    )
    .await?;
    if store::rollout_delete(&state.pool, &ns, &name).await? {
        Ok(Json(fleet_types::status::success(format!(
            "rollout {ns}/{name} deleted; its history is kept"
        )))
        .into_response())
    } else {
        Err(ApiError::new(
            Reason::NotFound,
            format!("rollout {ns}/{name} not found"),
        ))
    }
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    cluster: Option<String>,
}

pub async fn history(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("get", Kind::Rollouts).at(&ns, Some(&name)),
    )
    .await?;
    let row = fetch_stored(&state, &ns, &name).await?;
    let items = store::history_list(&state.pool, row.id, q.cluster.as_deref()).await?;
    Ok(Json(Items { items }).into_response())
}

#[derive(serde::Serialize, Deserialize, schemars::JsonSchema)]
pub struct ConfigMap {
    pub metadata: ConfigMapRef,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

pub async fn configmap_get(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("get", Kind::ConfigMaps).at(&ns, Some(&name)),
    )
    .await?;
    match store::configmap_fetch(&state.pool, &ns, &name).await? {
        Some(data) => Ok(Json(ConfigMap {
            metadata: ConfigMapRef {
                name,
                namespace: ns,
            },
            data,
        })
        .into_response()),
        None => Err(ApiError::new(
            Reason::NotFound,
            format!("configmap {ns}/{name} not found"),
        )),
    }
}

pub async fn configmap_put(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("update", Kind::ConfigMaps).at(&ns, Some(&name)),
    )
    .await?;
    let cm: ConfigMap = manifest_body(&headers, &body, "ConfigMap")?;
    if cm.metadata.name != name || cm.metadata.namespace != ns {
        return Err(ApiError::new(
            Reason::Invalid,
            "metadata.name and metadata.namespace must match the path",
        ));
    }
    store::configmap_put(&state.pool, &ns, &name, &cm.data).await?;
    Ok(Json(cm).into_response())
}

pub async fn configmap_delete(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    authorize(
        &state,
        &headers,
        Access::new("delete", Kind::ConfigMaps).at(&ns, Some(&name)),
    )
    .await?;
    if store::configmap_delete(&state.pool, &ns, &name).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(
            Reason::NotFound,
            format!("configmap {ns}/{name} not found"),
        ))
    }
}
