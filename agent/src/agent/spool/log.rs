//! The log: segment files, their records, recovery, and the one writer.
//!
//! ```text
//! spool_dir/
//!   00000000000000000001.seg     segment files, numbered, written in order
//! segment  = b"STSPOOL1" record*
//! record   = body_len:u32le crc32(body):u32le body      (body: see `records`)
//! ```
//! This module is the only one that names segment files.

use super::disk::{Disk, SegmentFile};
use super::records::{self, CloseRecord, OpenRecord, Record};
use shelltrail_cast::chain::Chain;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

const MAGIC: &[u8; 8] = b"STSPOOL1";
const RECORD_HEAD: u64 = 8;
/// No record is larger: a length above this is corruption, not data.
pub const MAX_RECORD: u32 = 64 << 20;
/// Most bytes one group commit writes before syncing.
const MAX_BATCH: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot read the spool at {path}: permission denied. Run as root or as a member of the shelltrail group")]
    Permission { path: PathBuf },
    // The cause is in the message, so it is not also the `source`: printed
    // with its chain (`{:#}`), it would appear twice.
    #[error("spool I/O error on {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path} is not a shelltrail spool segment (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("corrupt record in {path} at byte {offset}: {why}")]
    Corrupt { path: PathBuf, offset: u64, why: String },
    #[error(
        "another shelltrail agent{} is already running on the spool {dir}: two agents on one spool would \
         take each other's socket and write each other's segments. Stop it first (`systemctl stop \
         shelltrail-agent`), or give this one its own spool_dir and socket",
        pid.map_or(String::new(), |p| format!(" (pid {p})"))
    )]
    Locked { dir: PathBuf, pid: Option<u32> },
}

pub(super) fn io_err(path: &Path, source: std::io::Error) -> SpoolError {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        SpoolError::Permission {
            path: path.to_path_buf(),
        }
    } else {
        SpoolError::Io {
            path: path.to_path_buf(),
            error: source,
        }
    }
}

/// Where a record's body lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub segment: u64,
    /// Offset of the record head.
    pub offset: u64,
    pub body_len: u32,
}

fn segment_name(id: u64) -> String {
    format!("{id:020}.seg")
}

/// The path of segment `id` in `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(segment_name(id))
}

/// Segment ids present in `dir`, in order.
pub fn segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let e = e.map_err(|e| io_err(dir, e))?;
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        if let Ok(id) = stem.parse::<u64>() {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// One chunk of a session, as found in the spool.
#[derive(Debug, Clone)]
pub struct ChunkEntry {
    pub seq: u64,
    pub loc: Loc,
    /// Bytes of chunk data (compressed).
    pub len: u64,
    /// Its link hash, as the agent checked it on arrival (None: an older
    /// agent's record, which did not keep it).
    pub hash: Option<[u8; 32]>,
}

/// Everything the spool holds of one session.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    pub open: OpenRecord,
    /// The chunks still in the spool, in order (those before were shipped
    /// and their segments deleted).
    pub chunks: Vec<ChunkEntry>,
    pub close: Option<CloseRecord>,
    /// Why the agent quarantined the session, if it did (a DAMAGED record).
    pub damaged: Option<String>,
    /// The collector holds the whole session (a SHIPPED record, or a state
    /// record that says so).
    pub shipped: bool,
    /// Where a carried state record says the chain stood (next seq, hash).
    pub carried: Option<(u64, [u8; 32])>,
    /// The segment holding the session's newest start or state record.
    pub head_segment: u64,
}

impl SessionEntry {
    fn new(open: OpenRecord, head_segment: u64) -> SessionEntry {
        let carried = open
            .resume
            .as_ref()
            .and_then(|(seq, h)| Some((*seq, records::parse_hash(h)?)));
        SessionEntry {
            open,
            chunks: Vec::new(),
            close: None,
            damaged: None,
            shipped: false,
            carried,
            head_segment,
        }
    }

