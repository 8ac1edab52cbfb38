//! The agent's socket server: accepts recorders, one task per connection
//! ([`conn`](crate::agent::conn)), one writer thread for the spool.
//!
//! A connection is one session. The agent learns the peer's uid and pid
//! from SO_PEERCRED and stamps the session with them, so a recorder cannot
//! claim another user; only the set-uid recorder's own user
//! (`recorder_user`) is believed about whose session it records. A resumed
//! session must come from the same uid and pid. A malformed or oversized
//! frame closes that connection only, with a log line naming the session
//! and uid; what one user can make the agent spend is bounded in
//! [`limits`](crate::agent::limits).
//!
//! Nothing a connection does ends the agent: accept errors (out of
//! descriptors, say) are logged at most every few seconds and retried after
//! a growing pause, and a session damaged in the spool is quarantined at
//! start-up instead of stopping it.

use crate::agent::conn::{self, Peer};
use crate::agent::limits::Limits;
use crate::agent::ship::Shipper;
use crate::agent::signer::{Signer, View, Who};
use crate::agent::spool::{self, Append, CloseRecord, DamagedRecord, Loc, OpenRecord, SessionEntry, Stats};
use crate::agent::watch;
use crate::config::Config;
use anyhow::{Context, Result};
use shelltrail_cast::chunk;
use shelltrail_proto::framing;
use shelltrail_proto::v1::{AgentFrame, Close, Refused, agent_frame};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

/// How often sessions whose recorder died without closing are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// A session child this young may still be starting its recorder (ticks
/// of /proc/PID/stat's start time: 3 s at the usual 100 Hz).
const UNRECORDED_GRACE_TICKS: u64 = 300;
/// Pauses after a failed accept: from the first to the longest, doubling.
const ACCEPT_PAUSE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// Descriptors kept for the spool, shipping and logging besides connections.
const SPARE_FDS: u64 = 64;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the agent tracks per session (durable state only).
pub(crate) struct Session {
    /// The session's user (the uid the recorder names when it connects as
    /// `recorder_user`), and the uid and pid of the connection.
    pub uid: u32,
    pub peer_uid: u32,
    pub pid: i32,
    pub start_ticks: u64,
    /// First seq not yet durable, and the hash of the last durable chunk.
    pub next_seq: u64,
    pub last_hash: [u8; 32],
    pub closed: bool,
    pub connected: bool,
    /// Why the session is quarantined, if it is damaged in the spool.
    pub damaged: Option<String>,
    /// Who opened it, for its seal.
    pub who: Who,
}

/// Shared agent state.
pub struct Agent {
    pub(crate) cfg: Config,
    pub(crate) sessions: Mutex<HashMap<String, Session>>,
    pub(crate) limits: Arc<Limits>,
    pub(crate) writer: std::sync::mpsc::Sender<Append>,
    pub stats: Arc<Stats>,
    /// Ships durable records to the collector, when one is configured.
    pub shipper: Option<Arc<Shipper>>,
    /// Recorders seen stopped before they took their terminal.
    watch: Mutex<watch::Watch>,
    /// Seals every session as it ends.
    signer: Signer,
}

