//! The spool's records: what each kind says, and how it is encoded.
//!
//! ```text
//! body = kind:u8 payload
//!   kind 1 OPEN    JSON OpenRecord   (metadata + what SO_PEERCRED proved)
//!   kind 2 CHUNK   session uuid (16) seq:u64le chunk-bytes    (older agents; read only)
//!   kind 3 CLOSE   JSON CloseRecord  (exit status, last seq, lost chunks, cause, seal)
//!   kind 4 DAMAGED JSON DamagedRecord (a session found damaged: quarantined)
//!   kind 5 CHUNK   session uuid (16) seq:u64le link-hash (32) chunk-bytes
//!   kind 6 STATE   JSON StateRecord  (a session's state, carried forward)
//!   kind 7 SHIPPED JSON ShippedRecord (the collector holds the whole session)
//! ```
//! A chunk record carries the chunk's link hash (checked on arrival), so a
//! session's resume point is read from the spool's records, never found
//! again by decompressing a chunk.

use serde::{Deserialize, Serialize};
use shelltrail_proto::v1::{Close, Seal, SessionEnd, SessionMeta, SessionStart};

pub const KIND_OPEN: u8 = 1;
pub const KIND_CHUNK_V1: u8 = 2;
pub const KIND_CLOSE: u8 = 3;
pub const KIND_DAMAGED: u8 = 4;
pub const KIND_CHUNK: u8 = 5;
pub const KIND_STATE: u8 = 6;
pub const KIND_SHIPPED: u8 = 7;
/// Bytes of a chunk record's body before the chunk: kind, session, seq, hash.
pub const CHUNK_RECORD_OVERHEAD: u64 = 1 + 16 + 8 + 32;

/// OPEN: what the recorder claimed, and what the agent knows for certain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenRecord {
    pub meta: SessionMeta,
    /// The session's uid as the agent established it: the connection's
    /// (SO_PEERCRED), or, for a connection of the recorder's own user, the
    /// uid the recorder names (see `via_recorder_uid`). Limits and quotas
    /// count against it.
    pub peer_uid: u32,
    /// From SO_PEERCRED: the pid of the recorder process.
    pub peer_pid: i32,
    /// The login name of `peer_uid`, looked up by the agent.
    pub peer_user: String,
    /// Set when the connection came from `recorder_user` (SO_PEERCRED said
    /// this uid): the set-uid recorder, believed about the session's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_recorder_uid: Option<u32>,
    /// Start time of the recorder process (/proc/PID/stat), to tell a vanished
    /// recorder from a new process that reused its pid.
    pub peer_start_ticks: u64,
    pub opened_unix_ms: i64,
    /// Written by agents before STATE records: where a carried-forward
    /// session continued (next seq, hex link hash). Read, never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<(u64, String)>,
}

/// CLOSE: how the session ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloseRecord {
    pub session_id: String,
    pub close: Close,
    /// "recorder": the recorder said so. "recorder vanished": it died without closing.
    pub cause: String,
    pub closed_unix_ms: i64,
    /// The agent's signature over the session's chain and this end (see
    /// `agent::signer`). None: written by an agent older than sealing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<Seal>,
}

/// DAMAGED: the agent found the session's stored recording damaged (at
/// start-up, or when shipping could not read a chunk). It is quarantined:
/// listed as damaged, never shipped, its segments kept for an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DamagedRecord {
    pub session_id: String,
    pub reason: String,
    pub unix_ms: i64,
}

/// STATE: everything the spool must remember of a session whose older
/// records are about to be deleted (their segment is fully shipped): its
/// start, where its chain stands, its end if it has one, and whether the
/// collector already holds all of it. Small and bounded: a session open for
/// days costs one of these per segment the spool retires, not its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    pub open: OpenRecord,
    /// Next seq and hex link hash of the chunk before it.
    pub resume: (u64, String),
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close: Option<CloseRecord>,
    #[serde(default)]
    pub shipped: bool,
}

/// SHIPPED: the collector committed the session whole, end included. From
/// here the host lists it as shipped and never ships it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShippedRecord {
    pub session_id: String,
    pub unix_ms: i64,
}

impl OpenRecord {
    /// The start as shipped to the collector: what the agent verified is
    /// what a seal signs (uid, user, open time), read back from either copy.
    pub fn to_start(&self) -> SessionStart {
        SessionStart {
            meta: Some(self.meta.clone()),
            verified_uid: self.peer_uid,
            verified_user: self.peer_user.clone(),
            verified_pid: self.peer_pid,
            opened_unix_ms: self.opened_unix_ms,
        }
    }

    pub fn id(&self) -> &str {
        &self.meta.session_id
    }
}

impl CloseRecord {
    /// The end as shipped to the collector.
    pub fn to_end(&self) -> SessionEnd {
        SessionEnd {
            session_id: self.session_id.clone(),
            close: Some(self.close.clone()),
            cause: self.cause.clone(),
            closed_unix_ms: self.closed_unix_ms,
            seal: self.seal.clone(),
        }
    }
}

