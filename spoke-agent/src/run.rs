//! `spoke-agent serve` and `spoke-agent sim-fleet`: wire the host, the agents, their API and
//! the hub reporting together, and stop cleanly on SIGTERM.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use spoke_core::Error;
use spoke_core::api::{self, ApiState};
use spoke_core::metrics::AgentMetrics;
use spoke_core::report::HubLink;
use spoke_core::runner::Agent;
use spoke_core::spoke::Spoke;
use spoke_sim::{Fault, SimConfig, SimHost, start_agent};

use crate::cli::{HostKind, HubArgs, ServeArgs, SimArgs, SimFleetArgs, TlsArgs};
use crate::kubernetes::host::KubeHost;

fn sim_config(sim: &SimArgs, faults: BTreeSet<Fault>) -> SimConfig {
    SimConfig {
        current_version: sim.current_version.clone(),
        step: Duration::from_millis(sim.sim_step_ms),
        reboot: Duration::from_millis(sim.sim_reboot_ms),
        faults,
        namespaces: sim.sim_namespaces.clone(),
        crds: sim.sim_crds.clone(),
        lvms: sim.sim_lvms,
        in_memory: sim.sim_in_memory,
        missing_images: sim.sim_missing_images.iter().cloned().collect(),
    }
}

fn parse_faults<'a>(points: impl IntoIterator<Item = &'a str>) -> Result<BTreeSet<Fault>, Error> {
    points
        .into_iter()
        .map(|p| p.parse::<Fault>().map_err(Error::Invalid))
        .collect()
}

fn hub_link(
    hub_urls: &[String],
    (join_token, certified): (Option<String>, bool),
    endpoint: String,
    labels: BTreeMap<String, String>,
    client: reqwest::Client,
    tls: &Option<Tls>,
) -> Result<Option<HubLink>, Error> {
    if hub_urls.is_empty() {
        return Ok(None);
    }
    // A client certificate registers without the join token.
    let join_token = match (join_token, certified) {
        (Some(token), _) => token,
        (None, true) => String::new(),
        (None, false) => {
            return Err(Error::Invalid(
                "--hub-url needs --join-token (or --hub-client-cert-file) to register".into(),
            ));
        }
    };
    Ok(Some(HubLink {
        hub_urls: hub_urls.to_vec(),
        current: Default::default(),
        join_token,
        endpoint,
        labels,
        agent_id: uuid::Uuid::new_v4().to_string(),
        client,
        certificate: tls.as_ref().map(|(_, cert)| cert.clone()),
        requests: None,
    }))
}

/// The file in the state directory that keeps the local API's token when no `--api-token`
/// is given.
pub const API_TOKEN_FILE: &str = "api-token";

/// The token that guards the local API: `--api-token`, else the one kept in
/// `<state-dir>/api-token`, made at the first start and readable by its owner only. Said once
/// in the log, by where to find it, never by its value.
fn local_api_token(given: Option<String>, state_dir: &Path) -> Result<String, Error> {
    if let Some(token) = given.filter(|t| !t.is_empty()) {
        tracing::info!("local API: guarded by --api-token and the hub's credential");
        return Ok(token);
    }
    let path = state_dir.join(API_TOKEN_FILE);
    let failed =
        |e: std::io::Error| Error::internal(format!("the local API token {}", path.display()), e);
    let kept = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text.trim().to_string()).filter(|t| !t.is_empty()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(failed(e)),
    };
    let token = match kept {
        Some(token) => token,
        None => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::create_dir_all(state_dir).map_err(failed)?;
            let token = uuid::Uuid::new_v4().simple().to_string();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(failed)?;
            writeln!(file, "{token}").map_err(failed)?;
            token
        }
    };
    tracing::info!(
        "local API: guarded by the bearer token in {} and the hub's credential (--api-token chooses another)",
        path.display()
    );
    Ok(token)
}