impl Agent {
    /// Recovers the spool and starts the writer thread. A session whose
    /// stored recording is damaged is quarantined, never a reason not to start.
    pub fn start(cfg: Config) -> Result<Arc<Agent>> {
        spool::prepare_dir(&cfg.spool_dir)?;
        let signer = Signer::load_or_create(&cfg.signing_key(), crate::agent::ship::host_facts().hostname)?;
        tracing::info!(key = %signer.public_key(), "sessions are sealed with this host's key");
        let mut index = spool::scan(&cfg.spool_dir, true)
            .with_context(|| format!("recovering the spool at {}", cfg.spool_dir.display()))?;
        for p in &index.problems {
            tracing::error!("spool recovery: {p}");
        }
        let stats = Arc::new(Stats::default());
        stats.total_bytes.store(index.total_bytes, Ordering::Relaxed);
        let mut writer = spool::Writer::create(
            &cfg.spool_dir,
            index.last_segment,
            cfg.agent.segment_bytes,
            stats.clone(),
        )?;

        let mut sessions = HashMap::new();
        let mut damage = Vec::new();
        for (id, s) in &index.sessions {
            let last_hash = match &s.damaged {
                Some(_) => [0; 32],
                None => last_link(&cfg.spool_dir, id, s).unwrap_or_else(|why| {
                    damage.push(DamagedRecord {
                        session_id: id.clone(),
                        reason: why,
                        unix_ms: now_ms(),
                    });
                    [0; 32]
                }),
            };
            stats
                .holdings
                .lock()
                .expect("holdings lock")
                .add(s.open.peer_uid, id, s.stored_bytes());
            sessions.insert(
                id.clone(),
                Session {
                    uid: s.open.peer_uid,
                    peer_uid: s.open.via_recorder_uid.unwrap_or(s.open.peer_uid),
                    pid: s.open.peer_pid,
                    start_ticks: s.open.peer_start_ticks,
                    next_seq: s.next_seq(),
                    last_hash,
                    closed: s.close.is_some(),
                    connected: false,
                    damaged: s.damaged.clone(),
                    who: Who::of(&s.open),
                },
            );
        }
        quarantine(&mut writer, &mut index, &mut sessions, damage)?;

        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))?;
        let open = sessions.values().filter(|s| !s.closed).count();
        let damaged = sessions.values().filter(|s| s.damaged.is_some()).count();
        tracing::info!(
            sessions = sessions.len(),
            open,
            damaged,
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
        let max_connections = cfg.agent.max_connections.min(fd_room());
        let limits = Limits::new(
            &cfg.agent,
            cfg.shell.chunk_bytes,
            recorder_uid(&cfg.recorder_user),
            stats.clone(),
            cfg.spool_dir.clone(),
            max_connections,
        );
        Ok(Arc::new(Agent {
            cfg,
            sessions: Mutex::new(sessions),
            limits,
            writer: tx,
            stats,
            shipper,
            watch: Mutex::new(watch::Watch::default()),
            signer,
        }))
    }

    /// Seals `rec` with what the agent holds of the session's chain.
    pub(crate) fn seal(&self, rec: &mut CloseRecord, view: View) {
        let who = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(&rec.session_id)
            .map(|s| s.who.clone())
            .unwrap_or_default();
        self.signer.seal(rec, &who, view);
    }

    pub(crate) async fn append(&self, body: Vec<u8>) -> Result<Loc, String> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(Append { body, done })
            .map_err(|_| "spool writer stopped".to_string())?;
        wait.await.map_err(|_| "spool writer stopped".to_string())?
    }
}

/// The link hash a session's chain continues from: its last spooled chunk's,
/// or where a carried-forward start record says it stood. The error says
/// why the session's stored recording is damaged.
fn last_link(dir: &Path, id: &str, s: &SessionEntry) -> Result<[u8; 32], String> {
    let carried = s.open.resume.as_ref().and_then(|(seq, h)| {
        let h: [u8; 32] = hex::decode(h).ok()?.try_into().ok()?;
        Some((*seq, h))
    });
    match (s.chunks.last(), carried) {
        (Some(c), Some((seq, h))) if c.seq < seq => Ok(h),
        (Some(c), _) => spool::read_chunk(dir, c.loc)
            .map_err(|e| e.to_string())
            .and_then(|bytes| chunk::check(&bytes, c.seq).map_err(|e| e.to_string()))
            .map(|(_, hash)| hash)
            .map_err(|e| format!("its last spooled chunk {} is unreadable: {e}", c.seq)),
        (None, Some((_, h))) => Ok(h),
        (None, None) => Ok(chunk::chain_seed(id)),
    }
}

