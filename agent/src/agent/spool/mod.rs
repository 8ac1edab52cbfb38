//! The agent's durable spool: every recording, persisted before it is
//! acknowledged, kept until the collector has it, then retired.
//!
//! # Design
//!
//! All sessions share one append-only log, cut into segment files
//! ([`log`]). Sharing the log is what makes group commit possible: the
//! writer thread takes every record queued by every session, writes them
//! with one `write` and makes them durable with one `fdatasync`, then
//! acknowledges them all. A thousand busy sessions cost one fsync per
//! flush, not a thousand.
//!
//! [`Spool`] owns the whole lifecycle: write, index, recover, carry forward,
//! retire, delete. The connection loop tells it what became durable, the
//! shipper asks it what to send and tells it what the collector committed;
//! both work on its one [`Catalogue`] of sessions.
//!
//! ## Lifecycle of a session
//! ```text
//! OPEN ─ CHUNK* ─ CLOSE ─ SHIPPED            records, in segments
//!   live     ended     shipped     gone      as the host lists it
//! ```
//! A segment is retired (deleted) as soon as the collector holds every
//! record in it. A session whose records go with it but which must outlive
//! them (still open, or not yet shipped whole, or with records in later
//! segments) first has its small state carried forward: one STATE record
//! (start, chain position, end if any, shipped or not) in the active
//! segment. So an open session, however long it stays open, holds only its
//! unshipped chunks and one small record, and a shipped session leaves no
//! start record behind to be listed as live.
//!
//! ## Invariants
//! * A record is acknowledged only after the `fdatasync` that covers it returned.
//! * A session's chunks are acknowledged in sequence order. A chunk may be in
//!   the log more than once, or after a later one (resent after a failed
//!   write); readers keep the first copy of each sequence number, in order.
//! * Every session with a record in the spool has a start or state record
//!   in the spool, and the newest of them (with the records after it) says
//!   where its chain stands: the resume point survives any restart without
//!   a chunk being decompressed.
//! * Recovery never invents data: a record whose checksum fails is cut off
//!   (torn tail of the newest segment) or reported (anywhere else), never
//!   replayed.
//! * A session that is damaged (its stored chunk does not check out) or that
//!   the collector refused is quarantined: listed, never shipped, its
//!   segments kept for an operator.

pub mod catalogue;
pub mod disk;
pub mod log;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod race_tests;
pub mod records;

pub use catalogue::{Catalogue, Retire, Session};
pub use log::{
    Append, ChunkEntry, Holdings, Index, Loc, SegmentUse, SessionEntry, SpoolError, Stats, Writer, delete_segments,
    disk_usage, prepare_dir, read_chunk, scan, segment_path, segments,
};
pub use records::{
    CHUNK_RECORD_OVERHEAD, CloseRecord, DamagedRecord, OpenRecord, ShippedRecord, StateRecord, chunk_body, close_body,
    damaged_body, open_body,
};

use shelltrail_cast::chain::Chain;
use shelltrail_cast::chunk;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, oneshot};

/// What start-up found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub problems: Vec<String>,
    /// Sessions found damaged now (their DAMAGED record is written).
    pub damaged: Vec<DamagedRecord>,
    pub bytes: u64,
}

/// The spool as the running agent holds it.
pub struct Spool {
    dir: PathBuf,
    writer: std::sync::mpsc::Sender<Append>,
    pub stats: Arc<Stats>,
    cat: Mutex<Catalogue>,
    /// Woken when there is something new to ship.
    pub changed: Notify,
    /// Woken when the collector committed something: segments may retire.
    retire_wake: Notify,
    /// Records queued and not yet noted, by the segment active when they
    /// were queued (see [`Spool::queue`]).
    outstanding: Arc<Mutex<BTreeMap<u64, usize>>>,
}

/// A queued record: where it landed, once durable, and its ticket.
pub struct Queued {
    pub done: oneshot::Receiver<Result<Loc, String>>,
    pub ticket: Ticket,
}

