//! The recorder's connection to the agent: delivers chunks in order and keeps
//! every unacknowledged chunk in memory, so that an agent restart (an upgrade,
//! a crash) loses nothing: after reconnecting, the agent says which chunk it
//! needs next and the rest is sent again.
//!
//! Memory is bounded by a [`Budget`]. When it is exhausted the configured
//! policy decides: `deny` makes the session wait (output stalls until the
//! agent catches up), `allow` drops the chunk and names it in the session's
//! Close message, so the gap is recorded, never silent.
//!
//! The agent enforces its limits (quotas, the spool's cap) on every chunk.
//! When it holds the session (`Held`), the budget is treated as full at
//! once, so the same policy applies without first filling memory; a new
//! connection lifts the hold. When it stops the session's recording
//! (`Stopped`, under `deny` after a bounded wait), the user is told and the
//! session is ended as a `kill` of the recorder would end it.

use crate::shell::record::Event;
use crate::shell::syslog;
use shelltrail_cast::chunk::Chunk;
use shelltrail_proto::framing;
use shelltrail_proto::v1::{AgentFrame, Close, Open, RecorderFrame, SessionMeta, agent_frame, recorder_frame};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Largest frame the agent sends us (acks are tiny).
const MAX_AGENT_FRAME: usize = 64 << 10;
/// What a tailer takes in one frame: a screen, or a chunk's output.
const MAX_TAIL_FRAME: usize = 16 << 20;
/// How long to wait for the agent's answer to Open, and for a write to go through.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    // The cause is in the message, so it is not also the `source`: printed
    // with its chain (`{:#}`), it would appear twice.
    #[error("the shelltrail agent is not reachable at {path}: {error}")]
    Unreachable { path: PathBuf, error: std::io::Error },
    #[error("the shelltrail agent refused the session: {0}")]
    Refused(String),
    /// An administrator locked the user out (`shelltrail kill --lock`).
    #[error("{0}")]
    Locked(String),
    #[error("the shelltrail agent answered unexpectedly: {0}")]
    Protocol(String),
}

/// A connection on which the agent has accepted the session.
pub struct Connection {
    stream: UnixStream,
    /// The first chunk the agent does not hold.
    pub next_seq: u64,
}

