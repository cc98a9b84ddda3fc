//! Command line of `fleet-hub`. Every flag also reads the environment variable named beside
//! it (`contract.md`); each subcommand destructures its arguments so none goes unused.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "fleet-hub",
    version,
    about = "Rolls ImageBasedGroupUpgrades across a fleet of single-node OpenShift clusters"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "FLEET_HUB_LOG_FORMAT", value_enum, default_value_t = fleet_server::LogFormat::Text)]
    pub log_format: fleet_server::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the REST API and drive rollouts (migrates the database at start; SIGTERM drains
    /// and exits 0).
    Serve(Box<ServeArgs>),
    /// The guided demo: a private database, a simulated fleet and a sample rollout.
    Demo(DemoArgs),
    /// Print the OpenAPI document of the REST API (also served at /openapi.json).
    Openapi,
    /// Rollouts on a hub: apply, list, get, describe, watch, pause, resume, history, delete.
    Rollout(crate::ctl::RolloutCommand),
    /// Clusters on a hub: list, get, label, delete.
    Cluster(crate::ctl::ClusterCommand),
    /// Shell completions (`source <(fleet-hub completion bash)`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Where the database is.
#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// Postgres URL. Absent: the hub starts a private Postgres under --data-dir.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Data directory of the private Postgres used when no --database-url is given.
    #[arg(
        long,
        env = "FLEET_HUB_DATA_DIR",
        default_value = "./.fleet-hub/pgdata"
    )]
    pub data_dir: PathBuf,
}

/// The demo's own default data directory: its simulated clusters never land in the
/// inventory of a hub served from the default one.
pub const DEMO_DATA_DIR: &str = "./.fleet-hub/demo/pgdata";

/// TLS on the listener (the kube-apiserver's flag names).
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// Serving certificate (PEM, the chain after it); read again when it changes.
    #[arg(long, env = "FLEET_HUB_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "FLEET_HUB_TLS_PRIVATE_KEY_FILE")]
    pub tls_private_key_file: Option<PathBuf>,
    /// Serve plain HTTP on an address other hosts reach (refused without it).
    #[arg(long, env = "FLEET_HUB_INSECURE_HTTP")]
    pub insecure_http: bool,
    /// Oldest TLS version accepted (ciphers: rustls' safe defaults).
    #[arg(long, env = "FLEET_HUB_TLS_MIN_VERSION", value_enum, default_value_t)]
    pub tls_min_version: fleet_server::tls::TlsMinVersion,
    /// CA bundle (PEM) of spoke client certificates: a spoke presenting one for its cluster
    /// name (CN or DNS name) registers and reports without join token or credential.
    #[arg(long, env = "FLEET_HUB_CLIENT_CA_FILE")]
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address the HTTP API listens on.
    #[arg(long, env = "FLEET_HUB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Token with full access to the REST API (rollouts, clusters, history, configmaps).
    #[arg(long, env = "FLEET_HUB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Token that reads every GET of the REST API and changes nothing (repeatable).
    #[arg(
        long = "viewer-token",
        env = "FLEET_HUB_VIEWER_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub viewer_tokens: Vec<String>,
    /// File of viewer tokens, one per line (as a mounted Secret holds them).
    #[arg(long, env = "FLEET_HUB_VIEWER_TOKEN_FILE")]
    pub viewer_token_file: Option<PathBuf>,
    /// Token a spoke agent presents to register.
    #[arg(long, env = "FLEET_HUB_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// The join token in a file, read again when it changes (replace it without a restart).
    #[arg(long, env = "FLEET_HUB_JOIN_TOKEN_FILE", conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,
    /// How long a cluster credential issued at registration is valid (`30d`, `12h`, `90m`);
    /// agents renew theirs at two thirds of it.
    #[arg(long, env = "FLEET_HUB_CLUSTER_CREDENTIAL_TTL", default_value = "30d", value_parser = parse_ttl)]
    pub cluster_credential_ttl: chrono::Duration,
    /// Drop the history of months wholly older than this (`400d`, a month at least); absent:
    /// keep everything. Checked at start and every hour.
    #[arg(long, env = "FLEET_HUB_HISTORY_RETENTION", value_parser = parse_retention)]
    pub history_retention: Option<chrono::Duration>,
    /// Also reconcile ImageBasedGroupUpgrade CRs and ManagedCluster labels on the hub cluster
    /// (the in-cluster service account, or KUBECONFIG).
    #[arg(long, env = "FLEET_HUB_KUBE")]
    pub kube: bool,
    #[command(flatten)]
    pub kube_options: KubeArgs,
}

