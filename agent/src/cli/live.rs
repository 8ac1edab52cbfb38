//! Live response on this host, through the agent: `sessions --live`,
//! `kill`, `unlock`. The agent decides who may (root and its admin group)
//! and logs every request; this side only asks and prints.

use crate::cli::shown::{json_for_terminal, shown};
use crate::cli::utc;
use crate::config::Config;
use crate::shell::link;
use anyhow::{Context, Result, bail};
use shelltrail_proto::v1::{Control, ControlReply, Kill, ListLive, LiveSession, Unlock, control};
use std::io::Write;
use std::time::Duration;

fn ask(cfg: &Config, request: control::Request) -> Result<ControlReply> {
    let reply = link::control(&cfg.socket, Control { request: Some(request) })
        .with_context(|| "asking the agent (is it running? `systemctl status shelltrail-agent`)".to_string())?;
    if !reply.ok {
        bail!("{}", shown(&reply.message));
    }
    Ok(reply)
}

/// One row of `sessions --live --json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct LiveRow {
    pub id: String,
    pub user: String,
    pub uid: u32,
    pub client: String,
    pub auth: String,
    pub command: String,
    pub mode: String,
    pub tty: String,
    pub start_unix_ms: i64,
    /// Milliseconds since the agent last received any of the session.
    pub idle_ms: i64,
    pub bytes: u64,
}

fn row(l: LiveSession, now: i64) -> LiveRow {
    LiveRow {
        id: l.session_id,
        user: l.user,
        uid: l.uid,
        client: l.client,
        auth: l.auth,
        command: l.command,
        mode: l.mode,
        tty: l.tty,
        start_unix_ms: l.opened_unix_ms,
        idle_ms: (now - l.last_activity_unix_ms).max(0),
        bytes: l.bytes,
    }
}

/// `sessions --live`: the sessions whose recorder is connected now.
pub fn list(cfg: &Config, user: Option<&str>, json: bool, out: &mut impl Write) -> Result<()> {
    let reply = ask(cfg, control::Request::ListLive(ListLive {}))?;
    let now = crate::agent::server::now_ms();
    let rows: Vec<LiveRow> = reply
        .live
        .into_iter()
        .map(|l| row(l, now))
        .filter(|r| user.is_none_or(|u| r.user == u || format!("uid:{}", r.uid) == u))
        .collect();
    if json {
        writeln!(out, "{}", json_for_terminal(&serde_json::to_string_pretty(&rows)?))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<36}  {:<12} {:<21} {:<19} {:>8} {:>10} {:<5} COMMAND  [AUTH]",
        "ID", "USER", "CLIENT", "START (UTC)", "IDLE", "BYTES", "MODE"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<36}  {:<12} {:<21} {:<19} {:>8} {:>10} {:<5} {}  [{}]",
            shown(&r.id),
            shown(&r.user),
            shown(&r.client),
            utc(r.start_unix_ms),
            idle(r.idle_ms),
            r.bytes,
            shown(&r.mode),
            shown(&r.command),
            shown(&r.auth),
        )?;
    }
    if rows.is_empty() {
        writeln!(out, "(no live sessions)")?;
    }
    Ok(())
}

