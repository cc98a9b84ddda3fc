//! spoke-agent: runs, on one single-node cluster, the whole image-based upgrade, behaving
//! like the Lifecycle Agent's `ImageBasedUpgrade` resource.

pub mod cli;
pub mod engine;
pub mod host;
pub mod store;