/// A duration as humantime writes it (`30d`, `12h 30m`), of a minute at least: an agent
/// renews at two thirds of it, and must reach the hub before then.
pub fn parse_ttl(text: &str) -> Result<chrono::Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    let d = chrono::Duration::from_std(d).map_err(|e| format!("{text:?}: {e}"))?;
    if d < chrono::Duration::minutes(1) {
        return Err(format!("{text:?} is shorter than a minute"));
    }
    Ok(d)
}

/// A history retention as humantime writes it, of 31 days at least: the month being written
/// is never dropped.
pub fn parse_retention(text: &str) -> Result<chrono::Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    let d = chrono::Duration::from_std(d).map_err(|e| format!("{text:?}: {e}"))?;
    if d < chrono::Duration::days(31) {
        return Err(format!("{text:?} is shorter than 31 days"));
    }
    Ok(d)
}

/// Kubernetes mode (with --kube).
#[derive(Args, Debug)]
pub struct KubeArgs {
    /// Namespaces whose ImageBasedGroupUpgrades are reconciled (comma-separated; empty: all).
    #[arg(long, env = "FLEET_HUB_KUBE_NAMESPACES", value_delimiter = ',')]
    pub kube_namespaces: Vec<String>,
    /// Kubernetes writes per second, sustained.
    #[arg(long, env = "FLEET_HUB_KUBE_QPS", default_value_t = 20.0)]
    pub kube_qps: f64,
    /// Kubernetes writes allowed at once above the sustained rate.
    #[arg(long, env = "FLEET_HUB_KUBE_BURST", default_value_t = 40)]
    pub kube_burst: u32,
    /// Namespace of the leader-election Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "FLEET_HUB_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, env = "FLEET_HUB_LEASE_NAME", default_value = "fleet-hub")]
    pub lease_name: String,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of simulated clusters.
    #[arg(long, default_value_t = 20)]
    pub clusters: u32,
    /// Postgres URL. Absent: the demo starts a private Postgres under --data-dir.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Data directory of the demo's private Postgres (its own, apart from `serve`'s).
    #[arg(long, env = "FLEET_HUB_DEMO_DATA_DIR", default_value = DEMO_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address of the hub's REST API while the demo runs [default: 127.0.0.1:8080, or any
    /// free loopback port when that one is taken].
    #[arg(long, env = "FLEET_HUB_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Duration of each simulated step, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub sim_step_ms: u64,
    /// How long a simulated reboot keeps a cluster away, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    pub sim_reboot_ms: u64,
    /// Address the simulated fleet's API and its /metrics listen on (port 0: any free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub fleet_listen: SocketAddr,
    /// Keep the hub and the fleet serving after the rollout ends, until Ctrl-C (to browse
    /// the API and the dashboards).
    #[arg(long)]
    pub stay: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_lifetimes_are_read_as_humans_write_them() {
        assert_eq!(parse_ttl("30d"), Ok(chrono::Duration::days(30)));
        assert_eq!(
            parse_ttl("12h 30m"),
            Ok(chrono::Duration::minutes(12 * 60 + 30))
        );
        assert_eq!(
            parse_ttl("59s"),
            Err("\"59s\" is shorter than a minute".to_string())
        );
        let bad = parse_ttl("thirty days").unwrap_err();
        assert!(bad.starts_with("\"thirty days\": "), "{bad}");
    }
}
