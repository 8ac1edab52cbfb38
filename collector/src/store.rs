//! The collector's durable session store: every host's sessions, persisted
//! before they are acknowledged, checked link by link on the way in.
//!
//! # Design
//!
//! One directory per session, one writer per session. Sessions never share
//! a file, so appending to one session takes only that session's lock: a
//! thousand agents shipping at once contend on nothing but the disk. The
//! server groups the chunks of one session that arrive together into one
//! [`Store::append`] call, which costs one `fdatasync` however many chunks
//! it carries: the chunks are the truth and the index can be rebuilt from
//! them, so only the chunks are synced.
//!
//! ## Invariants
//! * A chunk is reported committed only after the `fdatasync` of its bytes
//!   returned. Its index record is written after that sync and not synced
//!   itself: after a crash an index record never points at bytes that may be
//!   missing, but the newest records may be missing while their chunks are
//!   durable. Start-up finds those chunks and writes their records again.
//! * A session's chunks are stored in sequence order, each exactly once, and
//!   each one's header links to the previous stored chunk (hash chain; chunk
//!   0 links to [`chain_seed`](shelltrail_cast::chunk::chain_seed) of the
//!   session id). A chunk that does not link is refused and the session
//!   quarantined: nothing is ever merged silently.
//! * A chunk that arrives ahead of the next expected one (a gap) is held in
//!   memory, bounded per session and in total, and stored once the gap is
//!   filled. Only the recorder can declare chunks lost (the `lost_seqs` of its
//!   `Close`): when the session's end names them, the held chunks after the
//!   gap are stored and the chain restarts there. A stored gap is therefore
//!   always explained by `end.json`; [`verify`](Store::verify) reports any
//!   other gap as missing.
//! * A session is ended (`end.json` exists) only once every chunk up to the
//!   end's `last_seq` is stored or declared lost: `ended` means complete.
//! * Host names and session ids are validated before they touch a path, so
//!   nothing is written outside the data directory.
//! * Recovery never invents or drops acknowledged data: it cuts only what a
//!   torn append can leave behind (a partial or bad last index record, bytes
//!   after the last indexed chunk). Damage anywhere else is reported and the
//!   session refuses further writes.
//!
//! ## On-disk format
//! ```text
//! DATA/                               directories 0750, files 0640
//!   lock                              held (flock) by the collector that owns DATA
//!   tmp/                              sessions being created; emptied at start-up
//!   sessions/<host>/<session-id>/
//!     start.json   {"host", "received_unix_ms", "start": SessionStart}, written once
//!     chunks.zst   the chunks' bytes concatenated in seq order: a valid .cast.zst
//!     index        one 56-byte record per stored chunk, in seq order
//!     end.json     {"received_unix_ms", "end": SessionEnd}, written once, last
//!     quarantine   why the session was rejected (text), if it was
//!     flagged      why its seal does not check out (text), if it does not; written before end.json
//!     runs.zst     once the session has ended and been compacted, in place of
//!     runs.index   chunks.zst and index: its chunks merged into runs (see
//!                  shelltrail_cast::run), a valid .cast.zst too, and one
//!                  index record per run (seq = its first chunk, sha256 = its
//!                  last chunk's link hash)
//!   host-keys/<host>                  the host's session-signing key, pinned on first use (see [`keys`])
//! index record = seq:u64le offset:u64le len:u32le sha256:[32] crc32:u32le
//!                (crc32 of the 52 bytes before it; offset and len locate the
//!                chunk in chunks.zst; sha256 is the chunk's link hash at ingest)
//! ```
//! `start.json` is written in `tmp/<id>/` with empty `chunks.zst` and `index`,
//! synced, and the directory renamed into place: a session directory always
//! has its `start.json`. `end.json` and `quarantine` are written to a
//! temporary name, synced and renamed.
//!
//! ## Lifecycle
//! [`Store::start`] (creates the session, or answers where it resumes) →
//! [`Store::append`]* → [`Store::end`] → compaction in the background
//! ([`compact`]); [`Store::quarantine`] (also done by `append`/`end` on a
//! bad chunk) stops it for good. Readers
//! ([`Store::read_chunks`], [`Store::subscribe`] for live tail,
//! [`Store::verify`], [`Store::list`]) never take the writer's lock: they read
//! only the committed prefix, which appends never change.
//!
//! ## Recovery
//! [`Store::open`] scans every session directory and builds the in-memory
//! catalogue. Per session it walks the index: a partial last record, a last
//! record whose CRC fails or whose bytes lie past the end of `chunks.zst` is a
//! torn append and is cut off. Then it walks the bytes of `chunks.zst` after
//! the last indexed chunk: each whole chunk that decompresses and continues
//! the sequence and the chain, as at ingest, gets its index record back (it
//! may have been acknowledged) once a sync of `chunks.zst` succeeds (it may
//! never have been synced); if that sync fails they are kept, unindexed, and
//! the session flagged damaged. What follows is cut only if it is what a
//! torn append leaves (zeros, or a chunk cut short: never acknowledged);
//! whole chunks that do not check out are kept and the session flagged
//! damaged. A never-written (zero) index record before written ones, which
//! lazy write-back can leave, is a torn point like the last record. A bad record before the last
//! one is damage: the session is kept readable up to it, flagged, and refuses
//! writes. The last chunk's bytes are re-hashed against its record, since
//! that hash is what the next chunk must link to.
//!
//! A crash between storing the chunks after a declared-lost gap and writing
//! `end.json` leaves a gap without its explanation until the agent, which
//! never got the end committed, sends it again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::{Deserialize, Serialize};
use shelltrail_cast::chain::{Chain, Step, Unlinked};
use shelltrail_cast::chunk::{self, ChunkError};
use shelltrail_cast::run;
use shelltrail_proto::seal;
use shelltrail_proto::v1::{CloseCheck, SessionEnd, SessionInfo, SessionStart};
use tokio::sync::watch;

pub mod compact;
pub mod disk;
pub mod keys;

use disk::{Disk, RealDisk};

/// Bytes of one index record.
pub const INDEX_RECORD_LEN: usize = 56;
const START_FILE: &str = "start.json";
const CHUNKS_FILE: &str = "chunks.zst";
const INDEX_FILE: &str = "index";
const END_FILE: &str = "end.json";
const QUARANTINE_FILE: &str = "quarantine";
const FLAG_FILE: &str = "flagged";
/// A compacted session's runs (see [`shelltrail_cast::run`]) and their index.
const RUNS_FILE: &str = "runs.zst";
const RUNS_INDEX_FILE: &str = "runs.index";
/// Where compaction writes before it commits.
const RUNS_TMP: &str = ".runs.zst.tmp";
const RUNS_INDEX_TMP: &str = ".runs.index.tmp";
/// Most index records one read fetches.
const READ_BATCH_RECORDS: usize = 1024;
/// `SessionInfo.missing_seqs` lists at most this many seqs (a recorder that
/// lost a million chunks does not make every listing huge).
pub const MAX_LISTED_MISSING: usize = 10_000;

/// Why the store refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session id {0:?} is not a canonical UUID")]
    InvalidSessionId(String),
    #[error("host name {0:?} is invalid: 1 to 253 characters of A-Z, a-z, 0-9, '.' and '-', not starting with '.'")]
    InvalidHost(String),
    #[error("unknown session {0}: send SessionStart first")]
    UnknownSession(String),
    #[error("session {session_id} belongs to another host")]
    OtherHost { session_id: String },
    /// The session's data was refused and the session is now quarantined.
    #[error("session {session_id} rejected: {reason}")]
    Rejected { session_id: String, reason: String },
    /// The session was quarantined earlier and accepts nothing.
    #[error("session {session_id} is quarantined: {reason}")]
    Quarantined { session_id: String, reason: String },
    #[error("session {session_id} has ended (last chunk {last_seq}); chunk {seq} comes after its end")]
    AfterEnd {
        session_id: String,
        seq: u64,
        last_seq: u64,
    },
    /// The session's files are damaged; it stays readable but takes no writes.
    #[error("session {session_id}'s storage is damaged: {why}")]
    Damaged { session_id: String, why: String },
    #[error("the data directory {0} is in use by another collector")]
    Locked(PathBuf),
    #[error("the store was opened read-only")]
    ReadOnly,
    // The cause is in the message, so it is not also the `source`: printed
    // with its chain (`{:#}`), it would appear twice.
    #[error("I/O error on {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path}: {why}")]
    Corrupt { path: PathBuf, why: String },
}

impl StoreError {
    /// Whether the error concerns one session only (the server answers it
    /// with `Rejected` for that session) rather than the store (the server
    /// ends the stream and the agent retries later).
    pub fn is_session_refusal(&self) -> bool {
        !matches!(
            self,
            StoreError::Locked(_) | StoreError::ReadOnly | StoreError::Io { .. } | StoreError::Corrupt { .. }
        )
    }
}

fn io_err(path: &Path, error: io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Whether `id` is a UUID in canonical form (lowercase, hyphenated): the only
/// form allowed to name a session directory.
pub fn valid_session_id(id: &str) -> bool {
    matches!(uuid::Uuid::parse_str(id), Ok(u) if u.to_string() == id)
}

/// Whether `host` may name a host directory: 1 to 253 characters of
/// `[A-Za-z0-9.-]`, not starting with a dot (so never `.` or `..`).
pub fn valid_host(host: &str) -> bool {
    (1..=253).contains(&host.len())
        && !host.starts_with('.')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

fn check_id(id: &str) -> Result<(), StoreError> {
    if valid_session_id(id) {
        Ok(())
    } else {
        Err(StoreError::InvalidSessionId(id.chars().take(64).collect()))
    }
}

fn check_host(host: &str) -> Result<(), StoreError> {
    if valid_host(host) {
        Ok(())
    } else {
        Err(StoreError::InvalidHost(host.chars().take(64).collect()))
    }
}

/// An inclusive range of chunk sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

impl SeqRange {
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn contains(&self, seq: u64) -> bool {
        (self.first..=self.last).contains(&seq)
    }
}

impl std::fmt::Display for SeqRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Adds `first..=last` to sorted, disjoint `ranges` (always above them).
fn push_range(ranges: &mut Vec<SeqRange>, first: u64, last: u64) {
    if let Some(prev) = ranges.last_mut()
        && prev.last.checked_add(1) == Some(first)
    {
        prev.last = last;
        return;
    }
    ranges.push(SeqRange { first, last });
}

/// How many seqs below `seq` the ranges hold.
fn count_below(ranges: &[SeqRange], seq: u64) -> u64 {
    ranges
        .iter()
        .take_while(|r| r.first < seq)
        .map(|r| r.last.min(seq - 1) - r.first + 1)
        .sum()
}

fn in_ranges(ranges: &[SeqRange], seq: u64) -> bool {
    ranges.iter().any(|r| r.contains(seq))
}

/// One index record: where a stored chunk is and what it hashed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexRecord {
    seq: u64,
    offset: u64,
    len: u32,
    sha256: [u8; 32],
}

impl IndexRecord {
    fn encode(&self) -> [u8; INDEX_RECORD_LEN] {
        let mut b = [0u8; INDEX_RECORD_LEN];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..52].copy_from_slice(&self.sha256);
        let crc = crc32fast::hash(&b[..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// None if the slice is not a record or its CRC fails.
    fn decode(b: &[u8]) -> Option<IndexRecord> {
        if b.len() != INDEX_RECORD_LEN {
            return None;
        }
        let crc = u32::from_le_bytes(b[52..56].try_into().ok()?);
        if crc != crc32fast::hash(&b[..52]) {
            return None;
        }
        Some(IndexRecord {
            seq: u64::from_le_bytes(b[0..8].try_into().ok()?),
            offset: u64::from_le_bytes(b[8..16].try_into().ok()?),
            len: u32::from_le_bytes(b[16..20].try_into().ok()?),
            sha256: b[20..52].try_into().ok()?,
        })
    }

    fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// What `start.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct StartRecord {
    /// The host that owns the session: the identity of the agent that
    /// started it (from its certificate), not the agent's claim in the meta.
    host: String,
    received_unix_ms: i64,
    start: SessionStart,
}

/// What `end.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct EndRecord {
    received_unix_ms: i64,
    end: SessionEnd,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Limits on chunks held in memory while waiting for a gap to be filled,
/// and how ended sessions are compacted.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Merge the chunks of ended sessions into runs (see [`compact`]).
    pub compact: bool,
    /// zstd level of the runs.
    pub compact_level: i32,
    /// Most uncompressed bytes per run.
    pub run_raw_bytes: usize,
    /// Most chunks held per session.
    pub max_held_chunks: usize,
    /// Most bytes held per session.
    pub max_held_bytes: usize,
    /// Most bytes held across all sessions.
    pub max_held_total_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compact: true,
            compact_level: 3,
            run_raw_bytes: 8 << 20,
            max_held_chunks: 64,
            max_held_bytes: 16 << 20,
            max_held_total_bytes: 512 << 20,
        }
    }
}

