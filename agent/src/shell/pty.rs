//! PTY sessions: the user's terminal on one side, a new PTY with the child on
//! the other, and two copy loops in between.
//!
//! The output loop is the hot path. It writes what the program printed to the
//! user's terminal first, then hands the same bytes to the recorder thread;
//! encoding and compression never delay an echo.

use crate::shell::privsep::Separation;
use crate::shell::record::Event;
use crate::shell::{Outcome, exit_code};
use crate::sys;
use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use nix::unistd::Pid;
use portable_pty::{PtySize, native_pty_system};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR2, SIGWINCH};
use signal_hook::iterator::Signals;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

/// After the child exits, output still arriving is copied until the PTY has
/// been quiet this long (a background job may hold the PTY open forever).
const DRAIN_QUIET: Duration = Duration::from_millis(50);
/// ... and never for longer than this in total.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// After the client hangs up, how long the session's programs have to end
/// before SIGKILL (the recorder cannot be stopped by the user, so a program
/// ignoring the hangup must not keep it forever).
pub const END_GRACE: Duration = Duration::from_secs(5);

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
/// Runs `cmd` on a new PTY and proxies it until it exits; output goes to
/// `events`, and spent output buffers come back on `recycled`.
pub fn run(
    mut cmd: Command,
    events: SyncSender<Event>,
    recycled: Receiver<Vec<u8>>,
    record_input: bool,
    sep: &mut Separation,
) -> Result<Outcome> {
    let stdin = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let stdout = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let (cols, rows) = outer_size();

    // Opened with the user's filesystem identity: the slave is theirs.
    let pair = sep
        .as_user_fs(|| {
            native_pty_system().openpty(PtySize {
                rows,
                cols,
                pixel_width: 0,
                pixel_height: 0,
            })
        })
        .map_err(|e| anyhow::anyhow!("cannot open a PTY: {e}"))?;
    let master = sys::dup_master(pair.master.as_ref())?;

    // The inner terminal starts with the user's modes (erase character, flow
    // control, UTF-8 input...), as the outer one had them before raw mode.
    if let Ok(outer) = termios::tcgetattr(stdin.as_fd()) {
        let _ = termios::tcsetattr(master.as_fd(), SetArg::TCSANOW, &outer);
    }

    let slave_path = sys::pts_name(master.as_fd())?;
    let slave = sep
        .as_user_fs(|| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(&slave_path)
        })
        .with_context(|| format!("opening {}", slave_path.display()))?;
    // The session's terminal is the inner one; the outer one is the recorder's.
    cmd.env("SSH_TTY", &slave_path);
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));

    // Signals are registered before the child exists, so its exit cannot be missed.
    // SIGUSR2 is the recorder's own (no one else may signal it): the end's
    // grace is over and the program is still there (see SessionSignals::end).
    let mut signals = Signals::new([SIGCHLD, SIGWINCH, SIGHUP, SIGTERM, SIGINT, SIGQUIT, SIGUSR2])?;
    let raw = RawMode::enter(&stdin).ok();
    let setup = sys::ChildSetup {
        controlling_tty: true,
        credentials: sep.credentials(),
    };
    let mut child = sys::spawn(&mut cmd, setup).with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    // Our copies of the slave are in `cmd`; drop them so EOF can come.
    drop(cmd);
    drop(pair.slave);
    let pgid = Pid::from_raw(child.id() as i32);
    let session_signals = sep.become_recorder(pgid)?;

    let progress = Arc::new(Progress::default());
    let typeahead = sep.take_typeahead();
    let io = {
        let (events, progress) = (events.clone(), progress.clone());
        std::thread::Builder::new().name("pty-io".into()).spawn(move || {
            let io = Io {
                stdin,
                out: stdout,
                master,
                typeahead,
            };
            proxy(io, events, recycled, record_input, &progress)
        })?
    };
    let mut size = (cols, rows);
    // Set once the child has exited: the grace period's SIGKILL is then off.
    let ended = Arc::new(AtomicBool::new(false));
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
                    session_signals.end(s, END_GRACE, ended.clone(), || {
                        let _ = nix::sys::signal::raise(Signal::SIGUSR2);
                    });
                }
                SIGUSR2 => {
                    if let Some(st) = child.try_wait()? {
                        ended.store(true, Ordering::Release);
                        break 'session st;
                    }
                    // Given up on: the session ends as if killed; the
                    // terminal closes with the recorder behind it.
                    crate::shell::syslog::warning(
                        "the session's program survived SIGHUP and SIGKILL (its signaller is gone): \
                         ending the session without it",
                    );
                    ended.store(true, Ordering::Release);
                    break 'session std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL);
                }
                _ => {}
            }
            if let Some(st) = child.try_wait()? {
                ended.store(true, Ordering::Release);
                break 'session st;
            }
        }
    };

    // Drain: copy what the program printed before it exited. A background job
    // may hold the PTY open and never let EOF come, so stop once the output
    // has been quiet for a moment; past that, nothing more reaches the client.
    let exited = Instant::now();
    while !io.is_finished() && exited.elapsed() < DRAIN_MAX {
        let last = progress.epoch + Duration::from_millis(progress.last_read.load(Ordering::Relaxed));
        if last.max(exited).elapsed() >= DRAIN_QUIET {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The end: from the burst being copied, if any, on, nothing more passes.
    progress.closing.store(true, Ordering::Release);
    drop(progress.gate.lock().unwrap_or_else(|e| e.into_inner()));
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
    closing: AtomicBool,
    /// Held while a burst is copied; the session owner takes it after
    /// setting `closing`, so no burst is half-recorded at the end.
    gate: std::sync::Mutex<()>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            epoch: Instant::now(),
            last_read: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            gate: std::sync::Mutex::new(()),
        }
    }
}

