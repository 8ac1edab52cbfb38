//! The agent's shipper: streams every spooled session to the collector as it
//! happens, and deletes spool segments once the collector has them.
//!
//! # Design
//!
//! One gRPC stream (`Ingest.Ship`) per connection to the collector carries
//! all sessions, interleaved. For each session the shipper sends
//! `SessionStart`, learns from `SessionPosition` which chunk the collector
//! needs next, sends chunks in order from there, then `SessionEnd`. The
//! collector answers `Committed` once it has fsynced.
//!
//! ## Invariants
//! * The position comes from the collector on every (re)connection, so the
//!   shipper persists nothing of its own: after a crash it asks again, and a
//!   chunk is never skipped. A chunk sent twice is deduplicated by the collector.
//! * A spool segment is deleted only when every record in it is committed at
//!   the collector: chunks up to the session's committed seq, its end if the
//!   segment holds it. A session still open keeps its start record: it is
//!   carried forward into the newest segment (with its resume point) first.
//! * A session the collector rejects is quarantined: never retried, its
//!   segments kept, the reason logged and listed. So is a session damaged in
//!   the spool (found at the agent's start, or a chunk shipping cannot
//!   read): it is never shipped as if it were whole.
//!
//! ## Fairness
//! Live sessions (little waiting) go first in every batch; the backlog an
//! outage leaves is served round-robin, a megabyte per session per turn, in a
//! smaller share of the window of unacknowledged bytes. So after an outage
//! the backlog drains at full speed while a live session's chunks wait only
//! behind the few megabytes of backlog already in flight, not behind a round.

use crate::agent::spool::{self, Append, CloseRecord, DamagedRecord, Loc, OpenRecord, SegmentUse, Stats};
use crate::config::ShipConfig;
use anyhow::{Context, Result, bail};
use shelltrail_proto::v1::{
    AgentHello, ChunkData, HostFacts, ShipRequest, ShipResponse, ingest_client::IngestClient, ship_request,
    ship_response,
};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

/// Unacknowledged bytes in flight to the collector, over all sessions.
const WINDOW: u64 = 16 << 20;
/// Of the window, what the backlog may use: the rest is for live sessions.
const BACKLOG_WINDOW: u64 = 4 << 20;
/// A session with at most this much waiting to be sent is live.
const LIVE_BYTES: u64 = 256 << 10;
/// Bytes a backlogged session may send per round-robin turn (at least one chunk).
const TURN_BYTES: u64 = 1 << 20;
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the shipper knows of one session.
#[derive(Debug)]
struct Entry {
    open: OpenRecord,
    /// Durable in the spool and not yet committed at the collector.
    chunks: BTreeMap<u64, Loc>,
    /// The newest chunk in the spool (kept after it is committed: a carried-forward
    /// start record needs its hash).
    last: Option<(u64, Loc)>,
    close: Option<CloseRecord>,
    /// Highest seq the collector committed, if any.
    committed: Option<u64>,
    ended: bool,
    quarantine: Option<String>,
    // Per-stream state, reset on every connection.
    announced: bool,
    position: Option<u64>,
    next_to_send: u64,
    end_sent: bool,
    in_flight: BTreeMap<u64, u64>,
}

impl Entry {
    /// Bytes of chunks not yet sent, counted up to `limit` (enough to tell
    /// a live session from a backlog without walking the whole backlog).
    fn waiting_bytes(&self, limit: u64) -> u64 {
        let mut n = 0;
        for loc in self.chunks.range(self.next_to_send..).map(|(_, l)| l) {
            n += u64::from(loc.body_len);
            if n >= limit {
                break;
            }
        }
        n
    }

    fn new(open: OpenRecord) -> Entry {
        Entry {
            open,
            chunks: BTreeMap::new(),
            last: None,
            close: None,
            committed: None,
            ended: false,
            quarantine: None,
            announced: false,
            position: None,
            next_to_send: 0,
            end_sent: false,
            in_flight: BTreeMap::new(),
        }
    }