/// Where a session resumes: the answer to a (re)announced session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The first chunk not durably stored; the agent sends from here on.
    pub next_seq: u64,
    /// The end is durable too (and the session complete).
    pub ended: bool,
}

/// What an [`append`](Store::append) or [`end`](Store::end) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Every chunk below this is stored (or was declared lost).
    pub next_seq: u64,
    /// Chunks newly stored (and synced) by this call.
    pub stored: usize,
    /// Chunks that were already stored: accepted as retransmissions.
    pub duplicates: usize,
    /// Chunks the recorder had declared lost that arrived anyway: ignored,
    /// since the chain has already been restarted past them.
    pub ignored: Vec<u64>,
    /// Chunks ahead of `next_seq` now held in memory until the gap fills.
    pub held: Vec<u64>,
    /// Chunks ahead of `next_seq` not kept because the hold limits were
    /// reached: the agent must send them again.
    pub dropped: Vec<u64>,
    /// The session's end is durable.
    pub ended: bool,
    /// The collector cannot go on without chunk `next_seq`: later chunks
    /// were held or dropped, or the end is waiting for it. The agent should
    /// resend from here (the server says so with a `SessionPosition`).
    pub resend_from: Option<u64>,
}

impl AppendOutcome {
    /// Whether the collector is waiting for an earlier chunk; see
    /// [`resend_from`](Self::resend_from).
    pub fn has_gap(&self) -> bool {
        self.resend_from.is_some()
    }
}

/// One stored chunk, or one run of chunks once the session is compacted,
/// as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChunk {
    /// The (first) chunk's seq.
    pub seq: u64,
    /// The last chunk's seq: `seq` for a chunk.
    pub last_seq: u64,
    pub bytes: Vec<u8>,
}

/// A session as the catalogue knows it; cheap to clone.
#[derive(Debug, Clone)]
pub struct SessionSummary {
    pub session_id: String,
    pub host: String,
    pub start: Arc<SessionStart>,
    pub end: Option<Arc<SessionEnd>>,
    /// Every chunk below it is stored or was declared lost.
    pub next_seq: u64,
    /// Chunks stored.
    pub chunks: u64,
    /// Stored as runs: the session has ended and been compacted.
    pub compacted: bool,
    /// Bytes of `chunks.zst`.
    pub stored_bytes: u64,
    /// Seqs below `next_seq` that are not stored: lost at the recorder.
    pub missing: Vec<SeqRange>,
    /// Chunks held in memory ahead of a gap.
    pub held_chunks: usize,
    pub quarantine: Option<String>,
    /// Why the session's files cannot take writes, if they cannot.
    pub damaged: Option<String>,
    /// Why its seal does not check out, if it does not.
    pub flagged: Option<String>,
    /// The end of the last stored chunk's time range: milliseconds after
    /// the recorder's start.
    pub last_ms: u64,
}

impl SessionSummary {
    pub fn is_ended(&self) -> bool {
        self.end.is_some()
    }

    /// When the session started: when the agent saw it open. The
    /// recorder's own start time is a claim (whatever spoke to the agent's
    /// socket wrote it); it is used only for a session whose agent did not
    /// say.
    pub fn start_unix_ms(&self) -> i64 {
        match self.start.opened_unix_ms {
            0 => self.start.meta.as_ref().map_or(0, |m| m.start_unix_ms),
            t => t,
        }
    }

    /// When the session ended, if it has: when the agent recorded its end
    /// (the recorder's end time only if the agent did not say).
    pub fn end_unix_ms(&self) -> Option<i64> {
        let end = self.end.as_ref()?;
        Some(match end.closed_unix_ms {
            0 => end.close.as_ref().map_or(0, |c| c.end_unix_ms),
            t => t,
        })
    }

    /// The missing seqs one by one, at most [`MAX_LISTED_MISSING`].
    pub fn missing_seqs(&self) -> Vec<u64> {
        self.missing
            .iter()
            .flat_map(|r| r.first..=r.last)
            .take(MAX_LISTED_MISSING)
            .collect()
    }

    /// The `SessionInfo` the Query service returns.
    pub fn to_proto(&self) -> SessionInfo {
        let quarantine = [
            self.quarantine.clone(),
            self.damaged.as_ref().map(|d| format!("storage damaged: {d}")),
            self.flagged.as_ref().map(|f| format!("seal: {f}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ");
        SessionInfo {
            host: self.host.clone(),
            start: Some((*self.start).clone()),
            end: self.end.as_deref().cloned(),
            next_seq: self.next_seq,
            stored_bytes: self.stored_bytes,
            missing_seqs: self.missing_seqs(),
            quarantine,
            host_key: Vec::new(),
            last_activity_unix_ms: self.last_activity_unix_ms(),
            host_connected: false,
        }
    }

    /// When the session last recorded anything: the recorder's start plus
    /// its last stored chunk's end (both the host's clock).
    pub fn last_activity_unix_ms(&self) -> i64 {
        let start = match self.start.meta.as_ref().map_or(0, |m| m.start_unix_ms) {
            0 => self.start_unix_ms(),
            t => t,
        };
        start.saturating_add(i64::try_from(self.last_ms).unwrap_or(i64::MAX / 2))
    }

    /// Only the user the agent verified: the login name in the recorder's
    /// metadata is a claim.
    fn user_matches(&self, user: &str) -> bool {
        self.start.verified_user == user
    }
}

/// Which sessions [`Store::list`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateFilter {
    #[default]
    Any,
    Live,
    Ended,
}

/// A filter for [`Store::list`]; `None` fields match everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub host: Option<String>,
    /// Matches the user the agent verified, never the recorder's claimed
    /// login name.
    pub user: Option<String>,
    /// Times are the agent's (see [`SessionSummary::start_unix_ms`]).
    /// Sessions still running at or after this time (live sessions always are).
    pub since_unix_ms: Option<i64>,
    /// Sessions started at or before this time.
    pub until_unix_ms: Option<i64>,
    pub state: StateFilter,
}

impl ListFilter {
    pub fn matches(&self, s: &SessionSummary) -> bool {
        if self.host.as_deref().is_some_and(|h| !s.host.eq_ignore_ascii_case(h)) {
            return false;
        }
        if self.user.as_deref().is_some_and(|u| !s.user_matches(u)) {
            return false;
        }
        if let Some(since) = self.since_unix_ms
            && s.end_unix_ms().is_some_and(|end| end < since)
        {
            return false;
        }
        if self.until_unix_ms.is_some_and(|until| s.start_unix_ms() > until) {
            return false;
        }
        match self.state {
            StateFilter::Any => true,
            StateFilter::Live => !s.is_ended(),
            StateFilter::Ended => s.is_ended(),
        }
    }
}

/// Mutable state of one session; behind the session's own lock.
#[derive(Debug)]
struct SessionState {
    /// Committed length of `chunks.zst`.
    chunks_len: u64,
    /// Committed index records.
    records: u64,
    /// Chunks they hold: `records` until compaction merges chunks into runs.
    parts: u64,
    /// The session is stored as runs (`runs.zst`), for good.
    compacted: bool,
    /// The next chunk wanted: past `chain`'s next seq only by the seqs an
    /// end skipped as declared lost (all in `missing`).
    next_seq: u64,
    /// The stored chunks' chain: the link hash of the last one (or the
    /// chain seed), what the next chunk's prev_hash must be.
    chain: Chain,
    missing: Vec<SeqRange>,
    /// Chunks ahead of a gap, with their link hashes.
    held: BTreeMap<u64, (Vec<u8>, [u8; 32])>,
    held_bytes: usize,
    end: Option<Arc<SessionEnd>>,
    quarantine: Option<String>,
    damaged: Option<String>,
    flagged: Option<String>,
    /// The last stored chunk's end (see [`SessionSummary::last_ms`]).
    last_ms: u64,
}

impl SessionState {
    fn empty(id: &str) -> Self {
        SessionState {
            chunks_len: 0,
            records: 0,
            parts: 0,
            compacted: false,
            next_seq: 0,
            chain: Chain::new(id),
            missing: Vec::new(),
            held: BTreeMap::new(),
            held_bytes: 0,
            end: None,
            quarantine: None,
            damaged: None,
            flagged: None,
            last_ms: 0,
        }
    }

    fn usable(&self, id: &str) -> Result<(), StoreError> {
        if let Some(reason) = &self.quarantine {
            return Err(StoreError::Quarantined {
                session_id: id.to_owned(),
                reason: reason.clone(),
            });
        }
        if let Some(why) = &self.damaged {
            return Err(StoreError::Damaged {
                session_id: id.to_owned(),
                why: why.clone(),
            });
        }
        Ok(())
    }
}

/// One session in the catalogue.
#[derive(Debug)]
struct Slot {
    id: String,
    host: String,
    dir: PathBuf,
    start: Arc<SessionStart>,
    /// False while the session is being created, and forever if creating
    /// it failed (the slot is then removed from the catalogue).
    ready: AtomicBool,
    state: Mutex<SessionState>,
    /// The latest summary, for readers and followers (live tail).
    summary: watch::Sender<SessionSummary>,
}

impl Slot {
    fn new(id: &str, host: &str, dir: PathBuf, start: Arc<SessionStart>, state: SessionState) -> Slot {
        let summary = summarize(id, host, &start, &state);
        Slot {
            id: id.to_owned(),
            host: host.to_owned(),
            dir,
            start,
            ready: AtomicBool::new(false),
            state: Mutex::new(state),
            summary: watch::Sender::new(summary),
        }
    }

    fn publish(&self, st: &SessionState) {
        self.summary
            .send_replace(summarize(&self.id, &self.host, &self.start, st));
    }
}

fn summarize(id: &str, host: &str, start: &Arc<SessionStart>, st: &SessionState) -> SessionSummary {
    SessionSummary {
        session_id: id.to_owned(),
        host: host.to_owned(),
        start: start.clone(),
        end: st.end.clone(),
        next_seq: st.next_seq,
        chunks: st.parts,
        stored_bytes: st.chunks_len,
        compacted: st.compacted,
        missing: st.missing.clone(),
        held_chunks: st.held.len(),
        quarantine: st.quarantine.clone(),
        damaged: st.damaged.clone(),
        flagged: st.flagged.clone(),
        last_ms: st.last_ms,
    }
}

