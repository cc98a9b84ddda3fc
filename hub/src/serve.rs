//! `fleet-hub serve`: open the database (migrating it), serve HTTP until SIGTERM or Ctrl-C,
//! then drain and stop the embedded database.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::cli::ServeArgs;
use crate::db::Database;
use crate::engine::{Engine, SystemClock};
use crate::error::Error;
use crate::http::{self, AppState};
use crate::metrics::Metrics;

pub async fn run(args: ServeArgs) -> Result<(), Error> {
    let ServeArgs {
        listen,
        database,
        admin_token,
        join_token,
        kube,
    } = args;
    // Refuse what this build cannot do yet rather than accept it silently.
    if kube {
        return Err(Error::NotImplemented(
            "--kube (Kubernetes mode) is not in this build; run without it",
        ));
    }
    if admin_token.is_none() {
        tracing::warn!("no --admin-token: the REST API is open to anyone who can reach it");
    }
    if join_token.is_none() {
        tracing::warn!("no --join-token: any spoke that can reach the hub may register");
    }

    let db = Database::open(database.database_url.as_deref(), &database.data_dir).await?;
    tracing::info!(database = %db.url, embedded = db.is_embedded(), "database ready and migrated");
    let metrics = Metrics::new()?;
    let engine = Engine::new(db.pool.clone(), Arc::new(SystemClock), metrics.clone());
    let driver = tokio::spawn(engine.clone().run());
    let state = AppState {
        pool: db.pool.clone(),
        metrics,
        engine,
        admin_token,
        join_token,
    };
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Listen {
        addr: listen.to_string(),
        source,
    })?;
    tracing::info!(address = %local, "fleet-hub listening");
    let served = axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    tracing::info!("draining done, shutting down");
    driver.abort();
    let closed = db.close().await;
    served.map_err(|source| Error::Listen {
        addr: local.to_string(),
        source,
    })?;
    closed
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
