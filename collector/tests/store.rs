//! The session store on its own: ingest rules (chain, dedup, gaps, lost
//! chunks), recovery of torn writes, verification of tampered sessions,
//! and refusal of hostile names.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use common::{end_msg, recording, recording_with_id, start_msg};
use shelltrail_cast::chunk;
use shelltrail_collector::store::INDEX_RECORD_LEN;
use shelltrail_collector::{ListFilter, Problem, SeqRange, StateFilter, Store, StoreError, StoreOptions, verify_dir};

const HOST: &str = "host-a";

/// The store with compaction off: these tests look at and tamper with the
/// chunks as ingest stores them. `compaction.rs` covers compacted sessions.
fn open(dir: &Path) -> Store {
    let opts = StoreOptions {
        compact: false,
        ..StoreOptions::default()
    };
    Store::open_with(dir, opts).expect("open store")
}

/// A store with one session of `host`, chunks `seqs` of `rec` appended.
fn started(store: &Store, rec: &common::Recording) {
    let p = store.start(HOST, &start_msg(&rec.id, HOST, "alice", 1_000)).unwrap();
    assert_eq!((p.next_seq, p.ended), (0, false));
}

fn stored_text(store: &Store, id: &str) -> Vec<u8> {
    let mut zst = Vec::new();
    store.copy_recording(id, &mut zst).unwrap();
    zstd::stream::decode_all(&zst[..]).unwrap()
}

/// Rewrites a session's chunks.zst and index from `chunks`, consistently
/// (correct offsets, hashes and CRCs): what a careful intruder would do.
fn rewrite(dir: &Path, chunks: &[(u64, Vec<u8>)]) {
    let mut data = Vec::new();
    let mut index = Vec::new();
    for (seq, bytes) in chunks {
        let mut rec = Vec::with_capacity(INDEX_RECORD_LEN);
        rec.extend_from_slice(&seq.to_le_bytes());
        rec.extend_from_slice(&(data.len() as u64).to_le_bytes());
        rec.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        rec.extend_from_slice(&chunk::hash(bytes).unwrap());
        let crc = crc32fast::hash(&rec);
        rec.extend_from_slice(&crc.to_le_bytes());
        index.extend_from_slice(&rec);
        data.extend_from_slice(bytes);
    }
    fs::write(dir.join("chunks.zst"), data).unwrap();
    fs::write(dir.join("index"), index).unwrap();
}

#[test]
fn stores_reads_and_verifies_a_session() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let rec = recording(6);
    started(&store, &rec);
    let out = store.append(HOST, &rec.id, rec.pairs(0..6)).unwrap();
    assert_eq!((out.next_seq, out.stored, out.duplicates), (6, 6, 0));
    assert!(!out.has_gap());
    let out = store.end(HOST, &end_msg(&rec.id, 5, vec![])).unwrap();
    assert!(out.ended);

    // The stored file is the recording: a standard zstd decoder gives the
    // exact lines the encoder wrote.
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    let dir = store.session_dir(&rec.id).unwrap();
    assert_eq!(dir, tmp.path().join("sessions").join(HOST).join(&rec.id));
    let file = fs::read(dir.join("chunks.zst")).unwrap();
    assert_eq!(zstd::stream::decode_all(&file[..]).unwrap(), rec.text);
    assert_eq!(
        fs::metadata(dir.join("index")).unwrap().len(),
        6 * INDEX_RECORD_LEN as u64
    );
    assert!(dir.join("start.json").is_file() && dir.join("end.json").is_file());
    use std::os::unix::fs::PermissionsExt;
    for p in [dir.clone(), dir.join("chunks.zst"), dir.join("end.json")] {
        let mode = fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o007, 0, "{} is world-accessible", p.display());
    }

    // Read back in pieces, from any position.
    let all = store.read_chunks(&rec.id, 0, usize::MAX).unwrap();
    assert_eq!(all.len(), 6);
    for (c, orig) in all.iter().zip(&rec.chunks) {
        assert_eq!((c.seq, &c.bytes), (orig.seq, &orig.bytes));
    }
    let small = store.read_chunks(&rec.id, 2, 1).unwrap();
    assert_eq!(small.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![2]);
    assert!(store.read_chunks(&rec.id, 6, usize::MAX).unwrap().is_empty());

    let report = store.verify(&rec.id).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.chunks, 6);
    assert_eq!(report.raw_bytes, rec.text.len() as u64);
    assert!(report.ended);
    assert_eq!(verify_dir(&dir).unwrap(), report);

    let info = store.info(&rec.id).unwrap();
    assert_eq!((info.next_seq, info.chunks, info.is_ended()), (6, 6, true));
    let proto = info.to_proto();
    assert_eq!(proto.host, HOST);
    assert!(proto.end.is_some() && proto.quarantine.is_empty() && proto.missing_seqs.is_empty());

    // A restart finds everything where it was.
    drop(store);
    let store = open(tmp.path());
    let p = store.start(HOST, &start_msg(&rec.id, HOST, "alice", 1_000)).unwrap();
    assert_eq!((p.next_seq, p.ended), (6, true));
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    assert!(store.verify(&rec.id).unwrap().is_ok());
}