/// Locks a mutex, taking the data even if a panic poisoned it: every state
/// change is made after the writes it describes, so the state stays valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Chunks accepted by one call, not yet written.
struct Batch {
    next_seq: u64,
    chain: Chain,
    chunks_len: u64,
    writes: Vec<(IndexRecord, Vec<u8>)>,
    new_missing: Vec<SeqRange>,
}

impl Batch {
    fn new(st: &SessionState) -> Batch {
        Batch {
            next_seq: st.next_seq,
            chain: st.chain,
            chunks_len: st.chunks_len,
            writes: Vec::new(),
            new_missing: Vec::new(),
        }
    }

    /// Adds the chunk `seq == self.next_seq` after checking that it links to
    /// the previous one; after seqs an end skipped as declared lost (the
    /// only gap below `next_seq`), the chain restarts at it.
    fn push(&mut self, seq: u64, data: Vec<u8>, sha256: [u8; 32]) -> Result<(), String> {
        debug_assert_eq!(seq, self.next_seq);
        let (header, _) = chunk::parse(&data).map_err(|e| format!("chunk {seq} is malformed: {e}"))?;
        let mut chain = self.chain;
        match chain.accept(&header, sha256) {
            Ok(Step::Next | Step::AfterGap { .. }) => {}
            Ok(Step::Repeat) | Err(_) => {
                let what = if seq == 0 {
                    "the chain seed of this session id (chunk of another session?)".to_owned()
                } else {
                    format!(
                        "the link hash of stored chunk {} ({})",
                        seq - 1,
                        short_hex(&self.chain.last_hash())
                    )
                };
                return Err(format!(
                    "hash chain broken at chunk {seq}: its prev_hash {} is not {what}",
                    short_hex(&header.prev_hash)
                ));
            }
        }
        let len = u32::try_from(data.len()).map_err(|_| format!("chunk {seq} is larger than 4 GiB"))?;
        let rec = IndexRecord {
            seq,
            offset: self.chunks_len,
            len,
            sha256,
        };
        self.chunks_len += u64::from(len);
        self.chain = chain;
        self.next_seq = chain.next_seq();
        self.writes.push((rec, data));
        Ok(())
    }

    /// Skips `self.next_seq`, declared lost at the recorder.
    fn skip_lost(&mut self) {
        push_range(&mut self.new_missing, self.next_seq, self.next_seq);
        self.next_seq += 1;
    }
}

fn short_hex(h: &[u8; 32]) -> String {
    hex::encode(&h[..8])
}

/// Checks what can be checked of a chunk on its own: it decodes, and its
/// header's seq is the one it was sent as. Returns its link hash.
fn check_chunk(seq: u64, data: &[u8]) -> Result<[u8; 32], String> {
    match chunk::check(data, seq) {
        Ok((_, hash)) => Ok(hash),
        Err(e @ chunk::ChunkError::WrongSeq { .. }) => Err(e.to_string()),
        Err(e) => Err(format!("chunk {seq} is malformed: {e}")),
    }
}

/// The durable session store. See the module documentation.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    opts: StoreOptions,
    writable: bool,
    /// Where `chunks.zst` and `index` are written (see [`disk`]).
    disk: Arc<dyn Disk>,
    sessions: RwLock<HashMap<String, Arc<Slot>>>,
    held_total: AtomicUsize,
    /// Compacts ended sessions in the background (a writable store with
    /// `compact` on). Declared before the lock so that it stops first.
    compactor: Option<compact::Compactor>,
    /// Holds the data directory's lock for as long as the store lives.
    _lock: Option<File>,
}

/// What the catalogue scan found that could not be loaded normally.
fn damaged_state(id: &str, why: String) -> SessionState {
    let mut st = SessionState::empty(id);
    st.damaged = Some(why);
    st
}

impl Store {
    /// Opens (creating it if needed) the data directory for writing, with
    /// the default hold limits; see [`open_with`](Self::open_with).
    pub fn open(root: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::open_with(root, StoreOptions::default())
    }

    /// Opens the data directory for writing: takes its lock (one collector
    /// per directory), empties `tmp/`, scans every session and repairs torn
    /// tails (see Recovery in the module documentation).
    pub fn open_with(root: impl AsRef<Path>, opts: StoreOptions) -> Result<Store, StoreError> {
        Self::open_on(Arc::new(RealDisk), root, opts)
    }

