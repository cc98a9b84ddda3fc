//! TLS for both servers: rustls (TLS 1.2 and 1.3, its safe defaults), the certificate and key
//! read from PEM files as the kube-apiserver's `--tls-cert-file` / `--tls-private-key-file`
//! are, and read again when either file changes (cert-manager renews them in place), without
//! a restart. A renewal that cannot be read keeps the certificate in use and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

/// The oldest TLS version a listener accepts (`--tls-min-version`, the kube-apiserver's
/// values). Ciphers are rustls' safe defaults either way.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMinVersion {
    #[default]
    #[value(name = "VersionTLS12")]
    Tls12,
    #[value(name = "VersionTLS13")]
    Tls13,
}

/// The serving certificate's files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub min_version: TlsMinVersion,
}

impl TlsFiles {
    /// Both flags or neither: one alone is an error naming the other.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert,
                key,
                min_version: TlsMinVersion::default(),
            })),
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

impl Reloading {
    /// The certificate to serve now: read again first when its files changed.
    fn current(&self) -> Arc<CertifiedKey> {
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
        current.2.clone()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The lowercase hex SHA-256 of a certificate's DER: what a spoke registers and the hub pins.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// A client certificate the listener verified against `--client-ca-file`: its DER and the
/// names it carries (its subject's common name, then its DNS names). Set as a request
/// extension on every request of that connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub names: Vec<String>,
}

impl ClientCert {
    pub fn from_der(der: &[u8]) -> ClientCert {
        let mut names = Vec::new();
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
            names.extend(
                cert.subject()
                    .iter_common_name()
                    .filter_map(|cn| cn.as_str().ok())
                    .map(str::to_string),
            );
            if let Ok(Some(san)) = cert.subject_alternative_name() {
                for name in &san.value.general_names {
                    if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                        names.push(dns.to_string());
                    }
                }
            }
        }
        ClientCert { names }
    }

    /// Whether the certificate names this cluster.
    pub fn names(&self, cluster: &str) -> bool {
        self.names.iter().any(|n| n == cluster)
    }
}

/// Whether `text` has the shape of a [`fingerprint`].
pub fn is_fingerprint(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A listener's certificate as it is served now (renewals included).
#[derive(Clone, Debug)]
pub struct ServingCert(Arc<Reloading>);

impl ServingCert {
    /// The [`fingerprint`] of the certificate the next handshake presents.
    pub fn fingerprint(&self) -> String {
        let key = self.0.current();
        key.cert.first().map(|c| fingerprint(c)).unwrap_or_default()
    }
}

/// An acceptor serving `files`, which must be readable now.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    serving(files).map(|(acceptor, _)| acceptor)
}

/// An acceptor serving `files`, and the handle that tells which certificate it serves.
pub fn serving(files: &TlsFiles) -> Result<(TlsAcceptor, ServingCert), String> {
    serving_with(files, None)
}

/// The CAs of a PEM bundle, for client certificates (`--client-ca-file`).
pub fn client_cas(path: &Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let name = path.display();
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(path).map_err(|e| format!("--client-ca-file {name}: {e}"))?
    {
        let cert = cert.map_err(|e| format!("--client-ca-file {name}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("--client-ca-file {name}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("--client-ca-file {name}: no CERTIFICATE in it"));
    }
    Ok(Arc::new(roots))
}

/// `serving`, also asking clients for a certificate signed by one of `client_cas`: one
/// that presents none still connects (and authenticates otherwise), one that presents
/// another is refused in the handshake.
pub fn serving_with(
    files: &TlsFiles,
    client_cas: Option<Arc<rustls::RootCertStore>>,
) -> Result<(TlsAcceptor, ServingCert), String> {
    let stamps = (modified(&files.cert), modified(&files.key));
    let key = load(files)?;
    let resolver = Arc::new(Reloading {
        files: files.clone(),
        current: Mutex::new((stamps.0, stamps.1, Arc::new(key))),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match files.min_version {
        TlsMinVersion::Tls12 => rustls::DEFAULT_VERSIONS,
        TlsMinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match client_cas {
        None => builder.with_no_client_auth(),
        Some(roots) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("--client-ca-file: {e}"))?,
        ),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), ServingCert(resolver)))
}

/// Trusts exactly one certificate, by its [`fingerprint`], whoever signed it and whatever
/// name it carries: how the hub reaches a spoke whose certificate it pinned at registration
/// (as SSH trusts a known host key). The handshake's signatures are still checked, so only
/// the holder of that certificate's key gets through.
#[derive(Debug)]
pub struct Pinned {
    sha256: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint(end_entity);
        if presented == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the spoke presented certificate sha256:{presented}, not the one it registered (sha256:{}); pushes wait until the agent registers its current certificate",
                self.sha256
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS refusal behind a failed request, if that is what it was, in words: a refused pin
/// says why, other refusals as rustls puts them ("invalid peer certificate: UnknownIssuer").
pub fn refusal(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(err);
    while let Some(e) = source {
        match e.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::General(why)) => return Some(why.clone()),
            Some(other) => return Some(other.to_string()),
            None => {}
        }
        // An I/O error's `source` skips the error it wraps (connectors nest two).
        source = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// A client configuration that trusts only the certificate of this [`fingerprint`].
pub fn pinned_client(sha256: &str) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Pinned {
        sha256: sha256.to_ascii_lowercase(),
        provider: provider.clone(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
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