    pub fn id(&self) -> &str {
        &self.open.meta.session_id
    }
    /// Compressed bytes stored.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len).sum()
    }
    /// The next chunk sequence the session expects.
    pub fn next_seq(&self) -> u64 {
        let carried = self.carried.map_or(0, |r| r.0);
        self.chunks.last().map_or(carried, |c| (c.seq + 1).max(carried))
    }
    /// Where the session's chain stands, from the records alone: its newest
    /// chunk's stored hash, or the carried state's, or the seed. Err: the
    /// newest chunk is an older agent's record without its hash.
    pub fn chain(&self) -> Result<Chain, ChunkEntry> {
        match (self.chunks.last(), self.carried) {
            (Some(c), Some((next, h))) if c.seq < next => Ok(Chain::resume(next, h)),
            (Some(c), _) => match c.hash {
                Some(h) => Ok(Chain::resume(c.seq + 1, h)),
                None => Err(c.clone()),
            },
            (None, Some((next, h))) => Ok(Chain::resume(next, h)),
            (None, None) => Ok(Chain::new(self.id())),
        }
    }
}

/// The result of walking the spool.
#[derive(Debug, Default)]
pub struct Index {
    /// By session id; ordered so listings are stable (UUIDv7 ids sort by time).
    pub sessions: BTreeMap<String, SessionEntry>,
    /// Corruption found (and, with repair, cut off).
    pub problems: Vec<String>,
    /// Bytes in all segments.
    pub total_bytes: u64,
    pub last_segment: u64,
    /// What each segment holds, per session: what shipping must have
    /// confirmed before the segment can be deleted.
    pub segments: BTreeMap<u64, BTreeMap<String, SegmentUse>>,
    /// Records met before their session's start or state record (possible
    /// after one was carried forward into a newer segment); attached when
    /// it turns up.
    orphans: BTreeMap<String, Vec<(Record, Loc)>>,
}

/// One session's records in one segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentUse {
    /// A start or state record.
    pub head: bool,
    pub max_seq: Option<u64>,
    pub close: bool,
    /// Chunk bytes of the session in the segment: what deleting the
    /// segment gives back to the session's and its user's quotas.
    pub bytes: u64,
}

/// Walks the whole spool. `repair` (the agent, at start-up, before writing)
/// truncates a torn tail of the newest segment; without it (the CLI, reading
/// beside a running agent) an incomplete tail is simply where the data ends.
pub fn scan(dir: &Path, repair: bool) -> Result<Index, SpoolError> {
    let mut index = Index::default();
    let ids = segments(dir)?;
    for (i, &id) in ids.iter().enumerate() {
        let newest = i + 1 == ids.len();
        let path = dir.join(segment_name(id));
        let mut f = match OpenOptions::new().read(true).write(repair && newest).open(&path) {
            Ok(f) => f,
            // Retired (shipped and deleted) by the running agent since the
            // listing: what it held is at the collector.
            Err(e) if !repair && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path, e)),
        };
        let len = f.metadata().map_err(|e| io_err(&path, e))?.len();
        index.total_bytes += len;
        index.last_segment = id;
        // Listed even when empty (a start-up's fresh segment): retirable.
        index.segments.entry(id).or_default();
        let mut r = BufReader::with_capacity(256 << 10, &mut f);
        let mut magic = [0u8; 8];
        if len < MAGIC.len() as u64 || r.read_exact(&mut magic).is_err() || &magic != MAGIC {
            if repair && newest && len < MAGIC.len() as u64 {
                // Crashed while creating the segment.
                drop(r);
                f.set_len(0)
                    .and_then(|_| f.write_all(MAGIC))
                    .and_then(|_| f.sync_all())
                    .map_err(|e| io_err(&path, e))?;
                continue;
            }
            index
                .problems
                .push(SpoolError::BadMagic { path: path.clone() }.to_string());
            continue;
        }
        let mut offset = MAGIC.len() as u64;
        let mut bad: Option<String> = None;
        while offset < len {
            match read_record(&mut r, offset, len) {
                Ok((body, body_len)) => {
                    let loc = Loc {
                        segment: id,
                        offset,
                        body_len,
                    };
                    if let Err(why) = index.apply(&body, loc) {
                        index
                            .problems
                            .push(format!("{}: record at byte {offset}: {why}", path.display()));
                    }
                    offset += RECORD_HEAD + body_len as u64;
                }
                Err(why) => {
                    bad = Some(why);
                    break;
                }
            }
        }
        if let Some(why) = bad {
            if newest && repair {
                drop(r);
                f.set_len(offset)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| io_err(&path, e))?;
                index.total_bytes -= len - offset;
                index.problems.push(format!(
                    "{}: torn write at byte {offset} ({why}); cut {} bytes",
                    path.display(),
                    len - offset
                ));
            } else if newest {
                // Being written right now, or torn: either way the data ends here.
            } else {
                index.problems.push(
                    SpoolError::Corrupt {
                        path: path.clone(),
                        offset,
                        why,
                    }
                    .to_string(),
                );
            }
        }
    }
    for (id, recs) in std::mem::take(&mut index.orphans) {
        index.problems.push(format!(
            "{} records of session {id} whose start record is missing",
            recs.len()
        ));
    }
    Ok(index)
}

