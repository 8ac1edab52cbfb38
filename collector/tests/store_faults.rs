//! Disk faults in the middle of an append, injected through the store's
//! disk seam (`store::disk`) on real files in a temporary directory: ENOSPC
//! after a short write, EIO from `fdatasync`, short and interrupted writes,
//! and a rollback that fails too. Only the faults are fake; the files, the
//! writes and the syncs are real.

mod common;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use common::{end_msg, recording, start_msg};
use nix::errno::Errno;
use shelltrail_collector::store::INDEX_RECORD_LEN;
use shelltrail_collector::store::disk::{Disk, RealDisk, StoreFile};
use shelltrail_collector::{Problem, Store, StoreError, StoreOptions, verify_dir};

const HOST: &str = "host-a";

/// What the faulty disk does wrong, and what it did.
#[derive(Debug, Default)]
struct Faults {
    /// Bytes `chunks.zst` still takes; then its writes fail with ENOSPC.
    space: Option<u64>,
    /// Most bytes one write of either file takes.
    max_write: Option<usize>,
    /// Every other write of either file fails with EINTR.
    interrupt: bool,
    /// The next this many `sync_data` calls of `chunks.zst` fail with EIO.
    sync_eio: usize,
    /// Writes of `index` fail with EIO.
    index_eio: bool,
    /// `set_len` of either file fails with EIO.
    set_len_eio: bool,

    /// Faults that fired.
    enospc: usize,
    short_writes: usize,
    interrupted: usize,
    failed_syncs: usize,
    failed_index_writes: usize,
    failed_set_lens: usize,
}

/// The real disk, with the faults its test asks for.
#[derive(Debug, Clone, Default)]
struct FaultyDisk(Arc<Mutex<Faults>>);

impl FaultyDisk {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.0.lock().unwrap()
    }

    /// The disk works again.
    fn heal(&self) {
        let mut f = self.faults();
        f.space = None;
        f.max_write = None;
        f.interrupt = false;
        f.sync_eio = 0;
        f.index_eio = false;
        f.set_len_eio = false;
    }
}

struct FaultyFile {
    real: Box<dyn StoreFile>,
    chunks: bool,
    faults: Arc<Mutex<Faults>>,
    calls: usize,
}

fn os_error(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl StoreFile for FaultyFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut f = self.faults.lock().unwrap();
        self.calls += 1;
        if f.interrupt && self.calls % 2 == 1 {
            f.interrupted += 1;
            return Err(os_error(Errno::EINTR));
        }
        if !self.chunks && f.index_eio {
            f.failed_index_writes += 1;
            return Err(os_error(Errno::EIO));
        }
        let mut n = buf.len();
        if let Some(max) = f.max_write
            && max < n
        {
            n = max;
            f.short_writes += 1;
        }
        if self.chunks
            && let Some(space) = f.space
        {
            if space == 0 {
                f.enospc += 1;
                return Err(os_error(Errno::ENOSPC));
            }
            n = n.min(space as usize);
            f.space = Some(space - n as u64);
        }
        drop(f);
        self.real.write_at(&buf[..n], offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut f = self.faults.lock().unwrap();
        if self.chunks && f.sync_eio > 0 {
            f.sync_eio -= 1;
            f.failed_syncs += 1;
            return Err(os_error(Errno::EIO));
        }
        drop(f);
        self.real.sync_data()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut f = self.faults.lock().unwrap();
        if f.set_len_eio {
            f.failed_set_lens += 1;
            return Err(os_error(Errno::EIO));
        }
        drop(f);
        self.real.set_len(len)
    }
}

impl Disk for FaultyDisk {
    fn open(&self, path: &Path) -> io::Result<Box<dyn StoreFile>> {
        Ok(Box::new(FaultyFile {
            real: RealDisk.open(path)?,
            chunks: path.file_name().is_some_and(|n| n == "chunks.zst"),
            faults: self.0.clone(),
            calls: 0,
        }))
    }
}

fn opts() -> StoreOptions {
    StoreOptions {
        compact: false,
        ..StoreOptions::default()
    }
}

/// The store on a disk that fails when told to.
fn open_faulty(dir: &Path) -> (Store, FaultyDisk) {
    let disk = FaultyDisk::default();
    let store = Store::open_on(Arc::new(disk.clone()), dir, opts()).expect("open store");
    (store, disk)
}

/// The store on the real disk, as after a restart.
fn open_real(dir: &Path) -> Store {
    Store::open_with(dir, opts()).expect("open store")
}

