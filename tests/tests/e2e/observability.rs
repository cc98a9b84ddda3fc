//! Observability end to end: the hub and a simulated fleet as processes, with JSON logs, run
//! a small rollout; then every dashboard is checked against what they expose and store.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_e2e::{ChildGuard, TestDb, binary, free_port, wait_for};
use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);
/// Distinct enough to be found anywhere they leak.
const ADMIN: &str = "admin-secret-3f9c1e7a";
const JOIN: &str = "join-secret-81b2d4c6";

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

struct Running {
    hub: String,
    fleet: String,
    hub_log: PathBuf,
    fleet_log: PathBuf,
    _procs: (ChildGuard, ChildGuard),
    _dir: tempfile::TempDir,
}

/// `fleet-hub serve` and `spoke-agent sim-fleet` (obs1..obs3, obs3 fails Prep), JSON logs
/// to files, every spoke registered and reported.
async fn start(db: &TestDb) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (hub_port, fleet_port) = (free_port(), free_port());
    let hub = format!("http://127.0.0.1:{hub_port}");
    let fleet = format!("http://127.0.0.1:{fleet_port}");
    let hub_log = dir.path().join("hub.log");
    let fleet_log = dir.path().join("fleet.log");
    let hub_proc = Command::new(binary("fleet-hub"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--admin-token",
            ADMIN,
            "--join-token",
            JOIN,
        ])
        .args(["--listen", &format!("127.0.0.1:{hub_port}")])
        .args(["--database-url", &db.url()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&hub_log).unwrap())
        .spawn()
        .expect("fleet-hub starts");
    let hub_proc = ChildGuard(hub_proc);
    let fleet_proc = Command::new(binary("spoke-agent"))
        .args([
            "--log-format",
            "json",
            "sim-fleet",
            "--count",
            "3",
            "--prefix",
            "obs",
        ])
        // Slow enough for Prometheus, scraping every 250 ms, to see every step run.
        .args([
            "--sim-step-ms",
            "40",
            "--sim-reboot-ms",
            "200",
            "--fault",
            "obs3=prep",
        ])
        .args([
            "--hub-url",
            &hub,
            "--join-token",
            JOIN,
            "--label",
            "demo=obs",
        ])
        .args(["--listen", &format!("127.0.0.1:{fleet_port}")])
        .arg("--state-dir")
        .arg(dir.path().join("fleet"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&fleet_log).unwrap())
        .spawn()
        .expect("spoke-agent sim-fleet starts");
    let fleet_proc = ChildGuard(fleet_proc);
    let client = reqwest::Client::new();
    wait_for("three spokes registered and reporting", DEADLINE, || {
        let req = client
            .get(format!("{hub}/v1/clusters"))
            .bearer_auth(ADMIN)
            .send();
        async move {
            let list: Value = req.await.ok()?.json().await.ok()?;
            let items = list["items"].as_array()?;
            (items.len() == 3 && items.iter().all(|c| c["ibu"].is_object())).then_some(())
        }
    })
    .await;
    Running {
        hub,
        fleet,
        hub_log,
        fleet_log,
        _procs: (hub_proc, fleet_proc),
        _dir: dir,
    }
}

async fn get_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// Metric names present in a Prometheus text exposition (histogram series included).
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

struct Names(BTreeSet<String>);

impl ExprVisitor for Names {
    type Error = ();
    fn pre_visit(&mut self, e: &Expr) -> Result<bool, ()> {
        match e {
            Expr::VectorSelector(vs) => self.0.extend(vs.name.clone()),
            Expr::MatrixSelector(ms) => self.0.extend(ms.vs.name.clone()),
            _ => {}
        }
        Ok(true)
    }
}

/// A dashboard expression as Prometheus receives it: Grafana's variables filled in, the
/// rollout detail's on `rollout`.
fn promql(expr: &str, rollout: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "1m")
        .replace("$namespace", "default")
        .replace("$rollout", rollout);
    assert!(
        !e.contains('$'),
        "a variable the test does not know in {expr}"
    );
    e
}

