//! The hub's integration tests, in one binary: real Postgres, the HTTP router in-process.

use std::os::unix::fs::PermissionsExt;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use std::sync::Arc;

use fleet_e2e::TestDb;
use hub::db::{self, MIGRATOR};
use hub::embedded_pg::EmbeddedPostgres;
use hub::http::{AppState, router};

mod kube_mode;

async fn migrated() -> TestDb {
    let db = TestDb::empty().await;
    db::migrate(&db.pool).await.expect("migrations apply");
    db
}

/// The plan a statement runs with on a connection as the hub opens them, once the table it
/// updates grew from a few rows to 20,000 after the statement had run a few times: planned
/// for its values (an index scan), not a plan cached while the table was small.
async fn plan_after_growth(options: sqlx::postgres::PgConnectOptions) -> String {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
    for sql in [
        "CREATE TEMP TABLE grows (name text PRIMARY KEY, v int NOT NULL)",
        "INSERT INTO grows SELECT 'c' || i, 0 FROM generate_series(1, 10) i",
        "ANALYZE grows",
        "PREPARE bump(text[]) AS UPDATE grows g SET v = g.v + 1
           FROM UNNEST($1) AS u(name) WHERE g.name = u.name",
    ] {
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    }
    // Past the five runs after which Postgres may settle on a generic plan.
    for _ in 0..8 {
        sqlx::raw_sql("EXECUTE bump('{c1,c2}')")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    sqlx::raw_sql("INSERT INTO grows SELECT 'd' || i, 0 FROM generate_series(1, 20000) i")
        .execute(&mut conn)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE bump('{c1,c2}')")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    plan.join("\n")
}

#[tokio::test]
async fn the_hub_plans_each_statement_for_its_values() {
    use std::str::FromStr;
    let db = TestDb::empty().await;
    let options = sqlx::postgres::PgConnectOptions::from_str(&db.url()).unwrap();
    let hubs = plan_after_growth(db::custom_plans(options.clone())).await;
    assert!(
        hubs.contains("Index Scan") && !hubs.contains("Seq Scan on grows"),
        "{hubs}"
    );
    // What it guards against: a plain connection keeps the plan made for ten rows.
    let plain = plan_after_growth(options.clone()).await;
    assert!(plain.contains("Seq Scan on grows"), "{plain}");
    // An operator's own choice stays, given to the options or in the URL as the docs say.
    let chosen = options.options([("plan_cache_mode", "force_generic_plan")]);
    assert_eq!(
        db::custom_plans(chosen.clone()).get_options(),
        chosen.get_options()
    );
    let base = db.url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20plan_cache_mode%3Dauto");
    let from_url = db::custom_plans(sqlx::postgres::PgConnectOptions::from_str(&url).unwrap());
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(&from_url).await.unwrap();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "auto");
}

#[tokio::test]
async fn migrations_apply_to_a_fresh_database_and_twice_is_harmless() {
    let db = TestDb::empty().await;
    assert!(
        db::check_ready(&db.pool).await.is_err(),
        "an empty database is not ready"
    );
    db::migrate(&db.pool).await.expect("first run");
    db::migrate(&db.pool).await.expect("second run is harmless");
    db::check_ready(&db.pool)
        .await
        .expect("ready after migrating");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, MIGRATOR.iter().count());
    for table in [
        "clusters",
        "rollouts",
        "rollout_steps",
        "rollout_clusters",
        "configmaps",
        "history",
    ] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(exists, "table {table} exists");
    }
}

#[tokio::test]
async fn concurrent_migrations_from_two_hubs_do_not_conflict() {
    let db = TestDb::empty().await;
    let (a, b) = tokio::join!(db::migrate(&db.pool), db::migrate(&db.pool));
    a.expect("first hub migrates");
    b.expect("second hub migrates");
    db::check_ready(&db.pool).await.expect("ready");
}

