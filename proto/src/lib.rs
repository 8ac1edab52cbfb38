//! shelltrail's wire messages.
//!
//! * [`v1`]: the protobuf messages generated from `shelltrail/v1/*.proto`,
//!   with the tonic server and client of the collector's gRPC services
//!   (`v1::ingest_server`, `v1::ingest_client`, `v1::query_server`,
//!   `v1::query_client`).
//! * [`framing`]: the one length framing used on the local recorder socket.
//! * [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of every message and
//!   service, for gRPC server reflection.
#![forbid(unsafe_code)]

pub mod framing;

/// Generated from `proto/shelltrail/v1/*.proto`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/shelltrail.v1.rs"));
}

/// The encoded `google.protobuf.FileDescriptorSet` of `shelltrail/v1/*.proto`.
///
/// The collector registers it with tonic-reflection so that generic gRPC
/// tools (grpcurl, grpcui) can call it without a copy of the .proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/shelltrail_descriptor.bin"));

pub use prost::Message;
