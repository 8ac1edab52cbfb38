//! Privilege separation: the recorder runs as its own user, out of reach of
//! the user it records.
//!
//! `shelltrail-shell` is installed set-uid to `recorder_user` (shelltrail-rec)
//! with the file capabilities CAP_CHOWN and CAP_SYS_TTY_CONFIG. At exec the
//! kernel makes it non-dumpable (no ptrace, no /proc/PID/mem by the user from
//! its first instruction). Then, in this order:
//!
//! 1. [`start`], before anything else runs: the terminal sshd gave the
//!    session is taken from the user: owner the recorder, mode 0600, hung up
//!    (vhangup: any descriptor another process opened on it before stops
//!    working) and opened again. The capabilities are dropped for good.
//! 2. A signaller is forked while the process is single-threaded: a tiny
//!    process of the user's that sends signals to the session's process group
//!    on the recorder's request (the recorder itself will not be allowed to).
//! 3. Once the agent connection is made, [`Separation::shield`]: real and
//!    saved uid become the recorder's, the effective uid the user's; the user
//!    can no longer signal the recorder.
//! 4. The session's program is started as the user ([`Separation::credentials`]),
//!    on an inner PTY opened with the user's filesystem identity so that its
//!    slave belongs to the user ([`Separation::as_user_fs`]).
//! 5. [`Separation::become_recorder`]: real, effective and saved uid all
//!    become the recorder's. The user's processes can neither signal nor
//!    trace the recorder, and the outer terminal is not theirs.
//!
//! Until step 3 the user may signal the recorder (its real uid is theirs):
//! that can only end or freeze their own session, since the terminal is taken
//! first. What remains is the window between exec and step 1 (microseconds):
//! a process of the user that stops the recorder there could use the terminal
//! until it lets the recorder go on; the recorder measures that delay and
//! marks the recording when it is long (see [`Separation::takeover_delay`]).

use crate::sys;
use nix::sys::signal::Signal;
use nix::sys::stat::{Mode, SFlag, fchmod, fstat};
use nix::unistd::{Gid, Pid, Uid, getresuid};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Why the recorder cannot separate itself from the user; the login is refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivsepError {
    #[error(
        "shelltrail-shell is not installed set-uid to its recorder user, so the user could stop the \
         recording (install it as the packages do: chown shelltrail-rec /usr/bin/shelltrail-shell; \
         chmod 4755 /usr/bin/shelltrail-shell; setcap cap_chown,cap_sys_tty_config+ep /usr/bin/shelltrail-shell)"
    )]
    NotSetuid,
    #[error(
        "sshd started the session with no_new_privs set (NoNewPrivileges= in its systemd unit?), so the \
         set-uid recorder cannot run as its own user and the user could stop the recording"
    )]
    NoNewPrivs,
    #[error("shelltrail-shell runs set-uid root; it must be set-uid to its own unprivileged user (recorder_user)")]
    SetuidRoot,
    #[error(
        "cannot take the terminal {tty} from the user: {step}: {error} (is shelltrail-shell missing its \
         capabilities? setcap cap_chown,cap_sys_tty_config+ep on it)"
    )]
    Terminal {
        tty: String,
        step: &'static str,
        error: std::io::Error,
    },
    #[error("standard input {0} is not this session's own SSH terminal ({1}); the recorder takes no other")]
    NotOwnTerminal(String, String),
    #[error("cannot {0}: {1}")]
    Os(&'static str, std::io::Error),
}

/// What [`start`] learnt and set up; `None` parts mean "not separated"
/// (outside SSH, by a binary that is not set-uid: nobody else is recorded).
pub struct Separation {
    /// The user being recorded (the real ids at exec).
    pub user: Uid,
    pub group: Gid,
    /// The recorder's own uid (the set-uid owner), when separated.
    recorder: Option<Uid>,
    signaller: Option<Signaller>,
    takeover_delay: Option<Duration>,
    /// Input the client typed before the terminal was taken (the hangup
    /// would have flushed it): the session's program gets it first.
    typeahead: Vec<u8>,
}

