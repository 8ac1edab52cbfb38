//! The one module where shelltrail talks to the OS through `unsafe`: the
//! child's set-up between fork and exec, terminal ioctls, and borrowing the
//! PTY master's descriptor from portable-pty. Everything else in the crate is
//! `#![deny(unsafe_code)]`; each block here says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
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
    // prctl, getppid, syscall); it allocates nothing and takes no locks.
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
