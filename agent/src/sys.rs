//! The one module where shelltrail talks to the OS through `unsafe`: the
//! child's set-up between fork and exec, terminal ioctls, borrowing the
//! PTY master's descriptor from portable-pty, and taking the socket systemd
//! passes the agent. Everything else in the crate is
//! `#![deny(unsafe_code)]`; each block here says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};

/// An independent duplicate of portable-pty's master descriptor, so the copy
/// loops can poll it and set it non-blocking.
pub fn dup_master(master: &dyn portable_pty::MasterPty) -> io::Result<std::fs::File> {
    let fd: RawFd = master
        .as_raw_fd()
        .ok_or_else(|| io::Error::other("PTY master has no descriptor"))?;
    // SAFETY: `master` owns `fd` and is borrowed for the whole of this call,
    // so the descriptor stays open while it is duplicated.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(std::fs::File::from(borrowed.try_clone_to_owned()?))
}

/// The terminal size of `fd` (TIOCGWINSZ), if it is a terminal.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointed-to struct, which lives on our stack.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws as *mut libc::winsize) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// The path of the slave side of the PTY whose master is `master`.
pub fn pts_name(master: BorrowedFd<'_>) -> io::Result<PathBuf> {
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated string of at most buf.len() bytes into buf.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: on success buf holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(PathBuf::from(std::ffi::OsStr::new(
        name.to_str().map_err(|_| io::Error::other("non-UTF-8 pts name"))?,
    )))
}

/// How the child is set up between fork and exec.
#[derive(Debug, Clone, Copy)]
pub struct ChildSetup {
    /// Make stdin (the PTY slave) the controlling terminal of the new session.
    pub controlling_tty: bool,
    /// Become this uid and gid (all three of each) before exec: the set-uid
    /// recorder starts the session's program as the user it records.
    /// Supplementary groups stay those of the login.
    pub credentials: Option<(u32, u32)>,
}

/// Spawns `cmd` so that the recording cannot be escaped by killing the
/// recorder: the child starts a new session (its own process group, which the
/// recorder signals as a whole), gets SIGKILL when the recorder dies
/// (PR_SET_PDEATHSIG), inherits no descriptor beyond stdio, and starts with
/// default signal dispositions and an empty signal mask.
pub fn spawn(cmd: &mut Command, setup: ChildSetup) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (signal, sigprocmask, setsid, ioctl,
    // setresgid, setresuid, prctl, getppid, syscall); it allocates nothing
    // and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            for sig in [
                libc::SIGCHLD,
                libc::SIGHUP,
                libc::SIGINT,
                libc::SIGQUIT,
                libc::SIGTERM,
                libc::SIGPIPE,
                libc::SIGWINCH,
                libc::SIGALRM,
                libc::SIGTSTP,
                libc::SIGTTIN,
                libc::SIGTTOU,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if setup.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid)) = setup.credentials {
                // Groups first: once the uids are the user's, they cannot change.
                if libc::setresgid(gid, gid, gid) == -1 || libc::setresuid(uid, uid, uid) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // After the credentials: changing them clears the parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The recorder may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(io::Error::other("recorder exited during start-up"));
            }
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    cmd.spawn()
}

/// Marks this process non-dumpable: the user's own processes (same uid) can
/// then neither ptrace the recorder nor read its memory through /proc.
pub fn set_non_dumpable() -> io::Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(io::Error::from)
}

/// Hangs up this process's controlling terminal (vhangup(2), needs
/// CAP_SYS_TTY_CONFIG): every descriptor anyone holds on it, ours included,
/// stops working (reads end, writes fail), and its session loses it as
/// controlling terminal. What login(1) does to give a user a clean terminal.
pub fn vhangup() -> io::Result<()> {
    // SAFETY: vhangup takes no arguments and touches no memory of ours.
    if unsafe { libc::vhangup() } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Empties this process's permitted, effective and inheritable capability
/// sets for good (the set-uid recorder's file capabilities are needed only to
/// take the terminal).
pub fn drop_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two Data words (capabilities 0-31, 32-63).
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads one header and two data words, both ours and live
    // for the call, in the layout of <linux/capability.h>.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the forked signaller process does (see `shell::privsep`): becomes
/// `uid`/`gid` and serves `serve` until its pipe closes, then exits.
/// Returns the child's pid in the parent.
///
/// Must be called while the process has a single thread: the child runs
/// ordinary Rust code, which after a fork is sound only then.
pub fn fork_signaller(keep: RawFd, serve: impl FnOnce() -> i32) -> io::Result<libc::pid_t> {
    // SAFETY: the caller guarantees a single-threaded process, so the child
    // inherits no lock held by another thread and may allocate.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: closes descriptors of this (child) process only; `keep`
            // is the one the child goes on using.
            unsafe {
                if keep > 0 {
                    libc::close_range(0, keep as u32 - 1, 0);
                }
                libc::close_range(keep as u32 + 1, u32::MAX, 0);
            }
            let code = serve();
            // SAFETY: ends the child without running the parent's atexit
            // handlers or flushing its copies of the parent's buffers.
            unsafe { libc::_exit(code) }
        }
        pid => Ok(pid),
    }
}

