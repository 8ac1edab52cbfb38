//! The recorder thread: turns what the copy loops saw into asciicast events,
//! cuts them into compressed chunks and hands the chunks to the link.
//!
//! Encoding and compression run here, never on the copy loops: a copy loop
//! writes to the terminal first and only then passes the bytes on, so the
//! user's echo never waits for the recording.

use crate::shell::link::{Budget, ToLink};
use shelltrail_cast::asciicast::{Encoder, Header};
use shelltrail_cast::chunk::Chunker;
use shelltrail_proto::v1::Close;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::{Duration, Instant};

/// What the copy loops and the session owner tell the recorder.
pub enum Event {
    Output(Instant, Vec<u8>),
    Input(Instant, Vec<u8>),
    /// Keystrokes typed while the terminal's echo was off (a password prompt): not recorded.
    InputHidden(Instant),
    Resize(Instant, u16, u16),
    Marker(Instant, String),
    /// The session is over; `close` is completed with the chunk numbers here.
    Exit(Instant, i32, Close),
}

/// Spent output buffers go back to the copy loop on this channel, so a busy
/// session reuses a few buffers instead of allocating one per burst.
pub type Recycle = SyncSender<Vec<u8>>;

/// The recorder's channels: events in, spent buffers back, chunks out.
pub struct Channels {
    pub rx: Receiver<Event>,
    pub recycle: Recycle,
    pub link: Sender<ToLink>,
}

pub struct Settings {
    pub chunk_bytes: usize,
    pub chunk_interval: Duration,
    /// While set (ms), someone watches the session: chunks are cut this
    /// often instead, so a tailer sees output in milliseconds.
    pub watched: Arc<std::sync::atomic::AtomicU32>,
    pub compression_level: i32,
    /// `deny`: wait for the agent when memory is full; `allow`: drop and name the gap.
    pub wait_when_full: bool,
}

/// Runs until Exit; returns the seqs it had to drop.
pub fn run(
    session_id: &str,
    header: Header,
    start: Instant,
    settings: Settings,
    channels: Channels,
    budget: Arc<Budget>,
) -> Vec<u64> {
    let Channels { rx, recycle, link } = channels;
    let mut enc = Encoder::new();
    let mut chunker = Chunker::new(session_id, settings.compression_level);
    let mut lost = Vec::new();
    // Room for a whole chunk plus the event that tips it over, once, instead
    // of doubling into a buffer twice the chunk size.
    chunker.buffer().reserve_exact(settings.chunk_bytes + (256 << 10));
    enc.header(&header, chunker.buffer());
    // The header goes out at once: the agent knows the session's shape even
    // if the recorder is killed a moment later.
    let mut first_ms: Option<u64> = Some(0);
    let mut last_ms = 0u64;
    let mut deadline: Option<Instant> = Some(start);
    let mut hidden = false;
    let ms = |t: Instant| t.saturating_duration_since(start).as_millis() as u64;

    loop {
        let ev = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return lost,
            },
            None => match rx.recv() {
                Ok(ev) => Some(ev),
                Err(_) => return lost,
            },
        };
        let mut finished = None;
        if let Some(ev) = ev {
            let t = match &ev {
                Event::Output(t, _)
                | Event::Input(t, _)
                | Event::InputHidden(t)
                | Event::Resize(t, _, _)
                | Event::Marker(t, _)
                | Event::Exit(t, _, _) => *t,
            };
            let rel = t.saturating_duration_since(start);
            let buf = chunker.buffer();
            match ev {
                Event::Output(_, data) => {
                    enc.output(rel, &data, buf);
                    // Full or gone: the buffer is simply freed.
                    let _ = recycle.try_send(data);
                }
                Event::Input(_, data) => {
                    hidden = false;
                    enc.input(rel, &data, buf)
                }
                Event::InputHidden(_) => {
                    if !hidden {
                        enc.marker(rel, "shelltrail: input not recorded while terminal echo is off", buf);
                        hidden = true;
                    }
                }
                Event::Resize(_, c, r) => enc.resize(rel, c, r, buf),
                Event::Marker(_, m) => enc.marker(rel, &m, buf),
                Event::Exit(_, status, close) => {
                    enc.exit(rel, status, buf);
                    finished = Some(close);
                }
            }
            if chunker.pending_len() > 0 {
                first_ms.get_or_insert(ms(t));
                last_ms = ms(t);
                let interval = match settings.watched.load(std::sync::atomic::Ordering::Relaxed) {
                    0 => settings.chunk_interval,
                    ms => settings.chunk_interval.min(Duration::from_millis(ms.into())),
                };
                deadline.get_or_insert(t + interval);
            }
        }
        let due = deadline.is_some_and(|d| Instant::now() >= d);
        if finished.is_some() || due || chunker.pending_len() >= settings.chunk_bytes {
            if let Some(chunk) = chunker.cut(first_ms.unwrap_or(last_ms), last_ms) {
                let n = chunk.bytes.len() as u64;
                let admitted = if settings.wait_when_full {
                    budget.take_waiting(n)
                } else {
                    budget.try_take(n)
                };
                if admitted {
                    if link.send(ToLink::Chunk(chunk)).is_err() {
                        return lost;
                    }
                } else {
                    lost.push(chunk.seq);
                }
            }
            first_ms = None;
            deadline = None;
        }
        if let Some(mut close) = finished {
            close.last_seq = chunker.next_seq().saturating_sub(1);
            close.lost_seqs = lost.clone();
            // Where the chain ends, for the agent to hold against its own.
            close.chunks = chunker.next_seq();
            close.final_hash = chunker.prev_hash().to_vec();
            let _ = link.send(ToLink::Close(close));
            return lost;
        }
    }
}
