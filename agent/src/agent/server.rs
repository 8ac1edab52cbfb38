//! The agent's socket server: one task per recorder connection, one writer
//! thread for the spool.
//!
//! A connection is one session. The agent learns the recorder's uid and pid
//! from SO_PEERCRED and stamps the session with them, so a recorder cannot
//! claim another user; a resumed session must come from the same uid and pid.
//! A malformed or oversized frame closes that connection only, with a log
//! line naming the session and uid.

use crate::agent::ship::Shipper;
use crate::agent::signer::{Signer, View, Who};
use crate::agent::spool::{self, Append, CloseRecord, Loc, OpenRecord, Stats};
use crate::agent::watch;
use crate::config::Config;
use anyhow::{Context, Result};
use shelltrail_cast::chunk;
use shelltrail_proto::framing;
use shelltrail_proto::v1::{Accepted, Ack, AgentFrame, Close, RecorderFrame, Refused, agent_frame, recorder_frame};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// A recorder must say who it is within this long.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A session child this young may still be starting its recorder (ticks
/// of /proc/PID/stat's start time: 3 s at the usual 100 Hz).
const UNRECORDED_GRACE_TICKS: u64 = 300;
/// How often sessions whose recorder died without closing are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the agent tracks per session (durable state only).
struct Session {
    uid: u32,
    pid: i32,
    start_ticks: u64,
    /// First seq not yet durable, and the hash of the last durable chunk.
    next_seq: u64,
    last_hash: [u8; 32],
    closed: bool,
    connected: bool,
    /// Who opened it, for its seal.
    who: Who,
}

/// Shared agent state.
pub struct Agent {
    cfg: Config,
    sessions: Mutex<HashMap<String, Session>>,
    per_uid: Mutex<HashMap<u32, u32>>,
    writer: std::sync::mpsc::Sender<Append>,
    pub stats: Arc<Stats>,
    disk: Mutex<(Instant, u64)>,
    /// Ships durable records to the collector, when one is configured.
    pub shipper: Option<Arc<Shipper>>,
    /// The uid of `recorder_user`: its connections name the user they record.
    recorder_uid: Option<u32>,
    /// Recorders seen stopped before they took their terminal.
    watch: Mutex<watch::Watch>,
    /// Seals every session as it ends.
    signer: Signer,
}

