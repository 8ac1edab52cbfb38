//! The seam between the spool's writer and the disk: the three calls whose
//! failures the writer must survive (`write`, `sync_data`, `set_len`), behind
//! a trait so that tests can make them fail (ENOSPC, EIO on fsync, short
//! writes) exactly where they want, on real files.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// An open segment, written at its end.
pub trait SegmentFile: Send {
    /// Writes some of `buf` at the end of the file; may write less (a short write).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the file back (to undo a write that did not become durable).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// Where segments are created.
pub trait Disk: Send + Sync {
    /// Creates a new segment file (it must not exist), private to the agent.
    fn create(&self, path: &Path) -> io::Result<Box<dyn SegmentFile>>;
    /// Makes a directory's entries (a new or deleted name) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealDisk;

struct RealFile(File);

impl SegmentFile for RealFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Disk for RealDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn SegmentFile>> {
        // Append mode: after a cut (set_len) the next write lands at the new end.
        let f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The writer against a disk that fails where a test says: real files
    //! in a temporary directory, only the faults are made up.
    use super::*;
    use crate::agent::spool::log::tests::{chunk_body, open_rec};
    use crate::agent::spool::{Append, Stats, Writer, open_body, scan, segment_path};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, mpsc};

    /// What goes wrong, shared by the disk and its files.
    #[derive(Default)]
    pub(crate) struct Faults {
        /// Bytes that may still be written before ENOSPC (usize::MAX: no limit).
        room: AtomicUsize,
        /// Each write takes at most this many bytes (0: no limit).
        short: AtomicUsize,
        sync_fails: AtomicBool,
        cut_fails: AtomicBool,
    }

    impl Faults {
        fn new() -> Arc<Faults> {
            let f = Faults::default();
            f.room.store(usize::MAX, Ordering::SeqCst);
            Arc::new(f)
        }
    }

    struct FaultyDisk(Arc<Faults>);
    struct FaultyFile(Box<dyn SegmentFile>, Arc<Faults>);