/// The collector checks a complete session's seal against the chain it
/// stored and the key pinned for the host, keeps the end either way, and
/// flags (never refuses) a seal that does not check out.
#[test]
fn seals_are_checked_at_the_end_and_bad_ones_flagged() {
    use shelltrail_proto::seal::SigningKey;
    use shelltrail_proto::v1::CloseCheck;
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let (key, _) = SigningKey::generate().unwrap();
    let (other, _) = SigningKey::generate().unwrap();
    let flag = |store: &Store, id: &str| store.info(id).unwrap().to_proto().quarantine;
    let session = |store: &Store, n: usize| {
        let rec = recording(n);
        started(store, &rec);
        store.append(HOST, &rec.id, rec.pairs(0..n as u64)).unwrap();
        rec
    };
    let start = |rec: &common::Recording| start_msg(&rec.id, HOST, "alice", 1_000);
    let end = |rec: &common::Recording| end_msg(&rec.id, rec.chunks.len() as u64 - 1, vec![]);
    let last = |rec: &common::Recording| rec.chunks.last().unwrap().hash;

    // Sealed, but no key pinned for the host yet: flagged.
    let rec = session(&store, 3);
    let e = common::sealed(&key, &start(&rec), end(&rec), 3, last(&rec), CloseCheck::Agreed);
    assert!(store.end(HOST, &e).unwrap().ended);
    assert!(
        flag(&store, &rec.id).contains("no signing key is pinned"),
        "{}",
        flag(&store, &rec.id)
    );

    assert_eq!(
        store.pin_host_key(HOST, &key.public_key()).unwrap(),
        shelltrail_collector::store::keys::KeyPin::New
    );
    assert_eq!(store.host_key(HOST).unwrap(), Some(key.public_key()));

    // A good seal: nothing to flag. Unsigned: nothing either (`verify` says so).
    let good = session(&store, 4);
    let e = common::sealed(&key, &start(&good), end(&good), 4, last(&good), CloseCheck::Agreed);
    assert!(store.end(HOST, &e).unwrap().ended);
    assert_eq!(flag(&store, &good.id), "");
    let unsigned = session(&store, 2);
    assert!(store.end(HOST, &end(&unsigned)).unwrap().ended);
    assert_eq!(flag(&store, &unsigned.id), "");

    // Another host's key; a seal over more chunks than arrived; a seal the
    // agent itself made as "cut short": each kept, flagged, and ended.
    let foreign = session(&store, 3);
    let e = common::sealed(
        &other,
        &start(&foreign),
        end(&foreign),
        3,
        last(&foreign),
        CloseCheck::Agreed,
    );
    assert!(store.end(HOST, &e).unwrap().ended);
    assert!(
        flag(&store, &foreign.id).contains("does not verify"),
        "{}",
        flag(&store, &foreign.id)
    );
    let cut = session(&store, 3);
    let e = common::sealed(&key, &start(&cut), end(&cut), 5, [9; 32], CloseCheck::Agreed);
    assert!(store.end(HOST, &e).unwrap().ended);
    assert!(
        flag(&store, &cut.id).contains("signed 5 chunks"),
        "{}",
        flag(&store, &cut.id)
    );
    let short = session(&store, 3);
    let e = common::sealed(
        &key,
        &start(&short),
        end(&short),
        3,
        last(&short),
        CloseCheck::Disagreed,
    );
    assert!(store.end(HOST, &e).unwrap().ended);
    assert!(
        flag(&store, &short.id).contains("cut short"),
        "{}",
        flag(&store, &short.id)
    );
    assert_eq!(
        store.info(&short.id).unwrap().end.unwrap().seal,
        e.seal,
        "the seal is kept"
    );

    // Flags survive a restart.
    drop(store);
    let store = open(tmp.path());
    assert!(flag(&store, &foreign.id).contains("does not verify"));
    assert_eq!(flag(&store, &good.id), "");
}

