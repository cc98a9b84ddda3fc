//! Kubernetes mode of the agent (`spoke-agent serve --kube`): the `ImageBasedUpgrade` CR of
//! its own cluster mirrors the agent (and `oc patch` drives it), ConfigMaps are the
//! cluster's, OADP runs through Velero's objects.

pub mod cluster_config;
pub mod host;
pub mod ibu;
