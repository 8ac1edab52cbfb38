//! Mutual TLS for the collector and its clients (agents, the CLI).
//!
//! The collector proves itself with a server certificate; every client
//! proves itself with a client certificate signed by the collector's client
//! CA, and the TLS layer refuses a connection without one before any gRPC
//! is spoken. What a verified certificate may do (its name and role) is
//! [`crate::identity`]'s business.
//!
//! TLS is rustls with the ring provider: no OpenSSL. The files are PEM;
//! they are read and parsed up front so that a wrong path or a key in the
//! certificate's place is reported at start-up, not at the first handshake.
//!
//! The collector accepts TLS itself ([`accept`]) rather than through tonic's
//! `tls_config`, which drops a failed handshake with a debug line: a refused
//! client (no certificate, one from another CA, an expired one) is a
//! security event, logged with its address and the reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A TLS handshake that takes longer is dropped (a client that connects and
/// says nothing must not hold a connection slot).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once: a flood of silent connections
/// waits in the listen queue instead of taking every file descriptor.
const MAX_HANDSHAKES: usize = 256;
/// How long a client waits for the TCP connection and the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // The cause is in the message, so it is not also the `source`: printed
    // with its chain (`{:#}`), it would appear twice.
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: {why}")]
    Pem { path: PathBuf, why: String },
    #[error(
        "{path} is open to other users (mode {mode:04o}, owner uid {owner}): whoever can read it can pose as \
         its owner. Make it owned and readable by the user that uses it only, e.g. `chown shelltrail {path} && \
         chmod 0400 {path}` for the agent or collector, `chmod 0600` for an operator's own key (an ACL also \
         shows in the group bits)"
    )]
    KeyExposed { path: PathBuf, mode: u32, owner: u32 },
    #[error("invalid collector URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("TLS configuration refused: {0}")]
    Config(String),
    /// The causes (refused, no route, a TLS alert) are in `source`'s chain:
    /// print it with [`with_causes`]. Kept as errors, not text, so callers can
    /// tell a closed connection from a refused certificate.
    #[error("cannot connect to {url}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
}

/// The collector's side: its certificate and key, and the CA that signs
/// client certificates (agents and operators). The `[collector.tls]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain of the collector (leaf first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM certificate(s) of the CA(s) that sign client certificates.
    pub client_ca: PathBuf,
}

/// A client's side: the CA that signed the collector's certificate, and the
/// client's own certificate and key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsFiles {
    /// PEM certificate(s) of the CA that signed the collector's certificate.
    pub ca: PathBuf,
    /// PEM certificate chain of this client (for an agent: naming its host).
    pub cert: PathBuf,
    /// PEM private key of this client.
    pub key: PathBuf,
    /// The name to check the collector's certificate against, when it is
    /// not the host in the URL (connecting by IP address, for instance).
    #[serde(default)]
    pub domain: Option<String>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Reads a PEM file that must hold at least one certificate.
fn read_certs(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            why: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            why: "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(pem)
}

/// Reads a PEM file that must hold a private key.
fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let read_err = |error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    };
    // One open: the mode checked is that of the bytes read.
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    // As sshd does with private keys: one that other users can read (or
    // replace) is no longer this machine's secret (an operator in the
    // service's group could pose as the host and write its sessions).
    // Root may read a key that is the service user's own (`agent
    // --check-config` run by an admin); anyone else reads only their own or
    // root's.
    let mode = meta.mode() & 0o777;
    let me = nix::unistd::geteuid().as_raw();
    if mode & 0o077 != 0 || (me != 0 && meta.uid() != me && meta.uid() != 0) {
        return Err(TlsError::KeyExposed {
            path: path.to_path_buf(),
            mode,
            owner: meta.uid(),
        });
    }
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(read_err)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        why: format!("holds no usable private key: {e}"),
    })?;
    Ok(pem)
}

/// The DER of a PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`) from a
/// PEM file only its owner can read, checked as [`read_key`] checks TLS
/// keys: the host's session-signing key is held to the same rule.
/// When the first certificate in the PEM file at `path` stops being valid
/// (seconds since the epoch), for `shelltrail doctor`.
pub fn certificate_not_after(path: &Path) -> Result<i64, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let pem = read(path)?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| TlsError::Pem {
            path: path.to_path_buf(),
            why: "no certificate in it".into(),
        })?
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    Ok(cert.validity().not_after.timestamp())
}