#[test]
fn retransmissions_are_deduplicated() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let rec = recording(5);
    started(&store, &rec);
    store.append(HOST, &rec.id, rec.pairs(0..3)).unwrap();
    // The agent lost the Committed and sends 1..5 again.
    let out = store.append(HOST, &rec.id, rec.pairs(1..5)).unwrap();
    assert_eq!((out.next_seq, out.stored, out.duplicates), (5, 2, 2));
    // Duplicates within one batch too.
    let out = store.append(HOST, &rec.id, rec.pairs([4, 4, 0])).unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 3));
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    assert_eq!(store.info(&rec.id).unwrap().chunks, 5);

    // The same start again is fine and keeps the first one's content.
    let other = start_msg(&rec.id, HOST, "mallory", 9_999);
    assert_eq!(store.start(HOST, &other).unwrap().next_seq, 5);
    assert_eq!(store.info(&rec.id).unwrap().start.verified_user, "alice");

    // A stored seq sent again with other content is not a retransmission.
    let forged = recording_with_id(&rec.id, 5, "forged ");
    let err = store.append(HOST, &rec.id, forged.pairs([2])).unwrap_err();
    assert!(
        matches!(&err, StoreError::Rejected { reason, .. } if reason.contains("different content")),
        "{err}"
    );
    let err = store.append(HOST, &rec.id, rec.pairs([2])).unwrap_err();
    assert!(matches!(err, StoreError::Quarantined { .. }), "{err}");
    let dir = store.session_dir(&rec.id).unwrap();
    assert!(fs::read_to_string(dir.join("quarantine")).unwrap().contains("chunk 2"));
    // What was stored is intact.
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    assert!(store.verify(&rec.id).unwrap().is_ok());
}

#[test]
fn a_gap_is_held_then_filled() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let rec = recording(6);
    started(&store, &rec);
    store.append(HOST, &rec.id, rec.pairs([0])).unwrap();
    let out = store.append(HOST, &rec.id, rec.pairs([3, 2, 5])).unwrap();
    assert_eq!(out.next_seq, 1);
    assert_eq!(out.held, vec![3, 2, 5]);
    assert!(out.has_gap());
    assert_eq!(store.info(&rec.id).unwrap().held_chunks, 3);
    // Nothing after the gap is on disk yet.
    assert_eq!(store.info(&rec.id).unwrap().chunks, 1);

    let out = store.append(HOST, &rec.id, rec.pairs([1])).unwrap();
    assert_eq!((out.next_seq, out.stored), (4, 3));
    assert_eq!(out.held, Vec::<u64>::new());
    let out = store.append(HOST, &rec.id, rec.pairs([4])).unwrap();
    assert_eq!((out.next_seq, out.stored), (6, 2));
    assert_eq!(store.info(&rec.id).unwrap().held_chunks, 0);
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    assert!(store.verify(&rec.id).unwrap().is_ok());
}

#[test]
fn hold_limits_drop_chunks_for_the_agent_to_resend() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = shelltrail_collector::StoreOptions {
        max_held_chunks: 2,
        ..Default::default()
    };
    let store = Store::open_with(tmp.path(), opts).unwrap();
    let rec = recording(6);
    started(&store, &rec);
    let out = store.append(HOST, &rec.id, rec.pairs([2, 3, 4, 5])).unwrap();
    assert_eq!((out.held.clone(), out.dropped.clone()), (vec![2, 3], vec![4, 5]));
    let out = store.append(HOST, &rec.id, rec.pairs([0, 1])).unwrap();
    assert_eq!(out.next_seq, 4);
    let out = store.append(HOST, &rec.id, rec.pairs([4, 5])).unwrap();
    assert_eq!(out.next_seq, 6);
    assert_eq!(stored_text(&store, &rec.id), rec.text);
}

#[test]
fn chunks_lost_at_the_recorder_are_skipped_at_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let rec = recording(8);
    started(&store, &rec);
    // The recorder dropped 2 and 3 (memory cap) and 7, the last one.
    store.append(HOST, &rec.id, rec.pairs([0, 1])).unwrap();
    let out = store.append(HOST, &rec.id, rec.pairs([4, 5, 6])).unwrap();
    assert_eq!((out.next_seq, out.held.len()), (2, 3));
    // An end that does not explain the gap does not end the session.
    let out = store.end(HOST, &end_msg(&rec.id, 7, vec![7])).unwrap();
    assert!(!out.ended);
    assert_eq!((out.next_seq, out.resend_from), (2, Some(2)));

    let out = store.end(HOST, &end_msg(&rec.id, 7, vec![2, 3, 7])).unwrap();
    assert!(out.ended);
    assert_eq!((out.next_seq, out.stored), (8, 3));
    let info = store.info(&rec.id).unwrap();
    assert_eq!(info.missing_seqs(), vec![2, 3, 7]);
    assert_eq!(info.to_proto().missing_seqs, vec![2, 3, 7]);

    let check = |store: &Store| {
        let report = store.verify(&rec.id).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(
            report.lost_at_recorder,
            vec![SeqRange { first: 2, last: 3 }, SeqRange { first: 7, last: 7 }]
        );
        assert_eq!(report.chain_restarts, vec![4]);
        assert!(
            report.to_string().contains("chunk(s) 2-3 lost at the recorder"),
            "{report}"
        );
    };
    check(&store);
    // Reading skips the gap.
    let seqs: Vec<u64> = store
        .read_chunks(&rec.id, 2, usize::MAX)
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(seqs, vec![4, 5, 6]);
    // A lost chunk that turns up after all is ignored, never merged.
    let out = store.append(HOST, &rec.id, rec.pairs([2, 5])).unwrap();
    assert_eq!((out.ignored.clone(), out.duplicates), (vec![2], 1));

    drop(store);
    let store = open(tmp.path());
    let info = store.info(&rec.id).unwrap();
    assert_eq!((info.next_seq, info.missing_seqs()), (8, vec![2, 3, 7]));
    check(&store);
    // Index records lost in a crash are rebuilt across the gap too: chunk 4
    // starts a new chain there, as it did at ingest.
    let dir = store.session_dir(&rec.id).unwrap();
    drop(store);
    let index = fs::read(dir.join("index")).unwrap();
    fs::write(dir.join("index"), &index[..INDEX_RECORD_LEN]).unwrap();
    let store = open(tmp.path());
    assert_eq!(fs::read(dir.join("index")).unwrap(), index);
    check(&store);
    let mut expected = Vec::new();
    for s in [0usize, 1, 4, 5, 6] {
        expected.extend(zstd::stream::decode_all(&rec.chunks[s].bytes[..]).unwrap());
    }
    assert_eq!(stored_text(&store, &rec.id), expected);
}

