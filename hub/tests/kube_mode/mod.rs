//! Kubernetes mode without a cluster: the reconciler, the ManagedCluster sync, the Lease and
//! the client layer against kube's `tower-test` mock service. Each scenario scripts the exact
//! requests it must make (method, path, body) and the answers, in the style of kube-rs
//! `controller-rs`'s `ApiServerVerifier`; the database is real.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_e2e::TestDb;
use fleet_types::ibgu::ImageBasedGroupUpgrade;
use http::{Method, Request, Response, StatusCode};
use hub::engine::{Engine, SystemClock};
use hub::kubernetes::{self, Context, controller, decide, fleet, lease};
use hub::metrics::Metrics;
use hub::store;
use kube::api::{Api, DynamicObject};
use kube::client::Body;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// The scripted API server: every expected request in order, and what it answers.
struct Verifier(ApiHandle);

impl Verifier {
    /// Waits for the next request, checks it, answers it; returns its JSON body.
    async fn expect(&mut self, method: Method, path: &str, status: u16, answer: Value) -> Value {
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .expect("the client is gone");
        assert_eq!(
            (req.method().clone(), req.uri().path().to_string()),
            (method, path.to_string()),
            "unexpected request {}",
            req.uri()
        );
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        body
    }

    /// No further request arrives (the scenario is over).
    async fn done(&mut self) {
        let next = tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await;
        assert!(next.is_err(), "an unexpected extra request");
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
           "reason": reason, "message": message})
}

async fn setup() -> (Arc<Context>, Verifier, TestDb) {
    let db = TestDb::empty().await;
    hub::db::migrate(&db.pool).await.unwrap();
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let metrics = Metrics::new().unwrap();
    let ctx = Arc::new(Context {
        lease_client: client.clone(),
        client,
        pool: db.pool.clone(),
        engine: Engine::new(db.pool.clone(), Arc::new(SystemClock), metrics.clone()),
        metrics,
        clock: Arc::new(SystemClock),
        identity: "hub-0".into(),
    });
    (ctx, Verifier(handle), db)
}

const PATH: &str =
    "/apis/lcm.openshift.io/v1alpha1/namespaces/ztp/imagebasedgroupupgrades/upgrade-4-16";

pub(crate) fn ibgu(finalizers: &[&str]) -> ImageBasedGroupUpgrade {
    serde_json::from_value(json!({
        "apiVersion": "lcm.openshift.io/v1alpha1",
        "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": "upgrade-4-16", "namespace": "ztp", "uid": "u-1",
                     "resourceVersion": "7", "generation": 1, "finalizers": finalizers},
        "spec": {
            "clusterLabelSelectors": [{"matchLabels": {"common": "true"}}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"},
                        "oadpContent": [{"name": "oadp", "namespace": "ztp"}]},
            "plan": [{"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 2, "timeout": 30}}]
        }
    }))
    .unwrap()
}

fn configmap() -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "oadp", "namespace": "ztp", "resourceVersion": "3"},
           "data": {"backup.yaml": "kind: Backup"}})
}

