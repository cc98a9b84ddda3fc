//! The real hub (engine, REST API, Postgres) driving simulated spokes over loopback HTTP.
//! The engine's passes are run by the tests (the worker exposes one step), and the hub's
//! clock is injected, so timeouts are tested without waiting for them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleet_e2e::{TestDb, wait_for};
use hub::engine::{Clock, Engine};
use hub::http::{AppState, router};
use hub::metrics::Metrics;
use serde_json::{Value, json};
use spoke_core::api::ApiState;
use spoke_core::metrics::AgentMetrics;
use spoke_core::report::HubLink;
use spoke_core::runner::Agent;
use spoke_sim::{Fault, SimConfig, SimHost};

pub const ADMIN: &str = "admin-token";
/// Reads everything, changes nothing.
const VIEWER: &str = "viewer-token";
pub const JOIN: &str = "join-token";
const DEADLINE: Duration = Duration::from_secs(40);

pub struct ManualClock(Mutex<DateTime<Utc>>);

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

impl ManualClock {
    pub fn advance(&self, d: chrono::Duration) {
        *self.0.lock().unwrap() += d;
    }
}

pub struct Hub {
    pub url: String,
    pub engine: Arc<Engine>,
    pub clock: Arc<ManualClock>,
    client: reqwest::Client,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

pub async fn start_hub(db: &TestDb) -> Hub {
    start_hub_on(db, "127.0.0.1:0").await
}

/// A hub on a given address: a restarted hub comes back where its spokes report.
pub async fn start_hub_on(db: &TestDb, addr: &str) -> Hub {
    hub::db::migrate(&db.pool).await.unwrap();
    let clock = Arc::new(ManualClock(Mutex::new(chrono::SubsecRound::trunc_subsecs(
        Utc::now(),
        0,
    ))));
    let metrics = Metrics::new().unwrap();
    let engine = Engine::new(db.pool.clone(), clock.clone(), metrics.clone());
    let state = AppState {
        pool: db.pool.clone(),
        metrics,
        engine: engine.clone(),
        admin_token: Some(ADMIN.into()),
        viewer_tokens: vec![VIEWER.into()],
        join_token: Some(JOIN.into()),
        join_token_file: None,
        credential_ttl: hub::http::CREDENTIAL_TTL,
        kube_auth: None,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, router(state)).await.unwrap();
    });
    Hub {
        url,
        engine,
        clock,
        client: reqwest::Client::new(),
        task: Some(task),
    }
}

impl Hub {
    /// Stops serving (as a killed hub does) and frees its address.
    pub async fn stop(mut self) -> String {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.url.trim_start_matches("http://").to_string()
    }

    pub async fn get(&self, path: &str) -> Value {
        let res = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "GET {path}: {}", res.status());
        res.json().await.unwrap()
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: Value,
    ) -> (u16, Value) {
        let res = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN)
            .header("Content-Type", content_type)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let code = res.status().as_u16();
        (code, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn create(&self, ibgu: Value) {
        let (code, body) = self
            .send(
                reqwest::Method::POST,
                "/v1/rollouts",
                "application/json",
                ibgu,
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }

    pub async fn append(&self, name: &str, actions: &[&str]) {
        let (code, body) = self
            .send(
                reqwest::Method::PATCH,
                &format!("/v1/rollouts/default/{name}"),
                "application/json-patch+json",
                json!([{"op": "add", "path": "/spec/plan/-", "value": {"actions": actions, "rolloutStrategy": {"maxConcurrency": 2, "timeout": 30}}}]),
            )
            .await;
        assert_eq!(code, 200, "{body}");
    }

    /// Runs engine passes until the rollout satisfies `pred`.
    pub async fn settle(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, DEADLINE, || async {
            self.engine.pass_all().await.unwrap();
            let g = self.get(&format!("/v1/rollouts/default/{name}")).await;
            pred(&g).then_some(g)
        })
        .await
    }

    pub async fn labels(&self, cluster: &str) -> Vec<String> {
        let c = self.get(&format!("/v1/clusters/{cluster}")).await;
        c["labels"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with("lcm.openshift.io/ibgu-"))
            .cloned()
            .collect()
    }
}

