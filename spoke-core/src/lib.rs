//! The spoke agent's core, the same on every host: the IBU engine (the rules of
//! `ibu-spoke.md`, pure), the runner that applies its decisions through a [`host::Host`],
//! the agent's HTTP API and its reporting to the hub. The hosts themselves live above it:
//! the simulated one in `spoke-sim`, the Kubernetes and node ones in `spoke-agent`.

pub mod api;
pub mod engine;
pub mod error;
pub mod host;
pub mod metrics;
pub mod must_gather;
pub mod report;
pub mod runner;
pub mod spoke;
pub mod store;

pub use error::Error;