    impl SegmentFile for FaultyFile {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = self.1.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(io::Error::from_raw_os_error(libc_enospc()));
            }
            let short = self.1.short.load(Ordering::SeqCst);
            let n = buf.len().min(room).min(if short == 0 { usize::MAX } else { short });
            let n = self.0.write(&buf[..n])?;
            if room != usize::MAX {
                self.1.room.store(room - n, Ordering::SeqCst);
            }
            Ok(n)
        }
        fn sync_data(&mut self) -> io::Result<()> {
            if self.1.sync_fails.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(5)); // EIO
            }
            self.0.sync_data()
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            if self.1.cut_fails.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(5));
            }
            self.0.set_len(len)
        }
    }

    impl Disk for FaultyDisk {
        fn create(&self, path: &Path) -> io::Result<Box<dyn SegmentFile>> {
            Ok(Box::new(FaultyFile(RealDisk.create(path)?, self.0.clone())))
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            RealDisk.sync_dir(dir)
        }
    }

    fn libc_enospc() -> i32 {
        nix::errno::Errno::ENOSPC as i32
    }

    /// Sends `bodies` as one batch to a running writer; the results in order.
    fn batch(tx: &mpsc::Sender<Append>, bodies: Vec<Vec<u8>>) -> Vec<Result<crate::agent::spool::Loc, String>> {
        let waits: Vec<_> = bodies
            .into_iter()
            .map(|body| {
                let (done, wait) = tokio::sync::oneshot::channel();
                tx.send(Append { body, done }).unwrap();
                wait
            })
            .collect();
        waits.into_iter().map(|w| w.blocking_recv().unwrap()).collect()
    }

    fn start(dir: &Path, faults: &Arc<Faults>) -> (mpsc::Sender<Append>, std::thread::JoinHandle<()>) {
        let disk = Arc::new(FaultyDisk(faults.clone()));
        let w = Writer::on(disk, dir, 0, 1 << 20, Arc::new(Stats::default())).unwrap();
        let (tx, rx) = mpsc::channel();
        (tx, std::thread::spawn(move || w.run(rx)))
    }

    fn seg_len(dir: &Path) -> u64 {
        std::fs::metadata(segment_path(dir, 1)).unwrap().len()
    }

    /// ENOSPC part-way through a batch, or EIO from fdatasync: nothing is
    /// acknowledged, the segment is cut back to its durable length, and
    /// once there is room the same records go in and read back whole.
    #[test]
    fn failed_writes_and_syncs_leave_the_log_as_it_was() {
        for fault in ["enospc", "eio-on-sync"] {
            let dir = tempfile::tempdir().unwrap();
            let faults = Faults::new();
            let (tx, writer) = start(dir.path(), &faults);
            let id = uuid::Uuid::now_v7();
            let first = batch(
                &tx,
                vec![open_body(&open_rec(&id.to_string())), chunk_body(&id, 0, b"zero")],
            );
            assert!(first.iter().all(Result::is_ok), "{first:?}");
            let durable = seg_len(dir.path());

            match fault {
                "enospc" => faults.room.store(300, Ordering::SeqCst),
                _ => faults.sync_fails.store(true, Ordering::SeqCst),
            }
            let failed = batch(&tx, (1..4).map(|seq| chunk_body(&id, seq, &[b'x'; 500])).collect());
            assert!(failed.iter().all(Result::is_err), "{fault}: {failed:?}");
            let why = failed[0].as_ref().unwrap_err();
            let expect = if fault == "enospc" {
                "No space left"
            } else {
                "Input/output error"
            };
            assert!(why.contains(expect), "{fault}: {why}");
            assert_eq!(seg_len(dir.path()), durable, "{fault}: the failed batch is cut off");

            faults.room.store(usize::MAX, Ordering::SeqCst);
            faults.sync_fails.store(false, Ordering::SeqCst);
            let again = batch(&tx, (1..4).map(|seq| chunk_body(&id, seq, &[b'x'; 500])).collect());
            assert!(again.iter().all(Result::is_ok), "{fault}: {again:?}");
            drop(tx);
            writer.join().unwrap();

            let ix = scan(dir.path(), false).unwrap();
            assert!(ix.problems.is_empty(), "{fault}: {:?}", ix.problems);
            let s = &ix.sessions[&id.to_string()];
            assert_eq!(s.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
            for c in &s.chunks[1..] {
                assert_eq!(crate::agent::spool::read_chunk(dir.path(), c.loc).unwrap(), [b'x'; 500]);
            }
        }
    }

    /// A disk that takes a few bytes per write: the writer keeps writing
    /// until the batch is all there.
    #[test]
    fn short_writes_are_completed() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        faults.short.store(7, Ordering::SeqCst);
        let (tx, writer) = start(dir.path(), &faults);
        let id = uuid::Uuid::now_v7();
        let mut bodies = vec![open_body(&open_rec(&id.to_string()))];
        bodies.extend((0..20).map(|seq| chunk_body(&id, seq, &vec![seq as u8; 300 + seq as usize])));
        assert!(batch(&tx, bodies).iter().all(Result::is_ok));
        drop(tx);
        writer.join().unwrap();
        let ix = scan(dir.path(), false).unwrap();
        assert!(ix.problems.is_empty(), "{:?}", ix.problems);
        let s = &ix.sessions[&id.to_string()];
        assert_eq!(s.chunks.len(), 20);
        for c in &s.chunks {
            let want = vec![c.seq as u8; 300 + c.seq as usize];
            assert_eq!(crate::agent::spool::read_chunk(dir.path(), c.loc).unwrap(), want);
        }
    }

    /// A failed write that cannot even be cut back: the writer leaves that
    /// segment for a new one; the torn bytes are reported by the scan as
    /// corruption in an old segment (never replayed), everything
    /// acknowledged before and after reads back.
    #[test]
    fn a_failed_write_that_cannot_be_cut_back_moves_to_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let (tx, writer) = start(dir.path(), &faults);
        let id = uuid::Uuid::now_v7();
        assert!(
            batch(
                &tx,
                vec![open_body(&open_rec(&id.to_string())), chunk_body(&id, 0, b"zero")]
            )
            .iter()
            .all(Result::is_ok)
        );
        faults.sync_fails.store(true, Ordering::SeqCst);
        faults.cut_fails.store(true, Ordering::SeqCst);
        assert!(batch(&tx, vec![chunk_body(&id, 1, b"lost")]).iter().all(Result::is_err));
        faults.sync_fails.store(false, Ordering::SeqCst);
        faults.cut_fails.store(false, Ordering::SeqCst);
        let again = batch(&tx, vec![chunk_body(&id, 1, b"one"), chunk_body(&id, 2, b"two")]);
        assert!(
            again.iter().all(|r| r.as_ref().is_ok_and(|l| l.segment == 2)),
            "{again:?}"
        );
        drop(tx);
        writer.join().unwrap();

        let ix = scan(dir.path(), false).unwrap();
        let s = &ix.sessions[&id.to_string()];
        let got: Vec<(u64, Vec<u8>)> = s
            .chunks
            .iter()
            .map(|c| (c.seq, crate::agent::spool::read_chunk(dir.path(), c.loc).unwrap()))
            .collect();
        // The failed record was written (not synced, not cut): a reader
        // may find it, but it is the same chunk the recorder resends, and
        // the copy kept is the first one; here the bytes differ only
        // because the test sent different ones.
        assert_eq!(got[0], (0, b"zero".to_vec()));
        assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(got[2], (2, b"two".to_vec()));
    }
}