pub struct Fleet {
    pub agents: HashMap<String, Arc<Agent<SimHost>>>,
    /// The status codes the fleet answered stage pushes (`PATCH .../v1/ibu`) with.
    pub push_answers: Arc<Mutex<Vec<u16>>>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_fleet(hub: &Hub, names: &[&str], faults: &[(&str, Fault)]) -> Fleet {
    start_fleet_holding(hub, names, faults, None).await
}

/// A fleet whose API holds every stage push (`PATCH .../v1/ibu`) to cluster `held.0` until
/// `held.1` gives it a permit: a spoke that is slow to answer.
async fn start_fleet_holding(
    hub: &Hub,
    names: &[&str],
    faults: &[(&str, Fault)],
    held: Option<(&str, Arc<tokio::sync::Semaphore>)>,
) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let metrics = AgentMetrics::new().unwrap();
    let mut agents = HashMap::new();
    for name in names {
        let config = SimConfig {
            current_version: "4.15.0".into(),
            step: Duration::from_millis(5),
            reboot: Duration::from_millis(50),
            faults: faults
                .iter()
                .filter(|(c, _)| c == name)
                .map(|(_, f)| *f)
                .collect(),
            ..Default::default()
        };
        let link = HubLink {
            hub_urls: vec![hub.url.clone()],
            current: Default::default(),
            join_token: JOIN.into(),
            endpoint: format!("{base}/clusters/{name}"),
            labels: BTreeMap::from([("name".to_string(), name.to_string())]),
            agent_id: uuid_like(name),
            client: HubLink::client(),
            certificate: None,
            requests: None,
        };
        let agent = spoke_sim::start_agent(
            name.to_string(),
            &dir.path().join(name),
            config,
            &metrics,
            Some(link),
        )
        .await
        .unwrap();
        agents.insert(name.to_string(), agent);
    }
    let state = Arc::new(ApiState {
        agents: agents.clone(),
        single: None,
        api_token: None,
        metrics,
    });
    let push_answers = Arc::new(Mutex::new(Vec::new()));
    let answers = push_answers.clone();
    let mut app = spoke_core::api::router(state).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let push = req.method() == axum::http::Method::PATCH;
            let answers = answers.clone();
            async move {
                let res = next.run(req).await;
                if push {
                    answers.lock().unwrap().push(res.status().as_u16());
                }
                res
            }
        },
    ));
    if let Some((cluster, gate)) = held {
        let path = format!("/clusters/{cluster}/v1/ibu");
        app = app.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let hold = req.method() == axum::http::Method::PATCH && req.uri().path() == path;
                let gate = gate.clone();
                async move {
                    if hold {
                        // The permit goes back at once: once given, the gate stays open.
                        let _ = gate.acquire().await;
                    }
                    next.run(req).await
                }
            },
        ));
    }
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let n = names.len();
    wait_for("every spoke to register and report", DEADLINE, || async {
        let list = hub.get("/v1/clusters").await;
        let items = list["items"].as_array().unwrap();
        (items.len() == n && items.iter().all(|c| c["ibu"].is_object())).then_some(())
    })
    .await;
    Fleet {
        agents,
        push_answers,
        _dir: dir,
        task,
    }
}

fn uuid_like(name: &str) -> String {
    format!("agent-{name}-{}", std::process::id())
}

pub fn ibgu(name: &str, clusters: &[&str], plan: Value) -> Value {
    json!({
        "apiVersion": "lcm.openshift.io/v1alpha1",
        "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterLabelSelectors": [{"matchExpressions": [{"key": "name", "operator": "In", "values": clusters}]}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
            "plan": plan,
        }
    })
}

pub fn done(g: &Value) -> bool {
    g["status"]["conditions"][0]["reason"] == "Completed"
}

pub fn cluster<'a>(g: &'a Value, name: &str) -> &'a Value {
    g["status"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or(&Value::Null)
}

