//! shelltrail's collector: every host's agent ships its sessions here, over
//! mutual TLS, and the CLI reads them back.
//!
//! * [`store`]: durable per-session storage with hash-chain checks on
//!   ingest, recovery of torn writes, verification and the catalogue.
//! * [`server`]: the gRPC services `Ingest` and `Query`
//!   (`proto/shelltrail/v1/collector.proto`).
//! * [`tls`]: the server's TLS configuration and the clients' connection
//!   helper (agents and the CLI use [`tls::connect`]).
//! * [`identity`]: a client certificate's name and role (host or operator).
//! * [`access`]: what each operator may do (the view and respond roles).
//! * [`audit`]: the append-only log of every read and action.
//! * [`hosts`]: the connected agents, and operators' orders for them.
//! * [`tail`]: a live session followed through the collector.
//!
//! [`serve`] runs it all from a [`CollectorConfig`], with gRPC server
//! reflection so generic tools can explore the API.
#![forbid(unsafe_code)]

pub mod access;
pub mod audit;
pub mod hosts;
pub mod identity;
pub mod server;
pub mod store;
pub mod tail;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use shelltrail_proto::v1::ingest_client::IngestClient;
use shelltrail_proto::v1::query_client::QueryClient;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};

pub use access::{Access, Need, RoleName};
pub use identity::{Grants, IdentityError, Peer, ROLE_URI_PREFIX, Role, host_from_certificate, peer_from_certificate};
pub use server::{Collector, MAX_MESSAGE_BYTES};
pub use store::{
    AppendOutcome, ListFilter, Position, Problem, Report, SeqRange, SessionSummary, StateFilter, Store, StoreError,
    StoreOptions, StoredChunk, valid_host, valid_session_id, verify_dir,
};
pub use tls::{ClientTlsFiles, TlsError, TlsFiles, client_tls_config, connect, endpoint, server_tls_config};

/// How long, after the shutdown signal, open connections get to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The collector's configuration: the `[collector]` table of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Where sessions are stored (see [`store`]).
    pub data_dir: PathBuf,
    /// Mutual TLS. Required unless `insecure`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Plaintext, no client authentication, and each agent's host taken from
    /// its own claim: for local development only. Logs a warning at start
    /// and on every connection.
    #[serde(default)]
    pub insecure: bool,
    /// Names of the operator certificates with the view role: list, read
    /// and tail sessions, read the audit log. A certificate needs both: the
    /// operator role (see [`identity`]) and a role here or in its own
    /// subjectAltNames (see [`access`]). Host certificates can ship, never
    /// read, whatever their name: a compromised host must not read the
    /// fleet's recordings.
    #[serde(default)]
    pub operators: Vec<String>,
    /// Operator names and their roles: `alice = ["view", "respond"]`.
    /// respond (end sessions, lock and unlock users) includes view.
    #[serde(default)]
    pub roles: std::collections::BTreeMap<String, Vec<RoleName>>,
    /// Operator names refused everything, whatever their certificates
    /// grant: without a revocation list, this is how a certificate is shut
    /// out before it expires.
    #[serde(default)]
    pub denied: Vec<String>,
    /// zstd level at which ended sessions are compacted into runs (see
    /// [`store::compact`]): 1 to 19; 0 leaves them as their chunks.
    #[serde(default = "default_compact_level")]
    pub compact_level: i32,
}

fn default_compact_level() -> i32 {
    StoreOptions::default().compact_level
}

/// Binds `cfg.listen` and runs the collector until `shutdown` completes.
pub async fn serve(cfg: CollectorConfig, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    serve_on(cfg, listener, shutdown).await
}

