//! Command line of `spoke-agent`. Every flag also reads the environment variable named
//! beside it (`contract.md`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "spoke-agent",
    version,
    about = "Runs the image-based upgrade of one single-node OpenShift cluster (the ImageBasedUpgrade resource)"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "SPOKE_LOG_FORMAT", value_enum, default_value_t = fleet_server::LogFormat::Text)]
    pub log_format: fleet_server::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent of one cluster: the IBU engine, its HTTP API and the hub reporting.
    Serve(ServeArgs),
    /// Run many simulated agents in one process on one listener (`/clusters/<name>/...`).
    SimFleet(SimFleetArgs),
    /// The real node's watchdog, run by its unit on the new stateroot: roll the node back
    /// when the upgrade has not completed within the IBU's init-monitor timeout.
    InitMonitor(InitMonitorArgs),
}

#[derive(Args, Debug)]
pub struct InitMonitorArgs {
    #[command(flatten)]
    pub ostree: OstreeArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// Simulated host: configurable step durations and injected faults.
    Sim,
    /// The cluster's own Lifecycle Agent does the upgrade: the agent drives its
    /// ImageBasedUpgrade `upgrade` and mirrors it to the hub (in-cluster service account or
    /// KUBECONFIG; no node access).
    Lca,
    /// The real node: the agent runs the upgrade itself with the Lifecycle Agent's commands
    /// (ostree, rpm-ostree, podman, skopeo, systemctl), as a privileged pod with the host's
    /// `/` at `--host-root`, or as a service on the node (`--host-root / --host-exec direct`).
    Ostree,
}

/// Where the real node is and how its commands run (`--host ostree`).
#[derive(Args, Debug, Clone)]
pub struct OstreeArgs {
    /// ostree: where the node's `/` is (`/host` in a pod, `/` on the node).
    #[arg(long, env = "SPOKE_HOST_ROOT", default_value = "/host")]
    pub host_root: PathBuf,
    /// ostree: run node commands inside `chroot <host-root>` (a pod), or straight from the
    /// agent's PATH (a service on the node).
    #[arg(long, env = "SPOKE_HOST_EXEC", value_enum, default_value_t = crate::ostree::runner::Exec::Chroot)]
    pub host_exec: crate::ostree::runner::Exec,
    /// ostree: the cluster's OpenShift version (x.y.z), which the node does not record in
    /// full; required with --host ostree.
    #[arg(long, env = "SPOKE_CLUSTER_VERSION")]
    pub cluster_version: Option<String>,
    /// ostree: seconds to wait for the node to go down after asking it to reboot before
    /// saying it did not (the Lifecycle Agent waits an hour).
    #[arg(long, env = "SPOKE_REBOOT_WAIT_SECONDS", default_value_t = 600)]
    pub reboot_wait_seconds: u64,
    /// ostree with --kube: the label selector of the agent's own Kubernetes objects (the
    /// chart sets it). Before the pivot they are handed to the seed's reconfiguration, which
    /// creates them on the upgraded cluster, so that the agent comes up there to finish.
    #[arg(long, env = "SPOKE_CARRY_SELECTOR")]
    pub carry_selector: Option<String>,
    /// ostree, as a service on the node: the systemd unit that runs this agent. Prep enables
    /// it in the new deployment (with the files under /etc it names as EnvironmentFile), so
    /// that the agent comes up there to finish the upgrade.
    #[arg(long, env = "SPOKE_SERVICE_UNIT")]
    pub service_unit: Option<String>,
}

/// What the simulated host does and knows.
#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// sim: the cluster's version before the upgrade.
    #[arg(long, env = "SPOKE_CURRENT_VERSION", default_value = "4.15.0")]
    pub current_version: String,
    /// sim: duration of each simulated step, in milliseconds.
    #[arg(long, env = "SPOKE_SIM_STEP_MS", default_value_t = 200)]
    pub sim_step_ms: u64,
    /// sim: how long a simulated reboot keeps the agent away, in milliseconds.
    #[arg(long, env = "SPOKE_SIM_REBOOT_MS", default_value_t = 1000)]
    pub sim_reboot_ms: u64,
    /// sim: a namespace the cluster has besides the built-in ones (repeatable).
    #[arg(
        long = "sim-namespace",
        env = "SPOKE_SIM_NAMESPACES",
        value_delimiter = ','
    )]
    pub sim_namespaces: Vec<String>,
    /// sim: a CRD the cluster has, as GROUP/VERSION/KIND (repeatable).
    #[arg(long = "sim-crd", env = "SPOKE_SIM_CRDS", value_delimiter = ',')]
    pub sim_crds: Vec<String>,
    /// sim: the cluster has LVM Storage (topolvm) volumes.
    #[arg(long, env = "SPOKE_SIM_LVMS")]
    pub sim_lvms: bool,
    /// sim: keep the simulated nodes in memory only, no state files (for benchmarks of the
    /// hub; a restart of the agent starts from scratch).
    #[arg(long, env = "SPOKE_SIM_IN_MEMORY")]
    pub sim_in_memory: bool,
    /// sim: a seed image the registry does not have (repeatable): its Prep fails at the
    /// inspect, as `skopeo inspect` of a mistyped tag does.
    #[arg(
        long = "sim-missing-image",
        env = "SPOKE_SIM_MISSING_IMAGES",
        value_delimiter = ','
    )]
    pub sim_missing_images: Vec<String>,
}