/// Holds back retirement of the segments a queued record may land in,
/// until it is dropped (after the record is noted in the catalogue).
pub struct Ticket {
    segment: u64,
    outstanding: Arc<Mutex<BTreeMap<u64, usize>>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut out = self.outstanding.lock().expect("outstanding lock");
        if let Some(n) = out.get_mut(&self.segment) {
            *n -= 1;
            if *n == 0 {
                out.remove(&self.segment);
            }
        }
    }
}

impl Spool {
    /// Recovers the spool in `dir` (cutting a torn tail), checks each
    /// session's newest chunk, quarantines what is damaged, and starts the
    /// writer thread on a fresh segment.
    pub fn recover(dir: &Path, segment_bytes: u64, now_ms: i64) -> Result<(Spool, Recovered), SpoolError> {
        prepare_dir(dir)?;
        let mut index = scan(dir, true)?;
        let stats = Arc::new(Stats::default());
        stats.total_bytes.store(index.total_bytes, Ordering::Relaxed);
        let mut writer = Writer::create(dir, index.last_segment, segment_bytes, stats.clone())?;

        let mut chains = BTreeMap::new();
        let mut damage = Vec::new();
        for (id, s) in &index.sessions {
            if s.damaged.is_some() || s.shipped {
                continue;
            }
            match newest_chain(dir, s) {
                Ok(c) => {
                    chains.insert(id.clone(), c);
                }
                Err(reason) => damage.push(DamagedRecord {
                    session_id: id.clone(),
                    reason,
                    unix_ms: now_ms,
                }),
            }
        }
        if !damage.is_empty() {
            let locs = writer.write_now(damage.iter().map(damaged_body).collect())?;
            for (d, loc) in damage.iter().zip(locs) {
                index
                    .segments
                    .entry(loc.segment)
                    .or_default()
                    .entry(d.session_id.clone())
                    .or_default();
                if let Some(s) = index.sessions.get_mut(&d.session_id) {
                    s.damaged = Some(d.reason.clone());
                }
            }
        }
        {
            // Counted as retirement gives them back: per segment, every
            // copy of a resent chunk included, so the two never drift.
            let mut held = stats.holdings.lock().expect("holdings lock");
            for uses in index.segments.values() {
                for (id, u) in uses {
                    if let Some(s) = index.sessions.get(id) {
                        held.add(s.open.peer_uid, id, u.bytes);
                    }
                }
            }
        }
        let cat = Catalogue::from_index(&index, &chains);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| log::io_err(dir, e))?;
        let recovered = Recovered {
            problems: std::mem::take(&mut index.problems),
            damaged: damage,
            bytes: index.total_bytes,
        };
        Ok((
            Spool {
                dir: dir.to_path_buf(),
                writer: tx,
                stats,
                cat: Mutex::new(cat),
                changed: Notify::new(),
                retire_wake: Notify::new(),
                outstanding: Default::default(),
            },
            recovered,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The catalogue. Held briefly: every connection's acks take it.
    pub fn lock(&self) -> MutexGuard<'_, Catalogue> {
        self.cat.lock().expect("catalogue lock")
    }

    /// Queues a record for the writer. `done` says where it landed once it
    /// is durable; the caller then reports it (`*_durable`), handing back
    /// the ticket. Until the ticket is dropped, no segment the record may
    /// be in is retired: a record durable but not yet in the catalogue is
    /// not known to be needed, and must not go with its segment.
    pub fn queue(&self, body: Vec<u8>) -> Result<Queued, String> {
        let (done, wait) = oneshot::channel();
        let ticket = {
            let mut out = self.outstanding.lock().expect("outstanding lock");
            // Read under the lock retirement reads it under: the record
            // lands in this segment or a later one.
            let segment = self.stats.active_segment.load(Ordering::SeqCst);
            *out.entry(segment).or_default() += 1;
            Ticket {
                segment,
                outstanding: self.outstanding.clone(),
            }
        };
        self.writer
            .send(Append { body, done })
            .map_err(|_| "spool writer stopped".to_string())?;
        Ok(Queued { done: wait, ticket })
    }

    /// Writes one record and waits until it is durable; the ticket is kept
    /// until the caller has noted the record.
    async fn append(&self, body: Vec<u8>) -> Result<(Loc, Ticket), String> {
        let q = self.queue(body)?;
        let loc = q.done.await.map_err(|_| "spool writer stopped".to_string())??;
        Ok((loc, q.ticket))
    }

    /// Records a new session's start, durably, and catalogues it as connected.
    pub async fn open(&self, rec: OpenRecord) -> Result<(), String> {
        let (loc, _ticket) = self.append(open_body(&rec)).await?;
        let id = rec.id().to_string();
        let mut cat = self.lock();
        cat.note(&id, loc, |u| u.head = true);
        let mut s = Session::new(rec, loc.segment);
        s.connected = true;
        cat.sessions.insert(id, s);
        drop(cat);
        self.changed.notify_one();
        Ok(())
    }

    /// A chunk (queued with [`chunk_body`]) is durable at `loc`.
    pub fn chunk_durable(&self, id: &str, header_seq: u64, chain: Chain, loc: Loc, ticket: Ticket) {
        let mut cat = self.lock();
        let bytes = u64::from(loc.body_len).saturating_sub(CHUNK_RECORD_OVERHEAD);
        cat.note(id, loc, |u| {
            u.max_seq = Some(u.max_seq.map_or(header_seq, |m| m.max(header_seq)));
            u.bytes += bytes;
        });
        if let Some(s) = cat.sessions.get_mut(id) {
            if chain.next_seq() > s.chain.next_seq() {
                s.chain = chain;
            }
            if !s.shipped {
                s.unshipped.insert(header_seq, loc);
            }
        }
        drop(cat);
        drop(ticket);
        self.changed.notify_one();
    }

    /// A session's end (queued with [`close_body`]) is durable at `loc`.
    /// Returns the session's next seq.
    pub fn close_durable(&self, rec: &CloseRecord, loc: Loc, ticket: Ticket) -> u64 {
        let mut cat = self.lock();
        cat.note(&rec.session_id, loc, |u| u.close = true);
        let next = cat.sessions.get_mut(&rec.session_id).map_or(0, |s| {
            s.close = Some(rec.clone());
            s.chain.next_seq()
        });
        drop(cat);
        drop(ticket);
        self.changed.notify_one();
        next
    }

    /// Records a session's end now (the agent's own: a vanished recorder,
    /// an unrecorded session).
    pub async fn close(&self, rec: &CloseRecord) -> Result<(), String> {
        let (loc, ticket) = self.append(close_body(rec)).await?;
        self.close_durable(rec, loc, ticket);
        Ok(())
    }

    /// Quarantines a session found damaged: recorded, so that listings and
    /// later starts know it too.
    pub async fn damaged(&self, rec: DamagedRecord) -> Result<(), String> {
        if let Some(s) = self.lock().sessions.get_mut(&rec.session_id) {
            s.damaged.get_or_insert(rec.reason.clone());
        }
        let (loc, _ticket) = self.append(damaged_body(&rec)).await?;
        self.lock().note(&rec.session_id, loc, |_| {});
        Ok(())
    }

    /// The collector holds session `id` whole: recorded (a SHIPPED record,
    /// so the host lists it as shipped and never sends it again), and its
    /// segments may go. The record is written in the background; the
    /// handle says when (tests wait for it).
    pub fn shipped(self: &Arc<Self>, id: &str, now_ms: i64) -> Option<tokio::task::JoinHandle<()>> {
        {
            let mut cat = self.lock();
            let s = cat.sessions.get_mut(id)?;
            if s.shipped {
                return None;
            }
            s.shipped = true;
            s.unshipped.clear();
            let freed: u64 = std::mem::take(&mut s.stream.in_flight).values().sum();
            cat.in_flight = cat.in_flight.saturating_sub(freed);
        }
        let rec = ShippedRecord {
            session_id: id.to_string(),
            unix_ms: now_ms,
        };
        let q = self.queue(records::shipped_body(&rec)).ok()?;
        let me = self.clone();
        Some(tokio::spawn(async move {
            let _ticket = q.ticket;
            match q.done.await {
                Ok(Ok(loc)) => me.lock().note(&rec.session_id, loc, |_| {}),
                // Not recorded: a restart asks the collector again.
                _ => tracing::warn!(session = %rec.session_id, "could not record that the session is shipped"),
            }
            me.retire_wake.notify_one();
        }))
    }

    /// The collector committed something: a segment may be retirable.
    pub fn committed(&self) {
        self.retire_wake.notify_one();
    }

    pub fn read_chunk(&self, loc: Loc) -> Result<Vec<u8>, SpoolError> {
        read_chunk(&self.dir, loc)
    }

    /// Retires every segment the collector fully holds, at once: carries
    /// forward what must outlive them, then deletes them. Returns how many
    /// segments it deleted.
    pub async fn retire(&self) -> Result<usize, String> {
        let mut deleted = 0;
        // Carrying states forward can fill the active segment and roll it
        // over: the one it was is then closed and retirable at once.
        for _ in 0..4 {
            let (active, bound) = {
                let out = self.outstanding.lock().expect("outstanding lock");
                let active = self.stats.active_segment.load(Ordering::SeqCst);
                // Nothing at or after the segment of a record not yet noted.
                (active, out.keys().next().map_or(active, |&s| s.min(active)))
            };
            deleted += self.retire_before(bound).await?;
            if self.stats.active_segment.load(Ordering::SeqCst) == active {
                break;
            }
        }
        Ok(deleted)
    }

    async fn retire_before(&self, active: u64) -> Result<usize, String> {
        let plan = self.lock().plan_retire(active);
        if plan.segments.is_empty() {
            return Ok(0);
        }
        let mut waits = Vec::with_capacity(plan.carry.len());
        for st in &plan.carry {
            waits.push(self.queue(records::state_body(st))?);
        }
        let mut carried = Vec::with_capacity(waits.len());
        let mut tickets = Vec::with_capacity(waits.len());
        for (w, st) in waits.into_iter().zip(&plan.carry) {
            tickets.push(w.ticket);
            let loc = w
                .done
                .await
                .map_err(|_| "spool writer stopped".to_string())?
                .map_err(|e| format!("carrying forward session {}: {e}", st.open.id()))?;
            carried.push(loc);
        }
        let dir = self.dir.clone();
        let ids = plan.segments.clone();
        let freed = tokio::task::spawn_blocking(move || delete_segments(&dir, &ids))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("deleting shipped segments: {e}"))?;
        let total = &self.stats.total_bytes;
        total.fetch_sub(freed.min(total.load(Ordering::Relaxed)), Ordering::Relaxed);
        let released = self.lock().retired(&plan, &carried);
        drop(tickets);
        {
            let mut held = self.stats.holdings.lock().expect("holdings lock");
            for (uid, id, bytes) in released {
                held.release(uid, &id, bytes);
            }
        }
        tracing::info!(
            segments = plan.segments.len(),
            bytes = freed,
            carried = plan.carry.len(),
            "deleted fully shipped spool segments"
        );
        Ok(plan.segments.len())
    }

