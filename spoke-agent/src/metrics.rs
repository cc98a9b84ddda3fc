//! The agent's metrics, in a registry the program owns and shares among the agents of a
//! simulated fleet. Labels are bounded (stage, state, result), never a cluster name.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::engine::SpokeState;

#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    transitions: IntCounterVec,
    reports: IntCounterVec,
    auto_rollbacks: IntCounter,
    clusters: IntGaugeVec,
}

impl AgentMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let transitions = IntCounterVec::new(
            Opts::new(
                "spoke_transitions_total",
                "Stage requests to the local API, by result (accepted, refused)",
            ),
            &["result"],
        )?;
        let reports = IntCounterVec::new(
            Opts::new(
                "spoke_reports_total",
                "Status reports to the hub, by result (sent, failed)",
            ),
            &["result"],
        )?;
        let auto_rollbacks = IntCounter::new(
            "spoke_auto_rollbacks_total",
            "Automatic rollbacks started (watchdog or post-reboot failure)",
        )?;
        let clusters = IntGaugeVec::new(
            Opts::new(
                "spoke_ibu_clusters",
                "Agents by desired stage and current state (the reason of the last condition)",
            ),
            &["stage", "state"],
        )?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(reports.clone()))?;
        registry.register(Box::new(auto_rollbacks.clone()))?;
        registry.register(Box::new(clusters.clone()))?;
        Ok(AgentMetrics {
            registry,
            transitions,
            reports,
            auto_rollbacks,
            clusters,
        })
    }

    pub fn transition(&self, result: &str) {
        self.transitions.with_label_values(&[result]).inc();
    }

    pub fn report(&self, result: &str) {
        self.reports.with_label_values(&[result]).inc();
    }

    pub fn auto_rollback(&self) {
        self.auto_rollbacks.inc();
    }

    /// Moves this agent from its old (stage, state) to its new one.
    pub fn observe_state(&self, old: Option<&SpokeState>, new: &SpokeState) {
        let key = |s: &SpokeState| {
            let state = s
                .ibu
                .status
                .as_ref()
                .and_then(|st| st.current())
                .map(|c| c.reason.clone())
                .unwrap_or_default();
            (s.ibu.spec.stage.as_str(), state)
        };
        let new_key = key(new);
        if let Some(old) = old {
            let old_key = key(old);
            if old_key == new_key {
                return;
            }
            self.clusters
                .with_label_values(&[old_key.0, old_key.1.as_str()])
                .dec();
        }
        self.clusters
            .with_label_values(&[new_key.0, new_key.1.as_str()])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