#[tokio::test]
async fn a_new_ibgu_gets_the_finalizer_then_enters_the_engine_and_shows_its_status() {
    let (ctx, mut api, db) = setup().await;
    // 1. No finalizer yet: the only call adds it, guarded by the resourceVersion.
    let obj = Arc::new(ibgu(&[]));
    let run = tokio::spawn(controller::reconcile(obj, ctx.clone()));
    let patch = api
        .expect(
            Method::PATCH,
            PATH,
            200,
            serde_json::to_value(ibgu(&[decide::FINALIZER])).unwrap(),
        )
        .await;
    assert_eq!(
        patch,
        json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
               {"op": "add", "path": "/metadata/finalizers", "value": [decide::FINALIZER]}])
    );
    run.await.unwrap().unwrap();
    api.done().await;

    // 2. With the finalizer: the OADP ConfigMap is copied, the rollout stored, no status yet.
    let obj = Arc::new(ibgu(&[decide::FINALIZER]));
    let run = tokio::spawn(controller::reconcile(obj.clone(), ctx.clone()));
    api.expect(
        Method::GET,
        "/api/v1/namespaces/ztp/configmaps/oadp",
        200,
        configmap(),
    )
    .await;
    run.await.unwrap().unwrap();
    api.done().await;
    let row = store::rollout_fetch(&db.pool, "ztp", "upgrade-4-16")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.object.spec, obj.spec);
    assert_eq!(
        store::configmap_fetch(&db.pool, "ztp", "oadp")
            .await
            .unwrap()
            .unwrap()["backup.yaml"],
        "kind: Backup"
    );

    // 3. After an engine pass the rollout has a status: it is written through /status.
    ctx.engine.pass_all().await.unwrap();
    let wanted = store::rollout_fetch(&db.pool, "ztp", "upgrade-4-16")
        .await
        .unwrap()
        .unwrap()
        .object
        .status
        .unwrap();
    // The spec is unchanged: no ConfigMap is read again, only the status is written.
    let run = tokio::spawn(controller::reconcile(obj.clone(), ctx.clone()));
    let mut answer = serde_json::to_value(ibgu(&[decide::FINALIZER])).unwrap();
    answer["status"] = serde_json::to_value(&wanted).unwrap();
    let put = api
        .expect(Method::PUT, &format!("{PATH}/status"), 200, answer)
        .await;
    assert_eq!(put["status"], serde_json::to_value(&wanted).unwrap());
    assert_eq!(
        put["metadata"]["resourceVersion"], "7",
        "written at the version read"
    );
    run.await.unwrap().unwrap();
    api.done().await;
}

#[tokio::test]
async fn a_status_conflict_is_read_again_and_retried_once() {
    let (ctx, mut api, db) = setup().await;
    store::configmap_put(&db.pool, "ztp", "oadp", &BTreeMap::new())
        .await
        .unwrap();
    let obj = ibgu(&[decide::FINALIZER]);
    store::rollout_insert(&db.pool, &obj).await.unwrap();
    ctx.engine.pass_all().await.unwrap();
    let run = tokio::spawn(controller::reconcile(Arc::new(obj), ctx.clone()));
    api.expect(
        Method::PUT,
        &format!("{PATH}/status"),
        409,
        status(409, "Conflict", "the object has been modified"),
    )
    .await;
    let mut newer = serde_json::to_value(ibgu(&[decide::FINALIZER])).unwrap();
    newer["metadata"]["resourceVersion"] = json!("8");
    api.expect(Method::GET, PATH, 200, newer.clone()).await;
    let put = api
        .expect(Method::PUT, &format!("{PATH}/status"), 200, newer)
        .await;
    assert_eq!(
        put["metadata"]["resourceVersion"], "8",
        "retried at the new version"
    );
    run.await.unwrap().unwrap();
    api.done().await;
}

#[tokio::test]
async fn an_invalid_spec_is_shown_in_the_status_not_stored() {
    let (ctx, mut api, db) = setup().await;
    let obj = Arc::new(ibgu(&[decide::FINALIZER]));
    let run = tokio::spawn(controller::reconcile(obj, ctx.clone()));
    // The ConfigMap does not exist on the hub cluster either.
    api.expect(
        Method::GET,
        "/api/v1/namespaces/ztp/configmaps/oadp",
        404,
        status(404, "NotFound", "gone"),
    )
    .await;
    let put = api
        .expect(
            Method::PUT,
            &format!("{PATH}/status"),
            200,
            serde_json::to_value(ibgu(&[decide::FINALIZER])).unwrap(),
        )
        .await;
    let condition = &put["status"]["conditions"][0];
    assert_eq!(condition["reason"], "InvalidSpec");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("configmap ztp/oadp not found"),
        "{condition}"
    );
    run.await.unwrap().unwrap();
    api.done().await;
    assert!(
        store::rollout_fetch(&db.pool, "ztp", "upgrade-4-16")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_deleted_ibgu_leaves_the_engine_then_loses_its_finalizer() {
    let (ctx, mut api, db) = setup().await;
    store::configmap_put(&db.pool, "ztp", "oadp", &BTreeMap::new())
        .await
        .unwrap();
    let mut obj = ibgu(&["example.com/other", decide::FINALIZER]);
    store::rollout_insert(&db.pool, &obj).await.unwrap();
    obj.metadata.deletion_timestamp =
        serde_json::from_value(json!("2026-11-26T10:00:00Z")).unwrap();
    let run = tokio::spawn(controller::reconcile(Arc::new(obj), ctx.clone()));
    let patch = api
        .expect(
            Method::PATCH,
            PATH,
            200,
            serde_json::to_value(ibgu(&["example.com/other"])).unwrap(),
        )
        .await;
    assert_eq!(
        patch,
        json!([{"op": "test", "path": "/metadata/finalizers/1", "value": decide::FINALIZER},
               {"op": "remove", "path": "/metadata/finalizers/1"}])
    );
    run.await.unwrap().unwrap();
    api.done().await;
    assert!(
        store::rollout_fetch(&db.pool, "ztp", "upgrade-4-16")
            .await
            .unwrap()
            .is_none()
    );
}

fn managed_cluster(name: &str, rv: &str, labels: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "cluster.open-cluster-management.io/v1",
        "kind": "ManagedCluster",
        "metadata": {"name": name, "resourceVersion": rv, "labels": labels,
                     "annotations": {decide::ENDPOINT_ANNOTATION: format!("https://{name}.example:9443")}}
    }))
    .unwrap()
}