#[test]
fn an_end_before_its_chunks_waits_for_them() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let rec = recording(4);
    started(&store, &rec);
    store.append(HOST, &rec.id, rec.pairs(0..2)).unwrap();
    let out = store.end(HOST, &end_msg(&rec.id, 3, vec![])).unwrap();
    assert!(!out.ended);
    assert_eq!((out.next_seq, out.resend_from), (2, Some(2)));
    assert!(!store.info(&rec.id).unwrap().is_ended());
    store.append(HOST, &rec.id, rec.pairs(2..4)).unwrap();
    assert!(store.end(HOST, &end_msg(&rec.id, 3, vec![])).unwrap().ended);
    // Twice is fine; chunks after the end are not.
    assert!(store.end(HOST, &end_msg(&rec.id, 3, vec![])).unwrap().ended);
    let more = recording_with_id(&rec.id, 5, "");
    let err = store.append(HOST, &rec.id, more.pairs([4])).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::AfterEnd {
                seq: 4,
                last_seq: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(store.info(&rec.id).unwrap().quarantine.is_none());

    // A session that never had a chunk.
    let empty = recording(0);
    started(&store, &empty);
    assert!(store.end(HOST, &end_msg(&empty.id, 0, vec![])).unwrap().ended);
    assert!(store.verify(&empty.id).unwrap().is_ok());
}

#[test]
fn chunks_resent_after_an_end_skipped_lost_ones_restart_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let rec = recording(6);
    started(&store, &rec);
    store.append(HOST, &rec.id, rec.pairs([0, 1])).unwrap();
    // The recorder lost 2 and 3; 4 and 5 are not here yet (dropped from the
    // hold, or still on their way): the end skips the lost ones and waits.
    let out = store.end(HOST, &end_msg(&rec.id, 5, vec![2, 3])).unwrap();
    assert!(!out.ended);
    assert_eq!((out.next_seq, out.resend_from), (4, Some(4)));
    // Chunk 4, sent again from there, follows the lost 3, not 1.
    let out = store.append(HOST, &rec.id, rec.pairs([4, 5])).unwrap();
    assert_eq!((out.next_seq, out.stored), (6, 2));
    assert!(store.end(HOST, &end_msg(&rec.id, 5, vec![2, 3])).unwrap().ended);
    let report = store.verify(&rec.id).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.chain_restarts, vec![4]);
}

#[test]
fn broken_chains_and_malformed_chunks_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());

    // Chunk 0 of another session.
    let rec = recording(3);
    started(&store, &rec);
    let other = recording(3);
    let err = store.append(HOST, &rec.id, other.pairs([0])).unwrap_err();
    assert!(
        matches!(&err, StoreError::Rejected { reason, .. } if reason.contains("chain seed")),
        "{err}"
    );

    // Chunk 1 that does not follow the stored chunk 0: the valid chunk
    // before it is kept.
    let rec = recording(3);
    started(&store, &rec);
    let mut chunks = rec.pairs([0]);
    chunks.extend(recording_with_id(&rec.id, 3, "x").pairs([1]));
    let err = store.append(HOST, &rec.id, chunks).unwrap_err();
    assert!(
        matches!(&err, StoreError::Rejected { reason, .. } if reason.contains("hash chain broken at chunk 1")),
        "{err}"
    );
    assert_eq!(store.info(&rec.id).unwrap().chunks, 1);
    assert!(store.info(&rec.id).unwrap().quarantine.is_some());

    // Sent under the wrong seq; garbage.
    let rec = recording(3);
    started(&store, &rec);
    let err = store
        .append(HOST, &rec.id, vec![(1, rec.chunks[0].bytes.clone())])
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Rejected { reason, .. } if reason.contains("header")),
        "{err}"
    );
    let rec = recording(3);
    started(&store, &rec);
    let err = store
        .append(HOST, &rec.id, vec![(0, b"not a chunk".to_vec())])
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Rejected { reason, .. } if reason.contains("malformed")),
        "{err}"
    );
    // A quarantined session is refused from then on, after a restart too.
    drop(store);
    let store = open(tmp.path());
    let err = store.start(HOST, &start_msg(&rec.id, HOST, "alice", 1)).unwrap_err();
    assert!(matches!(err, StoreError::Quarantined { .. }), "{err}");
}

