//! Helpers shared by the collector's tests: real recordings (asciicast v3
//! lines from `shelltrail_cast::Encoder`, cut by `Chunker`) and session
//! messages.
#![allow(dead_code)]

use std::time::Duration;

use shelltrail_cast::{Chunk, Chunker, Encoder, Header};
use shelltrail_proto::v1::{Close, SessionEnd, SessionMeta, SessionStart};

/// A recorded session: its chunks and the asciicast text they hold.
pub struct Recording {
    pub id: String,
    pub chunks: Vec<Chunk>,
    /// The exact lines the encoder wrote, in order.
    pub text: Vec<u8>,
}

impl Recording {
    /// `(seq, bytes)` pairs for [`Store::append`].
    pub fn pairs(&self, seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, Vec<u8>)> {
        seqs.into_iter()
            .map(|s| (s, self.chunks[s as usize].bytes.clone()))
            .collect()
    }
}

/// A session of `n` chunks: a v3 header, then output lines.
pub fn recording(n: usize) -> Recording {
    recording_with_id(&uuid::Uuid::now_v7().to_string(), n, "")
}

/// Like [`recording`] with a given id, and `tag` in every line (two
/// recordings of one id with different tags differ in every chunk).
pub fn recording_with_id(id: &str, n: usize, tag: &str) -> Recording {
    let mut chunker = Chunker::new(id, 3);
    let mut enc = Encoder::new();
    let mut text = Vec::new();
    let mut chunks = Vec::new();
    let mut header = Header::new(80, 24);
    header.command = Some("/bin/bash".into());
    enc.header(&header, chunker.buffer());
    for i in 0..n as u64 {
        for j in 0..3 {
            let t = Duration::from_millis(i * 100 + j * 10);
            let line = format!("{tag}chunk {i} line {j}: \u{1b}[1mbold\u{1b}[0m\r\n");
            enc.output(t, line.as_bytes(), chunker.buffer());
        }
        text.extend_from_slice(chunker.buffer());
        chunks.push(chunker.cut(i * 100, i * 100 + 20).expect("pending lines"));
    }
    Recording {
        id: id.to_owned(),
        chunks,
        text,
    }
}

pub fn start_msg(id: &str, host: &str, user: &str, start_unix_ms: i64) -> SessionStart {
    SessionStart {
        meta: Some(SessionMeta {
            session_id: id.to_owned(),
            host: host.to_owned(),
            user: user.to_owned(),
            uid: 1000,
            mode: "pty".into(),
            start_unix_ms,
            ..Default::default()
        }),
        verified_uid: 1000,
        verified_user: user.to_owned(),
        verified_pid: 4242,
        opened_unix_ms: start_unix_ms,
    }
}

pub fn end_msg(id: &str, last_seq: u64, lost: Vec<u64>) -> SessionEnd {
    SessionEnd {
        session_id: id.to_owned(),
        close: Some(Close {
            exit_status: 0,
            last_seq,
            lost_seqs: lost,
            end_unix_ms: 2_000_000,
            ..Default::default()
        }),
        cause: "recorder".into(),
        closed_unix_ms: 2_000_001,
        seal: None,
    }
}

/// A session's recording as stored: `runs.zst` once the collector has
/// compacted the ended session, `chunks.zst` until then (either is a
/// `.cast.zst`). Compaction removes `chunks.zst` only after `runs.zst` is in
/// place, so looking twice always finds one.
pub fn stored_file(dir: &std::path::Path) -> Vec<u8> {
    for _ in 0..2 {
        for name in ["runs.zst", "chunks.zst"] {
            match std::fs::read(dir.join(name)) {
                Ok(b) => return b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("{}: {e}", dir.join(name).display()),
            }
        }
    }
    panic!("{} holds neither runs.zst nor chunks.zst", dir.display());
}

/// `end` sealed with `key` over `chunks` chunks ending in `final_hash`, as
/// an agent does (the start's verified identity included).
pub fn sealed(
    key: &shelltrail_proto::seal::SigningKey,
    start: &SessionStart,
    mut end: SessionEnd,
    chunks: u64,
    final_hash: [u8; 32],
    check: shelltrail_proto::v1::CloseCheck,
) -> SessionEnd {
    let facts = shelltrail_proto::seal::Facts::of(start, &end, chunks, final_hash);
    let problem = if check == shelltrail_proto::v1::CloseCheck::Disagreed {
        "chunk 7 never reached the agent"
    } else {
        ""
    };
    end.seal = Some(key.seal(&facts, "host-a", check, problem));
    end
}