    fn commit_through(&mut self, through: u64) -> u64 {
        self.committed = Some(self.committed.map_or(through, |c| c.max(through)));
        self.chunks.retain(|&seq, _| seq > through);
        let done: Vec<u64> = self.in_flight.range(..=through).map(|(&s, _)| s).collect();
        done.iter().filter_map(|s| self.in_flight.remove(s)).sum()
    }
}

#[derive(Default)]
struct Catalogue {
    sessions: BTreeMap<String, Entry>,
    segments: BTreeMap<u64, BTreeMap<String, SegmentUse>>,
    in_flight: u64,
    /// Round-robin cursor: the session after which the next turn starts.
    cursor: Option<String>,
}

/// Shared between the agent's server (which reports what became durable)
/// and the shipping task.
pub struct Shipper {
    cfg: ShipConfig,
    spool_dir: PathBuf,
    state: Mutex<Catalogue>,
    wake: Notify,
    stats: Arc<Stats>,
    writer: std::sync::mpsc::Sender<Append>,
    /// The host's session-signing key, announced in every hello so that the
    /// collector pins it.
    signing_key: shelltrail_proto::seal::PublicKey,
    /// Sessions found damaged while shipping, whose DAMAGED record is still to be written.
    damaged: Mutex<Vec<DamagedRecord>>,
}