fn start(store: &Store, rec: &common::Recording) -> PathBuf {
    store.start(HOST, &start_msg(&rec.id, HOST, "alice", 1_000)).unwrap();
    store.session_dir(&rec.id).unwrap()
}

/// Lengths of `chunks.zst` and `index` on disk.
fn sizes(dir: &Path) -> (u64, u64) {
    let len = |name: &str| fs::metadata(dir.join(name)).unwrap().len();
    (len("chunks.zst"), len("index"))
}

/// What chunks `0..n` of `rec` take on disk, stored.
fn committed(rec: &common::Recording, n: usize) -> (u64, u64) {
    let bytes = rec.chunks[..n].iter().map(|c| c.bytes.len() as u64).sum();
    (bytes, (n * INDEX_RECORD_LEN) as u64)
}

/// Every stored chunk reads back byte for byte, and both verifications pass.
fn assert_intact(store: &Store, rec: &common::Recording, n: usize) {
    let read = store.read_chunks(&rec.id, 0, usize::MAX).unwrap();
    assert_eq!(read.len(), n);
    for (c, orig) in read.iter().zip(&rec.chunks) {
        assert_eq!((c.seq, &c.bytes), (orig.seq, &orig.bytes));
    }
    let report = store.verify(&rec.id).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.chunks, n as u64);
    let dir = store.session_dir(&rec.id).unwrap();
    let report = verify_dir(&dir).unwrap();
    assert!(report.is_ok(), "{report}");
}

/// The I/O error an append failed with, on which file.
fn io_error(err: StoreError) -> (PathBuf, io::Error) {
    match err {
        StoreError::Io { path, error } => (path, error),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

/// A failed append leaves the session exactly as its last commit did, on
/// disk and in memory, and takes the same chunks again afterwards.
fn assert_rolled_back_then_retry_works(store: &Store, disk: &FaultyDisk, rec: &common::Recording, dir: &Path) {
    assert_eq!(sizes(dir), committed(rec, 3), "both files cut back to the commit");
    let info = store.info(&rec.id).unwrap();
    assert_eq!(info.damaged, None);
    assert_eq!((info.next_seq, info.chunks), (3, 3));
    assert_eq!(info.stored_bytes, committed(rec, 3).0);
    assert_intact(store, rec, 3);
    // A resume asks for the chunks that failed.
    let p = store.start(HOST, &start_msg(&rec.id, HOST, "alice", 1_000)).unwrap();
    assert_eq!((p.next_seq, p.ended), (3, false));

    disk.heal();
    let out = store.append(HOST, &rec.id, rec.pairs(3..6)).unwrap();
    assert_eq!((out.next_seq, out.stored, out.duplicates), (6, 3, 0));
    assert_eq!(sizes(dir), committed(rec, 6));
    assert!(store.end(HOST, &end_msg(&rec.id, 5, vec![])).unwrap().ended);
    assert_intact(store, rec, 6);
}

#[test]
fn enospc_mid_batch_is_rolled_back_and_the_chunks_append_once_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, disk) = open_faulty(tmp.path());
    let rec = recording(6);
    let dir = start(&store, &rec);
    store.append(HOST, &rec.id, rec.pairs(0..3)).unwrap();

    // Chunk 3 fits, chunk 4 gets 10 bytes in (a short write), then ENOSPC.
    disk.faults().space = Some(rec.chunks[3].bytes.len() as u64 + 10);
    let err = store.append(HOST, &rec.id, rec.pairs(3..6)).unwrap_err();
    assert!(
        !err.is_session_refusal(),
        "a full disk is the store's problem, not the session's"
    );
    let msg = err.to_string();
    let (path, error) = io_error(err);
    assert_eq!(path, dir.join("chunks.zst"));
    assert_eq!(error.kind(), io::ErrorKind::StorageFull, "{msg}");
    assert!(
        msg.contains("chunks.zst") && msg.contains("No space left on device"),
        "{msg}"
    );
    assert_eq!(disk.faults().enospc, 1);

    assert_rolled_back_then_retry_works(&store, &disk, &rec, &dir);
    drop(store);
    assert_intact(&open_real(tmp.path()), &rec, 6);
}

#[test]
fn eio_from_fdatasync_is_rolled_back_and_a_retry_stores_the_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, disk) = open_faulty(tmp.path());
    let rec = recording(6);
    let dir = start(&store, &rec);
    store.append(HOST, &rec.id, rec.pairs(0..3)).unwrap();

    // One failed sync: the rollback's own sync works.
    disk.faults().sync_eio = 1;
    let err = store.append(HOST, &rec.id, rec.pairs(3..6)).unwrap_err();
    assert!(!err.is_session_refusal());
    let (path, error) = io_error(err);
    assert_eq!(path, dir.join("chunks.zst"));
    assert_eq!(error.raw_os_error(), Some(Errno::EIO as i32));
    assert_eq!(disk.faults().failed_syncs, 1);

    assert_rolled_back_then_retry_works(&store, &disk, &rec, &dir);
}

