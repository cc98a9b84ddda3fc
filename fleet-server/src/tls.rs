//! TLS for both servers: rustls (TLS 1.2 and 1.3, its safe defaults), the certificate and key
//! read from PEM files as the kube-apiserver's `--tls-cert-file` / `--tls-private-key-file`
//! are, and read again when either file changes (cert-manager renews them in place), without
//! a restart. A renewal that cannot be read keeps the certificate in use and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// The serving certificate's files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Both flags or neither: one alone is an error naming the other.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => Err("--tls-cert-file needs --tls-private-key-file".into()),
            (None, Some(_)) => Err("--tls-private-key-file needs --tls-cert-file".into()),
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads the certificate chain and key; the error names the file and what is wrong.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let name = |p: &Path| p.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("--tls-cert-file {}: {e}", name(&files.cert)))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert-file {}: {e}", name(&files.cert)))?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert-file {}: no CERTIFICATE in it",
            name(&files.cert)
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("--tls-private-key-file {}: {e}", name(&files.key)))?;
    let signer = any_supported_type(&key)
        .map_err(|e| format!("--tls-private-key-file {}: {e}", name(&files.key)))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "--tls-private-key-file {} is not the key of --tls-cert-file {}: {e}",
            name(&files.key),
            name(&files.cert)
        )
    })?;
    Ok(certified)
}

/// The serving certificate, read again when its files change.
#[derive(Debug)]
struct Reloading {
    files: TlsFiles,
    current: Mutex<(Option<SystemTime>, Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let stamps = (modified(&self.files.cert), modified(&self.files.key));
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if (current.0, current.1) != stamps {
            match load(&self.files) {
                Ok(key) => {
                    tracing::info!(cert = %self.files.cert.display(), "serving certificate reloaded");
                    *current = (stamps.0, stamps.1, Arc::new(key));
                }
                Err(why) => {
                    // Half-written during a renewal, or wrong: keep serving the one in use.
                    tracing::warn!(%why, "the changed serving certificate cannot be used yet");
                    current.0 = stamps.0;
                    current.1 = stamps.1;
                }
            }
        }
        Some(current.2.clone())
    }
}

/// An acceptor serving `files`, which must be readable now.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let stamps = (modified(&files.cert), modified(&files.key));
    let key = load(files)?;
    let resolver = Reloading {
        files: files.clone(),
        current: Mutex::new((stamps.0, stamps.1, Arc::new(key))),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener without TLS on an address other hosts reach is refused unless asked for: the
/// tokens and every pushed stage would cross the network in clear text.
pub fn check_plain_http(
    listen: std::net::SocketAddr,
    tls: &Option<TlsFiles>,
    insecure_http: bool,
) -> Result<(), String> {
    if tls.is_none() && !insecure_http && !listen.ip().is_loopback() {
        return Err(format!(
            "--listen {listen} is reachable from other hosts: give --tls-cert-file and --tls-private-key-file, or --insecure-http to serve plain HTTP there"
        ));
    }
    Ok(())
}