#[tokio::test]
async fn history_is_append_only() {
    let db = migrated().await;
    sqlx::query(
        "INSERT INTO history (rollout_id, rollout_namespace, rollout_name, time, event, message)
         VALUES (1, 'default', 'r', now(), 'StepStarted', 'step 0 started')",
    )
    .execute(&db.pool)
    .await
    .expect("insert is allowed");
    let month: String =
        sqlx::query_scalar("SELECT 'history_' || to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // Refused on the table and on each partition (the month's, the default one).
    for stmt in [
        "UPDATE history SET message = 'rewritten'".to_string(),
        "DELETE FROM history".into(),
        "TRUNCATE history".into(),
        format!("DELETE FROM {month}"),
        format!("TRUNCATE {month}"),
        "TRUNCATE history_default".into(),
    ] {
        let err = sqlx::query(sqlx::AssertSqlSafe(stmt.clone()))
            .execute(&db.pool)
            .await
            .expect_err(&stmt);
        assert!(err.to_string().contains("append-only"), "{stmt}: {err}");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM history")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

async fn get(app: axum::Router, path: &str) -> (StatusCode, String) {
    let res = app
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn health_readiness_metrics_and_errors_over_http() {
    let db = TestDb::empty().await;
    let state = AppState::test(db.pool.clone());
    let app = router(state.clone());

    let (code, body) = get(app.clone(), "/healthz").await;
    assert_eq!(code, StatusCode::OK, "{body}");

    let (code, body) = get(app.clone(), "/readyz").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "not migrated yet");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "ServiceUnavailable");
    assert_eq!(status["code"], 503);

    db::migrate(&db.pool).await.unwrap();
    let (code, _) = get(app.clone(), "/readyz").await;
    assert_eq!(code, StatusCode::OK);

    let (code, body) = get(app.clone(), "/v1/nothing/here").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["message"], "no such endpoint: GET /v1/nothing/here");

    let (code, body) = get(app, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        body.contains(
            r#"fleet_hub_http_requests_total{method="GET",route="/readyz",status="503"} 1"#
        ),
        "{body}"
    );
    assert!(
        body.contains(
            r#"fleet_hub_http_requests_total{method="GET",route="unmatched",status="404"} 1"#
        ),
        "{body}"
    );
}

/// A temporary directory the `postgres` user can traverse when the tests run as root.
fn reachable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn embedded_postgres_is_created_once_and_keeps_its_data() {
    let dir = reachable_tempdir();
    let data_dir = dir.path().join("pgdata");

    let pg = EmbeddedPostgres::start(&data_dir)
        .await
        .expect("first start creates the cluster");
    let pool = sqlx::PgPool::connect_with(pg.connect_options())
        .await
        .unwrap();
    db::migrate(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO clusters (name, endpoint, credential_hash) VALUES ('spoke1', 'http://x', 'h')",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    pg.stop().await.expect("stops");
    assert!(!data_dir.join("postmaster.pid").exists(), "server is down");

    let pg = EmbeddedPostgres::start(&data_dir)
        .await
        .expect("second start reuses the cluster");
    let pool = sqlx::PgPool::connect_with(pg.connect_options())
        .await
        .unwrap();
    db::check_ready(&pool).await.expect("still migrated");
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM clusters")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(names, vec!["spoke1".to_string()]);
    pool.close().await;
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn embedded_postgres_adopts_a_server_left_running() {
    let dir = reachable_tempdir();
    let data_dir = dir.path().join("pgdata");
    let first = EmbeddedPostgres::start(&data_dir).await.unwrap();
    // A second handle on the same directory while the first lives (here, or in another hub)
    // finds the server running and shares it instead of starting another.
    let second = EmbeddedPostgres::start(&data_dir).await.expect("shares");
    assert_eq!(first.url(), second.url());
    let pool = sqlx::PgPool::connect_with(second.connect_options())
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    pool.close().await;
    second.stop().await.unwrap();
    assert!(
        data_dir.join("postmaster.pid").exists(),
        "a sharer does not stop it"
    );
    first.stop().await.unwrap();
    assert!(!data_dir.join("postmaster.pid").exists());
}

#[tokio::test]
async fn embedded_postgres_refuses_a_foreign_non_empty_directory() {
    let dir = reachable_tempdir();
    let data_dir = dir.path().join("pgdata");
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::write(data_dir.join("notes.txt"), "mine").unwrap();
    let err = EmbeddedPostgres::start(&data_dir).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("is not empty and holds no Postgres cluster"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(data_dir.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_the_document_is_committed() {
    let db = TestDb::empty().await;
    let state = AppState::test(db.pool.clone());
    db::migrate(&db.pool).await.unwrap();
    let app = router(state);
    for op in hub::http::openapi::OPERATIONS {
        let path = op
            .path
            .replace("{namespace}", "default")
            .replace("{name}", "x");
        let res = app
            .clone()
            .oneshot(
                Request::builder()
                    .method(op.method.to_uppercase().as_str())
                    .uri(&path)
                    .header("content-type", "application/json")
                    .body(Body::from("{}"))
                    .unwrap(),
            )
            .await
            .unwrap();
        let code = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert_ne!(code, StatusCode::METHOD_NOT_ALLOWED, "{} {path}", op.method);
        assert!(
            !text.contains("no such endpoint"),
            "{} {path} is documented but not routed",
            op.method
        );
    }
    let (code, body) = get(app, "/openapi.json").await;
    assert_eq!(code, StatusCode::OK);
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served, hub::http::openapi::document());
    let committed: serde_json::Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("hub/openapi.json is JSON");
    assert_eq!(
        committed, served,
        "hub/openapi.json is stale: run `cargo run -p hub -- openapi > hub/openapi.json`"
    );
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> (StatusCode, serde_json::Value) {
    call_text(app, method, path, token, body.to_string()).await
}

async fn call_text(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: String,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let code = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        code,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// Run `run-1`'s status report number `seq`, its IBU at `stage`.
fn status_report(seq: u64, stage: &str) -> serde_json::Value {
    serde_json::json!({"sequence": seq, "agentId": "run-1", "ibu": {"apiVersion": "lca.openshift.io/v1",
        "kind": "ImageBasedUpgrade", "metadata": {"name": "upgrade"}, "spec": {"stage": stage}}})
}

#[tokio::test]
async fn registration_reports_and_labels() {
    let db = migrated().await;
    let app = router(AppState::test(db.pool.clone()).with_tokens("admin", "join"));
    let reg = |name: &str| serde_json::json!({"name": name, "endpoint": format!("http://127.0.0.1:1/clusters/{name}"), "labels": {"site": "a"}, "agentId": "run-1"});
    let (code, _) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some("wrong"),
        reg("sno1"),
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, body) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some("join"),
        serde_json::json!({"name": "bad name!", "endpoint": "ftp://x", "labels": {}}),
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["details"]["causes"].as_array().unwrap().len(),
        2,
        "every problem: {body}"
    );
    // Names a path could be made of, or that Kubernetes would refuse, never register.
    for bad in [".", "..", "-a", "Sno1", "a.b", "x/../../y", "%2e%2e"] {
        let (code, body) = call(
            &app,
            "POST",
            "/v1/clusters/register",
            Some("join"),
            reg(bad),
        )
        .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert_eq!(body["details"]["causes"][0]["field"], "name", "{bad}");
    }
    let (code, body) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some("join"),
        reg("sno1"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let cred1 = body["credential"].as_str().unwrap().to_string();
    let (_, body) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some("join"),
        reg("sno2"),
    )
    .await;
    let cred2 = body["credential"].as_str().unwrap().to_string();
    assert_ne!(cred1, cred2);

    let report = status_report;
    let sno1_reports = |credential: &str, report: serde_json::Value| {
        let (app, credential) = (app.clone(), credential.to_string());
        async move {
            call(
                &app,
                "POST",
                "/v1/clusters/sno1/status",
                Some(&credential),
                report,
            )
            .await
        }
    };
    let (code, body) = sno1_reports(&cred1, report(2, "Prep")).await;
    assert_eq!(
        (code, body["accepted"].clone()),
        (StatusCode::OK, serde_json::json!(true))
    );
    let (_, body) = sno1_reports(&cred1, report(1, "Idle")).await;
    assert_eq!(body["accepted"], false, "an older report is ignored");
    let (_, body) = sno1_reports(&cred1, report(2, "Idle")).await;
    assert_eq!(body["accepted"], false, "a duplicate is ignored");
    let (code, _) = sno1_reports(&cred2, report(3, "Idle")).await;
    assert_eq!(
        code,
        StatusCode::FORBIDDEN,
        "a spoke reports only for itself"
    );
    // Who sends it is checked before what it holds: a body that is not a report, sent with
    // another cluster's credential or a made-up one, is refused as the sender, not the body.
    for wrong in [cred2.as_str(), "made-up"] {
        let (code, body) = call_text(
            &app,
            "POST",
            "/v1/clusters/sno1/status",
            Some(wrong),
            "{not a report".into(),
        )
        .await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(
            body["message"],
            "this credential may not report for cluster sno1"
        );
    }
    let (code, _) = call_text(
        &app,
        "POST",
        "/v1/clusters/sno1/status",
        Some(&cred1),
        "{not a report".into(),
    )
    .await;
    assert_eq!(
        code,
        StatusCode::UNPROCESSABLE_ENTITY,
        "its own sender learns why"
    );
    let (code, c) = call(
        &app,
        "GET",
        "/v1/clusters/sno1",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(c["ibu"]["spec"]["stage"], "Prep");
    assert!(c["lastSeen"].is_string());

    // labels: merge, remove with null, select
    let (code, c) = call(
        &app,
        "PATCH",
        "/v1/clusters/sno2",
        Some("admin"),
        serde_json::json!({"labels": {"tier": "gold", "site": null}}),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(c["labels"], serde_json::json!({"tier": "gold"}));
    let (_, list) = call(
        &app,
        "GET",
        "/v1/clusters?labelSelector=tier%3Dgold",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["sno2"]);
    let (code, _) = call(
        &app,
        "GET",
        "/v1/clusters?labelSelector=a%20in%20b",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    // re-registration keeps the hub's labels; the same run of the agent registering again
    // (a retry whose first attempt reaches the hub late) keeps its credential and sequence
    sqlx::query("UPDATE clusters SET labels = labels || '{\"lcm.openshift.io/ibgu-prep-completed\": \"\"}' WHERE name = 'sno1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, body) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some("join"),
        reg("sno1"),
    )
    .await;
    assert_eq!(
        body["credential"],
        cred1.as_str(),
        "same run, same credential"
    );
    let (_, body) = sno1_reports(&cred1, report(2, "Idle")).await;
    assert_eq!(body["accepted"], false, "same run, same sequence");
    // a new run of the agent gets a new credential and a new sequence
    let mut run2 = reg("sno1");
    run2["agentId"] = "run-2".into();
    let (_, body) = call(&app, "POST", "/v1/clusters/register", Some("join"), run2).await;
    let cred1b = body["credential"].as_str().unwrap().to_string();
    assert_ne!(cred1b, cred1);
    let report = |seq: u64, stage: &str| {
        let mut r = status_report(seq, stage);
        r["agentId"] = "run-2".into();
        r
    };
    let (_, c) = call(
        &app,
        "GET",
        "/v1/clusters/sno1",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert!(c["labels"]["lcm.openshift.io/ibgu-prep-completed"].is_string());
    let (_, body) = sno1_reports(&cred1b, report(1, "Idle")).await;
    assert_eq!(body["accepted"], true);
    let (code, _) = sno1_reports(&cred1, report(5, "Idle")).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "the old credential is gone");
}

/// A spoke serving TLS registers its certificate's SHA-256, which the hub shows and pins; to
/// register a renewed one it may present its own credential instead of the join token, but
/// not another cluster's.
#[tokio::test]
async fn registration_pins_the_certificate_and_takes_the_cluster_credential() {
    let db = migrated().await;
    let app = router(AppState::test(db.pool.clone()).with_tokens("admin", "join"));
    let first = "ab".repeat(32);
    let renewed = "cd".repeat(32);
    let reg = |name: &str, pin: &str| serde_json::json!({"name": name, "endpoint": format!("https://10.0.0.1:9443/{name}"), "agentId": "run-1", "certificateSha256": pin});
    for (bad, message) in [
        (
            "AB".repeat(32),
            "certificateSha256 must be the 64 lowercase hex digits of the certificate's SHA-256",
        ),
        (
            "ab".repeat(31),
            "certificateSha256 must be the 64 lowercase hex digits of the certificate's SHA-256",
        ),
    ] {
        let (code, body) = call(
            &app,
            "POST",
            "/v1/clusters/register",
            Some("join"),
            reg("sno1", &bad),
        )
        .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["details"]["causes"][0]["field"], "certificateSha256");
        assert_eq!(body["details"]["causes"][0]["message"], message);
    }
    let mut plain = reg("sno1", &first);
    plain["endpoint"] = "http://10.0.0.1:9090".into();
    let (code, body) = call(&app, "POST", "/v1/clusters/register", Some("join"), plain).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["details"]["causes"][0]["message"],
        "certificateSha256 is for an https endpoint"
    );

    let (code, body) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some("join"),
        reg("sno1", &first),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let cred1 = body["credential"].as_str().unwrap().to_string();
    let (_, body) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some("join"),
        reg("sno2", &first),
    )
    .await;
    let cred2 = body["credential"].as_str().unwrap().to_string();
    let pinned = |name: &'static str| {
        let app = app.clone();
        async move {
            let (_, c) = call(
                &app,
                "GET",
                &format!("/v1/clusters/{name}"),
                Some("admin"),
                serde_json::Value::Null,
            )
            .await;
            c["certificateSha256"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
    };
    assert_eq!(pinned("sno1").await, first);
    // Renewed: registered with the cluster's own credential, which stays the same.
    let (code, body) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some(&cred1),
        reg("sno1", &renewed),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["credential"], cred1.as_str());
    assert_eq!(pinned("sno1").await, renewed);
    // Another cluster's credential, or none, registers nothing.
    for bearer in [Some(cred2.as_str()), Some("nonsense"), None] {
        let (code, body) = call(
            &app,
            "POST",
            "/v1/clusters/register",
            bearer,
            reg("sno1", &first),
        )
        .await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{bearer:?}: {body}");
        assert_eq!(body["message"], "registration needs the join token");
    }
    assert_eq!(pinned("sno1").await, renewed);
}

/// A clock the test moves.
struct TestClock(std::sync::Mutex<chrono::DateTime<chrono::Utc>>);

impl fleet_types::clock::Clock for TestClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        *self.0.lock().unwrap()
    }
}

/// A cluster credential lasts `--cluster-credential-ttl`: refused once expired (the agent
/// registers again with the join token and gets a new one, though the same run), and traded
/// for a new one by renewal, after which the old one is refused and reports go on.
#[tokio::test]
async fn credentials_expire_and_renewal_replaces_them() {
    let db = migrated().await;
    let start = chrono::DateTime::parse_from_rfc3339("2026-12-05T10:00:00Z")
        .unwrap()
        .to_utc();
    let clock = Arc::new(TestClock(std::sync::Mutex::new(start)));
    let mut state = AppState::test(db.pool.clone()).with_tokens("admin", "join");
    state.engine = hub::engine::Engine::new(db.pool.clone(), clock.clone(), state.metrics.clone());
    state.credential_ttl = chrono::Duration::hours(3);
    let app = router(state);
    let reg =
        serde_json::json!({"name": "sno1", "endpoint": "http://127.0.0.1:1", "agentId": "run-1"});
    let (code, body) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some("join"),
        reg.clone(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["expiresAt"], "2026-12-05T13:00:00Z");
    let first = body["credential"].as_str().unwrap().to_string();
    let report = |credential: &str, seq: u64| {
        let (app, credential) = (app.clone(), credential.to_string());
        async move {
            call(
                &app,
                "POST",
                "/v1/clusters/sno1/status",
                Some(&credential),
                status_report(seq, "Idle"),
            )
            .await
        }
    };
    let renew = |credential: &str| {
        let (app, credential) = (app.clone(), credential.to_string());
        async move {
            call(
                &app,
                "POST",
                "/v1/clusters/sno1/credential",
                Some(&credential),
                serde_json::Value::Null,
            )
            .await
        }
    };
    assert_eq!(report(&first, 1).await.0, StatusCode::OK);

    // Two hours on (two thirds of three): renewed, valid three hours from now.
    *clock.0.lock().unwrap() = start + chrono::Duration::hours(2);
    let (code, body) = renew(&first).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["expiresAt"], "2026-12-05T15:00:00Z");
    let second = body["credential"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    let (code, body) = report(&first, 2).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "the old one is gone: {body}");
    let (code, body) = report(&second, 2).await;
    assert_eq!(
        (code, &body["accepted"]),
        (StatusCode::OK, &serde_json::json!(true)),
        "the sequence goes on: {body}"
    );
    let (code, body) = renew(&first).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert_eq!(
        body["message"],
        "this credential may not renew the credential of cluster sno1"
    );

    // Past its expiry: refused, saying so; registering with it too.
    *clock.0.lock().unwrap() = start + chrono::Duration::hours(5);
    let (code, body) = report(&second, 3).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        body["message"],
        "the credential of cluster sno1 expired at 2026-12-05T15:00:00Z; register again"
    );
    assert_eq!(renew(&second).await.0, StatusCode::UNAUTHORIZED);
    let (code, _) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some(&second),
        reg.clone(),
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    // The same run registering with the join token gets a new credential, not the expired one.
    let (code, body) = call(&app, "POST", "/v1/clusters/register", Some("join"), reg).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let third = body["credential"].as_str().unwrap().to_string();
    assert_ne!(third, second);
    assert_eq!(body["expiresAt"], "2026-12-05T18:00:00Z");
    assert_eq!(report(&third, 1).await.0, StatusCode::OK);
}

/// A report is stored as the spoke wrote it, not written out again (fields this hub does not
/// know, a newer agent's, are kept in the row), and a cluster's row is not compressed on
/// every report. One whose text could not be read back (a lone surrogate escape in such a
/// field) is stored as the hub parsed it.
#[tokio::test]
async fn reports_are_stored_as_the_spoke_wrote_them() {
    let db = migrated().await;
    let app = router(AppState::test(db.pool.clone()).with_tokens("admin", "join"));
    let reg =
        serde_json::json!({"name": "sno1", "endpoint": "http://127.0.0.1:1", "agentId": "run-1"});
    let (_, body) = call(&app, "POST", "/v1/clusters/register", Some("join"), reg).await;
    let credential = body["credential"].as_str().unwrap().to_string();
    let report = |seq: u64, stage: &str, status: &str| {
        format!(
            r#"{{"sequence": {seq}, "agentId": "run-1", "ibu": {{"apiVersion": "lca.openshift.io/v1", "kind": "ImageBasedUpgrade", "metadata": {{"name": "upgrade"}}, "spec": {{"stage": "{stage}"}}, "status": {status}}}}}"#
        )
    };
    let send = |text: String| {
        let (app, credential) = (app.clone(), credential.clone());
        async move {
            call_text(
                &app,
                "POST",
                "/v1/clusters/sno1/status",
                Some(&credential),
                text,
            )
            .await
        }
    };
    let stored = || async {
        let (_, c) = call(
            &app,
            "GET",
            "/v1/clusters/sno1",
            Some("admin"),
            serde_json::Value::Null,
        )
        .await;
        c["ibu"].clone()
    };

    // 3 KiB of status, as a cluster mid-upgrade reports, with a field this hub does not know
    let message = "x".repeat(3000);
    let status = format!(
        r#"{{"conditions": [{{"type": "PrepInProgress", "status": "True", "reason": "InProgress", "message": "{message}"}}], "fromANewerAgent": {{"n": 1}}}}"#
    );
    let (code, body) = send(report(1, "Prep", &status)).await;
    assert_eq!((code, &body["accepted"]), (StatusCode::OK, &true.into()));
    assert_eq!(
        stored().await["status"]["conditions"][0]["message"],
        message.as_str()
    );
    let row = || async {
        let row: (String, Option<String>) = sqlx::query_as(
            "SELECT last_report::text, pg_column_compression(last_report) FROM clusters WHERE name = 'sno1'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        row
    };
    let (text, compression) = row().await;
    assert!(text.contains(&status), "the text as sent: {text}");
    assert_eq!(compression, None, "stored without compression");

    let (code, body) = send(report(2, "Upgrade", r#"{"fromANewerAgent": "\ud800"}"#)).await;
    assert_eq!(
        (code, &body["accepted"]),
        (StatusCode::OK, &true.into()),
        "{body}"
    );
    assert_eq!(stored().await["spec"]["stage"], "Upgrade");
    let (text, _) = row().await;
    assert!(!text.contains("fromANewerAgent"), "{text}");
}

/// At most `max_connections` connections are served; an idle keep-alive connection is
/// closed after `idle`, and its slot goes to the next one waiting.
#[tokio::test]
async fn connections_beyond_the_limit_wait_for_an_idle_one_to_close() {
    use hub::http::listen::{Limits, serve_with};
    let app = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ping", listener.local_addr().unwrap());
    let idle = std::time::Duration::from_millis(300);
    tokio::spawn(serve_with(
        listener,
        app,
        Limits {
            max_connections: 1,
            idle,
            busy_idle: idle,
        },
        std::future::pending::<()>(),
    ));
    // The first client keeps its connection open (keep-alive) and so holds the only slot.
    let first = reqwest::Client::new();
    assert_eq!(
        first.get(&url).send().await.unwrap().text().await.unwrap(),
        "pong"
    );
    let started = std::time::Instant::now();
    let second = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap();
    assert_eq!(
        second.get(&url).send().await.unwrap().text().await.unwrap(),
        "pong"
    );
    assert!(
        started.elapsed() >= idle,
        "the second connection was served while the first held the only slot ({:?})",
        started.elapsed()
    );
}

/// One group of reports, one statement: each report's credential is checked on its own,
/// only the newest report of the registered agent run is stored, and every report gets
/// its own answer.
#[tokio::test]
async fn a_group_of_reports_is_checked_and_answered_report_by_report() {
    use hub::store::{Incoming, Stored, report_write_group};
    let db = migrated().await;
    sqlx::query(
        "INSERT INTO clusters (name, endpoint, credential_hash, agent_id) VALUES
           ('a', 'http://x', $1, 'run1'), ('b', 'http://x', $2, 'run1')",
    )
    .bind(hub::store::hash("cred-a"))
    .bind(hub::store::hash("cred-b"))
    .execute(&db.pool)
    .await
    .unwrap();
    let report = |cluster: &str, credential: &str, agent: &str, sequence: i64| Incoming {
        cluster: cluster.into(),
        credential_hash: hub::store::hash(credential),
        agent_id: agent.into(),
        sequence,
        ibu: serde_json::json!({"seq": sequence}).to_string(),
    };
    let group = [
        report("a", "cred-a", "run1", 1),
        // b's credential for a, with a higher sequence: refused, and it does not hide a's
        report("a", "cred-b", "run1", 9),
        report("b", "cred-b", "run1", 2),
        report("b", "cred-b", "run1", 1),
        report("nosuch", "cred-a", "run1", 1),
        // right credential, but an agent run the hub no longer knows
        report("a", "cred-a", "run0", 5),
    ];
    let outcomes = report_write_group(&db.pool, &group).await.unwrap();
    assert_eq!(
        outcomes,
        [
            Stored::Yes,
            Stored::Forbidden,
            Stored::Yes,
            Stored::Stale,
            Stored::Forbidden,
            Stored::Stale
        ]
    );
    let stored: Vec<(String, i64, serde_json::Value)> =
        sqlx::query_as("SELECT name, last_report_seq, last_report FROM clusters ORDER BY name")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        [
            ("a".to_string(), 1, serde_json::json!({"seq": 1})),
            ("b".to_string(), 2, serde_json::json!({"seq": 2})),
        ]
    );
    // The same group again: nothing newer, so nothing stored.
    let again = report_write_group(&db.pool, &group[..1]).await.unwrap();
    assert_eq!(again, [Stored::Stale]);
    // Two reports of one run under one number (a broken agent): one is stored, and only the
    // one stored is answered so.
    let twins = [
        Incoming {
            ibu: serde_json::json!({"twin": 1}).to_string(),
            ..report("a", "cred-a", "run1", 7)
        },
        Incoming {
            ibu: serde_json::json!({"twin": 2}).to_string(),
            ..report("a", "cred-a", "run1", 7)
        },
    ];
    let outcomes = report_write_group(&db.pool, &twins).await.unwrap();
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT last_report FROM clusters WHERE name = 'a'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let yes: Vec<usize> = (0..2).filter(|i| outcomes[*i] == Stored::Yes).collect();
    assert_eq!(yes.len(), 1, "{outcomes:?}");
    assert_eq!(stored, serde_json::json!({"twin": yes[0] + 1}));
}

/// Registrations that arrive together are written together, each with its audit entry in
/// the same transaction: a name twice in one group is registered twice in order, and a value
/// Postgres refuses (a NUL byte) is answered to the registration that sent it alone.
#[tokio::test]
async fn a_group_of_registrations_is_written_together_and_answered_one_by_one() {
    use hub::registrations::Registrations;
    use hub::store::{AuditEntry, Registering};
    let db = migrated().await;
    let writer = Registrations::start(db.pool.clone());
    let now = chrono::Utc::now();
    let registering = |name: &str, endpoint: &str, label: (&str, &str)| Registering {
        request: fleet_types::messages::RegisterRequest {
            name: name.into(),
            endpoint: endpoint.into(),
            labels: [(label.0.to_string(), label.1.to_string())].into(),
            agent_id: "run-1".into(),
            certificate_sha256: None,
        },
        now,
        ttl: chrono::Duration::days(1),
        audit: Some(AuditEntry {
            time: now,
            actor: "join-token".into(),
            verb: "register".into(),
            resource: "clusters".into(),
            name: Some(name.into()),
            code: Some(200),
            message: format!("endpoint {endpoint}"),
            ..AuditEntry::default()
        }),
    };
    // The writer's task runs only when this (single-threaded) test waits: what was handed
    // to it by then goes into one group, one transaction with the audit entries.
    let (d, e) = tokio::join!(
        writer.register(registering("d", "http://d:1", ("site", "x"))),
        writer.register(registering("e", "http://e:1", ("site", "x"))),
    );
    d.unwrap();
    e.unwrap();
    let writers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT xmin::text FROM clusters UNION SELECT DISTINCT xmin::text FROM audit",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(writers.len(), 1, "written by transactions {writers:?}");
    sqlx::query("DELETE FROM clusters")
        .execute(&db.pool)
        .await
        .unwrap();
    let (a, twice, bad, again) = tokio::join!(
        writer.register(registering("a", "http://a:1", ("site", "x"))),
        writer.register(registering("b", "http://b:1", ("site", "y"))),
        writer.register(registering("c", "http://c\u{0}:1", ("site", "z"))),
        writer.register(registering("b", "http://b:2", ("rack", "7"))),
    );
    let (a, twice, again) = (a.unwrap(), twice.unwrap(), again.unwrap());
    assert!(
        matches!(&bad, Err(hub::error::Error::Invalid(_))),
        "{bad:?}"
    );
    assert_ne!(a.credential, twice.credential);
    assert_eq!(
        twice, again,
        "the same agent run registering again keeps its credential"
    );
    let rows: Vec<(String, String, serde_json::Value)> =
        sqlx::query_as("SELECT name, endpoint, labels FROM clusters ORDER BY name")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            (
                "a".into(),
                "http://a:1".into(),
                serde_json::json!({"site": "x"})
            ),
            (
                "b".into(),
                "http://b:2".into(),
                serde_json::json!({"site": "y", "rack": "7"})
            ),
        ]
    );
    let audited: Vec<(String, String)> =
        sqlx::query_as("SELECT name, message FROM audit WHERE name NOT IN ('d', 'e') ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        audited,
        [
            ("a".into(), "endpoint http://a:1".into()),
            ("b".into(), "endpoint http://b:1".into()),
            ("b".into(), "endpoint http://b:2".into()),
        ]
    );
}

/// A report the writer stored is handed to the engine as its handler parsed it, with its
/// identity (agent run, sequence): the fleet read takes it from there instead of reading it back.
#[tokio::test]
async fn a_stored_report_reaches_the_engine_without_being_read_back() {
    use hub::reports::ReportWriter;
    use hub::store::ReportId;
    use hub::store::Stored;
    use hub::store::fleet_in_txn;
    let db = migrated().await;
    sqlx::query(
        "INSERT INTO clusters (name, endpoint, credential_hash, agent_id) VALUES ('a', 'http://x', $1, 'run1')",
    )
    .bind(hub::store::hash("cred-a"))
    .execute(&db.pool)
    .await
    .unwrap();
    let writer = ReportWriter::start(db.pool.clone());
    let ibu: fleet_types::ibu::ImageBasedUpgrade = serde_json::from_value(serde_json::json!({
        "apiVersion": "lca.openshift.io/v1", "kind": "ImageBasedUpgrade",
        "metadata": {"name": "upgrade"}, "spec": {"stage": "Prep"}
    }))
    .unwrap();
    // Stored, then refused and stale: only the stored one is handed on.
    for (credential, sequence, expected) in [
        ("cred-a", 1, Stored::Yes),
        ("cred-b", 2, Stored::Forbidden),
        ("cred-a", 1, Stored::Stale),
    ] {
        let text = serde_json::to_string(&ibu).unwrap();
        let stored = writer.store("a", credential, "run1", sequence, ibu.clone(), text);
        assert_eq!(stored.await.unwrap(), expected, "{credential} {sequence}");
    }
    assert!(writer.take_fresh(&["b".to_string()]).is_empty());
    let fresh = writer.take_fresh(&["a".to_string()]);
    assert_eq!(
        fresh["a"].0,
        ReportId {
            agent: "run1".into(),
            seq: 1
        }
    );
    assert_eq!(*fresh["a"].1, ibu);
    assert!(
        writer.take_fresh(&["a".to_string()]).is_empty(),
        "taken once"
    );
    let mut conn = db.pool.acquire().await.unwrap();
    let known = hub::store::Known {
        reports: fresh,
        rows: Default::default(),
    };
    let read = fleet_in_txn(&mut conn, &["a".to_string()], false, known.clone())
        .await
        .unwrap();
    let got = read.clusters["a"].ibu.clone().unwrap();
    assert!(
        Arc::ptr_eq(&got, &known.reports["a"].1),
        "taken, not read back"
    );
}

/// A pass reads again only the reports that changed since the last pass (another agent run
/// or sequence number); the others come from what it parsed then, whatever else changed in
/// the row. Rows without an agent run, or without a report of the current run, are read.
#[tokio::test]
async fn the_fleet_read_reuses_reports_that_did_not_change() {
    use fleet_types::ibu::Stage;
    use hub::store::{ReportCache, fleet_in_txn};
    let db = migrated().await;
    let ibu = |stage: &str| serde_json::json!({"apiVersion": "lca.openshift.io/v1", "kind": "ImageBasedUpgrade", "metadata": {"name": "upgrade"}, "spec": {"stage": stage}});
    sqlx::query(
        "INSERT INTO clusters (name, endpoint, credential_hash, agent_id, last_report_seq, last_report) VALUES
           ('a', 'http://x', 'h', 'run1', 1, $1), ('b', 'http://x', 'h', 'run1', 1, $1),
           ('c', 'http://x', 'h', 'run1', 0, NULL), ('d', 'http://x', 'h', '', 1, $1),
           ('e', 'http://x', 'h', 'run1', 0, $1)",
    )
    .bind(ibu("Prep"))
    .execute(&db.pool)
    .await
    .unwrap();
    let watched = ["a", "b", "d", "e"].map(String::from);
    let read = |known: ReportCache, all: bool| {
        let pool = db.pool.clone();
        let watched = watched.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let known = hub::store::Known {
                reports: known,
                rows: Default::default(),
            };
            fleet_in_txn(&mut conn, &watched, all, known).await.unwrap()
        }
    };
    let stage = |f: &hub::store::Fleet, c: &str| f.clusters[c].ibu.as_ref().map(|i| i.spec.stage);
    let first = read(ReportCache::new(), false).await;
    assert_eq!(stage(&first, "a"), Some(Stage::Prep));
    assert_eq!(first.reports.len(), 4);
    // What the cache says is taken as long as the row holds the same report: mark every
    // entry so that a report read again would show.
    let mut known = first.reports.clone();
    for (_, report) in known.values_mut() {
        let mut marked = (**report).clone();
        marked.spec.stage = Stage::Rollback;
        *report = Arc::new(marked);
    }
    // b: a newer report; a: only its labels change (the hub's own write).
    sqlx::query("UPDATE clusters SET last_report = $1, last_report_seq = 2 WHERE name = 'b'")
        .bind(ibu("Upgrade"))
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE clusters SET labels = '{\"x\": \"\"}' WHERE name = 'a'")
        .execute(&db.pool)
        .await
        .unwrap();
    for all in [false, true] {
        let next = read(known.clone(), all).await;
        assert_eq!(
            stage(&next, "a"),
            Some(Stage::Rollback),
            "a's report is the same"
        );
        assert_eq!(
            next.clusters["a"].labels.get("x").map(String::as_str),
            Some("")
        );
        assert_eq!(stage(&next, "b"), Some(Stage::Upgrade), "b reported since");
        assert_eq!(
            stage(&next, "d"),
            Some(Stage::Prep),
            "d has no agent run: read"
        );
        assert_eq!(
            stage(&next, "e"),
            Some(Stage::Prep),
            "e has no report of its run: read"
        );
        assert_eq!(next.reports.len(), 4);
        assert_eq!(next.clusters.len(), if all { 5 } else { 4 });
        // c is not watched: its labels only, with the whole fleet
        assert_eq!(
            next.clusters.get("c").map(|c| c.ibu.is_none()),
            all.then_some(true)
        );
    }
}

