//! How a stage push reaches a spoke: the ConfigMaps it names before Prep, then the merge
//! patch of its IBU, with the cluster's credential and a request id. [`SpokeClient`] holds
//! what all pushes share: one HTTP client, the slots that bound pushes in flight, and each
//! cluster's parsed IBU URL.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use fleet_types::http::REQUEST_ID;
use fleet_types::ibgu::ImageBasedGroupUpgrade;
use fleet_types::ibu::Stage;
use fleet_types::labels::is_copied_to_spoke;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use super::{Engine, locked};
use crate::error::Error;
use crate::planner::rollout::{Push, PushOutcome, PushResult};
use crate::store::{self, SpokeAccess};

// A push is never redirected: it carries the cluster's credential, and a spoke's API has no
// reason to send it elsewhere (an answer of 3xx is a spoke that did not take the stage).

/// Pushes to spokes in flight at once, across all rounds; the rest wait their turn.
const PUSH_CONCURRENCY: usize = 64;
/// A spoke that takes longer than this to answer a push counts as unreachable.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Parsed IBU URLs kept at most: a cluster is pushed to a few times within its batch, so the
/// running batches' clusters are what matters (keeping all 100,000 of a fleet was 30 MiB).
const IBU_URLS_KEPT: usize = 16_384;

/// What every push shares. Clones share it too.
#[derive(Clone)]
pub struct SpokeClient {
    client: reqwest::Client,
    slots: Arc<Semaphore>,
    /// Each cluster's endpoint and the IBU URL parsed from it: parsing it for every push was
    /// about 2 % of the hub's CPU at fleet scale. At most [`IBU_URLS_KEPT`] clusters', then
    /// forgotten together.
    ibu_urls: Arc<Mutex<HashMap<String, (String, reqwest::Url)>>>,
    /// The client of each spoke whose certificate is pinned, with the pin it trusts: a
    /// TLS verifier sees only the host name, which simulated spokes and spokes behind one
    /// address share, so each pin gets its own client (and connections).
    pinned: Arc<Mutex<HashMap<String, (String, reqwest::Client)>>>,
}