#[test]
fn torn_tails_are_cut_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recording(5);
    let dir = {
        let store = open(tmp.path());
        started(&store, &rec);
        store.append(HOST, &rec.id, rec.pairs(0..3)).unwrap();
        store.session_dir(&rec.id).unwrap()
    };
    let index_len = 3 * INDEX_RECORD_LEN as u64;
    let chunks_len = fs::metadata(dir.join("chunks.zst")).unwrap().len();

    // A crash in the middle of the next append: part of chunk 3's bytes,
    // part of its index record.
    let append = |name: &str, bytes: &[u8]| {
        let mut f = OpenOptions::new().append(true).open(dir.join(name)).unwrap();
        f.write_all(bytes).unwrap();
    };
    append("chunks.zst", &rec.chunks[3].bytes[..40]);
    append("index", &[7u8; 20]);
    // verify sees both, without repairing anything.
    let report = verify_dir(&dir).unwrap();
    assert!(
        report.problems.contains(&Problem::IndexTornTail { bytes: 20 }),
        "{report}"
    );
    assert!(
        report.problems.contains(&Problem::UnindexedBytes {
            offset: chunks_len,
            len: 40
        }),
        "{report}"
    );
    // A reader does not repair either.
    let ro = Store::open_read_only(tmp.path()).unwrap();
    assert_eq!(ro.info(&rec.id).unwrap().next_seq, 3);
    assert!(matches!(
        ro.append(HOST, &rec.id, rec.pairs([3])),
        Err(StoreError::ReadOnly)
    ));
    drop(ro);

    let store = open(tmp.path());
    assert_eq!(store.info(&rec.id).unwrap().next_seq, 3);
    assert_eq!(fs::metadata(dir.join("index")).unwrap().len(), index_len);
    assert_eq!(fs::metadata(dir.join("chunks.zst")).unwrap().len(), chunks_len);
    assert!(store.verify(&rec.id).unwrap().is_ok());
    assert!(verify_dir(&dir).unwrap().is_ok());
    drop(store);

    // A whole last record that fails its CRC (a torn sector) is cut too.
    append("index", &[9u8; INDEX_RECORD_LEN]);
    let store = open(tmp.path());
    assert_eq!(fs::metadata(dir.join("index")).unwrap().len(), index_len);
    // And the session goes on where it was.
    let out = store.append(HOST, &rec.id, rec.pairs(3..5)).unwrap();
    assert_eq!(out.next_seq, 5);
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    assert!(store.verify(&rec.id).unwrap().is_ok());
}