/// A step's start writes every cluster of it, in parts of at most 10,000 rows: a step larger
/// than two parts is written whole, each cluster once, in the one transaction.
#[tokio::test]
async fn a_step_larger_than_a_part_is_written_whole() {
    use hub::planner::rollout::{self, ClusterInfo};
    use hub::store;
    let db = migrated().await;
    let ibgu = kube_mode::ibgu(&[]);
    let id = store::rollout_insert(&db.pool, &ibgu)
        .await
        .unwrap()
        .unwrap()
        .id;
    let labels: std::collections::BTreeMap<String, String> =
        [("common".to_string(), "true".to_string())].into();
    let fleet = (0..25_001)
        .map(|i| {
            let info = ClusterInfo {
                labels: labels.clone(),
                ibu: None,
            };
            (format!("c{i:05}"), info)
        })
        .collect();
    let d = rollout::advance(&ibgu.spec, &[], &fleet, None, chrono::Utc::now());
    assert_eq!(d.steps[0].progress.len(), 25_001);
    let mut tx = db.pool.begin().await.unwrap();
    let wrote = store::rollout_save_steps_in_txn(&mut tx, id, &[], &d.steps, &d.changed)
        .await
        .unwrap();
    assert!(wrote);
    tx.commit().await.unwrap();
    let (rows, clusters, first, last): (i64, i64, String, String) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT cluster), min(cluster), max(cluster)
         FROM rollout_clusters WHERE rollout_id = $1 AND step = 0",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((rows, clusters), (25_001, 25_001));
    assert_eq!((first.as_str(), last.as_str()), ("c00000", "c25000"));
}

