//! Administrators' requests to the agent: list the live sessions, end one
//! (and lock its user out), unlock a user. They come on the recorders'
//! socket, as a `Control` frame instead of an `Open`, and are answered with
//! one `ControlReply`.
//!
//! Who may: root, and members of `[agent] admin_group`, by SO_PEERCRED and
//! the peer process's groups as the kernel holds them (`/proc/PID/status`),
//! never by anything the client says. Everyone else gets a clear refusal.
//! Every request, allowed or not, is logged (target `shelltrail::audit`):
//! who, what, which session, why.
//!
//! Locks are kept in `locks.json` beside the spool directory (the agent's
//! state), so a restart does not let a locked-out user back in.
//!
//! The same requests come from the collector, on the stream the agent ships
//! on ([`from_collector`]): an operator the collector authenticated and
//! allowed (its respond role) ends a session or unlocks a user here, named
//! as the collector names them; and a session tailed through the collector
//! is watched here as if tailed on the host.

use crate::agent::Agent;
use crate::agent::conn::Peer;
use crate::agent::server::now_ms;
use crate::agent::ship::FromCollector;
use crate::agent::spool::Session;
use crate::cli::shown::shown;
use serde::{Deserialize, Serialize};
use shelltrail_proto::v1::{Control, ControlReply, Ended, LiveSession, OrderResult, control, host_order};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a session's connection is told from outside it.
#[derive(Debug, Clone)]
pub enum ToSession {
    /// An administrator ends the session.
    End(Ended),
    /// Someone is watching: cut chunks this often (ms; 0: as configured).
    Watch(u32),
    /// A line for the user's terminal (`notify_on_tail`).
    Notify(String),
}

/// A user refused new sessions on this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lock {
    pub user: String,
    pub by: String,
    pub reason: String,
    pub since_unix_ms: i64,
    /// None: until unlocked.
    pub until_unix_ms: Option<i64>,
}

/// The users locked out, by uid; persisted on every change.
#[derive(Debug)]
pub struct Locks {
    path: PathBuf,
    by_uid: Mutex<BTreeMap<u32, Lock>>,
}

impl Locks {
    /// Loads `locks.json` from `state_dir` (none yet: no locks). A file that
    /// does not parse is reported loudly and kept aside (`locks.json.bad`):
    /// the agent starts with no locks rather than refusing every login.
    pub fn load(state_dir: &Path) -> Locks {
        let path = state_dir.join("locks.json");
        let by_uid = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                let aside = path.with_extension("json.bad");
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(
                    file = %path.display(),
                    kept = %aside.display(),
                    "cannot read the user locks ({e}); NO USER IS LOCKED OUT until they are set again \
                     (the unreadable file is kept aside)"
                );
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::error!(file = %path.display(), "cannot read the user locks ({e}); starting with none");
                BTreeMap::new()
            }
        };
        Locks {
            path,
            by_uid: Mutex::new(by_uid),
        }
    }

    /// Why `uid` may not start a session now, if it may not.
    pub fn refusal(&self, uid: u32) -> Option<String> {
        let mut locks = self.by_uid.lock().expect("locks lock");
        let l = locks.get(&uid)?;
        if l.until_unix_ms.is_some_and(|u| u <= now_ms()) {
            locks.remove(&uid);
            let _ = self.save(&locks);
            return None;
        }
        let until = match l.until_unix_ms {
            Some(u) => format!("until {}", crate::cli::utc(u)),
            None => "until an administrator unlocks them".into(),
        };
        Some(format!(
            "sessions of {} on this host are locked by {} {until}: {}",
            l.user, l.by, l.reason
        ))
    }

    fn set(&self, uid: u32, lock: Option<Lock>) -> std::io::Result<Option<Lock>> {
        let mut locks = self.by_uid.lock().expect("locks lock");
        let old = match lock {
            Some(l) => locks.insert(uid, l),
            None => locks.remove(&uid),
        };
        self.save(&locks)?;
        Ok(old)
    }

    fn save(&self, locks: &BTreeMap<u32, Lock>) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.path.with_extension("json.tmp");
        // Who is locked out and why is the administrators' business.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(&serde_json::to_vec_pretty(locks).expect("locks serialise"))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// Who the peer is, if it may administer the agent.