pub fn acts(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["action"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn talm_reference_scenarios_end_to_end() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let _fleet = start_fleet(
        &hub,
        &["spoke1", "spoke2", "spoke4", "spoke6"],
        &[("spoke6", Fault::Prep), ("spoke4", Fault::Restore)],
    )
    .await;
    hub.create(ibgu(
        "upgrade",
        &["spoke1", "spoke4", "spoke6"],
        json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 30}}]),
    ))
    .await;

    let g = hub
        .settle("upgrade", "step 0 running", |g| {
            !g["status"]["clusters"].is_null()
        })
        .await;
    assert_eq!(
        g["status"]["conditions"][0]["message"],
        "Waiting for plan step 0 to be completed"
    );
    let names: Vec<&str> = g["status"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["spoke1", "spoke4"],
        "spoke6 is in the second batch"
    );

    let g = hub.settle("upgrade", "[Prep] done", done).await;
    assert_eq!(
        hub.labels("spoke1").await,
        vec!["lcm.openshift.io/ibgu-prep-completed"]
    );
    assert_eq!(
        hub.labels("spoke4").await,
        vec!["lcm.openshift.io/ibgu-prep-completed"]
    );
    assert_eq!(
        hub.labels("spoke6").await,
        vec!["lcm.openshift.io/ibgu-prep-failed"]
    );
    assert!(hub.labels("spoke2").await.is_empty());
    let s6 = cluster(&g, "spoke6");
    assert!(
        s6["failedActions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("failed to setup stateroot"),
        "the spoke's message: {s6}"
    );
    assert_eq!(g["status"]["conditions"][1]["type"], "Succeeded");
    assert_eq!(g["status"]["conditions"][1]["status"], "False");

    hub.append("upgrade", &["AbortOnFailure"]).await;
    let g = hub.settle("upgrade", "[AbortOnFailure] done", done).await;
    assert!(hub.labels("spoke6").await.is_empty());
    assert_eq!(
        acts(&cluster(&g, "spoke6")["completedActions"]),
        vec!["AbortOnFailure"]
    );
    assert_eq!(acts(&cluster(&g, "spoke6")["failedActions"]), vec!["Prep"]);
    assert_eq!(g["status"]["summary"][1]["selected"], 1);

    hub.append("upgrade", &["Upgrade"]).await;
    let g = hub.settle("upgrade", "[Upgrade] done", done).await;
    assert_eq!(
        g["status"]["summary"][2]["selected"], 2,
        "only the prep-completed clusters"
    );
    assert_eq!(
        hub.labels("spoke1").await,
        vec![
            "lcm.openshift.io/ibgu-prep-completed",
            "lcm.openshift.io/ibgu-upgrade-completed"
        ]
    );
    // spoke4's restore failed after the reboot: it rolled back on its own and the hub failed it fast
    assert_eq!(
        hub.labels("spoke4").await,
        vec![
            "lcm.openshift.io/ibgu-prep-completed",
            "lcm.openshift.io/ibgu-upgrade-failed"
        ]
    );
    let msg = cluster(&g, "spoke4")["failedActions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.starts_with("Rollback due to restore failure"), "{msg}");

    hub.append("upgrade", &["AbortOnFailure"]).await;
    hub.settle("upgrade", "second [AbortOnFailure] done", done)
        .await;
    assert!(hub.labels("spoke4").await.is_empty());

    hub.append("upgrade", &["FinalizeUpgrade"]).await;
    let g = hub.settle("upgrade", "[FinalizeUpgrade] done", done).await;
    assert!(
        hub.labels("spoke1").await.is_empty(),
        "finalize clears the labels"
    );
    assert_eq!(
        acts(&cluster(&g, "spoke1")["completedActions"]),
        vec!["Prep", "Upgrade", "FinalizeUpgrade"]
    );
    let spoke1 = hub.get("/v1/clusters/spoke1").await;
    assert_eq!(spoke1["ibu"]["status"]["conditions"][0]["reason"], "Idle");

    // the history tells the whole story, oldest first, per cluster on demand
    let h = hub
        .get("/v1/rollouts/default/upgrade/history?cluster=spoke1")
        .await;
    let events: Vec<String> = h["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["event"].as_str().unwrap(),
                e["action"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        events,
        vec![
            "ActionStarted Prep",
            "ActionCompleted Prep",
            "ActionStarted Upgrade",
            "ActionCompleted Upgrade",
            "ActionStarted FinalizeUpgrade",
            "ActionCompleted FinalizeUpgrade"
        ]
    );
}

#[tokio::test]
async fn step_timeout_on_the_injected_clock_and_an_unreachable_spoke() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let fleet = start_fleet(&hub, &["a", "b", "c", "d", "e"], &[]).await;
    fleet.agents["b"].set_unreachable(true);
    hub.create(ibgu(
        "t",
        &["a", "b", "c"],
        json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 60}}]),
    ))
    .await;
    hub.settle("t", "a completes while b is away", |g| {
        !acts(&cluster(g, "a")["completedActions"]).is_empty()
    })
    .await;
    // b comes back before the timeout: its push is retried and it completes
    fleet.agents["b"].set_unreachable(false);
    // the push backoff runs on the hub's clock
    hub.clock.advance(chrono::Duration::minutes(2));
    hub.settle("t", "b catches up", |g| {
        !acts(&cluster(g, "b")["completedActions"]).is_empty()
    })
    .await;
    hub.settle("t", "done", done).await;

    // a second rollout where d never answers: the hub's clock passes the step timeout
    fleet.agents["d"].set_unreachable(true);
    hub.create(ibgu(
        "t2",
        &["d", "a", "e"],
        json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1, "timeout": 60}}]),
    ))
    .await;
    hub.settle("t2", "d running", |g| {
        cluster(g, "d")["currentAction"]["action"] == "Prep"
    })
    .await;
    hub.clock.advance(chrono::Duration::minutes(61));
    let g = hub.settle("t2", "timed out", done).await;
    // a was prepped already (batch 1); d never answered (batch 2); e never started (batch 3)
    assert_eq!(acts(&cluster(&g, "a")["completedActions"]), vec!["Prep"]);
    let d = cluster(&g, "d");
    assert!(
        d["failedActions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{d}"
    );
    assert_eq!(
        cluster(&g, "e")["failedActions"][0]["message"],
        "not started before the step timeout"
    );
    assert_eq!(g["status"]["summary"][0]["timedOut"], 2);
    assert_eq!(
        hub.labels("d").await,
        vec!["lcm.openshift.io/ibgu-prep-failed"]
    );
}