/// Reads one record; the error says why the bytes at `offset` are not one.
fn read_record(r: &mut impl Read, offset: u64, file_len: u64) -> Result<(Vec<u8>, u32), String> {
    let mut head = [0u8; RECORD_HEAD as usize];
    if file_len - offset < RECORD_HEAD {
        return Err("truncated record head".into());
    }
    r.read_exact(&mut head).map_err(|e| e.to_string())?;
    let body_len = u32::from_le_bytes(head[0..4].try_into().expect("4"));
    let crc = u32::from_le_bytes(head[4..8].try_into().expect("4"));
    if body_len == 0 || body_len > MAX_RECORD {
        return Err(format!("impossible record length {body_len}"));
    }
    if file_len - offset - RECORD_HEAD < body_len as u64 {
        return Err("truncated record body".into());
    }
    let mut body = vec![0u8; body_len as usize];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    if crc32fast::hash(&body) != crc {
        return Err("checksum mismatch".into());
    }
    Ok((body, body_len))
}

impl Index {
    fn uses(&mut self, segment: u64, id: &str) -> &mut SegmentUse {
        self.segments
            .entry(segment)
            .or_default()
            .entry(id.to_string())
            .or_default()
    }

    fn apply(&mut self, body: &[u8], loc: Loc) -> Result<(), String> {
        let rec = Record::decode(body)?;
        let id = rec.session().to_string();
        let u = self.uses(loc.segment, &id);
        match &rec {
            Record::Open(_) | Record::State(_) => u.head = true,
            Record::Chunk { seq, len, .. } => {
                u.max_seq = Some(u.max_seq.map_or(*seq, |m| m.max(*seq)));
                u.bytes += len;
            }
            Record::Close(_) => u.close = true,
            Record::Damaged(_) | Record::Shipped(_) => {}
        }
        match self.sessions.get_mut(&id) {
            Some(s) => attach(s, rec, loc),
            None => match rec {
                Record::Open(open) => {
                    self.new_session(SessionEntry::new(open, loc.segment), &id);
                }
                Record::State(st) => {
                    let mut s = SessionEntry::new(st.open.clone(), loc.segment);
                    attach(&mut s, Record::State(st), loc);
                    self.new_session(s, &id);
                }
                other => self.orphans.entry(id).or_default().push((other, loc)),
            },
        }
        Ok(())
    }

    fn new_session(&mut self, mut s: SessionEntry, id: &str) {
        for (rec, loc) in self.orphans.remove(id).unwrap_or_default() {
            attach(&mut s, rec, loc);
        }
        self.sessions.insert(id.to_string(), s);
    }
}

