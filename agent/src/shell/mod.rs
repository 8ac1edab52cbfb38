//! `shelltrail-shell`: the recorder sshd runs for every session.
//!
//! The data path, in the order a byte travels:
//! [`command`] decides what to run → [`pty`] or [`pipes`] run it and copy its
//! bytes → [`record`] encodes them as asciicast v3 and cuts zstd chunks →
//! [`link`] delivers the chunks to the agent and holds them until acked.

pub mod command;
pub mod fallback;
pub mod link;
pub mod meta;
pub mod pipes;
pub mod privsep;
pub mod pty;
pub mod record;
pub mod syslog;

use crate::config::{Config, Trust, Unavailable};
use crate::sys;
use anyhow::Context;
use shelltrail_cast::asciicast::Header;
use shelltrail_proto::v1::{Close, SessionMeta, TransferSummary};
use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A terminal taken this long after exec is marked in the recording: the
/// recorder was stopped (SIGSTOP by the user) or starved before it took it.
const TAKEOVER_SLOW: Duration = Duration::from_millis(500);

/// Environment variable a client can send (Debian's sshd accepts `LC_*`) to give the reason up front.
pub const REASON_VAR: &str = "LC_SHELLTRAIL_REASON";

/// How a session ended.
pub struct Outcome {
    /// 0-255, 128+N when killed by signal N.
    pub code: i32,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub transfer: Option<TransferSummary>,
}