/// A spoke slow to answer its push holds back only itself: the other clusters of the batch
/// move on to their next action while its push is still out (well before the 10 s push
/// timeout would end the round).
#[tokio::test]
async fn a_slow_spoke_does_not_hold_back_the_rest_of_its_batch() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fleet = start_fleet_holding(&hub, &["a", "b"], &[], Some(("b", gate.clone()))).await;
    hub.create(ibgu(
        "slow",
        &["a", "b"],
        json!([{"actions": ["Prep", "Upgrade"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 60}}]),
    ))
    .await;
    wait_for(
        "a upgraded while b's Prep push is held",
        Duration::from_secs(8),
        || async {
            hub.engine.pass_all().await.unwrap();
            let g = hub.get("/v1/rollouts/default/slow").await;
            (acts(&cluster(&g, "a")["completedActions"]) == ["Prep", "Upgrade"]).then_some(g)
        },
    )
    .await;
    let g = hub.get("/v1/rollouts/default/slow").await;
    assert!(
        acts(&cluster(&g, "b")["completedActions"]).is_empty(),
        "{}",
        cluster(&g, "b")
    );
    gate.add_permits(2);
    let g = hub.settle("slow", "done", done).await;
    assert_eq!(
        acts(&cluster(&g, "b")["completedActions"]),
        vec!["Prep", "Upgrade"]
    );
    // The hub asks for no object in the answer to a push (it reads the next report).
    let answers = fleet.push_answers.lock().unwrap().clone();
    assert!(
        answers.len() >= 4 && answers.iter().all(|c| *c == 204),
        "{answers:?}"
    );
}