/// Applies one record to its session.
fn attach(s: &mut SessionEntry, rec: Record, loc: Loc) {
    match rec {
        // A second start record is an older agent's carried copy.
        Record::Open(open) => {
            if let Some(r) = open
                .resume
                .as_ref()
                .and_then(|(seq, h)| Some((*seq, records::parse_hash(h)?)))
            {
                s.carried = Some(s.carried.map_or(r, |c| c.max(r)));
            }
            s.head_segment = s.head_segment.max(loc.segment);
        }
        Record::State(st) => {
            if let Some(h) = records::parse_hash(&st.resume.1) {
                let r = (st.resume.0, h);
                s.carried = Some(s.carried.map_or(r, |c| if r.0 >= c.0 { r } else { c }));
            }
            if s.close.is_none() {
                s.close = st.close.clone();
            }
            s.shipped |= st.shipped;
            s.head_segment = s.head_segment.max(loc.segment);
        }
        Record::Chunk { seq, hash, len, .. } => {
            // Usually in order; after a failed write (disk full) a session
            // resends from its last durable chunk, so a later chunk can
            // precede an earlier one and appear twice. Keep one of each, in order.
            if let Err(at) = s.chunks.binary_search_by_key(&seq, |c| c.seq) {
                s.chunks.insert(at, ChunkEntry { seq, loc, len, hash });
            }
        }
        Record::Close(close) => s.close = Some(close),
        Record::Damaged(d) => {
            s.damaged.get_or_insert(d.reason);
        }
        Record::Shipped(_) => s.shipped = true,
    }
}

/// Reads one chunk's bytes back, checking the record checksum.
pub fn read_chunk(dir: &Path, loc: Loc) -> Result<Vec<u8>, SpoolError> {
    let path = dir.join(segment_name(loc.segment));
    let mut f = File::open(&path).map_err(|e| io_err(&path, e))?;
    let len = f.metadata().map_err(|e| io_err(&path, e))?.len();
    f.seek(SeekFrom::Start(loc.offset)).map_err(|e| io_err(&path, e))?;
    let (body, _) = read_record(&mut f, loc.offset, len).map_err(|why| SpoolError::Corrupt {
        path: path.clone(),
        offset: loc.offset,
        why,
    })?;
    match records::chunk_data(&body) {
        Some(data) => Ok(data.to_vec()),
        None => Err(SpoolError::Corrupt {
            path,
            offset: loc.offset,
            why: "not a chunk record".into(),
        }),
    }
}

/// A request to the writer thread.
pub struct Append {
    pub body: Vec<u8>,
    pub done: tokio::sync::oneshot::Sender<Result<Loc, String>>,
}

/// Counters the writer keeps, for limits and for the benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes in all segments.
    pub total_bytes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub records: AtomicU64,
    /// The segment being written: older ones are closed and may be deleted once shipped.
    pub active_segment: AtomicU64,
    /// What each session and each uid holds in the spool, for the quotas.
    pub holdings: Mutex<Holdings>,
}

/// Chunk bytes (compressed recording) each session and each uid holds in
/// the spool: what `spool_max_bytes_per_session` and `_per_uid` count. The
/// agent adds a chunk when it queues it for writing (and takes it back if
/// the write fails); the shipper gives back what a deleted segment held.
#[derive(Debug, Default)]
pub struct Holdings {
    per_uid: HashMap<u32, u64>,
    per_session: HashMap<String, u64>,
}

impl Holdings {
    pub fn add(&mut self, uid: u32, session: &str, n: u64) {
        *self.per_uid.entry(uid).or_default() += n;
        match self.per_session.get_mut(session) {
            Some(b) => *b += n,
            None => {
                self.per_session.insert(session.to_string(), n);
            }
        }
    }

    /// Gives back `n` bytes; entries that reach zero are forgotten.
    pub fn release(&mut self, uid: u32, session: &str, n: u64) {
        if let Some(b) = self.per_uid.get_mut(&uid) {
            *b = b.saturating_sub(n);
            if *b == 0 {
                self.per_uid.remove(&uid);
            }
        }
        if let Some(b) = self.per_session.get_mut(session) {
            *b = b.saturating_sub(n);
            if *b == 0 {
                self.per_session.remove(session);
            }
        }
    }

    pub fn uid(&self, uid: u32) -> u64 {
        self.per_uid.get(&uid).copied().unwrap_or(0)
    }

