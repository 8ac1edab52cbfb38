//! One recorder connection: the Open handshake, then the session's chunks
//! in order until Close.
//!
//! Two tasks serve a connection. The session task (this module's
//! [`serve`]) takes frames off the socket, each one's bytes held in the
//! connection's memory budget ([`ConnMemory`](crate::agent::limits::ConnMemory))
//! from its length prefix until it is durable or dropped, checks each
//! chunk, charges it to the quotas and queues it for the spool writer. The
//! acker sends acknowledgements in order as the writer makes records durable.
//!
//! What a connection must do, or be closed:
//! * a complete Open within [`OPEN_TIMEOUT`], at most [`MAX_OPEN_FRAME`] bytes;
//! * every frame at most `max_frame_bytes`, whole within [`FRAME_TIMEOUT`]
//!   of the agent starting to read it;
//! * every chunk a zstd frame that decodes (within the size cap) to exactly
//!   what its header and link hash say, continuing the hash chain. A bad
//!   chunk is refused with the reason and never acked or spooled.
//!
//! A chunk that would pass a limit (the session's or its user's quota, the
//! spool's cap, its disk's floor) holds the session: nothing more of it is
//! stored, the recorder is told ([`Held`]), and the session task looks for
//! room every [`HOLD_CHECK`]. With room again it closes the connection and
//! the recorder resends what it holds. Under `on_agent_unavailable = deny`,
//! after `quota_wait_secs` without room, the agent tells the recorder to
//! end the session ([`Stopped`]); the recorder's end record (exit status,
//! bytes, chunks dropped) is stored with the chunks the agent did not store
//! named as lost, or, if it does not come within [`STOP_GRACE`], the agent
//! records the end itself. Under `allow` the hold lasts as long as the
//! session.

use crate::agent::control::{self, ToSession};
use crate::agent::limits::{ConnMemory, Reservation};
use crate::agent::live;
use crate::agent::server::{Agent, now_ms, start_ticks};
use crate::agent::signer::View;
use crate::agent::spool::{self, CloseRecord, OpenRecord};
use crate::config::Unavailable;
use shelltrail_cast::chain::Chain;
use shelltrail_cast::chunk::{self, ChunkError, ChunkHeader};
use shelltrail_proto::framing;
use shelltrail_proto::v1::{
    Accepted, Ack, AgentFrame, Close, ControlReply, Ended, Held, Notice, RecorderFrame, Refused, Resize, SessionMeta,
    Snapshot, Stopped, Tail, TailFrame, Watch, agent_frame, recorder_frame, tail_frame,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

/// A recorder must say who it is (a complete Open) within this long.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// The Open frame carries metadata only.
pub const MAX_OPEN_FRAME: usize = 64 << 10;
/// Once the agent starts reading a frame's body, all of it must arrive
/// within this long: a recorder writes each frame at once, and a peer that
/// trickles one would hold its memory indefinitely.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a held session looks for room.
const HOLD_CHECK: Duration = Duration::from_millis(500);
/// How long a recorder told to end its session (Stopped) has to send the
/// session's end record; then the agent records the end itself.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Chunks with at most this much content are checked on the async worker
/// (about 100 us at most), larger ones on the blocking pool.
const INLINE_CHECK: usize = 64 << 10;
/// Seqs of chunks received and not stored while held, listed in the end
/// record, at most (a peer could send any number).
const MAX_LISTED: usize = 65_536;

/// Who is at the other end, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
}

/// Errors that end one connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Frame(#[from] framing::FrameError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

type Frame = Result<Option<(RecorderFrame, Reservation)>, ConnError>;

/// Takes frames off the socket without holding more than the budget allows.
///
/// Cancel-safe: what it has read of a frame (and the frame's reservation)
/// stays here, so the session task can wait on it and on a timer at once
/// without a task of its own for reading (one more task wake per frame
/// doubled the agent's CPU per chunk).
struct FrameReader {
    rd: OwnedReadHalf,
    mem: ConnMemory,
    prefix: [u8; framing::PREFIX],
    got: usize,
    /// The frame being read: its bytes, how many arrived, its reservation
    /// and when all of it must be there.
    body: Vec<u8>,
    filled: usize,
    held: Option<Reservation>,
    deadline: Option<tokio::time::Instant>,
}

impl FrameReader {
    fn new(rd: OwnedReadHalf, mem: ConnMemory) -> FrameReader {
        FrameReader {
            rd,
            mem,
            prefix: [0; framing::PREFIX],
            got: 0,
            body: Vec::new(),
            filled: 0,
            held: None,
            deadline: None,
        }
    }

