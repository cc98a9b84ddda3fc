//! What the bench measured, as one JSON line (for scripts and the docs' tables) and as a
//! table for people, each figure beside its target.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::baseline::Baseline;
use crate::machine::CpuSplit;

/// Every figure of one run.
pub struct Figures {
    pub clusters: u32,
    pub max_concurrency: u32,
    pub baseline_seconds: u64,
    /// Seconds from the rollout's creation to its completion.
    pub elapsed: f64,
    /// History rows the rollout wrote (each a transition).
    pub transitions: i64,
    pub baseline: Baseline,
    pub baseline_machine: Option<CpuSplit>,
    /// The same baseline after the rollout, the hub and the fleet stopped.
    pub after: Baseline,
    pub after_machine: Option<CpuSplit>,
    pub rollout_machine: Option<CpuSplit>,
    pub latency_p50: Option<f64>,
    pub latency_p99: Option<f64>,
    pub latency_max: Option<f64>,
    pub hub_peak_rss_mib: f64,
    pub hub_cpu: f64,
    pub fleet_cpu: f64,
    pub postgres_cpu: f64,
    pub passes: f64,
    pub pass_seconds: f64,
    pub rows: i64,
    pub rows_by_table: BTreeMap<String, i64>,
    pub http_requests: f64,
    pub pushes: f64,
    /// The rollout's `status.summary`.
    pub summary: Value,
    /// Seconds the API took to answer one cluster's history of the rollout, and the whole
    /// rollout's history (every transition).
    pub history_query: [f64; 2],
    /// Seconds from the fleet's start until every cluster had registered and reported.
    pub registration: f64,
    pub replicas: Replicas,
}

/// What the hub replicas did with the rollout, killed or not.
pub struct Replicas {
    /// Hub replicas run.
    pub hubs: u32,
    /// When the driving replica was killed (seconds into the rollout), and which one.
    pub killed: Option<(f64, usize)>,
    /// The longest time without a new transition (history row) during the rollout, in
    /// seconds, as the bench saw it polling (every 50 ms and a query).
    pub longest_gap: f64,
    /// Cluster actions never completed.
    pub lost: i64,
    /// Starts and completions recorded more than once.
    pub repeated_in_history: i64,
    /// Stage changes at the spokes beyond one per action.
    pub repeated_at_spokes: i64,
    /// Stages pushed again to a spoke already at them (harmless: no change).
    pub asked_again: i64,
}

impl Figures {
    fn actions_per_second(&self) -> f64 {
        self.clusters as f64 * 3.0 / self.elapsed
    }

    fn transitions_per_second(&self) -> f64 {
        self.transitions as f64 / self.elapsed
    }

    /// Transitions and each baseline's commits per CPU second the machine was busy: what
    /// each costs in CPU time, leaving out what the hypervisor took (not busy time).
    fn per_busy_second(&self) -> [Option<f64>; 3] {
        let commits = |b: &Baseline| b.rate * self.baseline_seconds as f64;
        [
            per_busy_second(self.transitions as f64, self.rollout_machine),
            per_busy_second(commits(&self.baseline), self.baseline_machine),
            per_busy_second(commits(&self.after), self.after_machine),
        ]
    }

    pub fn json(&self) -> Value {
        let [per_cpu, baseline_per_cpu, after_per_cpu] = self.per_busy_second();
        let cpu_ratio = per_cpu.zip(baseline_per_cpu).map(|(t, b)| t / b);
        let rate = self.transitions_per_second();
        let mut out = serde_json::json!({
            "clusters": self.clusters, "maxConcurrency": self.max_concurrency,
            "orchestrationSeconds": round(self.elapsed), "clusterActionsPerSecond": round(self.actions_per_second()),
            "transitions": self.transitions, "transitionsPerSecond": round(rate),
            "baselineCommitsPerSecond": round(self.baseline.rate), "baselineSecondsRange": self.baseline.range().map(round),
            "transitionsToBaseline": round(rate / self.baseline.rate),
            "baselineAfterCommitsPerSecond": round(self.after.rate), "baselineAfterSecondsRange": self.after.range().map(round),
            "transitionsToBaselineAfter": round(rate / self.after.rate),
            "machineDuringBaseline": self.baseline_machine.map(machine_json), "machineDuringRollout": self.rollout_machine.map(machine_json),
            "machineDuringBaselineAfter": self.after_machine.map(machine_json),
            "transitionsPerBusyCpuSecond": per_cpu.map(round), "baselineCommitsPerBusyCpuSecond": baseline_per_cpu.map(round),
            "baselineAfterCommitsPerBusyCpuSecond": after_per_cpu.map(round), "transitionsToBaselinePerBusyCpuSecond": cpu_ratio.map(round),
            "decisionLatencyP50Seconds": self.latency_p50.map(round), "decisionLatencyP99Seconds": self.latency_p99.map(round),
            "decisionLatencyMaxSeconds": self.latency_max.map(round),
            "hubPeakRssMiB": round(self.hub_peak_rss_mib), "hubCpuSeconds": round(self.hub_cpu),
            "simFleetCpuSeconds": round(self.fleet_cpu), "postgresCpuSeconds": round(self.postgres_cpu),
            "enginePasses": self.passes, "enginePassSeconds": round(self.pass_seconds),
            "rowsWritten": self.rows, "rowsWrittenByTable": self.rows_by_table,
            "hubHttpRequestsServed": self.http_requests, "hubPushesSent": self.pushes,
            "registrationSeconds": round(self.registration),
            "historyQuerySeconds": {"cluster": self.history_query[0], "rollout": self.history_query[1]},
            "summary": self.summary,
        });
        let r = &self.replicas;
        let replicas = serde_json::json!({
            "hubs": r.hubs,
            "killedHubAtSeconds": r.killed.map(|(at, _)| round(at)),
            "failoverSeconds": round(r.longest_gap),
            "lostTransitions": r.lost,
            "repeatedTransitions": r.repeated_in_history + r.repeated_at_spokes,
            "repeatedInHistory": r.repeated_in_history, "repeatedAtSpokes": r.repeated_at_spokes,
            "stagesPushedAgain": r.asked_again,
        });
        if let (Some(out), Value::Object(more)) = (out.as_object_mut(), replicas) {
            out.extend(more);
        }
        out
    }