    /// Retires segments whenever the collector commits, and once a second.
    pub async fn retire_forever(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.retire_wake.notified()).await;
            if let Err(e) = self.retire().await {
                tracing::error!("spool retirement: {e}");
            }
        }
    }
}

/// Where a recovered session's chain stands, from its records; its newest
/// chunk is checked (decoded, hashed, compared with what its record says),
/// so a damaged spool is found at start-up, not when a recorder resumes.
/// The error says why the session's stored recording is damaged.
fn newest_chain(dir: &Path, s: &SessionEntry) -> Result<Chain, String> {
    let Some(last) = s.chunks.last() else {
        return s.chain().map_err(|c| format!("chunk {} has no hash", c.seq));
    };
    let (_, hash) = read_chunk(dir, last.loc)
        .map_err(|e| e.to_string())
        .and_then(|bytes| chunk::check(&bytes, last.seq).map_err(|e| e.to_string()))
        .map_err(|e| format!("its last spooled chunk {} is unreadable: {e}", last.seq))?;
    if last.hash.is_some_and(|h| h != hash) {
        return Err(format!(
            "its last spooled chunk {} no longer hashes to what was recorded",
            last.seq
        ));
    }
    Ok(match s.chain() {
        Ok(c) => c,
        // An older agent's record: the hash just computed is the one.
        Err(c) => Chain::resume(c.seq + 1, hash),
    })
}
