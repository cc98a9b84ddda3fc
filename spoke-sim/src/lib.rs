//! The simulated single-node cluster, the agent's host for tests, the demo and fleet
//! simulation (`spoke-agent --host sim`, `spoke-agent sim-fleet`, `fleet-hub demo`,
//! `fleet-bench`): stateroots, OADP and ConfigMaps held in memory and saved to one JSON
//! file, with configurable step durations and the contract's fault points.

pub mod sim;

#[cfg(test)]
mod engine_tests;

use std::path::Path;
use std::sync::Arc;

use spoke_core::Error;
use spoke_core::metrics::AgentMetrics;
use spoke_core::report::HubLink;
use spoke_core::runner::Agent;

pub use sim::{Fault, SimCluster, SimConfig, SimHost};

/// Opens a simulated cluster's state in `state_dir` and runs its agent (reporting to the hub
/// when linked). The agent answers as unreachable from the start under that fault.
pub async fn start_agent(
    name: String,
    state_dir: &Path,
    config: SimConfig,
    metrics: &AgentMetrics,
    link: Option<HubLink>,
) -> Result<Arc<Agent<SimHost>>, Error> {
    let unreachable = config.faults.contains(&Fault::Unreachable);
    let host = SimHost::open(state_dir, config)
        .map_err(|e| Error::internal(format!("cluster {name}: opening its state"), e))?;
    spoke_core::runner::start(name, host, metrics, link, unreachable).await
}