/// Connects and opens (or resumes) the session.
pub fn open(socket: &Path, meta: &SessionMeta, resume: bool) -> Result<Connection, ConnectError> {
    let unreachable = |error| ConnectError::Unreachable {
        path: socket.to_path_buf(),
        error,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
    let frame = RecorderFrame {
        body: Some(recorder_frame::Body::Open(Open {
            meta: Some(meta.clone()),
            resume,
        })),
    };
    let mut buf = Vec::new();
    framing::encode(&frame, &mut buf);
    stream.write_all(&buf).map_err(unreachable)?;
    let mut reader = FrameReader::default();
    match reader.next(&mut stream) {
        Ok(Some(AgentFrame {
            body: Some(agent_frame::Body::Accepted(a)),
        })) => {
            stream.set_read_timeout(None).map_err(unreachable)?;
            Ok(Connection {
                stream,
                next_seq: a.next_seq,
            })
        }
        Ok(Some(AgentFrame {
            body: Some(agent_frame::Body::Refused(r)),
        })) if r.locked => Err(ConnectError::Locked(r.reason)),
        Ok(Some(AgentFrame {
            body: Some(agent_frame::Body::Refused(r)),
        })) => Err(ConnectError::Refused(r.reason)),
        Ok(other) => Err(ConnectError::Protocol(format!("expected Accepted, got {other:?}"))),
        Err(e) => Err(ConnectError::Protocol(e.to_string())),
    }
}

/// Sends an administrator's request to the agent at `socket` and returns
/// its answer (the agent decides whether the caller may; see
/// `agent::control`).
pub fn control(
    socket: &Path,
    req: shelltrail_proto::v1::Control,
) -> Result<shelltrail_proto::v1::ControlReply, ConnectError> {
    let unreachable = |error| ConnectError::Unreachable {
        path: socket.to_path_buf(),
        error,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
    let frame = RecorderFrame {
        body: Some(recorder_frame::Body::Control(req)),
    };
    let mut buf = Vec::new();
    framing::encode(&frame, &mut buf);
    stream.write_all(&buf).map_err(unreachable)?;
    match FrameReader::default().next(&mut stream) {
        Ok(Some(AgentFrame {
            body: Some(agent_frame::Body::ControlReply(r)),
        })) => Ok(r),
        Ok(Some(AgentFrame {
            body: Some(agent_frame::Body::Refused(r)),
        })) => Err(ConnectError::Refused(r.reason)),
        Ok(other) => Err(ConnectError::Protocol(format!(
            "expected a ControlReply, got {other:?}"
        ))),
        Err(e) => Err(ConnectError::Protocol(e.to_string())),
    }
}

/// Follows a live session through the agent (`shelltrail tail`): the
/// agent's answer, then each frame to `on` until the session ends, `on`
/// says stop, or the agent goes away.
pub fn tail(
    socket: &Path,
    session: &str,
    mut on: impl FnMut(shelltrail_proto::v1::TailFrame) -> std::io::Result<bool>,
) -> Result<shelltrail_proto::v1::ControlReply, ConnectError> {
    use shelltrail_proto::v1::{Control, Tail, control};
    let unreachable = |error| ConnectError::Unreachable {
        path: socket.to_path_buf(),
        error,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
    let frame = RecorderFrame {
        body: Some(recorder_frame::Body::Control(Control {
            request: Some(control::Request::Tail(Tail {
                session: session.to_string(),
            })),
        })),
    };
    let mut buf = Vec::new();
    framing::encode(&frame, &mut buf);
    stream.write_all(&buf).map_err(unreachable)?;
    let mut reader = FrameReader {
        buf: Vec::new(),
        max: MAX_TAIL_FRAME,
    };
    let reply = match reader.next(&mut stream) {
        Ok(Some(AgentFrame {
            body: Some(agent_frame::Body::ControlReply(r)),
        })) => r,
        Ok(other) => {
            return Err(ConnectError::Protocol(format!(
                "expected a ControlReply, got {other:?}"
            )));
        }
        Err(e) => return Err(ConnectError::Protocol(e.to_string())),
    };
    if !reply.ok {
        return Ok(reply);
    }
    // A quiet session sends nothing for as long as it likes.
    stream.set_read_timeout(None).map_err(unreachable)?;
    loop {
        match reader.next(&mut stream) {
            Ok(Some(AgentFrame {
                body: Some(agent_frame::Body::Tail(f)),
            })) => match on(f) {
                Ok(true) => {}
                Ok(false) => return Ok(reply),
                Err(e) => {
                    return Err(ConnectError::Unreachable {
                        path: socket.to_path_buf(),
                        error: e,
                    });
                }
            },
            Ok(None) => return Ok(reply),
            Ok(other) => return Err(ConnectError::Protocol(format!("expected a TailFrame, got {other:?}"))),
            Err(e) => return Err(ConnectError::Protocol(e.to_string())),
        }
    }
}

/// Reads length-framed messages from a blocking stream.
struct FrameReader {
    buf: Vec<u8>,
    max: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            buf: Vec::new(),
            max: MAX_AGENT_FRAME,
        }
    }
}

impl FrameReader {
    /// The next frame, or None at a clean end of stream.
    fn next(&mut self, r: &mut impl Read) -> std::io::Result<Option<AgentFrame>> {
        loop {
            match framing::take::<AgentFrame>(&mut self.buf, self.max) {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
            let mut tmp = [0u8; 4096];
            // A stop and continue (SIGSTOP, SIGCONT) interrupts a read with a
            // timeout even without a handler: that is no answer, read again.
            let n = match r.read(&mut tmp) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => other?,
            };
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

/// Bytes of recording held in memory and not yet acknowledged.
pub struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
    cap: u64,
    /// Set when the session is over: waiting for room makes no sense any more.
    abandoned: AtomicBool,
    /// Set while the agent holds the session: no room, whatever is used.
    held: AtomicBool,
}

impl Budget {
    pub fn new(cap: u64) -> Arc<Budget> {
        Arc::new(Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            cap,
            abandoned: AtomicBool::new(false),
            held: AtomicBool::new(false),
        })
    }

    /// Takes `n` bytes if they fit.
    pub fn try_take(&self, n: u64) -> bool {
        let mut used = self.used.lock().expect("budget lock");
        if self.held.load(Ordering::Relaxed) || (*used + n > self.cap && *used > 0) {
            return false;
        }
        *used += n;
        true
    }

    /// Takes `n` bytes, waiting for acknowledgements to free them. Gives up
    /// (false) once the session is over and [`Budget::abandon`] was called: a
    /// session whose user has gone must not hang forever on an absent agent.
    pub fn take_waiting(&self, n: u64) -> bool {
        let mut used = self.used.lock().expect("budget lock");
        while self.held.load(Ordering::Relaxed) || (*used + n > self.cap && *used > 0) {
            if self.abandoned.load(Ordering::Relaxed) {
                return false;
            }
            used = self
                .freed
                .wait_timeout(used, Duration::from_millis(100))
                .expect("budget lock")
                .0;
        }
        *used += n;
        true
    }

    /// The agent holds the session (true) or takes it again (false).
    fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Relaxed);
        self.freed.notify_all();
    }

    /// The session has ended: stop waiting for room.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
        self.freed.notify_all();
    }

    fn give_back(&self, n: u64) {
        let mut used = self.used.lock().expect("budget lock");
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

/// Messages into the link thread.
pub enum ToLink {
    Chunk(Chunk),
    /// The session is over: deliver this, then stop.
    Close(Close),
    /// From a connection's reader: acks (`epoch` tells stale connections apart).
    Acked {
        epoch: u64,
        through: u64,
        closed: bool,
    },
    ReaderDone {
        epoch: u64,
    },
    /// The agent holds the session at a limit.
    Held {
        epoch: u64,
        reason: String,
    },
    /// The agent ended the session's recording.
    Stopped {
        epoch: u64,
        reason: String,
    },
    /// Someone watches the session: cut chunks this often (ms; 0: as configured).
    Watch(u32),
    /// A line from the agent for the user's terminal (and the recording).
    Notice(String),
    /// An administrator ended the session (the recording goes on to its end).
    Ended {
        by: String,
        reason: String,
    },
}

/// What happened to the recording, reported when the link stops.
#[derive(Debug, Default)]
pub struct Delivery {
    /// The break-glass fallback file the session's rest was written to.
    pub fallback: Option<PathBuf>,
    /// Chunks never acknowledged by the agent.
    pub undelivered: u64,
    pub close_acked: bool,
}

/// An administrator ended the session: the recording says who and why
/// (a marker, before the exit event), the user is told, and the session
/// ends as a SIGTERM ends it (its program hung up, then killed after a
/// grace). Unlike [`Link::stop`], everything recorded is still delivered.
fn ended(session: &str, by: &str, reason: &str, events: &SyncSender<Event>) {
    let line = format!("shelltrail: this session was ended by {by}: {reason}");
    syslog::warning(&format!("session {session}: {line}"));
    let _ = events.send(Event::Marker(Instant::now(), line.clone()));
    // The user's terminal may be in raw mode: end lines with CR LF.
    let _ = write!(std::io::stderr(), "\r\n{line}\r\n");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM);
}