    /// The next frame with its memory reservation, or None at a clean end.
    ///
    /// The length prefix is read first and checked against `max`; the body
    /// is read only once its bytes fit the budget (until then the socket is
    /// not read at all), and must arrive within [`FRAME_TIMEOUT`].
    async fn next(&mut self, max: usize) -> Frame {
        let torn = || ConnError::Protocol("connection closed in the middle of a frame".into());
        while self.got < self.prefix.len() {
            match self.rd.read(&mut self.prefix[self.got..]).await? {
                0 if self.got == 0 => return Ok(None),
                0 => return Err(torn()),
                n => self.got += n,
            }
        }
        let len = u32::from_be_bytes(self.prefix) as usize;
        if len > max {
            return Err(framing::FrameError::TooLarge { len, max }.into());
        }
        if len == 0 {
            return Err(framing::FrameError::Empty.into());
        }
        if self.held.is_none() {
            self.held = Some(self.mem.reserve(len).await);
            self.body = vec![0u8; len];
            self.filled = 0;
            self.deadline = Some(tokio::time::Instant::now() + FRAME_TIMEOUT);
        }
        let deadline = self.deadline.expect("set with the reservation");
        while self.filled < len {
            match tokio::time::timeout_at(deadline, self.rd.read(&mut self.body[self.filled..])).await {
                Ok(Ok(0)) => return Err(torn()),
                Ok(Ok(n)) => self.filled += n,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(ConnError::Protocol(format!(
                        "a frame of {len} bytes did not arrive whole within {} s",
                        FRAME_TIMEOUT.as_secs()
                    )));
                }
            }
        }
        self.got = 0;
        self.deadline = None;
        let held = self.held.take().expect("reserved above");
        let frame = framing::decode(&std::mem::take(&mut self.body))?;
        Ok(Some((frame, held)))
    }
}

async fn send(w: &mut OwnedWriteHalf, body: agent_frame::Body) -> std::io::Result<()> {
    let mut buf = Vec::new();
    framing::encode(&AgentFrame { body: Some(body) }, &mut buf);
    w.write_all(&buf).await
}

/// Serves one accepted connection until it ends; logs why it ended badly.
pub async fn serve(agent: Arc<Agent>, stream: UnixStream, peer: Peer) {
    if let Err(e) = connection(&agent, stream, peer).await {
        tracing::warn!(uid = peer.uid, pid = peer.pid, "recorder connection closed: {e:#}");
    }
}

/// The session's user as the agent establishes it.
struct Identity {
    uid: u32,
    user: String,
}

/// Who the session records: the set-uid recorder names the user (it ran as
/// them until it started their program); anyone else is who the kernel
/// says, whatever the Open claims.
fn identity(agent: &Agent, peer: Peer, meta: &SessionMeta) -> Identity {
    let uid = if agent.limits.is_recorder(peer.uid) {
        meta.uid
    } else {
        peer.uid
    };
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    Identity { uid, user }
}

/// Marks the session not connected when the connection ends.
struct Connected<'a> {
    agent: &'a Agent,
    session: String,
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.agent.spool.lock().sessions.get_mut(&self.session) {
            s.connected = false;
            s.control = None;
        }
    }
}

async fn refuse(w: &mut OwnedWriteHalf, sid: &str, peer: Peer, reason: String) -> Result<(), ConnError> {
    tracing::warn!(session = %sid, uid = peer.uid, pid = peer.pid, "refused: {reason}");
    send(
        w,
        agent_frame::Body::Refused(Refused {
            reason,
            ..Default::default()
        }),
    )
    .await?;
    Ok(())
}