/// Runs the collector on an already bound listener (`cfg.listen` is then
/// ignored) until `shutdown` completes: tests bind port 0 and read the
/// address back, a service manager may hand over a socket.
pub async fn serve_on(
    cfg: CollectorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Both rustls providers may end up compiled in once other crates join
    // the build; rustls then refuses to choose. Ours is ring. An error only
    // means a provider was installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_open_file_limit();

    let tls = match (&cfg.tls, cfg.insecure) {
        (Some(_), true) => anyhow::bail!("collector: `tls` and `insecure = true` are both set; choose one"),
        (None, false) => anyhow::bail!(
            "collector: no `tls` (cert, key, client_ca) configured; set `insecure = true` only for local development"
        ),
        (Some(files), false) => Some(server_tls_config(files)?),
        (None, true) => None,
    };
    if !(0..=19).contains(&cfg.compact_level) {
        anyhow::bail!(
            "collector: compact_level = {} is not a zstd level from 1 to 19, or 0 for no compaction",
            cfg.compact_level
        );
    }
    let opts = StoreOptions {
        compact: cfg.compact_level > 0,
        compact_level: cfg.compact_level,
        ..StoreOptions::default()
    };
    let data_dir = cfg.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open_with(&data_dir, opts))
        .await
        .context("opening the store")?
        .with_context(|| format!("cannot open the data directory {}", cfg.data_dir.display()))?;
    let store = Arc::new(store);
    let released = Arc::downgrade(&store);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let audit = audit::AuditLog::open(&cfg.data_dir)?;
    let access = Access::new(&cfg.operators, &cfg.roles, &cfg.denied);
    let collector = Collector::new(store, audit, cfg.insecure, access, stop_rx);
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(shelltrail_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(shelltrail_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("gRPC reflection")?;

    let router = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(collector.ingest_service())
        .add_service(collector.query_service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // The router holds what it needs; ours must not keep the store alive.
    drop(collector);

    let local = listener.local_addr().ok();
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));

    // The shutdown signal first ends our long-lived streams (agents keep
    // theirs open for days), then the server drains for a bounded time.
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("collector shutting down");
        let _ = stop_tx.send(true);
        let _ = drain_tx.send(());
    };
    let drained = async move {
        let _ = drain_rx.await;
    };
    let server = async move {
        if let Some(tls) = tls {
            tracing::info!(listen = %server::addr(local), "collector listening (mutual TLS)");
            router
                .serve_with_incoming_shutdown(tls::accept(incoming, tls), drained)
                .await
        } else {
            tracing::warn!(
                listen = %server::addr(local),
                "INSECURE collector: plaintext, no client authentication, agents' hosts are their own claims. \
                 For local development only"
            );
            let incoming = incoming.map(|conn| {
                if let Ok(conn) = &conn {
                    tracing::warn!(peer = %server::addr(conn.peer_addr().ok()), "INSECURE collector: unauthenticated plaintext connection");
                }
                conn
            });
            router.serve_with_incoming_shutdown(incoming, drained).await
        }
    };
    let result = {
        tokio::pin!(server);
        tokio::pin!(signal);
        tokio::select! {
            r = &mut server => r.context("collector server"),
            () = &mut signal => match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
                Ok(r) => r.context("collector server"),
                Err(_) => {
                    tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after shutdown; closing them");
                    Ok(())
                }
            },
        }
    };
    // Streams and readers end on the shutdown signal; wait (briefly) for
    // them to let go of the store, so that its lock on the data directory
    // is released when this returns and a new collector can take it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while released.strong_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    result
}

/// Raises the soft limit on open files to the hard limit: every agent holds
/// a connection open, and the usual soft limit (1024) is reached long
/// before a thousand agents are.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(limit = soft, "cannot raise the open-file limit: {e}"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

/// An Ingest client on `channel`, accepting any message the collector may
/// send (tonic's default limit is 4 MiB).
pub fn ingest_client(channel: Channel) -> IngestClient<Channel> {
    IngestClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES + (64 << 10))
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A Query client on `channel`, accepting chunks as large as the collector
/// stores and listings of many sessions.
pub fn query_client(channel: Channel) -> QueryClient<Channel> {
    QueryClient::new(channel).max_decoding_message_size(64 << 20)
}
