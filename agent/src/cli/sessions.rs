//! `shelltrail sessions`: who, what, when, where, from the spool.

use crate::agent::spool::SessionEntry;
use crate::cli::{Store, utc};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// One row of the listing; also the `--json` shape.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub id: String,
    pub user: String,
    pub uid: u32,
    pub host: String,
    pub client: String,
    pub mode: String,
    pub command: String,
    pub reason: String,
    pub start_unix_ms: i64,
    pub duration_ms: i64,
    pub stored_bytes: u64,
    pub bytes_out: u64,
    pub live: bool,
    pub exit_status: Option<i32>,
    pub end_cause: Option<String>,
    pub chunks: usize,
    pub lost_chunks: usize,
}

pub fn row(s: &SessionEntry) -> Row {
    let m = &s.open.meta;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let end = s.close.as_ref().map_or(now, |c| {
        if c.close.end_unix_ms > 0 {
            c.close.end_unix_ms
        } else {
            c.closed_unix_ms
        }
    });
    Row {
        id: m.session_id.clone(),
        // The agent's word (SO_PEERCRED), not the recorder's.
        user: if s.open.peer_user.is_empty() {
            format!("uid:{}", s.open.peer_uid)
        } else {
            s.open.peer_user.clone()
        },
        uid: s.open.peer_uid,
        host: m.host.clone(),
        client: if m.client_addr.is_empty() {
            "local".into()
        } else {
            format!("{}:{}", m.client_addr, m.client_port)
        },
        mode: m.mode.clone(),
        command: if m.original_command.is_empty() {
            "(shell)".into()
        } else {
            m.original_command.clone()
        },
        reason: m.reason.clone(),
        start_unix_ms: m.start_unix_ms,
        duration_ms: (end - m.start_unix_ms).max(0),
        stored_bytes: s.stored_bytes(),
        bytes_out: s.close.as_ref().map_or(0, |c| c.close.bytes_out),
        live: s.close.is_none(),
        exit_status: s.close.as_ref().map(|c| c.close.exit_status),
        end_cause: s.close.as_ref().map(|c| c.cause.clone()),
        chunks: s.chunks.len(),
        lost_chunks: s.close.as_ref().map_or(0, |c| c.close.lost_seqs.len()),
    }
}

pub fn run(store: &Store, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let rows: Vec<Row> = store.index.sessions.values().map(row).collect();
    for p in &store.index.problems {
        eprintln!("warning: {p}");
    }
    if json {
        serde_json::to_writer_pretty(&mut *out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<36}  {:<12} {:<21} {:<19} {:>9} {:>10} {:<7} COMMAND",
        "ID", "USER", "CLIENT", "START (UTC)", "DURATION", "STORED", "STATE"
    )?;
    for r in rows {
        let state = match (r.live, r.exit_status) {
            (true, _) => "live".to_string(),
            (false, Some(-1)) => "lost".to_string(),
            (false, Some(c)) => format!("exit {c}"),
            (false, None) => "ended".to_string(),
        };
        let mut cmd: String = r.command.chars().filter(|c| !c.is_control()).take(60).collect();
        if r.lost_chunks > 0 {
            cmd.push_str(&format!("  [gap: {} chunks lost]", r.lost_chunks));
        }
        writeln!(
            out,
            "{:<36}  {:<12} {:<21} {:<19} {:>9} {:>10} {:<7} {}",
            r.id,
            r.user,
            r.client,
            utc(r.start_unix_ms),
            duration(r.duration_ms),
            r.stored_bytes,
            state,
            cmd
        )?;
    }
    Ok(())
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