/// A dashboard query as Postgres receives it: Grafana's macros and variables filled in.
fn sql(query: &str) -> String {
    let q = query
        .replace(
            "$__timeFilter(time)",
            "time BETWEEN now() - interval '1 hour' AND now() + interval '1 minute'",
        )
        .replace(
            "$__timeGroupAlias(time, '1m')",
            "date_trunc('minute', time) AS \"time\"",
        )
        .replace("$namespace", "default")
        .replace("$rollout", "obs");
    assert!(
        !q.contains('$'),
        "a macro or variable the test does not know in {query}"
    );
    q
}

/// A real Prometheus (Debian's `prometheus`, which `bash .ci/run` installs) scraping the hub
/// and the fleet every 250 ms and evaluating the shipped alert rules every second.
struct Prometheus {
    url: String,
    _proc: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(hub: &str, fleet: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let target = |url: &str| url.trim_start_matches("http://").to_string();
        let rules = dashboards_dir().join("alerts/fleet-hub.rules.yml");
        let config = format!(
            "global: {{scrape_interval: 250ms, evaluation_interval: 1s}}\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n\
             - {{job_name: fleet-hub, static_configs: [{{targets: [{:?}]}}]}}\n\
             - {{job_name: spoke-agent, static_configs: [{{targets: [{:?}]}}]}}\n",
            target(hub),
            target(fleet)
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let proc = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("prometheus (Debian's prometheus package; bash .ci/run installs it): {e}")
            });
        let p = Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            _proc: ChildGuard(proc),
            _dir: dir,
        };
        // Both targets scraped at least once: every series a panel reads is born before the
        // rollout moves it.
        wait_for(
            "Prometheus scraping the hub and the fleet",
            DEADLINE,
            || async {
                let up = p.query("sum(up)").await.ok()?;
                (up["data"]["result"][0]["value"][1] == "2").then_some(())
            },
        )
        .await;
        p
    }

    async fn get(&self, path: &str, params: &[(&str, String)]) -> Result<Value, String> {
        let res = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .query(params)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = res.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body)
        } else {
            Err(body.to_string())
        }
    }

    async fn query(&self, expr: &str) -> Result<Value, String> {
        self.get("/api/v1/query", &[("query", expr.to_string())])
            .await
    }

    /// The expression over the last `seconds` up to now (to the millisecond: the last
    /// second's scrapes may be all a short-lived series has), a point a scrape, as a panel
    /// draws it.
    async fn query_range(&self, expr: &str, seconds: u64) -> Result<Value, String> {
        let end = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        let start = end - seconds as f64;
        let params = [
            ("query", expr.to_string()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", "0.25".to_string()),
        ];
        self.get("/api/v1/query_range", &params).await
    }

    /// Waits (30 s at most: a scrape and a rule evaluation are a second apart) until the
    /// alert fires with these labels.
    async fn wait_firing(&self, alert: &str, labels: &[(&str, &str)]) {
        wait_for(
            &format!("{alert} firing"),
            Duration::from_secs(30),
            || async {
                self.firing()
                    .await
                    .into_iter()
                    .any(|(name, got)| name == alert && labels.iter().all(|(k, v)| got[*k] == *v))
                    .then_some(())
            },
        )
        .await;
    }

    /// The firing alerts: (name, labels).
    async fn firing(&self) -> Vec<(String, Value)> {
        let Ok(alerts) = self.get("/api/v1/alerts", &[]).await else {
            return vec![];
        };
        alerts["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                let name = a["labels"]["alertname"].as_str().unwrap_or_default();
                (name.to_string(), a["labels"].clone())
            })
            .collect()
    }
}

/// The shipped dashboards' files, in name order.
fn dashboard_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// Every Prometheus panel of every dashboard, through the real Prometheus, over the run:
/// each parses and draws data; every alert rule evaluates without error.
async fn check_with_prometheus(prom: &Prometheus, seconds: u64) {
    let files = dashboard_files();
    let mut checked = 0;
    for file in &files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        for p in d["panels"].as_array().unwrap() {
            if p["datasource"]["type"] != "prometheus" {
                continue;
            }
            for t in p["targets"].as_array().unwrap() {
                // The rollout detail of the rollout still running at the end.
                let expr = promql(t["expr"].as_str().unwrap(), "throttled");
                let at = format!("{}: panel {}: {expr}", file.display(), p["title"]);
                let answer = prom
                    .query_range(&expr, seconds)
                    .await
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
                let series = answer["data"]["result"].as_array().map_or(0, Vec::len);
                assert!(series > 0, "{at}: no data over the run: {answer}");
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "{checked} panel queries");
    let rules = prom.get("/api/v1/rules", &[]).await.unwrap();
    let mut evaluated = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{rule}");
            evaluated += 1;
        }
    }
    assert_eq!(evaluated, 8, "{rules}");
}