/// The chunks were synced, but their index records could not be written:
/// the append failed, so the synced chunks are cut back too.
#[test]
fn a_failed_index_write_cuts_back_chunks_already_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, disk) = open_faulty(tmp.path());
    let rec = recording(6);
    let dir = start(&store, &rec);
    store.append(HOST, &rec.id, rec.pairs(0..3)).unwrap();

    disk.faults().index_eio = true;
    let (path, error) = io_error(store.append(HOST, &rec.id, rec.pairs(3..6)).unwrap_err());
    assert_eq!(path, dir.join("index"));
    assert_eq!(error.raw_os_error(), Some(Errno::EIO as i32));
    assert_eq!(disk.faults().failed_index_writes, 1);

    assert_rolled_back_then_retry_works(&store, &disk, &rec, &dir);
}

#[test]
fn short_and_interrupted_writes_still_store_every_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, disk) = open_faulty(tmp.path());
    let rec = recording(6);
    let dir = start(&store, &rec);
    {
        let mut f = disk.faults();
        f.max_write = Some(7);
        f.interrupt = true;
    }
    store.append(HOST, &rec.id, rec.pairs(0..2)).unwrap();
    let out = store.append(HOST, &rec.id, rec.pairs(2..6)).unwrap();
    assert_eq!((out.next_seq, out.stored), (6, 4));
    {
        let f = disk.faults();
        // Both files were written 7 bytes at a time, every other call interrupted.
        assert!(f.short_writes > 100, "{f:?}");
        assert!(f.interrupted > 100, "{f:?}");
    }
    assert_eq!(sizes(&dir), committed(&rec, 6));
    assert_intact(&store, &rec, 6);
    drop(store);
    let store = open_real(tmp.path());
    assert_eq!(store.info(&rec.id).unwrap().next_seq, 6);
    assert_intact(&store, &rec, 6);
}

/// What happens when undoing a failed write fails too: the session is
/// marked damaged (in memory) and refuses writes, the store's other sessions
/// go on, and the files hold a torn append. The mark is not written to disk:
/// a restart finds the torn tail, cuts it as it does after a crash, and the
/// session takes writes again.
#[test]
fn a_write_whose_rollback_also_fails_damages_only_that_session_until_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, disk) = open_faulty(tmp.path());
    let rec = recording(6);
    let other = recording(4);
    let dir = start(&store, &rec);
    let other_dir = start(&store, &other);
    store.append(HOST, &rec.id, rec.pairs(0..3)).unwrap();
    store.append(HOST, &other.id, other.pairs(0..2)).unwrap();

    {
        let mut f = disk.faults();
        f.space = Some(10);
        f.set_len_eio = true;
    }
    let (path, error) = io_error(store.append(HOST, &rec.id, rec.pairs(3..6)).unwrap_err());
    assert_eq!(path, dir.join("chunks.zst"));
    assert_eq!(error.kind(), io::ErrorKind::StorageFull);
    // The rollback gave up at its first cut (the index): chunk 3's first
    // 10 bytes stay in chunks.zst.
    assert_eq!(disk.faults().failed_set_lens, 1);
    let (chunks_len, index_len) = committed(&rec, 3);
    assert_eq!(sizes(&dir), (chunks_len + 10, index_len));

    let info = store.info(&rec.id).unwrap();
    let why = info.damaged.clone().expect("the session is damaged");
    assert!(why.starts_with("a write failed (I/O error on "), "{why}");
    assert!(why.contains("chunks.zst: No space left on device"), "{why}");
    assert!(why.contains(") and could not be undone (I/O error on "), "{why}");
    assert!(why.contains("index: Input/output error"), "{why}");
    assert_eq!((info.next_seq, info.chunks, info.stored_bytes), (3, 3, chunks_len));
    assert_eq!(info.to_proto().quarantine, format!("storage damaged: {why}"));

    // The disk recovers; the session stays refused, for appends, ends and resumes.
    disk.heal();
    let damaged = |r: Result<_, StoreError>| match r {
        Err(e @ StoreError::Damaged { .. }) => {
            assert!(e.is_session_refusal());
            assert!(e.to_string().contains(&why), "{e}");
        }
        other => panic!("expected the damaged error, got {other:?}"),
    };
    damaged(store.append(HOST, &rec.id, rec.pairs(3..6)).map(|_| ()));
    damaged(store.end(HOST, &end_msg(&rec.id, 5, vec![])).map(|_| ()));
    damaged(store.start(HOST, &start_msg(&rec.id, HOST, "alice", 1_000)).map(|_| ()));
    assert_eq!(sizes(&dir), (chunks_len + 10, index_len), "nothing more was written");
    // Its committed chunks still read back; verify checks all of its files
    // and names the torn bytes.
    let read = store.read_chunks(&rec.id, 0, usize::MAX).unwrap();
    assert_eq!(read.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![0, 1, 2]);
    let report = store.verify(&rec.id).unwrap();
    assert_eq!(
        report.problems,
        vec![Problem::UnindexedBytes {
            offset: chunks_len,
            len: 10
        }],
        "{report}"
    );
    assert_eq!(verify_dir(&dir).unwrap(), report);

    // The other session is not touched.
    let out = store.append(HOST, &other.id, other.pairs(2..4)).unwrap();
    assert_eq!(out.next_seq, 4);
    assert!(store.end(HOST, &end_msg(&other.id, 3, vec![])).unwrap().ended);
    assert_intact(&store, &other, 4);
    assert_eq!(sizes(&other_dir), committed(&other, 4));

    // A restart on the real disk: the torn tail is cut as after a crash,
    // the session is no longer damaged, and it resumes where it was.
    drop(store);
    let store = open_real(tmp.path());
    assert_eq!(sizes(&dir), (chunks_len, index_len));
    let info = store.info(&rec.id).unwrap();
    assert_eq!(info.damaged, None);
    assert_eq!(info.next_seq, 3);
    assert_intact(&store, &rec, 3);
    store.append(HOST, &rec.id, rec.pairs(3..6)).unwrap();
    assert!(store.end(HOST, &end_msg(&rec.id, 5, vec![])).unwrap().ended);
    assert_intact(&store, &rec, 6);
    assert_intact(&store, &other, 4);
}