fn ms_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_millis() as u64
}

/// Output is read into a burst buffer this large, written to the user's
/// terminal from it and then handed to the recorder as it is: one event (one
/// wake-up of the recorder thread) per burst, not per 4 KiB PTY read, and no
/// copy of the bytes on the way.
const BURST: usize = 64 << 10;

/// While output keeps coming, it is written to the terminal once this much
/// is unwritten: a few PTY reads' worth, so the terminal gets a quarter as
/// many writes (each one a wake-up of the kernel's tty flush work) while the
/// bytes wait at most three extra back-to-back reads. A burst that ends
/// (the next read would block), such as an echo, is written at once.
const WRITE_AT: usize = 16 << 10;

/// Bursts smaller than this are copied out of the burst buffer rather than
/// handed on with it: cheaper than preparing a new 64 KiB buffer per keystroke.
const SMALL_BURST: usize = 4 << 10;

/// A burst buffer: the recorder's recycled one if it has sent one back, else
/// a new one. Only its length is reset; the contents are overwritten.
fn burst_buffer(recycled: &Receiver<Vec<u8>>) -> Vec<u8> {
    let mut b = recycled.try_recv().unwrap_or_default();
    b.resize(BURST, 0);
    b
}

/// The copy loop's descriptors: the user's terminal (read and write side),
/// the PTY master, and input typed before the session started.
struct Io {
    stdin: File,
    out: File,
    master: File,
    typeahead: Vec<u8>,
}

