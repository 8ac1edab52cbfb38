//! Compaction of ended sessions into runs: what it stores, that everything
//! reads and verifies the same afterwards, that tampering with a run is
//! named, and that a crash at any point of its commit leaves one
//! consistent session.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{end_msg, recording, start_msg};
use shelltrail_cast::run;
use shelltrail_collector::{Problem, Store, StoreOptions, verify_dir};

const HOST: &str = "host-a";

fn open(dir: &Path, compact: bool) -> Store {
    let opts = StoreOptions {
        compact,
        ..StoreOptions::default()
    };
    Store::open_with(dir, opts).expect("open store")
}

/// An ended session of `n` chunks of which `lost` were dropped at the
/// recorder: a gap the runs must not span.
fn ended(store: &Store, n: usize, lost: &[u64]) -> common::Recording {
    let rec = recording(n);
    store.start(HOST, &start_msg(&rec.id, HOST, "alice", 1_000)).unwrap();
    let seqs: Vec<u64> = (0..n as u64).filter(|s| !lost.contains(s)).collect();
    store.append(HOST, &rec.id, rec.pairs(seqs)).unwrap();
    let out = store.end(HOST, &end_msg(&rec.id, n as u64 - 1, lost.to_vec())).unwrap();
    assert!(out.ended);
    rec
}

fn wait_compacted(store: &Store, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.info(id).unwrap().compacted {
        assert!(
            Instant::now() < deadline,
            "session {id} not compacted: {:?}",
            store.info(id)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The text of `rec` without the chunks in `lost`.
fn text_without(rec: &common::Recording, lost: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for (s, c) in rec.chunks.iter().enumerate() {
        if !lost.contains(&(s as u64)) {
            out.extend(zstd::stream::decode_all(&c.bytes[..]).unwrap());
        }
    }
    out
}

fn stored_text(store: &Store, id: &str) -> Vec<u8> {
    let mut zst = Vec::new();
    store.copy_recording(id, &mut zst).unwrap();
    zstd::stream::decode_all(&zst[..]).unwrap()
}

#[test]
fn an_ended_session_is_compacted_into_runs_and_reads_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), true);
    let lost = [7, 8];
    let rec = ended(&store, 30, &lost);
    wait_compacted(&store, &rec.id);
    let dir = store.session_dir(&rec.id).unwrap();
    assert!(dir.join("runs.zst").exists() && dir.join("runs.index").exists());
    assert!(!dir.join("chunks.zst").exists() && !dir.join("index").exists());

    let chunked: usize = rec.chunks.iter().map(|c| c.bytes.len()).sum();
    let runs = fs::read(dir.join("runs.zst")).unwrap();
    assert!(runs.len() * 2 < chunked, "runs {} bytes, chunks {chunked}", runs.len());
    // Two runs: the gap splits them, and the chain restarts after it.
    let parts: Vec<&[u8]> = shelltrail_cast::chunk::split(&runs).unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(run::seqs(parts[0]).unwrap(), (0, 6));
    assert_eq!(run::seqs(parts[1]).unwrap(), (9, 29));

    let info = store.info(&rec.id).unwrap();
    assert_eq!((info.chunks, info.next_seq, info.missing_seqs()), (28, 30, vec![7, 8]));
    assert_eq!(stored_text(&store, &rec.id), text_without(&rec, &lost));
    let report = store.verify(&rec.id).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!((report.chunks, report.chain_restarts.clone()), (28, vec![9]));

    // Reads from any seq return the run holding it, whole.
    let from = |seq: u64| -> Vec<(u64, u64)> {
        store
            .read_chunks(&rec.id, seq, usize::MAX)
            .unwrap()
            .iter()
            .map(|c| (c.seq, c.last_seq))
            .collect()
    };
    assert_eq!(from(0), vec![(0, 6), (9, 29)]);
    assert_eq!(from(7), vec![(9, 29)]);
    assert_eq!(from(12), vec![(9, 29)]);
    assert!(from(30).is_empty());

    // Retransmissions are still recognised, and a restart reads the runs.
    let out = store.append(HOST, &rec.id, rec.pairs([3, 20])).unwrap();
    assert_eq!(out.duplicates, 2);
    drop(store);
    let store = open(tmp.path(), true);
    let info = store.info(&rec.id).unwrap();
    assert!(info.compacted && info.damaged.is_none(), "{info:?}");
    assert_eq!((info.chunks, info.next_seq), (28, 30));
    assert_eq!(stored_text(&store, &rec.id), text_without(&rec, &lost));
    assert!(verify_dir(&dir).unwrap().is_ok());
}

#[test]
fn sessions_that_ended_before_a_restart_are_compacted_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), false);
    let rec = ended(&store, 5, &[]);
    assert!(!store.info(&rec.id).unwrap().compacted);
    drop(store);
    let store = open(tmp.path(), true);
    wait_compacted(&store, &rec.id);
    assert_eq!(stored_text(&store, &rec.id), rec.text);
}