/// Reads the ids, takes the terminal, drops capabilities and forks the
/// signaller. Call first thing in `main`, while the process has one thread.
/// `local_use`: outside an SSH session, where an unseparated recorder is
/// allowed (`shelltrail demo`, a developer's build).
pub fn start(local_use: bool) -> Result<Separation, PrivsepError> {
    let ids = getresuid().map_err(|e| PrivsepError::Os("read the process's uids", e.into()))?;
    let (user, group) = (ids.real, nix::unistd::getgid());
    if ids.effective == ids.real {
        if !local_use {
            return Err(if no_new_privs() {
                PrivsepError::NoNewPrivs
            } else {
                PrivsepError::NotSetuid
            });
        }
        return Ok(Separation {
            user,
            group,
            recorder: None,
            signaller: None,
            takeover_delay: None,
            typeahead: Vec::new(),
        });
    }
    if ids.effective.is_root() {
        return Err(PrivsepError::SetuidRoot);
    }
    let recorder = ids.effective;
    let mut takeover_delay = None;
    let mut typeahead = Vec::new();
    if std::io::stdin().is_terminal() {
        match take_terminal(user, recorder) {
            Ok(t) => {
                typeahead = t;
                takeover_delay = since_exec();
            }
            // Outside SSH, not the caller's own SSH terminal (a console login
            // with the recorder as login shell, whose terminal is login(1)'s;
            // su in someone else's terminal; a pts from another namespace):
            // it is left alone, and the session still runs separated and
            // recorded.
            Err(PrivsepError::NotOwnTerminal(..)) if local_use => {}
            Err(e) => return Err(e),
        }
    }
    sys::drop_capabilities().map_err(|e| PrivsepError::Os("drop the recorder's capabilities", e))?;
    let signaller = Signaller::fork(user, group)?;
    Ok(Separation {
        user,
        group,
        recorder: Some(recorder),
        signaller: Some(signaller),
        takeover_delay,
        typeahead,
    })
}

impl Separation {
    /// No separation: the recorder runs as the user (benchmarks of the copy
    /// loop, tests). Does not look at how the binary is installed.
    pub fn unseparated() -> Separation {
        Separation {
            user: nix::unistd::getuid(),
            group: nix::unistd::getgid(),
            recorder: None,
            signaller: None,
            takeover_delay: None,
            typeahead: Vec::new(),
        }
    }

    /// Whether the recorder runs as its own user (set-uid install).
    pub fn separated(&self) -> bool {
        self.recorder.is_some()
    }

    /// The recorder's own uid, when separated.
    pub fn recorder_uid(&self) -> Option<Uid> {
        self.recorder
    }

    /// How long after exec the terminal was taken, when it was: a long delay
    /// means the recorder was stopped or starved before it could take it.
    pub fn takeover_delay(&self) -> Option<Duration> {
        self.takeover_delay
    }

    /// Input typed before the terminal was taken, once.
    pub fn take_typeahead(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.typeahead)
    }

    /// The ids the session's program is started with, when separated.
    pub fn credentials(&self) -> Option<(u32, u32)> {
        self.recorder.map(|_| (self.user.as_raw(), self.group.as_raw()))
    }

    /// Runs `f` with the user's filesystem identity, so that what it creates
    /// belongs to the user: the inner PTY's slave must be the user's own, as
    /// sshd's was (screen, GPG_TTY and `mesg` check it).
    pub fn as_user_fs<T>(&self, f: impl FnOnce() -> T) -> T {
        match self.recorder {
            Some(rec) => {
                nix::unistd::setfsuid(self.user);
                let out = f();
                nix::unistd::setfsuid(rec);
                out
            }
            None => f(),
        }
    }

    /// Puts the user's uid where kill(2) does not look: real and saved uid
    /// the recorder's, effective uid the user's. From here the user's
    /// processes cannot signal the recorder (kill checks the target's real
    /// and saved uid), while the child it forks can still become the user.
    /// Call before the child is started (the child could otherwise stop the
    /// recorder before it drops the user's uid) and after the agent
    /// connection is made (the agent learns the peer's effective uid).
    pub fn shield(&mut self) -> Result<(), PrivsepError> {
        let Some(rec) = self.recorder else {
            return Ok(());
        };
        nix::unistd::setresuid(rec, self.user, rec).map_err(|e| PrivsepError::Os("shield the recorder", e.into()))
    }

    /// Drops every trace of the user's uid (real, effective, saved): from here
    /// on the user's processes cannot signal or trace the recorder. Returns
    /// the way to signal the session's process group from now on.
    pub fn become_recorder(&mut self, session_pgid: Pid) -> Result<SessionSignals, PrivsepError> {
        let Some(rec) = self.recorder else {
            return Ok(SessionSignals {
                pgid: session_pgid,
                via: None,
            });
        };
        let via = Arc::new(self.signaller.take().and_then(|s| s.target(session_pgid)));
        nix::unistd::setresuid(rec, rec, rec).map_err(|e| PrivsepError::Os("become the recorder user", e.into()))?;
        let ids = getresuid().map_err(|e| PrivsepError::Os("read the process's uids", e.into()))?;
        if ids.real != rec || ids.effective != rec || ids.saved != rec {
            return Err(PrivsepError::Os(
                "become the recorder user",
                std::io::Error::other("a uid of the user is left"),
            ));
        }
        Ok(SessionSignals {
            pgid: session_pgid,
            via: Some(via),
        })
    }
}

