//! The agent in-process: hub reporting against a small test hub on loopback.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use fleet_types::messages::{RegisterRequest, RegisterResponse, StatusReport};
use serde_json::json;
use spoke_core::metrics::AgentMetrics;
use spoke_core::report::{self, HubLink};
use spoke_core::runner::{Agent, SystemClock};
use spoke_sim::{SimConfig, SimHost};

#[derive(Default)]
struct TestHub {
    down: AtomicBool,
    registrations: Mutex<Vec<(String, RegisterRequest)>>,
    reports: Mutex<Vec<(String, String, StatusReport)>>,
    /// How long the credentials it issues are valid (forever when not set).
    credential_life: Mutex<Option<chrono::Duration>>,
    /// The credential each renewal was asked with.
    renewals: Mutex<Vec<String>>,
    /// Registrations being answered now, the most at once, and how long each takes.
    in_flight: std::sync::atomic::AtomicUsize,
    most_at_once: std::sync::atomic::AtomicUsize,
    latency: Mutex<Option<Duration>>,
}

impl TestHub {
    fn expiry(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.credential_life
            .lock()
            .unwrap()
            .map(|life| chrono::Utc::now() + life)
    }
}

async fn renew(
    State(hub): State<Arc<TestHub>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Json<RegisterResponse> {
    let mut renewals = hub.renewals.lock().unwrap();
    renewals.push(bearer(&headers));
    Json(RegisterResponse {
        name,
        credential: format!("cred-{}", renewals.len() + 1),
        expires_at: hub.expiry(),
    })
}

fn bearer(h: &HeaderMap) -> String {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_start_matches("Bearer ")
        .to_string()
}

async fn register(
    State(hub): State<Arc<TestHub>>,
    headers: HeaderMap,
    Json(req): Json<RegisterRequest>,
) -> Result<Json<RegisterResponse>, StatusCode> {
    if hub.down.load(Ordering::SeqCst) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    let now = hub.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    hub.most_at_once.fetch_max(now, Ordering::SeqCst);
    // A slow hub, when asked to be one: registrations overlap.
    let latency = *hub.latency.lock().unwrap();
    if let Some(latency) = latency {
        tokio::time::sleep(latency).await;
    }
    hub.in_flight.fetch_sub(1, Ordering::SeqCst);
    let name = req.name.clone();
    hub.registrations
        .lock()
        .unwrap()
        .push((bearer(&headers), req));
    Ok(Json(RegisterResponse {
        name,
        credential: "cred-1".into(),
        expires_at: hub.expiry(),
    }))
}

async fn status(
    State(hub): State<Arc<TestHub>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(report): Json<StatusReport>,
) -> StatusCode {
    if hub.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    hub.reports
        .lock()
        .unwrap()
        .push((name, bearer(&headers), report));
    StatusCode::NO_CONTENT
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn last_reason(r: &StatusReport) -> String {
    r.ibu
        .status
        .as_ref()
        .and_then(|s| s.current())
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

/// A test hub on loopback; answers its URL.
async fn start_test_hub(hub: Arc<TestHub>) -> String {
    let app = Router::new()
        .route("/v1/clusters/register", post(register))
        .route("/v1/clusters/{name}/status", post(status))
        .route("/v1/clusters/{name}/credential", post(renew))
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    hub_url
}

/// The link of an agent that registers with the join token `join-me` at these hub URLs.
fn test_link(hub_urls: Vec<String>) -> HubLink {
    HubLink {
        hub_urls,
        current: Default::default(),
        join_token: "join-me".into(),
        endpoint: "http://127.0.0.1:1/".into(),
        labels: BTreeMap::new(),
        agent_id: "run-1".into(),
        client: HubLink::client(),
        certificate: None,
        requests: None,
    }
}

/// An agent on a simulated node, running.
async fn start_agent(
    dir: &std::path::Path,
    config: SimConfig,
    metrics: &AgentMetrics,
) -> Arc<Agent<SimHost>> {
    let host = Arc::new(SimHost::open(dir, config).unwrap());
    let agent = Agent::open("sno1".into(), host, Arc::new(SystemClock), metrics.clone())
        .await
        .unwrap();
    tokio::spawn(agent.clone().run());
    agent
}

/// A credential that expires is renewed at two thirds of its life, with itself; reports go
/// on with the new one, and the local API takes the old one a while longer (a push the hub
/// decided before the renewal).
#[tokio::test]
async fn the_credential_is_renewed_at_two_thirds_of_its_life() {
    let hub = Arc::new(TestHub::default());
    *hub.credential_life.lock().unwrap() = Some(chrono::Duration::seconds(3));
    let hub_url = start_test_hub(hub.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let metrics = AgentMetrics::new().unwrap();
    let agent = start_agent(dir.path(), SimConfig::default(), &metrics).await;
    let link = test_link(vec![hub_url]);
    let registered = Instant::now();
    tokio::spawn(report::run(agent.clone(), link, metrics.clone()));
    wait_until("the first renewal", || async {
        !hub.renewals.lock().unwrap().is_empty()
    })
    .await;
    let after = registered.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "renewed after {after:?}, not before two thirds of 3 s"
    );
    assert_eq!(hub.renewals.lock().unwrap()[0], "cred-1");
    assert_eq!(agent.session().credential().as_deref(), Some("cred-2"));
    assert_eq!(
        agent.session().accepted_credentials(),
        ["cred-2", "cred-1"],
        "the replaced one, a while longer"
    );
    agent
        .patch(&json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}}))
        .await
        .unwrap();
    wait_until("a report with the renewed credential", || async {
        hub.reports
            .lock()
            .unwrap()
            .last()
            .is_some_and(|r| r.1 != "cred-1")
    })
    .await;
    // And again, with the new one, two thirds of the new life later.
    wait_until("the second renewal", || async {
        hub.renewals.lock().unwrap().len() >= 2
    })
    .await;
    assert_eq!(hub.renewals.lock().unwrap()[1], "cred-2");
    assert_eq!(
        hub.registrations.lock().unwrap().len(),
        1,
        "no registration since"
    );
}