impl Agent {
    /// Recovers the spool and starts the writer thread.
    pub fn start(cfg: Config) -> Result<Arc<Agent>> {
        spool::prepare_dir(&cfg.spool_dir)?;
        let signer = Signer::load_or_create(&cfg.signing_key(), crate::agent::ship::host_facts().hostname)?;
        tracing::info!(key = %signer.public_key(), "sessions are sealed with this host's key");
        let index = spool::scan(&cfg.spool_dir, true)
            .with_context(|| format!("recovering the spool at {}", cfg.spool_dir.display()))?;
        for p in &index.problems {
            tracing::error!("spool recovery: {p}");
        }
        let stats = Arc::new(Stats::default());
        stats.total_bytes.store(index.total_bytes, Ordering::Relaxed);
        let writer = spool::Writer::create(
            &cfg.spool_dir,
            index.last_segment,
            cfg.agent.segment_bytes,
            stats.clone(),
        )?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))?;

        let mut sessions = HashMap::new();
        for (id, s) in &index.sessions {
            // The chain continues from the last chunk in the spool, or from
            // where a carried-forward start record says it stood.
            let carried = s.open.resume.as_ref().and_then(|(seq, h)| {
                let h: [u8; 32] = hex::decode(h).ok()?.try_into().ok()?;
                Some((*seq, h))
            });
            let last_hash = match (s.chunks.last(), carried) {
                (Some(c), Some((seq, h))) if c.seq < seq => h,
                (Some(c), _) => chunk::hash(&spool::read_chunk(&cfg.spool_dir, c.loc)?)
                    .with_context(|| format!("session {id}: its last spooled chunk {} is unreadable", c.seq))?,
                (None, Some((_, h))) => h,
                (None, None) => chunk::chain_seed(id),
            };
            sessions.insert(
                id.clone(),
                Session {
                    uid: s.open.peer_uid,
                    pid: s.open.peer_pid,
                    start_ticks: s.open.peer_start_ticks,
                    next_seq: s.next_seq(),
                    last_hash,
                    closed: s.close.is_some(),
                    connected: false,
                    who: Who::of(&s.open),
                },
            );
        }
        let open = sessions.values().filter(|s| !s.closed).count();
        tracing::info!(
            sessions = sessions.len(),
            open,
            bytes = index.total_bytes,
            "spool recovered; open sessions wait for their recorders to reconnect"
        );
        let shipper = (!cfg.ship.collector.is_empty()).then(|| {
            Shipper::new(
                cfg.ship.clone(),
                cfg.spool_dir.clone(),
                &index,
                stats.clone(),
                tx.clone(),
                signer.public_key(),
            )
        });
        let recorder_uid = match nix::unistd::User::from_name(&cfg.recorder_user) {
            Ok(Some(u)) => Some(u.uid.as_raw()),
            _ => {
                tracing::warn!(
                    user = %cfg.recorder_user,
                    "recorder_user does not exist: no connection may name the user it records, so set-uid \
                     recorders cannot record (install the package, or fix recorder_user)"
                );
                None
            }
        };
        Ok(Arc::new(Agent {
            recorder_uid,
            watch: Mutex::new(watch::Watch::default()),
            cfg,
            sessions: Mutex::new(sessions),
            per_uid: Mutex::new(HashMap::new()),
            writer: tx,
            stats,
            disk: Mutex::new((Instant::now() - Duration::from_secs(60), u64::MAX)),
            shipper,
            signer,
        }))
    }

    /// Seals `rec` with what the agent holds of the session's chain.
    fn seal(&self, rec: &mut CloseRecord, view: View) {
        let who = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(&rec.session_id)
            .map(|s| s.who.clone())
            .unwrap_or_default();
        self.signer.seal(rec, &who, view);
    }

    async fn append(&self, body: Vec<u8>) -> Result<Loc, String> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(Append { body, done })
            .map_err(|_| "spool writer stopped".to_string())?;
        wait.await.map_err(|_| "spool writer stopped".to_string())?
    }

    /// Free bytes on the spool's filesystem (sysinfo), refreshed at most once a second.
    fn free_bytes(&self) -> u64 {
        let mut d = self.disk.lock().expect("disk lock");
        if d.0.elapsed() >= Duration::from_secs(1) {
            let dir = std::fs::canonicalize(&self.cfg.spool_dir).unwrap_or(self.cfg.spool_dir.clone());
            d.1 = match sysinfo::Disks::new_with_refreshed_list() {
                Ok(disks) => disks
                    .iter()
                    .filter(|k| dir.starts_with(k.mount_point()))
                    .max_by_key(|k| k.mount_point().as_os_str().len())
                    .map_or(u64::MAX, |k| k.available_space()),
                Err(e) => {
                    tracing::warn!("cannot read free disk space: {e}");
                    u64::MAX
                }
            };
            d.0 = Instant::now();
        }
        d.1
    }

    /// Why a new session cannot be taken, if it cannot.
    fn admission(&self, uid: u32) -> Option<String> {
        let a = &self.cfg.agent;
        let used = self.stats.total_bytes.load(Ordering::Relaxed);
        if used >= a.spool_max_bytes {
            return Some(format!("the spool is full ({used} of {} bytes)", a.spool_max_bytes));
        }
        let free = self.free_bytes();
        if free < a.min_free_bytes {
            return Some(format!(
                "the spool's disk is nearly full ({free} bytes free, {} required)",
                a.min_free_bytes
            ));
        }
        let n = self.per_uid.lock().expect("uid lock").get(&uid).copied().unwrap_or(0);
        if n >= a.max_sessions_per_uid {
            return Some(format!(
                "uid {uid} already has {n} recorded sessions open (max_sessions_per_uid)"
            ));
        }
        None
    }
}

