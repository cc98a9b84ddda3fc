//! The hub's metrics, in a registry the application owns (no global default registry), so
//! tests and several hubs in one process never share counters. Labels are bounded: route
//! templates, never raw paths or cluster names.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub build_info: IntGauge,
    pub reports_received: prometheus::IntCounter,
    pub pushes: IntCounterVec,
    pub decision_latency: prometheus::Histogram,
    pub decision_latency_max: prometheus::Gauge,
    pub pass_duration: prometheus::Histogram,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "fleet_hub_http_requests_total",
                "HTTP requests answered, by method, route template and status code",
            ),
            &["method", "route", "status"],
        )?;
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "fleet_hub_http_request_duration_seconds",
                "Time to answer an HTTP request, by method and route template",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["method", "route"],
        )?;
        let build_info = IntGauge::with_opts(
            Opts::new("fleet_hub_build_info", "Always 1; the version is a label")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build_info.set(1);
        let reports_received = prometheus::IntCounter::new(
            "fleet_hub_spoke_reports_total",
            "Spoke status reports stored (stale and duplicate ones are not counted)",
        )?;
        registry.register(Box::new(reports_received.clone()))?;
        let pushes = IntCounterVec::new(
            Opts::new(
                "fleet_hub_spoke_pushes_total",
                "Stage pushes to spokes, by result (accepted, refused, unreachable)",
            ),
            &["result"],
        )?;
        // From a spoke's report to the push it caused: the hub's reaction time.
        let decision_latency = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "fleet_hub_decision_latency_seconds",
                "Time from a spoke's report being stored to the next stage push sent to it",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        let decision_latency_max = prometheus::Gauge::new(
            "fleet_hub_decision_latency_max_seconds",
            "Largest decision latency seen since the hub started",
        )?;
        let pass_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "fleet_hub_engine_pass_duration_seconds",
                "Time of one engine pass over one rollout (load, plan, store)",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(pushes.clone()))?;
        registry.register(Box::new(decision_latency.clone()))?;
        registry.register(Box::new(decision_latency_max.clone()))?;
        registry.register(Box::new(pass_duration.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_request_duration.clone()))?;
        registry.register(Box::new(build_info.clone()))?;
        Ok(Metrics {
            registry,
            http_requests,
            http_request_duration,
            build_info,
            reports_received,
            pushes,
            decision_latency,
            decision_latency_max,
            pass_duration,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format except on invalid metric
        // families, which registration already rejected.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