/// Records the sessions found damaged (a DAMAGED record each, durable
/// before the agent takes connections) and marks them in the index the
/// shipper starts from: listed as damaged, never shipped, kept.
fn quarantine(
    writer: &mut spool::Writer,
    index: &mut spool::Index,
    sessions: &mut HashMap<String, Session>,
    damage: Vec<DamagedRecord>,
) -> Result<()> {
    if damage.is_empty() {
        return Ok(());
    }
    let locs = writer
        .write_now(damage.iter().map(spool::damaged_body).collect())
        .context("recording damaged sessions in the spool")?;
    for (d, loc) in damage.into_iter().zip(locs) {
        tracing::error!(
            session = %d.session_id,
            "session damaged in the spool: {}; quarantined: listed as damaged, never shipped, kept for inspection",
            d.reason
        );
        index
            .segments
            .entry(loc.segment)
            .or_default()
            .entry(d.session_id.clone())
            .or_default();
        if let Some(s) = index.sessions.get_mut(&d.session_id) {
            s.damaged = Some(d.reason.clone());
        }
        if let Some(s) = sessions.get_mut(&d.session_id) {
            s.damaged = Some(d.reason);
        }
    }
    Ok(())
}

/// The uid of the recorder's system user: its connections name the user
/// they record. Without it no connection may: each is recorded as its own uid.
fn recorder_uid(name: &str) -> Option<u32> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Some(u.uid.as_raw()),
        other => {
            let why = match other {
                Err(e) => format!(": {e}"),
                _ => String::new(),
            };
            tracing::warn!(
                user = %name,
                "recorder_user does not exist{why}: no connection may name the user it records, so set-uid \
                 recorders cannot record (install the package, or fix recorder_user)"
            );
            None
        }
    }
}

/// Raises the soft limit on open descriptors to the hard one and says how
/// many connections fit under it, with room to spare for everything else.
fn fd_room() -> u32 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return u32::MAX;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    soft.saturating_sub(SPARE_FDS).clamp(1, u64::from(u32::MAX)) as u32
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

/// Accepts recorders forever. A failed accept (out of descriptors, a
/// connection aborted before it was taken) is logged and retried after a
/// pause, never fatal. Each peer's connections are counted as they are
/// accepted; past its uid's cap a connection is told why and closed.
pub async fn serve(agent: Arc<Agent>, listener: UnixListener) -> Result<()> {
    let mut pause = ACCEPT_PAUSE.0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                pause = ACCEPT_PAUSE.0;
                stream
            }
            Err(e) => {
                agent.limits.log_every("accept", |n| {
                    tracing::error!("cannot accept recorder connections: {e} ({n} times); retrying")
                });
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(ACCEPT_PAUSE.1);
                continue;
            }
        };
        let peer = match stream.peer_cred() {
            Ok(c) => Peer {
                uid: c.uid(),
                pid: c.pid().unwrap_or(0),
            },
            Err(e) => {
                agent.limits.log_every("peer_cred", |n| {
                    tracing::warn!("connection without credentials: {e} ({n} times)")
                });
                continue;
            }
        };
        let slot = match agent.limits.connection(peer.uid) {
            Ok(slot) => slot,
            Err(why) => {
                agent.limits.log_every(&format!("conns {}", peer.uid), |n| {
                    tracing::warn!(uid = peer.uid, "connections refused ({n} times): {why}")
                });
                // Best effort, never waiting: an honest recorder shows the reason.
                let mut buf = Vec::new();
                let refused = AgentFrame {
                    body: Some(agent_frame::Body::Refused(Refused { reason: why })),
                };
                framing::encode(&refused, &mut buf);
                let _ = stream.try_write(&buf);
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            conn::serve(agent, stream, peer).await;
            drop(slot);
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
pub(crate) fn start_ticks(pid: i32) -> Option<u64> {
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
        via_recorder_uid: None,
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
            peer_uid: u.uid,
            pid: u.pid,
            start_ticks: open.peer_start_ticks,
            next_seq: 0,
            last_hash: seed,
            closed: true,
            connected: false,
            damaged: None,
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
    if let Some(rec) = agent.limits.recorder_uid() {
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
