//! `shelltrail agent`: the host daemon. Accepts recorders on the Unix socket,
//! persists their chunks in the [`spool`] and acknowledges what is durable.

pub mod server;
pub mod spool;

pub use server::{Agent, run};