/// A pass is sent only the watched rows that changed since the last pass: another labels
/// version (whoever changed them: the planner, the API, a registration), another report, a
/// row gone or registered again. The others are the ones it kept.
#[tokio::test]
async fn the_fleet_read_sends_only_the_rows_that_changed() {
    use hub::store::{Known, KnownRow, fleet_in_txn};
    let db = migrated().await;
    let ibu = serde_json::json!({"apiVersion": "lca.openshift.io/v1", "kind": "ImageBasedUpgrade", "metadata": {"name": "upgrade"}, "spec": {"stage": "Prep"}});
    let names = ["a", "b", "c", "d", "e", "f", "g"].map(String::from);
    for n in &names {
        sqlx::query(
            "INSERT INTO clusters (name, labels, endpoint, credential_hash, agent_id, last_report_seq, last_report, last_seen)
             VALUES ($1, '{\"zone\": \"1\"}', 'http://x', 'h', 'run1', 1, $2, now() - interval '1 hour')",
        )
        .bind(n)
        .bind(&ibu)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let read = |known: Known| {
        let pool = db.pool.clone();
        let names = names.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let fleet = fleet_in_txn(&mut conn, &names, false, known.clone())
                .await
                .unwrap();
            (fleet, known)
        }
    };
    let (first, _) = read(Known::default()).await;
    assert_eq!(first.clusters.len(), 7);
    // Kept as the engine keeps them, every label set marked: a row sent again shows
    // without the mark.
    let rows = first
        .versions
        .iter()
        .map(|(n, (labels_version, report))| {
            let mut labels = first.clusters[n].labels.clone();
            labels.insert("kept".into(), "yes".into());
            let row = KnownRow {
                labels_version: *labels_version,
                labels,
                report: report.clone(),
                last_seen: first.last_seen.get(n).copied(),
            };
            (n.clone(), row)
        })
        .collect();
    let mut known = Known {
        reports: first.reports.clone(),
        rows,
    };
    let exec = |sql: &'static str| {
        let pool = db.pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    // b: its labels changed (the API); c: a new report, read back; d: deleted; e: its labels
    // written unchanged; f: removed and registered again, same labels; g: a new report the
    // engine already has (its handler's), with when it came.
    exec("UPDATE clusters SET labels = labels || '{\"zone\": \"2\"}' WHERE name = 'b'").await;
    exec("UPDATE clusters SET last_report_seq = 2, last_seen = now() WHERE name IN ('c', 'g')")
        .await;
    exec("DELETE FROM clusters WHERE name = 'd'").await;
    exec("UPDATE clusters SET labels = labels WHERE name = 'e'").await;
    exec("DELETE FROM clusters WHERE name = 'f'").await;
    exec(
        "INSERT INTO clusters (name, labels, endpoint, credential_hash, agent_id, last_report_seq, last_report)
         SELECT 'f', '{\"zone\": \"1\"}', 'http://x', 'h', 'run1', 1, last_report FROM clusters WHERE name = 'a'",
    )
    .await;
    let mut g = known.reports["g"].clone();
    g.0.seq = 2;
    known.reports.insert("g".into(), g.clone());
    let (next, known) = read(known).await;
    let kept = |n: &str| next.clusters[n].labels.contains_key("kept");
    assert!(kept("a"), "a did not change: kept");
    assert!(kept("e"), "e's labels are the same: kept");
    assert!(!kept("b"), "b's labels changed: read");
    assert_eq!(next.clusters["b"].labels["zone"], "2");
    assert!(!kept("f"), "f was registered again: read");
    assert!(!next.clusters.contains_key("d"), "d is gone");
    assert_eq!(next.clusters.len(), 6);
    // c and g: rows sent for their reports, labels the kept ones (their version is the same).
    assert!(kept("c") && kept("g"));
    assert_eq!(next.versions["c"].1.seq, 2);
    assert!(
        Arc::ptr_eq(next.clusters["g"].ibu.as_ref().unwrap(), &g.1),
        "g's report is the engine's, not sent"
    );
    for n in ["c", "g"] {
        assert!(
            next.last_seen[n] > known.rows[n].last_seen.unwrap(),
            "{n}: when it reported is read"
        );
    }
    assert_eq!(next.last_seen["a"], known.rows["a"].last_seen.unwrap());
    assert_ne!(next.versions["b"].0, known.rows["b"].labels_version);
    assert_ne!(next.versions["f"].0, known.rows["f"].labels_version);
    assert_eq!(next.versions["e"].0, known.rows["e"].labels_version);
}

