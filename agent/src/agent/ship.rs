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
//! * What is committed is reported to the [`Spool`], which retires segments
//!   (see `spool`): the shipper never names or deletes a segment itself.
//! * A session the collector rejects is quarantined: never retried, its
//!   segments kept, the reason logged and listed. So is a session damaged in
//!   the spool (found at the agent's start, or a chunk shipping cannot
//!   read): it is never shipped as if it were whole.
//!
//! ## Orders
//! The collector also sends what operators ask of this host on the same
//! stream (`HostOrder`: end a session, unlock a user, watch a session). The
//! shipper hands each to the agent ([`Shipper::on_order`]) and sends the
//! answer back (`OrderResult`).
//!
//! ## Fairness
//! Live sessions (little waiting) go first in every batch; the backlog an
//! outage leaves is served round-robin, a megabyte per session per turn, in a
//! smaller share of the window of unacknowledged bytes. So after an outage
//! the backlog drains at full speed while a live session's chunks wait only
//! behind the few megabytes of backlog already in flight, not behind a round.

use crate::agent::spool::{DamagedRecord, Session, Spool};
use crate::config::ShipConfig;
use anyhow::{Context, Result, bail};
use shelltrail_proto::v1::{
    AgentHello, ChunkData, HostFacts, HostOrder, OrderResult, ShipRequest, ShipResponse, ingest_client::IngestClient,
    ship_request, ship_response,
};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

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

/// Bytes of chunks not yet sent, counted up to `limit` (enough to tell a
/// live session from a backlog without walking the whole backlog).
fn waiting_bytes(s: &Session, limit: u64) -> u64 {
    let mut n = 0;
    for loc in s.unshipped.range(s.stream.next_to_send..).map(|(_, l)| l) {
        n += u64::from(loc.body_len);
        if n >= limit {
            break;
        }
    }
    n
}

/// Shared between the agent's server and the shipping task.
pub struct Shipper {
    cfg: ShipConfig,
    spool: Arc<Spool>,
    /// The host's session-signing key, announced in every hello so that the
    /// collector pins it.
    signing_key: shelltrail_proto::seal::PublicKey,
    /// Sessions found damaged while shipping, whose DAMAGED record is still to be written.
    damaged: Mutex<Vec<DamagedRecord>>,
    /// Does what the collector orders (set by the agent).
    orders: OnceLock<OrderHandler>,
}

/// What the collector tells the agent, beside acknowledgements.
pub enum FromCollector {
    /// A new stream: whatever the collector had asked before is void (it
    /// asks again what still holds).
    Connected,
    /// An operator's order; the handler's answer, if any, goes back.
    Order(HostOrder),
}

/// The agent's handler of [`FromCollector`] messages.
pub type OrderHandler = Box<dyn Fn(FromCollector) -> Option<OrderResult> + Send + Sync>;

impl Shipper {
    pub fn new(cfg: ShipConfig, spool: Arc<Spool>, signing_key: shelltrail_proto::seal::PublicKey) -> Arc<Shipper> {
        Arc::new(Shipper {
            cfg,
            spool,
            signing_key,
            damaged: Mutex::new(Vec::new()),
            orders: OnceLock::new(),
        })
    }

    /// Sets who carries out the collector's orders (once; later calls are
    /// ignored). Without one, orders are answered as not supported.
    pub fn on_order(&self, handler: OrderHandler) {
        let _ = self.orders.set(handler);
    }

    fn order(&self, m: FromCollector) -> Option<OrderResult> {
        match (self.orders.get(), m) {
            (Some(h), m) => h(m),
            (None, FromCollector::Order(o)) => Some(OrderResult {
                id: o.id,
                ok: false,
                message: "this agent takes no orders".into(),
            }),
            (None, FromCollector::Connected) => None,
        }
    }

