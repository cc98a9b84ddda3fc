//! fleet-bench: how fast and how lean the hub orchestrates a large fleet, on this machine.
//!
//! It starts Postgres (a private instance, or a fresh database on `--database-url`'s
//! server), measures the database's raw durable single-row commit rate, starts `fleet-hub
//! serve` and `spoke-agent sim-fleet` (steps that take no time) as separate processes, runs
//! one `[Prep, Upgrade, FinalizeUpgrade]` rollout over every cluster, and reports. It is a
//! benchmark: it prints numbers and never fails for being slow.

mod baseline;
mod machine;
mod probe;
mod report;
mod run;
mod watch;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "fleet-bench",
    about = "Measures the hub orchestrating one rollout over a simulated fleet"
)]
pub struct Args {
    /// Simulated clusters.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub clusters: u32,
    /// The rollout's maxConcurrency (clusters per batch).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: u32,
    /// A Postgres server to make the bench's database on. Absent: a private instance.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// How long each of the two commit baselines runs, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub baseline_seconds: u64,
    /// Hub replicas on the one database; the simulated agents get every URL.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub hubs: u32,
    /// Kill (SIGKILL) the replica that drives the rollout this many seconds after it
    /// started (needs --hubs 2 or more): the report says how long transitions stopped.
    #[arg(long, value_name = "SECONDS")]
    pub kill_hub_after: Option<f64>,
}

impl Args {
    /// What clap cannot check alone.
    fn check(&self) -> Result<(), String> {
        match self.kill_hub_after {
            Some(_) if self.hubs < 2 => Err(
                "--kill-hub-after needs --hubs 2 or more: a replica must be left to take over"
                    .into(),
            ),
            Some(s) if !(s.is_finite() && s >= 0.0) => Err(format!(
                "--kill-hub-after {s}: a number of seconds, 0 or more"
            )),
            _ => Ok(()),
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = args.check() {
        eprintln!("fleet-bench: {e}");
        std::process::exit(2);
    }
    if let Err(e) = run::run(args).await {
        eprintln!("fleet-bench: {e}");
        std::process::exit(1);
    }
}

/// Progress, on stderr: stdout carries only the report.
fn say(msg: &str) {
    eprintln!("[fleet-bench] {msg}");
}
