//! PTY sessions: the user's terminal on one side, a new PTY with the child on
//! the other, and two copy loops in between.
//!
//! The output loop is the hot path. It writes what the program printed to the
//! user's terminal first, then hands the same bytes to the recorder thread;
//! encoding and compression never delay an echo.

use crate::shell::record::Event;
use crate::shell::{Outcome, exit_code};
use crate::sys;
use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, killpg};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use nix::unistd::Pid;
use portable_pty::{PtySize, native_pty_system};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};
use signal_hook::iterator::Signals;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

/// After the child exits, output still arriving is copied until the PTY has
/// been quiet this long (a background job may hold the PTY open forever).
const DRAIN_QUIET: Duration = Duration::from_millis(50);
/// ... and never for longer than this in total.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// Puts the user's terminal in raw mode and restores it on drop, on every exit path.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter(tty: &File) -> Result<RawMode> {
        let saved = termios::tcgetattr(tty.as_fd()).context("reading the terminal's modes")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(tty.as_fd(), SetArg::TCSANOW, &raw).context("setting raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSAFLUSH, &self.saved);
    }
}

/// The user's terminal size, or 80x24 when it reports none.
pub fn outer_size() -> (u16, u16) {
    sys::window_size(std::io::stdin().as_fd()).unwrap_or((80, 24))
}

/// Runs `cmd` on a new PTY and proxies it to stdin/stdout until it exits.
pub fn run(mut cmd: Command, events: SyncSender<Event>, record_input: bool) -> Result<Outcome> {
    let stdin = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let stdout = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let (cols, rows) = outer_size();

    let pair = native_pty_system()
        .openpty(PtySize {
            rows,
            cols,
            pixel_width: 0,
            pixel_height: 0,
        })
        .map_err(|e| anyhow::anyhow!("cannot open a PTY: {e}"))?;
    let master = sys::dup_master(pair.master.as_ref())?;

    // The inner terminal starts with the user's modes (erase character, flow
    // control, UTF-8 input...), as the outer one had them before raw mode.
    if let Ok(outer) = termios::tcgetattr(stdin.as_fd()) {
        let _ = termios::tcsetattr(master.as_fd(), SetArg::TCSANOW, &outer);
    }

    let slave_path = sys::pts_name(master.as_fd())?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)
        .with_context(|| format!("opening {}", slave_path.display()))?;
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));

    // Signals are registered before the child exists, so its exit cannot be missed.
    let mut signals = Signals::new([SIGCHLD, SIGWINCH, SIGHUP, SIGTERM, SIGINT, SIGQUIT])?;
    let raw = RawMode::enter(&stdin).ok();
    let mut child = sys::spawn(&mut cmd, sys::ChildSetup { controlling_tty: true })
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    // Our copies of the slave are in `cmd`; drop them so EOF can come.
    drop(cmd);
    drop(pair.slave);
    let pgid = Pid::from_raw(child.id() as i32);

    let (wake_tx, wake_rx) = std::os::unix::net::UnixStream::pair()?;
    let out_master = master.try_clone()?;
    let out_events = events.clone();
    let output = std::thread::Builder::new()
        .name("pty-output".into())
        .spawn(move || pump_output(out_master, stdout, wake_rx, out_events))?;
    let in_master = master.try_clone()?;
    let in_events = events.clone();
    std::thread::Builder::new()
        .name("pty-input".into())
        .spawn(move || pump_input(stdin, in_master, in_events, record_input))?;

    let mut size = (cols, rows);
    let status = 'session: loop {
        for sig in signals.wait() {
            match sig {
                SIGWINCH => {
                    if let Some(new) = sys::window_size(std::io::stdin().as_fd())
                        && new != size
                    {
                        size = new;
                        let _ = pair.master.resize(PtySize {
                            cols: new.0,
                            rows: new.1,
                            pixel_width: 0,
                            pixel_height: 0,
                        });
                        let _ = events.send(Event::Resize(Instant::now(), new.0, new.1));
                    }
                }
                SIGHUP | SIGTERM | SIGINT | SIGQUIT => {
                    // The client went away (or we are being stopped): pass it on
                    // to the whole session so nothing outlives the recording.
                    let s = Signal::try_from(sig).unwrap_or(Signal::SIGHUP);
                    let _ = killpg(pgid, s);
                    if s != Signal::SIGHUP {
                        let _ = killpg(pgid, Signal::SIGHUP);
                    }
                }
                _ => {}
            }
            if let Some(st) = child.try_wait()? {
                break 'session st;
            }
        }
    };

    let _ = (&wake_tx).write_all(b"x");
    let bytes_out = output.join().unwrap_or(0);
    let code = exit_code(status);
    drop(raw);
    Ok(Outcome {
        code,
        bytes_out,
        bytes_in: 0,
        transfer: None,
    })
}

/// Copies PTY output to the terminal, then to the recorder. Returns bytes copied.
fn pump_output(master: File, mut out: File, wake: std::os::unix::net::UnixStream, events: SyncSender<Event>) -> u64 {
    let _ = nix::fcntl::fcntl(
        master.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    let mut drain_until: Option<Instant> = None;
    let mut reader = &master;
    loop {
        let timeout = match drain_until {
            Some(_) => PollTimeout::try_from(DRAIN_QUIET).unwrap_or(PollTimeout::ZERO),
            None => PollTimeout::NONE,
        };
        let mut fds = [
            PollFd::new(master.as_fd(), PollFlags::POLLIN),
            PollFd::new(
                wake.as_fd(),
                if drain_until.is_some() {
                    PollFlags::empty()
                } else {
                    PollFlags::POLLIN
                },
            ),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => return total, // quiet after the child's exit: done
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return total,
        }
        let master_ready = fds[0].any().unwrap_or(true);
        if fds[1].any().unwrap_or(false) {
            drain_until = Some(Instant::now() + DRAIN_MAX);
        }
        if drain_until.is_some_and(|d| Instant::now() >= d) {
            return total;
        }
        if !master_ready {
            continue;
        }
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return total,
                Ok(n) => {
                    let now = Instant::now();
                    if out.write_all(&buf[..n]).is_err() {
                        // The client is gone; keep recording what the program says.
                    }
                    total += n as u64;
                    if events.send(Event::Output(now, buf[..n].to_vec())).is_err() {
                        return total;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // EIO: every holder of the slave side has closed it.
                Err(_) => return total,
            }
        }
    }
}

/// Copies the user's keystrokes into the PTY; records them only when asked,
/// and never while the program has turned echo off (a password prompt).
fn pump_input(mut stdin: File, master: File, events: SyncSender<Event>, record_input: bool) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = Instant::now();
        // Read the slave's modes through the master before writing: the
        // keystroke is judged by the state the program was in when it was typed.
        let hidden =
            record_input && termios::tcgetattr(master.as_fd()).is_ok_and(|t| !t.local_flags.contains(LocalFlags::ECHO));
        if write_all_nonblocking(&master, &buf[..n]).is_err() {
            return;
        }
        if record_input {
            let ev = if hidden {
                Event::InputHidden(now)
            } else {
                Event::Input(now, buf[..n].to_vec())
            };
            if events.send(ev).is_err() {
                return;
            }
        }
    }
}

/// The master is non-blocking (the output loop needs that); writes wait for room.
fn write_all_nonblocking(f: &File, mut data: &[u8]) -> std::io::Result<()> {
    let mut w = f;
    while !data.is_empty() {
        match w.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::from(100u8));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