/// The index is not synced: a crash can lose the newest index records of
/// chunks that were synced and acknowledged. Start-up indexes them again
/// from `chunks.zst`, checking each as ingest did, and cuts only what does
/// not check out.
#[test]
fn acknowledged_chunks_whose_index_records_were_lost_are_reindexed() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recording(8);
    let (dir, full_index) = {
        let store = open(tmp.path());
        started(&store, &rec);
        store.append(HOST, &rec.id, rec.pairs(0..3)).unwrap();
        store.append(HOST, &rec.id, rec.pairs(3..6)).unwrap();
        let dir = store.session_dir(&rec.id).unwrap();
        (dir.clone(), fs::read(dir.join("index")).unwrap())
    };
    let chunks_len = fs::metadata(dir.join("chunks.zst")).unwrap().len();
    // The crash: the last append's records never reached the disk, half of
    // the one before it did, and a torn chunk 6 follows the durable ones.
    fs::write(dir.join("index"), &full_index[..3 * INDEX_RECORD_LEN + 30]).unwrap();
    let mut f = OpenOptions::new().append(true).open(dir.join("chunks.zst")).unwrap();
    f.write_all(&rec.chunks[6].bytes[..rec.chunks[6].bytes.len() - 5])
        .unwrap();
    drop(f);

    let store = open(tmp.path());
    let info = store.info(&rec.id).unwrap();
    assert_eq!(
        (info.next_seq, info.chunks, info.damaged.as_deref()),
        (6, 6, None),
        "{info:?}"
    );
    // The same records as before the crash, and the torn chunk is gone.
    assert_eq!(fs::read(dir.join("index")).unwrap(), full_index);
    assert_eq!(fs::metadata(dir.join("chunks.zst")).unwrap().len(), chunks_len);
    assert!(store.verify(&rec.id).unwrap().is_ok());
    // The session goes on, and resends of re-indexed chunks are duplicates.
    let out = store.append(HOST, &rec.id, rec.pairs(4..8)).unwrap();
    assert_eq!(out.next_seq, 8);
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    drop(store);

    // A whole chunk after the index that does not continue the chain (here:
    // chunk 7 again, where chunk 8 would go) is not what a crash leaves: it
    // is neither taken in nor cut, and the session says so.
    let index_before = fs::read(dir.join("index")).unwrap();
    let len_before = fs::metadata(dir.join("chunks.zst")).unwrap().len();
    let mut f = OpenOptions::new().append(true).open(dir.join("chunks.zst")).unwrap();
    f.write_all(&rec.chunks[7].bytes).unwrap();
    drop(f);
    let store = open(tmp.path());
    let info = store.info(&rec.id).unwrap();
    assert_eq!(info.next_seq, 8);
    assert!(
        info.damaged.as_deref().unwrap_or("").contains("kept, not cut"),
        "{info:?}"
    );
    assert_eq!(fs::read(dir.join("index")).unwrap(), index_before);
    assert_eq!(
        fs::metadata(dir.join("chunks.zst")).unwrap().len(),
        len_before + rec.chunks[7].bytes.len() as u64
    );
    assert_eq!(stored_text(&store, &rec.id), rec.text);
    drop(store);

    // Index records a crash never wrote back (zeros) before others that it
    // did are rebuilt from the chunks too.
    let tmp = tempfile::tempdir().unwrap();
    let rec = recording(6);
    let (dir, full_index) = {
        let store = open(tmp.path());
        started(&store, &rec);
        store.append(HOST, &rec.id, rec.pairs(0..6)).unwrap();
        let dir = store.session_dir(&rec.id).unwrap();
        (dir.clone(), fs::read(dir.join("index")).unwrap())
    };
    let mut holed = full_index.clone();
    holed[2 * INDEX_RECORD_LEN..3 * INDEX_RECORD_LEN].fill(0);
    fs::write(dir.join("index"), &holed).unwrap();
    let store = open(tmp.path());
    let info = store.info(&rec.id).unwrap();
    assert_eq!((info.next_seq, info.damaged.as_deref()), (6, None), "{info:?}");
    assert_eq!(fs::read(dir.join("index")).unwrap(), full_index);
    assert!(store.verify(&rec.id).unwrap().is_ok());
}

#[test]
fn damage_before_the_tail_is_reported_not_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recording(5);
    let dir = {
        let store = open(tmp.path());
        started(&store, &rec);
        store.append(HOST, &rec.id, rec.pairs(0..4)).unwrap();
        store.session_dir(&rec.id).unwrap()
    };
    let mut index = fs::read(dir.join("index")).unwrap();
    index[INDEX_RECORD_LEN + 3] ^= 1;
    fs::write(dir.join("index"), &index).unwrap();
    let store = open(tmp.path());
    let info = store.info(&rec.id).unwrap();
    assert!(
        info.damaged.as_deref().unwrap_or("").contains("index record 1"),
        "{info:?}"
    );
    assert_eq!(fs::read(dir.join("index")).unwrap(), index);
    let err = store.append(HOST, &rec.id, rec.pairs([4])).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    let report = store.verify(&rec.id).unwrap();
    assert!(
        report.problems.contains(&Problem::IndexRecordCorrupt { record: 1 }),
        "{report}"
    );
}

/// A finished session of 6 chunks, for tampering.
fn finished(tmp: &Path) -> (common::Recording, std::path::PathBuf) {
    let store = open(tmp);
    let rec = recording(6);
    started(&store, &rec);
    store.append(HOST, &rec.id, rec.pairs(0..6)).unwrap();
    assert!(store.end(HOST, &end_msg(&rec.id, 5, vec![])).unwrap().ended);
    let dir = store.session_dir(&rec.id).unwrap();
    assert!(verify_dir(&dir).unwrap().is_ok());
    (rec, dir)
}

#[test]
fn verify_names_a_deleted_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let (rec, dir) = finished(tmp.path());
    rewrite(&dir, &rec.pairs([0, 1, 3, 4, 5]));
    let report = verify_dir(&dir).unwrap();
    assert_eq!(report.first_broken_seq(), Some(2), "{report}");
    assert!(report.problems.contains(&Problem::Missing {
        range: SeqRange { first: 2, last: 2 }
    }));
    assert!(report.problems.contains(&Problem::ChainBroken {
        seq: 3,
        previous: Some(1)
    }));
    let text = report.to_string();
    assert!(text.contains("chunk(s) 2 missing and not declared lost"), "{text}");

    // The last chunk deleted: the end says there were 6.
    rewrite(&dir, &rec.pairs(0..5));
    let report = verify_dir(&dir).unwrap();
    assert_eq!(report.first_broken_seq(), Some(5), "{report}");
    assert_eq!(
        report.problems,
        vec![Problem::Missing {
            range: SeqRange { first: 5, last: 5 }
        }]
    );
}