    /// Like [`open_with`](Self::open_with), writing the sessions' chunks and
    /// index through `disk` (tests make it fail; see [`disk`]).
    pub fn open_on(disk: Arc<dyn Disk>, root: impl AsRef<Path>, opts: StoreOptions) -> Result<Store, StoreError> {
        let root = root.as_ref().to_path_buf();
        for d in [root.clone(), root.join("sessions"), root.join("tmp")] {
            make_dir(&d, true).map_err(|e| io_err(&d, e))?;
        }
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(root)),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, e)),
        }
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(|e| io_err(&tmp, e))? {
            let p = e.map_err(|e| io_err(&tmp, e))?.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|e| io_err(&p, e))?;
        }
        let compactor = match opts.compact {
            true => Some(compact::Compactor::start(&opts).map_err(|e| io_err(&root, e))?),
            false => None,
        };
        let store = Store {
            root,
            opts,
            writable: true,
            disk,
            sessions: RwLock::new(HashMap::new()),
            held_total: AtomicUsize::new(0),
            compactor,
            _lock: Some(lock),
        };
        store.scan()?;
        // Sessions that ended before a restart and were not compacted yet.
        if let Some(c) = &store.compactor {
            let map = store.sessions.read().unwrap_or_else(|e| e.into_inner());
            for slot in map.values() {
                if compact::wanted(&self::lock(&slot.state)) {
                    c.enqueue(slot.clone());
                }
            }
        }
        Ok(store)
    }

    /// Opens the data directory to read it (the CLI, possibly while a
    /// collector runs): no lock, no repair, every write refused. A torn tail
    /// is left alone and not read.
    pub fn open_read_only(root: impl AsRef<Path>) -> Result<Store, StoreError> {
        let sessions = root.as_ref().join("sessions");
        if let Err(e) = fs::metadata(&sessions) {
            return Err(io_err(&sessions, e));
        }
        let store = Store {
            root: root.as_ref().to_path_buf(),
            opts: StoreOptions::default(),
            writable: false,
            disk: Arc::new(RealDisk),
            sessions: RwLock::new(HashMap::new()),
            held_total: AtomicUsize::new(0),
            compactor: None,
            _lock: None,
        };
        store.scan()?;
        Ok(store)
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn session_path(&self, host: &str, id: &str) -> PathBuf {
        self.root.join("sessions").join(host).join(id)
    }

    fn scan(&self) -> Result<(), StoreError> {
        let sessions_dir = self.root.join("sessions");
        let hosts = match fs::read_dir(&sessions_dir) {
            Ok(h) => h,
            Err(e) => return Err(io_err(&sessions_dir, e)),
        };
        let mut dirs = Vec::new();
        for h in hosts {
            let h = h.map_err(|e| io_err(&sessions_dir, e))?;
            let host = h.file_name().to_string_lossy().into_owned();
            if !valid_host(&host) || !h.path().is_dir() {
                tracing::warn!(path = %h.path().display(), "ignoring an entry that is not a valid host directory");
                continue;
            }
            let host_dir = h.path();
            for s in fs::read_dir(&host_dir).map_err(|e| io_err(&host_dir, e))? {
                let s = s.map_err(|e| io_err(&host_dir, e))?;
                let id = s.file_name().to_string_lossy().into_owned();
                if !valid_session_id(&id) || !s.path().is_dir() {
                    tracing::warn!(path = %s.path().display(), "ignoring an entry that is not a session directory");
                    continue;
                }
                dirs.push((host.clone(), id));
            }
        }
        // Deterministic: should the same id exist under two hosts (it
        // cannot, unless someone copied files), the first host wins.
        dirs.sort();
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        for (host, id) in dirs {
            if map.contains_key(&id) {
                tracing::error!(session = %id, host = %host, "session id already present under another host; ignored");
                continue;
            }
            let dir = self.session_path(&host, &id);
            let (start, state) = match load_session(self.disk.as_ref(), &dir, &host, &id, self.writable) {
                Ok(loaded) => loaded,
                Err(why) => {
                    tracing::error!(session = %id, host = %host, "session storage damaged: {why}");
                    let start = SessionStart {
                        meta: Some(shelltrail_proto::v1::SessionMeta {
                            session_id: id.clone(),
                            host: host.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    };
                    (start, damaged_state(&id, why))
                }
            };
            if let Some(why) = &state.damaged {
                tracing::error!(session = %id, host = %host, "session storage damaged: {why}");
            }
            let slot = Slot::new(&id, &host, dir, Arc::new(start), state);
            slot.ready.store(true, Ordering::Release);
            map.insert(id, Arc::new(slot));
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.writable {
            Ok(())
        } else {
            Err(StoreError::ReadOnly)
        }
    }

    fn slot(&self, id: &str) -> Option<Arc<Slot>> {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.get(id).filter(|s| s.ready.load(Ordering::Acquire)).cloned()
    }

    /// The session, if it exists and belongs to `host`.
    fn owned_slot(&self, host: &str, id: &str) -> Result<Arc<Slot>, StoreError> {
        check_host(host)?;
        check_id(id)?;
        let slot = self.slot(id).ok_or_else(|| StoreError::UnknownSession(id.to_owned()))?;
        if slot.host != host {
            return Err(StoreError::OtherHost {
                session_id: id.to_owned(),
            });
        }
        Ok(slot)
    }

    /// Announces a session of `host` (the agent's certified identity).
    ///
    /// Creates it durably the first time; afterwards (a reconnect, or the
    /// same start sent twice) answers where it resumes and keeps the first
    /// start's content. A session id already used by another host is refused.
    pub fn start(&self, host: &str, start: &SessionStart) -> Result<Position, StoreError> {
        self.writable()?;
        check_host(host)?;
        let id = start.meta.as_ref().map_or("", |m| m.session_id.as_str());
        check_id(id)?;
        loop {
            let existing = {
                let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
                map.get(id).cloned()
            };
            if let Some(slot) = existing {
                if slot.host != host {
                    return Err(StoreError::OtherHost {
                        session_id: id.to_owned(),
                    });
                }
                // Waits for a concurrent creation to finish.
                let st = lock(&slot.state);
                if !slot.ready.load(Ordering::Acquire) {
                    // Its creation failed and it left the catalogue: retry.
                    drop(st);
                    continue;
                }
                st.usable(id)?;
                return Ok(Position {
                    next_seq: st.next_seq,
                    ended: st.end.is_some(),
                });
            }

            let dir = self.session_path(host, id);
            let slot = Arc::new(Slot::new(
                id,
                host,
                dir,
                Arc::new(start.clone()),
                SessionState::empty(id),
            ));
            let guard = lock(&slot.state);
            {
                let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
                if map.contains_key(id) {
                    continue;
                }
                map.insert(id.to_owned(), slot.clone());
            }
            match self.create_on_disk(host, id, start) {
                Ok(()) => {
                    slot.ready.store(true, Ordering::Release);
                    drop(guard);
                    return Ok(Position {
                        next_seq: 0,
                        ended: false,
                    });
                }
                Err(e) => {
                    self.sessions.write().unwrap_or_else(|e| e.into_inner()).remove(id);
                    drop(guard);
                    return Err(e);
                }
            }
        }
    }

    /// Writes a new session's directory in `tmp/`, syncs it and renames it
    /// into place, so a session directory always has its start.json.
    fn create_on_disk(&self, host: &str, id: &str, start: &SessionStart) -> Result<(), StoreError> {
        let tmp = self.root.join("tmp").join(id);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        }
        make_dir(&tmp, false).map_err(|e| io_err(&tmp, e))?;
        let record = StartRecord {
            host: host.to_owned(),
            received_unix_ms: now_ms(),
            start: start.clone(),
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| StoreError::Corrupt {
            path: tmp.join(START_FILE),
            why: format!("cannot encode the start: {e}"),
        })?;
        write_synced(&tmp.join(START_FILE), &json)?;
        for name in [CHUNKS_FILE, INDEX_FILE] {
            let p = tmp.join(name);
            create_file(&p).map_err(|e| io_err(&p, e))?;
        }
        sync_dir(&tmp)?;

        let sessions = self.root.join("sessions");
        let host_dir = sessions.join(host);
        if !host_dir.is_dir() {
            match make_dir(&host_dir, false) {
                Ok(()) => sync_dir(&sessions)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&host_dir, e)),
            }
        }
        let dest = host_dir.join(id);
        fs::rename(&tmp, &dest).map_err(|e| io_err(&dest, e))?;
        sync_dir(&host_dir)?;
        let tmp_root = self.root.join("tmp");
        sync_dir(&tmp_root)
    }

    /// Stores chunks `(seq, bytes)` of a session of `host`, in the order
    /// given, and returns once they are durable.
    ///
    /// Each chunk must decode and carry its seq in its header. The next
    /// expected chunk must link to the previous stored one; a chunk already
    /// stored is a retransmission (accepted, if identical); a later chunk is
    /// held until the gap fills (see [`AppendOutcome`]). A chunk that breaks
    /// these rules gets the session quarantined: the valid chunks before it
    /// are still stored, and the error is [`StoreError::Rejected`].
    pub fn append(
        &self,
        host: &str,
        session_id: &str,
        chunks: Vec<(u64, Vec<u8>)>,
    ) -> Result<AppendOutcome, StoreError> {
        self.writable()?;
        let slot = self.owned_slot(host, session_id)?;
        let mut st = lock(&slot.state);
        st.usable(session_id)?;
        let mut out = AppendOutcome::default();
        let mut batch = Batch::new(&st);
        let mut failure = None;
        let mut after_end = None;
        for (seq, data) in chunks {
            if seq < batch.next_seq {
                match self.duplicate(&slot, &st, &batch, seq, &data)? {
                    Dup::Same => out.duplicates += 1,
                    Dup::Lost => out.ignored.push(seq),
                    Dup::Different(why) => {
                        failure = Some(why);
                        break;
                    }
                }
                continue;
            }
            if let Some(end) = &st.end {
                after_end = Some((seq, end.close.as_ref().map_or(0, |c| c.last_seq)));
                break;
            }
            let hash = match check_chunk(seq, &data) {
                Ok(h) => h,
                Err(why) => {
                    failure = Some(why);
                    break;
                }
            };
            if seq == batch.next_seq {
                if let Err(why) = batch.push(seq, data, hash) {
                    failure = Some(why);
                    break;
                }
                if let Err(why) = self.drain_held(&mut st, &mut batch, None) {
                    failure = Some(why);
                    break;
                }
            } else {
                match st.held.get(&seq) {
                    Some((held, _)) if *held == data => out.duplicates += 1,
                    Some(_) => {
                        failure = Some(format!("chunk {seq} was sent twice with different content"));
                        break;
                    }
                    None => {
                        let total = self.held_total.load(Ordering::Relaxed);
                        if st.held.len() >= self.opts.max_held_chunks
                            || st.held_bytes + data.len() > self.opts.max_held_bytes
                            || total + data.len() > self.opts.max_held_total_bytes
                        {
                            out.dropped.push(seq);
                        } else {
                            st.held_bytes += data.len();
                            self.held_total.fetch_add(data.len(), Ordering::Relaxed);
                            st.held.insert(seq, (data, hash));
                            out.held.push(seq);
                        }
                    }
                }
            }
        }
        out.stored = batch.writes.len();
        let commit = self.commit(&slot, &mut st, batch);
        if let Some(why) = failure {
            self.quarantine_locked(&slot, &mut st, &why);
            return Err(StoreError::Rejected {
                session_id: session_id.to_owned(),
                reason: why,
            });
        }
        slot.publish(&st);
        commit?;
        if let Some((seq, last_seq)) = after_end {
            return Err(StoreError::AfterEnd {
                session_id: session_id.to_owned(),
                seq,
                last_seq,
            });
        }
        // Held chunks stored by this call are no longer "held".
        out.held.retain(|s| st.held.contains_key(s));
        out.next_seq = st.next_seq;
        out.ended = st.end.is_some();
        if !out.held.is_empty() || !out.dropped.is_empty() {
            out.resend_from = Some(st.next_seq);
        }
        Ok(out)
    }

    /// Moves held chunks that now follow on into the batch; with `lost`
    /// (the session's end), skips the declared-lost seqs up to `last_seq`
    /// and restarts the chain after them.
    fn drain_held(
        &self,
        st: &mut SessionState,
        batch: &mut Batch,
        lost: Option<(&HashSet<u64>, u64)>,
    ) -> Result<(), String> {
        loop {
            let seq = batch.next_seq;
            if let Some((data, hash)) = st.held.remove(&seq) {
                st.held_bytes -= data.len();
                self.held_total.fetch_sub(data.len(), Ordering::Relaxed);
                batch.push(seq, data, hash)?;
                continue;
            }
            match lost {
                Some((lost, last_seq)) if seq <= last_seq && lost.contains(&seq) => {
                    batch.skip_lost();
                }
                _ => return Ok(()),
            }
        }
    }

    /// Whether `seq` (below the batch's next seq) is a faithful retransmission.
    fn duplicate(
        &self,
        slot: &Slot,
        st: &SessionState,
        batch: &Batch,
        seq: u64,
        data: &[u8],
    ) -> Result<Dup, StoreError> {
        if in_ranges(&st.missing, seq) || in_ranges(&batch.new_missing, seq) {
            return Ok(Dup::Lost);
        }
        let stored_hash = if seq >= st.next_seq {
            match batch.writes.iter().find(|(r, _)| r.seq == seq) {
                Some((r, _)) => r.sha256,
                None => return Ok(Dup::Lost),
            }
        } else if st.compacted {
            stored_part_hash(&slot.dir, seq)?
        } else {
            let pos = seq - count_below(&st.missing, seq);
            let path = slot.dir.join(INDEX_FILE);
            let rec = read_records(&path, pos, 1)?;
            match rec.first() {
                Some(r) if r.seq == seq => r.sha256,
                _ => {
                    return Err(StoreError::Corrupt {
                        path,
                        why: format!("index record {pos} is not chunk {seq}"),
                    });
                }
            }
        };
        if chunk::hash(data).is_ok_and(|h| h == stored_hash) {
            Ok(Dup::Same)
        } else {
            Ok(Dup::Different(format!(
                "chunk {seq} was sent again with different content than the stored one"
            )))
        }
    }

    /// Writes and syncs a batch: chunk bytes first, then index records.
    /// On failure, cuts both files back to their committed length.
    fn commit(&self, slot: &Slot, st: &mut SessionState, batch: Batch) -> Result<(), StoreError> {
        if !batch.writes.is_empty() {
            if let Err(e) = write_batch(self.disk.as_ref(), &slot.dir, st, &batch) {
                if let Err(undo) = rollback(self.disk.as_ref(), &slot.dir, st) {
                    let why = format!("a write failed ({e}) and could not be undone ({undo})");
                    tracing::error!(session = %slot.id, "{why}");
                    st.damaged = Some(why);
                }
                return Err(e);
            }
            if let Some((_, data)) = batch.writes.last()
                && let Ok((h, _)) = chunk::parse(data)
            {
                st.last_ms = h.end_ms;
            }
            st.chunks_len = batch.chunks_len;
            st.records += batch.writes.len() as u64;
            st.parts += batch.writes.len() as u64;
            st.chain = batch.chain;
        }
        st.next_seq = batch.next_seq;
        for r in batch.new_missing {
            push_range(&mut st.missing, r.first, r.last);
        }
        Ok(())
    }

    /// Ends a session of `host`.
    ///
    /// Stores the held chunks that follow on, skipping the seqs the recorder
    /// declared lost (the chain restarts after them). If every chunk up to
    /// the end's `last_seq` is then stored or lost, `end.json` is written and
    /// the outcome says `ended`; otherwise the outcome's `next_seq` is the
    /// first chunk still needed and nothing is ended. Ending twice is a no-op.
    pub fn end(&self, host: &str, end: &SessionEnd) -> Result<AppendOutcome, StoreError> {
        self.writable()?;
        let id = end.session_id.as_str();
        let slot = self.owned_slot(host, id)?;
        let mut st = lock(&slot.state);
        st.usable(id)?;
        let done = |st: &SessionState| AppendOutcome {
            next_seq: st.next_seq,
            ended: st.end.is_some(),
            ..Default::default()
        };
        if st.end.is_some() {
            return Ok(done(&st));
        }
        let close = end.close.clone().unwrap_or_default();
        let last_seq = close.last_seq;
        let lost: HashSet<u64> = close.lost_seqs.iter().copied().collect();
        let beyond = last_seq
            .checked_add(1)
            .and_then(|b| st.held.range(b..).next().map(|(s, _)| *s));
        let mut failure =
            beyond.map(|s| format!("chunk {s} was sent but the session's end says its last chunk is {last_seq}"));
        let mut batch = Batch::new(&st);
        if failure.is_none()
            && let Err(why) = self.drain_held(&mut st, &mut batch, Some((&lost, last_seq)))
        {
            failure = Some(why);
        }
        let stored = batch.writes.len();
        let commit = self.commit(&slot, &mut st, batch);
        if let Some(why) = failure {
            self.quarantine_locked(&slot, &mut st, &why);
            return Err(StoreError::Rejected {
                session_id: id.to_owned(),
                reason: why,
            });
        }
        slot.publish(&st);
        commit?;
        let empty = st.records == 0 && st.next_seq == 0 && st.held.is_empty() && last_seq == 0;
        if st.next_seq <= last_seq && !empty {
            let mut out = done(&st);
            out.stored = stored;
            out.held = st.held.keys().copied().collect();
            out.resend_from = Some(st.next_seq);
            return Ok(out);
        }
        // Complete: the seal covers exactly what is stored now. A bad one
        // is kept (the end is the agent's word either way) and flagged,
        // before the end is, so a crash between them loses no flag.
        if let Some(why) = self.seal_problem(&slot, &st, end) {
            tracing::warn!(session = %id, host, "session flagged: {why}");
            write_atomic(&slot.dir, FLAG_FILE, why.as_bytes())?;
            st.flagged = Some(why);
        }
        let record = EndRecord {
            received_unix_ms: now_ms(),
            end: end.clone(),
        };
        let path = slot.dir.join(END_FILE);
        let json = serde_json::to_vec_pretty(&record).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            why: format!("cannot encode the end: {e}"),
        })?;
        write_atomic(&slot.dir, END_FILE, &json)?;
        st.end = Some(Arc::new(end.clone()));
        slot.publish(&st);
        let mut out = done(&st);
        out.stored = stored;
        if let Some(c) = &self.compactor
            && compact::wanted(&st)
        {
            c.enqueue(slot.clone());
        }
        Ok(out)
    }

    /// Why a complete session's seal does not check out against the chain
    /// stored and the key pinned for its host; None if it does, or if the
    /// session is unsigned (`verify` says so; an older agent is no fault).
    fn seal_problem(&self, slot: &Slot, st: &SessionState, end: &SessionEnd) -> Option<String> {
        let seal = end.seal.as_ref()?;
        let key = match keys::pinned(&self.root, &slot.host) {
            Ok(Some(k)) => k,
            Ok(None) => {
                return Some(format!(
                    "sealed, but no signing key is pinned for host {} to check it with",
                    slot.host
                ));
            }
            Err(e) => return Some(format!("cannot read the pinned key of host {}: {e}", slot.host)),
        };
        let facts = seal::Facts::of(&slot.start, end, st.parts, st.chain.last_hash());
        match seal::check(seal, &facts, &key) {
            Err(e) => Some(e.to_string()),
            Ok(()) if seal.close_check() == CloseCheck::Disagreed => {
                Some(format!("the agent sealed it as cut short: {}", seal.close_problem))
            }
            Ok(()) => None,
        }
    }

    /// Pins `key` as `host`'s session-signing key if none is (see [`keys`]).
    pub fn pin_host_key(&self, host: &str, key: &seal::PublicKey) -> Result<keys::KeyPin, StoreError> {
        self.writable()?;
        keys::pin(&self.root, host, key)
    }

    /// The session-signing key pinned for `host`, if any.
    pub fn host_key(&self, host: &str) -> Result<Option<seal::PublicKey>, StoreError> {
        keys::pinned(&self.root, host)
    }

    /// Quarantines a session: it accepts nothing more, and says why. The
    /// stored chunks stay for inspection.
    pub fn quarantine(&self, session_id: &str, reason: &str) -> Result<(), StoreError> {
        self.writable()?;
        check_id(session_id)?;
        let slot = self
            .slot(session_id)
            .ok_or_else(|| StoreError::UnknownSession(session_id.to_owned()))?;
        let mut st = lock(&slot.state);
        self.quarantine_locked(&slot, &mut st, reason);
        Ok(())
    }

    fn quarantine_locked(&self, slot: &Slot, st: &mut SessionState, reason: &str) {
        tracing::warn!(session = %slot.id, host = %slot.host, "session quarantined: {reason}");
        if let Err(e) = write_atomic(&slot.dir, QUARANTINE_FILE, reason.as_bytes()) {
            tracing::error!(session = %slot.id, "cannot write the quarantine file: {e}");
        }
        self.held_total.fetch_sub(st.held_bytes, Ordering::Relaxed);
        st.held.clear();
        st.held_bytes = 0;
        st.quarantine = Some(reason.to_owned());
        slot.publish(st);
    }

    /// The session's summary.
    pub fn info(&self, session_id: &str) -> Option<SessionSummary> {
        self.slot(session_id).map(|s| s.summary.borrow().clone())
    }

    /// Sessions matching `filter`, newest first.
    pub fn list(&self, filter: &ListFilter) -> Vec<SessionSummary> {
        let slots: Vec<Arc<Slot>> = {
            let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            map.values()
                .filter(|s| s.ready.load(Ordering::Acquire))
                .cloned()
                .collect()
        };
        let mut out: Vec<SessionSummary> = slots
            .iter()
            .map(|s| s.summary.borrow().clone())
            .filter(|s| filter.matches(s))
            .collect();
        out.sort_by(|a, b| {
            b.start_unix_ms()
                .cmp(&a.start_unix_ms())
                .then_with(|| b.session_id.cmp(&a.session_id))
        });
        out
    }

    /// A receiver that sees the session's summary change as chunks are
    /// committed and when it ends or is quarantined: the hook for live tail.
    pub fn subscribe(&self, session_id: &str) -> Option<watch::Receiver<SessionSummary>> {
        self.slot(session_id).map(|s| s.summary.subscribe())
    }

    /// The session's directory.
    pub fn session_dir(&self, session_id: &str) -> Option<PathBuf> {
        self.slot(session_id).map(|s| s.dir.clone())
    }

    /// Committed chunks of a session from the first stored seq at or after
    /// `from_seq`, in order: as many as fit in `max_bytes` (at least one),
    /// at most 1024. Empty when there is nothing more yet. Once the session
    /// is compacted these are runs, the first one holding `from_seq` (or
    /// the first stored seq after it), so it may start before `from_seq`.
    pub fn read_chunks(
        &self,
        session_id: &str,
        from_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<StoredChunk>, StoreError> {
        check_id(session_id)?;
        let slot = self
            .slot(session_id)
            .ok_or_else(|| StoreError::UnknownSession(session_id.to_owned()))?;
        // The summary first, then the files: a summary of the chunks never
        // claims more than the chunk files hold.
        let (records, stored_bytes, pos, next_seq) = {
            let s = slot.summary.borrow();
            (
                s.chunks,
                s.stored_bytes,
                from_seq - count_below(&s.missing, from_seq),
                s.next_seq,
            )
        };
        if from_seq >= next_seq {
            return Ok(Vec::new());
        }
        let files = Files::open(&slot.dir)?;
        if files.runs {
            return read_runs(&files, from_seq, max_bytes);
        }
        if pos >= records {
            return Ok(Vec::new());
        }
        let want = (records - pos).min(READ_BATCH_RECORDS as u64) as usize;
        let recs = read_records_from(&files.index, &files.index_path, pos, want)?;
        let mut take = 0;
        let mut bytes = 0usize;
        for r in &recs {
            if take > 0 && bytes + r.len as usize > max_bytes {
                break;
            }
            bytes += r.len as usize;
            take += 1;
        }
        let recs = &recs[..take];
        let (Some(first), Some(last)) = (recs.first(), recs.last()) else {
            return Ok(Vec::new());
        };
        if last.end() > stored_bytes || first.offset > last.offset {
            return Err(StoreError::Corrupt {
                path: files.index_path,
                why: format!("index records {pos}.. point outside the committed chunks"),
            });
        }
        let buf = files.read_at(first.offset, (last.end() - first.offset) as usize)?;
        let mut out = Vec::with_capacity(recs.len());
        for r in recs {
            let at = (r.offset - first.offset) as usize;
            let Some(bytes) = buf.get(at..at + r.len as usize) else {
                return Err(StoreError::Corrupt {
                    path: files.index_path,
                    why: format!("index record for chunk {} overlaps another", r.seq),
                });
            };
            out.push(StoredChunk {
                seq: r.seq,
                last_seq: r.seq,
                bytes: bytes.to_vec(),
            });
        }
        Ok(out)
    }

    /// Copies the session's committed recording (`chunks.zst`, or `runs.zst`
    /// once compacted: either is a zstd-compressed asciicast file) to `out`;
    /// returns the bytes copied.
    pub fn copy_recording(&self, session_id: &str, out: &mut dyn Write) -> Result<u64, StoreError> {
        check_id(session_id)?;
        let slot = self
            .slot(session_id)
            .ok_or_else(|| StoreError::UnknownSession(session_id.to_owned()))?;
        let len = slot.summary.borrow().stored_bytes;
        let files = Files::open(&slot.dir)?;
        let len = if files.runs { files.data_len()? } else { len };
        let mut limited = io::Read::take(&files.data, len);
        io::copy(&mut limited, out).map_err(|e| io_err(&files.data_path, e))
    }

    /// Verifies a session's committed chunks (all of its files when it is
    /// damaged); see [`verify_dir`].
    pub fn verify(&self, session_id: &str) -> Result<Report, StoreError> {
        check_id(session_id)?;
        let slot = self
            .slot(session_id)
            .ok_or_else(|| StoreError::UnknownSession(session_id.to_owned()))?;
        let limit = {
            let s = slot.summary.borrow();
            // A damaged session takes no writes: check all its files hold.
            s.damaged.is_none().then_some((s.chunks, s.stored_bytes))
        };
        verify_impl(&slot.dir, limit)
    }
}