    pub fn session(&self, session: &str) -> u64 {
        self.per_session.get(session).copied().unwrap_or(0)
    }
}

/// The single writer: owns the newest segment.
pub struct Writer {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    file: Box<dyn SegmentFile>,
    segment: u64,
    /// Bytes of the active segment known durable.
    len: u64,
    /// The active segment holds bytes past `len` that could not be cut
    /// off: nothing more goes into it, the next write starts a new one.
    torn: bool,
    segment_bytes: u64,
    stats: Arc<Stats>,
}

impl Writer {
    /// Starts a fresh segment after `last_segment`.
    pub fn create(dir: &Path, last_segment: u64, segment_bytes: u64, stats: Arc<Stats>) -> Result<Writer, SpoolError> {
        Writer::on(Arc::new(super::disk::RealDisk), dir, last_segment, segment_bytes, stats)
    }

    /// [`create`](Self::create) on a given [`Disk`] (tests inject faults with it).
    pub fn on(
        disk: Arc<dyn Disk>,
        dir: &Path,
        last_segment: u64,
        segment_bytes: u64,
        stats: Arc<Stats>,
    ) -> Result<Writer, SpoolError> {
        let segment = last_segment + 1;
        let file = new_segment(&*disk, dir, segment)?;
        stats.active_segment.store(segment, Ordering::Relaxed);
        stats.total_bytes.fetch_add(MAGIC.len() as u64, Ordering::Relaxed);
        Ok(Writer {
            dir: dir.to_path_buf(),
            disk,
            file,
            segment,
            len: MAGIC.len() as u64,
            torn: false,
            segment_bytes,
            stats,
        })
    }

    /// Writes and syncs `bodies` now, on the calling thread: for what the
    /// agent records at start-up, before the writer thread takes over.
    pub fn write_now(&mut self, bodies: Vec<Vec<u8>>) -> Result<Vec<Loc>, SpoolError> {
        let batch: Vec<Append> = bodies
            .into_iter()
            .map(|body| Append {
                body,
                done: tokio::sync::oneshot::channel().0,
            })
            .collect();
        let mut buf = Vec::new();
        self.commit(&batch, &mut buf)
    }

    /// Runs the group-commit loop until every sender is gone.
    pub fn run(mut self, rx: mpsc::Receiver<Append>) {
        let mut buf = Vec::with_capacity(1 << 20);
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let mut bytes = batch[0].body.len();
            while bytes < MAX_BATCH {
                match rx.try_recv() {
                    Ok(a) => {
                        bytes += a.body.len();
                        batch.push(a);
                    }
                    Err(_) => break,
                }
            }
            let result = self.commit(&batch, &mut buf);
            match result {
                Ok(locs) => {
                    for (a, loc) in batch.into_iter().zip(locs) {
                        let _ = a.done.send(Ok(loc));
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    for a in batch {
                        let _ = a.done.send(Err(why.clone()));
                    }
                }
            }
        }
    }