#[tokio::test]
async fn registers_reports_every_change_and_catches_up_after_the_hub_returns() {
    let hub = Arc::new(TestHub::default());
    let hub_url = start_test_hub(hub.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let config = SimConfig {
        current_version: "4.15.0".into(),
        ..Default::default()
    };
    let metrics = AgentMetrics::new().unwrap();
    let agent = start_agent(dir.path(), config, &metrics).await;
    let link = HubLink {
        labels: BTreeMap::from([("site".to_string(), "edge-1".to_string())]),
        ..test_link(vec![hub_url])
    };
    tokio::spawn(report::run(agent.clone(), link, metrics.clone()));

    wait_until("the first report", || async {
        !hub.reports.lock().unwrap().is_empty()
    })
    .await;
    {
        let regs = hub.registrations.lock().unwrap();
        assert_eq!(regs.len(), 1);
        assert_eq!(regs[0].0, "join-me", "registers with the join token");
        assert_eq!(regs[0].1.labels["site"], "edge-1");
        let reports = hub.reports.lock().unwrap();
        assert_eq!(reports[0].0, "sno1");
        assert_eq!(reports[0].1, "cred-1", "reports with the issued credential");
        assert_eq!(reports[0].2.sequence, 1);
        assert_eq!(reports[0].2.agent_id, "run-1");
    }
    assert_eq!(
        agent.session().credential().as_deref(),
        Some("cred-1"),
        "the hub's credential opens the local API"
    );

    agent
        .patch(&json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}}))
        .await
        .unwrap();
    wait_until("Prep completed reported", || async {
        hub.reports
            .lock()
            .unwrap()
            .last()
            .is_some_and(|r| last_reason(&r.2) == "Completed")
    })
    .await;
    let seqs: Vec<u64> = hub
        .reports
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.2.sequence)
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence grows: {seqs:?}"
    );

    // the hub goes away; the agent keeps working and retries
    hub.down.store(true, Ordering::SeqCst);
    let before = hub.reports.lock().unwrap().len();
    agent
        .patch(&json!({"spec": {"stage": "Idle"}}))
        .await
        .unwrap();
    wait_until("the abort to finish locally", || async {
        let state = agent.visible().await.unwrap();
        state
            .ibu
            .status
            .as_ref()
            .and_then(|s| s.current())
            .is_some_and(|c| c.reason == "Idle")
    })
    .await;
    wait_until("a failed report", || async {
        let text = metrics.render();
        text.contains(r#"spoke_reports_total{result="failed"}"#)
            && !text.contains(r#"spoke_reports_total{result="failed"} 0"#)
    })
    .await;
    assert_eq!(
        hub.reports.lock().unwrap().len(),
        before,
        "nothing got through"
    );

    // back: the current state is reported
    hub.down.store(false, Ordering::SeqCst);
    wait_until("the current state after reconnecting", || async {
        hub.reports
            .lock()
            .unwrap()
            .last()
            .is_some_and(|r| last_reason(&r.2) == "Idle")
    })
    .await;
    let last = hub.reports.lock().unwrap().last().unwrap().2.sequence;
    assert!(last > *seqs.last().unwrap());
}

fn uncontrolled(ibu: &fleet_types::ibu::ImageBasedUpgrade) -> bool {
    ibu.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.message == "Uncontrolled rollback")
    })
}