enum Dup {
    Same,
    Lost,
    Different(String),
}

fn write_batch(disk: &dyn Disk, dir: &Path, st: &SessionState, batch: &Batch) -> Result<(), StoreError> {
    let chunks_path = dir.join(CHUNKS_FILE);
    let mut chunks = disk.open(&chunks_path).map_err(|e| io_err(&chunks_path, e))?;
    let mut index_bytes = Vec::with_capacity(batch.writes.len() * INDEX_RECORD_LEN);
    for (rec, data) in &batch.writes {
        disk::write_all_at(chunks.as_mut(), data, rec.offset).map_err(|e| io_err(&chunks_path, e))?;
        index_bytes.extend_from_slice(&rec.encode());
    }
    chunks.sync_data().map_err(|e| io_err(&chunks_path, e))?;
    let index_path = dir.join(INDEX_FILE);
    let mut index = disk.open(&index_path).map_err(|e| io_err(&index_path, e))?;
    // Not synced: once the chunks are durable their records can always be
    // rebuilt from them (see `reindex_tail`), so an append costs one sync.
    disk::write_all_at(index.as_mut(), &index_bytes, st.records * INDEX_RECORD_LEN as u64)
        .map_err(|e| io_err(&index_path, e))
}

/// Cuts both files back to the committed state after a failed write.
fn rollback(disk: &dyn Disk, dir: &Path, st: &SessionState) -> Result<(), StoreError> {
    truncate(disk, &dir.join(INDEX_FILE), st.records * INDEX_RECORD_LEN as u64)?;
    truncate(disk, &dir.join(CHUNKS_FILE), st.chunks_len)
}

/// Cuts `path` to `len`, durably (`fdatasync` flushes a changed length).
fn truncate(disk: &dyn Disk, path: &Path, len: u64) -> Result<(), StoreError> {
    let mut f = disk.open(path).map_err(|e| io_err(path, e))?;
    f.set_len(len).map_err(|e| io_err(path, e))?;
    f.sync_data().map_err(|e| io_err(path, e))
}

/// Directories of the store: owner and group only (recordings hold what
/// users typed and saw). The umask may take more away.
fn make_dir(path: &Path, recursive: bool) -> io::Result<()> {
    fs::DirBuilder::new().recursive(recursive).mode(0o750).create(path)
}

/// Files of the store: owner read-write, group read.
fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(path)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = create_file(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

/// Writes `dir/name` whole or not at all: temporary file, sync, rename,
/// sync of the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    write_synced(&tmp, bytes)?;
    let dest = dir.join(name);
    fs::rename(&tmp, &dest).map_err(|e| io_err(&dest, e))?;
    sync_dir(dir)
}

/// A session's data and index as one reader sees them: its chunks and
/// their index, or, once compacted, its runs and theirs.
///
/// Compaction commits by renaming `runs.zst` into place (after
/// `runs.index`) and only then removes `chunks.zst` and `index`, so a
/// reader that finds no `runs.zst` and then opens both old files holds a
/// consistent pair (open files outlive their removal); one that finds an
/// old file gone looks again and finds the runs.
struct Files {
    data: File,
    data_path: PathBuf,
    index: File,
    index_path: PathBuf,
    runs: bool,
}

