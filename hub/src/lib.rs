//! fleet-hub: plans and drives `ImageBasedGroupUpgrade` rollouts across a fleet of
//! single-node OpenShift clusters, with Postgres as the source of truth.

pub mod cli;
pub mod crd;
pub mod ctl;
pub mod db;
pub mod demo;
pub mod embedded_pg;
pub mod engine;
pub mod error;
pub mod grouped;
pub mod http;
pub mod kubernetes;
pub mod metrics;
pub mod planner;
pub mod registrations;
pub mod reports;
pub mod rollouts;
pub mod serve;
pub mod shutdown;
pub mod store;

pub use error::Error;