async fn connection(agent: &Arc<Agent>, stream: UnixStream, peer: Peer) -> Result<(), ConnError> {
    let (rd, mut wr) = stream.into_split();
    let mut reader = FrameReader::new(rd, agent.limits.conn_memory(peer.uid));
    let first = tokio::time::timeout(OPEN_TIMEOUT, reader.next(MAX_OPEN_FRAME))
        .await
        .map_err(|_| ConnError::Protocol(format!("no complete Open within {} s", OPEN_TIMEOUT.as_secs())))??;
    let open = match first {
        Some((
            RecorderFrame {
                body: Some(recorder_frame::Body::Open(open)),
            },
            _,
        )) => open,
        Some((
            RecorderFrame {
                body:
                    Some(recorder_frame::Body::Control(shelltrail_proto::v1::Control {
                        request: Some(shelltrail_proto::v1::control::Request::Tail(t)),
                    })),
            },
            _,
        )) => return tail(agent, peer, t, reader, wr).await,
        Some((
            RecorderFrame {
                body: Some(recorder_frame::Body::Control(req)),
            },
            _,
        )) => {
            // Name lookups (NSS), /proc and the locks file: off the async workers.
            let me = agent.clone();
            let reply = tokio::task::spawn_blocking(move || control::handle(&me, peer, req))
                .await
                .unwrap_or_else(|e| control::refused(format!("the agent failed to answer: {e}")));
            send(&mut wr, agent_frame::Body::ControlReply(reply)).await?;
            return Ok(());
        }
        _ => return Err(ConnError::Protocol("the first frame must be Open".into())),
    };
    let mut meta = open.meta.unwrap_or_default();
    let who = identity(agent, peer, &meta);
    // A claim from anyone but the recorder is overwritten, never believed.
    meta.uid = who.uid;
    let id = match uuid::Uuid::parse_str(&meta.session_id) {
        // Only the canonical form: the id names files and URLs later on.
        Ok(u) if u.to_string() == meta.session_id => u,
        _ => {
            let why = "session id must be a canonical UUID".to_string();
            send(
                &mut wr,
                agent_frame::Body::Refused(Refused {
                    reason: why.clone(),
                    ..Default::default()
                }),
            )
            .await?;
            return Err(ConnError::Protocol(why));
        }
    };
    let sid = meta.session_id.clone();

    // Admit (new) or resume (after a reconnect) the session.
    let admitted = if open.resume {
        resume(agent, &sid, peer, &who)
    } else {
        admit(agent, &sid, peer, &who, &meta).await
    };
    let (next_seq, _session_slot) = match admitted {
        Ok(a) => a,
        Err(why) if !open.resume && agent.locks.refusal(who.uid).is_some() => {
            tracing::warn!(session = %sid, uid = peer.uid, pid = peer.pid, "refused: {why}");
            let locked = Refused {
                reason: why,
                locked: true,
            };
            send(&mut wr, agent_frame::Body::Refused(locked)).await?;
            return Ok(());
        }
        Err(why) => return refuse(&mut wr, &sid, peer, why).await,
    };
    let connected = Connected {
        agent,
        session: sid.clone(),
    };
    if open.resume {
        tracing::info!(session = %sid, uid = who.uid, pid = peer.pid, next_seq, "session resumed");
    }
    send(&mut wr, agent_frame::Body::Accepted(Accepted { next_seq })).await?;

    let failed = Arc::new(AtomicBool::new(false));
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Pending>();
    let acker = tokio::spawn(acker(agent.clone(), sid.clone(), who.uid, wr, ack_rx, failed.clone()));
    let max_frame = agent.cfg.agent.max_frame_bytes as usize;
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<ToSession>();
    let chain = {
        let mut cat = agent.spool.lock();
        let s = cat.sessions.get_mut(&sid).expect("admitted or resumed: catalogued");
        s.control = Some(ctl_tx);
        s.chain
    };
    let mut session = SessionTask {
        agent,
        sid: &sid,
        id,
        uid: who.uid,
        ack: &ack_tx,
        held: None,
        closed: false,
        chain,
        ended_by: None,
    };
    // A recorder back after a lost connection is watched as before.
    if agent.views.get(&sid).is_some_and(|v| v.watched()) {
        let _ = session.pend(Pending::Watch(live::WATCHED_INTERVAL_MS));
    }
    let deny = agent.cfg.shell.on_agent_unavailable == Unavailable::Deny;
    let wait = Duration::from_secs(agent.cfg.agent.quota_wait_secs);
    let mut tick = tokio::time::interval(HOLD_CHECK);
    let result = loop {
        if failed.load(Ordering::Relaxed) {
            break Err(ConnError::Protocol(
                "stopped: a spool write failed, or the recorder stopped reading".into(),
            ));
        }
        let frame = tokio::select! {
            f = reader.next(max_frame) => f,
            _ = tick.tick(), if session.held.is_some() => {
                match session.held_check(deny, wait) {
                    Some(outcome) => break outcome,
                    None => continue,
                }
            }
            Some(told) = ctl_rx.recv() => {
                let sent = match told {
                    ToSession::End(ended) => session.end(ended),
                    ToSession::Watch(ms) => session.pend(Pending::Watch(ms)),
                    ToSession::Notify(text) => session.pend(Pending::Notice(text)),
                };
                if let Err(why) = sent {
                    break Err(ConnError::Protocol(why));
                }
                continue;
            }
        };
        let (frame, mem) = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        match frame.body {
            Some(recorder_frame::Body::Chunk(c)) => {
                let was_held = session.held.is_some();
                if let Err(why) = session.chunk(c, mem).await {
                    break Err(ConnError::Protocol(why));
                }
                if !was_held && session.held.is_some() {
                    tick.reset();
                }
            }
            Some(recorder_frame::Body::Close(close)) => {
                if let Err(why) = session.close(close) {
                    break Err(ConnError::Protocol(why));
                }
            }
            Some(recorder_frame::Body::Open(_) | recorder_frame::Body::Control(_)) => {
                break Err(ConnError::Protocol(
                    "a second Open (or a Control) on a session's connection".into(),
                ));
            }
            None => break Err(ConnError::Protocol("empty frame body".into())),
        }
    };
    drop(session);
    drop(ack_tx);
    // The acks of what was already queued go out; then the session is free
    // to be resumed, and only then does the socket close (a recorder
    // reconnects as soon as it sees the end).
    let wr = acker.await.ok();
    drop(connected);
    drop(reader);
    drop(wr);
    result.map_err(|e| match e {
        ConnError::Protocol(m) => ConnError::Protocol(format!("{m} (uid {})", who.uid)),
        other => other,
    })
}

/// A new session: checked against the limits, its start record made durable.
async fn admit(
    agent: &Arc<Agent>,
    sid: &str,
    peer: Peer,
    who: &Identity,
    meta: &SessionMeta,
) -> Result<(u64, crate::agent::limits::SessionSlot), String> {
    if agent.spool.lock().sessions.contains_key(sid) {
        return Err(format!("session {sid} already exists"));
    }
    if let Some(why) = agent.limits.admission(who.uid) {
        return Err(why);
    }
    if let Some(why) = agent.locks.refusal(who.uid) {
        return Err(why);
    }
    let slot = agent.limits.session(who.uid)?;
    let mut stored = meta.clone();
    if stored.break_glass {
        if agent.limits.is_recorder(peer.uid) {
            tracing::warn!(session = %sid, uid = who.uid, user = %who.user, "BREAK-GLASS session opened");
        } else {
            // Only the set-uid recorder checks the group: anyone else's claim is dropped.
            tracing::warn!(session = %sid, uid = peer.uid, "a break-glass claim not from the recorder; ignored");
            stored.break_glass = false;
        }
    }
    let rec = OpenRecord {
        meta: stored,
        peer_uid: who.uid,
        peer_pid: peer.pid,
        peer_user: who.user.clone(),
        via_recorder_uid: agent.limits.is_recorder(peer.uid).then_some(peer.uid),
        peer_start_ticks: start_ticks(peer.pid).unwrap_or(0),
        opened_unix_ms: now_ms(),
        resume: None,
    };
    agent
        .spool
        .open(rec)
        .await
        .map_err(|e| format!("cannot write to the spool: {e}"))?;
    tracing::info!(session = %sid, uid = who.uid, pid = peer.pid, user = %who.user, mode = %meta.mode, "session opened");
    Ok((0, slot))
}

