//! `shelltrail agent`: the host daemon. Accepts recorders on the Unix socket,
//! persists their chunks in the [`spool`] and acknowledges what is durable.

pub mod server;
pub mod ship;
pub mod spool;

pub use server::{Agent, run};

/// A channel to the collector named in `[ship]`: mutual TLS, or plaintext in
/// the explicit development mode (logged loudly every time).
pub async fn collector_channel(cfg: &crate::config::ShipConfig) -> anyhow::Result<tonic::transport::Channel> {
    use shelltrail_collector::tls::{ClientTlsFiles, connect};
    let tls = if cfg.insecure {
        tracing::warn!(collector = %cfg.collector, "INSECURE: shipping recordings in plaintext without certificates ([ship] insecure = true)");
        None
    } else {
        Some(ClientTlsFiles {
            ca: cfg.ca.clone(),
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            domain: None,
        })
    };
    Ok(connect(&cfg.collector, tls.as_ref()).await?)
}
