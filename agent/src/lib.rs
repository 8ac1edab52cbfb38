//! shelltrail: records every SSH session on a host.
//!
//! ```text
//! sshd --ForceCommand--> shelltrail-shell      [shell]   set-uid to its own user; PTY or pipes
//!        | asciicast v3 events, zstd chunks     [shelltrail_cast]
//!        v Unix socket, acked                   [shelltrail_proto::framing]
//! shelltrail agent                              [agent]   durable spool, group commit
//!        v
//! shelltrail sessions / export / play           [cli]     read the spool
//! ```
#![deny(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod config;
pub mod pki;
pub mod shell;
pub mod sys;
pub mod trusted_file;