/// A session continued after a reconnect: only by the process that opened it.
fn resume(
    agent: &Arc<Agent>,
    sid: &str,
    peer: Peer,
    who: &Identity,
) -> Result<(u64, crate::agent::limits::SessionSlot), String> {
    let mut cat = agent.spool.lock();
    let s = match cat.sessions.get_mut(sid) {
        None => return Err(format!("cannot resume unknown session {sid}")),
        Some(s) => s,
    };
    if s.connection_uid() != peer.uid || s.open.peer_pid != peer.pid || s.uid() != who.uid {
        return Err(format!(
            "session {sid} belongs to another recorder (uid {}, pid {})",
            s.uid(),
            s.open.peer_pid
        ));
    }
    if let Some(why) = &s.damaged {
        return Err(format!(
            "session {sid} is damaged in the spool ({why}); its recording cannot go on"
        ));
    }
    if s.closed() {
        return Err(format!("session {sid} is already closed"));
    }
    if s.connected {
        return Err(format!("session {sid} is already connected"));
    }
    let slot = agent.limits.session(who.uid)?;
    s.connected = true;
    Ok((s.chain.next_seq(), slot))
}

/// What the acker waits for and sends, in order.
enum Pending {
    Chunk {
        seq: u64,
        /// The chain once this chunk is durable.
        chain: Chain,
        /// Bytes charged to the quotas, given back if the write fails.
        charged: u64,
        wait: spool::Queued,
        _mem: Reservation,
    },
    Close {
        rec: Box<CloseRecord>,
        wait: spool::Queued,
    },
    /// A chunk the spool already had (resent after a reconnect).
    Duplicate {
        seq: u64,
    },
    Held {
        from_seq: u64,
        reason: String,
    },
    Refuse {
        reason: String,
    },
    /// The recorder is to end the session.
    Stop {
        reason: String,
    },
    /// An administrator ended the session.
    Ended(Ended),
    /// Someone watches the session (or no longer): the chunk interval to use.
    Watch(u32),
    /// A line for the user's terminal.
    Notice(String),
}

/// A session held at a limit.
struct Hold {
    from_seq: u64,
    /// Bytes of the chunk that did not fit: room means room for it.
    need: u64,
    since: Instant,
    reason: String,
    /// Chunks received and not stored (at most [`MAX_LISTED`]).
    seen: Vec<u64>,
    /// Set once the recorder is told to end the session: until when it
    /// may send its end record, and why.
    stopping: Option<(Instant, String)>,
}

/// The session task's state.
struct SessionTask<'a> {
    agent: &'a Arc<Agent>,
    sid: &'a str,
    id: uuid::Uuid,
    uid: u32,
    ack: &'a mpsc::UnboundedSender<Pending>,
    held: Option<Hold>,
    /// The next seq this connection stores and the link hash of the chunk before it.
    /// The chain as this connection queued it (ahead of what is durable).
    chain: Chain,
    /// The recorder's Close has arrived: nothing may follow it.
    closed: bool,
    /// An administrator ended the session: who, and why.
    ended_by: Option<Ended>,
}