/// Just before the reboot the agent saves what the old stateroot must say if the node ever
/// comes back there ("Uncontrolled rollback"). That copy must never be seen outside: not by
/// the API, not in a report (the hub would fail the cluster's Upgrade).
#[tokio::test]
async fn the_old_stateroots_copy_never_leaves_the_node_before_the_reboot() {
    let hub = Arc::new(TestHub::default());
    let hub_url = start_test_hub(hub.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = SimConfig {
        current_version: "4.15.0".into(),
        step: Duration::from_millis(5),
        // Long enough for every observer to look while the node is away.
        reboot: Duration::from_millis(300),
        ..Default::default()
    };
    let metrics = AgentMetrics::new().unwrap();
    let agent = start_agent(dir.path(), config, &metrics).await;
    let link = test_link(vec![hub_url]);
    tokio::spawn(report::run(agent.clone(), link, metrics.clone()));
    // An observer that looks at the agent's state at every change.
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let (agent, seen) = (agent.clone(), seen.clone());
        let mut changes = agent.session().subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let raw = agent.snapshot().await;
                seen.lock().unwrap().push(uncontrolled(&raw.ibu));
            }
        });
    }
    agent
        .patch(&json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}}))
        .await
        .unwrap();
    let reason = |agent: Arc<Agent<SimHost>>, want: &'static str| async move {
        // Not visible while the node reboots.
        agent.visible().await.ok().is_some_and(|s| {
            s.ibu
                .status
                .as_ref()
                .and_then(|st| st.current())
                .is_some_and(|c| c.type_ == want && c.reason == "Completed")
        })
    };
    wait_until("Prep completed", || reason(agent.clone(), "PrepCompleted")).await;
    agent
        .patch(&json!({"spec": {"stage": "Upgrade"}}))
        .await
        .unwrap();
    wait_until("Upgrade completed", || {
        reason(agent.clone(), "UpgradeCompleted")
    })
    .await;
    wait_until("the completed upgrade reported", || async {
        hub.reports.lock().unwrap().last().is_some_and(|r| {
            r.2.ibu
                .status
                .as_ref()
                .and_then(|s| s.current())
                .is_some_and(|c| c.type_ == "UpgradeCompleted")
        })
    })
    .await;
    let reports = hub.reports.lock().unwrap();
    assert!(
        !reports.iter().any(|r| uncontrolled(&r.2.ibu)),
        "a report carried the old stateroot's copy"
    );
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() > 5,
        "the observer saw the upgrade: {}",
        seen.len()
    );
    assert!(
        !seen.iter().any(|u| *u),
        "the agent held the old stateroot's copy"
    );
}