/// Near the limit, a new connection may stay idle only `busy_idle`: a connection waiting
/// for a slot is served long before the relaxed idle limit frees one.
#[tokio::test]
async fn near_the_limit_idle_connections_give_their_slot_up_sooner() {
    use hub::http::listen::{Limits, serve_with};
    let app = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ping", listener.local_addr().unwrap());
    tokio::spawn(serve_with(
        listener,
        app,
        Limits {
            max_connections: 4,
            idle: std::time::Duration::from_secs(600),
            busy_idle: std::time::Duration::from_millis(200),
        },
        std::future::pending::<()>(),
    ));
    // Four clients, four keep-alive connections: every slot is taken, the last one while
    // the hub was near its limit.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let c = reqwest::Client::new();
        assert_eq!(
            c.get(&url).send().await.unwrap().text().await.unwrap(),
            "pong"
        );
        holders.push(c);
    }
    // A fifth is served once the last connection has been idle for `busy_idle`, not after
    // the relaxed ten minutes.
    let fifth = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap();
    let answer = fifth.get(&url).send().await;
    assert_eq!(
        answer
            .expect("the fifth connection got no slot within 30 s")
            .text()
            .await
            .unwrap(),
        "pong"
    );
    drop(holders);
}

/// No index covers a column the engine rewrites on every cluster: its label changes update
/// the row in place (a HOT update: no new index entries, no index to clean up later).
#[tokio::test]
async fn label_changes_update_cluster_rows_in_place() {
    use hub::planner::rollout::LabelChange;
    let db = migrated().await;
    sqlx::query(
        "INSERT INTO clusters (name, endpoint, credential_hash) VALUES ('a', 'http://x', 'h')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let changes = [(
        "a".to_string(),
        LabelChange {
            add: ["lcm.openshift.io/ibgu-prep-completed".to_string()].into(),
            remove: Default::default(),
        },
    )]
    .into();
    let mut tx = db.pool.begin().await.unwrap();
    hub::store::cluster_labels_change_in_txn(&mut tx, &changes)
        .await
        .unwrap();
    let (updated, hot): (i64, i64) = sqlx::query_as(
        "SELECT pg_stat_get_xact_tuples_updated('clusters'::regclass),
                pg_stat_get_xact_tuples_hot_updated('clusters'::regclass)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!((updated, hot), (1, 1), "(rows updated, of them in place)");
}

/// The engine writes label changes, not whole label sets: a label someone else set stays,
/// and an existing value is never overwritten.
#[tokio::test]
async fn label_changes_keep_other_labels_and_existing_values() {
    use hub::planner::rollout::LabelChange;
    let db = migrated().await;
    sqlx::query(
        "INSERT INTO clusters (name, endpoint, credential_hash, labels) VALUES
           ('a', 'http://x', 'h', '{\"site\": \"1\", \"lcm.openshift.io/ibgu-prep-completed\": \"kept\", \"lcm.openshift.io/ibgu-upgrade-failed\": \"\"}'),
           ('b', 'http://x', 'h', '{\"site\": \"2\"}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let change = |add: &[&str], remove: &[&str]| LabelChange {
        add: add.iter().map(|s| s.to_string()).collect(),
        remove: remove.iter().map(|s| s.to_string()).collect(),
    };
    let changes = [
        (
            "a".to_string(),
            change(
                &[
                    "lcm.openshift.io/ibgu-prep-completed",
                    "lcm.openshift.io/ibgu-upgrade-completed",
                ],
                &["lcm.openshift.io/ibgu-upgrade-failed"],
            ),
        ),
        (
            "b".to_string(),
            change(&["lcm.openshift.io/ibgu-prep-failed"], &[]),
        ),
    ]
    .into();
    let mut tx = db.pool.begin().await.unwrap();
    // someone else labels "a" in the meantime (its own transaction, before ours writes)
    sqlx::query("UPDATE clusters SET labels = labels || '{\"tier\": \"gold\"}' WHERE name = 'a'")
        .execute(&db.pool)
        .await
        .unwrap();
    hub::store::cluster_labels_change_in_txn(&mut tx, &changes)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let labels = |name: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, serde_json::Value>(
                "SELECT labels FROM clusters WHERE name = $1",
            )
            .bind(name)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        labels("a").await,
        serde_json::json!({"site": "1", "tier": "gold", "lcm.openshift.io/ibgu-prep-completed": "kept",
                           "lcm.openshift.io/ibgu-upgrade-completed": ""})
    );
    assert_eq!(
        labels("b").await,
        serde_json::json!({"site": "2", "lcm.openshift.io/ibgu-prep-failed": ""})
    );
}