impl Files {
    fn open(dir: &Path) -> Result<Files, StoreError> {
        let not_found = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        for _ in 0..3 {
            let runs_path = dir.join(RUNS_FILE);
            match File::open(&runs_path) {
                Ok(data) => {
                    let index_path = dir.join(RUNS_INDEX_FILE);
                    let index = File::open(&index_path).map_err(|e| io_err(&index_path, e))?;
                    return Ok(Files {
                        data,
                        data_path: runs_path,
                        index,
                        index_path,
                        runs: true,
                    });
                }
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(io_err(&runs_path, e)),
            }
            let (index_path, data_path) = (dir.join(INDEX_FILE), dir.join(CHUNKS_FILE));
            match (File::open(&index_path), File::open(&data_path)) {
                (Ok(index), Ok(data)) => {
                    return Ok(Files {
                        data,
                        data_path,
                        index,
                        index_path,
                        runs: false,
                    });
                }
                (Err(e), _) if not_found(&e) => continue,
                (_, Err(e)) if not_found(&e) => continue,
                (Err(e), _) => return Err(io_err(&index_path, e)),
                (_, Err(e)) => return Err(io_err(&data_path, e)),
            }
        }
        Err(StoreError::Corrupt {
            path: dir.to_path_buf(),
            why: format!("neither {CHUNKS_FILE} and {INDEX_FILE} nor {RUNS_FILE} and {RUNS_INDEX_FILE} can be opened"),
        })
    }

    fn data_len(&self) -> Result<u64, StoreError> {
        Ok(self.data.metadata().map_err(|e| io_err(&self.data_path, e))?.len())
    }

    fn read_index(&self) -> Result<Vec<u8>, StoreError> {
        let mut buf = Vec::new();
        io::Read::read_to_end(&mut &self.index, &mut buf).map_err(|e| io_err(&self.index_path, e))?;
        Ok(buf)
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; len];
        self.data
            .read_exact_at(&mut buf, offset)
            .map_err(|e| io_err(&self.data_path, e))?;
        Ok(buf)
    }
}

/// Reads up to `n` index records from record `pos`; fails on a bad CRC.
fn read_records(path: &Path, pos: u64, n: usize) -> Result<Vec<IndexRecord>, StoreError> {
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    read_records_from(&f, path, pos, n)
}

/// The link hash of stored chunk `seq` of a compacted session.
fn stored_part_hash(dir: &Path, seq: u64) -> Result<[u8; 32], StoreError> {
    let files = Files::open(dir)?;
    let found = read_runs(&files, seq, 0)?;
    let corrupt = |why: String| StoreError::Corrupt {
        path: files.data_path.clone(),
        why,
    };
    let first = found
        .first()
        .ok_or_else(|| corrupt(format!("no run holds chunk {seq}")))?;
    let unpacked = run::unpack(&first.bytes).map_err(|e| corrupt(format!("the run holding chunk {seq}: {e}")))?;
    unpacked
        .parts
        .iter()
        .find(|p| p.header.seq == seq)
        .map(|p| p.hash)
        .ok_or_else(|| corrupt(format!("no run holds chunk {seq}")))
}

/// [`Store::read_chunks`] of a compacted session: the runs from the one
/// holding `from_seq` on.
fn read_runs(files: &Files, from_seq: u64, max_bytes: usize) -> Result<Vec<StoredChunk>, StoreError> {
    let index = files.read_index()?;
    let recs = read_records_from(&files.index, &files.index_path, 0, index.len() / INDEX_RECORD_LEN)?;
    // The last run starting at or before from_seq may hold it.
    let start = recs.partition_point(|r| r.seq <= from_seq).saturating_sub(1);
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for r in recs.iter().skip(start).take(READ_BATCH_RECORDS) {
        if !out.is_empty() && bytes + r.len as usize > max_bytes {
            break;
        }
        let data = files.read_at(r.offset, r.len as usize)?;
        let (first, last) = run::seqs(&data).map_err(|e| StoreError::Corrupt {
            path: files.data_path.clone(),
            why: format!("the run at byte {}: {e}", r.offset),
        })?;
        if last < from_seq {
            continue;
        }
        bytes += data.len();
        out.push(StoredChunk {
            seq: first,
            last_seq: last,
            bytes: data,
        });
    }
    Ok(out)
}

fn read_records_from(f: &File, path: &Path, pos: u64, n: usize) -> Result<Vec<IndexRecord>, StoreError> {
    let mut buf = vec![0u8; n * INDEX_RECORD_LEN];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], pos * INDEX_RECORD_LEN as u64 + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path, e)),
        }
    }
    buf.truncate(got - got % INDEX_RECORD_LEN);
    buf.chunks(INDEX_RECORD_LEN)
        .enumerate()
        .map(|(i, b)| {
            IndexRecord::decode(b).ok_or_else(|| StoreError::Corrupt {
                path: path.to_path_buf(),
                why: format!("index record {} fails its CRC", pos + i as u64),
            })
        })
        .collect()
}

