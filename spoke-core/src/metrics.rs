//! The agent's metrics, in a registry the program owns and shares among the agents of a
//! simulated fleet. Labels are bounded (stage, state, result), never a cluster name.

use fleet_types::ibu::{ImageBasedUpgrade, StageHistory};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::engine::SpokeState;

#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    transitions: IntCounterVec,
    reports: IntCounterVec,
    auto_rollbacks: IntCounter,
    clusters: IntGaugeVec,
    stage_duration: HistogramVec,
    phase_duration: HistogramVec,
}

/// Stages and phases take from seconds (simulated) to an hour or more (a real precache).
const DURATION_BUCKETS: [f64; 14] = [
    0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

impl AgentMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let transitions = IntCounterVec::new(
            Opts::new(
                "spoke_transitions_total",
                "Stage requests to the local API, by result (accepted: the stage changed; unchanged: it was the stage asked for already; refused)",
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
        let stage_duration = HistogramVec::new(
            HistogramOpts::new(
                "spoke_stage_duration_seconds",
                "Time a stage (Prep, Upgrade, Rollback) ran, from its start to its end, by stage and result (completed, failed)",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["stage", "result"],
        )?;
        let phase_duration = HistogramVec::new(
            HistogramOpts::new(
                "spoke_phase_duration_seconds",
                "Time a phase of a stage took (as in status.history), by stage and phase",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["stage", "phase"],
        )?;
        let build_info = IntGauge::with_opts(
            Opts::new("spoke_build_info", "Always 1; the version is a label")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build_info.set(1);
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(stage_duration.clone()))?;
        registry.register(Box::new(phase_duration.clone()))?;
        for result in ["accepted", "unchanged", "refused"] {
            transitions.with_label_values(&[result]);
        }
        for result in ["sent", "failed"] {
            reports.with_label_values(&[result]);
        }
        // Born at 0 (see the hub's action durations): the first failed stage counts.
        for stage in ["Prep", "Upgrade", "Rollback"] {
            for result in ["completed", "failed"] {
                stage_duration.with_label_values(&[stage, result]);
            }
        }
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
            stage_duration,
            phase_duration,
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

    /// Records a change of one agent's state: its (stage, state) gauge, and the duration
    /// of every stage and phase that ended with it.
    pub fn observe_change(&self, old: Option<&SpokeState>, new: &SpokeState) {
        self.observe_state(old, new);
        if let Some(old) = old {
            for (labels, seconds) in ended(&old.ibu, &new.ibu) {
                match labels {
                    Ended::Stage(stage, result) => self
                        .stage_duration
                        .with_label_values(&[stage.as_str(), result])
                        .observe(seconds),
                    Ended::Phase(stage, phase) => self
                        .phase_duration
                        .with_label_values(&[stage.as_str(), phase.as_str()])
                        .observe(seconds),
                }
            }
        }
    }

    /// Moves this agent from its old (stage, state) to its new one.
    fn observe_state(&self, old: Option<&SpokeState>, new: &SpokeState) {
        fn key(s: &SpokeState) -> (&str, &str) {
            let state = s
                .ibu
                .status
                .as_ref()
                .and_then(|st| st.current())
                .map_or("", |c| c.reason.as_str());
            (s.ibu.spec.stage.as_str(), state)
        }
        let new_key = key(new);
        if let Some(old) = old {
            let old_key = key(old);
            if old_key == new_key {
                return;
            }
            self.clusters
                .with_label_values(&[old_key.0, old_key.1])
                .dec();
        }
        self.clusters
            .with_label_values(&[new_key.0, new_key.1])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[derive(Debug, PartialEq)]
pub enum Ended {
    Stage(String, &'static str),
    Phase(String, String),
}

/// What ended between two versions of an IBU, with its duration in seconds: a stage whose
/// history entry got its completion time (completed), a stage whose current condition turned
/// to `Failed` (failed, timed to the failure), and phases that got their completion time.
pub fn ended(old: &ImageBasedUpgrade, new: &ImageBasedUpgrade) -> Vec<(Ended, f64)> {
    fn history(ibu: &ImageBasedUpgrade) -> &[StageHistory] {
        ibu.status.as_ref().map_or(&[], |s| &s.history)
    }
    let (before, after) = (history(old), history(new));
    let seconds = |from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>| {
        (to - from).num_milliseconds().max(0) as f64 / 1000.0
    };
    let mut out = Vec::new();
    for h in after {
        let prior = before
            .iter()
            .find(|b| b.stage == h.stage && b.start_time == h.start_time);
        if let Some(done) = h.completion_time
            && prior.is_none_or(|p| p.completion_time.is_none())
        {
            out.push((
                Ended::Stage(h.stage.as_str().to_string(), "completed"),
                seconds(h.start_time, done),
            ));
        }
        for ph in &h.phases {
            let was_done = prior
                .and_then(|p| {
                    p.phases
                        .iter()
                        .find(|q| q.phase == ph.phase && q.start_time == ph.start_time)
                })
                .is_some_and(|q| q.completion_time.is_some());
            if let Some(done) = ph.completion_time
                && !was_done
            {
                out.push((
                    Ended::Phase(h.stage.as_str().to_string(), ph.phase.clone()),
                    seconds(ph.start_time, done),
                ));
            }
        }
    }
    fn failed(ibu: &ImageBasedUpgrade) -> Option<&fleet_types::Condition> {
        ibu.status
            .as_ref()
            .and_then(|s| s.current())
            .filter(|c| c.reason == fleet_types::ibu::reason::FAILED)
    }
    if let Some(c) = failed(new)
        && failed(old).is_none()
        && let Some(h) = after.iter().rev().find(|h| h.completion_time.is_none())
        && let Some(at) = c.last_transition_time
    {
        out.push((
            Ended::Stage(h.stage.as_str().to_string(), "failed"),
            seconds(h.start_time, at),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_and_result_is_counted_from_zero() {
        let text = AgentMetrics::new().unwrap().render();
        for stage in ["Prep", "Upgrade", "Rollback"] {
            for result in ["completed", "failed"] {
                let series = format!(
                    "spoke_stage_duration_seconds_count{{result=\"{result}\",stage=\"{stage}\"}} 0"
                );
                assert!(text.contains(&series), "{series} missing:\n{text}");
            }
        }
    }
}
