//! `fleet-hub serve`: open the database (migrating it), serve HTTP until SIGTERM or Ctrl-C,
//! then drain and stop the embedded database.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::cli::{KubeArgs, ServeArgs};
use crate::db::Database;
use crate::engine::{Engine, SystemClock};
use crate::error::Error;
use crate::http::{self, AppState};
use crate::kubernetes;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

pub async fn run(args: ServeArgs, shutdown: Shutdown) -> Result<(), Error> {
    fleet_server::listen::raise_open_files(fleet_server::listen::OPEN_FILES_WANTED);
    let ServeArgs {
        listen,
        tls,
        database,
        admin_token,
        viewer_tokens,
        viewer_token_file,
        join_token,
        join_token_file,
        cluster_credential_ttl,
        history_retention,
        kube,
        kube_options:
            KubeArgs {
                kube_namespaces,
                kube_qps,
                kube_burst,
                lease_namespace,
                lease_name,
            },
    } = args;
    let tls_files =
        fleet_server::tls::TlsFiles::from_flags(tls.tls_cert_file, tls.tls_private_key_file)
            .map_err(Error::Invalid)?
            .map(|mut files| {
                files.min_version = tls.tls_min_version;
                files
            });
    fleet_server::tls::check_plain_http(listen, &tls_files, tls.insecure_http)
        .map_err(Error::Invalid)?;
    let client_cas = match (&tls.client_ca_file, &tls_files) {
        (Some(_), None) => {
            return Err(Error::Invalid(
                "--client-ca-file needs --tls-cert-file and --tls-private-key-file".into(),
            ));
        }
        (Some(file), Some(_)) => Some(fleet_server::tls::client_cas(file).map_err(Error::Invalid)?),
        (None, _) => None,
    };
    let acceptor = tls_files
        .as_ref()
        .map(|files| fleet_server::tls::serving_with(files, client_cas.clone()))
        .transpose()
        .map_err(Error::Invalid)?
        .map(|(acceptor, _)| acceptor);
    let viewer_tokens = viewers(
        viewer_tokens,
        viewer_token_file.as_deref(),
        admin_token.is_some(),
    )?;
    if kube_qps <= 0.0 || kube_burst == 0 {
        return Err(Error::Invalid(
            "--kube-qps must be above 0 and --kube-burst at least 1".into(),
        ));
    }
    // Found before anything starts, so a hub that cannot reach Kubernetes says so at once.
    let kube_config = if kube {
        Some(kube::Config::infer().await.map_err(|e| {
            Error::Invalid(format!(
                "--kube: no Kubernetes configuration (in-cluster service account or KUBECONFIG): {e}"
            ))
        })?)
    } else {
        None
    };
    if admin_token.is_none() && kube_config.is_none() {
        tracing::warn!("no --admin-token: the REST API is open to anyone who can reach it");
    }
    let join_token_file = join_token_file
        .map(|f| {
            crate::http::TokenFile::open(f)
                .map(std::sync::Arc::new)
                .map_err(|why| Error::Invalid(format!("--join-token-file {why}")))
        })
        .transpose()?;
    if join_token.is_none() && join_token_file.is_none() {
        tracing::warn!("no --join-token: any spoke that can reach the hub may register");
    }

    let db = Database::open(database.database_url.as_deref(), &database.data_dir).await?;
    tracing::info!(database = %db.url, embedded = db.is_embedded(), "database ready and migrated");
    if shutdown.requested().is_some() {
        // Asked to stop while the database was opening: nothing else was started yet.
        return db.close().await;
    }
    let metrics = Metrics::new()?;
    let engine = Engine::new(db.pool.clone(), Arc::new(SystemClock), metrics.clone());
    let driver = tokio::spawn(engine.clone().run());
    let releases = engine.clone();
    let upkeep = tokio::spawn(history_upkeep(
        db.pool.clone(),
        metrics.clone(),
        history_retention,
    ));
    // Kubernetes identities on the REST API: reviewed through a client of their own, not
    // held back by the rate limit of the controller's writes.
    let kube_auth = match &kube_config {
        Some(config) => Some(Arc::new(kubernetes::auth::KubeAuth::new(
            kube::Client::try_from(config.clone())
                .map_err(|e| Error::Invalid(format!("--kube: {e}")))?,
        ))),
        None => None,
    };
    let kube_task = match kube_config {
        Some(config) => {
            let identity = crate::engine::replica_name();
            let namespace = lease_namespace
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".into());
            // The Lease's renewals never wait behind the rate limit of the other writes (a
            // backlog of labels would otherwise cost this replica its Lease).
            let lease_client = kubernetes::client(config.clone(), &metrics, 5.0, 5)?;
            let client = kubernetes::client(config, &metrics, kube_qps, kube_burst)?;
            let ctx = Arc::new(kubernetes::Context {
                client,
                lease_client,
                pool: db.pool.clone(),
                engine: engine.clone(),
                metrics: metrics.clone(),
                clock: Arc::new(SystemClock),
                identity: identity.clone(),
            });
            tracing::info!(%identity, lease = %format!("{namespace}/{lease_name}"), "Kubernetes mode");
            let options = kubernetes::Options {
                namespaces: kube_namespaces,
                lease_namespace: namespace,
                lease_name,
            };
            let task = tokio::spawn(kubernetes::run(ctx.clone(), options.clone()));
            Some((task, ctx, options))
        }
        None => None,
    };
    let state = AppState {
        pool: db.pool.clone(),
        metrics,
        engine,
        admin_token,
        viewer_tokens,
        join_token,
        join_token_file,
        credential_ttl: cluster_credential_ttl,
        kube_auth,
    };
    let listener = bind(listen)
        .map_err(|source| Error::unavailable(&format!("listening on {listen}"), source))?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::unavailable(&format!("listening on {listen}"), source))?;
    tracing::info!(address = %local, tls = acceptor.is_some(), "fleet-hub listening");
    let stop = async move {
        shutdown.wait().await;
    };
    let served = http::listen::serve_tls(
        listener,
        http::router(state),
        http::listen::Limits::default(),
        acceptor,
        stop,
    )
    .await;
    tracing::info!("draining done, shutting down");
    driver.abort();
    // Passes stopped: the other replicas take this one's rollouts at once.
    releases.release().await;
    upkeep.abort();
    if let Some((task, ctx, options)) = kube_task {
        kubernetes::stop(task, &ctx, &options).await;
    }
    let closed = db.close().await;
    served.map_err(|source| Error::unavailable(&format!("listening on {local}"), source))?;
    closed
}

