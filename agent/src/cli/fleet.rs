//! Live response through a collector (`--collector URL`): the fleet's live
//! sessions, tailing one from anywhere, ending one on its host, unlocking a
//! user, and the collector's audit log. The collector decides who may (the
//! view and respond roles of the operator's certificate) and records every
//! call; this side asks, prints, and keeps a tail going across lost
//! connections.

use crate::cli::live::{Printer, idle};
use crate::cli::shown::{json_for_terminal, shown};
use crate::cli::{Source, status_failure, utc};
use anyhow::{Context, Result, bail};
use shelltrail_proto::v1::{
    AuditRequest, KillRequest, ListSessionsRequest, SessionInfo, TailRequest, UnlockRequest, list_sessions_request,
    order_reply, tail_request,
};
use std::io::Write;
use std::time::{Duration, Instant};

fn collector(
    src: &mut Source,
) -> Result<(
    &tokio::runtime::Runtime,
    &mut shelltrail_proto::v1::query_client::QueryClient<tonic::transport::Channel>,
    &str,
)> {
    src.collector().context("this needs a collector: --collector URL")
}

/// Filters of `sessions --live` through a collector.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub host: Option<String>,
    pub user: Option<String>,
    pub since_unix_ms: Option<i64>,
}

/// One row of `sessions --live --collector URL --json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct FleetRow {
    pub id: String,
    pub host: String,
    /// Whether the host's agent is connected to the collector now.
    pub host_connected: bool,
    pub user: String,
    pub uid: u32,
    pub client: String,
    pub auth: String,
    pub command: String,
    pub mode: String,
    pub start_unix_ms: i64,
    /// Milliseconds since the session last recorded anything, as far as
    /// the collector holds it.
    pub idle_ms: i64,
    /// Bytes the collector stores of it so far (compressed).
    pub stored_bytes: u64,
    /// A break-glass login.
    pub break_glass: bool,
}

fn fleet_row(i: &SessionInfo, now: i64) -> FleetRow {
    let start = i.start.clone().unwrap_or_default();
    let m = start.meta.unwrap_or_default();
    FleetRow {
        id: m.session_id.clone(),
        host: i.host.clone(),
        host_connected: i.host_connected,
        user: start.verified_user.clone(),
        uid: start.verified_uid,
        client: crate::cli::sessions::client_of(&m),
        auth: crate::cli::sessions::auth_of(&m),
        command: crate::cli::sessions::command_of(&m),
        mode: m.mode.clone(),
        start_unix_ms: match start.opened_unix_ms {
            0 => m.start_unix_ms,
            t => t,
        },
        idle_ms: (now - i.last_activity_unix_ms).max(0),
        stored_bytes: i.stored_bytes,
        break_glass: m.break_glass,
    }
}

/// The sessions not ended at the collector that match `f`, newest first.
fn live_sessions(src: &mut Source, f: &Filter) -> Result<Vec<SessionInfo>> {
    let (rt, client, url) = collector(src)?;
    let filter = ListSessionsRequest {
        host: f.host.clone().unwrap_or_default(),
        user: f.user.clone().unwrap_or_default(),
        since_unix_ms: f.since_unix_ms.unwrap_or(0),
        state: list_sessions_request::State::Live.into(),
        ..Default::default()
    };
    crate::cli::list_pages(rt, client, url, filter)
}

/// `sessions --live --collector URL [--host H] [--user U] [--since D]`.
pub fn list(src: &mut Source, f: &Filter, json: bool, out: &mut impl Write) -> Result<()> {
    let now = crate::agent::server::now_ms();
    let rows: Vec<FleetRow> = live_sessions(src, f)?.iter().map(|i| fleet_row(i, now)).collect();
    if json {
        writeln!(out, "{}", json_for_terminal(&serde_json::to_string_pretty(&rows)?))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<36}  {:<16} {:<12} {:<21} {:<19} {:>8} {:>10} {:<5} COMMAND  [AUTH]",
        "ID", "HOST", "USER", "CLIENT", "START (UTC)", "IDLE", "STORED", "MODE"
    )?;
    for r in &rows {
        let host = if r.host_connected {
            shown(&r.host).into_owned()
        } else {
            format!("{}(offline)", shown(&r.host))
        };
        writeln!(
            out,
            "{:<36}  {:<16} {:<12} {:<21} {:<19} {:>8} {:>10} {:<5} {}  [{}]",
            shown(&r.id),
            host,
            shown(&r.user),
            shown(&r.client),
            utc(r.start_unix_ms),
            idle(r.idle_ms),
            r.stored_bytes,
            shown(&r.mode),
            if r.break_glass {
                format!("[BREAK-GLASS] {}", shown(&r.command))
            } else {
                shown(&r.command).into_owned()
            },
            shown(&r.auth),
        )?;
    }
    if rows.is_empty() {
        writeln!(out, "(no live sessions)")?;
    } else if rows.iter().any(|r| !r.host_connected) {
        writeln!(
            out,
            "(offline: the host's agent is not connected to the collector; its session may have ended there)"
        )?;
    }
    Ok(())
}

