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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

    let progress = Arc::new(Progress::default());
    let out_master = master.try_clone()?;
    let out_events = events.clone();
    let out_progress = progress.clone();
    let output = std::thread::Builder::new()
        .name("pty-output".into())
        .spawn(move || pump_output(out_master, stdout, out_events, &out_progress))?;
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

    // Drain: copy what the program printed before it exited. A background job
    // may hold the PTY open and never let EOF come, so stop once the output
    // has been quiet for a moment; past that, nothing more reaches the client.
    let exited = Instant::now();
    while !output.is_finished() && exited.elapsed() < DRAIN_MAX {
        let last = progress.epoch + Duration::from_millis(progress.last_read.load(Ordering::Relaxed));
        if last.max(exited).elapsed() >= DRAIN_QUIET {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    progress.closed.store(true, Ordering::Relaxed);
    let bytes_out = progress.bytes.load(Ordering::Relaxed);
    let code = exit_code(status);
    drop(raw);
    Ok(Outcome {
        code,
        bytes_out,
        bytes_in: 0,
        transfer: None,
    })
}

/// What the output loop has done, for the drain decision after the child exits.
struct Progress {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last read that returned data.
    last_read: AtomicU64,
    bytes: AtomicU64,
    /// Set when the session is over: nothing more goes to the client.
    closed: AtomicBool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            epoch: Instant::now(),
            last_read: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }
}

fn ms_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_millis() as u64
}

/// Copies PTY output to the terminal, then to the recorder: one blocking
/// read and one write per burst, as a bare proxy does. Ends at EOF/EIO (every
/// holder of the slave side closed it) or when the session is declared over.
fn pump_output(master: File, mut out: File, events: SyncSender<Event>, progress: &Progress) {
    let mut buf = vec![0u8; 64 << 10];
    let mut reader = &master;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let now = Instant::now();
        if progress.closed.load(Ordering::Relaxed) {
            return;
        }
        // A failed write means the client is gone; keep recording what the program says.
        let _ = out.write_all(&buf[..n]);
        progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
        progress
            .last_read
            .store(ms_since(progress.epoch, now), Ordering::Relaxed);
        if events.send(Event::Output(now, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

/// Whether the terminal is in the mode of a password prompt: line-buffered
/// (canonical) with echo off, as getpass(3), readpassphrase(3), sudo and
/// `read -s` set it. Echo off alone is not enough: line editors (readline,
/// vim, less) turn canonical mode and echo off and echo keystrokes
/// themselves, and their input is what recording input is for. Linux's own
/// tty audit skips input by the same rule.
fn password_mode(t: &Termios) -> bool {
    t.local_flags.contains(LocalFlags::ICANON) && !t.local_flags.contains(LocalFlags::ECHO)
}

/// Copies the user's keystrokes into the PTY; records them only when asked,
/// and never at a password prompt ([`password_mode`]).
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
        let hidden = record_input && termios::tcgetattr(master.as_fd()).is_ok_and(|t| password_mode(&t));
        if (&master).write_all(&buf[..n]).is_err() {
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