    /// Writes a batch: segments roll over inside a batch too, so no segment
    /// grows much past `segment_bytes` (a closed segment is what shipping can
    /// delete; a cap only drains if segments stay small).
    fn commit(&mut self, batch: &[Append], buf: &mut Vec<u8>) -> Result<Vec<Loc>, SpoolError> {
        buf.clear();
        if self.torn {
            self.rotate()?;
        }
        let mut locs = Vec::with_capacity(batch.len());
        for a in batch {
            if self.len + buf.len() as u64 >= self.segment_bytes {
                self.flush(buf)?;
                self.rotate()?;
            }
            let body_len = a.body.len() as u32;
            locs.push(Loc {
                segment: self.segment,
                offset: self.len + buf.len() as u64,
                body_len,
            });
            buf.extend_from_slice(&body_len.to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&a.body).to_le_bytes());
            buf.extend_from_slice(&a.body);
        }
        self.flush(buf)?;
        self.stats.records.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(locs)
    }

    /// Appends `buf` to the active segment and makes it durable. On failure
    /// no partial write is left behind (a full disk must not corrupt the
    /// log): the file is cut back to its last durable length. If an earlier
    /// part of the batch already went to a previous segment, it is durable
    /// but unacknowledged; the recorder resends it and readers keep one copy.
    fn flush(&mut self, buf: &mut Vec<u8>) -> Result<(), SpoolError> {
        if buf.is_empty() {
            return Ok(());
        }
        let written = write_all(&mut *self.file, buf).and_then(|_| self.file.sync_data());
        if let Err(e) = written {
            // If even the cut fails, the torn bytes are past the durable
            // length: a later record overwrites nothing, and recovery cuts
            // them as a torn tail (or reports them, in an older segment).
            if let Err(cut) = self.file.set_len(self.len) {
                tracing::error!(segment = self.segment, "cannot cut back a failed write: {cut}");
                // Nothing more may go into this segment: start a new one
                // (now, or before the next write if that fails too).
                self.torn = true;
                let _ = self.rotate();
            }
            return Err(io_err(&self.dir.join(segment_name(self.segment)), e));
        }
        self.len += buf.len() as u64;
        self.stats.total_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        buf.clear();
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        let segment = self.segment + 1;
        self.file = new_segment(&*self.disk, &self.dir, segment)?;
        self.stats.active_segment.store(segment, Ordering::Relaxed);
        self.segment = segment;
        self.len = MAGIC.len() as u64;
        self.torn = false;
        self.stats.total_bytes.fetch_add(self.len, Ordering::Relaxed);
        Ok(())
    }
}

/// `write` until all of `buf` is written: a short write is not an error.
fn write_all(f: &mut dyn SegmentFile, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match f.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn new_segment(disk: &dyn Disk, dir: &Path, id: u64) -> Result<Box<dyn SegmentFile>, SpoolError> {
    let path = dir.join(segment_name(id));
    let mut f = disk.create(&path).map_err(|e| io_err(&path, e))?;
    if let Err(e) = write_all(&mut *f, MAGIC).and_then(|_| f.sync_data()) {
        // A segment without its magic would be reported as foreign: remove it.
        let _ = std::fs::remove_file(&path);
        return Err(io_err(&path, e));
    }
    // The new name must survive a crash too.
    disk.sync_dir(dir).map_err(|e| io_err(dir, e))?;
    Ok(f)
}

/// Deletes segments (fully shipped), one directory sync for all. Returns
/// the bytes freed. A segment already gone counts as deleted.
pub fn delete_segments(dir: &Path, ids: &[u64]) -> Result<u64, SpoolError> {
    let mut freed = 0;
    for &id in ids {
        let path = dir.join(segment_name(id));
        match std::fs::metadata(&path) {
            Ok(m) => freed += m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path, e)),
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, e)),
        }
    }
    if !ids.is_empty() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))?;
    }
    Ok(freed)
}

/// Bytes of all segment files in `dir` (for tests and `doctor`-style checks).
pub fn disk_usage(dir: &Path) -> Result<u64, SpoolError> {
    let mut n = 0;
    for id in segments(dir)? {
        let path = dir.join(segment_name(id));
        n += std::fs::metadata(&path).map_err(|e| io_err(&path, e))?.len();
    }
    Ok(n)
}

/// Creates the spool directory if needed and makes sure users cannot read it.
/// The file in the spool directory that the agent owning the spool holds
/// locked (flock), with its pid in it.
pub const LOCK_FILE: &str = "agent.lock";

/// The spool's lock, held for as long as the agent runs (the kernel drops
/// it when the process ends, however it ends).
#[derive(Debug)]
pub struct SpoolLock(#[allow(dead_code)] File);

/// Takes the spool's lock, or says which agent holds it.
pub fn lock_spool(dir: &Path) -> Result<SpoolLock, SpoolError> {
    use std::os::unix::fs::OpenOptionsExt;
    prepare_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(SpoolError::Locked {
                dir: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path, e)),
    }
    let pid = format!("{}\n", std::process::id());
    f.set_len(0)
        .and_then(|()| f.rewind())
        .and_then(|()| f.write_all(pid.as_bytes()))
        .map_err(|e| io_err(&path, e))?;
    Ok(SpoolLock(f))
}