/// Binds the socket and serves until the process is stopped.
pub async fn run(cfg: Config) -> Result<()> {
    let socket = cfg.socket.clone();
    let agent = Agent::start(cfg)?;
    let listener = bind(&socket)?;
    tracing::info!(socket = %socket.display(), "shelltrail agent listening");
    let sweeper = agent.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            sweep(&sweeper).await;
        }
    });
    match &agent.shipper {
        Some(ship) => {
            tokio::spawn(ship.clone().run());
        }
        None => tracing::info!("no collector configured ([ship] collector): recordings stay on this host"),
    }
    serve(agent, listener).await
}

/// Accepts recorders forever.
pub async fn serve(agent: Arc<Agent>, listener: UnixListener) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().await.context("accepting a recorder")?;
        let agent = agent.clone();
        tokio::spawn(async move {
            let cred = stream.peer_cred();
            let (uid, pid) = cred.as_ref().map_or((u32::MAX, 0), |c| (c.uid(), c.pid().unwrap_or(0)));
            if let Err(e) = connection(&agent, stream, uid, pid).await {
                tracing::warn!(uid, pid, "recorder connection closed: {e:#}");
            }
        });
    }
}

/// Binds the recorder socket: every user's recorder connects, so it is 0666;
/// identity comes from SO_PEERCRED, not from who can open the socket.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and ')': split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Whether the recorder process still runs: same pid and same start time
/// (a reused pid is another process). Where /proc hides other users'
/// processes (hidepid), fall back to kill(pid, 0): EPERM still means alive.
fn alive(pid: i32, ticks: u64) -> bool {
    match start_ticks(pid) {
        Some(t) => t == ticks,
        None => {
            let r = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None);
            pid > 0 && matches!(r, Ok(()) | Err(nix::errno::Errno::EPERM))
        }
    }
}

/// Logs SSH sessions running without a recording (see [`watch`]).
async fn report_unrecorded(agent: &Agent, recorder_uid: u32) {
    let recorded: std::collections::HashSet<i32> = {
        let sessions = agent.sessions.lock().expect("sessions lock");
        sessions.values().filter(|s| !s.closed).map(|s| s.pid).collect()
    };
    let found = tokio::task::spawn_blocking(move || watch::unrecorded(recorder_uid, &recorded, UNRECORDED_GRACE_TICKS))
        .await
        .unwrap_or_default();
    let report = agent.watch.lock().expect("watch lock").look(found);
    for s in report {
        let tty = s.tty.as_deref().unwrap_or("-");
        if s.stopped_recorder {
            tracing::warn!(
                pid = s.pid,
                uid = s.uid,
                tty,
                "a recorder is stopped before it started recording (SIGSTOP by its user in its first \
                 microseconds?): until it runs, its terminal may be in use unrecorded"
            );
        } else {
            tracing::warn!(
                pid = s.pid,
                uid = s.uid,
                tty,
                program = %s.comm,
                "an SSH session runs without a recording: sshd's session program is not the recorder and \
                 started none (a login script that never reached it, or a session process stopped before \
                 it could); its terminal may be in use unrecorded"
            );
        }
        if let Err(e) = record_unrecorded(agent, &s).await {
            tracing::error!(pid = s.pid, "cannot record the unrecorded session in the spool: {e}");
        }
    }
}