/// Every panel of every dashboard: structure, PromQL, the metrics it uses, its SQL.
async fn check_dashboards(hub_metrics: &str, spoke_metrics: &str, db: &TestDb) {
    let hub = exposed(hub_metrics);
    let spoke = exposed(spoke_metrics);
    let mut uids = BTreeSet::new();
    let files = dashboard_files();
    assert_eq!(files.len(), 4, "four dashboards: {files:?}");
    let mut sql_rows = 0;
    for file in &files {
        let name = file.display().to_string();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap())
            .unwrap_or_else(|e| panic!("{name}: not JSON: {e}"));
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty() && uid.len() <= 40, "{name}: uid");
        assert!(uids.insert(uid.to_string()), "{name}: uid {uid} used twice");
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: title"
        );
        let vars = d["templating"]["list"].as_array().unwrap();
        let var_type = |v: &str| {
            vars.iter()
                .find(|x| x["name"] == v)
                .map(|x| (x["type"].clone(), x["query"].clone()))
        };
        assert_eq!(
            var_type("datasource"),
            Some((json!("datasource"), json!("prometheus"))),
            "{name}: a templated Prometheus datasource"
        );
        assert_eq!(
            var_type("history"),
            Some((json!("datasource"), json!("grafana-postgresql-datasource"))),
            "{name}: a templated Postgres datasource"
        );
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap_or_default();
            let at = format!("{name}: panel {title:?}");
            assert!(!title.is_empty(), "{name}: a panel without a title");
            assert!(ids.insert(p["id"].as_i64().unwrap()), "{at}: id used twice");
            assert!(
                p["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .is_some_and(|u| !u.is_empty()),
                "{at}: no unit"
            );
            let ds = &p["datasource"];
            let kind = ds["type"].as_str().unwrap_or_default();
            match (kind, ds["uid"].as_str()) {
                ("prometheus", Some("${datasource}"))
                | ("grafana-postgresql-datasource", Some("${history}")) => {}
                other => panic!("{at}: datasource {other:?} is not a dashboard variable"),
            }
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{at}: no query");
            for t in targets {
                assert_eq!(&t["datasource"], ds, "{at}: a query on another datasource");
                if kind == "prometheus" {
                    let expr = t["expr"].as_str().unwrap();
                    let parsed = parser::parse(&promql(expr, "obs"))
                        .unwrap_or_else(|e| panic!("{at}: {expr}: {e}"));
                    let mut names = Names(BTreeSet::new());
                    walk_expr(&mut names, &parsed).unwrap();
                    assert!(!names.0.is_empty(), "{at}: {expr} reads no metric");
                    for m in names.0 {
                        let (where_, set) = if m.starts_with("spoke_") {
                            ("a spoke", &spoke)
                        } else {
                            ("the hub", &hub)
                        };
                        assert!(
                            set.contains(&m),
                            "{at}: {m} is not in the /metrics of {where_}"
                        );
                    }
                } else {
                    let query = sql(t["rawSql"].as_str().unwrap());
                    let rows = sqlx::query(sqlx::AssertSqlSafe(query.clone()))
                        .fetch_all(&db.pool)
                        .await
                        .unwrap_or_else(|e| panic!("{at}: {query}: {e}"));
                    sql_rows += rows.len();
                }
            }
        }
        for v in vars.iter().filter(|v| v["type"] == "query") {
            let query = sql(v["query"].as_str().unwrap());
            let rows = sqlx::query(sqlx::AssertSqlSafe(query.clone()))
                .fetch_all(&db.pool)
                .await
                .unwrap_or_else(|e| panic!("{name}: variable {}: {query}: {e}", v["name"]));
            assert!(
                !rows.is_empty(),
                "{name}: variable {} offers nothing",
                v["name"]
            );
        }
    }
    assert!(
        sql_rows > 0,
        "the history panels found nothing of the rollout"
    );
}