pub fn prepare_dir(dir: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(|e| io_err(dir, e))?;
    let md = std::fs::metadata(dir).map_err(|e| io_err(dir, e))?;
    if md.permissions().mode() & 0o007 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).map_err(|e| io_err(dir, e))?;
        tracing::warn!(dir = %dir.display(), "spool directory was readable by others; set it to 0750");
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::agent::spool::records::{chunk_body as chunk_record, open_body};
    use shelltrail_proto::v1::SessionMeta;

    /// A chunk record with a made-up hash (the log does not check chunks).
    pub(crate) fn chunk_body(id: &uuid::Uuid, seq: u64, data: &[u8]) -> Vec<u8> {
        chunk_record(id, seq, &[seq as u8; 32], data)
    }

    /// An open record for session `id` (shared with the shipper's tests).
    pub(crate) fn open_rec(id: &str) -> OpenRecord {
        OpenRecord {
            meta: SessionMeta {
                session_id: id.into(),
                ..Default::default()
            },
            peer_uid: 1000,
            peer_pid: 42,
            peer_user: "u".into(),
            via_recorder_uid: None,
            peer_start_ticks: 7,
            opened_unix_ms: 1,
            resume: None,
        }
    }

    fn write_all(dir: &Path, bodies: Vec<Vec<u8>>) {
        let stats = Arc::new(Stats::default());
        let last = segments(dir).unwrap().last().copied().unwrap_or(0);
        let w = Writer::create(dir, last, 1 << 20, stats).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut waits = Vec::new();
        for body in bodies {
            let (done, wait) = tokio::sync::oneshot::channel();
            tx.send(Append { body, done }).unwrap();
            waits.push(wait);
        }
        drop(tx);
        w.run(rx);
        for w in waits {
            w.blocking_recv().unwrap().unwrap();
        }
    }

    #[test]
    fn write_scan_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let id = uuid::Uuid::now_v7();
        write_all(
            dir.path(),
            vec![
                open_body(&open_rec(&id.to_string())),
                chunk_body(&id, 0, b"zero"),
                chunk_body(&id, 1, b"one"),
            ],
        );
        let ix = scan(dir.path(), true).unwrap();
        assert!(ix.problems.is_empty(), "{:?}", ix.problems);
        let s = &ix.sessions[&id.to_string()];
        assert_eq!(s.chunks.len(), 2);
        assert_eq!(read_chunk(dir.path(), s.chunks[1].loc).unwrap(), b"one");
        assert_eq!(s.next_seq(), 2);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let id = uuid::Uuid::now_v7();
        write_all(
            dir.path(),
            vec![open_body(&open_rec(&id.to_string())), chunk_body(&id, 0, &[7u8; 1000])],
        );
        let seg = dir.path().join(segment_name(1));
        let full = std::fs::read(&seg).unwrap();
        // Every possible torn length of the last record.
        let last_start = full.len() - (RECORD_HEAD as usize + 1 + 56 + 1000);
        for cut in last_start..full.len() {
            std::fs::write(&seg, &full[..cut]).unwrap();
            let ix = scan(dir.path(), true).unwrap();
            let s = &ix.sessions[&id.to_string()];
            assert!(s.chunks.is_empty(), "cut at {cut}");
            assert_eq!(std::fs::metadata(&seg).unwrap().len() as usize, last_start);
        }
    }

    #[test]
    fn flipped_bit_is_detected_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let id = uuid::Uuid::now_v7();
        write_all(
            dir.path(),
            vec![open_body(&open_rec(&id.to_string())), chunk_body(&id, 0, &[7u8; 100])],
        );
        // A second segment makes the first one "old": corruption there is reported, not cut.
        write_all(dir.path(), vec![chunk_body(&id, 1, b"later")]);
        let seg = dir.path().join(segment_name(1));
        let mut bytes = std::fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0x10;
        std::fs::write(&seg, &bytes).unwrap();
        let ix = scan(dir.path(), true).unwrap();
        assert_eq!(ix.problems.len(), 1, "{:?}", ix.problems);
        assert!(ix.problems[0].contains("checksum mismatch"), "{:?}", ix.problems);
        let s = &ix.sessions[&id.to_string()];
        assert_eq!(s.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            std::fs::read(&seg).unwrap().len(),
            n,
            "an old segment is never truncated"
        );
    }

    #[test]
    fn group_commit_batches_many_records_into_few_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let w = Writer::create(dir.path(), 0, 64 << 20, stats.clone()).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut waits = Vec::new();
        let id = uuid::Uuid::now_v7();
        for seq in 0..1000u64 {
            let (done, wait) = tokio::sync::oneshot::channel();
            tx.send(Append {
                body: chunk_body(&id, seq, &[0u8; 100]),
                done,
            })
            .unwrap();
            waits.push(wait);
        }
        drop(tx);
        w.run(rx);
        for w in waits {
            w.blocking_recv().unwrap().unwrap();
        }
        assert_eq!(stats.records.load(Ordering::Relaxed), 1000);
        assert!(stats.fsyncs.load(Ordering::Relaxed) < 10, "{stats:?}");
    }

    #[test]
    fn carried_state_adopts_earlier_chunks_and_resume_point() {
        let dir = tempfile::tempdir().unwrap();
        let id = uuid::Uuid::now_v7();
        // Segment 1 (as if its OPEN and chunks 0..=4 were shipped and deleted):
        // chunks 5 and 6 come before the carried state in segment 2.
        write_all(
            dir.path(),
            vec![chunk_body(&id, 5, b"five"), chunk_body(&id, 6, b"six")],
        );
        let state = crate::agent::spool::StateRecord {
            open: open_rec(&id.to_string()),
            resume: (5, hex::encode([9u8; 32])),
            close: None,
            shipped: false,
        };
        write_all(dir.path(), vec![crate::agent::spool::records::state_body(&state)]);
        let ix = scan(dir.path(), false).unwrap();
        assert!(ix.problems.is_empty(), "{:?}", ix.problems);
        let s = &ix.sessions[&id.to_string()];
        assert_eq!(s.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(s.next_seq(), 7);
        assert_eq!(
            s.chain().unwrap(),
            Chain::resume(7, [6u8; 32]),
            "the newest chunk's stored hash"
        );
        assert_eq!(s.head_segment, 2);
        assert_eq!(
            ix.segments[&1][&id.to_string()],
            SegmentUse {
                head: false,
                max_seq: Some(6),
                close: false,
                bytes: 7,
            }
        );
        assert!(ix.segments[&2][&id.to_string()].head);
    }

    #[test]
    fn segments_roll_over_inside_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let w = Writer::create(dir.path(), 0, 1 << 20, stats.clone()).unwrap();
        let (tx, rx) = mpsc::channel();
        let id = uuid::Uuid::now_v7();
        let mut waits = Vec::new();
        // 3.2 MiB queued before the writer runs: one batch.
        for seq in 0..25u64 {
            let (done, wait) = tokio::sync::oneshot::channel();
            tx.send(Append {
                body: chunk_body(&id, seq, &[1u8; 128 << 10]),
                done,
            })
            .unwrap();
            waits.push(wait);
        }
        drop(tx);
        w.run(rx);
        let segs: Vec<Loc> = waits.into_iter().map(|w| w.blocking_recv().unwrap().unwrap()).collect();
        assert!(segs.last().unwrap().segment >= 4, "{:?}", segs.last());
        for id in segments(dir.path()).unwrap() {
            let len = std::fs::metadata(dir.path().join(segment_name(id))).unwrap().len();
            assert!(len < (1 << 20) + (129 << 10), "segment {id} is {len} bytes");
        }
        let ix = scan(dir.path(), false).unwrap();
        assert!(
            ix.problems.iter().all(|p| p.contains("start record is missing")),
            "{:?}",
            ix.problems
        );
    }
}