/// Puts an unrecorded SSH session in the spool as a session of its own,
/// with no chunks and an end that says why (mode `unrecorded`): it is then
/// listed, sealed and shipped like any other, so the gap shows at the
/// collector too, not only in this host's log.
async fn record_unrecorded(agent: &Agent, u: &watch::Unrecorded) -> Result<(), String> {
    let sid = uuid::Uuid::now_v7().to_string();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u.uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    let meta = shelltrail_proto::v1::SessionMeta {
        session_id: sid.clone(),
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        user: user.clone(),
        uid: u.uid,
        tty: u.tty.clone().unwrap_or_default(),
        mode: "unrecorded".into(),
        command: u.comm.clone(),
        start_unix_ms: now_ms(),
        ..Default::default()
    };
    let open = OpenRecord {
        meta,
        peer_uid: u.uid,
        peer_pid: u.pid,
        peer_user: user,
        peer_start_ticks: start_ticks(u.pid).unwrap_or(0),
        opened_unix_ms: now_ms(),
        resume: None,
    };
    let loc = agent.append(spool::open_body(&open)).await?;
    if let Some(ship) = &agent.shipper {
        ship.opened(&open, loc);
    }
    let seed = chunk::chain_seed(&sid);
    agent.sessions.lock().expect("sessions lock").insert(
        sid.clone(),
        Session {
            uid: u.uid,
            pid: u.pid,
            start_ticks: open.peer_start_ticks,
            next_seq: 0,
            last_hash: seed,
            closed: true,
            connected: false,
            who: Who::of(&open),
        },
    );
    let why = if u.stopped_recorder {
        "not recorded: its recorder was stopped before it took the terminal"
    } else {
        "not recorded: sshd's session program never started the recorder"
    };
    let mut close = CloseRecord {
        session_id: sid,
        close: Close {
            exit_status: -1,
            ..Default::default()
        },
        cause: why.into(),
        closed_unix_ms: now_ms(),
        seal: None,
    };
    agent.seal(
        &mut close,
        View {
            next_seq: 0,
            last_hash: seed,
        },
    );
    let loc = agent.append(spool::close_body(&close)).await?;
    if let Some(ship) = &agent.shipper {
        ship.closed(&close, loc);
    }
    Ok(())
}

/// Sessions whose recorder is gone without a Close get one, so they stop
/// counting as live. The recorder's pid and start time identify it.
async fn sweep(agent: &Agent) {
    if let Some(rec) = agent.recorder_uid {
        report_unrecorded(agent, rec).await;
    }
    let gone: Vec<(String, View)> = {
        let sessions = agent.sessions.lock().expect("sessions lock");
        sessions
            .iter()
            .filter(|(_, s)| !s.closed && !s.connected)
            .filter(|(_, s)| !alive(s.pid, s.start_ticks))
            .map(|(id, s)| {
                let view = View {
                    next_seq: s.next_seq,
                    last_hash: s.last_hash,
                };
                (id.clone(), view)
            })
            .collect()
    };
    for (id, view) in gone {
        let next = view.next_seq;
        // Sealed as the agent holds it, with the cause saying the recorder
        // never confirmed its end: whatever it had not delivered is not here.
        let mut rec = CloseRecord {
            session_id: id.clone(),
            close: Close {
                exit_status: -1,
                last_seq: next.saturating_sub(1),
                ..Default::default()
            },
            cause: "recorder vanished".into(),
            closed_unix_ms: now_ms(),
            seal: None,
        };
        agent.seal(&mut rec, view);
        if let Ok(loc) = agent.append(spool::close_body(&rec)).await {
            if let Some(ship) = &agent.shipper {
                ship.closed(&rec, loc);
            }
            tracing::warn!(session = %id, "recorder vanished without closing; session marked ended");
            if let Some(s) = agent.sessions.lock().expect("sessions lock").get_mut(&id) {
                s.closed = true;
            }
        }
    }
}

/// Errors that end one connection.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Frame(#[from] framing::FrameError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

struct FrameConn {
    stream: tokio::net::unix::OwnedReadHalf,
    buf: Vec<u8>,
    max: usize,
}

impl FrameConn {
    async fn next(&mut self) -> Result<Option<RecorderFrame>, ConnError> {
        loop {
            if let Some(f) = framing::take::<RecorderFrame>(&mut self.buf, self.max)? {
                return Ok(Some(f));
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::Protocol("connection closed in the middle of a frame".into()))
                };
            }
        }
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, body: agent_frame::Body) -> std::io::Result<()> {
    let mut buf = Vec::new();
    framing::encode(&AgentFrame { body: Some(body) }, &mut buf);
    w.write_all(&buf).await
}