/// Spokes that take every stage push (204) and report nothing of their own accord: the
/// test reports for them. The answers to pushes to the `held` spokes wait for `gate`.
struct QuietSpokes {
    hub_url: String,
    credentials: HashMap<String, String>,
    /// The stages pushed, in order, with their clusters.
    pushes: Arc<Mutex<Vec<(String, String)>>>,
    gate: Arc<tokio::sync::Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for QuietSpokes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl QuietSpokes {
    async fn start(hub: &Hub, names: &[&str], held: &[&str]) -> QuietSpokes {
        let pushes = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (seen, open) = (pushes.clone(), gate.clone());
        let held: Vec<String> = held.iter().map(|h| h.to_string()).collect();
        let app = axum::Router::new().route(
            "/{name}/v1/ibu",
            axum::routing::patch(
                move |axum::extract::Path(name): axum::extract::Path<String>, body: String| {
                    let stage = serde_json::from_str::<Value>(&body).unwrap()["spec"]["stage"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    seen.lock().unwrap().push((name.clone(), stage));
                    let (hold, open) = (held.contains(&name), open.clone());
                    async move {
                        if hold {
                            // The permit goes back at once: once given, the gate stays open.
                            let _ = open.acquire().await;
                        }
                        axum::http::StatusCode::NO_CONTENT
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let mut credentials = HashMap::new();
        for name in names {
            let registration = json!({"name": name, "endpoint": format!("{base}/{name}"),
                "labels": {"name": name}, "agentId": uuid_like(name)});
            let url = format!("{}/v1/clusters/register", hub.url);
            let res = post_json(&url, JOIN, &registration).await;
            let credential = res["credential"].as_str().unwrap().to_string();
            credentials.insert(name.to_string(), credential);
        }
        QuietSpokes {
            hub_url: hub.url.clone(),
            credentials,
            pushes,
            gate,
            task,
        }
    }

    fn pushes(&self) -> Vec<(String, String)> {
        self.pushes.lock().unwrap().clone()
    }

    /// Reports an IBU at `stage`: nothing done yet, or with the stage's `<Stage>Completed`
    /// condition.
    async fn report(&self, name: &str, sequence: u64, stage: &str, completed: bool) {
        let mut ibu = json!({"apiVersion": "lca.openshift.io/v1", "kind": "ImageBasedUpgrade",
            "metadata": {"name": "upgrade"},
            "spec": {"stage": stage, "seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}}});
        if completed {
            ibu["status"] = json!({"conditions": [{"type": format!("{stage}Completed"),
                "status": "True", "reason": "Completed", "message": "done",
                "lastTransitionTime": "2026-12-01T00:00:00Z"}]});
        }
        let report = json!({"sequence": sequence, "agentId": uuid_like(name), "ibu": ibu});
        let url = format!("{}/v1/clusters/{name}/status", self.hub_url);
        let res = post_json(&url, &self.credentials[name], &report).await;
        assert_eq!(res["accepted"], true, "{res}");
    }
}

/// POSTs `body` as `token` and answers the JSON answer.
async fn post_json(url: &str, token: &str, body: &Value) -> Value {
    let res = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    res.json().await.unwrap()
}

#[tokio::test]
async fn an_accepted_push_is_recorded_with_the_spokes_next_report_or_after_the_hold() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let names = ["q1", "q2"];
    let quiet = QuietSpokes::start(&hub, &names, &[]).await;
    hub.create(ibgu(
        "quiet",
        &names,
        json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 60}}]),
    ))
    .await;
    let pushed = || async {
        sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT cluster, pushed_stage FROM rollout_clusters ORDER BY cluster",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let stages = |q1: Option<&str>, q2: Option<&str>| {
        vec![
            ("q1".to_string(), q1.map(String::from)),
            ("q2".to_string(), q2.map(String::from)),
        ]
    };
    // Both Prep pushes answered, and their outcomes back at the engine.
    wait_for("both pushes accepted", DEADLINE, || async {
        hub.engine.pass_all().await.unwrap();
        let metrics = hub
            .client
            .get(format!("{}/metrics", hub.url))
            .send()
            .await
            .unwrap();
        let text = metrics.text().await.unwrap();
        text.contains("fleet_hub_spoke_pushes_total{result=\"accepted\"} 2")
            .then_some(())
    })
    .await;
    // Passes without a report from either spoke hold the outcomes (the clusters stay in
    // flight: nothing is pushed to them again).
    hub.engine.pass_all().await.unwrap();
    hub.engine.pass_all().await.unwrap();
    assert_eq!(pushed().await, stages(None, None));
    // q1 reports: the pass that reads the report records the push with it.
    quiet.report("q1", 1, "Prep", false).await;
    hub.engine.pass_all().await.unwrap();
    assert_eq!(pushed().await, stages(Some("Prep"), None));
    // q2 stays quiet: its push is recorded once the hold is over.
    hub.clock
        .advance(hub::engine::ACCEPTED_HOLD - chrono::Duration::milliseconds(1));
    hub.engine.pass_all().await.unwrap();
    assert_eq!(pushed().await, stages(Some("Prep"), None));
    hub.clock.advance(chrono::Duration::milliseconds(1));
    hub.engine.pass_all().await.unwrap();
    assert_eq!(pushed().await, stages(Some("Prep"), Some("Prep")));
    let prep = |c: &str| (c.to_string(), "Prep".to_string());
    assert_eq!(
        quiet.pushes(),
        [prep("q1"), prep("q2")],
        "one push each, none repeated"
    );
}

#[tokio::test]
async fn of_two_hubs_one_drives_and_the_other_takes_over_when_it_dies() {
    use hub::planner::drive::DRIVE_LEASE;
    let db = TestDb::empty().await;
    let (one, two) = (start_hub(&db).await, start_hub(&db).await);
    two.clock.advance(one.clock.now() - two.clock.now());
    let names = ["q1", "q2"];
    // q1 answers its pushes only once the gate opens: its Prep push stays on its way.
    let mut quiet = QuietSpokes::start(&one, &names, &["q1"]).await;
    // The spokes report to the second hub (both serve one Service).
    quiet.hub_url = two.url.clone();
    one.create(ibgu(
        "pair",
        &names,
        json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 60}}]),
    ))
    .await;
    wait_for("both Prep pushes", DEADLINE, || async {
        one.engine.pass_all().await.unwrap();
        (quiet.pushes().len() == 2).then_some(())
    })
    .await;
    // While the first hub drives (its term moves on), the second only follows: it pushes
    // nothing, whatever it hears and however long q1's push stays on its way.
    quiet.report("q2", 1, "Prep", false).await;
    for _ in 0..40 {
        one.clock.advance(chrono::Duration::seconds(1));
        two.clock.advance(chrono::Duration::seconds(1));
        two.engine.pass_all().await.unwrap();
        one.engine.pass_all().await.unwrap();
    }
    assert_eq!(quiet.pushes().len(), 2, "{:?}", quiet.pushes());
    // The first hub dies before q1's answer comes. The second sees its last term...
    let dead = one.engine.identity().to_string();
    let _ = one.stop().await;
    two.engine.pass_all().await.unwrap();
    // ... stand still for the lease, not less, then takes the rollout over: the push the
    // dead hub left on its way is sent again, once; q2's, answered, is not.
    two.clock
        .advance(DRIVE_LEASE - chrono::Duration::milliseconds(1));
    two.engine.pass_all().await.unwrap();
    assert_eq!(quiet.pushes().len(), 2, "{:?}", quiet.pushes());
    two.clock.advance(chrono::Duration::milliseconds(1));
    wait_for("the push taken over", DEADLINE, || async {
        two.engine.pass_all().await.unwrap();
        (quiet.pushes().len() == 3).then_some(())
    })
    .await;
    quiet.gate.add_permits(2);
    quiet.report("q1", 2, "Prep", true).await;
    quiet.report("q2", 2, "Prep", true).await;
    two.settle("pair", "Prep done on both", |g| {
        names
            .iter()
            .all(|n| acts(&cluster(g, n)["completedActions"]) == ["Prep"])
    })
    .await;
    let prep = |c: &str| (c.to_string(), "Prep".to_string());
    let mut pushes = quiet.pushes();
    pushes.sort();
    assert_eq!(pushes, [prep("q1"), prep("q1"), prep("q2")]);
    let h = two.get("/v1/rollouts/default/pair/history").await;
    let taken: Vec<&Value> = h["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "RolloutTakenOver")
        .collect();
    assert_eq!(taken.len(), 1, "{h}");
    let message = taken[0]["message"].as_str().unwrap();
    assert!(
        message.contains(two.engine.identity()) && message.contains(&dead),
        "{message}"
    );
    assert!(message.ends_with("stood still for 3.0 s"), "{message}");
}

#[tokio::test]
async fn a_change_at_a_follower_wakes_the_driver_and_a_clean_stop_lets_go_at_once() {
    use futures::FutureExt;
    let db = TestDb::empty().await;
    let (one, two) = (start_hub(&db).await, start_hub(&db).await);
    two.clock.advance(one.clock.now() - two.clock.now());
    let _fleet = start_fleet(&one, &["w1"], &[]).await;
    one.create(ibgu(
        "woken",
        &["w1"],
        json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1, "timeout": 60}}]),
    ))
    .await;
    one.engine.pass_all().await.unwrap();
    two.engine.pass_all().await.unwrap();
    let (_one_peers, _two_peers) = (one.engine.talk_to_peers(), two.engine.talk_to_peers());
    // A change at the second hub (which follows) wakes the first (which drives) through
    // Postgres. Sent again until the first listens.
    while one.engine.wake.notified().now_or_never().is_some() {}
    wait_for("the driver woken by the follower", DEADLINE, || async {
        two.engine.trigger();
        tokio::time::timeout(
            std::time::Duration::from_millis(200),
            one.engine.wake.notified(),
        )
        .await
        .ok()
    })
    .await;
    // The first hub stops cleanly: the second takes the rollout at its next look, without
    // waiting for the lease (its clock does not move).
    one.engine.release().await;
    let driven = || async {
        sqlx::query_scalar::<_, Option<String>>("SELECT driver FROM rollouts WHERE name = 'woken'")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(driven().await, None);
    two.engine.pass_all().await.unwrap();
    assert_eq!(driven().await.as_deref(), Some(two.engine.identity()));
    two.settle("woken", "Prep done under the second hub", |g| {
        acts(&cluster(g, "w1")["completedActions"]) == ["Prep"]
    })
    .await;
}