#[test]
fn live_and_quarantined_sessions_are_left_as_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), true);
    let live = recording(3);
    store.start(HOST, &start_msg(&live.id, HOST, "alice", 1)).unwrap();
    store.append(HOST, &live.id, live.pairs(0..3)).unwrap();
    let bad = recording(3);
    store.start(HOST, &start_msg(&bad.id, HOST, "alice", 1)).unwrap();
    store.append(HOST, &bad.id, bad.pairs(0..2)).unwrap();
    store.quarantine(&bad.id, "a test").unwrap();
    // One that ends after them goes through the same queue: once it is
    // compacted, the others were looked at.
    let done = ended(&store, 2, &[]);
    wait_compacted(&store, &done.id);
    for id in [&live.id, &bad.id] {
        let info = store.info(id).unwrap();
        assert!(!info.compacted, "{info:?}");
        assert!(store.session_dir(id).unwrap().join("chunks.zst").exists());
    }
}

/// Rewrites part `k` of the first run of `dir` with one byte changed, as a
/// careful intruder would: recompressed, checksum and all, header kept.
fn alter_part(dir: &Path, k: usize) {
    let runs = fs::read(dir.join("runs.zst")).unwrap();
    let first = shelltrail_cast::chunk::split(&runs).unwrap()[0].to_vec();
    let u = run::unpack(&first).unwrap();
    let mut raw = u.raw.clone();
    raw[u.parts[k].raw.start + 2] ^= 1;
    let header_len = first.len() - zstd_frame_len(&first);
    let mut forged = first[..header_len].to_vec();
    forged.extend(zstd::bulk::compress(&raw, 3).unwrap());
    let mut out = forged;
    out.extend_from_slice(&runs[first.len()..]);
    // The index is rewritten to match the new length, CRC and all.
    let mut index = fs::read(dir.join("runs.index")).unwrap();
    let delta = out.len() as i64 - runs.len() as i64;
    let len = u32::from_le_bytes(index[16..20].try_into().unwrap()) as i64 + delta;
    index[16..20].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32fast::hash(&index[..52]);
    index[52..56].copy_from_slice(&crc.to_le_bytes());
    for r in index.chunks_mut(56).skip(1) {
        let off = u64::from_le_bytes(r[8..16].try_into().unwrap()) as i64 + delta;
        r[8..16].copy_from_slice(&(off as u64).to_le_bytes());
        let crc = crc32fast::hash(&r[..52]);
        r[52..56].copy_from_slice(&crc.to_le_bytes());
    }
    fs::write(dir.join("runs.zst"), out).unwrap();
    fs::write(dir.join("runs.index"), index).unwrap();
}

/// Length of the zstd frame at the end of a run (after its header).
fn zstd_frame_len(run_bytes: &[u8]) -> usize {
    let size = u32::from_le_bytes(run_bytes[4..8].try_into().unwrap()) as usize;
    run_bytes.len() - 8 - size
}

#[test]
fn verify_names_an_altered_chunk_inside_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), true);
    let rec = ended(&store, 12, &[]);
    wait_compacted(&store, &rec.id);
    let dir = store.session_dir(&rec.id).unwrap();
    drop(store);
    alter_part(&dir, 5);
    let report = verify_dir(&dir).unwrap();
    assert_eq!(report.first_broken_seq(), Some(5), "{report}");
    assert!(report.problems.contains(&Problem::Altered { seq: 5 }), "{report}");
    // The collector does not take the session for intact either.
    let store = open(tmp.path(), true);
    let report = store.verify(&rec.id).unwrap();
    assert!(report.problems.contains(&Problem::Altered { seq: 5 }), "{report}");
}

#[test]
fn a_crash_during_compaction_leaves_one_consistent_session() {
    let tmp = tempfile::tempdir().unwrap();
    // The chunks as ingest left them, kept aside.
    let store = open(tmp.path(), false);
    let rec = ended(&store, 6, &[]);
    let dir = store.session_dir(&rec.id).unwrap();
    drop(store);
    let chunks = fs::read(dir.join("chunks.zst")).unwrap();
    let index = fs::read(dir.join("index")).unwrap();

    // Before the commit point: what compaction wrote is thrown away.
    fs::write(dir.join(".runs.zst.tmp"), b"half a run").unwrap();
    fs::write(dir.join("runs.index"), [0u8; 56]).unwrap();
    let store = open(tmp.path(), false);
    assert!(!dir.join(".runs.zst.tmp").exists() && !dir.join("runs.index").exists());
    assert!(!store.info(&rec.id).unwrap().compacted);
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    drop(store);

    // After it: the chunks it replaced go.
    let store = open(tmp.path(), true);
    wait_compacted(&store, &rec.id);
    drop(store);
    fs::write(dir.join("chunks.zst"), &chunks).unwrap();
    fs::write(dir.join("index"), &index).unwrap();
    let store = open(tmp.path(), true);
    assert!(!dir.join("chunks.zst").exists() && !dir.join("index").exists());
    assert!(store.info(&rec.id).unwrap().compacted);
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    assert!(store.verify(&rec.id).unwrap().is_ok());
    drop(store);

    // runs.zst without its index (which the commit protocol rules out, but a
    // disk or an operator need not): the chunks are not given up for it.
    fs::write(dir.join("chunks.zst"), &chunks).unwrap();
    fs::write(dir.join("index"), &index).unwrap();
    fs::remove_file(dir.join("runs.index")).unwrap();
    let store = open(tmp.path(), false);
    assert!(dir.join("chunks.zst").exists() && !dir.join("runs.zst").exists());
    let info = store.info(&rec.id).unwrap();
    assert!(!info.compacted && info.damaged.is_none(), "{info:?}");
    assert_eq!(stored_text(&store, &rec.id), rec.text);
}