/// Takes ownership of `fd`, which the caller knows to be open and unowned
/// (the descriptor `fork_signaller` kept for its child).
pub fn adopt(fd: RawFd) -> std::os::fd::OwnedFd {
    // SAFETY: per the contract above, nothing else owns or closes `fd`.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// The listening socket systemd passed this process (socket activation:
/// `LISTEN_PID` is our pid and `LISTEN_FDS` is 1, so descriptor 3 is it), if
/// it passed one. It must be a listening Unix stream socket.
pub fn systemd_listener() -> io::Result<Option<std::os::unix::net::UnixListener>> {
    use nix::sys::socket::{AddressFamily, SockType, getsockname, getsockopt, sockopt};
    const FIRST: RawFd = 3;
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    if !ours {
        return Ok(None);
    }
    match std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<u32>().ok()) {
        None | Some(0) => return Ok(None),
        Some(1) => {}
        Some(n) => {
            return Err(io::Error::other(format!(
                "systemd passed {n} sockets; the agent takes one"
            )));
        }
    }
    // SAFETY: systemd's protocol (sd_listen_fds(3)) hands descriptor 3 to
    // this process (LISTEN_PID checked above) for it to own; nothing else
    // in this process has taken it.
    let fd = unsafe { OwnedFd::from_raw_fd(FIRST) };
    let listening = getsockopt(&fd, sockopt::AcceptConn).map_err(io::Error::from)?;
    let stream = getsockopt(&fd, sockopt::SockType).map_err(io::Error::from)? == SockType::Stream;
    let unix = getsockname::<nix::sys::socket::UnixAddr>(fd.as_raw_fd())
        .is_ok_and(|a| nix::sys::socket::SockaddrLike::family(&a) == Some(AddressFamily::Unix));
    if !(listening && stream && unix) {
        return Err(io::Error::other(
            "the socket systemd passed is not a listening Unix stream socket (check ListenStream= in shelltrail-agent.socket)",
        ));
    }
    Ok(Some(std::os::unix::net::UnixListener::from(fd)))
}

/// Sets a signal's disposition to `action` (SIG_IGN or SIG_DFL, or one saved
/// from an earlier call), returning the one it replaces.
pub fn set_sigaction(
    sig: nix::sys::signal::Signal,
    action: &nix::sys::signal::SigAction,
) -> nix::Result<nix::sys::signal::SigAction> {
    // SAFETY: the callers pass dispositions without handler functions
    // (ignore, default) or ones they saved from this function; no Rust code
    // runs in signal context.
    unsafe { nix::sys::signal::sigaction(sig, action) }
}

/// Sets the terminal size of `fd` (TIOCSWINSZ).
pub fn set_window_size(fd: BorrowedFd<'_>, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointed-to struct, which lives on our stack.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const libc::winsize) };
}

/// Makes descriptor `target` (0-2) a duplicate of `fd` (dup2).
pub fn dup_onto(fd: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 replaces `target` atomically; the standard descriptors it
    // is used on are owned by the process, not by any Rust object that would
    // close them.
    if unsafe { libc::dup2(fd.as_raw_fd(), target) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The session that has `fd`'s terminal as its controlling terminal (TIOCGSID).
pub fn terminal_session(fd: BorrowedFd<'_>) -> io::Result<libc::pid_t> {
    let mut sid: libc::pid_t = 0;
    // SAFETY: TIOCGSID writes one pid_t into the pointed-to variable, which lives on our stack.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGSID, &mut sid as *mut libc::pid_t) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(sid)
}