pub(crate) fn administrator(agent: &Agent, peer: Peer) -> Result<String, String> {
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid:{}", peer.uid), |u| u.name);
    let who = format!("{name} (uid {}) on this host", peer.uid);
    if peer.uid == 0 {
        return Ok(who);
    }
    let group = &agent.cfg.agent.admin_group;
    let gid = nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    if let Some(gid) = gid
        && process_groups(peer.pid).contains(&gid)
    {
        return Ok(who);
    }
    Err(format!(
        "permission denied: only root and members of the group {group:?} ([agent] admin_group) may do this"
    ))
}

/// Tells a session's connection something from outside it.
pub(crate) fn tell(agent: &Agent, session: &str, what: ToSession) {
    if let Some(tx) = agent.spool.lock().sessions.get(session).and_then(|s| s.control.clone()) {
        let _ = tx.send(what);
    }
}

/// Tells a session's connection that it is watched (or no longer).
pub(crate) fn watch(agent: &Agent, session: &str, interval_ms: u32) {
    tell(agent, session, ToSession::Watch(interval_ms));
}

/// The peer process's real and supplementary groups, as the kernel holds them.
fn process_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Groups:") {
            out.extend(rest.split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
        } else if let Some(rest) = line.strip_prefix("Gid:") {
            out.extend(rest.split_whitespace().take(1).filter_map(|g| g.parse::<u32>().ok()));
        }
    }
    out
}

/// Answers one request.
pub fn handle(agent: &Agent, peer: Peer, req: Control) -> ControlReply {
    let what = match &req.request {
        Some(control::Request::ListLive(_)) => "list live sessions".to_string(),
        Some(control::Request::Kill(k)) => format!("end session {:?}", k.session),
        Some(control::Request::Unlock(u)) => format!("unlock {:?}", u.user),
        Some(control::Request::Tail(t)) => format!("tail {:?}", t.session),
        Some(control::Request::Read(r)) => format!("{} {:?} from the spool", shown(&r.action), shown(&r.session)),
        None => "nothing".into(),
    };
    let who = match administrator(agent, peer) {
        Ok(who) => who,
        Err(why) => {
            tracing::warn!(target: "shelltrail::audit", uid = peer.uid, pid = peer.pid, "refused: {what}: {why}");
            return refused(why);
        }
    };
    let reply = match req.request {
        Some(control::Request::ListLive(_)) => list_live(agent),
        Some(control::Request::Kill(k)) => kill(agent, &who, k),
        Some(control::Request::Unlock(u)) => unlock(agent, &who, &u.user),
        // Answered by the connection, which goes on streaming (conn.rs).
        Some(control::Request::Tail(_)) => refused("tail is served by the connection".into()),
        Some(control::Request::Read(r)) => ControlReply {
            ok: true,
            message: format!("read from the spool: {} {}", shown(&r.action), shown(&r.session)),
            live: Vec::new(),
        },
        None => refused("empty request".into()),
    };
    if reply.ok {
        tracing::warn!(target: "shelltrail::audit", by = %who, pid = peer.pid, "{}", reply.message);
    } else {
        tracing::warn!(target: "shelltrail::audit", by = %who, pid = peer.pid, "failed: {what}: {}", reply.message);
    }
    reply
}

