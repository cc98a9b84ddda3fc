//! spoke-agent: runs, on one single-node cluster, the whole image-based upgrade, behaving
//! like the Lifecycle Agent's `ImageBasedUpgrade` resource. The engine, runner, API and
//! reporting are `spoke-core`; the simulated host is `spoke-sim`; this crate holds the command
//! line and the hosts that touch a real cluster.

pub mod cli;
pub mod kubernetes;
pub mod lca;
pub mod ostree;
pub mod run;