/// An idle time as the listings show it: 42s, 3m07s, 2h15m.
pub fn idle(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `kill ID --reason TEXT [--lock [--for DURATION]]`.
pub fn kill(cfg: &Config, id: &str, reason: &str, lock: bool, lock_for: Option<Duration>) -> Result<()> {
    let reply = ask(
        cfg,
        control::Request::Kill(Kill {
            session: id.to_string(),
            reason: reason.to_string(),
            lock: lock || lock_for.is_some(),
            lock_secs: lock_for.map_or(0, |d| d.as_secs().max(1)),
        }),
    )?;
    println!("{}", shown(&reply.message));
    Ok(())
}

/// `unlock USER`.
pub fn unlock(cfg: &Config, user: &str) -> Result<()> {
    let reply = ask(cfg, control::Request::Unlock(Unlock { user: user.to_string() }))?;
    println!("{}", shown(&reply.message));
    Ok(())
}

/// Prints what a tail receives: the screen, the output, notices (to
/// stderr); shared by `tail` on the host and through a collector.
pub struct Printer<W: Write> {
    out: W,
    tty: bool,
    raw: bool,
    /// The session's exit status, once it ended.
    pub ended: Option<i32>,
}

impl<W: Write> Printer<W> {
    /// With `raw`, only the output bytes, for a pipe. `tty`: `out` is a terminal.
    pub fn new(out: W, tty: bool, raw: bool) -> Self {
        Printer {
            out,
            tty,
            raw,
            ended: None,
        }
    }

    /// Prints one frame; false once the session has ended.
    pub fn frame(&mut self, f: shelltrail_proto::v1::TailFrame) -> std::io::Result<bool> {
        use shelltrail_proto::v1::tail_frame::Body;
        match f.body {
            Some(Body::Snapshot(s)) => {
                if s.approximate {
                    eprint!(
                        "\r\nshelltrail tail: some output went by too fast to keep; the screen may be incomplete\r\n"
                    );
                }
                if !self.raw {
                    self.out.write_all(&s.screen)?;
                    if self.tty
                        && let Some((cols, rows)) = terminal_size()
                        && (u32::from(cols), u32::from(rows)) != (s.cols, s.rows)
                    {
                        eprint!(
                            "\r\nshelltrail tail: the session's terminal is {}x{}, this one {cols}x{rows}\r\n",
                            s.cols, s.rows
                        );
                    }
                }
            }
            Some(Body::Output(bytes)) => self.out.write_all(&bytes)?,
            Some(Body::Resize(r)) if !self.raw => {
                eprint!(
                    "\r\nshelltrail tail: the session's terminal is now {}x{}\r\n",
                    r.cols, r.rows
                );
            }
            Some(Body::Resize(_)) => {}
            Some(Body::Notice(n)) => eprint!("\r\n{}\r\n", shown(&n)),
            Some(Body::Exit(code)) => {
                self.ended = Some(code);
                self.out.flush()?;
                return Ok(false);
            }
            None => {}
        }
        self.out.flush()?;
        Ok(true)
    }
}

/// `tail ID [--raw] [--from-start]`: the session's current screen, then
/// its output as it comes, until it ends (exit status 0) or the agent goes
/// away (1). With `raw`, only the output bytes, for a pipe. Notices go to
/// stderr.
///
/// With `from_start`, instead of the screen: the session's output so far,
/// read from the spool (chunks before the one the agent's snapshot names),
/// then the live output from that chunk on. A spool keeps only what it has
/// not shipped and retired: chunks already at the collector are named in a
/// notice (`--collector` replays them).
pub fn tail(cfg: &Config, id: &str, raw: bool, from_start: bool) -> Result<i32> {
    use shelltrail_proto::v1::tail_frame::Body;
    use std::io::IsTerminal;
    let out = std::io::stdout().lock();
    let tty = out.is_terminal();
    let mut printer = Printer::new(out, tty, raw);
    let mut first = true;
    let reply = link::tail(&cfg.socket, id, |f| {
        if from_start
            && std::mem::take(&mut first)
            && let Some(Body::Snapshot(s)) = &f.body
        {
            return replay_spool(cfg, id, s.next_seq, &mut printer);
        }
        printer.frame(f)
    })
    .context("asking the agent (is it running? `systemctl status shelltrail-agent`)")?;
    if !reply.ok {
        bail!("{}", shown(&reply.message));
    }
    match printer.ended {
        Some(code) => {
            eprint!("\r\nshelltrail tail: the session ended (exit {code})\r\n");
            Ok(0)
        }
        None => {
            eprint!("\r\nshelltrail tail: the agent closed the connection\r\n");
            Ok(1)
        }
    }
}

/// Prints the output of the session's chunks before `until` from the
/// spool. The agent shows a chunk to tailers as it checks it, a moment
/// before it is durable: the last ones are waited for (briefly).
fn replay_spool<W: Write>(cfg: &Config, name: &str, until: u64, printer: &mut Printer<W>) -> std::io::Result<bool> {
    use shelltrail_proto::v1::{TailFrame, tail_frame::Body};
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let chunks = loop {
        let found = (|| -> Result<Vec<crate::cli::ChunkBytes>> {
            let mut src = crate::cli::Source::open(cfg, None)?;
            // The agent audited the tail already.
            src.read_for("");
            let rows = src.list()?;
            let row = rows
                .iter()
                .find(|r| r.id == name || r.id.contains(name))
                .context("the session is not in the spool")?;
            src.chunks(row)
        })();
        match found {
            Ok(c) if c.last().is_some_and(|(seq, _)| seq + 1 >= until) || until == 0 => break c,
            Ok(c) if std::time::Instant::now() > deadline => break c,
            Err(e) if std::time::Instant::now() > deadline => {
                eprint!("\r\nshelltrail tail: cannot replay from the spool: {e:#}\r\n");
                break Vec::new();
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let first = chunks.first().map_or(until, |(seq, _)| *seq);
    if first > 0 {
        eprint!(
            "\r\nshelltrail tail: chunks 0..{} of this session were shipped and are no longer on this host: \
             replay them with --collector URL\r\n",
            first.min(until).saturating_sub(1)
        );
    }
    for (seq, bytes) in chunks.iter().filter(|(seq, _)| *seq < until) {
        let Ok(unpacked) = shelltrail_cast::run::unpack(bytes) else {
            eprint!("\r\nshelltrail tail: chunk {seq} in the spool does not decode; skipped\r\n");
            continue;
        };
        for part in &unpacked.parts {
            for f in shelltrail_cast::feed::events(unpacked.content(part)) {
                let body = match f {
                    shelltrail_cast::feed::Feed::Output(b) => Body::Output(b),
                    shelltrail_cast::feed::Feed::Resize(c, r) => Body::Resize(shelltrail_proto::v1::Resize {
                        cols: c.into(),
                        rows: r.into(),
                    }),
                    shelltrail_cast::feed::Feed::Exit(code) => Body::Exit(code),
                };
                if !printer.frame(TailFrame { body: Some(body) })? {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// This terminal's size, if stdout is one.
fn terminal_size() -> Option<(u16, u16)> {
    use std::os::fd::AsFd;
    crate::sys::window_size(std::io::stdout().as_fd())
}

/// Parses `90s`, `15m`, `2h`, `1d` (a number alone is seconds).
pub fn duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: a duration is a number and a unit: 90s, 15m, 2h, 1d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    if secs == 0 {
        return Err("a lock for 0 seconds locks nothing".into());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_parse_and_bad_ones_say_why() {
        assert_eq!(super::duration("90").unwrap().as_secs(), 90);
        assert_eq!(super::duration("15m").unwrap().as_secs(), 900);
        assert_eq!(super::duration("2h").unwrap().as_secs(), 7200);
        assert_eq!(super::duration("1d").unwrap().as_secs(), 86_400);
        assert!(super::duration("1w").unwrap_err().contains("unit"));
        assert!(super::duration("h").unwrap_err().contains("a number"));
        assert!(super::duration("0s").is_err());
    }
}