/// What the ack task waits for, in order.
enum Pending {
    Chunk {
        seq: u64,
        hash: [u8; 32],
        wait: oneshot::Receiver<Result<Loc, String>>,
    },
    Close {
        rec: Box<CloseRecord>,
        wait: oneshot::Receiver<Result<Loc, String>>,
    },
    /// A chunk the spool already had (resent after a reconnect).
    Duplicate { seq: u64 },
}

/// Releases the per-uid slot and the session's "connected" mark.
struct Slot<'a> {
    agent: &'a Agent,
    uid: u32,
    session: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.agent.per_uid.lock().expect("uid lock").get_mut(&self.uid) {
            *n = n.saturating_sub(1);
        }
        if let Some(s) = self
            .agent
            .sessions
            .lock()
            .expect("sessions lock")
            .get_mut(&self.session)
        {
            s.connected = false;
        }
    }
}

async fn connection(agent: &Arc<Agent>, stream: UnixStream, uid: u32, pid: i32) -> Result<(), ConnError> {
    let (rd, mut wr) = stream.into_split();
    let mut conn = FrameConn {
        stream: rd,
        buf: Vec::with_capacity(64 << 10),
        max: agent.cfg.agent.max_frame_bytes as usize,
    };
    let first = tokio::time::timeout(OPEN_TIMEOUT, conn.next())
        .await
        .map_err(|_| ConnError::Protocol("no Open within 10 s".into()))??;
    let Some(RecorderFrame {
        body: Some(recorder_frame::Body::Open(open)),
    }) = first
    else {
        return Err(ConnError::Protocol("the first frame must be Open".into()));
    };
    let mut meta = open.meta.unwrap_or_default();
    // Who the session records: the set-uid recorder names the user (it ran
    // as them until it started their program); anyone else is who the kernel
    // says. A claim from anyone else is overwritten, never believed.
    let uid = if Some(uid) == agent.recorder_uid { meta.uid } else { uid };
    meta.uid = uid;
    let id = match uuid::Uuid::parse_str(&meta.session_id) {
        // Only the canonical form: the id names files and URLs later on.
        Ok(u) if u.to_string() == meta.session_id => u,
        _ => {
            let why = "session id must be a canonical UUID".to_string();
            send(&mut wr, agent_frame::Body::Refused(Refused { reason: why.clone() })).await?;
            return Err(ConnError::Protocol(why));
        }
    };
    let sid = meta.session_id.clone();

    // Admit (new) or resume (after a reconnect) the session.
    let outcome: Result<u64, String> = if open.resume {
        let mut sessions = agent.sessions.lock().expect("sessions lock");
        match sessions.get_mut(&sid) {
            None => Err(format!("cannot resume unknown session {sid}")),
            Some(s) if s.uid != uid || s.pid != pid => Err(format!(
                "session {sid} belongs to another recorder (uid {}, pid {})",
                s.uid, s.pid
            )),
            Some(s) if s.closed => Err(format!("session {sid} is already closed")),
            Some(s) if s.connected => Err(format!("session {sid} is already connected")),
            Some(s) => {
                s.connected = true;
                Ok(s.next_seq)
            }
        }
    } else if agent.sessions.lock().expect("sessions lock").contains_key(&sid) {
        Err(format!("session {sid} already exists"))
    } else if let Some(why) = agent.admission(uid) {
        Err(why)
    } else {
        let peer_user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_default();
        let rec = OpenRecord {
            meta: meta.clone(),
            peer_uid: uid,
            peer_pid: pid,
            peer_user,
            peer_start_ticks: start_ticks(pid).unwrap_or(0),
            opened_unix_ms: now_ms(),
            resume: None,
        };
        match agent.append(spool::open_body(&rec)).await {
            Ok(loc) => {
                if let Some(ship) = &agent.shipper {
                    ship.opened(&rec, loc);
                }
                agent.sessions.lock().expect("sessions lock").insert(
                    sid.clone(),
                    Session {
                        uid,
                        pid,
                        start_ticks: rec.peer_start_ticks,
                        next_seq: 0,
                        last_hash: chunk::chain_seed(&sid),
                        closed: false,
                        connected: true,
                        who: Who::of(&rec),
                    },
                );
                tracing::info!(session = %sid, uid, pid, user = %rec.peer_user, mode = %meta.mode, "session opened");
                Ok(0)
            }
            Err(e) => Err(format!("cannot write to the spool: {e}")),
        }
    };
    let next_seq = match outcome {
        Ok(n) => n,
        Err(reason) => {
            tracing::warn!(session = %sid, uid, pid, "refused: {reason}");
            send(&mut wr, agent_frame::Body::Refused(Refused { reason: reason.clone() })).await?;
            return Ok(());
        }
    };
    *agent.per_uid.lock().expect("uid lock").entry(uid).or_insert(0) += 1;
    let _slot = Slot {
        agent,
        uid,
        session: sid.clone(),
    };
    if open.resume {
        tracing::info!(session = %sid, uid, pid, next_seq, "session resumed");
    }
    send(&mut wr, agent_frame::Body::Accepted(Accepted { next_seq })).await?;

    // Acks go out in order from their own task, as the writer makes records durable.
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Pending>();
    let acker = {
        let agent = agent.clone();
        let sid = sid.clone();
        tokio::spawn(async move {
            while let Some(p) = ack_rx.recv().await {
                let (through, closed) = match p {
                    Pending::Duplicate { seq } => (seq, false),
                    Pending::Chunk { seq, hash, wait } => {
                        let loc = match wait.await.unwrap_or(Err("spool writer stopped".into())) {
                            Ok(loc) => loc,
                            Err(e) => {
                                // Nothing after this chunk is acknowledged on this
                                // connection; closing it makes the recorder reconnect
                                // and resend from the last durable chunk.
                                tracing::error!(session = %sid, "spool write failed: {e}; closing the connection");
                                let reason = format!("the agent cannot write its spool: {e}");
                                let _ = send(&mut wr, agent_frame::Body::Refused(Refused { reason })).await;
                                return;
                            }
                        };
                        if let Some(s) = agent.sessions.lock().expect("sessions lock").get_mut(&sid) {
                            s.next_seq = seq + 1;
                            s.last_hash = hash;
                        }
                        if let Some(ship) = &agent.shipper {
                            ship.chunk(&sid, seq, loc);
                        }
                        (seq, false)
                    }
                    Pending::Close { rec, wait } => {
                        let loc = match wait.await.unwrap_or(Err("spool writer stopped".into())) {
                            Ok(loc) => loc,
                            Err(e) => {
                                tracing::error!(session = %sid, "spool write failed: {e}");
                                return;
                            }
                        };
                        if let Some(ship) = &agent.shipper {
                            ship.closed(&rec, loc);
                        }
                        if let Some(s) = agent.sessions.lock().expect("sessions lock").get_mut(&sid) {
                            s.closed = true;
                        }
                        tracing::info!(session = %sid, "session closed");
                        let through = agent
                            .sessions
                            .lock()
                            .expect("sessions lock")
                            .get(&sid)
                            .map_or(0, |s| s.next_seq);
                        (through.saturating_sub(1), true)
                    }
                };
                if send(
                    &mut wr,
                    agent_frame::Body::Ack(Ack {
                        through_seq: through,
                        closed,
                    }),
                )
                .await
                .is_err()
                {
                    return;
                }
            }
        })
    };

    // This connection's view of the chain: next seq it will accept, hash of the last one.
    let (mut expect, mut prev) = {
        let sessions = agent.sessions.lock().expect("sessions lock");
        let s = &sessions[&sid];
        (s.next_seq, s.last_hash)
    };
    let result = loop {
        let frame = match conn.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        match frame.body {
            Some(recorder_frame::Body::Chunk(c)) => {
                let (head, _) = match chunk::parse(&c.data) {
                    Ok(h) => h,
                    Err(e) => {
                        break Err(ConnError::Protocol(format!(
                            "session {sid}: malformed chunk {}: {e}",
                            c.seq
                        )));
                    }
                };
                if head.seq != c.seq {
                    break Err(ConnError::Protocol(format!(
                        "session {sid}: frame says chunk {} but the chunk says {}",
                        c.seq, head.seq
                    )));
                }
                if c.seq < expect {
                    if ack_tx.send(Pending::Duplicate { seq: c.seq }).is_err() {
                        break Err(ConnError::Protocol("stopped after a failed spool write".into()));
                    }
                    continue;
                }
                // A gap is allowed: the recorder drops chunks (and names them in
                // Close) when its memory fills while the agent is away.
                if c.seq == expect && head.prev_hash != prev {
                    break Err(ConnError::Protocol(format!(
                        "session {sid}: chunk {} does not continue the hash chain",
                        c.seq
                    )));
                }
                // The recorder's word for the chunk's link hash: checking it
                // would mean decompressing every chunk here, and the collector
                // recomputes it anyway (a wrong one quarantines the session there).
                let hash = match <[u8; 32]>::try_from(&c.hash[..]) {
                    Ok(h) => h,
                    Err(_) if c.hash.is_empty() => match chunk::hash(&c.data) {
                        Ok(h) => h,
                        Err(e) => {
                            break Err(ConnError::Protocol(format!(
                                "session {sid}: malformed chunk {}: {e}",
                                c.seq
                            )));
                        }
                    },
                    Err(_) => {
                        break Err(ConnError::Protocol(format!(
                            "session {sid}: chunk {} comes with a {}-byte hash, not 32",
                            c.seq,
                            c.hash.len()
                        )));
                    }
                };
                let (done, wait) = oneshot::channel();
                if agent
                    .writer
                    .send(Append {
                        body: spool::chunk_body(&id, c.seq, &c.data),
                        done,
                    })
                    .is_err()
                {
                    break Err(ConnError::Protocol("spool writer stopped".into()));
                }
                if ack_tx.send(Pending::Chunk { seq: c.seq, hash, wait }).is_err() {
                    break Err(ConnError::Protocol("stopped after a failed spool write".into()));
                }
                expect = c.seq + 1;
                prev = hash;
            }
            Some(recorder_frame::Body::Close(close)) => {
                let mut rec = CloseRecord {
                    session_id: sid.clone(),
                    close,
                    cause: "recorder".into(),
                    closed_unix_ms: now_ms(),
                    seal: None,
                };
                // The chain as this connection queued it, in order before the Close.
                agent.seal(
                    &mut rec,
                    View {
                        next_seq: expect,
                        last_hash: prev,
                    },
                );
                let (done, wait) = oneshot::channel();
                if agent
                    .writer
                    .send(Append {
                        body: spool::close_body(&rec),
                        done,
                    })
                    .is_err()
                {
                    break Err(ConnError::Protocol("spool writer stopped".into()));
                }
                if ack_tx
                    .send(Pending::Close {
                        rec: Box::new(rec),
                        wait,
                    })
                    .is_err()
                {
                    break Err(ConnError::Protocol("stopped after a failed spool write".into()));
                }
            }
            Some(recorder_frame::Body::Open(_)) => {
                break Err(ConnError::Protocol("second Open on one connection".into()));
            }
            None => break Err(ConnError::Protocol("empty frame body".into())),
        }
    };
    drop(ack_tx);
    // Let the acks of what was already queued go out before the slot is released.
    let _ = acker.await;
    result.map_err(|e| match e {
        ConnError::Protocol(m) => ConnError::Protocol(format!("{m} (uid {uid})")),
        other => other,
    })
}