/// Sends signals to the session's process group: directly when not
/// separated, else through the signaller. Best effort, as kill(2) is: a group
/// that is gone, or a signaller the user killed, is not an error (the
/// recorder still ends the session by hanging up or closing the pipes).
#[derive(Clone)]
pub struct SessionSignals {
    pgid: Pid,
    /// The signaller's pipe when separated (`None` inside: it is gone).
    via: Option<Arc<Option<File>>>,
}

impl SessionSignals {
    pub fn send(&self, sig: Signal) {
        match &self.via {
            None => {
                let _ = nix::sys::signal::killpg(self.pgid, sig);
            }
            Some(pipe) => {
                if let Some(p) = pipe.as_ref() {
                    // 5 bytes: one atomic pipe write, whichever thread sends.
                    let _ = (&*p).write_all(&message(b'S', sig as i32));
                }
            }
        }
    }
}

impl SessionSignals {
    /// The client is gone (or the recorder is being stopped): sends `sig`
    /// and SIGHUP now, and SIGKILL after `grace` unless `ended` is set by
    /// then. A program that ignores the hangup would otherwise keep the
    /// session, and the recorder that the user cannot stop, for ever.
    ///
    /// The signals go through the signaller, which runs as the user: a user
    /// who killed it beforehand keeps their processes alive. So if the
    /// session has still not ended [`ABANDON_AFTER`] past the SIGKILL,
    /// `abandon` is called: the recorder then ends the session without its
    /// program (closing the terminal behind it), and the user's processes,
    /// if any survive, are cut off from the client.
    pub fn end(
        &self,
        sig: Signal,
        grace: Duration,
        ended: Arc<std::sync::atomic::AtomicBool>,
        abandon: impl FnOnce() + Send + 'static,
    ) {
        self.send(sig);
        if sig != Signal::SIGHUP {
            self.send(Signal::SIGHUP);
        }
        let me = self.clone();
        let _ = std::thread::Builder::new().name("end-grace".into()).spawn(move || {
            std::thread::sleep(grace);
            if !ended.load(std::sync::atomic::Ordering::Acquire) {
                me.send(Signal::SIGKILL);
                std::thread::sleep(ABANDON_AFTER);
                if !ended.load(std::sync::atomic::Ordering::Acquire) {
                    abandon();
                }
            }
        });
    }
}

/// How long past its SIGKILL a session that has not ended is given up on.
pub const ABANDON_AFTER: Duration = Duration::from_secs(2);

fn message(tag: u8, value: i32) -> [u8; 5] {
    let mut msg = [tag, 0, 0, 0, 0];
    msg[1..].copy_from_slice(&value.to_le_bytes());
    msg
}

/// Whether this process runs with no_new_privs, which makes exec ignore the
/// set-uid bit and file capabilities.
fn no_new_privs() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])))
}

/// Time since this process was exec'd, from /proc/self/stat's start time.
fn since_exec() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let ticks: u64 = stat[stat.rfind(')')? + 2..]
        .split_ascii_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??.max(1) as u64;
    let started = Duration::from_millis(ticks * 1000 / hz);
    // Seconds since boot, as the start time counts them (10 ms resolution).
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let now: f64 = uptime.split_ascii_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64(now).saturating_sub(started))
}

