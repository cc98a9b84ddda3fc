//! End-to-end tests: the real binaries, started as an operator starts them, over loopback.

mod cli;
mod fake_node;
mod hub;
mod kube;
mod lca;
mod observability;
mod ostree;
mod rollout;
mod spoke;
mod spoke_kube;
mod tls;
