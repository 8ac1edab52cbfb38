//! `shelltrail sessions`: who, what, when, where, from the spool or the collector.
//!
//! Who and when are the agent's: the user it verified and the times it saw
//! the session open and end. What the recorder said (its login name, its
//! clock) is a claim, kept in the JSON but never shown as the fact. Every
//! field is printed through [`shown`].

use crate::agent::spool::SessionEntry;
use crate::cli::shown::{json_for_terminal, shown};
use crate::cli::{ChunkBytes, utc};
use shelltrail_proto::v1::{Close, SessionInfo, SessionMeta};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// One row of the listing; also the `--json` shape.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub id: String,
    /// The agent's word (SO_PEERCRED), not the recorder's.
    pub user: String,
    pub uid: u32,
    pub pid: i32,
    pub host: String,
    pub client: String,
    pub mode: String,
    pub command: String,
    pub reason: String,
    /// When the agent saw the session open.
    pub start_unix_ms: i64,
    /// The recorder's own start time: a claim.
    #[serde(default)]
    pub claimed_start_unix_ms: i64,
    /// When the agent recorded the session's end.
    pub end_unix_ms: Option<i64>,
    pub duration_ms: i64,
    pub stored_bytes: u64,
    pub bytes_out: u64,
    /// No end recorded and its recorder is running.
    pub live: bool,
    /// The collector holds the whole session (read from a spool; a
    /// collector's own rows are always whole).
    #[serde(default)]
    pub shipped: bool,
    pub exit_status: Option<i32>,
    pub end_cause: Option<String>,
    pub chunks: usize,
    pub lost_chunks: usize,
    /// Chunks the recorder had to drop (memory full while the agent was away).
    pub lost_seqs: Vec<u64>,
    /// The last chunk's seq, from the session's end record.
    pub last_seq: Option<u64>,
    /// Why the collector flagged the session, if it did: refused, storage
    /// damaged, or a seal that does not check out.
    #[serde(default)]
    pub quarantine: String,
    /// Why the agent quarantined the session as damaged in its spool, if it
    /// did (never shipped; kept for inspection).
    #[serde(default)]
    pub damaged: String,
    /// A break-glass login (`shelltrail-shell --break-glass`).
    #[serde(default)]
    pub break_glass: bool,
}