/// The client for the hub: trusting `--hub-ca-file` when given, presenting
/// `--hub-client-cert-file` when given; with an `https` hub, its certificate is checked now,
/// so an untrusted hub stops the agent before anything is sent.
async fn hub_client(
    hub_urls: &[String],
    ca_file: Option<std::path::PathBuf>,
    identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<reqwest::Client, Error> {
    let read = |flag: &str, file: &std::path::Path| {
        std::fs::read(file).map_err(|e| Error::Invalid(format!("{flag} {}: {e}", file.display())))
    };
    let cas = ca_file
        .as_deref()
        .map(|f| read("--hub-ca-file", f))
        .transpose()?;
    let identity = match &identity {
        Some((cert, key)) => {
            let mut pem = read("--hub-client-cert-file", cert)?;
            pem.push(b'\n');
            pem.extend(read("--hub-client-key-file", key)?);
            Some(pem)
        }
        None => None,
    };
    let client = HubLink::client_with(cas.as_deref(), identity.as_deref()).map_err(|why| {
        let flag = if why.starts_with("the client certificate") {
            "--hub-client-cert-file".to_string()
        } else {
            format!(
                "--hub-ca-file {}",
                ca_file
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            )
        };
        Error::Invalid(format!("{flag}: {why}"))
    })?;
    spoke_core::report::check_hub_urls(hub_urls).map_err(Error::Invalid)?;
    for url in hub_urls.iter().filter(|u| u.starts_with("https://")) {
        if let Err(err) = client
            .get(format!("{}/healthz", url.trim_end_matches('/')))
            .send()
            .await
            && let Some(why) = fleet_server::tls::refusal(&err)
        {
            return Err(Error::Invalid(format!(
                "hub certificate not trusted: {why}"
            )));
        }
    }
    Ok(client)
}

/// How the hub reaches the listener when `--endpoint` does not say: its address, over TLS
/// when the listener speaks it.
fn default_endpoint(listen: SocketAddr, tls: &Option<Tls>) -> String {
    let scheme = if tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{listen}")
}

/// The listener's TLS: what accepts connections, and the certificate it serves (which the
/// agent registers with the hub).
type Tls = (tokio_rustls::TlsAcceptor, fleet_server::tls::ServingCert);

/// The listener's TLS, checked before anything starts.
fn listener_tls(listen: SocketAddr, tls: TlsArgs) -> Result<Option<Tls>, Error> {
    use fleet_server::tls;
    let files = tls::TlsFiles::from_flags(tls.tls_cert_file, tls.tls_private_key_file)
        .map_err(Error::Invalid)?
        .map(|mut files| {
            files.min_version = tls.tls_min_version;
            files
        });
    tls::check_plain_http(listen, &files, tls.insecure_http).map_err(Error::Invalid)?;
    files
        .as_ref()
        .map(tls::serving)
        .transpose()
        .map_err(Error::Invalid)
}

async fn serve_http(listen: SocketAddr, tls: Option<Tls>, app: axum::Router) -> Result<(), Error> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Error::internal(format!("listening on {listen}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::internal("the listener's address", e))?;
    tracing::info!(address = %local, tls = tls.is_some(), "spoke-agent listening");
    match tls {
        None => axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| Error::internal("serving HTTP", e)),
        Some((acceptor, _)) => fleet_server::listen::serve_tls(
            listener,
            app,
            fleet_server::listen::Limits::default(),
            Some(acceptor),
            shutdown_signal(),
        )
        .await
        .map_err(|e| Error::internal("serving HTTPS", e)),
    }
}

pub async fn serve(args: ServeArgs) -> Result<(), Error> {
    fleet_server::listen::raise_open_files(fleet_server::listen::OPEN_FILES_WANTED);
    let ServeArgs {
        cluster_name,
        listen,
        tls,
        state_dir,
        hub:
            HubArgs {
                hub_url,
                hub_ca_file,
                hub_client_cert_file,
                hub_client_key_file,
                join_token,
            },
        api_token,
        labels,
        host,
        sim,
        ostree,
        faults,
        endpoint,
        kube,
    } = args;
    // The hub knows clusters by DNS-1123 labels, as ManagedClusters are named.
    fleet_types::names::dns1123_label(&cluster_name)
        .map_err(|why| Error::Invalid(format!("--cluster-name {why}")))?;
    let faults = parse_faults(faults.iter().map(String::as_str))?;
    let tls = listener_tls(listen, tls)?;
    let api_token = Some(local_api_token(api_token, &state_dir)?);
    let metrics = AgentMetrics::new().map_err(|e| Error::internal("the metrics registry", e))?;
    let endpoint = endpoint.unwrap_or_else(|| default_endpoint(listen, &tls));
    let identity = hub_client_cert_file.zip(hub_client_key_file);
    let certified = identity.is_some();
    let hub = hub_client(&hub_url, hub_ca_file, identity).await?;
    let link = hub_link(
        &hub_url,
        (join_token, certified),
        endpoint,
        labels.into_iter().collect(),
        hub,
        &tls,
    )?;
    if host == HostKind::Lca {
        let client = kube_client("--host lca").await?;
        let spoke = crate::lca::LcaSpoke::new(cluster_name.clone(), client);
        tokio::spawn(spoke.clone().run());
        if let Some(link) = link {
            tokio::spawn(spoke_core::report::run(
                spoke.clone(),
                link,
                metrics.clone(),
            ));
        }
        tracing::info!("driving the cluster's own Lifecycle Agent (ImageBasedUpgrade \"upgrade\")");
        return serve_one(spoke, cluster_name, api_token, metrics, (listen, tls)).await;
    }
    if host == HostKind::Ostree {
        let host = ostree_host(&ostree)?;
        if !kube {
            let agent =
                spoke_core::runner::start(cluster_name.clone(), host, &metrics, link, false)
                    .await?;
            return serve_one(agent, cluster_name, api_token, metrics, (listen, tls)).await;
        }
        let client = kube_client("--kube").await?;
        if ostree.carry_selector.is_none() && ostree.service_unit.is_none() {
            tracing::warn!(
                "neither --carry-selector nor --service-unit: after an upgrade's reboot the cluster is the seed's, and only a seed that has this agent brings it back to finish"
            );
        }
        let host = KubeHost::new(host, client.clone()).carrying(ostree.carry_selector.clone());
        let agent =
            spoke_core::runner::start(cluster_name.clone(), host, &metrics, link, false).await?;
        tokio::spawn(crate::kubernetes::ibu::run(agent.clone(), client));
        return serve_one(agent, cluster_name, api_token, metrics, (listen, tls)).await;
    }
    let config = sim_config(&sim, faults);
    if !kube {
        let agent = start_agent(cluster_name.clone(), &state_dir, config, &metrics, link).await?;
        return serve_one(agent, cluster_name, api_token, metrics, (listen, tls)).await;
    }
    let client = kube_client("--kube").await?;
    let unreachable = config.faults.contains(&Fault::Unreachable);
    let sim = SimHost::open(&state_dir, config)
        .map_err(|e| Error::internal(format!("cluster {cluster_name}: opening its state"), e))?;
    let host = KubeHost::new(sim, client.clone());
    let agent =
        spoke_core::runner::start(cluster_name.clone(), host, &metrics, link, unreachable).await?;
    tokio::spawn(crate::kubernetes::ibu::run(agent.clone(), client));
    serve_one(agent, cluster_name, api_token, metrics, (listen, tls)).await
}

pub async fn init_monitor(args: crate::cli::InitMonitorArgs) -> Result<(), Error> {
    let host = node_host(&args.ostree, String::new())?;
    host.init_monitor()
        .await
        .map_err(|e| Error::internal("the init monitor", e))
}

/// The real node's host, checked before anything runs: its root must exist, and the
/// cluster's version must be given.
fn ostree_host(args: &crate::cli::OstreeArgs) -> Result<crate::ostree::OstreeHost, Error> {
    let version = args.cluster_version.clone().ok_or_else(|| {
        Error::Invalid(
            "--host ostree needs --cluster-version (the cluster's OpenShift version, x.y.z)".into(),
        )
    })?;
    semver::Version::parse(&version).map_err(|e| {
        Error::Invalid(format!(
            "--cluster-version {version:?} is not a version x.y.z: {e}"
        ))
    })?;
    node_host(args, version)
}

fn node_host(
    args: &crate::cli::OstreeArgs,
    version: String,
) -> Result<crate::ostree::OstreeHost, Error> {
    use crate::ostree::{OstreeConfig, OstreeHost, node::NodeOs, runner::Runner};
    if !args.host_root.is_dir() {
        return Err(Error::Invalid(format!(
            "--host-root {}: not a directory (in a pod, mount the host's / there)",
            args.host_root.display()
        )));
    }
    let runner = Runner::new(args.host_root.clone(), args.host_exec);
    Ok(OstreeHost::new(
        NodeOs::new(runner),
        OstreeConfig {
            current_version: version,
            reboot_wait: std::time::Duration::from_secs(args.reboot_wait_seconds),
            service_unit: args.service_unit.clone(),
        },
    ))
}

/// The cluster's API client: the in-cluster service account, or KUBECONFIG.
async fn kube_client(flag: &str) -> Result<kube::Client, Error> {
    let config = kube::Config::infer().await.map_err(|e| {
        Error::Invalid(format!(
            "{flag}: no Kubernetes configuration (in-cluster service account or KUBECONFIG): {e}"
        ))
    })?;
    kube::Client::try_from(config)
        .map_err(|e| Error::internal(format!("{flag}: building the Kubernetes client"), e))
}

async fn serve_one<S: Spoke>(
    agent: Arc<S>,
    cluster_name: String,
    api_token: Option<String>,
    metrics: AgentMetrics,
    (listen, tls): (SocketAddr, Option<Tls>),
) -> Result<(), Error> {
    let state = ApiState {
        agents: HashMap::from([(cluster_name.clone(), agent)]),
        single: Some(cluster_name),
        api_token,
        metrics,
    };
    serve_http(listen, tls, api::router(Arc::new(state))).await
}

/// How many simulated agents open their state at once at start.
const OPEN_CONCURRENCY: usize = 64;

/// Requests a simulated fleet has on their way to the hub at once (each a connection, a
/// file): well below the usual open-file limits, well above what a hub answers at once.
const SIM_FLEET_HUB_REQUESTS: usize = 2048;

pub async fn sim_fleet(args: SimFleetArgs) -> Result<(), Error> {
    fleet_server::listen::raise_open_files(fleet_server::listen::OPEN_FILES_WANTED);
    let SimFleetArgs {
        count,
        prefix,
        listen,
        tls,
        state_dir,
        hub:
            HubArgs {
                hub_url,
                hub_ca_file,
                hub_client_cert_file,
                hub_client_key_file,
                join_token,
            },
        api_token,
        labels,
        sim,
        faults,
        endpoint,
    } = args;
    let tls = listener_tls(listen, tls)?;
    let mut per_cluster: HashMap<String, BTreeSet<Fault>> = HashMap::new();
    for f in &faults {
        let (cluster, point) = f.split_once('=').ok_or_else(|| {
            Error::Invalid(format!("--fault {f:?}: sim-fleet faults are CLUSTER=POINT"))
        })?;
        per_cluster
            .entry(cluster.to_string())
            .or_default()
            .extend(parse_faults([point])?);
    }
    let names: Vec<String> = (1..=count).map(|i| format!("{prefix}{i}")).collect();
    if let Some(last) = names.last() {
        fleet_types::names::dns1123_label(last)
            .map_err(|why| Error::Invalid(format!("--prefix makes cluster names such as {why}")))?;
    }
    if let Some(unknown) = per_cluster.keys().find(|c| !names.contains(c)) {
        return Err(Error::Invalid(format!(
            "--fault names cluster {unknown:?}, which is not in {prefix}1..{prefix}{count}"
        )));
    }
    let api_token = Some(local_api_token(api_token, &state_dir)?);
    let metrics = AgentMetrics::new().map_err(|e| Error::internal("the metrics registry", e))?;
    let base = endpoint.unwrap_or_else(|| default_endpoint(listen, &tls));
    let identity = hub_client_cert_file.zip(hub_client_key_file);
    let certified = identity.is_some();
    let client = hub_client(&hub_url, hub_ca_file, identity).await?;
    let common: BTreeMap<String, String> = labels.into_iter().collect();
    // The fleet's agents take turns at the hub: one process, a bounded number of
    // connections (files), however many clusters it simulates.
    let turns = Arc::new(tokio::sync::Semaphore::new(SIM_FLEET_HUB_REQUESTS));
    // And move on from a hub that stopped answering together.
    let current = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut agents = HashMap::new();
    let mut pending = tokio::task::JoinSet::new();
    for name in names {
        if pending.len() >= OPEN_CONCURRENCY
            && let Some(done) = pending.join_next().await
        {
            let agent: Arc<Agent<SimHost>> =
                done.map_err(|e| Error::internal("starting an agent", e))??;
            agents.insert(agent.name.clone(), agent);
        }
        let mut labels = common.clone();
        labels.insert("name".into(), name.clone());
        let link = hub_link(
            &hub_url,
            (join_token.clone(), certified),
            format!("{base}/clusters/{name}"),
            labels,
            client.clone(),
            &tls,
        )?
        .map(|link| HubLink {
            requests: Some(turns.clone()),
            current: current.clone(),
            ..link
        });
        let config = sim_config(&sim, per_cluster.get(&name).cloned().unwrap_or_default());
        let dir = state_dir.join(&name);
        let metrics = metrics.clone();
        pending.spawn(async move { start_agent(name, &dir, config, &metrics, link).await });
    }
    while let Some(done) = pending.join_next().await {
        let agent = done.map_err(|e| Error::internal("starting an agent", e))??;
        agents.insert(agent.name.clone(), agent);
    }
    tracing::info!(clusters = agents.len(), "simulated fleet running");
    let state = ApiState {
        agents,
        single: None,
        api_token,
        metrics,
    };
    serve_http(listen, tls, api::router(Arc::new(state))).await
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}
