//! shelltrail's wire messages.
//!
//! * [`v1`]: the protobuf messages generated from `shelltrail/v1/*.proto`,
//!   with the tonic server and client of the collector's gRPC services
//!   (`v1::ingest_server`, `v1::ingest_client`, `v1::query_server`,
//!   `v1::query_client`).
//! * [`framing`]: the one length framing used on the local recorder socket.
//! * [`seal`]: what a session's seal signs, and signing and checking it.
//! * [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of every message and
//!   service, for gRPC server reflection.
#![forbid(unsafe_code)]

pub mod framing;
pub mod hex_bytes;
pub mod seal;

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

#[cfg(test)]
mod tests {
    use super::v1::{Close, SessionEnd, SessionMeta, SessionStart};

    #[test]
    fn descriptor_set_describes_both_protocols() {
        let fds = super::FILE_DESCRIPTOR_SET;
        let has = |needle: &[u8]| fds.windows(needle.len()).any(|w| w == needle);
        for name in [
            b"shelltrail/v1/recorder.proto".as_slice(),
            b"shelltrail/v1/collector.proto",
            b"Ingest",
            b"Query",
            b"ReadChunks",
            b"SessionMeta",
        ] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn collector_records_round_trip_through_json() {
        let start = SessionStart {
            meta: Some(SessionMeta {
                session_id: "s".into(),
                user: "alice".into(),
                ..Default::default()
            }),
            verified_uid: 1000,
            verified_user: "alice".into(),
            verified_pid: 7,
            opened_unix_ms: 1,
        };
        let json = serde_json::to_string(&start).unwrap();
        assert_eq!(serde_json::from_str::<SessionStart>(&json).unwrap(), start);
        // Hashes, keys and signatures read as hex.
        let sealed = SessionEnd {
            session_id: "s".into(),
            seal: Some(super::v1::Seal {
                final_hash: vec![0xab; 32],
                signature: vec![1, 2],
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&sealed).unwrap();
        assert!(json.contains(&"ab".repeat(32)) && json.contains("\"0102\""), "{json}");
        assert_eq!(serde_json::from_str::<SessionEnd>(&json).unwrap(), sealed);
        // Fields added later default when absent.
        let old: SessionEnd = serde_json::from_str(r#"{"session_id":"s","close":{"last_seq":3}}"#).unwrap();
        assert_eq!(
            old.close,
            Some(Close {
                last_seq: 3,
                ..Default::default()
            })
        );
    }
}