#[tokio::test]
async fn managed_clusters_feed_the_fleet_and_get_the_ibgu_labels_with_a_conflict_retried() {
    let (ctx, mut api, db) = setup().await;
    let resource = fleet::managed_cluster_resource();
    let mut writer = Writer::new(resource.clone());
    let reader = writer.as_reader();
    let sno1 = managed_cluster(
        "sno1",
        "10",
        json!({"common": "true", "lcm.openshift.io/ibgu-prep-failed": ""}),
    );
    writer.apply_watcher_event(&watcher::Event::Apply(sno1.clone()));
    let mc_api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &resource);

    // The first pass only learns the cluster: its labels except the ibgu ones (the hub owns
    // those, and has none yet), and its endpoint. It writes nothing back: the cluster was not
    // stored when the pass began.
    let pass = {
        let (ctx, mc_api, reader) = (ctx.clone(), mc_api.clone(), reader.clone());
        tokio::spawn(async move { fleet::pass(&ctx, &mc_api, &reader).await })
    };
    pass.await.unwrap().unwrap();
    api.done().await;
    let stored = store::cluster_labels_all(&db.pool).await.unwrap();
    assert_eq!(
        stored["sno1"],
        (
            BTreeMap::from([("common".to_string(), "true".to_string())]),
            "https://sno1.example:9443".to_string()
        )
    );

    // The engine labels the cluster; the next pass writes that onto the ManagedCluster at
    // the resourceVersion it saw; a 409 makes it read the object and write again.
    let mut patch = serde_json::Map::new();
    patch.insert("lcm.openshift.io/ibgu-prep-completed".into(), json!(""));
    store::cluster_patch_labels(&db.pool, "sno1", &patch)
        .await
        .unwrap();
    let pass = {
        let (ctx, mc_api, reader) = (ctx.clone(), mc_api.clone(), reader.clone());
        tokio::spawn(async move { fleet::pass(&ctx, &mc_api, &reader).await })
    };
    let path = "/apis/cluster.open-cluster-management.io/v1/managedclusters/sno1";
    let first = api
        .expect(
            Method::PATCH,
            path,
            409,
            status(409, "Conflict", "modified"),
        )
        .await;
    assert_eq!(
        first,
        json!({"metadata": {"resourceVersion": "10", "labels": {
            "lcm.openshift.io/ibgu-prep-completed": "",
            "lcm.openshift.io/ibgu-prep-failed": null}}})
    );
    let newer = managed_cluster("sno1", "11", json!({"common": "true"}));
    api.expect(
        Method::GET,
        path,
        200,
        serde_json::to_value(&newer).unwrap(),
    )
    .await;
    let second = api
        .expect(
            Method::PATCH,
            path,
            200,
            serde_json::to_value(&newer).unwrap(),
        )
        .await;
    assert_eq!(
        second,
        json!({"metadata": {"resourceVersion": "11", "labels": {
            "lcm.openshift.io/ibgu-prep-completed": ""}}})
    );
    pass.await.unwrap().unwrap();
    api.done().await;
}