/// How often the history's partitions are made ahead and, with a retention, dropped.
const HISTORY_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Keeps the history partitioned by month, at start and every hour: next month's partition
/// made ahead, months older than the retention dropped (logged and counted).
async fn history_upkeep(pool: sqlx::PgPool, metrics: Metrics, retention: Option<chrono::Duration>) {
    let mut every = tokio::time::interval(HISTORY_UPKEEP_EVERY);
    loop {
        every.tick().await;
        match crate::store::history_upkeep(&pool, chrono::Utc::now(), retention).await {
            Ok(done) => {
                for part in &done.made {
                    tracing::info!(partition = %part, "history partition made ahead");
                }
                for part in &done.dropped {
                    tracing::info!(partition = %part, "history partition older than the retention dropped");
                }
                metrics
                    .history_partitions_dropped
                    .inc_by(done.dropped.len() as u64);
            }
            Err(err) => tracing::warn!(%err, "history upkeep failed; trying again in an hour"),
        }
    }
}

/// Connections the kernel holds for the hub while all its slots are taken (a fleet
/// connecting at once); the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 8192;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The viewer tokens of the flags and the file; they need an admin token (without one the API
/// is open, and a read-only token would be a promise the hub does not keep).
fn viewers(
    mut tokens: Vec<String>,
    file: Option<&std::path::Path>,
    admin: bool,
) -> Result<Vec<String>, Error> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::Invalid(format!("--viewer-token-file {}: {e}", file.display())))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    tokens.retain(|t| !t.is_empty());
    if !tokens.is_empty() && !admin {
        return Err(Error::Invalid(
            "--viewer-token needs --admin-token: without it the API is open to everyone".into(),
        ));
    }
    Ok(tokens)
}