/// The one live session `name` names at the collector: a full id, or a
/// fragment (4 or more characters, anywhere in the id) of exactly one.
pub fn resolve_live(src: &mut Source, name: &str) -> Result<SessionInfo> {
    let name = name.trim().to_ascii_lowercase();
    if name.len() < 4 {
        bail!(
            "{:?}: name a session by its id or at least 4 characters of it",
            shown(&name)
        );
    }
    let live = live_sessions(src, &Filter::default())?;
    let id = |i: &SessionInfo| {
        i.start
            .as_ref()
            .and_then(|s| s.meta.as_ref())
            .map_or(String::new(), |m| m.session_id.clone())
    };
    if let Some(i) = live.iter().find(|i| id(i) == name) {
        return Ok(i.clone());
    }
    let found: Vec<&SessionInfo> = live.iter().filter(|i| id(i).contains(&name)).collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("no live session at the collector matches {:?}", shown(&name)),
        many => bail!(
            "{:?} matches {} live sessions: {}",
            shown(&name),
            many.len(),
            many.iter().map(|i| id(i)).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The session id of `info`.
fn id_of(info: &SessionInfo) -> String {
    info.start
        .as_ref()
        .and_then(|s| s.meta.as_ref())
        .map_or(String::new(), |m| m.session_id.clone())
}

/// Whether a failed tail call is worth trying again: the link or the
/// collector went away, not a refusal.
fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Internal
            | tonic::Code::Aborted
    )
}

/// How long a tail keeps trying to reconnect before it gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(300);