/// A step's outcome and the beginning of the next step are saved together: Prep (five steps)
/// is at most one save per step, plus the request and the completion, where saving each
/// outcome and each beginning on its own took eleven.
#[tokio::test]
async fn a_step_ends_and_the_next_begins_in_one_save() {
    let dir = tempfile::tempdir().unwrap();
    let config = SimConfig {
        current_version: "4.15.0".into(),
        step: Duration::from_millis(1),
        ..Default::default()
    };
    let metrics = AgentMetrics::new().unwrap();
    let agent = start_agent(dir.path(), config, &metrics).await;
    let changes = agent.session().subscribe();
    let before = *changes.borrow();
    agent
        .patch(&json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}}))
        .await
        .unwrap();
    wait_until("Prep completed", || async {
        agent
            .snapshot()
            .await
            .ibu
            .status
            .as_ref()
            .and_then(|s| s.current())
            .is_some_and(|c| c.type_ == "PrepCompleted" && c.reason == "Completed")
    })
    .await;
    let saves = *changes.borrow() - before;
    assert!((2..=7).contains(&saves), "{saves} saves for Prep");
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_status_and_changes_nothing() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let metrics = AgentMetrics::new().unwrap();
    let agent = start_agent(dir.path(), SimConfig::default(), &metrics).await;
    let state = spoke_core::api::ApiState {
        agents: std::collections::HashMap::from([("sno1".to_string(), agent.clone())]),
        single: Some("sno1".into()),
        api_token: Some("t".into()),
        metrics,
    };
    let app = spoke_core::api::router(Arc::new(state));
    let req = axum::http::Request::patch("/v1/ibu")
        .header("authorization", "Bearer t")
        .header("content-type", "application/merge-patch+json")
        .body(axum::body::Body::from(vec![
            b' ';
            spoke_core::api::BODY_LIMIT_BYTES
                + 1
        ]))
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(res.headers()["content-type"], "application/json");
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 16)
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(status["reason"], "RequestEntityTooLarge");
    assert_eq!(agent.snapshot().await.ibu.spec.stage.to_string(), "Idle");
}

/// Agents that share a bound on their requests (as `sim-fleet`'s do) never have more than
/// that many on their way to the hub at once, however many they are: one process, a bounded
/// number of connections.
#[tokio::test]
async fn agents_sharing_a_bound_take_turns_at_the_hub() {
    let hub = Arc::new(TestHub::default());
    *hub.latency.lock().unwrap() = Some(Duration::from_millis(50));
    let hub_url = start_test_hub(hub.clone()).await;
    let metrics = AgentMetrics::new().unwrap();
    let turns = Arc::new(tokio::sync::Semaphore::new(3));
    let client = HubLink::client();
    let mut dirs = vec![];
    for i in 0..12 {
        let dir = tempfile::tempdir().unwrap();
        let host = Arc::new(SimHost::open(dir.path(), SimConfig::default()).unwrap());
        let name = format!("sno{i}");
        let agent = Agent::open(name, host, Arc::new(SystemClock), metrics.clone())
            .await
            .unwrap();
        tokio::spawn(agent.clone().run());
        let link = HubLink {
            endpoint: format!("http://127.0.0.1:1/clusters/sno{i}"),
            agent_id: format!("run-{i}"),
            client: client.clone(),
            requests: Some(turns.clone()),
            ..test_link(vec![hub_url.clone()])
        };
        tokio::spawn(report::run(agent, link, metrics.clone()));
        dirs.push(dir);
    }
    wait_until("every agent registered", || async {
        hub.registrations.lock().unwrap().len() == 12
    })
    .await;
    let most = hub.most_at_once.load(Ordering::SeqCst);
    assert!((1..=3).contains(&most), "{most} registrations at once");
}