/// Takes the session's terminal (standard input) from the user: owner the
/// recorder, mode 0600, hung up, opened again as our controlling terminal
/// and put back on standard input, output and error. Returns the input the
/// client had typed ahead.
fn take_terminal(user: Uid, recorder: Uid) -> Result<Vec<u8>, PrivsepError> {
    let stdin = std::io::stdin();
    let fd = stdin.as_fd();
    let path = std::fs::read_link("/proc/self/fd/0").unwrap_or_default();
    let tty = path.display().to_string();
    let err = |step, error| PrivsepError::Terminal {
        tty: tty.clone(),
        step,
        error,
    };
    let st = fstat(fd).map_err(|e| err("fstat", e.into()))?;
    check_own_terminal(&st, &path, user).map_err(|why| PrivsepError::NotOwnTerminal(tty.clone(), why))?;
    let modes = nix::sys::termios::tcgetattr(fd).ok();
    let size = sys::window_size(fd);
    nix::unistd::fchown(fd, Some(recorder), None).map_err(|e| err("chown", e.into()))?;
    fchmod(fd, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|e| err("chmod", e.into()))?;
    // The hangup flushes the terminal's input: keep what the client typed
    // ahead (ssh -tt < script) for the session's program.
    let typeahead = modes.as_ref().map(|m| read_typeahead(fd, m)).unwrap_or_default();

    // The hangup sends SIGHUP to the session leader, which we may be.
    let old = ignore_sighup().map_err(|e| err("ignore SIGHUP", e.into()))?;
    let hung = sys::vhangup();
    if let Err(e) = hung {
        restore_sighup(old);
        return Err(err("vhangup", e));
    }
    // Our own descriptors were hung up too. Without a controlling terminal
    // now, a session leader that opens the terminal gets it back (SIGWINCH
    // needs that); a process that is not one becomes one first if it can.
    if nix::unistd::getsid(None).ok() != Some(nix::unistd::getpid()) {
        let _ = nix::unistd::setsid();
    }
    // Through our own (hung up) descriptor, not by name: the very same
    // terminal, whatever a name might point to meanwhile.
    let reopened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/fd/0")
        .map_err(|e| err("reopen", e));
    restore_sighup(old);
    let file = reopened?;
    let again = fstat(file.as_fd()).map_err(|e| err("fstat", e.into()))?;
    if (again.st_dev, again.st_ino, again.st_rdev) != (st.st_dev, st.st_ino, st.st_rdev)
        || again.st_uid != recorder.as_raw()
    {
        return Err(err(
            "reopen",
            std::io::Error::other("it is not the terminal that was taken"),
        ));
    }
    if let Some(m) = modes {
        let _ = nix::sys::termios::tcsetattr(file.as_fd(), nix::sys::termios::SetArg::TCSANOW, &m);
    }
    if let Some((cols, rows)) = size {
        sys::set_window_size(file.as_fd(), cols, rows);
    }
    for target in 0..=2 {
        let same = std_stat(target).is_ok_and(|s| s.st_rdev == st.st_rdev);
        if same {
            sys::dup_onto(file.as_fd(), target).map_err(|e| err("dup2", e))?;
        }
    }
    Ok(typeahead)
}

