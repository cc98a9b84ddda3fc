//! spoke-agent: runs, on one single-node cluster, the whole image-based upgrade, behaving
//! like the Lifecycle Agent's `ImageBasedUpgrade` resource.

pub mod api;
pub mod cli;
pub mod engine;
pub mod host;
pub mod kubernetes;
pub mod metrics;
pub mod must_gather;
pub mod report;
pub mod run;
pub mod runner;
pub mod store;