fn read_file_or_empty(path: &Path) -> Result<Vec<u8>, String> {
    match fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn read_start(dir: &Path) -> Result<StartRecord, String> {
    let path = dir.join(START_FILE);
    let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not a valid start record: {e}", path.display()))
}

fn read_end(dir: &Path) -> Result<Option<EndRecord>, String> {
    let path = dir.join(END_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not a valid end record: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Loads one session at start-up, repairing torn tails when `repair`.
fn load_session(
    disk: &dyn Disk,
    dir: &Path,
    host: &str,
    id: &str,
    repair: bool,
) -> Result<(SessionStart, SessionState), String> {
    let start = read_start(dir)?;
    if start.host != host {
        return Err(format!(
            "start.json names host {:?} but the session is stored under {host:?}",
            start.host
        ));
    }
    let start_id = start.start.meta.as_ref().map_or("", |m| m.session_id.as_str());
    if start_id != id {
        return Err(format!("start.json is for session {start_id:?}"));
    }
    let mut st = SessionState::empty(id);
    if let Some(end) = read_end(dir)? {
        st.end = Some(Arc::new(end.end));
    }
    let quarantine = read_file_or_empty(&dir.join(QUARANTINE_FILE))?;
    if !quarantine.is_empty() {
        st.quarantine = Some(String::from_utf8_lossy(&quarantine).into_owned());
    }
    let flagged = read_file_or_empty(&dir.join(FLAG_FILE))?;
    if !flagged.is_empty() {
        st.flagged = Some(String::from_utf8_lossy(&flagged).into_owned());
    }

    // A compaction commits when runs.zst is in place.
    let compacted = if repair {
        settle_compaction(dir)?
    } else {
        dir.join(RUNS_FILE).exists()
    };
    let (index_path, chunks_path) = if compacted {
        (dir.join(RUNS_INDEX_FILE), dir.join(RUNS_FILE))
    } else {
        (dir.join(INDEX_FILE), dir.join(CHUNKS_FILE))
    };
    let index = read_file_or_empty(&index_path)?;
    let chunks_len = fs::metadata(&chunks_path)
        .map_err(|e| format!("cannot stat {}: {e}", chunks_path.display()))?
        .len();
    let full = index.len() / INDEX_RECORD_LEN;
    let mut good: Vec<IndexRecord> = Vec::with_capacity(full);
    let mut torn = index.len() % INDEX_RECORD_LEN != 0;
    for (i, b) in index.chunks_exact(INDEX_RECORD_LEN).enumerate() {
        let why = match IndexRecord::decode(b) {
            None => Some("fails its CRC".to_owned()),
            Some(r) => {
                let expect_offset = good.last().map_or(0, |p| p.end());
                match good.last() {
                    Some(p) if r.seq <= p.seq => Some(format!("has seq {} after seq {}", r.seq, p.seq)),
                    _ if r.offset != expect_offset => {
                        Some(format!("has offset {} instead of {expect_offset}", r.offset))
                    }
                    _ if r.end() > chunks_len => Some(format!("ends at byte {} of {chunks_len}", r.end())),
                    _ => {
                        good.push(r);
                        None
                    }
                }
            }
        };
        if let Some(why) = why {
            // The index is written back lazily: its last record may be torn,
            // and a crash may leave never-written (zero) records before
            // others. Either way the chunks still hold the truth.
            if i + 1 == full || b.iter().all(|&x| x == 0) {
                torn = true;
            } else {
                st.damaged = Some(format!("index record {i} {why}"));
            }
            break;
        }
    }
    if compacted && torn && st.damaged.is_none() {
        // Runs are written whole and synced before they are committed.
        st.damaged = Some(format!("{RUNS_INDEX_FILE} ends with a bad record"));
    }
    let mut keep_index = (good.len() * INDEX_RECORD_LEN) as u64;
    let mut keep_chunks = good.last().map_or(0, |r| r.end());
    if repair && st.damaged.is_none() && !compacted {
        if torn {
            tracing::warn!(session = %id, "cutting a torn tail off the index: {} bytes", index.len() as u64 - keep_index);
            truncate(disk, &index_path, keep_index).map_err(|e| e.to_string())?;
        }
        let mut rest_torn = true;
        if chunks_len > keep_chunks {
            let (found, torn_after) = reindex_tail(&chunks_path, id, good.last(), chunks_len)?;
            rest_torn = torn_after;
            // Whole chunks whose records are missing may never have been
            // synced (a crash, or a failed append that could not be undone,
            // between their write and its sync): they are stored, and the
            // agent told so, only once they are durable.
            let synced = match found.first() {
                Some(_) => disk.open(&chunks_path).and_then(|mut f| f.sync_data()),
                None => Ok(()),
            };
            if let Err(e) = synced {
                st.damaged = Some(format!(
                    "chunks {}..={} after byte {keep_chunks} of chunks.zst have no index records and cannot be \
                     synced to be re-indexed ({e}): kept, not indexed",
                    found[0].seq,
                    found[found.len() - 1].seq
                ));
            } else if !found.is_empty() {
                tracing::warn!(
                    session = %id,
                    "re-indexing chunks {}..={} from chunks.zst (their index records were not yet on disk)",
                    found[0].seq,
                    found[found.len() - 1].seq
                );
                let bytes: Vec<u8> = found.iter().flat_map(|r| r.encode()).collect();
                let mut f = disk
                    .open(&index_path)
                    .map_err(|e| format!("cannot open {}: {e}", index_path.display()))?;
                disk::write_all_at(f.as_mut(), &bytes, keep_index)
                    .and_then(|()| f.sync_data())
                    .map_err(|e| format!("cannot write {}: {e}", index_path.display()))?;
                keep_index += bytes.len() as u64;
                good.extend(found);
                keep_chunks = good.last().map_or(0, |r| r.end());
            }
        }
        if st.damaged.is_some() {
            // Kept as found, for whoever investigates.
        } else if chunks_len > keep_chunks && rest_torn {
            tracing::warn!(session = %id, "cutting {} unindexed bytes off chunks.zst", chunks_len - keep_chunks);
            truncate(disk, &chunks_path, keep_chunks).map_err(|e| e.to_string())?;
        } else if chunks_len > keep_chunks {
            // A whole chunk that does not check out is not what a crash
            // leaves: keep it for whoever investigates.
            st.damaged = Some(format!(
                "chunks.zst holds {} bytes after byte {keep_chunks} that are whole chunks but do not continue the \
                 session: kept, not cut",
                chunks_len - keep_chunks
            ));
        }
    }
    debug_assert_eq!(keep_index, (good.len() * INDEX_RECORD_LEN) as u64);
    // The seqs each record holds: one chunk, or a run of them.
    let f = File::open(&chunks_path).map_err(|e| format!("cannot open {}: {e}", chunks_path.display()))?;
    let read = |offset: u64, len: usize| {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)
            .map(|()| buf)
            .map_err(|e| format!("cannot read {}: {e}", chunks_path.display()))
    };
    let mut spans = Vec::with_capacity(good.len());
    for r in &good {
        if !compacted {
            spans.push((r.seq, r.seq));
            continue;
        }
        let head = read(r.offset, chunk::HEADER_PREFIX.min(r.len as usize))?;
        match run::seqs(&head) {
            Ok((first, last)) if first == r.seq && spans.last().is_none_or(|&(_, p)| first > p) => {
                spans.push((first, last));
            }
            _ => {
                return Err(format!(
                    "the run at byte {} of {RUNS_FILE} does not match its record",
                    r.offset
                ));
            }
        }
    }
    if let (Some(last), Some(&(_, last_seq))) = (good.last(), spans.last()) {
        let stored = read(last.offset, last.len as usize)?;
        let unpacked = run::unpack(&stored).ok();
        st.last_ms = unpacked
            .as_ref()
            .and_then(|u| u.parts.last())
            .map_or(0, |p| p.header.end_ms);
        if unpacked.and_then(|u| u.last_hash()) != Some(last.sha256) && st.damaged.is_none() {
            st.damaged = Some(format!(
                "the stored bytes of chunk {last_seq} do not match its index record"
            ));
        }
        st.chain = Chain::resume(last_seq + 1, last.sha256);
        st.next_seq = st.chain.next_seq();
    }
    let mut expect = 0u64;
    for &(first, last) in &spans {
        if first > expect {
            push_range(&mut st.missing, expect, first - 1);
        }
        expect = last + 1;
    }
    // Chunks the recorder lost at the very end are below next_seq too
    // (as `end` leaves them), except in a session that never had a chunk.
    if let Some(close) = st.end.as_ref().and_then(|e| e.close.as_ref()) {
        let empty = good.is_empty() && close.last_seq == 0 && !close.lost_seqs.contains(&0);
        if close.last_seq >= st.next_seq && !empty {
            push_range(&mut st.missing, st.next_seq, close.last_seq);
            st.next_seq = close.last_seq + 1;
        }
    }
    st.records = good.len() as u64;
    st.parts = spans.iter().map(|&(first, last)| last - first + 1).sum();
    st.compacted = compacted;
    st.chunks_len = keep_chunks;
    Ok((start.start, st))
}

/// Finishes or undoes a compaction a crash interrupted; returns whether
/// the session is stored as runs.
///
/// `runs.zst` in place is the commit point, but the chunks it replaced are
/// removed only once the runs are seen whole: `runs.index` all readable,
/// its runs filling `runs.zst` exactly, and the last one ending on the
/// chunks' last hash. Otherwise, while the chunks are still there, the
/// runs go instead (the session is compacted again); without them the
/// runs stay and loading reports what is wrong with them.
fn settle_compaction(dir: &Path) -> Result<bool, String> {
    let remove = |names: &[&str]| -> Result<bool, String> {
        let mut removed = false;
        for name in names {
            match fs::remove_file(dir.join(name)) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", dir.join(name).display())),
            }
        }
        if removed {
            sync_dir(dir).map_err(|e| e.to_string())?;
        }
        Ok(removed)
    };
    remove(&[RUNS_TMP, RUNS_INDEX_TMP])?;
    if !dir.join(RUNS_FILE).exists() {
        if remove(&[RUNS_INDEX_FILE])? {
            tracing::warn!(dir = %dir.display(), "undid a compaction a crash interrupted before its commit");
        }
        return Ok(false);
    }
    if !dir.join(CHUNKS_FILE).exists() {
        return Ok(true);
    }
    if runs_replace_chunks(dir) {
        if remove(&[CHUNKS_FILE, INDEX_FILE])? {
            tracing::warn!(dir = %dir.display(), "finished a compaction a crash interrupted after its commit");
        }
        Ok(true)
    } else {
        tracing::error!(dir = %dir.display(), "runs.zst is not whole; keeping the chunks and compacting again");
        remove(&[RUNS_FILE, RUNS_INDEX_FILE])?;
        Ok(false)
    }
}

/// Whether a session's runs hold what its chunks do, as far as the two
/// indexes tell: see [`settle_compaction`].
fn runs_replace_chunks(dir: &Path) -> bool {
    let (Ok(runs_index), Ok(runs_len)) = (
        fs::read(dir.join(RUNS_INDEX_FILE)),
        fs::metadata(dir.join(RUNS_FILE)).map(|m| m.len()),
    ) else {
        return false;
    };
    let runs: Option<Vec<IndexRecord>> = runs_index.chunks(INDEX_RECORD_LEN).map(IndexRecord::decode).collect();
    let Some(runs) = runs.filter(|r| !r.is_empty() && runs_index.len() % INDEX_RECORD_LEN == 0) else {
        return false;
    };
    let contiguous = runs.windows(2).all(|w| w[0].end() == w[1].offset) && runs[0].offset == 0;
    let last_chunk = fs::read(dir.join(INDEX_FILE))
        .ok()
        .and_then(|i| i.chunks_exact(INDEX_RECORD_LEN).rev().find_map(IndexRecord::decode));
    contiguous
        && runs.last().is_some_and(|r| r.end() == runs_len)
        && last_chunk.is_none_or(|c| Some(c.sha256) == runs.last().map(|r| r.sha256))
}

/// The chunks in `chunks.zst` after `last` (the last indexed one), up to
/// the first that is torn or does not check out as it did at ingest.
///
/// An append syncs the chunks and only then writes their index records,
/// without syncing those, so after a crash the index may lack records of
/// durable, acknowledged chunks, never the reverse. Each chunk found here
/// must decompress, come after `last` and, when it directly follows, link
/// to it by hash; a later seq starts a new chain, as the chunk after a gap
/// the recorder declared lost does (the gap is then reported as missing
/// until `end.json` explains it, as ingest leaves it).
///
/// Also says whether what follows them is what a torn append leaves (zeros,
/// or a chunk cut short) rather than whole chunks that do not check out.
fn reindex_tail(
    chunks_path: &Path,
    id: &str,
    last: Option<&IndexRecord>,
    file_len: u64,
) -> Result<(Vec<IndexRecord>, bool), String> {
    let from = last.map_or(0, IndexRecord::end);
    let f = File::open(chunks_path).map_err(|e| format!("cannot open {}: {e}", chunks_path.display()))?;
    let mut tail = vec![0u8; (file_len - from) as usize];
    f.read_exact_at(&mut tail, from)
        .map_err(|e| format!("cannot read {}: {e}", chunks_path.display()))?;
    let mut chain = match last {
        Some(r) => Chain::resume(r.seq + 1, r.sha256),
        None => Chain::new(id),
    };
    let mut found = Vec::new();
    let mut pos = 0usize;
    while pos < tail.len() {
        let Ok(len) = chunk::chunk_len(&tail[pos..]) else { break };
        let bytes = &tail[pos..pos + len];
        let Ok((header, raw)) = chunk::decompress(bytes) else {
            break;
        };
        let Ok(len32) = u32::try_from(len) else {
            break;
        };
        let sha256 = chunk::link_hash(&header, &raw);
        // After `last`: the next chunk, linked, or one after a gap.
        let Ok(Step::Next | Step::AfterGap { .. }) = chain.accept(&header, sha256) else {
            break;
        };
        found.push(IndexRecord {
            seq: header.seq,
            offset: from + pos as u64,
            len: len32,
            sha256,
        });
        pos += len;
    }
    let rest = &tail[pos..];
    let torn = rest.iter().all(|&b| b == 0) || chunk::chunk_len(rest).is_err();
    Ok((found, torn))
}

/// A problem [`verify_dir`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `start.json` or `end.json` cannot be read.
    Metadata(String),
    /// The index ends with a partial record (an append in progress, or torn).
    IndexTornTail { bytes: u64 },
    /// An index record fails its CRC: the records after it are not checked.
    IndexRecordCorrupt { record: u64 },
    /// Index records out of order.
    OutOfOrder { record: u64, seq: u64, after: u64 },
    /// A record does not start where the previous chunk ended.
    Layout { seq: u64, offset: u64, expected: u64 },
    /// A record points past the end of `chunks.zst`.
    OutsideFile { seq: u64, end: u64, file_len: u64 },
    /// Chunks neither stored nor declared lost by the recorder.
    Missing { range: SeqRange },
    /// A chunk no longer hashes (header and content) to what was recorded at ingest.
    Altered { seq: u64 },
    /// The place of chunk `seq` holds a chunk whose header says `found`.
    WrongChunk { seq: u64, found: u64 },
    /// Chunk `seq`'s prev_hash is not the hash of the stored chunk before it.
    ChainBroken { seq: u64, previous: Option<u64> },
    /// A chunk does not parse or decompress.
    Undecodable { seq: u64, error: String },
    /// Bytes in `chunks.zst` after the last indexed chunk.
    UnindexedBytes { offset: u64, len: u64 },
}

impl Problem {
    /// The chunk the problem is about, if one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Problem::OutOfOrder { seq, .. }
            | Problem::Layout { seq, .. }
            | Problem::OutsideFile { seq, .. }
            | Problem::Altered { seq }
            | Problem::WrongChunk { seq, .. }
            | Problem::ChainBroken { seq, .. }
            | Problem::Undecodable { seq, .. } => Some(*seq),
            Problem::Missing { range } => Some(range.first),
            _ => None,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Metadata(why) => write!(f, "{why}"),
            Problem::IndexTornTail { bytes } => {
                write!(
                    f,
                    "the index ends with a partial record ({bytes} bytes): an append in progress or a torn write"
                )
            }
            Problem::IndexRecordCorrupt { record } => {
                write!(
                    f,
                    "index record {record} fails its CRC; the records after it were not checked"
                )
            }
            Problem::OutOfOrder { record, seq, after } => {
                write!(
                    f,
                    "index record {record} is chunk {seq}, after chunk {after}: chunks reordered"
                )
            }
            Problem::Layout { seq, offset, expected } => {
                write!(
                    f,
                    "chunk {seq} is stored at byte {offset} instead of {expected}: chunks.zst was edited"
                )
            }
            Problem::OutsideFile { seq, end, file_len } => {
                write!(
                    f,
                    "chunk {seq} would end at byte {end} but chunks.zst has {file_len}: chunks.zst was cut"
                )
            }
            Problem::Missing { range } => write!(
                f,
                "chunk(s) {range} missing and not declared lost by the recorder: deleted from the store?"
            ),
            Problem::Altered { seq } => write!(
                f,
                "chunk {seq} was altered: its bytes no longer match the SHA-256 recorded when it was stored"
            ),
            Problem::WrongChunk { seq, found } => {
                write!(
                    f,
                    "the place of chunk {seq} holds chunk {found}: chunks reordered or replaced"
                )
            }
            Problem::ChainBroken { seq, previous: Some(p) } => write!(
                f,
                "hash chain broken at chunk {seq}: its prev_hash is not the SHA-256 of chunk {p} as stored \
                 (chunk {p} altered, chunks between them deleted, or chunk {seq} replaced)"
            ),
            Problem::ChainBroken { seq, previous: None } => write!(
                f,
                "hash chain broken at chunk {seq}: its prev_hash is not this session's chain seed \
                 (chunk of another session, or replaced)"
            ),
            Problem::Undecodable { seq, error } => write!(f, "chunk {seq} does not decode: {error}"),
            Problem::UnindexedBytes { offset, len } => write!(
                f,
                "{len} bytes at byte {offset} of chunks.zst are not in the index (an append in progress or a torn write)"
            ),
        }
    }
}

/// What [`verify_dir`] found in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub session_id: String,
    pub host: String,
    /// Index records checked.
    pub chunks: u64,
    /// Bytes of chunk data checked.
    pub stored_bytes: u64,
    /// Bytes of asciicast text the chunks decompress to.
    pub raw_bytes: u64,
    pub ended: bool,
    /// The end's last chunk, when ended.
    pub last_seq: Option<u64>,
    /// Gaps the recorder declared (its `Close.lost_seqs`).
    pub lost_at_recorder: Vec<SeqRange>,
    /// Chunks after a declared-lost gap, where the chain restarts unchecked.
    pub chain_restarts: Vec<u64>,
    pub quarantine: Option<String>,
    pub problems: Vec<Problem>,
}

