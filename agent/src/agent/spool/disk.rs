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
