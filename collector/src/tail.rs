//! `Tail`: a session followed through the collector.
//!
//! The collector serves a tail from the chunks it has committed, the same
//! durable, hash-checked chunks `export` reads, not from a separate live
//! feed: so what a responder watches is what the recording holds, and a
//! tail that lost its connection resumes by seq with nothing missed and
//! nothing twice. Latency is kept low at the source: while anyone tails a
//! session here, its host's agent is asked to have the recorder cut chunks
//! every few milliseconds ([`crate::hosts::Hosts::watch`]), and each commit
//! wakes the tail at once (the session's summary channel).
//!
//! A tail that starts with the screen replays the session so far through a
//! virtual terminal (`shelltrail_cast::Screen`, asciinema's avt) on the
//! blocking pool, then sends the snapshot and follows from the chunk after
//! the last one replayed. The replay costs in proportion to what the session
//! has printed; it is done once per join.

use crate::hosts::WatchGuard;
use crate::store::{Store, StoredChunk};
use shelltrail_cast::Screen;
use shelltrail_cast::feed::{Feed, events};
use shelltrail_proto::v1::{Resize, Snapshot, TailFrame, TailUpdate, tail_frame};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tonic::Status;

/// Bytes of stored chunks read at once.
const READ_BATCH_BYTES: usize = 4 << 20;

/// Where a tail starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The current screen, then what follows.
    Screen,
    /// From this chunk on, no screen (0: the whole session; later: a
    /// tail resuming after a lost connection).
    From(u64),
}

/// One tail; runs until the session ends or the tailer goes away.
pub struct TailTask {
    pub store: Arc<Store>,
    pub session_id: String,
    pub start: Start,
    /// Output only: no screen, no resizes.
    pub raw: bool,
    pub tx: mpsc::Sender<Result<TailUpdate, Status>>,
    pub updates: watch::Receiver<crate::store::SessionSummary>,
    pub shutdown: watch::Receiver<bool>,
    /// Keeps the session watched at its host while this tail runs.
    pub watching: Option<WatchGuard>,
}

fn frame(body: tail_frame::Body) -> TailFrame {
    TailFrame { body: Some(body) }
}

/// The frames for a tailer of what one stored chunk (or run) recorded from
/// chunk `from` on (a run may start before it), and the seq after it.
fn frames_of(c: &StoredChunk, from: u64, raw: bool, exit: &mut Option<i32>) -> Result<(u64, Vec<TailFrame>), String> {
    let unpacked = shelltrail_cast::run::unpack(&c.bytes).map_err(|e| format!("chunk {}: {e}", c.seq))?;
    let mut out = Vec::new();
    for part in unpacked.parts.iter().filter(|p| p.header.seq >= from) {
        for f in events(unpacked.content(part)) {
            match f {
                Feed::Output(b) => out.push(frame(tail_frame::Body::Output(b))),
                Feed::Resize(cols, rows) if !raw => out.push(frame(tail_frame::Body::Resize(Resize {
                    cols: cols.into(),
                    rows: rows.into(),
                }))),
                Feed::Resize(..) => {}
                Feed::Exit(code) => {
                    *exit = Some(code);
                    out.push(frame(tail_frame::Body::Exit(code)));
                }
            }
        }
    }
    Ok((c.last_seq + 1, out))
}

/// Replays chunks from the first up to `until` through a screen.
fn replay(store: &Store, id: &str, until: u64) -> Result<(Screen, u64, Option<i32>), String> {
    let mut screen = Screen::new(80, 24);
    let mut next = 0;
    let mut exit = None;
    while next < until {
        let chunks = store
            .read_chunks(id, next, READ_BATCH_BYTES)
            .map_err(|e| e.to_string())?;
        if chunks.is_empty() {
            break;
        }
        for c in chunks {
            let unpacked = shelltrail_cast::run::unpack(&c.bytes).map_err(|e| format!("chunk {}: {e}", c.seq))?;
            for part in &unpacked.parts {
                for f in events(unpacked.content(part)) {
                    match f {
                        Feed::Output(b) => screen.feed(&b),
                        Feed::Resize(cols, rows) => screen.resize(cols, rows),
                        Feed::Exit(code) => exit = Some(code),
                    }
                }
            }
            next = c.last_seq + 1;
        }
    }
    Ok((screen, next, exit))
}

impl TailTask {
    pub async fn run(mut self) {
        if let Err(status) = self.follow().await {
            let _ = self.tx.send(Err(status)).await;
        }
        drop(self.watching.take());
    }

    async fn follow(&mut self) -> Result<(), Status> {
        let mut exit = None;
        let mut next = match self.start {
            Start::From(seq) => seq,
            Start::Screen => {
                let until = self.updates.borrow().next_seq;
                let (store, id) = (self.store.clone(), self.session_id.clone());
                let (screen, next, ended) = tokio::task::spawn_blocking(move || replay(&store, &id, until))
                    .await
                    .map_err(|e| Status::internal(format!("replay failed: {e}")))?
                    .map_err(Status::data_loss)?;
                exit = ended;
                let mut frames = Vec::new();
                if !self.raw {
                    let snap = screen.snapshot();
                    frames.push(frame(tail_frame::Body::Snapshot(Snapshot {
                        cols: snap.cols.into(),
                        rows: snap.rows.into(),
                        screen: snap.bytes,
                        approximate: false,
                        next_seq: next,
                    })));
                }
                if let Some(code) = exit {
                    frames.push(frame(tail_frame::Body::Exit(code)));
                }
                self.send(next, frames).await?;
                next
            }
        };
        while exit.is_none() {
            // Marked seen before reading: a commit during the read wakes the wait.
            let summary = self.updates.borrow_and_update().clone();
            let (store, id) = (self.store.clone(), self.session_id.clone());
            let chunks = tokio::task::spawn_blocking(move || store.read_chunks(&id, next, READ_BATCH_BYTES))
                .await
                .map_err(|e| Status::internal(format!("chunk reader failed: {e}")))?
                .map_err(|e| Status::data_loss(e.to_string()))?;
            if !chunks.is_empty() {
                for c in &chunks {
                    let (after, frames) = frames_of(c, next, self.raw, &mut exit).map_err(Status::data_loss)?;
                    next = after;
                    self.send(next, frames).await?;
                    if exit.is_some() {
                        break;
                    }
                }
                continue;
            }
            if let Some(end) = &summary.end {
                // Ended without an exit event in its chunks (the recorder
                // vanished): the end record has the status.
                let code = end.close.as_ref().map_or(-1, |c| c.exit_status);
                self.send(next, vec![frame(tail_frame::Body::Exit(code))]).await?;
                return Ok(());
            }
            if let Some(reason) = summary.quarantine.as_ref().or(summary.damaged.as_ref()) {
                return Err(Status::failed_precondition(format!("session stopped: {reason}")));
            }
            tokio::select! {
                changed = self.updates.changed() => if changed.is_err() { return Ok(()) },
                _ = self.tx.closed() => return Ok(()),
                () = crate::server::stopped(&mut self.shutdown) => {
                    return Err(Status::unavailable("the collector is shutting down"));
                }
            }
        }
        Ok(())
    }

    async fn send(&self, next_seq: u64, frames: Vec<TailFrame>) -> Result<(), Status> {
        self.tx
            .send(Ok(TailUpdate { next_seq, frames }))
            .await
            .map_err(|_| Status::cancelled("the tailer went away"))
    }
}
