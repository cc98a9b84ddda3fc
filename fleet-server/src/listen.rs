//! The accept loop of the hub's HTTP server. Each open connection costs the hub some 70 KiB
//! (hyper's buffers, grown to the size of a report), and axum's own `serve` accepts every
//! connection at once: ten thousand spokes connecting together held 750 MiB. Here at most
//! `MAX_CONNECTIONS` are open; the rest wait in the kernel's listen queue, and a keep-alive
//! connection idle longer than `IDLE` is closed, so steady state follows the spokes that are
//! actually talking (a rollout's running batches), not the size of the fleet. A connection
//! accepted when fewer than a quarter of the slots are free may stay idle only `BUSY_IDLE`:
//! after a registration storm the slots are otherwise held by idle connections for `IDLE`
//! while a spoke whose connection the kernel already accepted waits just as long for its
//! answer (the 10,000-cluster benchmark stalled for 8 s on it).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower_http::add_extension::AddExtension;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 2048;
/// A keep-alive connection with no new request for this long is closed (and a request whose
/// headers take this long is dropped). Spokes drop their idle connections sooner (5 s).
pub const IDLE: Duration = Duration::from_secs(10);
/// The idle limit of a connection accepted while the hub is near `MAX_CONNECTIONS`.
pub const BUSY_IDLE: Duration = Duration::from_secs(1);
/// How long a drain waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(30);

/// How many connections, and how long one may stay idle.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub idle: Duration,
    /// The idle limit of a connection accepted when fewer than a quarter of the slots are free.
    pub busy_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            idle: IDLE,
            busy_idle: BUSY_IDLE,
        }
    }
}

/// Open files a server needs: its connections, those it opens (the database, pushes, the
/// hub), and its own files.
pub const OPEN_FILES_WANTED: u64 = MAX_CONNECTIONS as u64 * 2;

/// Raises the soft limit of open files to the hard limit, as every connection is a file (a
/// default soft limit of 1024 turned a fleet's registrations into `Too many open files`),
/// and says in the log when even the hard limit is below `wanted`. Answers the limit now.
pub fn raise_open_files(wanted: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(err) => {
            tracing::warn!(%err, "reading the open-file limit failed");
            return 0;
        }
    };
    let now = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(err) => {
                tracing::warn!(%err, soft, hard, "raising the open-file limit failed");
                soft
            }
        }
    } else {
        soft
    };
    if now < wanted {
        tracing::warn!(
            limit = now,
            wanted,
            "the open-file limit is below what the connection limits need: raise it (ulimit -Hn, LimitNOFILE=)"
        );
    } else {
        tracing::debug!(limit = now, "open-file limit");
    }
    now
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves `app` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(listener, app, Limits::default(), shutdown).await
}

pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_tls(listener, app, limits, None, shutdown).await
}

/// `serve_with`, speaking only TLS when given an acceptor.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let graceful = GracefulShutdown::new();
    let builder = |idle: Duration| {
        let mut b = Builder::new(TokioExecutor::new());
        b.http1().timer(TokioTimer::new()).header_read_timeout(idle);
        b
    };
    let (relaxed, busy) = (builder(limits.idle), builder(limits.busy_idle));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: the listener itself is fine.
                    tracing::warn!(%err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // The client's address, for handlers that note it (axum's `ConnectInfo`).
        let app = AddExtension::new(app.clone(), axum::extract::ConnectInfo(peer));
        let builder = if slots.available_permits() * 4 < max {
            &busy
        } else {
            &relaxed
        };
        let Some(acceptor) = &tls else {
            let service = TowerToHyperService::new(app);
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
                drop(slot);
            });
            continue;
        };
        // The handshake in the connection's own task: a slow client holds only its slot.
        let (acceptor, builder, watcher) = (acceptor.clone(), builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%err, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            // A client certificate the handshake verified names the client to every request.
            let client = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|der| crate::tls::ClientCert::from_der(der));
            let service = TowerToHyperService::new(AddExtension::new(app, client));
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let _ = watcher.watch(conn).await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after {DRAIN:?}; stopping anyway");
    }
    Ok(())
}