/// A pass holds its rollout with one statement: the pass lock, the row locked for update and
/// its state version. A second hub's pass is told the rollout is busy at once (it does not
/// wait for the row); a deleted rollout is gone. The pass's one write at the end is skipped
/// when nothing changed, moves the version on only when the steps changed, and leaves the
/// status alone when it did not change.
#[tokio::test]
async fn a_pass_holds_its_rollout_and_ends_with_one_write() {
    use hub::store::{self, Held, PassStatus};
    let db = migrated().await;
    let id = store::rollout_insert(&db.pool, &kube_mode::ibgu(&[]))
        .await
        .unwrap()
        .unwrap()
        .id;
    let seen = |held: Held| match held {
        Held::Row(row, version, _) => format!(
            "{} at version {version}",
            row.object.metadata.name.unwrap_or_default()
        ),
        Held::Busy => "busy".to_string(),
        Held::Gone => "gone".to_string(),
    };
    // Rows of `rollouts` this transaction updated so far.
    async fn updated(tx: &mut sqlx::PgConnection) -> i64 {
        sqlx::query_scalar("SELECT pg_stat_get_xact_tuples_updated('rollouts'::regclass)")
            .fetch_one(tx)
            .await
            .unwrap()
    }

    let mut first = db.pool.begin().await.unwrap();
    let held = store::rollout_hold_in_txn(&mut first, id).await.unwrap();
    assert_eq!(seen(held), "upgrade-4-16 at version 0");
    let mut second = db.pool.begin().await.unwrap();
    let busy = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store::rollout_hold_in_txn(&mut second, id),
    )
    .await
    .expect("a held rollout is answered busy, not waited for")
    .unwrap();
    assert_eq!(seen(busy), "busy", "held by the first pass");
    second.rollback().await.unwrap();

    // Neither steps nor status changed: nothing is written.
    let version = store::rollout_save_pass_in_txn(&mut first, id, 0, false, None)
        .await
        .unwrap();
    assert_eq!((version, updated(&mut first).await), (0, 0));
    // The status changed, the steps did not: one update, the version stays.
    let status = fleet_types::ImageBasedGroupUpgradeStatus {
        observed_generation: Some(1),
        ..Default::default()
    };
    let changed = PassStatus {
        status: &status,
        phase: "Running",
        started_at: Some(chrono::Utc::now()),
        completed_at: None,
        waiting: None,
    };
    let version = store::rollout_save_pass_in_txn(&mut first, id, 0, false, Some(changed))
        .await
        .unwrap();
    assert_eq!((version, updated(&mut first).await), (0, 1));
    // The steps changed: the version moves on and the status written before stays.
    let version = store::rollout_save_pass_in_txn(&mut first, id, 0, true, None)
        .await
        .unwrap();
    assert_eq!((version, updated(&mut first).await), (1, 2));
    first.commit().await.unwrap();
    let (phase, generation, started): (String, Option<i64>, bool) = sqlx::query_as(
        "SELECT phase, (status->>'observedGeneration')::int8, started_at IS NOT NULL FROM rollouts WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (phase.as_str(), generation, started),
        ("Running", Some(1), true)
    );

    // Free again, with the version the last pass left; then gone once deleted.
    let mut third = db.pool.begin().await.unwrap();
    let held = store::rollout_hold_in_txn(&mut third, id).await.unwrap();
    assert_eq!(seen(held), "upgrade-4-16 at version 1");
    third.rollback().await.unwrap();
    assert!(
        store::rollout_delete(&db.pool, "ztp", "upgrade-4-16")
            .await
            .unwrap()
    );
    let mut fourth = db.pool.begin().await.unwrap();
    let gone = store::rollout_hold_in_txn(&mut fourth, id).await.unwrap();
    assert_eq!(seen(gone), "gone");
}

#[tokio::test]
async fn a_cluster_is_deleted_unless_a_running_rollout_has_it() {
    let db = migrated().await;
    let state = AppState::test(db.pool.clone()).with_tokens("admin", "join");
    let engine = state.engine.clone();
    let app = router(state);
    for (name, site) in [("sno1", "a"), ("sno2", "b")] {
        let reg = serde_json::json!({"name": name, "endpoint": "http://127.0.0.1:1", "labels": {"site": site}, "agentId": "run-1"});
        let (code, _) = call(&app, "POST", "/v1/clusters/register", Some("join"), reg).await;
        assert_eq!(code, StatusCode::OK);
    }
    let ibgu = serde_json::json!({
        "apiVersion": "lcm.openshift.io/v1alpha1",
        "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": "up", "namespace": "default"},
        "spec": {
            "clusterLabelSelectors": [{"matchLabels": {"site": "a"}}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
            "plan": [{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1, "timeout": 30}}]
        }
    });
    let (code, body) = call(&app, "POST", "/v1/rollouts", Some("admin"), ibgu).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    engine.pass_all().await.unwrap();

    let delete = |name: &'static str, token: Option<&'static str>| {
        let app = app.clone();
        async move {
            call(
                &app,
                "DELETE",
                &format!("/v1/clusters/{name}"),
                token,
                serde_json::Value::Null,
            )
            .await
        }
    };
    let (code, _) = delete("sno2", None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, body) = delete("sno1", Some("admin")).await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["reason"], "Conflict");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("cluster sno1 is in a running rollout (default/up)"),
        "{body}"
    );
    let (code, body) = delete("sno2", Some("admin")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "Success");
    let (code, _) = call(
        &app,
        "GET",
        "/v1/clusters/sno2",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, body) = delete("sno2", Some("admin")).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    // Once the rollout is gone, nothing holds sno1.
    let (code, _) = call(
        &app,
        "DELETE",
        "/v1/rollouts/default/up",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (code, body) = delete("sno1", Some("admin")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (_, list) = call(
        &app,
        "GET",
        "/v1/clusters",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(list["items"], serde_json::json!([]));
}

/// One request with the given Content-Type (none when `None`): the code, the answer's
/// Content-Type and its body.
async fn call_as(
    app: &axum::Router,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, String, serde_json::Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", "Bearer admin");
    if let Some(t) = content_type {
        req = req.header("content-type", t);
    }
    let res = app
        .clone()
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let code = res.status();
    let answered = res.headers()["content-type"].to_str().unwrap().to_string();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (code, answered, json)
}

#[tokio::test]
async fn bodies_of_the_wrong_type_or_size_are_refused_with_a_status() {
    let db = migrated().await;
    let app = router(AppState::test(db.pool.clone()).with_tokens("admin", "join"));
    let ibgu = serde_json::json!({"apiVersion": "lcm.openshift.io/v1alpha1", "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": "up", "namespace": "default"},
        "spec": {"clusterLabelSelectors": [{"matchLabels": {"a": "b"}}],
                 "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
                 "plan": [{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1, "timeout": 10}}]}});
    // An IBGU as text/plain, form-encoded or untyped is not stored: 415, saying what is taken.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let (code, answered, status) =
            call_as(&app, "POST", "/v1/rollouts", content_type, ibgu.to_string()).await;
        assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type:?}");
        assert_eq!(answered, "application/json");
        assert_eq!(status["reason"], "UnsupportedMediaType");
        assert!(
            status["message"].as_str().unwrap().ends_with(
                "send application/json or application/yaml or application/x-yaml or text/yaml"
            ),
            "{status}"
        );
    }
    let (code, _, list) = call_as(&app, "GET", "/v1/rollouts", None, "").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(list["items"], serde_json::json!([]), "nothing stored");
    for (method, path) in [
        ("PATCH", "/v1/clusters/sno1"),
        ("PUT", "/v1/configmaps/ns/cm"),
        ("PATCH", "/v1/rollouts/default/up"),
    ] {
        let (code, _, status) = call_as(&app, method, path, Some("text/plain"), "{}").await;
        assert_eq!(
            code,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{method} {path}: {status}"
        );
    }
    // Too large, an unknown method, an unknown route: Status bodies too.
    let big = vec![b' '; 3 << 20];
    let (code, answered, status) =
        call_as(&app, "POST", "/v1/rollouts", Some("application/json"), big).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answered, "application/json");
    assert_eq!(status["reason"], "RequestEntityTooLarge");
    let (code, _, status) = call_as(&app, "PUT", "/v1/rollouts", None, "").await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(status["reason"], "MethodNotAllowed");
    let (code, _, status) = call_as(&app, "GET", "/v2/nothing", None, "").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(status["message"], "no such endpoint: GET /v2/nothing");
}