/// Carries out what the collector asks (see the module's doc).
pub fn from_collector(agent: &Agent, m: FromCollector) -> Option<OrderResult> {
    let o = match m {
        FromCollector::Connected => {
            // Watches through the collector are asked for again on every stream.
            let ids: Vec<String> = agent.spool.lock().sessions.keys().cloned().collect();
            for id in ids {
                if let Some(view) = agent.views.get(&id)
                    && !view.set_remote(false)
                {
                    watch(agent, &id, 0);
                }
            }
            return None;
        }
        FromCollector::Order(o) => o,
    };
    let by = shown(&o.by).into_owned();
    let reply = match o.body {
        Some(host_order::Body::Watch(w)) => {
            let live = agent
                .spool
                .lock()
                .sessions
                .get(&w.session_id)
                .is_some_and(|s| !s.closed());
            if live {
                let watched = agent.views.of(&w.session_id).set_remote(w.watching);
                watch(agent, &w.session_id, if watched { WATCHED_MS } else { 0 });
                let verb = if w.watching { "tailing" } else { "stopped tailing" };
                tracing::info!(target: "shelltrail::audit", "{verb} session {} through the collector", w.session_id);
                if w.watching && agent.cfg.agent.notify_on_tail {
                    tell(
                        agent,
                        &w.session_id,
                        ToSession::Notify("someone is watching this session through the collector".into()),
                    );
                }
            }
            return None;
        }
        Some(host_order::Body::Kill(k)) => {
            // An order queued while this agent was away arrives as it
            // reconnects, maybe before the session's recorder has: wait
            // for it a little rather than fail.
            let deadline = std::time::Instant::now() + RECONNECT_WAIT;
            while !connected(agent, &k.session) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            kill(agent, &by, k)
        }
        Some(host_order::Body::Unlock(u)) => unlock(agent, &by, &u.user),
        None => refused("an order of a kind this agent does not know: upgrade it".into()),
    };
    if reply.ok {
        tracing::warn!(target: "shelltrail::audit", by = %by, "{}", reply.message);
    } else {
        tracing::warn!(target: "shelltrail::audit", by = %by, "failed: {}", reply.message);
    }
    Some(OrderResult {
        id: o.id,
        ok: reply.ok,
        message: reply.message,
    })
}

const WATCHED_MS: u32 = crate::agent::live::WATCHED_INTERVAL_MS;
/// How long an order waits for the recorder of its session to reconnect.
const RECONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether the session's recorder is connected now (or the session is not
/// one this agent knows as live: no point waiting).
fn connected(agent: &Agent, session: &str) -> bool {
    agent
        .spool
        .lock()
        .sessions
        .get(session)
        .is_none_or(|s| s.closed() || (s.connected && s.control.is_some()))
}

pub(crate) fn refused(message: String) -> ControlReply {
    ControlReply {
        ok: false,
        message,
        live: Vec::new(),
    }
}

fn live_row(s: &Session) -> LiveSession {
    let m = &s.open.meta;
    LiveSession {
        session_id: s.id().to_string(),
        user: s.open.peer_user.clone(),
        uid: s.uid(),
        client: crate::cli::sessions::client_of(m),
        auth: crate::cli::sessions::auth_of(m),
        command: crate::cli::sessions::command_of(m),
        mode: m.mode.clone(),
        opened_unix_ms: s.open.opened_unix_ms,
        last_activity_unix_ms: s.activity.last_unix_ms.max(s.open.opened_unix_ms),
        bytes: s.activity.bytes,
        tty: m.tty.clone(),
    }
}

fn list_live(agent: &Agent) -> ControlReply {
    let live: Vec<LiveSession> = agent
        .spool
        .lock()
        .sessions
        .values()
        .filter(|s| !s.closed() && s.connected)
        .map(live_row)
        .collect();
    ControlReply {
        ok: true,
        message: format!("listed {} live sessions", live.len()),
        live,
    }
}

