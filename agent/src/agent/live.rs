//! What a responder joining a live session sees: its current screen, then
//! its output as it comes.
//!
//! Every live session has a [`View`]: a virtual terminal (`cast::Screen`, on
//! asciinema's avt) fed with the session's output as its chunks arrive, and
//! a broadcast of that output to whoever tails it. A tailer joins under the
//! view's lock: the snapshot it gets is exactly the screen before the first
//! output it is sent, so nothing is missed or shown twice.
//!
//! ## Never slowing the session
//! * The connection hands each chunk's output to its view and goes on; the
//!   emulator runs on a blocking thread, one drainer per view (the order of
//!   output is kept), never on the connection's task. Output waiting for the
//!   emulator is capped ([`MAX_PENDING`]): past it (bulk output faster than
//!   the emulator), the oldest is dropped and the screen is rebuilt from
//!   what is left, and says so to the next joiner.
//! * Tailers get output through a bounded broadcast: one that does not keep
//!   up is skipped ahead, to a fresh snapshot with a notice, never waited for.
//!
//! ## Latency
//! Chunks are cut every 100 ms for durability. While anyone tails a
//! session, the agent asks its recorder to cut every [`WATCHED_INTERVAL_MS`]
//! instead (`Watch`), so output reaches tailers in milliseconds through the
//! same checked, durable path; when the last tailer leaves, the recorder goes
//! back to its configured interval.

use shelltrail_cast::Screen;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Output waiting for the emulator, per session, before the oldest goes.
pub const MAX_PENDING: usize = 16 << 20;
/// Output events buffered per tailer before a slow one is skipped ahead.
const TAIL_BUFFER: usize = 256;
/// The chunk interval a recorder uses while its session is watched.
pub const WATCHED_INTERVAL_MS: u32 = 5;

/// What a tailer is sent after its snapshot.
#[derive(Debug, Clone)]
pub enum Feed {
    /// Output, as the terminal received it.
    Output(Arc<Vec<u8>>),
    Resize(u16, u16),
    /// The session ended, with this exit status.
    Exit(i32),
}

/// Where a joiner starts.
pub struct Joined {
    pub cols: u16,
    pub rows: u16,
    /// Escape sequences that draw the current screen on a reset terminal.
    pub screen: Vec<u8>,
    /// Set when the screen may be incomplete (output was dropped: see
    /// [`MAX_PENDING`]).
    pub approximate: bool,
    pub feed: broadcast::Receiver<Feed>,
    pub exit: Option<i32>,
    /// The screen shows every chunk before this one; the feed starts with it.
    pub next_seq: u64,
}

struct State {
    screen: Screen,
    /// Output not yet fed to the screen, in order.
    pending: VecDeque<Arc<Vec<u8>>>,
    pending_bytes: usize,
    /// A drainer is feeding `pending` now.
    draining: bool,
    approximate: bool,
    exit: Option<i32>,
    /// The chunk after the last one taken.
    next_seq: u64,
    tx: broadcast::Sender<Feed>,
    /// Tailers on this host.
    watchers: usize,
    /// Someone tails the session through the collector.
    remote: bool,
}

/// One live session's screen and feed.
pub struct View {
    state: Mutex<State>,
}