/// How the agent reaches and registers with the hub.
#[derive(Args, Debug, Clone)]
pub struct HubArgs {
    /// Hub base URL. Absent: no hub, local API only. Repeat it (comma-separated in the
    /// environment) for hub replicas without a load balancer: the agent uses the first that
    /// answers and moves on to the next when it stops answering.
    #[arg(long = "hub-url", env = "SPOKE_HUB_URL", value_delimiter = ',')]
    pub hub_url: Vec<String>,
    /// CA bundle (PEM) the hub's certificate must chain to (default: the usual roots); an
    /// untrusted hub stops the agent at start, before anything is sent.
    #[arg(long, env = "SPOKE_HUB_CA_FILE")]
    pub hub_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) to present to a hub with --client-ca-file: naming this
    /// cluster (CN or DNS name), it stands for the join token and the credential.
    #[arg(
        long,
        env = "SPOKE_HUB_CLIENT_CERT_FILE",
        requires = "hub_client_key_file"
    )]
    pub hub_client_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(
        long,
        env = "SPOKE_HUB_CLIENT_KEY_FILE",
        requires = "hub_client_cert_file"
    )]
    pub hub_client_key_file: Option<PathBuf>,
    /// Token presented to the hub to register.
    #[arg(long, env = "SPOKE_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
}

/// TLS on the listener (the kube-apiserver's flag names).
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// Serving certificate (PEM, the chain after it); read again when it changes.
    #[arg(long, env = "SPOKE_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "SPOKE_TLS_PRIVATE_KEY_FILE")]
    pub tls_private_key_file: Option<PathBuf>,
    /// Serve plain HTTP on an address other hosts reach (refused without it).
    #[arg(long, env = "SPOKE_INSECURE_HTTP")]
    pub insecure_http: bool,
    /// Oldest TLS version accepted (ciphers: rustls' safe defaults).
    #[arg(long, env = "SPOKE_TLS_MIN_VERSION", value_enum, default_value_t)]
    pub tls_min_version: fleet_server::tls::TlsMinVersion,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Name of this cluster, as the hub knows it.
    #[arg(long, env = "SPOKE_CLUSTER_NAME")]
    pub cluster_name: String,
    /// Address the agent's HTTP API listens on.
    #[arg(long, env = "SPOKE_LISTEN", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Directory holding the persisted IBU and the agent's state.
    #[arg(long, env = "SPOKE_STATE_DIR", default_value = "./.spoke-agent")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub hub: HubArgs,
    /// Token with full access to the local API.
    #[arg(long, env = "SPOKE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Label announced at registration, as k=v (repeatable).
    #[arg(long = "label", env = "SPOKE_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Host backend.
    #[arg(long, env = "SPOKE_HOST", value_enum, default_value_t = HostKind::Sim)]
    pub host: HostKind,
    #[command(flatten)]
    pub sim: SimArgs,
    #[command(flatten)]
    pub ostree: OstreeArgs,
    /// sim: make that fault point fail (repeatable): prep, precache, backup, post-reboot,
    /// init-monitor, restore, rollback, cleanup, unreachable.
    #[arg(long = "fault", env = "SPOKE_FAULTS", value_delimiter = ',')]
    pub faults: Vec<String>,
    /// URL the hub uses to reach this agent's API (default: http://<listen>, https:// with TLS).
    #[arg(long, env = "SPOKE_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Kubernetes mode: mirror the cluster's ImageBasedUpgrade `upgrade` (oc get/patch ibu),
    /// use the cluster's ConfigMaps and run OADP through Velero (in-cluster service account
    /// or KUBECONFIG).
    #[arg(long, env = "SPOKE_KUBE")]
    pub kube: bool,
}

#[derive(Args, Debug)]
pub struct SimFleetArgs {
    /// Number of simulated clusters.
    #[arg(long, env = "SPOKE_SIM_COUNT")]
    pub count: u32,
    /// Clusters are named <prefix>1..<prefix>N.
    #[arg(long, env = "SPOKE_SIM_PREFIX", default_value = "spoke")]
    pub prefix: String,
    /// Address of the one listener; each cluster is served under /clusters/<name>.
    #[arg(long, env = "SPOKE_LISTEN", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Directory holding one sub-directory of state per cluster.
    #[arg(long, env = "SPOKE_STATE_DIR", default_value = "./.spoke-fleet")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub hub: HubArgs,
    /// Token with full access to every simulated cluster's local API.
    #[arg(long, env = "SPOKE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Label of every cluster, as k=v (repeatable); each also gets name=<cluster>.
    #[arg(long = "label", env = "SPOKE_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[command(flatten)]
    pub sim: SimArgs,
    /// Make POINT fail on CLUSTER, as CLUSTER=POINT (repeatable).
    #[arg(long = "fault", env = "SPOKE_FAULTS", value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Base URL the hub uses to reach the listener (default: http://<listen>, https:// with TLS); each cluster
    /// is <endpoint>/clusters/<name>.
    #[arg(long, env = "SPOKE_ENDPOINT")]
    pub endpoint: Option<String>,
}

/// `k=v`, with a non-empty key.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not of the form key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn labels_parse() {
        assert_eq!(
            parse_label("env=prod").unwrap(),
            ("env".into(), "prod".into())
        );
        assert_eq!(parse_label("k=").unwrap(), ("k".into(), String::new()));
        assert!(parse_label("=v").is_err());
        assert!(parse_label("novalue").is_err());
    }
}