/// An append whose sync failed and whose rollback failed too leaves whole
/// chunks in `chunks.zst` that were never synced. Start-up re-indexes whole
/// chunks without records (and so tells the agent they are stored) only
/// once a sync of them succeeds; until then it keeps them, unindexed, and
/// the session damaged.
#[test]
fn unsynced_chunks_are_reindexed_at_start_up_only_once_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recording(6);
    let dir = {
        let (store, disk) = open_faulty(tmp.path());
        let dir = start(&store, &rec);
        store.append(HOST, &rec.id, rec.pairs(0..3)).unwrap();
        {
            let mut f = disk.faults();
            f.sync_eio = 1;
            f.set_len_eio = true;
        }
        let (_, error) = io_error(store.append(HOST, &rec.id, rec.pairs(3..6)).unwrap_err());
        assert_eq!(error.raw_os_error(), Some(Errno::EIO as i32));
        assert!(store.info(&rec.id).unwrap().damaged.is_some());
        dir
    };
    // Chunks 3 to 5 are whole on disk, their sync failed, no records.
    let unsynced = (committed(&rec, 6).0, committed(&rec, 3).1);
    assert_eq!(sizes(&dir), unsynced);

    // A restart on a disk whose sync still fails.
    let disk = FaultyDisk::default();
    disk.faults().sync_eio = 1;
    let store = Store::open_on(Arc::new(disk.clone()), tmp.path(), opts()).unwrap();
    assert_eq!(disk.faults().failed_syncs, 1, "start-up tried to sync them");
    let info = store.info(&rec.id).unwrap();
    assert_eq!((info.next_seq, info.chunks), (3, 3), "not acknowledged");
    let why = info.damaged.expect("damaged");
    assert!(
        why.contains("chunks 3..=5") && why.contains("Input/output error"),
        "{why}"
    );
    assert_eq!(sizes(&dir), unsynced, "kept as they were");
    assert!(matches!(
        store.append(HOST, &rec.id, rec.pairs(3..6)),
        Err(StoreError::Damaged { .. })
    ));
    drop(store);

    // Once the sync works, they are indexed and the session goes on.
    let store = open_real(tmp.path());
    let info = store.info(&rec.id).unwrap();
    assert_eq!((info.damaged, info.next_seq), (None, 6));
    assert_eq!(sizes(&dir), committed(&rec, 6));
    assert_intact(&store, &rec, 6);
    let out = store.append(HOST, &rec.id, rec.pairs(3..6)).unwrap();
    assert_eq!((out.next_seq, out.duplicates), (6, 3));
}