impl SessionTask<'_> {
    /// Passes an administrator's end on to the recorder, and remembers it
    /// for the end record.
    fn end(&mut self, e: Ended) -> Result<(), String> {
        if self.closed {
            return Ok(());
        }
        tracing::warn!(session = %self.sid, uid = self.uid, by = %e.by, "session ended by an administrator: {}", e.reason);
        self.ended_by = Some(e.clone());
        self.pend(Pending::Ended(e))
    }

    fn pend(&self, p: Pending) -> Result<(), String> {
        self.ack
            .send(p)
            .map_err(|_| "the acknowledgement task stopped".to_string())
    }

    /// Refuses the chunk (and with it the connection), the reason logged and sent.
    fn refuse(&self, why: String) -> Result<(), String> {
        let _ = self.pend(Pending::Refuse { reason: why.clone() });
        Err(why)
    }

    async fn chunk(&mut self, c: shelltrail_proto::v1::Chunk, mem: Reservation) -> Result<(), String> {
        if self.closed {
            return Err(format!("session {}: chunk {} after Close", self.sid, c.seq));
        }
        if c.seq < self.chain.next_seq() {
            return self.pend(Pending::Duplicate { seq: c.seq });
        }
        let (data, checked) = check(self.agent, c.data, c.seq).await;
        let Checked { header, hash, feed } = match checked {
            Ok(h) => h,
            Err(e) => return self.refuse(format!("session {}: malformed chunk {}: {e}", self.sid, c.seq)),
        };
        if !c.hash.is_empty() && c.hash[..] != hash[..] {
            return self.refuse(format!(
                "session {}: chunk {}: the recorder says its link hash is {}, its content hashes to {}",
                self.sid,
                c.seq,
                hex::encode(&c.hash),
                hex::encode(hash)
            ));
        }
        // A gap is allowed: the recorder drops chunks (and names them in
        // Close) when its memory fills while the agent is away.
        if let Err(e) = self.chain.check(&header) {
            return self.refuse(format!("session {}: {e}", self.sid));
        }
        if let Some(h) = &mut self.held {
            if h.seen.len() < MAX_LISTED {
                h.seen.push(c.seq);
            }
            return Ok(());
        }
        let n = data.len() as u64;
        if let Err(reason) = self.agent.limits.charge(self.uid, self.sid, n) {
            tracing::warn!(
                session = %self.sid,
                uid = self.uid,
                "session held from chunk {}: {reason}; nothing more of it is stored until there is room",
                c.seq
            );
            self.held = Some(Hold {
                from_seq: c.seq,
                need: n,
                since: Instant::now(),
                reason: reason.clone(),
                seen: vec![c.seq],
                stopping: None,
            });
            return self.pend(Pending::Held {
                from_seq: c.seq,
                reason,
            });
        }
        let body = spool::chunk_body(&self.id, c.seq, &hash, &data);
        drop(data);
        let Ok(wait) = self.agent.spool.queue(body) else {
            self.agent.limits.refund(self.uid, self.sid, n);
            return Err("spool writer stopped".into());
        };
        self.chain
            .accept(&header, hash)
            .expect("checked above: the chunk continues the chain");
        if let Some(s) = self.agent.spool.lock().sessions.get_mut(self.sid) {
            s.activity.last_unix_ms = now_ms();
            s.activity.bytes += u64::from(header.raw_len);
        }
        // Tailers see it now (checked, on its way to the disk).
        self.agent.views.of(self.sid).take(c.seq, feed);
        self.pend(Pending::Chunk {
            seq: c.seq,
            chain: self.chain,
            charged: n,
            wait,
            _mem: mem,
        })
    }

    fn close(&mut self, mut close: Close) -> Result<(), String> {
        if std::mem::replace(&mut self.closed, true) {
            return Err(format!("session {}: a second Close", self.sid));
        }
        let mut cause = "recorder".to_string();
        if let Some(h) = &self.held {
            // Chunks received and not stored are lost like those the
            // recorder dropped: named in the end record.
            close.lost_seqs.extend(&h.seen);
            close.lost_seqs.sort_unstable();
            close.lost_seqs.dedup();
            cause = match &h.stopping {
                Some((_, reason)) => format!("stopped by the agent: {reason}"),
                None => format!("recorder; chunks from {} not stored: {}", h.from_seq, h.reason),
            };
        }
        if let Some(e) = &self.ended_by {
            cause = format!("ended by {}: {}", e.by, e.reason);
        }
        let mut rec = CloseRecord {
            session_id: self.sid.to_string(),
            close,
            cause,
            closed_unix_ms: now_ms(),
            seal: None,
        };
        // The chain as this connection queued it, in order before the Close.
        self.agent.seal(&mut rec, self.view());
        let wait = self.agent.spool.queue(spool::close_body(&rec))?;
        self.pend(Pending::Close {
            rec: Box::new(rec),
            wait,
        })
    }

    /// For a held session: with room again, ends the connection (Ok: the
    /// recorder reconnects and resends); under deny, past the wait, tells
    /// the recorder to end the session, and if it has not sent its end
    /// record within [`STOP_GRACE`], records the end itself. None: go on.
    fn held_check(&mut self, deny: bool, wait: Duration) -> Option<Result<(), ConnError>> {
        if self.closed {
            return None;
        }
        let h = self.held.as_mut()?;
        if let Some((deadline, reason)) = &h.stopping {
            if Instant::now() < *deadline {
                return None;
            }
            let reason = format!("{reason}; the recorder did not end the session");
            return Some(self.end_by_agent(reason));
        }
        if self.agent.limits.room(self.uid, self.sid, h.need) {
            tracing::info!(
                session = %self.sid,
                from_seq = h.from_seq,
                "room again for a held session; the recorder reconnects and resends"
            );
            return Some(Ok(()));
        }
        if !deny || h.since.elapsed() < wait {
            return None;
        }
        let reason = format!("{}; no room for {} s (quota_wait_secs)", h.reason, wait.as_secs());
        tracing::warn!(session = %self.sid, uid = self.uid, "recording stopped: {reason}");
        h.stopping = Some((Instant::now() + STOP_GRACE, reason.clone()));
        match self.pend(Pending::Stop { reason }) {
            Ok(()) => None,
            Err(why) => Some(Err(ConnError::Protocol(why))),
        }
    }

    /// The chain as this connection stored it, for a seal.
    fn view(&self) -> View {
        View {
            next_seq: self.chain.next_seq(),
            last_hash: self.chain.last_hash(),
        }
    }

    /// Records the end of a stopped session whose recorder did not.
    fn end_by_agent(&mut self, reason: String) -> Result<(), ConnError> {
        let seen = self.held.as_ref().map(|h| h.seen.clone()).unwrap_or_default();
        let mut rec = CloseRecord {
            session_id: self.sid.to_string(),
            close: Close {
                exit_status: -1,
                last_seq: seen
                    .iter()
                    .copied()
                    .max()
                    .unwrap_or(self.chain.next_seq().saturating_sub(1)),
                lost_seqs: seen,
                end_unix_ms: now_ms(),
                ..Default::default()
            },
            cause: format!("stopped by the agent: {reason}"),
            closed_unix_ms: now_ms(),
            seal: None,
        };
        self.agent.seal(&mut rec, self.view());
        let wait = self
            .agent
            .spool
            .queue(spool::close_body(&rec))
            .map_err(ConnError::Protocol)?;
        self.pend(Pending::Close {
            rec: Box::new(rec),
            wait,
        })
        .map_err(ConnError::Protocol)
    }
}

