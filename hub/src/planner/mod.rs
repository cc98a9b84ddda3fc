//! The planner: pure functions that decide what a rollout does next. No IO, no clock.

pub mod check;
pub mod controls;
pub mod drive;
pub mod rollout;
pub mod selector;
pub mod state;
pub mod status;
pub mod validate;

#[cfg(test)]
mod proptests;