/// The one live session `name` names: its id, or a fragment of exactly one.
pub(crate) fn find_live(agent: &Agent, name: &str) -> Result<LiveSession, String> {
    let cat = agent.spool.lock();
    let live: Vec<&Session> = cat.sessions.values().filter(|s| !s.closed()).collect();
    if let Some(s) = live.iter().find(|s| s.id() == name) {
        return Ok(live_row(s));
    }
    if name.len() < 4 {
        return Err(format!(
            "{name:?}: name a session by its id or at least 4 characters of it"
        ));
    }
    let found: Vec<&&Session> = live.iter().filter(|s| s.id().contains(name)).collect();
    match found.as_slice() {
        [s] => Ok(live_row(s)),
        [] => Err(format!("no live session matches {name:?} on this host")),
        many => Err(format!(
            "{name:?} matches {} live sessions: {}",
            many.len(),
            many.iter().map(|s| s.id()).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn kill(agent: &Agent, who: &str, k: shelltrail_proto::v1::Kill) -> ControlReply {
    let reason = k.reason.trim().to_string();
    if reason.is_empty() {
        return refused("say why: --reason TEXT (it is shown to the user and recorded)".into());
    }
    let row = match find_live(agent, &k.session) {
        Ok(r) => r,
        Err(why) => return refused(why),
    };
    // What the user controls (their command, say) is shown, never raw: it
    // goes into the audit log and onto the administrator's terminal.
    let user = shown(&row.user).into_owned();
    let mut lock_note = String::new();
    let mut also = Vec::new();
    if k.lock {
        let secs = i64::try_from(k.lock_secs).unwrap_or(i64::MAX / 2000);
        let until = (k.lock_secs > 0).then(|| now_ms().saturating_add(secs.saturating_mul(1000)));
        let lock = Lock {
            user: row.user.clone(),
            by: who.to_string(),
            reason: reason.clone(),
            since_unix_ms: now_ms(),
            until_unix_ms: until,
        };
        if let Err(e) = agent.locks.set(row.uid, Some(lock)) {
            return refused(format!("cannot record the lock in {}: {e}", agent.locks.path.display()));
        }
        lock_note = match until {
            Some(u) => format!("; {user} locked out until {}", crate::cli::utc(u)),
            None => format!("; {user} locked out until `shelltrail unlock {user}`"),
        };
        // A lock is about the user: their other live sessions end too.
        also = agent
            .spool
            .lock()
            .sessions
            .values()
            .filter(|s| !s.closed() && s.uid() == row.uid && s.id() != row.session_id)
            .map(|s| s.id().to_string())
            .collect();
    }
    let end = |id: &str| {
        agent
            .spool
            .lock()
            .sessions
            .get(id)
            .and_then(|s| s.control.clone())
            .is_some_and(|tx| {
                tx.send(ToSession::End(Ended {
                    by: who.to_string(),
                    reason: reason.clone(),
                }))
                .is_ok()
            })
    };
    let sent = end(&row.session_id);
    let others: Vec<String> = also.iter().filter(|id| end(id)).cloned().collect();
    if others.len() < also.len() {
        lock_note.push_str(&format!(
            "; {} other session(s) of {user} could not be reached now: {}",
            also.len() - others.len(),
            also.iter()
                .filter(|id| !others.contains(id))
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !others.is_empty() {
        lock_note.push_str(&format!("; also ended: {}", others.join(", ")));
    }
    if !sent {
        return ControlReply {
            ok: false,
            message: format!(
                "session {} of {user} is not connected to the agent right now (its recorder is reconnecting); \
                 try again in a few seconds{lock_note}",
                row.session_id
            ),
            live: Vec::new(),
        };
    }
    ControlReply {
        ok: true,
        message: format!(
            "ended session {} of {user} ({}, {}): {}{lock_note}",
            row.session_id,
            shown(&row.client),
            shown(&row.command),
            shown(&reason)
        ),
        live: vec![row],
    }
}

fn unlock(agent: &Agent, who: &str, user: &str) -> ControlReply {
    let uid = match user.strip_prefix("uid:") {
        Some(n) => n.parse::<u32>().ok(),
        None => nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw()),
    };
    let Some(uid) = uid else {
        return refused(format!("no such user: {:?}", shown(user)));
    };
    match agent.locks.set(uid, None) {
        Ok(Some(old)) => ControlReply {
            ok: true,
            message: format!(
                "unlocked {user} (locked by {}: {}); unlocked by {who}",
                old.by, old.reason
            ),
            live: Vec::new(),
        },
        Ok(None) => refused(format!("{} is not locked", shown(user))),
        Err(e) => refused(format!(
            "cannot record the unlock in {}: {e}",
            agent.locks.path.display()
        )),
    }
}
