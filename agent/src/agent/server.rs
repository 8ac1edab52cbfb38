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
use crate::agent::spool::{CloseRecord, OpenRecord, Spool, Stats};
use crate::agent::watch;
use crate::config::Config;
use anyhow::{Context, Result};
use shelltrail_cast::chain::Chain;
use shelltrail_proto::framing;
use shelltrail_proto::v1::{AgentFrame, Close, Refused, agent_frame};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::UnixListener;

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

/// Shared agent state.
pub struct Agent {
    pub(crate) cfg: Config,
    /// The spool and its one catalogue of sessions.
    pub(crate) spool: Arc<Spool>,
    pub(crate) limits: Arc<Limits>,
    pub stats: Arc<Stats>,
    /// Ships durable records to the collector, when one is configured.
    pub shipper: Option<Arc<Shipper>>,
    /// Recorders seen stopped before they took their terminal.
    watch: Mutex<watch::Watch>,
    /// Seals every session as it ends.
    signer: Signer,
    /// Users an administrator locked out (`shelltrail kill --lock`).
    pub(crate) locks: crate::agent::control::Locks,
    /// Each live session's current screen and feed, for `shelltrail tail`.
    pub(crate) views: crate::agent::live::Views,
    /// This agent's hold on the spool: one agent per spool.
    _lock: crate::agent::spool::log::SpoolLock,
}

impl Agent {
    /// Recovers the spool and starts the writer thread. A session whose
    /// stored recording is damaged is quarantined, never a reason not to start.
    pub fn start(cfg: Config) -> Result<Arc<Agent>> {
        refuse_root_on_a_service_spool(&cfg.spool_dir)?;
        let lock = crate::agent::spool::log::lock_spool(&cfg.spool_dir)?;
        let signer = Signer::load_or_create(&cfg.signing_key(), crate::agent::ship::host_facts().hostname)?;
        tracing::info!(key = %signer.public_key(), "sessions are sealed with this host's key");
        let (spool, recovered) = Spool::recover(&cfg.spool_dir, cfg.agent.segment_bytes, now_ms())
            .with_context(|| format!("recovering the spool at {}", cfg.spool_dir.display()))?;
        for p in &recovered.problems {
            tracing::error!("spool recovery: {p}");
        }
        for d in &recovered.damaged {
            tracing::error!(
                session = %d.session_id,
                "session damaged in the spool: {}; quarantined: listed as damaged, never shipped, kept for inspection",
                d.reason
            );
        }
        let spool = Arc::new(spool);
        let stats = spool.stats.clone();
        {
            let cat = spool.lock();
            let open = cat.sessions.values().filter(|s| !s.closed()).count();
            let damaged = cat.sessions.values().filter(|s| s.damaged.is_some()).count();
            tracing::info!(
                sessions = cat.sessions.len(),
                open,
                damaged,
                bytes = recovered.bytes,
                "spool recovered; open sessions wait for their recorders to reconnect"
            );
        }
        let shipper = (!cfg.ship.collector.is_empty())
            .then(|| Shipper::new(cfg.ship.clone(), spool.clone(), signer.public_key()));
        let locks = crate::agent::control::Locks::load(cfg.spool_dir.parent().unwrap_or(Path::new("/")));
        let max_connections = cfg.agent.max_connections.min(fd_room());
        let limits = Limits::new(
            &cfg.agent,
            cfg.shell.chunk_bytes,
            recorder_uid(&cfg.recorder_user),
            stats.clone(),
            cfg.spool_dir.clone(),
            max_connections,
        );
        let agent = Arc::new(Agent {
            cfg,
            spool,
            limits,
            stats,
            shipper,
            watch: Mutex::new(watch::Watch::default()),
            signer,
            locks,
            views: Default::default(),
            _lock: lock,
        });
        if let Some(shipper) = &agent.shipper {
            // Weak: the agent owns the shipper.
            let me = Arc::downgrade(&agent);
            shipper.on_order(Box::new(move |m| {
                me.upgrade()
                    .and_then(|agent| crate::agent::control::from_collector(&agent, m))
            }));
        }
        Ok(agent)
    }