impl View {
    fn new(cols: u16, rows: u16) -> View {
        View {
            state: Mutex::new(State {
                screen: Screen::new(cols, rows),
                pending: VecDeque::new(),
                pending_bytes: 0,
                draining: false,
                approximate: false,
                exit: None,
                next_seq: 0,
                tx: broadcast::channel(TAIL_BUFFER).0,
                watchers: 0,
                remote: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("view lock")
    }

    /// Takes what chunk `seq` recorded (see [`parse`]): output goes to the
    /// tailers now and to the screen soon.
    pub fn take(self: &Arc<Self>, seq: u64, events: Vec<Feed>) {
        let mut st = self.lock();
        st.next_seq = st.next_seq.max(seq + 1);
        if events.is_empty() {
            return;
        }
        let mut dropped = false;
        for e in events {
            match &e {
                Feed::Output(bytes) => {
                    st.pending_bytes += bytes.len();
                    st.pending.push_back(bytes.clone());
                    while st.pending_bytes > MAX_PENDING {
                        let Some(old) = st.pending.pop_front() else { break };
                        st.pending_bytes -= old.len();
                        st.approximate = true;
                        dropped = true;
                    }
                }
                Feed::Resize(c, r) => {
                    // Order matters: what came before is drawn at the old size.
                    let (c, r) = (*c, *r);
                    drain(&mut st);
                    st.screen.resize(c, r);
                }
                Feed::Exit(code) => st.exit = Some(*code),
            }
            if st.watchers > 0 {
                let _ = st.tx.send(e);
            }
        }
        if dropped {
            // Output was dropped: the screen starts afresh from what is left.
            let (c, r) = st.screen.size();
            st.screen = Screen::new(c, r);
        }
        if !st.draining && !st.pending.is_empty() {
            st.draining = true;
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.drain_in_background());
        }
    }

    fn drain_in_background(&self) {
        loop {
            let mut st = self.lock();
            let Some(bytes) = st.pending.pop_front() else {
                st.draining = false;
                return;
            };
            st.pending_bytes -= bytes.len();
            st.screen.feed(&bytes);
        }
    }

    /// Joins: the current screen, and the feed from right after it.
    pub fn join(&self) -> Joined {
        let mut st = self.lock();
        drain(&mut st);
        let snap = st.screen.snapshot();
        st.watchers += 1;
        Joined {
            cols: snap.cols,
            rows: snap.rows,
            screen: snap.bytes,
            approximate: st.approximate,
            feed: st.tx.subscribe(),
            exit: st.exit,
            next_seq: st.next_seq,
        }
    }

    /// A tailer that fell behind: a fresh screen to continue from.
    pub fn rejoin(&self) -> Joined {
        let j = self.join();
        self.leave();
        j
    }

    /// A tailer left; true if nobody watches the session any more.
    pub fn leave(&self) -> bool {
        let mut st = self.lock();
        st.watchers = st.watchers.saturating_sub(1);
        st.watchers == 0 && !st.remote
    }

    /// Someone follows the session through the collector (or no longer);
    /// true if anyone watches it now.
    pub fn set_remote(&self, watching: bool) -> bool {
        let mut st = self.lock();
        st.remote = watching;
        st.watchers > 0 || st.remote
    }

    /// Whether anyone watches the session: a recorder that reconnects is
    /// told again.
    pub fn watched(&self) -> bool {
        let st = self.lock();
        st.watchers > 0 || st.remote
    }
}

/// Feeds everything pending, now (under the lock: a joiner waits for it).
fn drain(st: &mut State) {
    while let Some(bytes) = st.pending.pop_front() {
        st.pending_bytes -= bytes.len();
        st.screen.feed(&bytes);
    }
}

/// The events of one chunk's asciicast content that a tailer needs (see
/// `shelltrail_cast::feed`). Run where the chunk is checked (off the
/// connection's task for big ones).
pub fn parse(content: &[u8]) -> Vec<Feed> {
    shelltrail_cast::feed::events(content)
        .into_iter()
        .map(|f| match f {
            shelltrail_cast::feed::Feed::Output(b) => Feed::Output(Arc::new(b)),
            shelltrail_cast::feed::Feed::Resize(c, r) => Feed::Resize(c, r),
            shelltrail_cast::feed::Feed::Exit(code) => Feed::Exit(code),
        })
        .collect()
}

/// The views of the live sessions.
#[derive(Default)]
pub struct Views {
    by_session: Mutex<HashMap<String, Arc<View>>>,
}

impl Views {
    /// The session's view, made (80×24 until its header says) if new.
    pub fn of(&self, session: &str) -> Arc<View> {
        self.by_session
            .lock()
            .expect("views lock")
            .entry(session.to_string())
            .or_insert_with(|| Arc::new(View::new(80, 24)))
            .clone()
    }

    /// The view of a session, if it has one.
    pub fn get(&self, session: &str) -> Option<Arc<View>> {
        self.by_session.lock().expect("views lock").get(session).cloned()
    }

    /// Forgets an ended session's view (tailers already joined keep theirs).
    pub fn remove(&self, session: &str) {
        self.by_session.lock().expect("views lock").remove(session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_joiner_gets_the_screen_then_exactly_what_follows() {
        let view = Arc::new(View::new(80, 24));
        view.take(0, parse(b"{\"version\":3,\"term\":{\"cols\":40,\"rows\":10}}\n[0.1, \"o\", \"hello \\u001b[1mworld\\u001b[0m\\r\\n\"]\n"));
        let mut j = view.join();
        assert_eq!((j.cols, j.rows), (40, 10));
        let mut replay = Screen::new(40, 10);
        replay.feed(&j.screen);
        view.take(
            1,
            parse(b"[0.1, \"o\", \"next\"]\n[0.2, \"r\", \"50x12\"]\n[0.1, \"x\", \"0\"]\n"),
        );
        let mut got = Vec::new();
        while let Ok(f) = j.feed.try_recv() {
            got.push(f);
        }
        assert!(
            matches!(got.as_slice(), [Feed::Output(o), Feed::Resize(50, 12), Feed::Exit(0)] if o.as_slice() == b"next"),
            "{got:?}"
        );
        let mut direct = Screen::new(40, 10);
        direct.feed(b"hello \x1b[1mworld\x1b[0m\r\n");
        assert_eq!(replay.snapshot().bytes, direct.snapshot().bytes);
        assert!(view.leave());
    }
}