/// Follows a live session for an administrator: its screen, then its
/// output, until it ends or the tailer goes (see `agent::live`).
async fn tail(
    agent: &Arc<Agent>,
    peer: Peer,
    req: Tail,
    mut reader: FrameReader,
    mut wr: OwnedWriteHalf,
) -> Result<(), ConnError> {
    let found = control::administrator(agent, peer)
        .and_then(|who| control::find_live(agent, &req.session).map(|row| (who, row)));
    let (who, row) = match found {
        Ok(x) => x,
        Err(why) => {
            tracing::warn!(target: "shelltrail::audit", uid = peer.uid, pid = peer.pid, "refused: tail {:?}: {why}", req.session);
            send(&mut wr, agent_frame::Body::ControlReply(control::refused(why))).await?;
            return Ok(());
        }
    };
    let sid = row.session_id.clone();
    tracing::warn!(target: "shelltrail::audit", by = %who, pid = peer.pid, "tailing session {sid} of {}", row.user);
    send(
        &mut wr,
        agent_frame::Body::ControlReply(ControlReply {
            ok: true,
            message: format!(
                "tailing session {sid} of {} ({}, {})",
                row.user, row.client, row.command
            ),
            live: vec![row],
        }),
    )
    .await?;
    let view = agent.views.of(&sid);
    let mut joined = view.join();
    control::watch(agent, &sid, live::WATCHED_INTERVAL_MS);
    if agent.cfg.agent.notify_on_tail {
        control::tell(
            agent,
            &sid,
            ToSession::Notify(format!("{who} is watching this session")),
        );
    }
    let frame = |body| agent_frame::Body::Tail(TailFrame { body: Some(body) });
    let snapshot = |j: &live::Joined| {
        tail_frame::Body::Snapshot(Snapshot {
            cols: j.cols.into(),
            rows: j.rows.into(),
            screen: j.screen.clone(),
            approximate: j.approximate,
            next_seq: j.next_seq,
        })
    };
    let mut result = send(&mut wr, frame(snapshot(&joined))).await;
    if let (Ok(()), Some(code)) = (&result, joined.exit) {
        result = send(&mut wr, frame(tail_frame::Body::Exit(code))).await;
    }
    let mut ended_meanwhile = None;
    while result.is_ok() && joined.exit.is_none() {
        let next = tokio::select! {
            got = joined.feed.recv() => got,
            // The tailer sends nothing: a read that ends means it went away.
            _ = reader.next(64) => break,
        };
        let body = match next {
            Ok(live::Feed::Output(bytes)) => tail_frame::Body::Output(bytes.to_vec()),
            Ok(live::Feed::Resize(cols, rows)) => tail_frame::Body::Resize(Resize {
                cols: cols.into(),
                rows: rows.into(),
            }),
            Ok(live::Feed::Exit(code)) => {
                joined.exit = Some(code);
                tail_frame::Body::Exit(code)
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                // Never waited for: skipped ahead to the screen as it is now.
                let again = view.rejoin();
                joined.feed = again.feed;
                // Ended meanwhile: the snapshot is its last screen, then its
                // end, which the new subscription will never see come.
                ended_meanwhile = again.exit;
                let note = format!("shelltrail tail: fell behind, {n} updates skipped; the screen is redrawn");
                result = send(&mut wr, frame(tail_frame::Body::Notice(note))).await;
                if result.is_err() {
                    break;
                }
                tail_frame::Body::Snapshot(Snapshot {
                    cols: again.cols.into(),
                    rows: again.rows.into(),
                    screen: again.screen,
                    approximate: again.approximate,
                    next_seq: again.next_seq,
                })
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        result = send(&mut wr, frame(body)).await;
        if let (Ok(()), Some(code)) = (&result, ended_meanwhile.take()) {
            joined.exit = Some(code);
            result = send(&mut wr, frame(tail_frame::Body::Exit(code))).await;
        }
    }
    if view.leave() {
        control::watch(agent, &sid, 0);
    }
    tracing::info!(target: "shelltrail::audit", by = %who, "stopped tailing session {sid}");
    result.map_err(ConnError::from)
}

/// Checks one chunk. A small one (an interactive session's, most of them)
/// takes microseconds and is checked here; a larger one off the async
/// workers, a few at once (each may decompress up to the size cap). Gives
/// the bytes back with the verdict.
async fn check(agent: &Agent, data: Vec<u8>, seq: u64) -> (Vec<u8>, Result<Checked, ChunkError>) {
    let small = chunk::parse(&data).is_ok_and(|(h, _)| h.raw_len as usize <= INLINE_CHECK);
    let run = move |data: &[u8]| {
        chunk::check_content(data, seq).map(|(header, hash, raw)| Checked {
            header,
            hash,
            feed: live::parse(&raw),
        })
    };
    if small {
        let r = run(&data);
        return (data, r);
    }
    let _turn = agent.limits.checks.acquire().await.expect("never closed");
    tokio::task::spawn_blocking(move || {
        let r = run(&data);
        (data, r)
    })
    .await
    .expect("checking a chunk cannot panic")
}

/// A chunk that checked out: its header, its link hash, and what a tailer
/// of the session needs of its content.
struct Checked {
    header: ChunkHeader,
    hash: [u8; 32],
    feed: Vec<live::Feed>,
}

/// Sends acknowledgements in order as records become durable, and settles
/// every queued write (quotas, memory) even after the connection failed.
/// Returns the write half, so that the caller decides when the socket closes.
async fn acker(
    agent: Arc<Agent>,
    sid: String,
    uid: u32,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    failed: Arc<AtomicBool>,
) -> OwnedWriteHalf {
    // After a failed write or a refusal nothing more is sent or recorded as
    // acknowledged; what was queued still completes and is accounted for.
    let mut done = false;
    while let Some(p) = rx.recv().await {
        let frame = match p {
            Pending::Duplicate { seq } => Some(agent_frame::Body::Ack(Ack {
                through_seq: seq,
                closed: false,
            })),
            Pending::Chunk {
                seq,
                chain,
                charged,
                wait,
                _mem,
            } => match wait.done.await.unwrap_or(Err("spool writer stopped".into())) {
                Ok(loc) if !done => {
                    agent.spool.chunk_durable(&sid, seq, chain, loc, wait.ticket);
                    Some(agent_frame::Body::Ack(Ack {
                        through_seq: seq,
                        closed: false,
                    }))
                }
                Ok(_) => None,
                Err(e) => {
                    agent.limits.refund(uid, &sid, charged);
                    (!done).then(|| {
                        // Nothing after this chunk is acknowledged on this
                        // connection; closing it makes the recorder reconnect
                        // and resend from the last durable chunk.
                        tracing::error!(session = %sid, "spool write failed: {e}; closing the connection");
                        agent_frame::Body::Refused(Refused {
                            reason: format!("the agent cannot write its spool: {e}"),
                            ..Default::default()
                        })
                    })
                }
            },
            Pending::Close { rec, wait } => match wait.done.await.unwrap_or(Err("spool writer stopped".into())) {
                Ok(loc) => {
                    let through = agent.spool.close_durable(&rec, loc, wait.ticket);
                    agent.views.remove(&sid);
                    tracing::info!(session = %sid, "session closed");
                    Some(agent_frame::Body::Ack(Ack {
                        through_seq: through.saturating_sub(1),
                        closed: true,
                    }))
                }
                Err(e) => {
                    tracing::error!(session = %sid, "spool write failed: {e}");
                    (!done).then(|| {
                        agent_frame::Body::Refused(Refused {
                            reason: format!("the agent cannot write its spool: {e}"),
                            ..Default::default()
                        })
                    })
                }
            },
            Pending::Held { from_seq, reason } => Some(agent_frame::Body::Held(Held { from_seq, reason })),
            Pending::Refuse { reason } => Some(agent_frame::Body::Refused(Refused {
                reason,
                ..Default::default()
            })),
            Pending::Stop { reason } => Some(agent_frame::Body::Stopped(Stopped { reason })),
            Pending::Ended(e) => Some(agent_frame::Body::Ended(e)),
            Pending::Watch(ms) => Some(agent_frame::Body::Watch(Watch { chunk_interval_ms: ms })),
            Pending::Notice(text) => Some(agent_frame::Body::Notice(Notice { text })),
        };
        let Some(frame) = frame.filter(|_| !done) else {
            continue;
        };
        let last = matches!(frame, agent_frame::Body::Refused(_));
        if send(&mut wr, frame).await.is_err() || last {
            done = true;
            failed.store(true, Ordering::Relaxed);
        }
    }
    wr
}

#[cfg(test)]
mod tests {
    //! The agent in-process (real socket, real spool), spoken to as a
    //! recorder would, frame by frame.
    use super::*;
    use crate::agent::server;
    use crate::config::Config;
    use crate::shell::link;
    use shelltrail_cast::chunk::Chunker;
    use std::io::{Read, Write};
    use std::path::Path;

    struct Running {
        _rt: tokio::runtime::Runtime,
        cfg: Config,
    }

    fn start(dir: &Path, tune: impl FnOnce(&mut Config)) -> Running {
        let mut cfg = Config {
            socket: dir.join("agent.sock"),
            spool_dir: dir.join("spool"),
            ..Default::default()
        };
        cfg.agent.min_free_bytes = 0;
        tune(&mut cfg);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let c = cfg.clone();
        rt.block_on(async {
            let agent = server::Agent::start(c.clone()).unwrap();
            let listener = server::bind(&c.socket).unwrap();
            tokio::spawn(server::serve(agent, listener));
        });
        Running { _rt: rt, cfg }
    }

    fn me() -> u32 {
        nix::unistd::getuid().as_raw()
    }

    fn meta(uid: u32) -> SessionMeta {
        SessionMeta {
            session_id: uuid::Uuid::now_v7().to_string(),
            uid,
            ..Default::default()
        }
    }

    /// A raw recorder connection with an accepted session.
    struct Raw {
        s: std::os::unix::net::UnixStream,
        buf: Vec<u8>,
        chunker: Chunker,
    }

    impl Raw {
        /// A new session of this process's user.
        fn open(a: &Running) -> Raw {
            let m = meta(me());
            let mut s = std::os::unix::net::UnixStream::connect(&a.cfg.socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut out = Vec::new();
            framing::encode(
                &RecorderFrame {
                    body: Some(recorder_frame::Body::Open(shelltrail_proto::v1::Open {
                        meta: Some(m.clone()),
                        resume: false,
                    })),
                },
                &mut out,
            );
            s.write_all(&out).unwrap();
            let mut raw = Raw {
                s,
                buf: Vec::new(),
                chunker: Chunker::new(&m.session_id, 1),
            };
            assert!(matches!(raw.next(), Some(agent_frame::Body::Accepted(_))));
            raw
        }

        fn next(&mut self) -> Option<agent_frame::Body> {
            loop {
                if let Some(f) = framing::take::<AgentFrame>(&mut self.buf, 1 << 20).unwrap() {
                    return f.body;
                }
                let mut b = [0u8; 4096];
                match self.s.read(&mut b) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&b[..n]),
                }
            }
        }

        /// Sends a chunk of `n` bytes of incompressible text.
        fn chunk(&mut self, n: usize, salt: u64) {
            let mut x = salt | 1;
            let line: String = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (b'a' + (x % 26) as u8) as char
                })
                .collect();
            self.chunker.buffer().extend_from_slice(line.as_bytes());
            let c = self.chunker.cut(0, 1).unwrap();
            let mut out = Vec::new();
            framing::encode(
                &RecorderFrame {
                    body: Some(recorder_frame::Body::Chunk(shelltrail_proto::v1::Chunk {
                        seq: c.seq,
                        data: c.bytes,
                        hash: c.hash.to_vec(),
                    })),
                },
                &mut out,
            );
            self.s.write_all(&out).unwrap();
        }
    }

    #[test]
    fn a_session_at_its_limit_is_held_and_the_others_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let a = start(dir.path(), |c| c.agent.spool_max_bytes_per_session = 100 << 10);
        let mut hog = Raw::open(&a);
        let mut seq = 0;
        let held = loop {
            hog.chunk(30 << 10, seq + 1);
            match hog.next() {
                Some(agent_frame::Body::Ack(ack)) => assert_eq!(ack.through_seq, seq),
                Some(agent_frame::Body::Held(h)) => break h,
                other => panic!("{other:?}"),
            }
            seq += 1;
        };
        assert_eq!(held.from_seq, seq);
        assert!(held.reason.contains("spool_max_bytes_per_session"), "{held:?}");
        // The same user's other session is not held back.
        let mut other = Raw::open(&a);
        other.chunk(30 << 10, 99);
        assert!(matches!(other.next(), Some(agent_frame::Body::Ack(_))));
        // The hog's end names what was not stored.
        let mut out = Vec::new();
        framing::encode(
            &RecorderFrame {
                body: Some(recorder_frame::Body::Close(Close {
                    last_seq: seq,
                    ..Default::default()
                })),
            },
            &mut out,
        );
        hog.s.write_all(&out).unwrap();
        match hog.next() {
            Some(agent_frame::Body::Ack(ack)) => assert!(ack.closed),
            other => panic!("{other:?}"),
        }
        let index = spool::scan(&a.cfg.spool_dir, false).unwrap();
        let s = index
            .sessions
            .values()
            .find(|s| s.chunks.len() as u64 == seq)
            .expect("the hog's session");
        let close = s.close.as_ref().unwrap();
        assert_eq!(close.close.lost_seqs, vec![seq]);
        assert!(close.cause.contains("not stored"), "{close:?}");
        assert!(s.stored_bytes() <= 100 << 10);
    }

    #[test]
    fn only_the_recorders_user_names_another_users_session() {
        let dir = tempfile::tempdir().unwrap();
        // No recorder user: the connection's uid is the session's, whatever it claims.
        let a = start(dir.path(), |c| c.recorder_user = "shelltrail-no-such-user".into());
        let m = meta(me() + 4242);
        let _c = link::open(&a.cfg.socket, &m, false).unwrap();
        let index = spool::scan(&a.cfg.spool_dir, false).unwrap();
        let open = &index.sessions[&m.session_id].open;
        assert_eq!(
            (open.peer_uid, open.meta.uid, open.via_recorder_uid),
            (me(), me(), None)
        );

        // This process's user as the recorder's: believed about the session's uid.
        let dir = tempfile::tempdir().unwrap();
        let name = nix::unistd::User::from_uid(nix::unistd::getuid())
            .unwrap()
            .unwrap()
            .name;
        let a = start(dir.path(), |c| c.recorder_user = name);
        let m = meta(me() + 4242);
        let _c = link::open(&a.cfg.socket, &m, false).unwrap();
        let index = spool::scan(&a.cfg.spool_dir, false).unwrap();
        let open = &index.sessions[&m.session_id].open;
        assert_eq!(open.peer_uid, me() + 4242);
        assert_eq!(open.via_recorder_uid, Some(me()));
    }
}