    /// Seals `rec` with what the agent holds of the session's chain.
    pub(crate) fn seal(&self, rec: &mut CloseRecord, view: View) {
        let who = self
            .spool
            .lock()
            .sessions
            .get(&rec.session_id)
            .map(|s| Who::of(&s.open))
            .unwrap_or_default();
        self.signer.seal(rec, &who, view);
    }
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

/// An agent run by hand as root on the spool of the service's user would
/// write segments that user cannot read or delete: it refuses, saying how
/// to run it.
fn refuse_root_on_a_service_spool(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let Ok(md) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if md.uid() == 0 {
        return Ok(());
    }
    let owner = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(md.uid()))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {}", md.uid()), |u| u.name);
    anyhow::bail!(
        "the spool {} belongs to {owner}, and this agent runs as root: it would leave segments {owner} \
         cannot read or delete. Start the service (`systemctl start shelltrail-agent`) or run it as \
         that user (`runuser -u {owner} -- shelltrail agent`)",
        dir.display()
    )
}

/// Binds the socket and serves until the process is stopped.
pub async fn run(cfg: Config) -> Result<()> {
    let socket = cfg.socket.clone();
    let agent = Agent::start(cfg)?;
    // Socket activation: systemd holds the socket across restarts
    // (upgrades), so a login never finds it missing; otherwise bind it.
    let listener = match crate::sys::systemd_listener().context("taking the socket systemd passed")? {
        Some(l) => {
            l.set_nonblocking(true)?;
            tracing::info!("using the socket systemd passed (shelltrail-agent.socket)");
            UnixListener::from_std(l)?
        }
        None => bind(&socket)?,
    };
    tracing::info!(socket = %socket.display(), "shelltrail agent listening");
    notify_ready();
    let sweeper = agent.clone();
    tokio::spawn(async move {
        crate::agent::fallback::import_all(&sweeper).await;
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

/// Tells systemd the agent serves (`Type=notify`): `READY=1` on the
/// datagram socket `$NOTIFY_SOCKET` names (a path, or `@name` for an
/// abstract one), as sd_notify(3) does. Nothing when it is not set.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(b"READY=1\nSTATUS=recording sessions", &a));
    if let Err(e) = sent {
        tracing::warn!(socket = %target, "cannot tell systemd the agent is ready: {e}");
    }
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
                    body: Some(agent_frame::Body::Refused(Refused {
                        reason: why,
                        ..Default::default()
                    })),
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
pub(crate) fn alive(pid: i32, ticks: u64) -> bool {
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
        let cat = agent.spool.lock();
        cat.sessions
            .values()
            .filter(|s| !s.closed())
            .map(|s| s.open.peer_pid)
            .collect()
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
    // Catalogued as connected until its end is recorded: the sweep leaves it alone.
    agent.spool.open(open).await?;
    let seed = Chain::new(&sid).last_hash();
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
    let id = close.session_id.clone();
    let closed = agent.spool.close(&close).await;
    if let Some(s) = agent.spool.lock().sessions.get_mut(&id) {
        s.connected = false;
    }
    closed
}

/// Sessions whose recorder is gone without a Close get one, so they stop
/// counting as live. The recorder's pid and start time identify it.
async fn sweep(agent: &Arc<Agent>) {
    if let Some(rec) = agent.limits.recorder_uid() {
        report_unrecorded(agent, rec).await;
    }
    // Break-glass sessions recorded while the agent was away, first: such
    // a session's recorder is gone but its end is in its file.
    crate::agent::fallback::import_all(agent).await;
    let gone: Vec<(String, View)> = {
        let cat = agent.spool.lock();
        cat.sessions
            .iter()
            .filter(|(_, s)| !s.closed() && !s.connected)
            .filter(|(_, s)| !alive(s.open.peer_pid, s.open.peer_start_ticks))
            .filter(|(id, _)| !crate::agent::fallback::pending(agent, id))
            .map(|(id, s)| {
                let view = View {
                    next_seq: s.chain.next_seq(),
                    last_hash: s.chain.last_hash(),
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
        match agent.spool.close(&rec).await {
            Ok(()) => tracing::warn!(session = %id, "recorder vanished without closing; session marked ended"),
            Err(e) => tracing::error!(session = %id, "cannot record that the recorder vanished: {e}"),
        }
    }
}