#[tokio::test]
async fn a_push_outcome_that_comes_after_the_spokes_report_of_the_action_is_let_go() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let quiet = QuietSpokes::start(&hub, &["late"], &["late"]).await;
    hub.create(ibgu(
        "late",
        &["late"],
        json!([{"actions": ["Prep", "Upgrade"], "rolloutStrategy": {"maxConcurrency": 1, "timeout": 60}}]),
    ))
    .await;
    wait_for("the Prep push", DEADLINE, || async {
        hub.engine.pass_all().await.unwrap();
        (!quiet.pushes().is_empty()).then_some(())
    })
    .await;
    // The spoke reports Prep done while the hub still waits for the push's answer: the
    // action completes, and Upgrade waits for the cluster to be out of flight.
    quiet.report("late", 1, "Prep", true).await;
    hub.settle("late", "Prep completed", |g| {
        acts(&cluster(g, "late")["completedActions"]) == ["Prep"]
    })
    .await;
    assert_eq!(quiet.pushes().len(), 1);
    // The answer comes: it wakes the engine (a push waits on it), and it is for an action
    // the cluster is past, so it is let go at once (no waiting for a report or the hold, the
    // clock does not move) and Upgrade is pushed.
    while futures::FutureExt::now_or_never(hub.engine.wake.notified()).is_some() {}
    quiet.gate.add_permits(1);
    tokio::time::timeout(DEADLINE, hub.engine.wake.notified())
        .await
        .expect("the answer to the Prep push woke the engine");
    wait_for("the Upgrade push", DEADLINE, || async {
        hub.engine.pass_all().await.unwrap();
        (quiet.pushes().len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        quiet.pushes()[1],
        ("late".to_string(), "Upgrade".to_string())
    );
}

#[tokio::test]
async fn a_hub_restart_mid_batch_loses_and_repeats_nothing_and_a_new_hub_takes_over() {
    let db = TestDb::empty().await;
    let first = start_hub(&db).await;
    let names = ["s1", "s2", "s3", "s4"];
    let fleet = start_fleet(&first, &names, &[]).await;
    // s4 is away so the first batch cannot finish before the restart
    fleet.agents["s2"].set_unreachable(true);
    first
        .create(ibgu(
            "r",
            &names,
            json!([{"actions": ["Prep", "Upgrade"], "rolloutStrategy": {"maxConcurrency": 2}}]),
        ))
        .await;
    first
        .settle("r", "s1 under way", |g| {
            !acts(&cluster(g, "s1")["completedActions"]).is_empty()
        })
        .await;
    let addr = first.stop().await;

    // a new hub process on the same database and address, and a second one beside it
    let second = start_hub_on(&db, &addr).await;
    let third = start_hub(&db).await;
    fleet.agents["s2"].set_unreachable(false);
    second.clock.advance(chrono::Duration::minutes(2));
    third.clock.advance(chrono::Duration::minutes(2));
    let g = wait_for("the rollout to finish under two hubs", DEADLINE, || async {
        // The stopped hub's term stands still: one of the two takes the rollout over.
        second.clock.advance(chrono::Duration::milliseconds(500));
        third.clock.advance(chrono::Duration::milliseconds(500));
        let (a, b) = tokio::join!(second.engine.pass_all(), third.engine.pass_all());
        a.unwrap();
        b.unwrap();
        let g = second.get("/v1/rollouts/default/r").await;
        done(&g).then_some(g)
    })
    .await;
    for n in names {
        assert_eq!(
            acts(&cluster(&g, n)["completedActions"]),
            vec!["Prep", "Upgrade"],
            "{n}"
        );
    }
    let h = second.get("/v1/rollouts/default/r/history").await;
    let mut seen = std::collections::BTreeSet::new();
    for e in h["items"].as_array().unwrap() {
        let key = format!(
            "{} {} {} {}",
            e["event"], e["cluster"], e["action"], e["message"]
        );
        assert!(seen.insert(key.clone()), "recorded twice: {key}");
    }
    assert_eq!(
        seen.iter()
            .filter(|k| k.starts_with("\"ActionCompleted\""))
            .count(),
        8
    );
}

#[tokio::test]
async fn the_api_refuses_bad_input_with_every_problem() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let mut bad = ibgu(
        "x",
        &["a"],
        json!([{"actions": ["Upgrade", "Prep"], "rolloutStrategy": {"maxConcurrency": 0}}]),
    );
    bad["spec"]["clusterLabelSelectors"] = json!([]);
    bad["spec"]["ibuSpec"]["oadpContent"] = json!([{"name": "oadp", "namespace": "openshift-adp"}]);
    let (code, body) = hub
        .send(
            reqwest::Method::POST,
            "/v1/rollouts",
            "application/json",
            bad,
        )
        .await;
    assert_eq!(code, 422);
    assert_eq!(body["kind"], "Status");
    let causes: Vec<&str> = body["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"].as_str().unwrap())
        .collect();
    assert_eq!(causes.len(), 4, "{causes:?}");
    assert!(causes.contains(&"invalid combinations of actions in the plan"));

    hub.create(ibgu(
        "ok",
        &["a"],
        json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1}}]),
    ))
    .await;
    let (code, _) = hub
        .send(
            reqwest::Method::POST,
            "/v1/rollouts",
            "application/json",
            ibgu(
                "ok",
                &["a"],
                json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1}}]),
            ),
        )
        .await;
    assert_eq!(code, 409);
    let (code, body) = hub
        .send(reqwest::Method::PATCH, "/v1/rollouts/default/ok", "application/merge-patch+json", json!({"spec": {"plan": [{"actions": ["Upgrade"], "rolloutStrategy": {"maxConcurrency": 1}}]}}))
        .await;
    assert_eq!(code, 422);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("plan is append only"),
        "{body}"
    );
    let res = reqwest::Client::new()
        .get(format!("{}/v1/rollouts", hub.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let (code, body) = hub
        .send(
            reqwest::Method::POST,
            "/v1/rollouts?dryRun=All",
            "application/json",
            ibgu(
                "dry",
                &["a"],
                json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1}}]),
            ),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["dryRun"], true);
    let list = hub.get("/v1/rollouts").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "a dry run stores nothing"
    );
    let (code, body) = hub
        .send(
            reqwest::Method::DELETE,
            "/v1/rollouts/default/ok",
            "application/json",
            Value::Null,
        )
        .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("Success")),
        "{body}"
    );
    let (code, body) = hub
        .send(
            reqwest::Method::DELETE,
            "/v1/rollouts/default/ok",
            "application/json",
            Value::Null,
        )
        .await;
    assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")));
}