/// The link's channels: what it is told (and tells itself, from its
/// reader), and the recording's events, for the one it adds itself (an
/// administrator's end of the session).
pub struct Wiring {
    pub tx: Sender<ToLink>,
    pub rx: Receiver<ToLink>,
    pub events: SyncSender<Event>,
    /// The chunk interval the agent asks for while the session is watched
    /// (ms; 0: the configured one), read by the recorder thread.
    pub watched: Arc<std::sync::atomic::AtomicU32>,
    /// A break-glass session: where to record while the agent is away (see
    /// `shell::fallback`).
    pub fallback_dir: Option<PathBuf>,
}

/// Runs the link until the session's Close is acknowledged, or until
/// `close_timeout` after Close when the agent stays away.
pub fn run(
    socket: PathBuf,
    meta: SessionMeta,
    conn: Option<Connection>,
    budget: Arc<Budget>,
    wiring: Wiring,
    close_timeout: Duration,
) -> Delivery {
    let Wiring {
        tx,
        rx,
        events,
        watched,
        fallback_dir,
    } = wiring;
    let mut link = Link {
        socket,
        meta,
        stream: None,
        epoch: 0,
        unacked: VecDeque::new(),
        close: None,
        close_acked: false,
        budget,
        tx,
        retry_at: Instant::now(),
        backoff: Duration::from_millis(50),
        warned: false,
        opened: false,
        stopped: false,
        discarded: Vec::new(),
        fallback_dir,
        spilled: None,
        last_chance: false,
    };
    match conn {
        Some(c) => link.attach(c),
        None => link.spill(),
    }
    let mut close_deadline: Option<Instant> = None;
    loop {
        let wait = if link.stream.is_none() {
            link.retry_at.saturating_duration_since(Instant::now())
        } else {
            Duration::from_secs(1)
        };
        let wait = close_deadline.map_or(wait, |d| wait.min(d.saturating_duration_since(Instant::now())));
        match rx.recv_timeout(wait) {
            Ok(ToLink::Chunk(c)) if link.stopped => {
                link.budget.give_back(c.bytes.len() as u64);
                link.discarded.push(c.seq);
            }
            Ok(ToLink::Chunk(c)) if link.spilled.is_some() => link.spill_chunk(&c),
            Ok(ToLink::Chunk(c)) => {
                link.send_chunk(&c);
                link.unacked.push_back(c);
                if link.stream.is_none() {
                    link.spill();
                }
            }
            Ok(ToLink::Close(mut c)) => {
                // Chunks let go of after the agent stopped the recording are lost too.
                c.lost_seqs.append(&mut link.discarded);
                c.lost_seqs.sort_unstable();
                c.lost_seqs.dedup();
                link.close = Some(c);
                link.send_close();
                if link.stream.is_none() && link.spilled.is_none() {
                    link.last_chance = true;
                    link.spill();
                }
                link.spill_close();
                close_deadline = Some(Instant::now() + close_timeout);
            }
            Ok(ToLink::Acked { epoch, through, closed }) if epoch == link.epoch => link.acked(through, closed),
            Ok(ToLink::ReaderDone { epoch }) if epoch == link.epoch => link.lost("the agent closed the connection"),
            Ok(ToLink::Held { epoch, reason }) if epoch == link.epoch && !link.stopped => {
                syslog::warning(&format!(
                    "session {}: the agent holds the recording: {reason}",
                    link.meta.session_id
                ));
                link.budget.hold(true);
            }
            Ok(ToLink::Stopped { epoch, reason }) if epoch == link.epoch => link.stop(&reason),
            Ok(ToLink::Ended { by, reason }) => ended(&link.meta.session_id, &by, &reason, &events),
            Ok(ToLink::Notice(text)) => {
                let line = format!("shelltrail: {text}");
                let _ = events.send(Event::Marker(Instant::now(), line.clone()));
                let _ = write!(std::io::stderr(), "\r\n{line}\r\n");
            }
            // Clamped: a watched session cuts at most every 2 ms.
            Ok(ToLink::Watch(ms)) => watched.store(if ms == 0 { 0 } else { ms.max(2) }, Ordering::Relaxed),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if link.stream.is_none() && !link.stopped && link.spilled.is_none() && Instant::now() >= link.retry_at {
            link.reconnect();
        }
        if link.close_acked {
            break;
        }
        if close_deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    Delivery {
        fallback: link.spilled.as_ref().map(|f| f.path().to_path_buf()),
        undelivered: link.unacked.len() as u64,
        close_acked: link.close_acked,
    }
}

struct Link {
    socket: PathBuf,
    meta: SessionMeta,
    stream: Option<UnixStream>,
    epoch: u64,
    unacked: VecDeque<Chunk>,
    close: Option<Close>,
    close_acked: bool,
    budget: Arc<Budget>,
    tx: Sender<ToLink>,
    retry_at: Instant,
    backoff: Duration,
    warned: bool,
    /// The agent has accepted this session once. Until then a reconnect
    /// must open it (the agent has no record to resume): a session started
    /// while the agent was down (`on_agent_unavailable = allow`) is
    /// delivered whole when the agent comes back.
    opened: bool,
    /// The agent stopped the session's recording: no more chunks are sent,
    /// only the Close, and there is no reconnecting.
    stopped: bool,
    /// Seqs of the chunks let go of since.
    discarded: Vec<u64>,
    /// Break-glass: where to spill when the agent is away.
    fallback_dir: Option<PathBuf>,
    /// The fallback file the session went to (for good).
    spilled: Option<crate::shell::fallback::Fallback>,
    /// The session has ended: a spill that fails now is not tried again.
    last_chance: bool,
}

impl Link {
    fn attach(&mut self, conn: Connection) {
        self.opened = true;
        self.budget.hold(false);
        self.epoch += 1;
        let epoch = self.epoch;
        // Everything below next_seq is durable at the agent: forget it.
        while self.unacked.front().is_some_and(|c| c.seq < conn.next_seq) {
            let c = self.unacked.pop_front().expect("front");
            self.budget.give_back(c.bytes.len() as u64);
        }
        let reader = conn.stream.try_clone();
        self.stream = Some(conn.stream);
        match reader {
            Ok(mut r) => {
                let tx = self.tx.clone();
                std::thread::Builder::new()
                    .name("agent-acks".into())
                    .spawn(move || {
                        let mut fr = FrameReader::default();
                        while let Ok(Some(f)) = fr.next(&mut r) {
                            let msg = match f.body {
                                Some(agent_frame::Body::Ack(a)) => ToLink::Acked {
                                    epoch,
                                    through: a.through_seq,
                                    closed: a.closed,
                                },
                                // The agent gives up on this connection (say, its disk
                                // is full): reconnect and resend what it lacks.
                                Some(agent_frame::Body::Refused(r)) => {
                                    syslog::warning(&format!("agent refused to go on: {}", r.reason));
                                    break;
                                }
                                Some(agent_frame::Body::Held(h)) => ToLink::Held {
                                    epoch,
                                    reason: h.reason,
                                },
                                Some(agent_frame::Body::Stopped(s)) => ToLink::Stopped {
                                    epoch,
                                    reason: s.reason,
                                },
                                Some(agent_frame::Body::Watch(w)) => ToLink::Watch(w.chunk_interval_ms),
                                Some(agent_frame::Body::Notice(n)) => ToLink::Notice(n.text),
                                Some(agent_frame::Body::Ended(e)) => ToLink::Ended {
                                    by: e.by,
                                    reason: e.reason,
                                },
                                _ => continue,
                            };
                            if tx.send(msg).is_err() {
                                return;
                            }
                        }
                        let _ = tx.send(ToLink::ReaderDone { epoch });
                    })
                    .expect("spawn ack reader");
            }
            Err(e) => return self.lost(&format!("cannot clone the agent socket: {e}")),
        }
        // Resend what the agent does not have yet, in order.
        let pending: Vec<Chunk> = self.unacked.iter().cloned().collect();
        for c in &pending {
            self.send_chunk(c);
        }
        self.send_close();
    }

    fn send(&mut self, frame: &RecorderFrame) {
        let Some(s) = self.stream.as_mut() else {
            return;
        };
        let mut buf = Vec::with_capacity(frame_len_hint(frame));
        framing::encode(frame, &mut buf);
        if let Err(e) = s.write_all(&buf) {
            self.lost(&format!("write failed: {e}"));
        }
    }

    fn send_chunk(&mut self, c: &Chunk) {
        let frame = RecorderFrame {
            body: Some(recorder_frame::Body::Chunk(shelltrail_proto::v1::Chunk {
                seq: c.seq,
                data: c.bytes.clone(),
                hash: c.hash.to_vec(),
            })),
        };
        self.send(&frame);
    }

    fn send_close(&mut self) {
        if let Some(c) = self.close.clone() {
            self.send(&RecorderFrame {
                body: Some(recorder_frame::Body::Close(c)),
            });
        }
    }

    fn acked(&mut self, through: u64, closed: bool) {
        while self.unacked.front().is_some_and(|c| c.seq <= through) {
            let c = self.unacked.pop_front().expect("front");
            self.budget.give_back(c.bytes.len() as u64);
        }
        self.close_acked |= closed;
        self.backoff = Duration::from_millis(50);
    }

    fn lost(&mut self, why: &str) {
        if self.stream.take().is_some() {
            self.epoch += 1;
            syslog::warning(&format!(
                "session {}: lost the agent ({why}); {} chunks held in memory, reconnecting",
                self.meta.session_id,
                self.unacked.len()
            ));
            self.retry_at = Instant::now();
            self.spill();
        }
    }

    /// A break-glass session whose agent is away: what the agent does not
    /// hold goes to the fallback file, and so does the rest of the session.
    fn spill(&mut self) {
        let Some(dir) = self.fallback_dir.take() else { return };
        let created = crate::shell::fallback::Fallback::create(&dir, &self.meta, self.opened);
        let mut f = match created {
            Ok(f) => f,
            // The recorder still has the user's effective uid until the
            // session's program is started (privsep): try again with the
            // next chunk; what waits is in memory meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !self.last_chance => {
                self.fallback_dir = Some(dir);
                return;
            }
            Err(e) => {
                let msg = format!(
                    "session {}: BREAK-GLASS: cannot create a fallback file in {}: {e}; recording into memory \
                     until the agent returns",
                    self.meta.session_id,
                    dir.display()
                );
                syslog::error(&msg);
                let _ = write!(std::io::stderr(), "\r\nshelltrail: {msg}\r\n");
                return;
            }
        };
        syslog::error(&format!(
            "session {}: BREAK-GLASS: the agent is not reachable; recording to {} until the session ends \
             (the agent imports it when it is back)",
            self.meta.session_id,
            f.path().display()
        ));
        while let Some(c) = self.unacked.pop_front() {
            self.budget.give_back(c.bytes.len() as u64);
            if let Err(e) = f.chunk(&c) {
                syslog::error(&format!("session {}: fallback write failed: {e}", self.meta.session_id));
                self.discarded.push(c.seq);
            }
        }
        self.spilled = Some(f);
        self.spill_close();
    }

    fn spill_chunk(&mut self, c: &Chunk) {
        self.budget.give_back(c.bytes.len() as u64);
        let Some(f) = self.spilled.as_mut() else { return };
        if let Err(e) = f.chunk(c) {
            syslog::error(&format!(
                "session {}: fallback write of chunk {} failed: {e}; the gap is recorded",
                self.meta.session_id, c.seq
            ));
            self.discarded.push(c.seq);
        }
    }

    /// Writes the Close to the fallback file, if the session spilled and
    /// has ended: then the session is delivered, as far as the recorder goes.
    fn spill_close(&mut self) {
        let (Some(f), Some(close)) = (self.spilled.as_mut(), self.close.as_mut()) else {
            return;
        };
        close.lost_seqs.append(&mut self.discarded);
        close.lost_seqs.sort_unstable();
        close.lost_seqs.dedup();
        match f.close(close) {
            Ok(()) => self.close_acked = true,
            Err(e) => syslog::error(&format!(
                "session {}: cannot write the end to {}: {e}",
                self.meta.session_id,
                f.path().display()
            )),
        }
    }

    /// The agent stopped the session's recording: tell the user, let go of
    /// what is held, and end the session the way a signal to the recorder
    /// ends it (the child is hung up, the session's end runs as usual and
    /// its Close, naming what was not stored, still goes to the agent).
    fn stop(&mut self, reason: &str) {
        self.stopped = true;
        let msg = format!(
            "session {}: the shelltrail agent stopped recording this session: {reason}. The session ends.",
            self.meta.session_id
        );
        syslog::error(&msg);
        // The user's terminal may be in raw mode: end lines with CR LF.
        let _ = write!(std::io::stderr(), "\r\nshelltrail: {msg}\r\n");
        while let Some(c) = self.unacked.pop_front() {
            self.budget.give_back(c.bytes.len() as u64);
            self.discarded.push(c.seq);
        }
        self.budget.abandon();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM);
    }

    fn reconnect(&mut self) {
        match open(&self.socket, &self.meta, self.opened) {
            Ok(conn) => {
                syslog::info(&format!(
                    "session {}: agent reachable again; resuming at chunk {}",
                    self.meta.session_id, conn.next_seq
                ));
                self.warned = false;
                self.attach(conn);
            }
            Err(e) => {
                if !self.warned {
                    syslog::warning(&format!("session {}: {e}; will keep retrying", self.meta.session_id));
                    self.warned = true;
                }
                // Exponential backoff with jitter, capped: many recorders
                // reconnecting after an agent restart do not arrive in lockstep.
                let jitter = Duration::from_millis(u64::from(std::process::id() % 50));
                self.retry_at = Instant::now() + self.backoff + jitter;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn frame_len_hint(frame: &RecorderFrame) -> usize {
    use prost::Message;
    frame.encoded_len() + framing::PREFIX
}

#[cfg(test)]
mod tests {
    //! The link against a real agent (in-process, real socket, real spool),
    //! which is stopped and restarted in the middle of a session.
    use super::*;
    use crate::agent::{server, spool};
    use crate::config::Config;
    use shelltrail_cast::chunk::{self as chunkfmt, Chunker};

    /// Dropping it stops the agent: its runtime, tasks and sockets go away.
    struct RunningAgent {
        _rt: tokio::runtime::Runtime,
    }

    fn start_agent(cfg: &Config) -> RunningAgent {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let cfg2 = cfg.clone();
        rt.block_on(async {
            let agent = server::Agent::start(cfg2.clone()).unwrap();
            let listener = server::bind(&cfg2.socket).unwrap();
            tokio::spawn(server::serve(agent, listener));
        });
        RunningAgent { _rt: rt }
    }

    fn config(dir: &Path) -> Config {
        Config {
            socket: dir.join("agent.sock"),
            spool_dir: dir.join("spool"),
            ..Default::default()
        }
    }

    #[test]
    fn agent_restart_mid_session_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let agent = start_agent(&cfg);
        let id = uuid::Uuid::now_v7().to_string();
        let meta = SessionMeta {
            session_id: id.clone(),
            ..Default::default()
        };
        let conn = open(&cfg.socket, &meta, false).unwrap();
        assert_eq!(conn.next_seq, 0);

        let budget = Budget::new(64 << 20);
        let (tx, rx) = std::sync::mpsc::channel();
        let link = {
            let (socket, meta, budget, tx) = (cfg.socket.clone(), meta.clone(), budget.clone(), tx.clone());
            let (events, _) = std::sync::mpsc::sync_channel(16);
            let wiring = Wiring {
                tx,
                rx,
                events,
                watched: Default::default(),
                fallback_dir: None,
            };
            std::thread::spawn(move || run(socket, meta, Some(conn), budget, wiring, Duration::from_secs(20)))
        };
        let mut chunker = Chunker::new(&id, 3);
        let mut expected = Vec::new();
        let mut send = |chunker: &mut Chunker, i: u32| {
            let line = format!("[0.001, \"o\", \"line {i}\\r\\n\"]\n");
            expected.extend_from_slice(line.as_bytes());
            chunker.buffer().extend_from_slice(line.as_bytes());
            let c = chunker.cut(u64::from(i), u64::from(i)).unwrap();
            assert!(budget.try_take(c.bytes.len() as u64));
            tx.send(ToLink::Chunk(c)).unwrap();
        };
        for i in 0..50 {
            send(&mut chunker, i);
        }
        std::thread::sleep(Duration::from_millis(200));
        // Stop the agent hard (its tasks and sockets go away), send more while
        // it is down, then start a new agent on the same spool.
        drop(agent);
        for i in 50..100 {
            send(&mut chunker, i);
        }
        std::thread::sleep(Duration::from_millis(300));
        let _agent = start_agent(&cfg);
        for i in 100..150 {
            send(&mut chunker, i);
        }
        tx.send(ToLink::Close(Close {
            exit_status: 0,
            last_seq: 149,
            ..Default::default()
        }))
        .unwrap();
        let delivery = link.join().unwrap();
        assert!(delivery.close_acked, "{delivery:?}");
        assert_eq!(delivery.undelivered, 0);

        let index = spool::scan(&cfg.spool_dir, false).unwrap();
        let s = &index.sessions[&id];
        assert_eq!(
            s.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
            (0..150).collect::<Vec<_>>()
        );
        assert!(s.close.is_some());
        let mut got = Vec::new();
        for c in &s.chunks {
            got.extend(
                chunkfmt::decompress(&spool::read_chunk(&cfg.spool_dir, c.loc).unwrap())
                    .unwrap()
                    .1,
            );
        }
        assert_eq!(got, expected, "every chunk exactly once, in order");
    }

    #[test]
    fn unreachable_agent_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SessionMeta {
            session_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        };
        let err = open(&dir.path().join("nope.sock"), &meta, false).err().unwrap();
        assert!(err.to_string().contains("not reachable"), "{err}");
    }

    #[test]
    fn a_session_cannot_be_resumed_by_another_process_or_twice() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let _agent = start_agent(&cfg);
        let meta = SessionMeta {
            session_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        };
        let _conn = open(&cfg.socket, &meta, false).unwrap();
        // Same id again as a new session.
        assert!(
            matches!(open(&cfg.socket, &meta, false), Err(ConnectError::Refused(r)) if r.contains("already exists"))
        );
        // Resume while the first connection is alive.
        assert!(
            matches!(open(&cfg.socket, &meta, true), Err(ConnectError::Refused(r)) if r.contains("already connected"))
        );
        // A hostile id.
        let bad = SessionMeta {
            session_id: "../../etc/passwd".into(),
            ..Default::default()
        };
        assert!(matches!(open(&cfg.socket, &bad, false), Err(ConnectError::Refused(r)) if r.contains("UUID")));
    }

    #[test]
    fn limits_refuse_new_sessions_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.agent.max_sessions_per_uid = 1;
        let _agent = start_agent(&cfg);
        let meta = || SessionMeta {
            session_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        };
        let _first = open(&cfg.socket, &meta(), false).unwrap();
        let err = open(&cfg.socket, &meta(), false).err().unwrap();
        assert!(err.to_string().contains("max_sessions_per_uid"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.agent.spool_max_bytes = 1; // already exceeded by the first segment's header
        let _agent = start_agent(&cfg);
        let err = open(&cfg.socket, &meta(), false).err().unwrap();
        assert!(err.to_string().contains("spool is full"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.agent.min_free_bytes = u64::MAX;
        let _agent = start_agent(&cfg);
        let err = open(&cfg.socket, &meta(), false).err().unwrap();
        assert!(err.to_string().contains("nearly full"), "{err}");
    }
}