/// `tail ID --collector URL [--raw] [--from-start]`: through the collector,
/// from any machine; resumes where it was after a lost connection (each
/// update names the next chunk), saying so on stderr.
pub fn tail(src: &mut Source, name: &str, raw: bool, from_start: bool) -> Result<i32> {
    use std::io::IsTerminal;
    let info = resolve_live(src, name).or_else(|e| {
        // An ended session can be tailed too: its last screen and end.
        if name.len() == 36 {
            Ok(SessionInfo {
                start: Some(shelltrail_proto::v1::SessionStart {
                    meta: Some(shelltrail_proto::v1::SessionMeta {
                        session_id: name.to_ascii_lowercase(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
        } else {
            Err(e)
        }
    })?;
    let id = id_of(&info);
    let (rt, client, url) = collector(src)?;
    let out = std::io::stdout().lock();
    let tty = out.is_terminal();
    let mut printer = Printer::new(out, tty, raw);
    if !info.host.is_empty() {
        eprint!(
            "shelltrail tail: session {id} on {} (through {url})\r\n",
            shown(&info.host)
        );
    }
    let mut next: Option<u64> = None;
    let mut lost_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let (start, from_seq) = match next {
            Some(n) => (tail_request::Start::Resume, n),
            None if from_start => (tail_request::Start::FromStart, 0),
            None => (tail_request::Start::Screen, 0),
        };
        let req = TailRequest {
            session_id: id.clone(),
            start: start.into(),
            from_seq,
            raw,
        };
        let result: Result<(), tonic::Status> = rt.block_on(async {
            let mut stream = client.tail(req).await?.into_inner();
            if let Some(since) = lost_since.take() {
                eprint!(
                    "\r\nshelltrail tail: reconnected after {:.1} s; resuming at chunk {}\r\n",
                    since.elapsed().as_secs_f64(),
                    from_seq
                );
            }
            backoff = Duration::from_millis(100);
            while let Some(u) = stream.message().await? {
                for f in u.frames {
                    if !printer
                        .frame(f)
                        .map_err(|e| tonic::Status::cancelled(format!("output: {e}")))?
                    {
                        return Ok(());
                    }
                }
                next = Some(u.next_seq);
            }
            Ok(())
        });
        match result {
            Ok(()) if printer.ended.is_some() => break,
            Err(s) if s.message().starts_with("output: ") => return Ok(0),
            Err(s) if !retryable(&s) => return Err(status_failure(url, &s)),
            // The link or the collector went away (a stream that ends
            // without the session's end too: a collector restarting).
            other => {
                let why = match other {
                    Err(s) => shown(s.message()).into_owned(),
                    Ok(()) => "the collector ended the stream".into(),
                };
                match lost_since {
                    None => {
                        eprint!("\r\nshelltrail tail: lost the connection to the collector ({why}); reconnecting\r\n");
                        lost_since = Some(Instant::now());
                    }
                    Some(since) if since.elapsed() > RECONNECT_FOR => bail!(
                        "lost the collector at {url} and could not reconnect for {} s: {why}",
                        RECONNECT_FOR.as_secs()
                    ),
                    Some(_) => {}
                }
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    let code = printer.ended.unwrap_or(-1);
    eprint!("\r\nshelltrail tail: the session ended (exit {code})\r\n");
    Ok(0)
}

/// Prints an order's outcome; 0 done, 1 refused or failed, 2 queued.
fn order_outcome(reply: shelltrail_proto::v1::OrderReply) -> i32 {
    match (reply.state(), reply.ok) {
        (order_reply::State::Queued, _) => {
            eprintln!("{}", shown(&reply.message));
            2
        }
        (_, true) => {
            println!("{}", shown(&reply.message));
            0
        }
        (_, false) => {
            eprintln!("error: {}", shown(&reply.message));
            1
        }
    }
}

/// `kill ID --reason TEXT [--lock [--for D]] --collector URL`.
pub fn kill(src: &mut Source, name: &str, reason: &str, lock: bool, lock_for: Option<Duration>) -> Result<i32> {
    let info = resolve_live(src, name)?;
    let id = id_of(&info);
    let (rt, client, url) = collector(src)?;
    let reply = rt
        .block_on(client.kill(KillRequest {
            session_id: id,
            reason: reason.to_string(),
            lock: lock || lock_for.is_some(),
            lock_secs: lock_for.map_or(0, |d| d.as_secs().max(1)),
        }))
        .map_err(|s| status_failure(url, &s))?
        .into_inner();
    Ok(order_outcome(reply))
}

/// `unlock USER --host HOST --collector URL`.
pub fn unlock(src: &mut Source, host: &str, user: &str) -> Result<i32> {
    let (rt, client, url) = collector(src)?;
    let reply = rt
        .block_on(client.unlock(UnlockRequest {
            host: host.to_string(),
            user: user.to_string(),
        }))
        .map_err(|s| status_failure(url, &s))?
        .into_inner();
    Ok(order_outcome(reply))
}

/// One row of `audit --json`.
#[derive(Debug, serde::Serialize)]
struct AuditRow {
    unix_ms: i64,
    who: String,
    from: String,
    action: String,
    session_id: String,
    host: String,
    detail: String,
    allowed: bool,
}

/// `audit [--session ID] [--limit N] [--json] --collector URL`.
pub fn audit(src: &mut Source, session: Option<&str>, limit: u32, json: bool, out: &mut impl Write) -> Result<()> {
    let (rt, client, url) = collector(src)?;
    let entries = rt
        .block_on(client.audit(AuditRequest {
            session_id: session.unwrap_or_default().to_ascii_lowercase(),
            limit,
        }))
        .map_err(|s| status_failure(url, &s))?
        .into_inner()
        .entries;
    if json {
        let rows: Vec<AuditRow> = entries
            .into_iter()
            .map(|e| AuditRow {
                unix_ms: e.unix_ms,
                who: e.who,
                from: e.from,
                action: e.action,
                session_id: e.session_id,
                host: e.host,
                detail: e.detail,
                allowed: e.allowed,
            })
            .collect();
        writeln!(out, "{}", json_for_terminal(&serde_json::to_string_pretty(&rows)?))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<19}  {:<16} {:<21} {:<7} {:<8} {:<36}  {:<16} DETAIL",
        "TIME (UTC)", "WHO", "FROM", "ALLOWED", "ACTION", "SESSION", "HOST"
    )?;
    for e in &entries {
        writeln!(
            out,
            "{:<19}  {:<16} {:<21} {:<7} {:<8} {:<36}  {:<16} {}",
            utc(e.unix_ms),
            shown(&e.who),
            shown(&e.from),
            if e.allowed { "yes" } else { "REFUSED" },
            shown(&e.action),
            shown(&e.session_id),
            shown(&e.host),
            shown(&e.detail),
        )?;
    }
    if entries.is_empty() {
        writeln!(out, "(no entries)")?;
    }
    Ok(())
}