/// The copy loop, both directions in one thread, as a bare proxy does it:
/// one wake-up per keystroke echo, not one per thread.
///
/// Output is written to the user's terminal before the recorder sees it
/// (see [`BURST`] and [`WRITE_AT`]): the echo never waits for the recording,
/// and busy output costs the recorder one event per burst. Input goes into
/// the non-blocking master as it can; while some waits for room, no more is
/// read from the user (flow control, not loss).
fn proxy(io: Io, events: SyncSender<Event>, recycled: Receiver<Vec<u8>>, record_input: bool, progress: &Progress) {
    let Io {
        mut stdin,
        mut out,
        master,
        typeahead,
    } = io;
    let _ = nix::fcntl::fcntl(
        master.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut buf = vec![0u8; 16 << 10];
    let mut burst = burst_buffer(&recycled);
    // Typed ahead before the terminal was taken: goes in first (and, like
    // all input, is recorded only as the program echoes it, or as `i`
    // events when input is recorded).
    if record_input && !typeahead.is_empty() {
        let _ = events.send(Event::Input(Instant::now(), typeahead.clone()));
    }
    let mut pending_in: Vec<u8> = typeahead;
    let mut stdin_open = true;
    // Writes burst[written..filled] to the terminal, then, when `hand_on`,
    // sends burst[..filled] to the recorder and starts a fresh buffer.
    // False when the recorder is gone.
    let mut flush = |burst: &mut Vec<u8>, written: &mut usize, filled: &mut usize, at: Instant, hand_on: bool| {
        if *written < *filled {
            let _ = out.write_all(&burst[*written..*filled]);
            *written = *filled;
        }
        if !hand_on || *filled == 0 {
            return true;
        }
        // A small burst (an echo, a prompt) goes as a right-sized copy and
        // the buffer stays; a big one goes as it is, and a fresh buffer
        // takes its place.
        let data = if *filled < SMALL_BURST {
            burst[..*filled].to_vec()
        } else {
            let mut full = std::mem::replace(burst, burst_buffer(&recycled));
            full.truncate(*filled);
            full
        };
        *written = 0;
        *filled = 0;
        events.send(Event::Output(at, data)).is_ok()
    };
    loop {
        // The user's terminal is watched only while we want its input: a
        // hung-up one reports POLLHUP whatever is asked, and would spin.
        let want_input = stdin_open && pending_in.is_empty();
        let master_flags = if pending_in.is_empty() {
            PollFlags::POLLIN
        } else {
            PollFlags::POLLIN | PollFlags::POLLOUT
        };
        let mut fds = [
            PollFd::new(master.as_fd(), master_flags),
            PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
        ];
        let watched = if want_input { 2 } else { 1 };
        match poll(&mut fds[..watched], PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        let master_ev = fds[0].revents().unwrap_or(PollFlags::POLLERR);
        let stdin_ev = if want_input {
            fds[1].revents().unwrap_or(PollFlags::empty())
        } else {
            PollFlags::empty()
        };

        if master_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            // A burst is written and handed on as a whole under the gate, so
            // the session's end (taken under it) falls between bursts: what
            // reached the user's terminal is in the recording before its end.
            let _gate = progress.gate.lock().unwrap_or_else(|e| e.into_inner());
            if progress.closing.load(Ordering::Acquire) {
                return;
            }
            let (mut written, mut filled) = (0, 0);
            let mut at = Instant::now();
            loop {
                match (&master).read(&mut burst[filled..]) {
                    Ok(0) => {
                        flush(&mut burst, &mut written, &mut filled, at, true);
                        return;
                    }
                    Ok(n) => {
                        let now = Instant::now();
                        if filled == 0 {
                            at = now;
                        }
                        filled += n;
                        progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        progress
                            .last_read
                            .store(ms_since(progress.epoch, now), Ordering::Relaxed);
                        // Keep room for a whole PTY read (the line discipline
                        // hands out at most 4 KiB at a time).
                        let full = BURST - filled < 4096;
                        if (full || filled - written >= WRITE_AT)
                            && !flush(&mut burst, &mut written, &mut filled, at, full)
                        {
                            return;
                        }
                        // The session is ending and this burst is handed on:
                        // stop here, even if output keeps coming.
                        if full && progress.closing.load(Ordering::Acquire) {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        flush(&mut burst, &mut written, &mut filled, at, true);
                        return;
                    }
                }
            }
            if !flush(&mut burst, &mut written, &mut filled, at, true) {
                return;
            }
        }

        if !pending_in.is_empty() && master_ev.contains(PollFlags::POLLOUT) {
            match (&master).write(&pending_in) {
                Ok(n) => {
                    pending_in.drain(..n);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => return,
            }
        }

        if stdin_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            if progress.closing.load(Ordering::Acquire) {
                return;
            }
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    // The client is gone (sshd also sends SIGHUP): stop reading it,
                    // keep copying and recording what the program still prints.
                    stdin_open = false;
                    continue;
                }
                Ok(n) => n,
            };
            let now = Instant::now();
            // Read the slave's modes through the master before writing: the
            // keystroke is judged by the state the program was in when it was typed.
            let hidden = record_input && termios::tcgetattr(master.as_fd()).is_ok_and(|t| password_mode(&t));
            match (&master).write(&buf[..n]) {
                Ok(w) => pending_in.extend_from_slice(&buf[w..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    pending_in.extend_from_slice(&buf[..n])
                }
                Err(_) => return,
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