impl Report {
    /// No problem found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The lowest seq any problem names.
    pub fn first_broken_seq(&self) -> Option<u64> {
        self.problems.iter().filter_map(Problem::seq).min()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "session {} (host {})", self.session_id, self.host)?;
        writeln!(
            f,
            "  {} chunks, {} bytes stored, {} bytes of asciicast, {}",
            self.chunks,
            self.stored_bytes,
            self.raw_bytes,
            match self.last_seq {
                Some(l) if self.ended => format!("ended at chunk {l}"),
                _ if self.ended => "ended".to_owned(),
                _ => "live or unfinished".to_owned(),
            }
        )?;
        for r in &self.lost_at_recorder {
            writeln!(f, "  chunk(s) {r} lost at the recorder (declared in its Close)")?;
        }
        for s in &self.chain_restarts {
            writeln!(
                f,
                "  hash chain restarts at chunk {s}, after chunks lost at the recorder"
            )?;
        }
        if let Some(q) = &self.quarantine {
            writeln!(f, "  quarantined: {q}")?;
        }
        if self.problems.is_empty() {
            writeln!(f, "  OK: every chunk is intact and linked")?;
        } else {
            if let Some(s) = self.first_broken_seq() {
                writeln!(f, "  FAILED: first broken chunk {s}")?;
            } else {
                writeln!(f, "  FAILED")?;
            }
            for p in &self.problems {
                writeln!(f, "  - {p}")?;
            }
        }
        Ok(())
    }
}

/// Verifies a session directory from its files alone: every index record's
/// CRC, that records are in order and contiguous, that each chunk's bytes
/// still hash to what was recorded at ingest, that each chunk's header is
/// the chunk its place says, that the hash chain links from the session's
/// seed to the last chunk (restarting only after chunks the recorder
/// declared lost), that each chunk decompresses, and that an ended session
/// has every chunk up to its last. Safe to run while a collector writes.
pub fn verify_dir(dir: &Path) -> Result<Report, StoreError> {
    verify_impl(dir, None)
}

/// Chunks a record holds, for [`verify_impl`]: first seq, last seq, the
/// first's header when it could be read (with the seq of its place), the
/// last's hash.
type Held = (u64, u64, Option<chunk::ChunkHeader>, [u8; 32]);

fn verify_impl(dir: &Path, limit: Option<(u64, u64)>) -> Result<Report, StoreError> {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let host = dir
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut report = Report {
        session_id: id.clone(),
        host,
        chunks: 0,
        stored_bytes: 0,
        raw_bytes: 0,
        ended: false,
        last_seq: None,
        lost_at_recorder: Vec::new(),
        chain_restarts: Vec::new(),
        quarantine: None,
        problems: Vec::new(),
    };
    if let Err(why) = read_start(dir) {
        report.problems.push(Problem::Metadata(why));
    }
    let mut lost = BTreeSet::new();
    match read_end(dir) {
        Ok(Some(end)) => {
            report.ended = true;
            if let Some(close) = &end.end.close {
                report.last_seq = Some(close.last_seq);
                lost.extend(close.lost_seqs.iter().copied());
            }
        }
        Ok(None) => {}
        Err(why) => report.problems.push(Problem::Metadata(why)),
    }
    let q = read_file_or_empty(&dir.join(QUARANTINE_FILE)).map_err(|why| StoreError::Corrupt {
        path: dir.join(QUARANTINE_FILE),
        why,
    })?;
    if !q.is_empty() {
        report.quarantine = Some(String::from_utf8_lossy(&q).into_owned());
    }

    let files = Files::open(dir)?;
    let index = files.read_index()?;
    let file_len = files.data_len()?;
    // Runs are written whole before they are committed: no limit applies.
    let limit = limit.filter(|_| !files.runs);
    let (records, file_len) = match limit {
        Some((r, b)) => ((r as usize).min(index.len() / INDEX_RECORD_LEN), b.min(file_len)),
        None => {
            let tail = index.len() % INDEX_RECORD_LEN;
            if tail != 0 {
                report.problems.push(Problem::IndexTornTail { bytes: tail as u64 });
            }
            (index.len() / INDEX_RECORD_LEN, file_len)
        }
    };

    // The stored chunks' chain, and whether it holds one yet.
    let mut chain = Chain::new(&id);
    let mut walked = false;
    let mut expected_offset = 0u64;
    let mut lost_ranges = Vec::new();
    // Reports the seqs in first..=last: declared lost, or missing. Returns
    // whether the whole gap was declared lost. Walks the declared seqs, not
    // the gap, so a forged huge gap costs nothing.
    let mut gap = |first: u64, last: u64, report: &mut Report| -> bool {
        let mut all_lost = true;
        let mut cursor = Some(first);
        for &s in lost.range(first..=last) {
            if let Some(c) = cursor
                && s > c
            {
                report.problems.push(Problem::Missing {
                    range: SeqRange { first: c, last: s - 1 },
                });
                all_lost = false;
            }
            push_range(&mut lost_ranges, s, s);
            cursor = s.checked_add(1);
        }
        if let Some(c) = cursor
            && c <= last
        {
            report.problems.push(Problem::Missing {
                range: SeqRange { first: c, last },
            });
            all_lost = false;
        }
        all_lost
    };
    for i in 0..records {
        let Some(rec) = IndexRecord::decode(&index[i * INDEX_RECORD_LEN..(i + 1) * INDEX_RECORD_LEN]) else {
            report.problems.push(Problem::IndexRecordCorrupt { record: i as u64 });
            break;
        };
        if rec.offset != expected_offset {
            report.problems.push(Problem::Layout {
                seq: rec.seq,
                offset: rec.offset,
                expected: expected_offset,
            });
        }
        expected_offset = rec.end();
        // What the record holds, as far as it can be read, per chunk (a run
        // holds many).
        let mut held: Vec<Held> = Vec::new();
        if rec.end() > file_len {
            report.problems.push(Problem::OutsideFile {
                seq: rec.seq,
                end: rec.end(),
                file_len,
            });
            held.push((rec.seq, rec.seq, None, rec.sha256));
        } else {
            let mut bytes = vec![0u8; rec.len as usize];
            files
                .data
                .read_exact_at(&mut bytes, rec.offset)
                .map_err(|e| io_err(&files.data_path, e))?;
            report.stored_bytes += bytes.len() as u64;
            let (first, last) = run::seqs(&bytes).unwrap_or((rec.seq, rec.seq));
            match run::unpack(&bytes) {
                Ok(u) => {
                    report.raw_bytes += u.raw.len() as u64;
                    if first != rec.seq {
                        report.problems.push(Problem::WrongChunk {
                            seq: rec.seq,
                            found: first,
                        });
                    }
                    if u.last_hash() != Some(rec.sha256) {
                        report.problems.push(Problem::Altered {
                            seq: rec.seq + (last - first),
                        });
                    }
                    // Placed where the index says; a header that disagrees
                    // is the WrongChunk above.
                    held.extend(u.parts.iter().zip(rec.seq..).map(|(p, seq)| {
                        let header = chunk::ChunkHeader {
                            seq,
                            ..p.header.clone()
                        };
                        (seq, seq, Some(header), p.hash)
                    }));
                }
                Err(e) => {
                    report.problems.push(match e {
                        ChunkError::Altered { seq } => Problem::Altered { seq },
                        e => Problem::Undecodable {
                            seq: rec.seq,
                            error: e.to_string(),
                        },
                    });
                    held.push((rec.seq, rec.seq + (last - first), None, rec.sha256));
                }
            }
        }
        for (first, last, header, hash) in held {
            report.chunks += last.saturating_sub(first) + 1;
            let next = chain.next_seq();
            if walked && first < next {
                // Met again: the chain stays where it was.
                report.problems.push(Problem::OutOfOrder {
                    record: i as u64,
                    seq: first,
                    after: next - 1,
                });
                continue;
            }
            let restart = first > next && gap(next, first - 1, &mut report);
            if restart {
                report.chain_restarts.push(first);
            }
            let Some(header) = header else {
                // Unreadable: the chain goes on from the hash its record names.
                chain = Chain::resume(last + 1, hash);
                walked = true;
                continue;
            };
            // After a gap that was not declared lost (already reported)
            // the chunk must still link to the one before it, as if the
            // gap were not there; at the very start there is nothing to
            // link to, and after a declared gap the chain restarts.
            if first > next && !restart && walked && Chain::resume(first, chain.last_hash()).check(&header).is_err() {
                report.problems.push(Problem::ChainBroken {
                    seq: first,
                    previous: Some(next - 1),
                });
            }
            if let Err(Unlinked { seq }) = chain.accept(&header, hash) {
                report.problems.push(Problem::ChainBroken {
                    seq,
                    previous: seq.checked_sub(1),
                });
                chain = Chain::resume(seq + 1, hash);
            }
            walked = true;
        }
    }
    if let (Some(last_seq), true) = (report.last_seq, report.ended) {
        let next = chain.next_seq();
        let empty = !walked && last_seq == 0 && !lost.contains(&0);
        if next <= last_seq && !empty {
            gap(next, last_seq, &mut report);
        }
    }
    report.lost_at_recorder = lost_ranges;
    if limit.is_none() && file_len > expected_offset {
        report.problems.push(Problem::UnindexedBytes {
            offset: expected_offset,
            len: file_len - expected_offset,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_record_roundtrip_and_crc() {
        let r = IndexRecord {
            seq: 7,
            offset: 1234,
            len: 99,
            sha256: [5; 32],
        };
        let b = r.encode();
        assert_eq!(IndexRecord::decode(&b), Some(r));
        for i in 0..INDEX_RECORD_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert_eq!(IndexRecord::decode(&c), None, "flip at {i}");
        }
        assert_eq!(IndexRecord::decode(&b[..55]), None);
    }

    #[test]
    fn ranges() {
        let mut v = Vec::new();
        push_range(&mut v, 3, 3);
        push_range(&mut v, 4, 5);
        push_range(&mut v, 9, 9);
        assert_eq!(v, vec![SeqRange { first: 3, last: 5 }, SeqRange { first: 9, last: 9 }]);
        assert_eq!(count_below(&v, 0), 0);
        assert_eq!(count_below(&v, 4), 1);
        assert_eq!(count_below(&v, 6), 3);
        assert_eq!(count_below(&v, 100), 4);
        assert!(in_ranges(&v, 9) && !in_ranges(&v, 6));
    }

    #[test]
    fn names() {
        assert!(valid_session_id("0190a5f0-1c2d-7e3f-8a9b-0c1d2e3f4a5b"));
        for bad in [
            "",
            "..",
            "../../etc",
            "0190A5F0-1C2D-7E3F-8A9B-0C1D2E3F4A5B",
            "0190a5f01c2d7e3f8a9b0c1d2e3f4a5b",
            "{0190a5f0-1c2d-7e3f-8a9b-0c1d2e3f4a5b}",
            "0190a5f0-1c2d-7e3f-8a9b-0c1d2e3f4a5b/",
        ] {
            assert!(!valid_session_id(bad), "{bad:?}");
        }
        for good in ["host-a", "web01.example.com", "a", "A-1.b"] {
            assert!(valid_host(good), "{good:?}");
        }
        let long = "a".repeat(254);
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "a\0b",
            "*.example.com",
            "hôte",
            long.as_str(),
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
    }
}