/// The process exit code for a child's status: its code, or 128+N for signal N.
pub fn exit_code(st: ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Tells the user why the session cannot start, logs it, and gives the exit code.
fn refuse(msg: &str) -> i32 {
    let _ = writeln!(std::io::stderr(), "shelltrail: {msg}");
    syslog::error(msg);
    1
}

const USAGE: &str = "\
shelltrail-shell: records an SSH session (the ForceCommand or login shell sshd runs)

usage: shelltrail-shell [--config PATH] [--break-glass] [-c COMMAND]

  --config PATH   configuration file (default /etc/shelltrail/shelltrail.toml; root's only)
  --break-glass   for members of [shell] break_glass_group: never refused because the agent
                  is away; recorded to fallback_dir meanwhile, logged loudly
  -c COMMAND      run COMMAND (as sshd does for an exec request) instead of the login shell

Installed set-uid to the recorder's system user; see docs/deployment.md.";

/// Entry point of the `shelltrail-shell` binary; returns the process exit code.
pub fn main() -> i32 {
    // Nothing else is read or taken for this: sshd never runs the recorder so.
    let argv: Vec<OsString> = std::env::args_os().collect();
    if argv.len() == 2 && matches!(argv[1].to_str(), Some("--help" | "-h")) {
        println!("{USAGE}");
        return 0;
    }
    // sshd always sets SSH_CONNECTION; without it nobody else's session is at stake.
    let local_use = std::env::var_os("SSH_CONNECTION").is_none();
    // First, while this process has one thread and before it reads anything
    // the user controls: take the terminal and fork the signaller.
    let mut sep = match privsep::start(local_use) {
        Ok(s) => s,
        Err(e) => return refuse(&format!("{e}; login refused")),
    };
    if let Err(e) = sys::set_non_dumpable() {
        return refuse(&format!("cannot protect the recorder from tracing: {e}; login refused"));
    }
    let args: Vec<OsString> = std::env::args_os().collect();
    let inv = match command::parse_args(&args) {
        Ok(i) => i,
        Err(e) => return refuse(&e.to_string()),
    };
    // A set-uid recorder trusts only root's files, in or out of SSH: the
    // caller must not steer a process running as the recorder user.
    let trust = if local_use && !sep.separated() {
        Trust::Local
    } else {
        Trust::Sshd
    };
    let cfg = match Config::load_trusted(inv.config.as_deref(), trust) {
        Ok(c) => c,
        Err(e) => return refuse(&format!("{e}; login refused")),
    };
    if let Some(rec) = sep.recorder_uid() {
        let configured = nix::unistd::User::from_name(&cfg.recorder_user).ok().flatten();
        if configured.as_ref().map(|u| u.uid) != Some(rec) {
            return refuse(&format!(
                "shelltrail-shell is set-uid to uid {rec}, but recorder_user is {:?}{}; login refused",
                cfg.recorder_user,
                configured.map_or(" (no such user)".to_string(), |u| format!(" (uid {})", u.uid))
            ));
        }
    }
    match session(&inv, &cfg, &mut sep) {
        Ok(code) => code,
        Err(e) => refuse(&format!("{e:#}")),
    }
}

/// Whether `user` is in the break-glass group (its primary group, or a member).
fn break_glass_member(user: &nix::unistd::User, group: &str) -> bool {
    nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .is_some_and(|g| g.gid == user.gid || g.mem.contains(&user.name))
}

fn session(inv: &command::Invocation, cfg: &Config, sep: &mut privsep::Separation) -> anyhow::Result<i32> {
    let uid = sep.user;
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .with_context(|| format!("uid {uid} has no passwd entry"))?;
    let original = std::env::var("SSH_ORIGINAL_COMMAND").ok();
    let sftp_server = cfg.shell.sftp_server();
    let plan = command::plan(
        inv,
        &command::Context {
            original_command: original.as_deref(),
            passwd_shell: &user.shell,
            real_shell: &cfg.shell.real_shell,
            sftp_server: &sftp_server,
        },
    );
    let tty = std::io::stdin().is_terminal();
    let summarise = plan.transfer.filter(|_| !cfg.shell.record_transfer_payloads);
    let record_input = cfg.shell.record_input && summarise.is_none();

    let mut meta = SessionMeta {
        session_id: uuid::Uuid::now_v7().to_string(),
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        user: user.name.clone(),
        uid: uid.as_raw(),
        tty: std::env::var("SSH_TTY").unwrap_or_default(),
        mode: match (tty, summarise) {
            (_, Some(_)) => "transfer",
            (true, None) => "pty",
            (false, None) => "exec",
        }
        .into(),
        command: std::iter::once(plan.program.display().to_string())
            .chain(plan.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
        original_command: original.clone().or_else(|| inv.command.clone()).unwrap_or_default(),
        start_unix_ms: now_ms(),
        input_recorded: record_input,
        payload_recorded: summarise.is_none(),
        recorder_version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    if let Ok(c) = std::env::var("SSH_CONNECTION") {
        meta::apply_ssh_connection(&mut meta, &c);
    }
    // sshd's file is the user's (0600): read it as them. It is a claim anyway.
    if let Some(auth) = std::env::var("SSH_USER_AUTH")
        .ok()
        .and_then(|p| sep.as_user_fs(|| meta::read_auth_file(&p)))
    {
        meta.auth = Some(auth);
    }
    if inv.break_glass {
        if !break_glass_member(&user, &cfg.shell.break_glass_group) {
            return Ok(refuse(&format!(
                "--break-glass is for members of the group {:?} ([shell] break_glass_group); {} is not one",
                cfg.shell.break_glass_group, user.name
            )));
        }
        meta.break_glass = true;
        syslog::error(&format!(
            "BREAK-GLASS login: session {} of {} from {}",
            meta.session_id,
            user.name,
            if meta.client_addr.is_empty() {
                "this host"
            } else {
                meta.client_addr.as_str()
            }
        ));
    }
    if cfg.shell.require_reason {
        match reason(tty) {
            Some(r) => meta.reason = r,
            None => {
                return Ok(refuse(&format!(
                    "this host requires a reason (a ticket id) for every session. Interactive logins are \
                     asked for it; otherwise send it: {REASON_VAR}='TICKET-123' ssh -o SendEnv={REASON_VAR} ..."
                )));
            }
        }
    }

    let conn = match link::open(&cfg.socket, &meta, false) {
        Ok(c) => Some(c),
        // Not the agent being away: an administrator's decision, under any policy.
        Err(link::ConnectError::Locked(why)) => return Ok(refuse(&format!("Login refused: {why}"))),
        // Break-glass: in anyway, recorded to the fallback file meanwhile.
        Err(e) if inv.break_glass => {
            syslog::error(&format!("session {}: BREAK-GLASS: {e}", meta.session_id));
            None
        }
        Err(e) => match cfg.shell.on_agent_unavailable {
            Unavailable::Deny => {
                return Ok(refuse(&format!(
                    "{e}. Login refused: every session on this host must be recorded. Contact your administrator."
                )));
            }
            Unavailable::Allow => {
                syslog::warning(&format!(
                    "session {}: {e}; running it anyway (on_agent_unavailable = allow), recording into memory",
                    meta.session_id
                ));
                None
            }
        },
    };

    // Out of the user's reach from here (the agent saw our own uid).
    sep.shield()?;

    // The recording pipeline: copy loops -> recorder -> link -> agent.
    let start = Instant::now();
    let (cols, rows) = if tty { pty::outer_size() } else { (80, 24) };
    let mut header = Header::new(cols, rows);
    header.timestamp = Some((meta.start_unix_ms / 1000) as u64);
    header.command = plan.requested.clone();
    header.env.insert("SHELL".into(), plan.shell.display().to_string());
    if let Ok(term) = std::env::var("TERM") {
        header.env.insert("TERM".into(), term.clone());
        header.term.term_type = Some(term);
    }
    header.shelltrail = serde_json::to_value(&meta).ok();

    let budget = link::Budget::new(cfg.shell.buffer_bytes);
    // Bounded: if the recorder falls behind, output waits rather than memory growing.
    let (ev_tx, ev_rx) = mpsc::sync_channel(256);
    let (link_tx, link_rx) = mpsc::channel();
    let watched = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let link_thread = {
        let watched = watched.clone();
        let (socket, meta, budget, tx) = (cfg.socket.clone(), meta.clone(), budget.clone(), link_tx.clone());
        let timeout = Duration::from_secs(cfg.shell.close_timeout_secs);
        // The link records an administrator's end of the session (a marker).
        let events = ev_tx.clone();
        let fallback_dir = inv.break_glass.then(|| cfg.fallback_dir());
        std::thread::Builder::new().name("agent-link".into()).spawn(move || {
            let wiring = link::Wiring {
                tx,
                rx: link_rx,
                events,
                watched,
                fallback_dir,
            };
            link::run(socket, meta, conn, budget, wiring, timeout)
        })?
    };
    let (recycle_tx, recycle_rx) = mpsc::sync_channel(4);
    let link_guard = link_tx.clone();
    let recorder = {
        let settings = record::Settings {
            chunk_bytes: cfg.shell.chunk_bytes as usize,
            chunk_interval: Duration::from_millis(cfg.shell.chunk_interval_ms),
            watched,
            compression_level: cfg.shell.compression_level,
            // Break-glass never makes the user wait for the agent.
            wait_when_full: cfg.shell.on_agent_unavailable == Unavailable::Deny && !inv.break_glass,
        };
        let id = meta.session_id.clone();
        let recorder_budget = budget.clone();
        let channels = record::Channels {
            rx: ev_rx,
            recycle: recycle_tx,
            link: link_tx,
        };
        std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || record::run(&id, header, start, settings, channels, recorder_budget))?
    };

    let mut cmd = std::process::Command::new(&plan.program);
    cmd.arg0(&plan.arg0).args(&plan.args);
    // `$SHELL` is the real shell: programs that start it (script, an
    // editor's shell escape) get a shell, not a second recorder.
    cmd.env("SHELL", &plan.shell);
    // A consumed command (see `Plan::consumes_original`) is gone for the
    // session too: a recorder started inside cannot find it and run the
    // login's command again.
    if plan.consumes_original {
        cmd.env_remove("SSH_ORIGINAL_COMMAND");
    }
    if let Some(delay) = sep.takeover_delay().filter(|d| *d >= TAKEOVER_SLOW) {
        let line = format!(
            "shelltrail: the recorder took the terminal {:.1} s after it started (stopped or starved meanwhile): \
             the terminal may have been used unrecorded before this point",
            delay.as_secs_f64()
        );
        syslog::warning(&format!("session {}: {line}", meta.session_id));
        let _ = ev_tx.send(record::Event::Marker(Instant::now(), line));
    }
    let outcome = if tty && plan.transfer.is_none() {
        pty::run(cmd, ev_tx.clone(), recycle_rx, record_input, sep)?
    } else {
        pipes::run(cmd, ev_tx.clone(), record_input, summarise.map(|t| t.name()), sep)?
    };

    // From here on, a full buffer (agent away) drops and records the gap
    // instead of holding the departing session forever.
    budget.abandon();
    if let Some(t) = &outcome.transfer {
        let line = format!(
            "shelltrail: {} transfer, payload not recorded: {} bytes from client (sha256 {}), {} bytes to client (sha256 {})",
            t.program, t.bytes_from_client, t.sha256_from_client, t.bytes_to_client, t.sha256_to_client
        );
        let _ = ev_tx.send(record::Event::Marker(Instant::now(), line));
    }
    let close = Close {
        exit_status: outcome.code,
        end_unix_ms: now_ms(),
        bytes_out: outcome.bytes_out,
        bytes_in: outcome.bytes_in,
        transfer: outcome.transfer.clone(),
        ..Default::default()
    };
    let _ = ev_tx.send(record::Event::Exit(Instant::now(), outcome.code, close));
    drop(ev_tx);
    let lost = match recorder.join() {
        Ok(lost) => lost,
        Err(_) => {
            // The recorder thread died: still end the session at the agent, so
            // the link stops and the session shows as ended, not live forever.
            syslog::error(&format!("session {}: recorder thread failed", meta.session_id));
            let _ = link_guard.send(link::ToLink::Close(Close {
                exit_status: outcome.code,
                ..Default::default()
            }));
            Vec::new()
        }
    };
    drop(link_guard);
    let delivery = link_thread.join().unwrap_or_default();
    if let Some(file) = &delivery.fallback {
        syslog::error(&format!(
            "session {}: BREAK-GLASS session recorded to {}: the agent imports it when it is back",
            meta.session_id,
            file.display()
        ));
    }
    if !lost.is_empty() || delivery.undelivered > 0 || !delivery.close_acked {
        let msg = format!(
            "session {}: recording incomplete: {} chunks dropped while memory was full, {} chunks not delivered \
             to the agent{}",
            meta.session_id,
            lost.len(),
            delivery.undelivered,
            if delivery.close_acked {
                ""
            } else {
                ", end of session not recorded"
            }
        );
        syslog::error(&msg);
        let _ = writeln!(std::io::stderr(), "shelltrail: {msg}");
    }
    Ok(outcome.code)
}

/// The session's reason: from the client's environment, or asked for on the terminal.
fn reason(tty: bool) -> Option<String> {
    if let Ok(r) = std::env::var(REASON_VAR) {
        let r = meta::clean(r.trim());
        if !r.is_empty() {
            return Some(r);
        }
    }
    if !tty {
        return None;
    }
    let stdin = std::io::stdin();
    for _ in 0..3 {
        eprint!("Reason for this session (e.g. a ticket id): ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).ok()? == 0 {
            return None;
        }
        let r = meta::clean(line.trim());
        if !r.is_empty() {
            return Some(r);
        }
    }
    None
}
