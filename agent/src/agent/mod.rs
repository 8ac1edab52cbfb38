//! `shelltrail agent`: the host daemon. Accepts recorders on the Unix socket
//! ([`server`], one [`conn`] each, within the [`limits`]), persists their
//! chunks in the [`spool`] and acknowledges what is durable; [`ship`] sends
//! them on to the collector.

pub mod conn;
pub mod control;
pub mod fallback;
pub mod limits;
pub mod live;
pub mod server;
pub mod ship;
pub mod signer;
pub mod spool;
pub mod watch;

pub use server::{Agent, run};

/// A channel to the collector named in `[ship]`: mutual TLS, or plaintext in
/// the explicit development mode (logged loudly every time).
pub async fn collector_channel(cfg: &crate::config::ShipConfig) -> anyhow::Result<tonic::transport::Channel> {
    if cfg.insecure {
        tracing::warn!(collector = %cfg.collector, "INSECURE: shipping recordings in plaintext without certificates ([ship] insecure = true)");
    }
    Ok(shelltrail_collector::tls::connect(&cfg.collector, ship_tls(cfg).as_ref()).await?)
}

/// Checks `[ship]` as shipping will use it, without connecting: the URL's
/// form and scheme, and the CA, certificate and key (readable by this user,
/// well-formed, the key private to its owner). `agent --check-config` warns
/// with it, so a mistake shows at start rather than only in retries.
pub fn check_ship(cfg: &crate::config::ShipConfig) -> Result<(), shelltrail_collector::tls::TlsError> {
    if cfg.collector.is_empty() {
        return Ok(());
    }
    shelltrail_collector::tls::endpoint(&cfg.collector, ship_tls(cfg).as_ref()).map(|_| ())
}

fn ship_tls(cfg: &crate::config::ShipConfig) -> Option<shelltrail_collector::tls::ClientTlsFiles> {
    (!cfg.insecure).then(|| shelltrail_collector::tls::ClientTlsFiles {
        ca: cfg.ca.clone(),
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
        domain: None,
    })
}