impl Shipper {
    /// Builds the catalogue from the recovered spool index.
    pub fn new(
        cfg: ShipConfig,
        spool_dir: PathBuf,
        index: &spool::Index,
        stats: Arc<Stats>,
        writer: std::sync::mpsc::Sender<Append>,
        signing_key: shelltrail_proto::seal::PublicKey,
    ) -> Arc<Shipper> {
        let mut cat = Catalogue {
            segments: index.segments.clone(),
            ..Default::default()
        };
        for (id, s) in &index.sessions {
            let mut e = Entry::new(s.open.clone());
            e.chunks = s.chunks.iter().map(|c| (c.seq, c.loc)).collect();
            e.last = s.chunks.last().map(|c| (c.seq, c.loc));
            e.close = s.close.clone();
            e.quarantine = s.damaged.as_ref().map(|d| format!("damaged in the spool: {d}"));
            cat.sessions.insert(id.clone(), e);
        }
        Arc::new(Shipper {
            cfg,
            spool_dir,
            state: Mutex::new(cat),
            wake: Notify::new(),
            stats,
            writer,
            signing_key,
            damaged: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Catalogue> {
        self.state.lock().expect("shipper lock")
    }

    fn note_segment<'a>(cat: &'a mut Catalogue, loc: Loc, id: &str) -> &'a mut SegmentUse {
        cat.segments
            .entry(loc.segment)
            .or_default()
            .entry(id.to_string())
            .or_default()
    }

    /// A session's start record is durable.
    pub fn opened(&self, rec: &OpenRecord, loc: Loc) {
        let mut cat = self.lock();
        let id = rec.meta.session_id.clone();
        Self::note_segment(&mut cat, loc, &id).open = true;
        cat.sessions.entry(id).or_insert_with(|| Entry::new(rec.clone()));
        drop(cat);
        self.wake.notify_one();
    }

    /// A chunk is durable.
    pub fn chunk(&self, id: &str, seq: u64, loc: Loc) {
        let mut cat = self.lock();
        let u = Self::note_segment(&mut cat, loc, id);
        u.max_seq = Some(u.max_seq.map_or(seq, |m| m.max(seq)));
        u.bytes += u64::from(loc.body_len).saturating_sub(spool::CHUNK_RECORD_OVERHEAD);
        if let Some(e) = cat.sessions.get_mut(id) {
            e.chunks.insert(seq, loc);
            if e.last.is_none_or(|(s, _)| s < seq) {
                e.last = Some((seq, loc));
            }
        }
        drop(cat);
        self.wake.notify_one();
    }

    /// A session's end record is durable.
    pub fn closed(&self, rec: &CloseRecord, loc: Loc) {
        let mut cat = self.lock();
        Self::note_segment(&mut cat, loc, &rec.session_id).close = true;
        if let Some(e) = cat.sessions.get_mut(&rec.session_id) {
            e.close = Some(rec.clone());
        }
        drop(cat);
        self.wake.notify_one();
    }

    /// Sessions the collector refused, with the reason (for `sessions`).
    pub fn quarantined(&self) -> Vec<(String, String)> {
        self.lock()
            .sessions
            .iter()
            .filter_map(|(id, e)| e.quarantine.clone().map(|q| (id.clone(), q)))
            .collect()
    }

    /// Ships until the process ends: connects, streams, reconnects with
    /// exponential backoff and jitter.
    ///
    /// The backoff grows while attempts fail and starts again from the
    /// shortest delay after a stream that reached the collector's hello: a
    /// link that drops now and then (or a collector restarted now and then)
    /// must not, after a few drops, leave every later reconnection waiting
    /// the longest delay.
    pub async fn run(self: Arc<Self>) {
        let compactor = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Err(e) = compactor.compact().await {
                    tracing::error!("spool compaction: {e:#}");
                }
            }
        });
        let mut backoff = MIN_BACKOFF;
        loop {
            let mut established = false;
            let Err(e) = self.clone().stream_once(&mut established).await;
            tracing::warn!(
                collector = %self.cfg.collector,
                "shipping interrupted: {}",
                shelltrail_collector::tls::with_causes(e.as_ref())
            );
            if established {
                backoff = MIN_BACKOFF;
            }
            // Jitter: agents that lost the collector together do not return in lockstep.
            let jitter = Duration::from_millis(rand_u64() % (backoff.as_millis() as u64 / 2 + 1));
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection and its stream, until it fails (it never ends
    /// otherwise). Sets `established` once the collector has said hello.
    async fn stream_once(self: Arc<Self>, established: &mut bool) -> Result<Infallible> {
        let channel = crate::agent::collector_channel(&self.cfg).await?;
        let mut client = IngestClient::new(channel).max_decoding_message_size(8 << 20);
        let (tx, rx) = mpsc::channel::<ShipRequest>(64);
        tx.send(req(ship_request::Body::Hello(AgentHello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            facts: Some(host_facts()),
            signing_key: self.signing_key.0.to_vec(),
        })))
        .await?;
        let mut inbound = client
            .ship(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .context("opening the ingest stream")?
            .into_inner();
        match inbound.message().await? {
            Some(ShipResponse {
                body: Some(ship_response::Body::Hello(h)),
            }) => {
                tracing::info!(collector = %self.cfg.collector, host = %h.host, "shipping to the collector");
                *established = true;
            }
            other => bail!("expected CollectorHello, got {other:?}"),
        }
        {
            let mut cat = self.lock();
            cat.in_flight = 0;
            for e in cat.sessions.values_mut() {
                e.announced = false;
                e.position = None;
                e.end_sent = false;
                e.in_flight.clear();
            }
        }
        let (failed_tx, mut failed_rx) = oneshot::channel::<anyhow::Error>();
        let sender = {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.send_loop(tx).await {
                    let _ = failed_tx.send(e);
                }
            })
        };
        let result = loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => self.handle(m),
                    Ok(None) => break Err(anyhow::anyhow!("the collector closed the stream")),
                    Err(status) => break Err(anyhow::anyhow!("collector: {status}")),
                },
                e = &mut failed_rx => break Err(e.unwrap_or_else(|_| anyhow::anyhow!("sender stopped"))),
            }
        };
        sender.abort();
        result
    }

    fn handle(&self, m: ShipResponse) {
        let mut cat = self.lock();
        match m.body {
            // At the start of a session, or mid-stream after a gap: send
            // again from next_seq. Whatever was in flight beyond it will be
            // resent, so it no longer counts against the window.
            Some(ship_response::Body::Position(p)) => {
                let freed = cat.sessions.get_mut(&p.session_id).map_or(0, |e| {
                    e.position = Some(p.next_seq);
                    e.next_to_send = p.next_seq;
                    e.end_sent = false;
                    e.ended |= p.ended;
                    let committed = if p.next_seq > 0 {
                        e.commit_through(p.next_seq - 1)
                    } else {
                        0
                    };
                    committed + std::mem::take(&mut e.in_flight).values().sum::<u64>()
                });
                cat.in_flight = cat.in_flight.saturating_sub(freed);
            }
            Some(ship_response::Body::Committed(c)) => {
                let freed = cat.sessions.get_mut(&c.session_id).map_or(0, |e| {
                    e.ended |= c.ended;
                    e.commit_through(c.through_seq)
                });
                cat.in_flight = cat.in_flight.saturating_sub(freed);
            }
            Some(ship_response::Body::Rejected(r)) => {
                tracing::error!(session = %r.session_id, "the collector rejected the session; quarantined: {}", r.reason);
                let freed = cat.sessions.get_mut(&r.session_id).map_or(0, |e| {
                    e.quarantine = Some(r.reason.clone());
                    std::mem::take(&mut e.in_flight).values().sum()
                });
                cat.in_flight = cat.in_flight.saturating_sub(freed);
            }
            _ => {}
        }
        drop(cat);
        self.wake.notify_one();
    }

    /// Sends whatever is due, round-robin, within the window; sleeps until woken.
    async fn send_loop(&self, tx: mpsc::Sender<ShipRequest>) -> Result<()> {
        loop {
            let batch = self.next_batch()?;
            self.record_damage().await?;
            if batch.is_empty() {
                // Woken by new durable records, acks, or a periodic check.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                continue;
            }
            for r in batch {
                tx.send(r).await.context("the ingest stream closed")?;
            }
        }
    }

    /// The next requests to send: live sessions first, then the backlog.
    ///
    /// A session with little waiting ([`LIVE_BYTES`]) is live: all of it goes
    /// out in every batch, up to the whole [`WINDOW`]. Sessions with more
    /// waiting (the backlog an outage left) are served round-robin,
    /// [`TURN_BYTES`] per turn, and only while less than [`BACKLOG_WINDOW`]
    /// is in flight. The stream is ordered, so a live chunk waits behind
    /// whatever was sent before it: capping the backlog in flight caps that
    /// wait to what the collector commits in a fraction of a second.
    fn next_batch(&self) -> Result<Vec<ShipRequest>> {
        let mut guard = self.lock();
        let cat = &mut *guard;
        let mut out = Vec::new();
        let mut in_flight = cat.in_flight;
        for (id, e) in cat.sessions.iter_mut() {
            if in_flight >= WINDOW {
                break;
            }
            if e.waiting_bytes(LIVE_BYTES + 1) <= LIVE_BYTES {
                self.serve(id, e, u64::MAX, &mut in_flight, &mut out)?;
            }
        }
        let ids: Vec<String> = match &cat.cursor {
            Some(c) => cat
                .sessions
                .range::<String, _>((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                .chain(cat.sessions.range::<String, _>(..=c))
                .map(|(k, _)| k.clone())
                .collect(),
            None => cat.sessions.keys().cloned().collect(),
        };
        for id in ids {
            if in_flight >= BACKLOG_WINDOW {
                break;
            }
            let Some(e) = cat.sessions.get_mut(&id) else { continue };
            if self.serve(&id, e, TURN_BYTES, &mut in_flight, &mut out)? {
                cat.cursor = Some(id);
            }
        }
        cat.in_flight = in_flight;
        Ok(out)
    }

    /// Appends what session `id` has to send (its start, then chunks in order
    /// up to about `budget` bytes, at least one, then its end once all are
    /// sent) to `out`. True if it sent anything.
    fn serve(
        &self,
        id: &str,
        e: &mut Entry,
        budget: u64,
        in_flight: &mut u64,
        out: &mut Vec<ShipRequest>,
    ) -> Result<bool> {
        if e.quarantine.is_some() || e.ended {
            return Ok(false);
        }
        if !e.announced {
            e.announced = true;
            out.push(req(ship_request::Body::Start(e.open.to_start())));
            // Chunks wait for the collector's position.
            return Ok(true);
        }
        if e.position.is_none() {
            return Ok(false);
        }
        let len = out.len();
        let mut sent = 0u64;
        while sent < budget {
            let Some((&seq, &loc)) = e.chunks.range(e.next_to_send..).next() else {
                break;
            };
            let data = match spool::read_chunk(&self.spool_dir, loc) {
                Ok(data) => data,
                Err(err) => {
                    // Retrying cannot help, and failing the stream would stop
                    // every other session's shipping: the session is set aside.
                    let reason = format!("chunk {seq} cannot be read from the spool: {err}");
                    tracing::error!(session = %id, "{reason}; quarantined, not shipped");
                    e.quarantine = Some(format!("damaged in the spool: {reason}"));
                    self.damaged.lock().expect("damaged lock").push(DamagedRecord {
                        session_id: id.to_string(),
                        reason,
                        unix_ms: crate::agent::server::now_ms(),
                    });
                    return Ok(out.len() > len);
                }
            };
            let n = data.len() as u64;
            e.in_flight.insert(seq, n);
            *in_flight += n;
            sent += n;
            e.next_to_send = seq + 1;
            out.push(req(ship_request::Body::Chunk(ChunkData {
                session_id: id.to_string(),
                seq,
                data,
            })));
        }
        let all_sent = e.chunks.range(e.next_to_send..).next().is_none();
        if all_sent
            && !e.end_sent
            && let Some(c) = &e.close
        {
            e.end_sent = true;
            out.push(req(ship_request::Body::End(c.to_end())));
        }
        Ok(out.len() > len)
    }

    /// Writes the DAMAGED records of sessions [`serve`](Self::serve) set
    /// aside, so that listings show them and a restart keeps them aside.
    async fn record_damage(&self) -> Result<()> {
        let found = std::mem::take(&mut *self.damaged.lock().expect("damaged lock"));
        for rec in found {
            let (done, wait) = oneshot::channel();
            self.writer
                .send(Append {
                    body: spool::damaged_body(&rec),
                    done,
                })
                .map_err(|_| anyhow::anyhow!("spool writer stopped"))?;
            let loc = wait
                .await?
                .map_err(|e| anyhow::anyhow!("recording the damage of session {}: {e}", rec.session_id))?;
            // The record's segment holds the quarantined session: it is kept too.
            Self::note_segment(&mut self.lock(), loc, &rec.session_id);
        }
        Ok(())
    }

    /// Deletes closed segments whose every record the collector has committed.
    async fn compact(&self) -> Result<()> {
        let active = self.stats.active_segment.load(Ordering::Relaxed);
        let (seg, carry) = {
            let cat = self.lock();
            let Some((seg, carry)) = cat
                .segments
                .range(..active)
                .find_map(|(&seg, uses)| deletable(&cat, seg, uses).map(|carry| (seg, carry)))
            else {
                return Ok(());
            };
            (seg, carry)
        };
        // Start records of sessions still open move forward before their segment goes.
        for mut rec in carry {
            let (done, wait) = oneshot::channel();
            let id = rec.meta.session_id.clone();
            let resume = self.resume_point(&id)?;
            rec.resume = Some(resume);
            self.writer
                .send(Append {
                    body: spool::open_body(&rec),
                    done,
                })
                .map_err(|_| anyhow::anyhow!("spool writer stopped"))?;
            let loc = wait
                .await?
                .map_err(|e| anyhow::anyhow!("carrying forward session {id}: {e}"))?;
            Self::note_segment(&mut self.lock(), loc, &id).open = true;
        }
        let path = self.spool_dir.join(format!("{seg:020}.seg"));
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(&path).with_context(|| format!("deleting shipped segment {}", path.display()))?;
        std::fs::File::open(&self.spool_dir).and_then(|d| d.sync_all())?;
        self.stats.total_bytes.fetch_sub(
            size.min(self.stats.total_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        let mut cat = self.lock();
        if let Some(uses) = cat.segments.remove(&seg) {
            // What the segment held no longer counts against its sessions' quotas.
            {
                let mut held = self.stats.holdings.lock().expect("holdings lock");
                for (id, u) in &uses {
                    if let Some(e) = cat.sessions.get(id) {
                        held.release(e.open.peer_uid, id, u.bytes);
                    }
                }
            }
            // Forget sessions that are fully shipped and no longer in any segment.
            for id in uses.keys() {
                let referenced = cat.segments.values().any(|u| u.contains_key(id));
                if !referenced && cat.sessions.get(id).is_some_and(|e| e.ended) {
                    cat.sessions.remove(id);
                }
            }
        }
        tracing::info!(segment = seg, bytes = size, "deleted a fully shipped spool segment");
        Ok(())
    }

    /// Where a still-open session continues: the seq after its newest chunk in
    /// the spool and that chunk's hash (read now, before its segment may go).
    fn resume_point(&self, id: &str) -> Result<(u64, String)> {
        let last = self.lock().sessions.get(id).and_then(|e| e.last);
        let (next, hash) = match last {
            Some((seq, loc)) => (
                seq + 1,
                shelltrail_cast::chunk::hash(&spool::read_chunk(&self.spool_dir, loc)?)
                    .with_context(|| format!("session {id}: its last spooled chunk {seq} is unreadable"))?,
            ),
            None => (0, shelltrail_cast::chunk::chain_seed(id)),
        };
        Ok((next, hex::encode(hash)))
    }
}

/// Whether a segment's records are all committed; if so, the start records to carry forward.
fn deletable(cat: &Catalogue, seg: u64, uses: &BTreeMap<String, SegmentUse>) -> Option<Vec<OpenRecord>> {
    let mut carry = Vec::new();
    for (id, u) in uses {
        let Some(e) = cat.sessions.get(id) else { continue };
        if e.quarantine.is_some() {
            return None;
        }
        if let Some(m) = u.max_seq
            && e.committed.is_none_or(|c| c < m)
        {
            return None;
        }
        if u.close && !e.ended {
            return None;
        }
        // The start record must outlive the segment while anything of the
        // session remains: more chunks to come (live), or records in other
        // segments that a later scan must still attach to it.
        let elsewhere = cat
            .segments
            .iter()
            .any(|(&other, u)| other != seg && u.contains_key(id));
        if u.open && (!e.ended || elsewhere) {
            carry.push(e.open.clone());
        }
    }
    Some(carry)
}

fn req(body: ship_request::Body) -> ShipRequest {
    ShipRequest { body: Some(body) }
}

/// Host facts from sysinfo.
pub fn host_facts() -> HostFacts {
    HostFacts {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: sysinfo::System::long_os_version().unwrap_or_default(),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

/// A little randomness for jitter, without a dependency: the clock's nanoseconds.
fn rand_u64() -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(n) ^ u64::from(std::process::id()).rotate_left(17)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::spool::tests::open_rec;
    use crate::agent::spool::{Writer, chunk_body, open_body};
    use shelltrail_proto::v1::{Committed, SessionPosition};

    /// Appends records to a fresh spool segment and returns their locations.
    fn append(dir: &std::path::Path, bodies: Vec<Vec<u8>>) -> Vec<Loc> {
        let last = spool::segments(dir).unwrap().last().copied().unwrap_or(0);
        let w = Writer::create(dir, last, 64 << 20, Arc::new(Stats::default())).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waits: Vec<_> = bodies
            .into_iter()
            .map(|body| {
                let (done, wait) = oneshot::channel();
                tx.send(Append { body, done }).unwrap();
                wait
            })
            .collect();
        drop(tx);
        w.run(rx);
        waits.into_iter().map(|w| w.blocking_recv().unwrap().unwrap()).collect()
    }

    fn position(s: &Shipper, id: &uuid::Uuid) {
        s.handle(ShipResponse {
            body: Some(ship_response::Body::Position(SessionPosition {
                session_id: id.to_string(),
                next_seq: 0,
                ..Default::default()
            })),
        });
    }

    /// (session, seq) of every chunk in a batch, in order.
    fn chunks(batch: &[ShipRequest]) -> Vec<(String, u64)> {
        batch
            .iter()
            .filter_map(|r| match &r.body {
                Some(ship_request::Body::Chunk(c)) => Some((c.session_id.clone(), c.seq)),
                _ => None,
            })
            .collect()
    }

    /// After an outage a big backlog fills the backlog's share of the window;
    /// a live session's new chunk still goes out in the next batch, first, and
    /// the backlog goes on as the collector commits it.
    #[test]
    fn live_chunks_overtake_a_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let (backlog, live) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let mut bodies = vec![
            open_body(&open_rec(&backlog.to_string())),
            open_body(&open_rec(&live.to_string())),
        ];
        bodies.extend((0..40).map(|seq| chunk_body(&backlog, seq, &[b'x'; 256 << 10])));
        bodies.push(chunk_body(&live, 0, b"typed"));
        append(dir.path(), bodies);
        let index = spool::scan(dir.path(), true).unwrap();
        let (writer, _rx) = std::sync::mpsc::channel();
        let s = Shipper::new(
            ShipConfig::default(),
            dir.path().into(),
            &index,
            Arc::new(Stats::default()),
            writer,
            shelltrail_proto::seal::PublicKey([0; 32]),
        );

        let starts = s.next_batch().unwrap();
        assert_eq!(starts.len(), 2, "both sessions are announced first");
        assert!(chunks(&starts).is_empty(), "no chunk before the collector's position");
        position(&s, &backlog);
        position(&s, &live);

        let first = chunks(&s.next_batch().unwrap());
        assert_eq!(first[0], (live.to_string(), 0), "the live chunk goes first: {first:?}");
        // The backlog goes out a turn per batch until its share of the window is full.
        let mut backlog_sent = first.len() - 1;
        loop {
            let more = chunks(&s.next_batch().unwrap());
            if more.is_empty() {
                break;
            }
            assert!(more.iter().all(|(id, _)| *id == backlog.to_string()), "{more:?}");
            backlog_sent += more.len();
        }
        assert!(
            (16..40).contains(&backlog_sent),
            "the backlog gets its share of the window (4 MiB), not all of it: {backlog_sent} chunks"
        );

        // The user types again while the backlog's share is still full.
        let loc = append(dir.path(), vec![chunk_body(&live, 1, b"more")])[0];
        s.chunk(&live.to_string(), 1, loc);
        assert_eq!(chunks(&s.next_batch().unwrap()), vec![(live.to_string(), 1)]);

        // The collector commits the backlog in flight: the next turn follows.
        s.handle(ShipResponse {
            body: Some(ship_response::Body::Committed(Committed {
                session_id: backlog.to_string(),
                through_seq: backlog_sent as u64 - 1,
                ..Default::default()
            })),
        });
        let next = chunks(&s.next_batch().unwrap());
        assert_eq!(
            next.first(),
            Some(&(backlog.to_string(), backlog_sent as u64)),
            "{next:?}"
        );
    }
}