/// One record, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Open(OpenRecord),
    Chunk {
        session: String,
        seq: u64,
        /// None for records of older agents, which did not store it.
        hash: Option<[u8; 32]>,
        /// Bytes of chunk data (compressed).
        len: u64,
    },
    Close(CloseRecord),
    Damaged(DamagedRecord),
    State(Box<StateRecord>),
    Shipped(ShippedRecord),
}

impl Record {
    /// The session the record belongs to.
    pub fn session(&self) -> &str {
        match self {
            Record::Open(r) => r.id(),
            Record::Chunk { session, .. } => session,
            Record::Close(r) => &r.session_id,
            Record::Damaged(r) => &r.session_id,
            Record::State(r) => r.open.id(),
            Record::Shipped(r) => &r.session_id,
        }
    }

    /// Decodes a record body (chunk bytes are not copied: see [`chunk_data`]).
    pub fn decode(body: &[u8]) -> Result<Record, String> {
        let (kind, payload) = body.split_first().ok_or("empty body")?;
        let json = |what: &str| format!("{what} record: bad JSON");
        Ok(match *kind {
            KIND_OPEN => Record::Open(serde_json::from_slice(payload).map_err(|e| format!("{}: {e}", json("start")))?),
            KIND_CLOSE => Record::Close(serde_json::from_slice(payload).map_err(|e| format!("{}: {e}", json("end")))?),
            KIND_DAMAGED => {
                Record::Damaged(serde_json::from_slice(payload).map_err(|e| format!("{}: {e}", json("damage")))?)
            }
            KIND_STATE => Record::State(Box::new(
                serde_json::from_slice(payload).map_err(|e| format!("{}: {e}", json("state")))?,
            )),
            KIND_SHIPPED => {
                Record::Shipped(serde_json::from_slice(payload).map_err(|e| format!("{}: {e}", json("shipped")))?)
            }
            KIND_CHUNK | KIND_CHUNK_V1 => {
                let head = if *kind == KIND_CHUNK { 56 } else { 24 };
                if payload.len() < head {
                    return Err("short chunk record".into());
                }
                let session = uuid::Uuid::from_slice(&payload[..16])
                    .map_err(|e| e.to_string())?
                    .to_string();
                let seq = u64::from_le_bytes(payload[16..24].try_into().expect("8"));
                let hash = (*kind == KIND_CHUNK).then(|| payload[24..56].try_into().expect("32"));
                Record::Chunk {
                    session,
                    seq,
                    hash,
                    len: (payload.len() - head) as u64,
                }
            }
            k => return Err(format!("unknown record kind {k}")),
        })
    }
}

/// The chunk bytes of a chunk record's body.
pub fn chunk_data(body: &[u8]) -> Option<&[u8]> {
    match body.first() {
        Some(&KIND_CHUNK) if body.len() >= CHUNK_RECORD_OVERHEAD as usize => {
            Some(&body[CHUNK_RECORD_OVERHEAD as usize..])
        }
        Some(&KIND_CHUNK_V1) if body.len() >= 25 => Some(&body[25..]),
        _ => None,
    }
}

fn json_body(kind: u8, value: &impl Serialize) -> Vec<u8> {
    let mut b = vec![kind];
    serde_json::to_writer(&mut b, value).expect("serialising to a Vec cannot fail");
    b
}

pub fn open_body(r: &OpenRecord) -> Vec<u8> {
    json_body(KIND_OPEN, r)
}

pub fn close_body(r: &CloseRecord) -> Vec<u8> {
    json_body(KIND_CLOSE, r)
}

pub fn damaged_body(r: &DamagedRecord) -> Vec<u8> {
    json_body(KIND_DAMAGED, r)
}

pub fn state_body(r: &StateRecord) -> Vec<u8> {
    json_body(KIND_STATE, r)
}

pub fn shipped_body(r: &ShippedRecord) -> Vec<u8> {
    json_body(KIND_SHIPPED, r)
}

/// A chunk record: the recorder's chunk verbatim, with the link hash the
/// agent checked it against.
pub fn chunk_body(session: &uuid::Uuid, seq: u64, hash: &[u8; 32], chunk: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(CHUNK_RECORD_OVERHEAD as usize + chunk.len());
    b.push(KIND_CHUNK);
    b.extend_from_slice(session.as_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(hash);
    b.extend_from_slice(chunk);
    b
}

/// Parses a resume point's hex hash.
pub fn parse_hash(hex_hash: &str) -> Option<[u8; 32]> {
    hex::decode(hex_hash).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let id = uuid::Uuid::now_v7();
        let body = chunk_body(&id, 7, &[3; 32], b"data");
        assert_eq!(
            Record::decode(&body).unwrap(),
            Record::Chunk {
                session: id.to_string(),
                seq: 7,
                hash: Some([3; 32]),
                len: 4
            }
        );
        assert_eq!(chunk_data(&body), Some(&b"data"[..]));
        let shipped = ShippedRecord {
            session_id: id.to_string(),
            unix_ms: 5,
        };
        assert_eq!(
            Record::decode(&shipped_body(&shipped)).unwrap(),
            Record::Shipped(shipped)
        );
        assert!(
            Record::decode(&[9, 1, 2])
                .unwrap_err()
                .contains("unknown record kind 9")
        );
        assert!(Record::decode(&[KIND_CHUNK, 1, 2]).unwrap_err().contains("short"));
    }
}