/// One replica of a hub whose state all replicas share: while `down`, it answers 503 (as a
/// hub whose pod is going away behind its Service would, or a proxy before a dead one).
struct Replica {
    url: String,
    down: Arc<AtomicBool>,
    /// Requests it answered while up.
    served: Arc<std::sync::atomic::AtomicUsize>,
}

async fn start_replica(hub: Arc<TestHub>) -> Replica {
    let down = Arc::new(AtomicBool::new(false));
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (is_down, count) = (down.clone(), served.clone());
    let app = Router::new()
        .route("/v1/clusters/register", post(register))
        .route("/v1/clusters/{name}/status", post(status))
        .route("/v1/clusters/{name}/credential", post(renew))
        .with_state(hub)
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let (is_down, count) = (is_down.clone(), count.clone());
                async move {
                    if is_down.load(Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    next.run(req).await
                }
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Replica { url, down, served }
}

/// With two hub URLs, the agent talks to the first that answers and moves on, at once and
/// with nothing lost, when the one it talks to stops answering.
#[tokio::test]
async fn with_two_hub_urls_the_agent_moves_on_when_one_stops_answering() {
    let hub = Arc::new(TestHub::default());
    let (a, b) = (
        start_replica(hub.clone()).await,
        start_replica(hub.clone()).await,
    );
    a.down.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let metrics = AgentMetrics::new().unwrap();
    let agent = start_agent(dir.path(), SimConfig::default(), &metrics).await;
    let link = test_link(vec![a.url.clone(), b.url.clone()]);
    let current = link.current.clone();
    tokio::spawn(report::run(agent.clone(), link, metrics.clone()));
    // The first is down from the start: registration and the first report go to the second.
    wait_until(
        "registered and reporting through the second hub",
        || async { !hub.reports.lock().unwrap().is_empty() },
    )
    .await;
    assert_eq!(a.served.load(Ordering::SeqCst), 0);
    assert_eq!(current.load(Ordering::SeqCst), 1);
    // It stays with the second while that one answers, even once the first is back.
    a.down.store(false, Ordering::SeqCst);
    agent
        .patch(&json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}}))
        .await
        .unwrap();
    let stage = |r: &StatusReport| r.ibu.spec.stage.to_string();
    wait_until("Prep reported", || async {
        hub.reports
            .lock()
            .unwrap()
            .iter()
            .any(|r| stage(&r.2) == "Prep")
    })
    .await;
    assert_eq!(a.served.load(Ordering::SeqCst), 0);
    // The second stops answering: the next reports go to the first, with nothing lost.
    b.down.store(true, Ordering::SeqCst);
    let reported = hub.reports.lock().unwrap().len();
    agent
        .patch(&json!({"spec": {"stage": "Idle"}}))
        .await
        .unwrap();
    wait_until("Idle reported through the first hub", || async {
        hub.reports.lock().unwrap()[reported..]
            .iter()
            .any(|r| stage(&r.2) == "Idle")
    })
    .await;
    assert!(a.served.load(Ordering::SeqCst) > 0);
    assert_eq!(current.load(Ordering::SeqCst), 0);
    assert_eq!(
        hub.registrations.lock().unwrap().len(),
        1,
        "registered once"
    );
}

/// A stage asked for again is counted as unchanged, not as a transition: what a hub that took
/// over sends again is told apart from a stage run twice.
#[tokio::test]
async fn a_stage_asked_for_again_is_no_transition() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = AgentMetrics::new().unwrap();
    let agent = start_agent(dir.path(), SimConfig::default(), &metrics).await;
    let prep = json!({"spec": {"stage": "Prep", "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}});
    agent.patch(&prep).await.unwrap();
    agent.patch(&prep).await.unwrap();
    let text = metrics.render();
    for line in [
        "spoke_transitions_total{result=\"accepted\"} 1",
        "spoke_transitions_total{result=\"unchanged\"} 1",
        "spoke_transitions_total{result=\"refused\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
}
