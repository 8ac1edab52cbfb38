//! The seam between a session's writer and the disk: the calls whose
//! failures an append must survive (a positional `write`, `sync_data`,
//! `set_len`), behind a trait so that tests can make them fail (ENOSPC, EIO
//! on fsync, short writes) exactly where they want, on real files.
//!
//! Everything that writes `chunks.zst` and `index` goes through it: an
//! append ([`Store::append`](super::Store::append), [`Store::end`](super::Store::end)),
//! its rollback, and the repair of torn tails at start-up. The real disk is
//! the default; [`Store::open_on`](super::Store::open_on) takes another.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// An open store file (`chunks.zst` or `index`), written at given offsets.
pub trait StoreFile: Send {
    /// Writes some of `buf` at `offset`; may write less (a short write).
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Makes the file's data (and its length) durable.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the file back (to undo a write that did not become durable).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// Where a session's files are opened for writing.
pub trait Disk: Send + Sync + fmt::Debug {
    /// Opens an existing file to write it.
    fn open(&self, path: &Path) -> io::Result<Box<dyn StoreFile>>;
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealDisk;

struct RealFile(File);

impl StoreFile for RealFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Disk for RealDisk {
    fn open(&self, path: &Path) -> io::Result<Box<dyn StoreFile>> {
        Ok(Box::new(RealFile(OpenOptions::new().write(true).open(path)?)))
    }
}

/// Writes all of `buf` at `offset`, however short the writes: what
/// [`FileExt::write_all_at`] does, over the seam.
pub(crate) fn write_all_at(f: &mut dyn StoreFile, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match f.write_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write whole buffer"));
            }
            Ok(n) => {
                buf = &buf[n.min(buf.len())..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