impl SpokeClient {
    pub fn new() -> SpokeClient {
        SpokeClient {
            client: reqwest::Client::builder()
                .timeout(PUSH_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            slots: Arc::new(Semaphore::new(PUSH_CONCURRENCY)),
            ibu_urls: Arc::new(Mutex::new(HashMap::new())),
            pinned: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The client for a cluster: the shared one, or, when its certificate is pinned, one
    /// that trusts that certificate only (made again when the pin changes).
    pub fn client_for(&self, cluster: &str, pin: Option<&str>) -> Result<reqwest::Client, String> {
        let Some(pin) = pin else {
            locked(&self.pinned).remove(cluster);
            return Ok(self.client.clone());
        };
        let mut pinned = locked(&self.pinned);
        if let Some((known, client)) = pinned.get(cluster)
            && known == pin
        {
            return Ok(client.clone());
        }
        let client = reqwest::Client::builder()
            .timeout(PUSH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .use_preconfigured_tls(fleet_server::tls::pinned_client(pin)?)
            .build()
            .map_err(|e| format!("a client for the pinned certificate: {e}"))?;
        pinned.insert(cluster.to_string(), (pin.to_string(), client.clone()));
        Ok(client)
    }

    /// `<endpoint>/v1/ibu` of the cluster, parsed again only when its endpoint changed (or
    /// the cluster's URL was forgotten).
    pub fn ibu_url(&self, cluster: &str, endpoint: &str) -> Result<reqwest::Url, String> {
        let mut urls = locked(&self.ibu_urls);
        if let Some((known, url)) = urls.get(cluster)
            && known == endpoint
        {
            return Ok(url.clone());
        }
        let text = format!("{}/v1/ibu", endpoint.trim_end_matches('/'));
        let url = reqwest::Url::parse(&text)
            .map_err(|e| format!("the cluster's endpoint {endpoint:?} is not a URL: {e}"))?;
        if urls.len() >= IBU_URLS_KEPT {
            urls.clear();
        }
        urls.insert(cluster.to_string(), (endpoint.to_string(), url.clone()));
        Ok(url)
    }

    /// Sends one push once a slot is free.
    pub async fn send(
        &self,
        target: Target<'_>,
        push: &Push,
        body: Bytes,
        configmaps: &[(String, String, BTreeMap<String, String>)],
    ) -> PushOutcome {
        let client = match self.client_for(&push.cluster, target.certificate_sha256) {
            Ok(c) => c,
            Err(why) => return PushOutcome::Unreachable(why),
        };
        let _slot = self.slots.acquire().await;
        push_one(&client, target, push, body, configmaps).await
    }
}

/// Waits for every push task, handing each outcome to `done` as it comes. One that panicked
/// counts as a push that got no answer: every push has an outcome, or its cluster would stay
/// "in flight" and never be pushed again.
pub async fn join_pushes(
    mut set: JoinSet<(Push, PushOutcome)>,
    mut sent: HashMap<tokio::task::Id, Push>,
    mut done: impl FnMut(Push, PushOutcome),
) {
    while let Some(r) = set.join_next_with_id().await {
        match r {
            Ok((id, (push, outcome))) => {
                sent.remove(&id);
                done(push, outcome);
            }
            Err(e) => {
                if let Some(push) = sent.remove(&e.id()) {
                    done(push, PushOutcome::Unreachable(format!("push failed: {e}")));
                }
            }
        }
    }
}

/// Orders a round's pushes for the slots: those decided on the oldest report first, so that
/// a report that waited longest for its pass does not also wait at the back of the round;
/// pushes no report led to (a new rollout, a retry after its backoff, a timeout) before
/// them, the rest as the planner gave them (by cluster name).
fn oldest_report_first(pushes: &mut [Push], report_times: &HashMap<String, DateTime<Utc>>) {
    pushes.sort_by_key(|p| report_times.get(&p.cluster).copied());
}

/// The merge patch of the spoke's IBU: the IBGU's ibuSpec fields, its `lca.openshift.io`
/// annotations; the stage is added per push.
pub fn patch_body(ibgu: &ImageBasedGroupUpgrade) -> serde_json::Value {
    let mut spec = serde_json::to_value(&ibgu.spec.ibu_spec).unwrap_or_default();
    if let Some(o) = spec.as_object_mut() {
        o.remove("stage");
    }
    let annotations: BTreeMap<String, String> = ibgu
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| is_copied_to_spoke(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut body = serde_json::json!({ "spec": spec });
    if !annotations.is_empty() {
        body["metadata"] = serde_json::json!({ "annotations": annotations });
    }
    body
}

/// The IBU of a stage: the round's merge patch with `spec.stage` set.
pub fn stage_body(patch: &serde_json::Value, stage: Stage) -> Bytes {
    let mut body = patch.clone();
    body["spec"]["stage"] = serde_json::Value::String(stage.as_str().to_string());
    Bytes::from(body.to_string())
}

/// Where a push goes and as whom.
pub struct Target<'a> {
    /// The agent's API, as it registered it.
    pub endpoint: &'a str,
    /// `<endpoint>/v1/ibu`.
    pub ibu_url: reqwest::Url,
    pub credential: &'a str,
    pub request_id: &'a str,
    /// The certificate the spoke registered, when pinned.
    pub certificate_sha256: Option<&'a str>,
}

/// Why a request to a spoke got no answer. A certificate the hub does not trust (another
/// than the one pinned) is said plainly, and loudly: someone may be posing as the spoke.
fn unreachable(err: reqwest::Error) -> PushOutcome {
    match fleet_server::tls::refusal(&err) {
        Some(why) => {
            tracing::warn!(%why, "the spoke's certificate is not trusted; nothing was pushed");
            PushOutcome::Unreachable(why)
        }
        None => PushOutcome::Unreachable(err.to_string()),
    }
}

async fn push_one(
    client: &reqwest::Client,
    target: Target<'_>,
    push: &Push,
    body: Bytes,
    configmaps: &[(String, String, BTreeMap<String, String>)],
) -> PushOutcome {
    let Target {
        endpoint,
        ibu_url,
        credential,
        request_id,
        certificate_sha256: _,
    } = target;
    let base = endpoint.trim_end_matches('/');
    if push.action == fleet_types::Action::Prep {
        for (ns, name, data) in configmaps {
            let cm = serde_json::json!({"metadata": {"name": name, "namespace": ns}, "data": data});
            let res = client
                .put(format!("{base}/v1/configmaps/{ns}/{name}"))
                .bearer_auth(credential)
                .header(REQUEST_ID, request_id)
                .json(&cm)
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    return PushOutcome::Unreachable(format!(
                        "configmap {ns}/{name}: {}",
                        r.status()
                    ));
                }
                Err(e) => return unreachable(e),
            }
        }
    }
    let res = client
        .patch(ibu_url)
        .bearer_auth(credential)
        .header(REQUEST_ID, request_id)
        .header("Content-Type", "application/merge-patch+json")
        // The new IBU comes with the spoke's next report; the answer need not carry it.
        .header(fleet_types::http::PREFER, fleet_types::http::RETURN_MINIMAL)
        .body(body)
        .send()
        .await;
    match res {
        Ok(r) if r.status().is_success() => PushOutcome::Accepted(push.stage),
        Ok(r) if r.status().as_u16() == 422 => {
            let status: Option<fleet_types::Status> = r.json().await.ok();
            PushOutcome::Refused(
                status
                    .map(|s| s.message)
                    .unwrap_or_else(|| "refused by the spoke".into()),
            )
        }
        Ok(r) => PushOutcome::Unreachable(format!("spoke answered {}", r.status())),
        Err(e) => unreachable(e),
    }
}

impl Engine {
    /// Sends a round of pushes. Each outcome goes to the next pass as soon as it is known:
    /// a cluster whose push was answered early moves on without waiting for the round's
    /// slowest spoke. `report_times` holds, by cluster, the report a push was decided on.
    pub(super) async fn push_all(
        &self,
        id: i64,
        ibgu: &ImageBasedGroupUpgrade,
        mut pushes: Vec<Push>,
        now: DateTime<Utc>,
        report_times: &HashMap<String, DateTime<Utc>>,
    ) {
        oldest_report_first(&mut pushes, report_times);
        let names: Vec<String> = pushes.iter().map(|p| p.cluster.clone()).collect();
        let prepared = async {
            Ok::<_, Error>((
                store::cluster_access(&self.pool, &names).await?,
                self.configmaps(ibgu).await?,
            ))
        };
        let (access, configmaps) = match prepared.await {
            Ok(p) => p,
            Err(err) => {
                let why = format!("reading what to push: {err}");
                for p in pushes {
                    self.record_push(
                        id,
                        p,
                        PushOutcome::Unreachable(why.clone()),
                        now,
                        report_times,
                    );
                }
                return;
            }
        };
        let patch = patch_body(ibgu);
        // The body of each stage of the round, written once and shared by its pushes.
        let mut bodies: HashMap<Stage, Bytes> = HashMap::new();
        let configmaps = Arc::new(configmaps);
        let mut set = JoinSet::new();
        let mut sent = HashMap::new();
        for push in pushes {
            let Some(SpokeAccess {
                endpoint,
                credential,
                certificate_sha256,
            }) = access.get(&push.cluster).map(|a| SpokeAccess {
                endpoint: a.endpoint.clone(),
                credential: a.credential.clone(),
                certificate_sha256: a.certificate_sha256.clone(),
            })
            else {
                let outcome = PushOutcome::Unreachable("cluster not registered".into());
                self.record_push(id, push, outcome, now, report_times);
                continue;
            };
            let ibu_url = match self.spokes.ibu_url(&push.cluster, &endpoint) {
                Ok(url) => url,
                Err(why) => {
                    self.record_push(id, push, PushOutcome::Unreachable(why), now, report_times);
                    continue;
                }
            };
            let body = bodies
                .entry(push.stage)
                .or_insert_with(|| stage_body(&patch, push.stage))
                .clone();
            let spokes = self.spokes.clone();
            let configmaps = configmaps.clone();
            // One id per push, sent as X-Request-Id: the spoke's log lines of the request
            // carry it too.
            let request_id = uuid::Uuid::new_v4().to_string();
            let span = tracing::info_span!(
                "push",
                cluster = %push.cluster,
                step = push.step,
                action = %push.action,
                stage = %push.stage,
                request_id = %request_id,
            );
            let task = push.clone();
            let handle = set.spawn(
                async move {
                    let target = Target {
                        endpoint: &endpoint,
                        ibu_url,
                        credential: &credential,
                        request_id: &request_id,
                        certificate_sha256: certificate_sha256.as_deref(),
                    };
                    let outcome = spokes.send(target, &push, body, &configmaps).await;
                    match &outcome {
                        PushOutcome::Accepted(_) => tracing::info!("stage pushed"),
                        PushOutcome::Refused(why) => {
                            tracing::warn!(%why, "the spoke refused the stage")
                        }
                        PushOutcome::Unreachable(why) => {
                            tracing::debug!(%why, "push failed; will retry with backoff")
                        }
                    }
                    (push, outcome)
                }
                .instrument(span),
            );
            sent.insert(handle.id(), task);
        }
        join_pushes(set, sent, |push, outcome| {
            self.record_push(id, push, outcome, now, report_times)
        })
        .await;
    }

    /// Counts a push's outcome and hands it to the next pass.
    fn record_push(
        &self,
        id: i64,
        push: Push,
        outcome: PushOutcome,
        now: DateTime<Utc>,
        report_times: &HashMap<String, DateTime<Utc>>,
    ) {
        let result = match &outcome {
            PushOutcome::Accepted(_) => "accepted",
            PushOutcome::Refused(_) => "refused",
            PushOutcome::Unreachable(_) => "unreachable",
        };
        self.metrics.pushes.with_label_values(&[result]).inc();
        let accepted = matches!(outcome, PushOutcome::Accepted(_));
        if let Some(&seen) = report_times.get(&push.cluster) {
            self.observe_decision_latency(seen);
        }
        // Handed over and the flag read in one step: a pass that blocks a push on this one
        // sets the flag and looks for this outcome in one step too, so one sees the other.
        let awaited = self.memory.with(id, |k| {
            let awaited = k.in_flight.get(&push.cluster).copied().unwrap_or(false);
            k.results.push(PushResult {
                step: push.step,
                action_index: push.action_index,
                cluster: push.cluster,
                outcome,
                at: now,
            });
            awaited
        });
        // An accepted push waits for the spoke's report (which triggers a pass of its own) or
        // for the idle pass, unless a push is waiting on it; any other outcome is acted on
        // at once.
        if !accepted || awaited {
            self.wake.notify_one();
        }
    }

    async fn configmaps(
        &self,
        ibgu: &ImageBasedGroupUpgrade,
    ) -> Result<Vec<(String, String, BTreeMap<String, String>)>, Error> {
        let mut out = Vec::new();
        let spec = &ibgu.spec.ibu_spec;
        for r in spec.oadp_content.iter().chain(&spec.extra_manifests) {
            if let Some(data) = store::configmap_fetch(&self.pool, &r.namespace, &r.name).await? {
                out.push((r.namespace.clone(), r.name.clone(), data));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_types::Action;

    #[tokio::test]
    async fn a_push_task_that_panics_still_has_an_outcome() {
        let push = |cluster: &str| Push {
            cluster: cluster.into(),
            step: 0,
            action: Action::Prep,
            stage: Stage::Prep,
            cause: crate::planner::rollout::PushCause::Other,
            action_index: 0,
        };
        let mut set = JoinSet::new();
        let mut sent = HashMap::new();
        let ok = push("ok");
        let h = set.spawn(async move { (ok, PushOutcome::Accepted(Stage::Prep)) });
        sent.insert(h.id(), push("ok"));
        let h = set.spawn(async move {
            if true {
                panic!("boom");
            }
            (push("bad"), PushOutcome::Accepted(Stage::Prep))
        });
        sent.insert(h.id(), push("bad"));
        let mut out = Vec::new();
        join_pushes(set, sent, |p, o| out.push((p, o))).await;
        out.sort_by(|a, b| a.0.cluster.cmp(&b.0.cluster));
        assert_eq!(out.len(), 2);
        assert!(
            matches!(&out[0], (p, PushOutcome::Unreachable(why)) if p.cluster == "bad" && why.contains("panicked")),
            "{out:?}"
        );
        assert_eq!(out[1].1, PushOutcome::Accepted(Stage::Prep));
    }

    #[test]
    fn a_round_pushes_the_oldest_reports_first() {
        let push = |cluster: &str| Push {
            cluster: cluster.into(),
            step: 0,
            action: Action::Upgrade,
            stage: Stage::Upgrade,
            cause: crate::planner::rollout::PushCause::OwnReport,
            action_index: 1,
        };
        let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(1_800_000_000_000 + ms).unwrap();
        let times: HashMap<String, DateTime<Utc>> = [
            ("a".to_string(), at(120)),
            ("b".to_string(), at(5)),
            ("c".to_string(), at(60)),
            ("e".to_string(), at(5)),
        ]
        .into();
        let mut pushes: Vec<Push> = ["a", "b", "c", "d", "e", "f"].map(push).into();
        oldest_report_first(&mut pushes, &times);
        let order: Vec<&str> = pushes.iter().map(|p| p.cluster.as_str()).collect();
        // No report behind d and f (a retry, say): first; equal times keep the planner's order.
        assert_eq!(order, ["d", "f", "b", "e", "c", "a"]);
    }

    /// A spoke that answers a push with a redirect did not take the stage; the place it
    /// names is never sent the stage or the cluster's credential.
    #[tokio::test]
    async fn a_push_is_never_redirected() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        async fn serve(app: axum::Router) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            url
        }
        let elsewhere_hits = Arc::new(AtomicUsize::new(0));
        let hits = elsewhere_hits.clone();
        let elsewhere = serve(axum::Router::new().fallback(move || {
            hits.fetch_add(1, Ordering::SeqCst);
            async { "taken" }
        }))
        .await;
        let location = format!("{elsewhere}/v1/ibu");
        let spoke = serve(axum::Router::new().route(
            "/v1/ibu",
            axum::routing::patch(move || async move {
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, location)],
                )
            }),
        ))
        .await;
        let spokes = SpokeClient::new();
        let push = Push {
            cluster: "spoke1".into(),
            step: 0,
            action: Action::Upgrade,
            stage: Stage::Upgrade,
            cause: crate::planner::rollout::PushCause::OwnReport,
            action_index: 1,
        };
        let target = Target {
            endpoint: &spoke,
            ibu_url: spokes.ibu_url("spoke1", &spoke).unwrap(),
            credential: "secret",
            request_id: "r1",
            certificate_sha256: None,
        };
        let body = Bytes::from_static(br#"{"spec":{"stage":"Upgrade"}}"#);
        let outcome = spokes.send(target, &push, body, &[]).await;
        assert_eq!(
            outcome,
            PushOutcome::Unreachable("spoke answered 307 Temporary Redirect".into())
        );
        assert_eq!(
            elsewhere_hits.load(Ordering::SeqCst),
            0,
            "the redirect was followed"
        );
    }

    #[tokio::test]
    async fn push_urls_are_parsed_once_per_endpoint() {
        let spokes = SpokeClient::new();
        let url = |c: &str, e: &str| spokes.ibu_url(c, e).map(|u| u.to_string());
        assert_eq!(
            url("spoke1", "http://10.0.0.1:8080/").as_deref(),
            Ok("http://10.0.0.1:8080/v1/ibu")
        );
        assert_eq!(
            url("spoke2", "http://fleet:9000/clusters/spoke2").as_deref(),
            Ok("http://fleet:9000/clusters/spoke2/v1/ibu")
        );
        // A new endpoint (the agent registered again elsewhere) is followed at once.
        assert_eq!(
            url("spoke1", "https://10.0.0.9:8443").as_deref(),
            Ok("https://10.0.0.9:8443/v1/ibu")
        );
        let bad = url("spoke3", "http://[::1").unwrap_err();
        assert!(bad.contains("\"http://[::1\" is not a URL"), "{bad}");
        assert_eq!(
            locked(&spokes.ibu_urls).len(),
            2,
            "only parsed URLs are kept"
        );
        // The same endpoint again is answered from what was kept, not parsed anew.
        let kept = reqwest::Url::parse("http://kept.example/v1/ibu").unwrap();
        locked(&spokes.ibu_urls).insert("spoke1".into(), ("http://e1".into(), kept));
        assert_eq!(
            url("spoke1", "http://e1").as_deref(),
            Ok("http://kept.example/v1/ibu")
        );
        // Never more than IBU_URLS_KEPT are kept: past that, they are forgotten together.
        for i in 0..IBU_URLS_KEPT + 10 {
            spokes
                .ibu_url(&format!("c{i}"), "http://fleet:9000/")
                .unwrap();
        }
        let kept = locked(&spokes.ibu_urls).len();
        assert!((1..=IBU_URLS_KEPT).contains(&kept), "{kept} kept");
    }
}