impl Row {
    /// Whether the recording's first chunk (with the header) is absent from
    /// `chunks`: shipped and deleted from the spool, typically.
    pub fn first_chunk_missing(&self, chunks: &[ChunkBytes]) -> bool {
        chunks.first().is_some_and(|(seq, _)| *seq != 0)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the agent verified: the user, pid and open time.
struct Verified<'a> {
    user: &'a str,
    uid: u32,
    pid: i32,
    opened_unix_ms: i64,
}

/// How listings show where a session came from: `address:port`, or
/// `local` for one not started by sshd.
pub fn client_of(meta: &SessionMeta) -> String {
    if meta.client_addr.is_empty() {
        "local".into()
    } else {
        format!("{}:{}", meta.client_addr, meta.client_port)
    }
}

/// How listings show what a session ran: the client's command, or
/// `(shell)` for a login shell.
pub fn command_of(meta: &SessionMeta) -> String {
    if meta.original_command.is_empty() {
        "(shell)".into()
    } else {
        meta.original_command.clone()
    }
}

/// How live listings show how the user logged in: method and key, or the
/// certificate's key id (ExposeAuthInfo; a claim of sshd's, via the user's file).
pub fn auth_of(meta: &SessionMeta) -> String {
    meta.auth.as_ref().map_or(String::new(), |a| {
        if a.cert_key_id.is_empty() {
            format!("{} {}", a.method, a.key_fingerprint).trim().to_string()
        } else {
            format!("{} cert {:?} {}", a.method, a.cert_key_id, a.key_fingerprint)
        }
    })
}

/// What both sources share: the recorder's metadata, the agent's word, the end.
fn build(
    meta: &SessionMeta,
    host: &str,
    v: Verified<'_>,
    close: Option<(&Close, &str, i64)>,
    stored_bytes: u64,
    chunks: usize,
) -> Row {
    let Verified {
        user,
        uid,
        pid,
        opened_unix_ms,
    } = v;
    // The agent's times; the recorder's only where an old record lacks them.
    let start = if opened_unix_ms > 0 {
        opened_unix_ms
    } else {
        meta.start_unix_ms
    };
    let end = close.map(|(c, _, closed)| if closed > 0 { closed } else { c.end_unix_ms });
    Row {
        id: meta.session_id.clone(),
        user: if user.is_empty() {
            format!("uid:{uid}")
        } else {
            user.to_string()
        },
        uid,
        pid,
        host: if host.is_empty() {
            meta.host.clone()
        } else {
            host.to_string()
        },
        client: client_of(meta),
        mode: meta.mode.clone(),
        command: command_of(meta),
        reason: meta.reason.clone(),
        break_glass: meta.break_glass,
        start_unix_ms: start,
        claimed_start_unix_ms: meta.start_unix_ms,
        end_unix_ms: end,
        duration_ms: (end.unwrap_or_else(now_ms) - start).max(0),
        stored_bytes,
        bytes_out: close.map_or(0, |(c, _, _)| c.bytes_out),
        live: close.is_none(),
        shipped: false,
        exit_status: close.map(|(c, _, _)| c.exit_status),
        end_cause: close.map(|(_, cause, _)| cause.to_string()),
        chunks,
        lost_chunks: close.map_or(0, |(c, _, _)| c.lost_seqs.len()),
        lost_seqs: close.map_or_else(Vec::new, |(c, _, _)| c.lost_seqs.clone()),
        last_seq: close.map(|(c, _, _)| c.last_seq),
        quarantine: String::new(),
        damaged: String::new(),
    }
}

pub fn from_spool(s: &SessionEntry) -> Row {
    let close = s.close.as_ref().map(|c| (&c.close, c.cause.as_str(), c.closed_unix_ms));
    let mut row = build(
        &s.open.meta,
        "",
        Verified {
            user: &s.open.peer_user,
            uid: s.open.peer_uid,
            pid: s.open.peer_pid,
            opened_unix_ms: s.open.opened_unix_ms,
        },
        close,
        s.stored_bytes(),
        s.chunks.len(),
    );
    row.damaged = s.damaged.clone().unwrap_or_default();
    row.shipped = s.shipped;
    // Live exactly while its recorder runs: one that died without an end
    // is not live, whatever the agent has had time to record about it.
    if row.live && !crate::agent::server::alive(s.open.peer_pid, s.open.peer_start_ticks) {
        row.live = false;
    }
    row
}

pub fn from_collector(i: &SessionInfo) -> Row {
    let start = i.start.clone().unwrap_or_default();
    let meta = start.meta.clone().unwrap_or_default();
    let default_close = Close::default();
    let close = i.end.as_ref().map(|e| {
        (
            e.close.as_ref().unwrap_or(&default_close),
            e.cause.as_str(),
            e.closed_unix_ms,
        )
    });
    let mut row = build(
        &meta,
        &i.host,
        Verified {
            user: &start.verified_user,
            uid: start.verified_uid,
            pid: start.verified_pid,
            opened_unix_ms: start.opened_unix_ms,
        },
        close,
        i.stored_bytes,
        i.next_seq as usize - i.missing_seqs.len().min(i.next_seq as usize),
    );
    row.quarantine = i.quarantine.clone();
    row
}

pub fn run(rows: &[Row], json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        let text = serde_json::to_string_pretty(rows)?;
        writeln!(out, "{}", json_for_terminal(&text))?;
        return Ok(());
    }
    // Login names run to 32 characters; the column is as wide as the longest shown.
    let uw = rows
        .iter()
        .map(|r| shown(&r.user).chars().count())
        .max()
        .unwrap_or(0)
        .clamp(4, 32);
    writeln!(
        out,
        "{:<36}  {:<uw$} {:<16} {:<21} {:<19} {:>9} {:>10} {:<7} COMMAND",
        "ID", "USER", "HOST", "CLIENT", "START (UTC)", "DURATION", "STORED", "STATE"
    )?;
    for r in rows {
        let state = match (r.live, r.exit_status) {
            _ if !r.damaged.is_empty() => "damaged".to_string(),
            // Refused, damaged, or a seal that does not check out: see `verify`.
            _ if !r.quarantine.is_empty() => "flagged".to_string(),
            _ if r.end_cause.as_deref().is_some_and(|c| c.starts_with("stopped")) => "stopped".to_string(),
            (true, _) => "live".to_string(),
            _ if r.shipped => "shipped".to_string(),
            // No end recorded, recorder gone: the agent records its end soon.
            (false, None) => "gone".to_string(),
            (false, Some(-1)) => "lost".to_string(),
            (false, Some(c)) => format!("exit {c}"),
        };
        let mut cmd = cut(&shown(&r.command), 60);
        if r.break_glass {
            cmd.insert_str(0, "[BREAK-GLASS] ");
        }
        if r.lost_chunks > 0 {
            cmd.push_str(&format!("  [gap: {} chunks lost]", r.lost_chunks));
        }
        let host = cut(&shown(&r.host), 16);
        writeln!(
            out,
            "{:<36}  {:<uw$} {:<16} {:<21} {:<19} {:>9} {:>10} {:<7} {}",
            shown(&r.id),
            shown(&r.user),
            host,
            shown(&r.client),
            utc(r.start_unix_ms),
            duration(r.duration_ms),
            r.stored_bytes,
            state,
            cmd
        )?;
    }
    Ok(())
}

/// `s`, or its first `max - 1` characters and an ellipsis.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() > max {
        s.chars().take(max - 1).chain(std::iter::once('…')).collect()
    } else {
        s.to_owned()
    }
}

fn duration(ms: i64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}.{}s", s, ms % 1000 / 100)
    }
}