#[test]
fn verify_names_reordered_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let (rec, dir) = finished(tmp.path());
    // Swapped places, index rewritten to match.
    let mut swapped = rec.pairs(0..6);
    let (a, b) = (swapped[2].1.clone(), swapped[3].1.clone());
    swapped[2].1 = b;
    swapped[3].1 = a;
    rewrite(&dir, &swapped);
    let report = verify_dir(&dir).unwrap();
    assert_eq!(report.first_broken_seq(), Some(2), "{report}");
    assert!(
        report.problems.contains(&Problem::WrongChunk { seq: 2, found: 3 }),
        "{report}"
    );
    assert!(report.problems.contains(&Problem::ChainBroken {
        seq: 2,
        previous: Some(1)
    }));

    // Swapped index records as well.
    let mut order = rec.pairs(0..6);
    order.swap(2, 3);
    rewrite(&dir, &order);
    let report = verify_dir(&dir).unwrap();
    assert_eq!(report.first_broken_seq(), Some(2), "{report}");
    assert!(report.problems.contains(&Problem::OutOfOrder {
        record: 3,
        seq: 2,
        after: 3
    }));
    // Chunk 2 met after 3 leaves the chain at 3: chunk 4 links to it, and
    // 3 is not reported missing.
    assert_eq!(
        report.problems,
        vec![
            Problem::Missing {
                range: SeqRange { first: 2, last: 2 }
            },
            Problem::ChainBroken {
                seq: 3,
                previous: Some(1)
            },
            Problem::OutOfOrder {
                record: 3,
                seq: 2,
                after: 3
            },
        ],
        "{report}"
    );
}

#[test]
fn verify_names_an_altered_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let (rec, dir) = finished(tmp.path());
    // A valid chunk 4 with other content (same seq, same prev_hash): the
    // index still has the original hash.
    let forged = {
        let mut c = shelltrail_cast::Chunker::with_state(3, 4, rec.chunks[3].hash);
        c.buffer()
            .extend_from_slice(b"[0.000, \"o\", \"nothing to see\\r\\n\"]\n");
        c.cut(400, 420).unwrap()
    };
    let chunks_zst = fs::read(dir.join("chunks.zst")).unwrap();
    let offset: usize = rec.chunks[..4].iter().map(|c| c.bytes.len()).sum();
    let mut tampered = chunks_zst[..offset].to_vec();
    tampered.extend_from_slice(&forged.bytes);
    tampered.extend_from_slice(&rec.chunks[5].bytes);
    // Keep the index as it was: sizes differ, so chunk 5 moved as well.
    fs::write(dir.join("chunks.zst"), &tampered).unwrap();
    let report = verify_dir(&dir).unwrap();
    assert_eq!(report.first_broken_seq(), Some(4), "{report}");
    // Where chunk 4's record points there is no longer one whole chunk.
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::Undecodable { seq: 4, .. })),
        "{report}"
    );

    // With the index rewritten to match, the chain still shows it.
    let mut pairs = rec.pairs(0..6);
    pairs[4].1 = forged.bytes.clone();
    rewrite(&dir, &pairs);
    let report = verify_dir(&dir).unwrap();
    assert_eq!(
        report.problems,
        vec![Problem::ChainBroken {
            seq: 5,
            previous: Some(4)
        }],
        "{report}"
    );
    assert!(report.to_string().contains("chunk 4 altered"), "{report}");

    // A flipped bit in place.
    rewrite(&dir, &rec.pairs(0..6));
    let mut bytes = fs::read(dir.join("chunks.zst")).unwrap();
    let at = rec.chunks[0].bytes.len() + 100;
    bytes[at] ^= 0x40;
    fs::write(dir.join("chunks.zst"), &bytes).unwrap();
    let report = verify_dir(&dir).unwrap();
    assert_eq!(report.first_broken_seq(), Some(1), "{report}");
    // zstd's checksum catches it before the chain has to.
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::Undecodable { seq: 1, error } if error.contains("checksum"))),
        "{report}"
    );
}