#[tokio::test]
async fn a_viewer_token_reads_everything_and_changes_nothing() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let call = |method: reqwest::Method, path: &str, token: Option<&str>| {
        let mut req = hub
            .client
            .request(method, format!("{}{path}", hub.url))
            .header("Content-Type", "application/json")
            .body(
                ibgu(
                    "viewed",
                    &["sno1"],
                    json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1, "timeout": 5}}]),
                )
                .to_string(),
            );
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let res = req.send().await.unwrap();
            let code = res.status().as_u16();
            (code, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for path in ["/v1/clusters", "/v1/rollouts"] {
        assert_eq!(
            call(reqwest::Method::GET, path, Some(VIEWER)).await.0,
            200,
            "{path}"
        );
    }
    let (code, body) = call(reqwest::Method::POST, "/v1/rollouts", Some(VIEWER)).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["reason"], "Forbidden");
    assert_eq!(
        body["message"],
        "a viewer token may only read: this change needs the admin token"
    );
    let (code, body) = call(reqwest::Method::DELETE, "/v1/clusters/sno1", Some(VIEWER)).await;
    assert_eq!(code, 403, "{body}");
    // Nothing was created; no token at all is still 401.
    assert_eq!(hub.get("/v1/rollouts").await["items"], json!([]));
    assert_eq!(
        call(reqwest::Method::GET, "/v1/rollouts", None).await.0,
        401
    );
}

fn history_of(h: &Value) -> Vec<(String, String, String, String)> {
    h["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
            (s("cluster"), s("event"), s("actor"), s("message"))
        })
        .collect()
}