#[tokio::test]
async fn unknown_fields_are_refused_unless_asked_otherwise() {
    let db = migrated().await;
    let app = router(AppState::test(db.pool.clone()).with_tokens("admin", "join"));
    let ibgu = |name: &str| {
        serde_json::json!({"apiVersion": "lcm.openshift.io/v1alpha1", "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"bogusField": 1, "clusterLabelSelectors": [{"matchLabels": {"a": "b"}}],
                 "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
                 "plan": [{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1, "timout": 10}}]}})
    };
    let json = Some("application/json");
    let (code, _, status) =
        call_as(&app, "POST", "/v1/rollouts", json, ibgu("a").to_string()).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let causes: Vec<&str> = status["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        causes,
        [
            "unknown field \"bogusField\" in spec",
            "unknown field \"timout\" in spec.plan[0].rolloutStrategy"
        ]
    );
    // Warn: stored without them, and said in Warning headers; Ignore: stored, nothing said.
    let req = Request::post("/v1/rollouts?fieldValidation=Warn")
        .header("authorization", "Bearer admin")
        .header("content-type", "application/json")
        .body(Body::from(ibgu("b").to_string()))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let warnings: Vec<&str> = res
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        warnings,
        [
            "299 - \"unknown field \\\"bogusField\\\" in spec\"",
            "299 - \"unknown field \\\"timout\\\" in spec.plan[0].rolloutStrategy\""
        ]
    );
    let (code, _, _) = call_as(
        &app,
        "POST",
        "/v1/rollouts?fieldValidation=Ignore",
        json,
        ibgu("c").to_string(),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, _, status) = call_as(
        &app,
        "POST",
        "/v1/rollouts?fieldValidation=Loose",
        json,
        ibgu("d").to_string(),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{status}");
    // A patch that misspells a field is refused too.
    let typo = serde_json::json!({"spec": {"plan": [{"actions": ["Prep"], "rolloutStrategy": {"maxConcurency": 2}}]}});
    let (code, _, status) = call_as(
        &app,
        "PATCH",
        "/v1/rollouts/default/c",
        Some("application/merge-patch+json"),
        typo.to_string(),
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("unknown field \"maxConcurency\""),
        "{status}"
    );
}

#[tokio::test]
async fn manifests_are_accepted_as_yaml() {
    let db = migrated().await;
    let app = router(AppState::test(db.pool.clone()));
    let send = |method: &str, path: &str, yaml: String| {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/yaml")
            .body(Body::from(yaml))
            .unwrap();
        let app = app.clone();
        async move {
            let res = app.oneshot(req).await.unwrap();
            let code = res.status();
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            (
                code,
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            )
        }
    };
    // The README's quick start: the ConfigMaps the rollout names, then the TALM manifest.
    for (ns, name) in [
        ("openshift-lifecycle-agent", "example-extra-manifests"),
        ("openshift-adp", "oadp-cm"),
    ] {
        let cm = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  a.yaml: |\n    kind: Namespace\n"
        );
        let (code, body) = send("PUT", &format!("/v1/configmaps/{ns}/{name}"), cm).await;
        assert_eq!(code, StatusCode::OK, "{body}");
    }
    let manifest = include_str!("../../fleet-types/fixtures/ibgu-talm.yaml").to_string();
    let (code, body) = send("POST", "/v1/rollouts", manifest).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(body["metadata"]["name"], "telco5g-upgrade");
    assert_eq!(body["spec"]["plan"][1]["actions"][1], "FinalizeUpgrade");
    // Broken YAML is refused, saying where.
    let (code, body) = send("POST", "/v1/rollouts", "spec: [".into()).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("ImageBasedGroupUpgrade: "),
        "{body}"
    );
}

/// A database the hub cannot reach: every answer that needs it is 503 with Retry-After, never
/// a 4xx, and comes within the pool's acquire timeout.
#[tokio::test]
async fn a_lost_database_is_answered_503_with_retry_after() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let app = router(AppState::test(pool));
    let report = serde_json::json!({"sequence": 1, "agentId": "run-1", "ibu": {
        "apiVersion": "lca.openshift.io/v1", "kind": "ImageBasedUpgrade",
        "metadata": {"name": "upgrade"}, "spec": {"stage": "Idle"}}});
    for (method, path, body) in [
        ("GET", "/v1/clusters", serde_json::Value::Null),
        ("GET", "/v1/rollouts", serde_json::Value::Null),
        ("POST", "/v1/clusters/sno1/status", report),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .header("authorization", "Bearer some-credential")
            .body(Body::from(body.to_string()))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path}"
        );
        assert_eq!(res.headers()["retry-after"], "5", "{method} {path}");
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let status: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status["reason"], "ServiceUnavailable", "{method} {path}");
        assert_eq!(status["code"], 503);
    }
    // /metrics still answers, and says the database is away (what an alert reads).
    let res = app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("\nfleet_hub_database_up 0\n"), "{text}");
    // A readiness probe learns it at once, not after the pool's acquire timeout (a minute
    // here: the probe answering at all shows it did not wait for it).
    let patient = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(60))
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let app = router(AppState::test(patient));
    let started = std::time::Instant::now();
    let req = Request::get("/readyz").body(Body::empty()).unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(status["message"], "the database did not answer within 1 s");
}

/// A small deterministic generator (xorshift64*): the same inputs on every run, so a failure
/// is reproduced by running the test again.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }

    /// A JSON value of bounded depth, with strings that look like the ones the API reads.
    fn json(&mut self, depth: u32) -> serde_json::Value {
        use serde_json::{Value, json};
        const WORDS: &[&str] = &[
            "",
            "Prep",
            "Upgrade",
            "Idle",
            "metadata",
            "spec",
            "name",
            "..",
            "x/y",
            "\u{0}",
            "\\ud800",
            "🙂",
            "default",
            "lcm.openshift.io/v1alpha1",
            "plan",
            "actions",
        ];
        match self.below(if depth == 0 { 5 } else { 8 }) {
            0 => Value::Null,
            1 => json!(self.next().is_multiple_of(3)),
            2 => json!((self.next() as i64) >> self.below(64)),
            3 => json!(1.5e300 * (self.below(3) as f64 - 1.0)),
            4 => json!(self.pick(WORDS)),
            5 => Value::Array((0..self.below(4)).map(|_| self.json(depth - 1)).collect()),
            _ => Value::Object(
                (0..self.below(5))
                    .map(|_| (self.pick(WORDS).to_string(), self.json(depth - 1)))
                    .collect(),
            ),
        }
    }
}

/// Random bytes, random JSON and broken manifests against every route, with every kind of
/// Content-Type: never a 5xx, always a Status for an error, and nothing stored.
#[tokio::test]
async fn garbage_against_every_route_is_refused_cleanly_and_stores_nothing() {
    let db = migrated().await;
    let app = router(AppState::test(db.pool.clone()).with_tokens("admin", "join"));
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    const TYPES: &[&str] = &[
        "application/json",
        "application/yaml",
        "application/merge-patch+json",
        "application/json-patch+json",
        "text/plain",
        "",
    ];
    const SEGMENTS: &[&str] = &["x", "default", "..", "%2e%2e", "a%00b", "sno1", "A"];
    let mut answered = 0;
    for round in 0..40 {
        for op in hub::http::openapi::OPERATIONS {
            let path = op
                .path
                .replace("{namespace}", noise.pick(SEGMENTS))
                .replace("{name}", noise.pick(SEGMENTS));
            let body: Vec<u8> = match round % 4 {
                0 => (0..noise.below(300)).map(|_| noise.next() as u8).collect(),
                1 => noise.json(4).to_string().into_bytes(),
                2 => format!("spec: [{}\n  - {}", noise.below(9), noise.json(2)).into_bytes(),
                _ => {
                    let mut doc = serde_json::json!({"apiVersion": "lcm.openshift.io/v1alpha1",
                        "kind": "ImageBasedGroupUpgrade", "metadata": {"name": "up"},
                        "spec": {"plan": [{"actions": ["Prep"]}]}});
                    doc["spec"][noise.pick(&["plan", "ibuSpec", "clusterLabelSelectors"])] =
                        noise.json(3);
                    doc.to_string().into_bytes()
                }
            };
            let mut req = Request::builder()
                .method(op.method.to_uppercase().as_str())
                .uri(&path)
                .header(
                    "authorization",
                    format!("Bearer {}", noise.pick(&["admin", "join", "nope"])),
                );
            let content_type = noise.pick(TYPES);
            if !content_type.is_empty() {
                req = req.header("content-type", content_type);
            }
            let res = app
                .clone()
                .oneshot(req.body(Body::from(body)).unwrap())
                .await
                .unwrap();
            let code = res.status();
            let kind = res
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or_default().to_string())
                .unwrap_or_default();
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            assert!(
                code.as_u16() < 500,
                "{} {path}: {code} {}",
                op.method,
                String::from_utf8_lossy(&bytes)
            );
            if code.is_client_error() {
                assert_eq!(kind, "application/json", "{} {path}: {code}", op.method);
                let status: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(status["kind"], "Status", "{} {path}", op.method);
                assert_eq!(status["code"], code.as_u16());
            }
            answered += 1;
        }
    }
    assert!(answered > 400);
    for (table, count) in [
        ("rollouts", "SELECT count(*) FROM rollouts"),
        ("clusters", "SELECT count(*) FROM clusters"),
        ("configmaps", "SELECT count(*) FROM configmaps"),
    ] {
        let n: i64 = sqlx::query_scalar(count).fetch_one(&db.pool).await.unwrap();
        assert_eq!(n, 0, "nothing stored in {table}");
    }
}