#[test]
fn hostile_names_and_other_hosts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let store = open(&data);
    let rec = recording(2);
    for bad_id in ["../../escape", "..", "", "0190A5F0-1C2D-7E3F-8A9B-0C1D2E3F4A5B", "a/b"] {
        let err = store.start(HOST, &start_msg(bad_id, HOST, "u", 1)).unwrap_err();
        assert!(matches!(err, StoreError::InvalidSessionId(_)), "{bad_id:?}: {err}");
        let err = store.append(HOST, bad_id, rec.pairs([0])).unwrap_err();
        assert!(matches!(err, StoreError::InvalidSessionId(_)), "{bad_id:?}: {err}");
    }
    for bad_host in ["..", "../escape", ".x", "", "a/b", "host a", "h\0"] {
        let err = store
            .start(bad_host, &start_msg(&rec.id, bad_host, "u", 1))
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidHost(_)), "{bad_host:?}: {err}");
    }
    // Nothing was created anywhere.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    assert_eq!(fs::read_dir(data.join("sessions")).unwrap().count(), 0);

    // host-a's session: host-b can neither claim nor write it.
    started(&store, &rec);
    let err = store
        .start("host-b", &start_msg(&rec.id, "host-a", "u", 1))
        .unwrap_err();
    assert!(matches!(err, StoreError::OtherHost { .. }), "{err}");
    let err = store.append("host-b", &rec.id, rec.pairs([0])).unwrap_err();
    assert!(matches!(err, StoreError::OtherHost { .. }), "{err}");
    let err = store.end("host-b", &end_msg(&rec.id, 0, vec![])).unwrap_err();
    assert!(matches!(err, StoreError::OtherHost { .. }), "{err}");
    let unknown = recording(1);
    let err = store.append(HOST, &unknown.id, unknown.pairs([0])).unwrap_err();
    assert!(matches!(err, StoreError::UnknownSession(_)), "{err}");
    // And host-a's session is untouched by all that.
    let info = store.info(&rec.id).unwrap();
    assert!(info.quarantine.is_none());
    assert_eq!(store.append(HOST, &rec.id, rec.pairs(0..2)).unwrap().next_seq, 2);
}

#[test]
fn one_collector_per_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    assert!(matches!(Store::open(tmp.path()), Err(StoreError::Locked(_))));
    assert!(Store::open_read_only(tmp.path()).is_ok());
    drop(store);
    assert!(Store::open(tmp.path()).is_ok());
}

#[test]
fn listing_filters() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let ids: Vec<String> = (0..5).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let setups = [
        ("host-a", "alice", 1_000, true),
        ("host-a", "bob", 2_000, false),
        ("host-b", "alice", 3_000, false),
        ("host-b", "carol", 4_000, true),
        // Mallory's session, opened at 5_000, claims to be alice's from 1_000.
        ("host-b", "mallory", 5_000, false),
    ];
    for (id, (host, user, t, ended)) in ids.iter().zip(setups) {
        let mut start = start_msg(id, host, user, t);
        if user == "mallory" {
            let meta = start.meta.as_mut().unwrap();
            (meta.user, meta.start_unix_ms) = ("alice".into(), 1_000);
        }
        store.start(host, &start).unwrap();
        if ended {
            // The agent's end time counts, not the recorder's claim.
            let mut end = end_msg(id, 0, vec![]);
            end.closed_unix_ms = t + 500;
            end.close.as_mut().unwrap().end_unix_ms = 9_000;
            assert!(store.end(host, &end).unwrap().ended);
        }
    }
    let list = |f: ListFilter| -> Vec<String> { store.list(&f).into_iter().map(|s| s.session_id).collect() };
    // Newest first.
    assert_eq!(
        list(ListFilter::default()),
        vec![
            ids[4].clone(),
            ids[3].clone(),
            ids[2].clone(),
            ids[1].clone(),
            ids[0].clone()
        ]
    );
    let mallory = ListFilter {
        user: Some("mallory".into()),
        ..Default::default()
    };
    assert_eq!(list(mallory), vec![ids[4].clone()]);
    let host_b = ListFilter {
        host: Some("host-b".into()),
        ..Default::default()
    };
    assert_eq!(list(host_b), vec![ids[4].clone(), ids[3].clone(), ids[2].clone()]);
    let alice = ListFilter {
        user: Some("alice".into()),
        ..Default::default()
    };
    assert_eq!(list(alice), vec![ids[2].clone(), ids[0].clone()]);
    let live = ListFilter {
        state: StateFilter::Live,
        ..Default::default()
    };
    assert_eq!(list(live), vec![ids[4].clone(), ids[2].clone(), ids[1].clone()]);
    let ended = ListFilter {
        state: StateFilter::Ended,
        ..Default::default()
    };
    assert_eq!(list(ended), vec![ids[3].clone(), ids[0].clone()]);
    // Sessions that overlap [1_600, 3_500]: session 0 ended at 1_500.
    let window = ListFilter {
        since_unix_ms: Some(1_600),
        until_unix_ms: Some(3_500),
        ..Default::default()
    };
    assert_eq!(list(window), vec![ids[2].clone(), ids[1].clone()]);
}
