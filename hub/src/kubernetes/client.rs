//! The tower layer every Kubernetes request of the hub goes through: it counts requests by
//! verb and result, rate-limits writes (QPS with a burst, as client-go does), and backs off
//! after a 429: no request leaves until the server's `Retry-After` has passed.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::{BoxError, Layer, Service};

use crate::metrics::Metrics;

/// Longest pause a `Retry-After` may ask for; a larger value is capped (a misbehaving server
/// must not freeze the hub).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Pause after a 429 without a usable `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Requests queued in front of the API server connection.
const QUEUE: usize = 256;

/// Token bucket for writes, and the pause a 429 imposes on everything.
pub struct Limiter {
    qps: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    paused_until: Option<Instant>,
}

impl Limiter {
    pub fn new(qps: f64, burst: u32) -> Arc<Self> {
        let burst = f64::from(burst.max(1));
        Arc::new(Limiter {
            qps: qps.max(0.001),
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                refilled: Instant::now(),
                paused_until: None,
            }),
        })
    }

    /// Waits until a request may leave: after any 429 pause, and for writes, a token.
    pub async fn acquire(&self, write: bool) {
        loop {
            let wait = {
                let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
                b.tokens = (b.tokens + elapsed * self.qps).min(self.burst);
                b.refilled = now;
                match b.paused_until {
                    Some(until) if until > now => Some(until - now),
                    _ if !write => None,
                    _ if b.tokens >= 1.0 => {
                        b.tokens -= 1.0;
                        None
                    }
                    _ => Some(Duration::from_secs_f64((1.0 - b.tokens) / self.qps)),
                }
            };
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// The server said 429: nothing leaves before `after` has passed.
    pub fn pause(&self, after: Duration) {
        let until = Instant::now() + after.min(MAX_RETRY_AFTER);
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        b.paused_until = Some(b.paused_until.map_or(until, |u| u.max(until)));
    }
}

/// The verb of a request, as `kubectl` and the API server's audit log name it.
pub fn verb<B>(req: &Request<B>) -> &'static str {
    match *req.method() {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => {
            let query = req.uri().query().unwrap_or_default();
            if query
                .split('&')
                .any(|kv| kv == "watch=true" || kv == "watch=1")
            {
                "watch"
            } else if is_collection(req.uri().path()) {
                "list"
            } else {
                "get"
            }
        }
    }
}

/// `/api/v1/namespaces/ns/pods` or `/apis/g/v/plural`: a collection; with a name after the
/// plural (and maybe a subresource): one object.
fn is_collection(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.first() {
        Some(&"api") => parts.get(2..),
        Some(&"apis") => parts.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        &rest[2..]
    } else {
        rest
    };
    rest.len() == 1
}

pub fn result(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "success",
        409 => "conflict",
        429 => "throttled",
        400..=499 => "client_error",
        _ => "error",
    }
}

fn retry_after<B>(res: &Response<B>) -> Duration {
    res.headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_RETRY_AFTER)
}

#[derive(Clone)]
pub struct KubeLayer {
    pub metrics: Metrics,
    pub limiter: Arc<Limiter>,
}

impl<S, B> Layer<S> for KubeLayer
where
    S: Service<Request<kube::client::Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    B: Send + 'static,
{
    type Service = KubeService<Buffer<Request<kube::client::Body>, S::Future>>;

    fn layer(&self, inner: S) -> Self::Service {
        KubeService {
            inner: Buffer::new(inner, QUEUE),
            metrics: self.metrics.clone(),
            limiter: self.limiter.clone(),
        }
    }
}

#[derive(Clone)]
pub struct KubeService<S> {
    inner: S,
    metrics: Metrics,
    limiter: Arc<Limiter>,
}

impl<S, B> Service<Request<kube::client::Body>> for KubeService<S>
where
    S: Service<Request<kube::client::Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is awaited in `call`, after the limiter, on a clone of the buffer.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let mut inner = self.inner.clone();
        let metrics = self.metrics.clone();
        let limiter = self.limiter.clone();
        Box::pin(async move {
            let verb = verb(&req);
            let write = !matches!(verb, "get" | "list" | "watch");
            limiter.acquire(write).await;
            let started = std::time::Instant::now();
            let outcome = tower::ServiceExt::ready(&mut inner)
                .await
                .map_err(Into::into)?
                .call(req)
                .await
                .map_err(Into::into);
            metrics
                .kube_request_duration
                .with_label_values(&[verb])
                .observe(started.elapsed().as_secs_f64());
            let label = match &outcome {
                Ok(res) => {
                    if res.status() == StatusCode::TOO_MANY_REQUESTS {
                        let after = retry_after(res);
                        tracing::warn!(verb, ?after, "the Kubernetes API asked us to slow down");
                        limiter.pause(after);
                    }
                    result(res.status())
                }
                Err(_) => "error",
            };
            metrics
                .kube_requests
                .with_label_values(&[verb, label])
                .inc();
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    #[test]
    fn verbs_are_named_as_kubernetes_names_them() {
        let cases = [
            (
                Method::GET,
                "/apis/lcm.openshift.io/v1alpha1/imagebasedgroupupgrades",
                "list",
            ),
            (
                Method::GET,
                "/apis/lcm.openshift.io/v1alpha1/namespaces/default/imagebasedgroupupgrades?watch=true&resourceVersion=5",
                "watch",
            ),
            (
                Method::GET,
                "/apis/lcm.openshift.io/v1alpha1/namespaces/default/imagebasedgroupupgrades/u1",
                "get",
            ),
            (Method::GET, "/api/v1/namespaces/default/configmaps", "list"),
            (
                Method::GET,
                "/api/v1/namespaces/default/configmaps/oadp",
                "get",
            ),
            (
                Method::GET,
                "/apis/cluster.open-cluster-management.io/v1/managedclusters/sno1",
                "get",
            ),
            (
                Method::PATCH,
                "/apis/lcm.openshift.io/v1alpha1/namespaces/default/imagebasedgroupupgrades/u1/status",
                "patch",
            ),
            (
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/default/events",
                "create",
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases/fleet-hub",
                "update",
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/default/configmaps/x",
                "delete",
            ),
        ];
        for (m, uri, want) in cases {
            assert_eq!(verb(&req(m, uri)), want, "{uri}");
        }
        assert_eq!(result(StatusCode::CONFLICT), "conflict");
        assert_eq!(result(StatusCode::TOO_MANY_REQUESTS), "throttled");
        assert_eq!(result(StatusCode::NOT_FOUND), "client_error");
        assert_eq!(result(StatusCode::SERVICE_UNAVAILABLE), "error");
    }

    #[tokio::test(start_paused = true)]
    async fn writes_beyond_the_burst_wait_for_tokens_reads_do_not() {
        let limiter = Limiter::new(2.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            limiter.acquire(true).await;
        }
        assert_eq!(Instant::now(), start, "the burst leaves at once");
        limiter.acquire(false).await;
        assert_eq!(Instant::now(), start, "reads are not limited");
        limiter.acquire(true).await;
        assert_eq!(
            Instant::now() - start,
            Duration::from_millis(500),
            "then 2 per second"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_every_request_for_retry_after_capped() {
        let limiter = Limiter::new(100.0, 10);
        let start = Instant::now();
        limiter.pause(Duration::from_secs(3));
        limiter.acquire(false).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
        limiter.pause(Duration::from_secs(3600));
        limiter.acquire(true).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(33));
    }
}