    pub fn text(&self) -> String {
        let [per_cpu, baseline_per_cpu, after_per_cpu] = self.per_busy_second();
        let cpu_ratio = per_cpu.zip(baseline_per_cpu).map(|(t, b)| t / b);
        let rate = self.transitions_per_second();
        let [slowest, fastest] = self.baseline.range();
        let [after_slowest, after_fastest] = self.after.range();
        let tables: Vec<String> = self
            .rows_by_table
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        let lines = [
            format!("clusters                     {}", self.clusters),
            format!("max concurrency              {}", self.max_concurrency),
            format!(
                "orchestration                {:.1} s   (target <= 60 s at 100,000 / 5,000)",
                self.elapsed
            ),
            format!(
                "cluster-actions per second   {:.0}",
                self.actions_per_second()
            ),
            format!(
                "transitions (history rows)   {}   {rate:.0}/s",
                self.transitions
            ),
            format!(
                "raw commit baseline          {:.0}/s (each second {slowest:.0} to {fastest:.0})   ratio {:.2}   (target >= 1.0)",
                self.baseline.rate,
                rate / self.baseline.rate
            ),
            format!(
                "2nd baseline, after rollout  {:.0}/s (each second {after_slowest:.0} to {after_fastest:.0})   ratio {:.2}",
                self.after.rate,
                rate / self.after.rate
            ),
            format!(
                "machine during baseline      {}",
                machine_text(self.baseline_machine)
            ),
            format!(
                "machine during rollout       {}",
                machine_text(self.rollout_machine)
            ),
            format!(
                "machine during 2nd baseline  {}",
                machine_text(self.after_machine)
            ),
            format!(
                "per busy CPU second          {} transitions, {} commits in the baseline ({} in the 2nd)   ratio {}",
                whole(per_cpu),
                whole(baseline_per_cpu),
                whole(after_per_cpu),
                cpu_ratio.map_or("-".into(), |r| format!("{r:.2}"))
            ),
            format!(
                "decision latency             p50 {}  p99 {}  max {}   (target p99 <= 1 s)",
                seconds(self.latency_p50),
                seconds(self.latency_p99),
                seconds(self.latency_max)
            ),
            format!(
                "hub peak RSS                 {:.0} MiB   (target <= 256 MiB at 100,000)",
                self.hub_peak_rss_mib
            ),
            format!(
                "hub CPU                      {:.1} s   (simulated fleet: {:.1} s, Postgres on this machine: {:.1} s)",
                self.hub_cpu, self.fleet_cpu, self.postgres_cpu
            ),
            format!(
                "engine passes                {}   {:.1} s in their transactions",
                self.passes, self.pass_seconds
            ),
            format!(
                "rows written                 {}   ({})",
                self.rows,
                tables.join(", ")
            ),
            format!(
                "hub HTTP requests served     {}   pushes sent {}",
                self.http_requests, self.pushes
            ),
            format!(
                "registration                 {:.1} s   (target <= 30 s at 100,000)",
                self.registration
            ),
            format!(
                "history through the API      one cluster {:.3} s, the whole rollout ({} rows) {:.3} s",
                self.history_query[0], self.transitions, self.history_query[1]
            ),
            self.replicas.text(),
        ];
        lines.join("\n")
    }
}

impl Replicas {
    fn text(&self) -> String {
        let killed = match self.killed {
            Some((at, i)) => format!("hub-{i} killed {at:.1} s in"),
            None if self.hubs > 1 => "none killed".into(),
            None => "one hub".into(),
        };
        format!(
            "hub replicas                 {}, {killed}; longest gap in transitions {:.2} s (target <= 5 s), lost {}, repeated {} (history {}, spokes {}), stages pushed again {}",
            self.hubs,
            self.longest_gap,
            self.lost,
            self.repeated_in_history + self.repeated_at_spokes,
            self.repeated_in_history,
            self.repeated_at_spokes,
            self.asked_again
        )
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `count` per CPU second the machine was busy (none where that is unknown).
fn per_busy_second(count: f64, machine: Option<CpuSplit>) -> Option<f64> {
    machine
        .filter(|m| m.busy_seconds > 0.0)
        .map(|m| count / m.busy_seconds)
}

fn whole(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn seconds(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3} s")).unwrap_or_else(|| "-".into())
}

fn machine_json(s: CpuSplit) -> Value {
    serde_json::json!({"busyPercent": round(s.busy), "idlePercent": round(s.idle), "stolenPercent": round(s.steal)})
}

pub fn machine_text(s: Option<CpuSplit>) -> String {
    match s {
        Some(s) => format!(
            "CPU busy {:.0} %, idle {:.0} %, stolen by the hypervisor {:.0} %",
            s.busy, s.idle, s.steal
        ),
        None => "CPU split unknown (no /proc/stat)".into(),
    }
}