pub fn read_pkcs8_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read_key(path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(PrivateKeyDer::Pkcs8(k)) => Ok(k.secret_pkcs8_der().to_vec()),
        _ => Err(TlsError::Pem {
            path: path.to_path_buf(),
            why: "holds no PKCS#8 private key (-----BEGIN PRIVATE KEY-----)".into(),
        }),
    }
}

/// The server's TLS configuration: its identity, client certificates
/// required and verified against the client CA, HTTP/2 by ALPN.
pub fn server_tls_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem_err = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let certs = CertificateDer::pem_slice_iter(&read_certs(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(&files.cert, e))?;
    let key = PrivateKeyDer::from_pem_slice(&read_key(&files.key)?).map_err(|e| pem_err(&files.key, e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read_certs(&files.client_ca)?) {
        let ca = ca.map_err(|e| pem_err(&files.client_ca, e))?;
        roots.add(ca).map_err(|e| TlsError::Pem {
            path: files.client_ca.clone(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("client CA {}: {e}", files.client_ca.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("{} and {}: {e}", files.cert.display(), files.key.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Connections from `incoming` that complete a TLS handshake under `config`
/// within [`HANDSHAKE_TIMEOUT`]; each refused one is logged (peer address
/// and reason) and dropped. Handshakes run concurrently, so a slow or
/// silent client holds up nobody. Stops accepting once the returned stream
/// is dropped.
pub fn accept(
    mut incoming: TcpIncoming,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
                () = tx.closed() => return,
            };
            let tcp = tokio::select! {
                next = incoming.next() => match next {
                    Some(Ok(tcp)) => tcp,
                    Some(Err(e)) => {
                        // Out of file descriptors, typically: do not spin.
                        tracing::warn!("cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    None => return,
                },
                () = tx.closed() => return,
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let peer = tcp
                    .peer_addr()
                    .map_or_else(|_| "an unknown address".to_owned(), |a| a.to_string());
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, "refused a TLS connection: {e}"),
                    Err(_) => {
                        tracing::warn!(%peer, "refused a TLS connection: no handshake within {HANDSHAKE_TIMEOUT:?}")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A client's TLS configuration: the collector's CA and the client's identity.
pub fn client_tls_config(files: &ClientTlsFiles) -> Result<ClientTlsConfig, TlsError> {
    let ca = read_certs(&files.ca)?;
    let cert = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .timeout(CONNECT_TIMEOUT);
    if let Some(domain) = &files.domain {
        cfg = cfg.domain_name(domain.clone());
    }
    Ok(cfg)
}

/// An endpoint for the collector at `url`: `https://host:port` with `tls`
/// (mutual TLS), or `http://host:port` without (the collector's insecure
/// development mode). Mixing them up is an error rather than a silent
/// plaintext connection. Callers may tune it further before connecting.
pub fn endpoint(url: &str, tls: Option<&ClientTlsFiles>) -> Result<Endpoint, TlsError> {
    let url_err = |why: &str| TlsError::Url {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let https = url.starts_with("https://");
    match (tls.is_some(), https, url.starts_with("http://")) {
        (true, false, _) => return Err(url_err("TLS is configured: the URL must start with https://")),
        (false, true, _) => {
            return Err(url_err("an https:// URL needs the TLS files (CA, certificate, key)"));
        }
        (false, false, false) => {
            return Err(url_err(
                "the URL must start with https:// (or http:// in insecure mode)",
            ));
        }
        _ => {}
    }
    let mut ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| url_err(&e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // A dead link (a black hole, a vanished collector) is noticed within
        // about 20 s; meanwhile the agent's spool keeps everything.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(files) = tls {
        ep = ep
            .tls_config(client_tls_config(files)?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
    }
    Ok(ep)
}

/// An error and its causes, once each: tonic's say "transport error" and
/// keep the reason (refused, no route, certificate) in their sources, some
/// of which repeat their own source in their message.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Connects to the collector at `url`; see [`endpoint`].
pub async fn connect(url: &str, tls: Option<&ClientTlsFiles>) -> Result<Channel, TlsError> {
    endpoint(url, tls)?.connect().await.map_err(|source| TlsError::Connect {
        url: url.to_owned(),
        source,
    })
}