    /// Sessions the collector refused, with the reason (for `sessions`).
    pub fn quarantined(&self) -> Vec<(String, String)> {
        self.spool
            .lock()
            .sessions
            .iter()
            .filter_map(|(id, s)| s.rejected.clone().map(|q| (id.clone(), q)))
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
        tokio::spawn(self.spool.clone().retire_forever());
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
            let mut cat = self.spool.lock();
            cat.in_flight = 0;
            for s in cat.sessions.values_mut() {
                s.stream = Default::default();
            }
        }
        self.order(FromCollector::Connected);
        let answers = tx.clone();
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
                    Ok(Some(ShipResponse { body: Some(ship_response::Body::Order(o)) })) => {
                        // Off this task: an order may wait for a recorder
                        // to reconnect, and acks must keep flowing meanwhile.
                        let (me, answers) = (self.clone(), answers.clone());
                        tokio::spawn(async move {
                            let done = tokio::task::spawn_blocking(move || me.order(FromCollector::Order(o))).await;
                            if let Ok(Some(answer)) = done {
                                let _ = answers.send(req(ship_request::Body::Result(answer))).await;
                            }
                        });
                    }
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
        let mut cat = self.spool.lock();
        let mut shipped = None;
        match m.body {
            // At the start of a session, or mid-stream after a gap: send
            // again from next_seq. Whatever was in flight beyond it will be
            // resent, so it no longer counts against the window.
            Some(ship_response::Body::Position(p)) => {
                let freed = cat.sessions.get_mut(&p.session_id).map_or(0, |s| {
                    s.stream.position = Some(p.next_seq);
                    s.stream.next_to_send = p.next_seq;
                    s.stream.end_sent = false;
                    if p.ended {
                        shipped = Some(p.session_id.clone());
                    }
                    let committed = if p.next_seq > 0 {
                        s.commit_through(p.next_seq - 1)
                    } else {
                        0
                    };
                    committed + std::mem::take(&mut s.stream.in_flight).values().sum::<u64>()
                });
                cat.in_flight = cat.in_flight.saturating_sub(freed);
            }
            Some(ship_response::Body::Committed(c)) => {
                let freed = cat.sessions.get_mut(&c.session_id).map_or(0, |s| {
                    if c.ended {
                        shipped = Some(c.session_id.clone());
                    }
                    s.commit_through(c.through_seq)
                });
                cat.in_flight = cat.in_flight.saturating_sub(freed);
            }
            Some(ship_response::Body::Rejected(r)) => {
                tracing::error!(session = %r.session_id, "the collector rejected the session; quarantined: {}", r.reason);
                let freed = cat.sessions.get_mut(&r.session_id).map_or(0, |s| {
                    s.rejected = Some(r.reason.clone());
                    std::mem::take(&mut s.stream.in_flight).values().sum()
                });
                cat.in_flight = cat.in_flight.saturating_sub(freed);
            }
            _ => {}
        }
        drop(cat);
        if let Some(id) = shipped {
            self.spool.shipped(&id, crate::agent::server::now_ms());
        }
        self.spool.committed();
        self.spool.changed.notify_one();
    }

    /// Sends whatever is due, round-robin, within the window; sleeps until woken.
    async fn send_loop(&self, tx: mpsc::Sender<ShipRequest>) -> Result<()> {
        loop {
            let batch = self.next_batch()?;
            self.record_damage().await?;
            if batch.is_empty() {
                // Woken by new durable records, acks, or a periodic check.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.spool.changed.notified()).await;
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
        let mut guard = self.spool.lock();
        let cat = &mut *guard;
        let mut out = Vec::new();
        let mut in_flight = cat.in_flight;
        for (id, e) in cat.sessions.iter_mut() {
            if in_flight >= WINDOW {
                break;
            }
            if waiting_bytes(e, LIVE_BYTES + 1) <= LIVE_BYTES {
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
        e: &mut Session,
        budget: u64,
        in_flight: &mut u64,
        out: &mut Vec<ShipRequest>,
    ) -> Result<bool> {
        if e.quarantine().is_some() || e.shipped {
            return Ok(false);
        }
        if !e.stream.announced {
            e.stream.announced = true;
            out.push(req(ship_request::Body::Start(e.open.to_start())));
            // Chunks wait for the collector's position.
            return Ok(true);
        }
        if e.stream.position.is_none() {
            return Ok(false);
        }
        let len = out.len();
        let mut sent = 0u64;
        while sent < budget {
            let Some((&seq, &loc)) = e.unshipped.range(e.stream.next_to_send..).next() else {
                break;
            };
            let data = match self.spool.read_chunk(loc) {
                Ok(data) => data,
                Err(err) => {
                    // Retrying cannot help, and failing the stream would stop
                    // every other session's shipping: the session is set aside.
                    let reason = format!("chunk {seq} cannot be read from the spool: {err}");
                    tracing::error!(session = %id, "{reason}; quarantined, not shipped");
                    e.damaged = Some(reason.clone());
                    self.damaged.lock().expect("damaged lock").push(DamagedRecord {
                        session_id: id.to_string(),
                        reason,
                        unix_ms: crate::agent::server::now_ms(),
                    });
                    return Ok(out.len() > len);
                }
            };
            let n = data.len() as u64;
            e.stream.in_flight.insert(seq, n);
            *in_flight += n;
            sent += n;
            e.stream.next_to_send = seq + 1;
            out.push(req(ship_request::Body::Chunk(ChunkData {
                session_id: id.to_string(),
                seq,
                data,
            })));
        }
        let all_sent = e.unshipped.range(e.stream.next_to_send..).next().is_none();
        if all_sent
            && !e.stream.end_sent
            && let Some(c) = &e.close
        {
            e.stream.end_sent = true;
            out.push(req(ship_request::Body::End(c.to_end())));
        }
        Ok(out.len() > len)
    }

    /// Writes the DAMAGED records of sessions [`serve`](Self::serve) set
    /// aside, so that listings show them and a restart keeps them aside.
    async fn record_damage(&self) -> Result<()> {
        let found = std::mem::take(&mut *self.damaged.lock().expect("damaged lock"));
        for rec in found {
            let id = rec.session_id.clone();
            self.spool
                .damaged(rec)
                .await
                .map_err(|e| anyhow::anyhow!("recording the damage of session {id}: {e}"))?;
        }
        Ok(())
    }
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
    use crate::agent::spool::log::tests::{chunk_body, open_rec};
    use shelltrail_cast::chain::Chain;
    use shelltrail_proto::v1::{Committed, SessionPosition};

    /// A chunk queued and made durable through the spool, as a connection does.
    async fn chunk(spool: &Spool, id: &uuid::Uuid, seq: u64, data: &[u8]) {
        let q = spool.queue(chunk_body(id, seq, data)).unwrap();
        let loc = q.done.await.unwrap().unwrap();
        spool.chunk_durable(&id.to_string(), seq, Chain::resume(seq + 1, [0; 32]), loc, q.ticket);
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
    #[tokio::test]
    async fn live_chunks_overtake_a_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let (backlog, live) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let spool = Arc::new(Spool::recover(dir.path(), 64 << 20, 0).unwrap().0);
        spool.open(open_rec(&backlog.to_string())).await.unwrap();
        spool.open(open_rec(&live.to_string())).await.unwrap();
        for seq in 0..40 {
            chunk(&spool, &backlog, seq, &[b'x'; 256 << 10]).await;
        }
        chunk(&spool, &live, 0, b"typed").await;
        let s = Shipper::new(
            ShipConfig::default(),
            spool.clone(),
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
        chunk(&spool, &live, 1, b"more").await;
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