#[tokio::test]
async fn the_lease_is_created_renewed_followed_and_lost_on_conflict() {
    let (ctx, mut api, _db) = setup().await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(ctx.client.clone(), "fleet");
    let path = "/apis/coordination.k8s.io/v1/namespaces/fleet/leases/fleet-hub";
    let now = chrono::Utc::now();
    // Nobody: create it.
    let run = {
        let l = leases.clone();
        tokio::spawn(async move { lease::try_lead(&l, "fleet-hub", "hub-0", now).await })
    };
    api.expect(Method::GET, path, 404, status(404, "NotFound", "no lease"))
        .await;
    let created = api
        .expect(
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/fleet/leases",
            201,
            json!({}),
        )
        .await;
    assert_eq!(created["spec"]["holderIdentity"], "hub-0");
    assert_eq!(
        created["spec"]["leaseDurationSeconds"],
        lease::LEASE_SECONDS
    );
    assert!(run.await.unwrap().unwrap(), "we lead");

    // Someone else renewed it a moment ago: follow, write nothing.
    let held = |holder: &str, renewed: chrono::DateTime<chrono::Utc>, rv: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "fleet-hub", "namespace": "fleet", "resourceVersion": rv},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                        "renewTime": renewed.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                        "leaseTransitions": 3}})
    };
    let run = {
        let l = leases.clone();
        tokio::spawn(async move { lease::try_lead(&l, "fleet-hub", "hub-0", now).await })
    };
    api.expect(
        Method::GET,
        path,
        200,
        held("hub-1", now - chrono::Duration::seconds(3), "20"),
    )
    .await;
    assert!(!run.await.unwrap().unwrap(), "hub-1 leads");
    api.done().await;

    // hub-1 stopped renewing: take it over; hub-2 was faster (409): we do not lead.
    let run = {
        let l = leases.clone();
        tokio::spawn(async move { lease::try_lead(&l, "fleet-hub", "hub-0", now).await })
    };
    api.expect(
        Method::GET,
        path,
        200,
        held("hub-1", now - chrono::Duration::seconds(60), "21"),
    )
    .await;
    let put = api
        .expect(Method::PUT, path, 409, status(409, "Conflict", "modified"))
        .await;
    assert_eq!(put["metadata"]["resourceVersion"], "21");
    assert_eq!(put["spec"]["holderIdentity"], "hub-0");
    assert_eq!(put["spec"]["leaseTransitions"], 4);
    assert!(!run.await.unwrap().unwrap(), "lost the race");
    api.done().await;
}

#[tokio::test(start_paused = true)]
async fn after_a_429_the_client_waits_retry_after_and_counts_it() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let metrics = Metrics::new().unwrap();
    let layer = kubernetes::client::KubeLayer {
        metrics: metrics.clone(),
        limiter: kubernetes::client::Limiter::new(100.0, 10),
    };
    let client = kube::Client::new(tower::Layer::layer(&layer, service), "default");
    let mut api = Verifier(handle);
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client, "ztp");
    let first = {
        let cms = cms.clone();
        tokio::spawn(async move {
            cms.patch(
                "x",
                &Default::default(),
                &kube::api::Patch::Merge(json!({})),
            )
            .await
        })
    };
    let (req, send) = api.0.next_request().await.unwrap();
    assert_eq!(req.method(), Method::PATCH);
    send.send_response(
        Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", "3")
            .body(Body::from(
                serde_json::to_vec(&status(429, "TooManyRequests", "slow down")).unwrap(),
            ))
            .unwrap(),
    );
    assert!(first.await.unwrap().is_err(), "the 429 reaches the caller");
    let started = tokio::time::Instant::now();
    let second = tokio::spawn(async move { cms.get("x").await });
    api.expect(
        Method::GET,
        "/api/v1/namespaces/ztp/configmaps/x",
        200,
        configmap(),
    )
    .await;
    assert!(
        tokio::time::Instant::now() - started >= Duration::from_secs(3),
        "the next request waited for Retry-After"
    );
    second.await.unwrap().unwrap();
    let text = metrics.render();
    assert!(
        text.contains("fleet_hub_kube_requests_total{result=\"throttled\",verb=\"patch\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("fleet_hub_kube_requests_total{result=\"success\",verb=\"get\"} 1"),
        "{text}"
    );
}