#[tokio::test]
async fn deleting_a_cluster_revokes_its_credential_at_once() {
    let db = migrated().await;
    let app = router(AppState::test(db.pool.clone()).with_tokens("admin", "join"));
    let reg = serde_json::json!({"name": "sno1", "endpoint": "http://127.0.0.1:1", "labels": {}, "agentId": "run-1"});
    let (code, body) = call(&app, "POST", "/v1/clusters/register", Some("join"), reg).await;
    assert_eq!(code, StatusCode::OK);
    let credential = body["credential"].as_str().unwrap().to_string();
    let (code, body) = call(
        &app,
        "POST",
        "/v1/clusters/sno1/status",
        Some(&credential),
        status_report(1, "Idle"),
    )
    .await;
    assert_eq!(
        (code, body["accepted"].clone()),
        (StatusCode::OK, serde_json::json!(true))
    );
    let (code, _) = call(
        &app,
        "DELETE",
        "/v1/clusters/sno1",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    // The next report with that credential is refused, and stores nothing.
    let (code, body) = call(
        &app,
        "POST",
        "/v1/clusters/sno1/status",
        Some(&credential),
        status_report(2, "Idle"),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        body["message"],
        "this credential may not report for cluster sno1"
    );
    let (code, _) = call(
        &app,
        "GET",
        "/v1/clusters/sno1",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

/// Every change through the API, and a viewer's refused attempt, is in the audit trail with
/// who made it and the request id; reads, reports and dry runs are not; the trail cannot
/// be rewritten.
#[tokio::test]
async fn changes_are_audited_with_who_and_the_request_id() {
    let db = migrated().await;
    let mut state = AppState::test(db.pool.clone()).with_tokens("admin", "join");
    state.viewer_tokens = vec!["viewer".into()];
    let app = router(state);
    let reg = serde_json::json!({"name": "sno1", "endpoint": "http://127.0.0.1:1", "labels": {"site": "a"}, "agentId": "run-1"});
    let (_, body) = call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some("join"),
        reg.clone(),
    )
    .await;
    let credential = body["credential"].as_str().unwrap().to_string();
    call(
        &app,
        "POST",
        "/v1/clusters/sno1/status",
        Some(&credential),
        status_report(1, "Idle"),
    )
    .await;
    call(
        &app,
        "POST",
        "/v1/clusters/register",
        Some(&credential),
        reg,
    )
    .await;
    call(
        &app,
        "POST",
        "/v1/clusters/sno1/credential",
        Some(&credential),
        serde_json::Value::Null,
    )
    .await;
    let ibgu = serde_json::json!({
        "apiVersion": "lcm.openshift.io/v1alpha1",
        "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": "up", "namespace": "edge"},
        "spec": {
            "clusterLabelSelectors": [{"matchLabels": {"site": "a"}}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
            "plan": [{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 1, "timeout": 30}}]
        }
    });
    let (code, _) = call(
        &app,
        "POST",
        "/v1/rollouts?dryRun=All",
        Some("admin"),
        ibgu.clone(),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = call(&app, "POST", "/v1/rollouts", Some("admin"), ibgu).await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, _) = call(
        &app,
        "PATCH",
        "/v1/clusters/sno1",
        Some("viewer"),
        serde_json::json!({"metadata": {"labels": {"x": "y"}}}),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    // Without a body, as `token`.
    let act = |method: &'static str, path: &'static str, token: &'static str| {
        let app = app.clone();
        async move { call(&app, method, path, Some(token), serde_json::Value::Null).await }
    };
    for (method, path, token, want) in [
        (
            "DELETE",
            "/v1/clusters/sno1",
            "nonsense",
            StatusCode::UNAUTHORIZED,
        ),
        ("DELETE", "/v1/rollouts/edge/up", "admin", StatusCode::OK),
        ("DELETE", "/v1/clusters/sno1", "admin", StatusCode::OK),
    ] {
        assert_eq!(act(method, path, token).await.0, want, "{method} {path}");
    }

    let (code, trail) = act("GET", "/v1/audit", "viewer").await;
    assert_eq!(code, StatusCode::OK, "{trail}");
    let rows: Vec<String> = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {}/{} {} {}",
                e["actor"].as_str().unwrap(),
                e["verb"].as_str().unwrap(),
                e["resource"].as_str().unwrap(),
                e["namespace"].as_str().unwrap_or("-"),
                e["name"].as_str().unwrap_or("-"),
                e["code"],
                e["message"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            "join-token register clusters -/sno1 200 endpoint http://127.0.0.1:1",
            "cluster:sno1 register clusters -/sno1 200 endpoint http://127.0.0.1:1",
            "cluster:sno1 renew credentials -/sno1 200 ",
            "admin create rollouts edge/up 201 ",
            "viewer patch clusters -/sno1 403 ",
            "admin delete rollouts edge/up 200 ",
            "admin delete clusters -/sno1 200 its credential is revoked",
        ]
    );
    for e in trail["items"].as_array().unwrap() {
        assert_eq!(e["requestId"].as_str().map(str::len), Some(36), "{e}");
    }
    let since = trail["items"][4]["time"].as_str().unwrap();
    let (_, later) = call(
        &app,
        "GET",
        &format!("/v1/audit?since={}", since.replace('+', "%2B")),
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert!(later["items"].as_array().unwrap().len() >= 3, "{later}");
    let (code, body) = call(
        &app,
        "GET",
        "/v1/audit?since=yesterday",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("since=\"yesterday\" is not an RFC 3339 time"),
        "{body}"
    );
    let (code, _) = call(
        &app,
        "GET",
        "/v1/audit?limit=0",
        Some("admin"),
        serde_json::Value::Null,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    for sql in [
        "UPDATE audit SET actor = 'nobody'",
        "DELETE FROM audit",
        "TRUNCATE audit",
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        assert!(
            err.to_string().contains("audit is append-only"),
            "{sql}: {err}"
        );
    }
}

fn at(text: &str) -> chrono::DateTime<chrono::Utc> {
    text.parse().unwrap()
}

/// History partitioned by month: partitions are made ahead of the rows, and a retention
/// drops whole months all of whose rows are older than it, never a row of a younger one.
#[tokio::test]
async fn history_retention_drops_whole_months_older_than_it() {
    use hub::store;
    let db = migrated().await;
    let row = store::rollout_insert(&db.pool, &kube_mode::ibgu(&[]))
        .await
        .unwrap()
        .expect("stored");
    // A hub that ran for a year: each month it made that month's partition and the next.
    let months = [
        "2025-10-15T12:00:00Z",
        "2025-11-15T12:00:00Z",
        "2025-12-31T23:59:59Z",
        "2026-01-01T00:00:00Z",
        "2026-06-15T12:00:00Z",
    ];
    for m in months {
        let made = store::history_upkeep(&db.pool, at(m), None).await.unwrap();
        assert!(made.dropped.is_empty());
        let mut conn = db.pool.acquire().await.unwrap();
        let event = hub::planner::rollout::Event {
            cluster: Some("sno1".into()),
            step: Some(0),
            action: None,
            event: "ActionStarted",
            message: m.into(),
            took: None,
        };
        store::history_insert_in_txn(&mut conn, &row, at(m), &[event], "controller")
            .await
            .unwrap();
    }
    let where_: Vec<(String, String)> =
        sqlx::query_as("SELECT tableoid::regclass::text, message FROM history ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        where_.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        [
            "history_2025_10",
            "history_2025_11",
            "history_2025_12",
            "history_2026_01",
            "history_2026_06"
        ]
    );
    // 400 days before 2027-01-10 is 2025-12-06: October and November are wholly older,
    // December is not.
    let now = at("2027-01-10T00:00:00Z");
    // The migration made the partitions of the month it ran in and the next.
    let mut ahead = vec![];
    for part in ["history_2027_01", "history_2027_02"] {
        let there: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(part)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if !there {
            ahead.push(part);
        }
    }
    let done = store::history_upkeep(&db.pool, now, Some(chrono::Duration::days(400)))
        .await
        .unwrap();
    assert_eq!(done.dropped, ["history_2025_10", "history_2025_11"]);
    assert_eq!(done.made, ahead);
    let left: Vec<String> = sqlx::query_scalar("SELECT message FROM history ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, &months[2..]);
    // Again: nothing more to drop or make.
    let again = store::history_upkeep(&db.pool, now, Some(chrono::Duration::days(400)))
        .await
        .unwrap();
    assert_eq!(again, store::HistoryUpkeep::default());
    // The API still answers the rollout's history from what is left.
    let items = store::history_list(&db.pool, row.id, Some("sno1"))
        .await
        .unwrap();
    assert_eq!(items.len(), 3);
}

/// Every query the API and the shipped dashboards run on the history is served by an index
/// (a sequential scan is what the planner falls back to only when none can serve it).
#[tokio::test]
async fn every_history_query_of_the_api_and_the_dashboards_has_an_index() {
    let db = migrated().await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut queries: Vec<String> = vec![
        // The REST API and the Kubernetes Events.
        "SELECT time, cluster, step, action, event, message, actor FROM history \
         WHERE rollout_id = 1 ORDER BY id"
            .into(),
        "SELECT time, cluster FROM history WHERE rollout_id = 1 AND cluster = 'a' ORDER BY id"
            .into(),
        "SELECT max(id) FROM history".into(),
        "SELECT id FROM history WHERE id > 5 ORDER BY id LIMIT 100".into(),
        "SELECT id FROM history WHERE cluster = 'a' ORDER BY id".into(),
    ];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    for name in ["fleet-overview.json", "rollout-detail.json"] {
        let board: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join(name)).unwrap()).unwrap();
        let panels = board["panels"].as_array().unwrap().iter();
        let vars = board["templating"]["list"].as_array().unwrap().iter();
        let sql = panels
            .flat_map(|p| p["targets"].as_array().unwrap().iter())
            .filter_map(|t| t["rawSql"].as_str())
            .chain(vars.filter_map(|v| v["query"].as_str()))
            .filter(|q| q.contains("FROM history"));
        for q in sql {
            queries.push(
                q.replace(
                    "$__timeGroupAlias(time, '1m')",
                    "date_trunc('minute', time) AS time",
                )
                .replace(
                    "$__timeFilter(time)",
                    "time BETWEEN now() - interval '6 hours' AND now()",
                )
                .replace("$namespace", "default")
                .replace("$rollout", "r"),
            );
        }
    }
    assert!(queries.len() > 10, "{queries:#?}");
    for q in &queries {
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {q}")))
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        let plan = plan.join("\n");
        assert!(
            !plan.contains("Seq Scan on history"),
            "no index serves\n{q}\n{plan}"
        );
    }
}