/// The provisioning files name the datasources the dashboards' variables ask for and load
/// this folder.
fn check_provisioning() {
    let dir = dashboards_dir().join("provisioning");
    let ds: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("datasources/fleet-hub.yaml")).unwrap(),
    )
    .unwrap();
    let types: BTreeSet<&str> = ds["datasources"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|d| d["type"].as_str())
        .collect();
    assert_eq!(
        types,
        BTreeSet::from(["prometheus", "grafana-postgresql-datasource"])
    );
    let boards: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("dashboards/fleet-hub.yaml")).unwrap(),
    )
    .unwrap();
    let provider = &boards["providers"][0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    assert!(provider["options"]["path"].as_str().is_some());
}

/// JSON log lines of a file.
fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect()
}

/// A field of the line's own fields or of any of its spans.
fn field<'a>(line: &'a Value, name: &str) -> Option<&'a str> {
    line["fields"][name].as_str().or_else(|| {
        line["spans"]
            .as_array()?
            .iter()
            .rev()
            .find_map(|s| s[name].as_str())
    })
}

#[tokio::test]
async fn dashboards_metrics_and_logs_after_a_small_rollout() {
    let db = TestDb::empty().await;
    let run = start(&db).await;
    let started = std::time::Instant::now();
    let prom = Prometheus::start(&run.hub, &run.fleet).await;
    let client = reqwest::Client::new();
    let ibgu = json!({
        "apiVersion": "lcm.openshift.io/v1alpha1",
        "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": "obs", "namespace": "default"},
        "spec": {
            "clusterLabelSelectors": [{"matchLabels": {"demo": "obs"}}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
            "plan": [
                {"actions": ["Prep", "Upgrade"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 30}},
                {"actions": ["FinalizeUpgrade"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 30}}
            ]
        }
    });
    let res = client
        .post(format!("{}/v1/rollouts", run.hub))
        .bearer_auth(ADMIN)
        .json(&ibgu)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let url = format!("{}/v1/rollouts/default/obs", run.hub);
    // While the first step runs, the per-rollout gauges show it.
    // The per-rollout gauges exist only while the rollout is active: keep a scrape that
    // shows them.
    let active_scrape = std::cell::RefCell::new(String::new());
    let status = wait_for("the rollout to complete", DEADLINE, || {
        let (client, url, hub) = (client.clone(), url.clone(), run.hub.clone());
        let seen = &active_scrape;
        async move {
            if seen.borrow().is_empty() {
                let m = get_text(&format!("{hub}/metrics")).await;
                if m.contains("fleet_hub_rollout_clusters{namespace=\"default\",rollout=\"obs\"") {
                    *seen.borrow_mut() = m;
                }
            }
            let g: Value = client
                .get(&url)
                .bearer_auth(ADMIN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (g["status"]["conditions"][0]["reason"] == "Completed").then_some(g)
        }
    })
    .await;
    let active_scrape = active_scrape.into_inner();
    // obs3's failed Prep: the failure panels are above zero and the alert fires within 30 s
    // (its series was born at 0, so its first failure is an increase).
    let failed_at = std::time::Instant::now();
    let failures =
        "sum(increase(fleet_hub_action_duration_seconds_count{result!=\"completed\"}[1h]))";
    wait_for(
        "the failure panel above zero",
        Duration::from_secs(30),
        || async {
            let v = prom.query(failures).await.ok()?;
            let n: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
            (n > 0.0).then_some(())
        },
    )
    .await;
    prom.wait_firing(
        "FleetHubClusterActionFailed",
        &[("action", "Prep"), ("result", "failed")],
    )
    .await;
    assert!(failed_at.elapsed() < Duration::from_secs(30));
    assert!(
        !active_scrape.is_empty(),
        "fleet_hub_rollout_clusters showed the active rollout"
    );
    let failed: Vec<&str> = status["status"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["failedActions"].as_array().is_some_and(|f| !f.is_empty()))
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(failed, vec!["obs3"], "{status}");

    let hub_metrics = get_text(&format!("{}/metrics", run.hub)).await;
    let spoke_metrics = get_text(&format!("{}/metrics", run.fleet)).await;
    // The rollout is over: the per-rollout gauges are gone, the totals stay.
    assert!(!hub_metrics.contains("rollout=\"obs\""), "{hub_metrics}");
    for line in [
        "fleet_hub_rollouts{phase=\"Completed\"} 1",
        "fleet_hub_spokes_registered 3",
        "fleet_hub_database_up 1",
        "fleet_hub_spokes_reachable 3",
        "fleet_hub_action_duration_seconds_count{action=\"Prep\",result=\"completed\"} 2",
        "fleet_hub_action_duration_seconds_count{action=\"Prep\",result=\"failed\"} 1",
        "fleet_hub_action_duration_seconds_count{action=\"FinalizeUpgrade\",result=\"completed\"} 2",
        "fleet_hub_rollout_events_total{event=\"ActionFailed\"} 1",
        "fleet_hub_db_pool_max_connections ",
    ] {
        assert!(
            hub_metrics.contains(line),
            "hub /metrics lacks {line}:\n{hub_metrics}"
        );
    }
    // Every decision made on a report is timed: the next action of a cluster (obs1 and obs2
    // Upgrade: 2), the next batch (obs3, at least 1) and plan step (obs1 and obs2 Finalize: 2),
    // and the reports that caused no push (the Finalize completions: 2). Counting only the
    // first kind gave 2, and a one-action step nothing.
    let decisions: u64 = hub_metrics
        .lines()
        .find_map(|l| l.strip_prefix("fleet_hub_decision_latency_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the decision latency histogram");
    assert!(
        decisions >= 7,
        "{decisions} decisions timed:\n{hub_metrics}"
    );
    for line in [
        "spoke_stage_duration_seconds_count{result=\"completed\",stage=\"Prep\"} 2",
        "spoke_stage_duration_seconds_count{result=\"failed\",stage=\"Prep\"} 1",
        "spoke_stage_duration_seconds_count{result=\"completed\",stage=\"Upgrade\"} 2",
        "spoke_phase_duration_seconds_count{phase=\"Precache\",stage=\"Prep\"} 2",
        "spoke_transitions_total{result=\"accepted\"}",
    ] {
        assert!(
            spoke_metrics.contains(line),
            "spoke /metrics lacks {line}:\n{spoke_metrics}"
        );
    }

    // Logs: JSON, the hub's pushes carry rollout, cluster, action and a request id that the
    // spoke's log of the same request carries too; no token anywhere.
    let hub_lines = log_lines(&run.hub_log);
    let fleet_lines = log_lines(&run.fleet_log);
    let pushes: Vec<&Value> = hub_lines
        .iter()
        .filter(|l| l["fields"]["message"] == "stage pushed")
        .collect();
    // obs1 and obs2: Prep, Upgrade, FinalizeUpgrade; obs3: Prep.
    assert!(
        pushes.len() >= 7,
        "a push per cluster action: {}",
        pushes.len()
    );
    for p in &pushes {
        assert_eq!(field(p, "rollout"), Some("default/obs"), "{p}");
        assert!(
            field(p, "cluster").is_some_and(|c| c.starts_with("obs")),
            "{p}"
        );
        assert!(field(p, "action").is_some(), "{p}");
        let id = field(p, "request_id").unwrap();
        let on_spoke = fleet_lines.iter().any(|l| {
            field(l, "request_id") == Some(id) && l["fields"]["message"] == "IBU change accepted"
        });
        assert!(
            on_spoke,
            "the spoke logged no accepted change for request {id}"
        );
    }
    let events: Vec<&Value> = hub_lines
        .iter()
        .filter(|l| l["fields"]["event"] == "ActionFailed")
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(field(events[0], "rollout"), Some("default/obs"));
    for (what, path) in [("hub", &run.hub_log), ("fleet", &run.fleet_log)] {
        let text = std::fs::read_to_string(path).unwrap();
        for secret in [ADMIN, JOIN] {
            assert!(!text.contains(secret), "the {what} log shows a token");
        }
    }

    // The rollout controls' gauges: a paused rollout, and a canary that fails (obs3's Prep)
    // and halts its rollout.
    let post = |name: &str, selector: Value, extra: Value| {
        let mut g = ibgu.clone();
        g["metadata"]["name"] = json!(name);
        g["spec"]["clusterLabelSelectors"] = json!([selector]);
        g["spec"]["plan"] = json!([{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 30, "canaryClusters": 1}}]);
        if let (Some(spec), Some(more)) = (g["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(more.clone());
        }
        let (client, hub) = (client.clone(), run.hub.clone());
        async move {
            let res = client
                .post(format!("{hub}/v1/rollouts"))
                .bearer_auth(ADMIN)
                .json(&g)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
        }
    };
    post(
        "held",
        json!({"matchLabels": {"demo": "obs"}}),
        json!({"paused": true}),
    )
    .await;
    post(
        "canary",
        json!({"matchLabels": {"name": "obs3"}}),
        json!({}),
    )
    .await;
    // And one that stays active whatever the machine's speed: its second cluster waits a
    // minute for a start (maxStartsPerMinute 1), so Prometheus sees its per-rollout gauges.
    let throttled = json!({"plan": [{"actions": ["Prep"], "rolloutStrategy":
        {"maxConcurrency": 2, "timeout": 30, "maxStartsPerMinute": 1}}]});
    let both = json!({"matchExpressions": [{"key": "name", "operator": "In",
        "values": ["obs1", "obs2"]}]});
    post("throttled", both, throttled).await;
    wait_for(
        "Prometheus to see the throttled rollout",
        DEADLINE,
        || async {
            // Its controls and its steps, from one scrape.
            let q = "fleet_hub_rollout_starts_held{rollout=\"throttled\",reason=\"rate\"} == 1 \
                     and on (rollout) fleet_hub_rollout_clusters{rollout=\"throttled\"}";
            let v = prom.query(q).await.ok()?;
            v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
                .then_some(())
        },
    )
    .await;
    let controls_scrape = wait_for("the canary to halt its rollout", DEADLINE, || {
        let hub = run.hub.clone();
        async move {
            let m = get_text(&format!("{hub}/metrics")).await;
            (m.contains("fleet_hub_rollout_halted{namespace=\"default\",reason=\"CanaryFailed\",rollout=\"canary\"} 1")
                && m.contains("fleet_hub_rollout_paused{namespace=\"default\",rollout=\"held\"} 1"))
            .then_some(m)
        }
    })
    .await;
    check_dashboards(
        &format!("{hub_metrics}\n{active_scrape}\n{controls_scrape}"),
        &spoke_metrics,
        &db,
    )
    .await;
    check_provisioning();
    // The halt fires its alert too; then every panel and rule through Prometheus itself.
    prom.wait_firing("FleetHubRolloutHalted", &[("rollout", "canary")])
        .await;
    check_with_prometheus(&prom, started.elapsed().as_secs() + 5).await;
}

/// The alert rules parse and pass their unit tests under Prometheus' own `promtool` (Debian's
/// `prometheus` package, which `bash .ci/run` installs), and every alert has a summary, a
/// description and a runbook section that exists.
#[test]
fn the_alert_rules_pass_promtool_and_each_has_its_runbook() {
    let dir = dashboards_dir().join("alerts");
    for args in [
        ["check", "rules", "fleet-hub.rules.yml"],
        ["test", "rules", "fleet-hub.tests.yml"],
        // The README's Prometheus, which loads the rules too.
        ["check", "config", "../prometheus.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("promtool (Debian's prometheus package; bash .ci/run installs it): {e}")
            });
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("fleet-hub.rules.yml")).unwrap())
            .unwrap();
    let runbooks = std::fs::read_to_string(dashboards_dir().join("../docs/runbooks.md")).unwrap();
    let tests = std::fs::read_to_string(dir.join("fleet-hub.tests.yml")).unwrap();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            alerts += 1;
            for key in ["summary", "description", "runbook_url"] {
                assert!(
                    rule["annotations"][key]
                        .as_str()
                        .is_some_and(|v| !v.is_empty()),
                    "{name} has no {key}"
                );
            }
            let url = rule["annotations"]["runbook_url"].as_str().unwrap();
            assert!(
                url.ends_with(&format!("docs/runbooks.md#{}", name.to_lowercase())),
                "{name}: {url}"
            );
            assert!(
                runbooks.contains(&format!("\n## {name}\n")),
                "docs/runbooks.md has no section {name}"
            );
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "no unit test fires {name}"
            );
        }
    }
    assert_eq!(alerts, 8);
}