#[tokio::test]
async fn a_failed_canary_halts_the_rollout_before_the_fleet_is_touched() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let names = ["c1", "c2", "c3", "c4", "c5", "c6"];
    let _fleet = start_fleet(&hub, &names, &[("c1", Fault::Prep)]).await;
    let plan = json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 4, "timeout": 30,
        "canaryClusters": 1, "batchGrowthFactor": 2, "retries": 1}}]);
    // The dry run shows the canary batch and the batches growing after it.
    let (code, dry) = hub
        .send(
            reqwest::Method::POST,
            "/v1/rollouts?dryRun=All",
            "application/json",
            ibgu("canary", &names, plan.clone()),
        )
        .await;
    assert_eq!(code, 200, "{dry}");
    assert_eq!(
        dry["steps"][0]["batches"],
        json!([["c1"], ["c2"], ["c3", "c4"], ["c5", "c6"]])
    );
    assert_eq!(dry["steps"][0]["canaryBatch"], json!(["c1"]));

    hub.create(ibgu("canary", &names, plan)).await;
    let g = hub
        .settle("canary", "the canary halts the rollout", |g| {
            g["status"]["conditions"][0]["status"] == "False"
        })
        .await;
    let progressing = &g["status"]["conditions"][0];
    assert_eq!(progressing["reason"], "CanaryFailed", "{g}");
    assert_eq!(progressing["message"], "plan step 0: canary c1 failed Prep");
    assert_eq!(g["status"]["summary"][0]["pending"], 5);
    for c in &names[1..] {
        assert!(hub.labels(c).await.is_empty(), "{c} was never touched");
    }
    assert_eq!(
        hub.labels("c1").await,
        vec!["lcm.openshift.io/ibgu-prep-failed"]
    );
    // The failed Prep was aborted on the spoke and tried once more before it counted.
    let h = history_of(&hub.get("/v1/rollouts/default/canary/history").await);
    let retried: Vec<_> = h.iter().filter(|e| e.1 == "ActionRetried").collect();
    assert_eq!(retried.len(), 1, "{h:?}");
    assert_eq!(retried[0].0, "c1");
    assert_eq!(retried[0].2, "controller");
    assert!(
        h.iter()
            .any(|e| e.1 == "RolloutHalted" && e.3 == "plan step 0: canary c1 failed Prep")
    );
    // Halted is final: an appended item is refused.
    let (code, body) = hub
        .send(
            reqwest::Method::PATCH,
            "/v1/rollouts/default/canary",
            "application/json-patch+json",
            json!([{"op": "add", "path": "/spec/plan/-", "value": {"actions": ["AbortOnFailure"], "rolloutStrategy": {"maxConcurrency": 2}}}]),
        )
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(
        body["message"],
        "rollout canary is halted: create a new ImageBasedGroupUpgrade"
    );
    let metrics = hub
        .client
        .get(format!("{}/metrics", hub.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "fleet_hub_rollout_halted{namespace=\"default\",reason=\"CanaryFailed\",rollout=\"canary\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("fleet_hub_rollout_events_total{event=\"ActionRetried\"} 1"));
}

#[tokio::test]
async fn pause_resume_and_the_maintenance_window_hold_starts_back() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let names = ["w1", "w2"];
    let _fleet = start_fleet(&hub, &names, &[]).await;
    // A window that opens in two hours, on the hub's clock.
    let opens = hub.clock.now() + chrono::Duration::hours(2);
    let mut g = ibgu(
        "windowed",
        &names,
        json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 600}}]),
    );
    g["spec"]["maintenanceWindow"] =
        json!({"start": opens.format("%H:%M").to_string(), "durationMinutes": 60});
    hub.create(g).await;
    let g = hub
        .settle("windowed", "waiting for the window", |g| {
            g["status"]["conditions"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("; waiting for the maintenance window"))
        })
        .await;
    assert!(g["status"]["clusters"].is_null(), "nothing started: {g}");

    let pause = |verb: &'static str| {
        let hub = &hub;
        async move {
            hub.send(
                reqwest::Method::POST,
                &format!("/v1/rollouts/default/windowed/{verb}"),
                "application/json",
                Value::Null,
            )
            .await
        }
    };
    let (code, body) = pause("pause").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["spec"]["paused"], true);
    let g = hub
        .settle("windowed", "the Paused condition", |g| {
            g["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Paused"))
        })
        .await;
    assert!(g["status"]["clusters"].is_null());
    // The window opens while paused: still nothing starts.
    hub.clock.advance(chrono::Duration::hours(2));
    hub.engine.pass_all().await.unwrap();
    let g = hub.get("/v1/rollouts/default/windowed").await;
    assert!(g["status"]["clusters"].is_null(), "paused: {g}");
    let (code, _) = pause("resume").await;
    assert_eq!(code, 200);
    hub.settle("windowed", "done inside the window", done).await;

    let h = history_of(&hub.get("/v1/rollouts/default/windowed/history").await);
    let said: Vec<(&str, &str)> = h
        .iter()
        .filter(|e| ["WaitingForMaintenanceWindow", "Paused", "Resumed"].contains(&e.1.as_str()))
        .map(|e| (e.1.as_str(), e.2.as_str()))
        .collect();
    assert_eq!(
        said,
        vec![
            ("WaitingForMaintenanceWindow", "controller"),
            ("Paused", "admin"),
            ("Resumed", "admin"),
        ]
    );
}