/// What is waiting in the terminal's input, partial lines included (read
/// in non-canonical mode with no wait), at most 64 KiB.
fn read_typeahead(fd: std::os::fd::BorrowedFd<'_>, modes: &nix::sys::termios::Termios) -> Vec<u8> {
    use nix::sys::termios::{LocalFlags, SetArg, SpecialCharacterIndices, tcsetattr};
    let mut raw = modes.clone();
    raw.local_flags.remove(LocalFlags::ICANON);
    raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 0;
    raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    let mut out = Vec::new();
    if tcsetattr(fd, SetArg::TCSANOW, &raw).is_err() {
        return out;
    }
    let mut buf = [0u8; 4096];
    while out.len() < 64 << 10 {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let _ = tcsetattr(fd, SetArg::TCSANOW, modes);
    out
}

/// fstat of a standard descriptor (0-2).
fn std_stat(fd: i32) -> nix::Result<nix::sys::stat::FileStat> {
    match fd {
        0 => fstat(std::io::stdin()),
        1 => fstat(std::io::stdout()),
        _ => fstat(std::io::stderr()),
    }
}

/// Whether `st` (standard input's) is a terminal this recorder may take:
/// the caller's own SSH terminal and nothing else. A pseudo-terminal slave
/// (majors 136-143, never /dev/ptmx or another device), on this host's
/// /dev/pts (not a devpts instance of the caller's own namespace, whose
/// numbers repeat the host's), at its `/dev/pts/N` name, owned by the user
/// (sshd makes it so; CAP_CHOWN must never be spent on someone else's
/// terminal), and our controlling terminal (vhangup hangs up that one).
fn check_own_terminal(st: &nix::sys::stat::FileStat, path: &Path, user: Uid) -> Result<(), String> {
    let major = nix::sys::stat::major(st.st_rdev);
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFCHR || !(136..=143).contains(&major) {
        return Err("not a pseudo-terminal".into());
    }
    if !is_pts_path(path) {
        return Err("not under /dev/pts".into());
    }
    let named = nix::sys::stat::stat(path).map_err(|e| format!("stat: {e}"))?;
    let host = nix::sys::stat::stat("/dev/pts/ptmx").map_err(|e| format!("stat /dev/pts/ptmx: {e}"))?;
    if (named.st_dev, named.st_ino, named.st_rdev) != (st.st_dev, st.st_ino, st.st_rdev) || st.st_dev != host.st_dev {
        return Err("not this host's /dev/pts terminal of that name".into());
    }
    if st.st_uid != user.as_raw() {
        return Err(format!("owned by uid {}, not by the user", st.st_uid));
    }
    let session = sys::terminal_session(std::io::stdin().as_fd()).map_err(|e| format!("TIOCGSID: {e}"))?;
    if nix::unistd::getsid(None).map_err(|e| format!("getsid: {e}"))?.as_raw() != session {
        return Err("not the controlling terminal of this session".into());
    }
    Ok(())
}

/// `/dev/pts/N`, N decimal.
fn is_pts_path(p: &Path) -> bool {
    p.to_str()
        .and_then(|s| s.strip_prefix("/dev/pts/"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn ignore_sighup() -> nix::Result<nix::sys::signal::SigAction> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet};
    let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    sys::set_sigaction(Signal::SIGHUP, &ign)
}

fn restore_sighup(old: nix::sys::signal::SigAction) {
    let _ = sys::set_sigaction(Signal::SIGHUP, &old);
}

/// A process of the user's that signals the session's process group for the
/// recorder, which after [`Separation::become_recorder`] may not. It holds
/// nothing but its end of a pipe: no terminal, no recording. The user may
/// kill it; the recorder then ends sessions by hangup and closed pipes only.
/// When the recorder goes away (the pipe closes) it exits.
struct Signaller {
    pipe: Option<File>,
}

impl Signaller {
    fn fork(user: Uid, group: Gid) -> Result<Signaller, PrivsepError> {
        let (rd, wr) = nix::unistd::pipe().map_err(|e| PrivsepError::Os("create the signaller's pipe", e.into()))?;
        let keep = rd.as_raw_fd();
        let pid = sys::fork_signaller(keep, move || {
            let rd = File::from(sys::adopt(keep));
            if nix::unistd::setresgid(group, group, group).is_err() || nix::unistd::setresuid(user, user, user).is_err()
            {
                return 1;
            }
            serve_signals(rd);
            0
        })
        .map_err(|e| PrivsepError::Os("fork the signaller", e))?;
        drop(rd);
        tracing::debug!(pid, "signaller started");
        Ok(Signaller {
            pipe: Some(File::from(wr)),
        })
    }

    /// Names the session's process group; the pipe is then only for signals.
    fn target(self, pgid: Pid) -> Option<File> {
        let mut pipe = self.pipe?;
        pipe.write_all(&message(b'T', pgid.as_raw())).ok()?;
        Some(pipe)
    }
}

/// The signaller's loop: `T` + pgid names the session's group (once), `S` +
/// signal number sends that signal to it. Ends on EOF.
fn serve_signals(mut rd: File) {
    use std::io::Read;
    let mut target: Option<Pid> = None;
    let mut msg = [0u8; 5];
    while rd.read_exact(&mut msg).is_ok() {
        let value = i32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]);
        match msg[0] {
            b'T' if target.is_none() && value > 1 => target = Some(Pid::from_raw(value)),
            b'S' => {
                if let (Some(pg), Ok(sig)) = (target, Signal::try_from(value)) {
                    let _ = nix::sys::signal::killpg(pg, sig);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_numbered_pts_paths_are_terminals_to_take() {
        assert!(is_pts_path(Path::new("/dev/pts/0")));
        assert!(is_pts_path(Path::new("/dev/pts/417")));
        assert!(!is_pts_path(Path::new("/dev/pts/ptmx")));
        assert!(!is_pts_path(Path::new("/dev/ptmx")));
        assert!(!is_pts_path(Path::new("/dev/pts/")));
        assert!(!is_pts_path(Path::new("/dev/tty1")));
        assert!(!is_pts_path(Path::new("/dev/pts/1/../2")));
    }
}
