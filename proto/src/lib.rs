//! shelltrail's wire messages.
//!
//! * [`v1`]: the protobuf messages generated from `shelltrail/v1/*.proto`.
//! * [`framing`]: the one length framing used on the local recorder socket.
#![forbid(unsafe_code)]

pub mod framing;

/// Generated from `proto/shelltrail/v1/*.proto`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/shelltrail.v1.rs"));
}

pub use prost::Message;
