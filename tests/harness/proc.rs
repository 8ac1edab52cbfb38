//! Child processes with timeouts.
//!
//! `std::process::Command::output()` waits forever; a recorder bug that keeps
//! a session open would then hang the whole suite. Everything here waits with
//! a deadline, kills the process when it passes, and panics with what the
//! process printed so far, which is usually the clue.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a finished process left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    /// The exit code; panics (with the output) if the process was killed by a signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("process ended by a signal ({:?}); {self}", self.status))
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Panics unless the exit code is `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.status.code(), Some(code), "unexpected exit; {self}");
        self
    }

    /// Panics unless the process exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            excerpt(&self.stdout),
            excerpt(&self.stderr)
        )
    }
}

/// A readable excerpt of process output: lossy, and cut in the middle when long.
pub fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 4000;
    let s = String::from_utf8_lossy(bytes);
    if s.len() <= MAX {
        return s.into_owned();
    }
    let head: String = s.chars().take(MAX / 2).collect();
    let tail: String = s
        .chars()
        .rev()
        .take(MAX / 2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{head}\n[... {} bytes ...]\n{tail}", s.len())
}

/// Bytes a reader thread has collected from one pipe, shared with waiters.
#[derive(Default)]
pub(crate) struct Collected {
    pub(crate) data: Mutex<(Vec<u8>, bool)>,
    pub(crate) grew: Condvar,
}

impl Collected {
    /// Starts a thread that copies `from` into a new buffer until EOF.
    pub(crate) fn spawn(mut from: impl Read + Send + 'static) -> Arc<Collected> {
        let c = Arc::new(Collected::default());
        let c2 = c.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let mut d = c2.data.lock().expect("collector lock");
                if n == 0 {
                    d.1 = true;
                    c2.grew.notify_all();
                    return;
                }
                d.0.extend_from_slice(&buf[..n]);
                c2.grew.notify_all();
            }
        });
        c
    }

    pub(crate) fn snapshot(&self) -> Vec<u8> {
        self.data.lock().expect("collector lock").0.clone()
    }

    /// Waits until `pred` holds for the collected bytes; false at the deadline
    /// or when the stream ended without it holding.
    pub(crate) fn wait_for(&self, deadline: Instant, pred: impl Fn(&[u8]) -> bool) -> bool {
        let mut d = self.data.lock().expect("collector lock");
        loop {
            if pred(&d.0) {
                return true;
            }
            let now = Instant::now();
            if d.1 || now >= deadline {
                return false;
            }
            d = self.grew.wait_timeout(d, deadline - now).expect("collector lock").0;
        }
    }

    fn wait_eof(&self, deadline: Instant) -> bool {
        let mut d = self.data.lock().expect("collector lock");
        while !d.1 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            d = self.grew.wait_timeout(d, deadline - now).expect("collector lock").0;
        }
        true
    }
}

/// A child process with its stdout and stderr being collected. Killed on drop.
pub struct Running {
    what: String,
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: Arc<Collected>,
    stderr: Arc<Collected>,
}

impl Running {
    /// Spawns `cmd` with piped stdout/stderr. `stdin`: `None` gives the child
    /// /dev/null, `Some(bytes)` a pipe that receives `bytes` and stays open
    /// until [`Running::close_stdin`] or the end of the process.
    pub fn spawn(mut cmd: Command, stdin: Option<&[u8]>) -> Running {
        let what = describe(&cmd);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = Collected::spawn(child.stdout.take().expect("piped stdout"));
        let stderr = Collected::spawn(child.stderr.take().expect("piped stderr"));
        let mut pipe = child.stdin.take();
        if let (Some(p), Some(bytes)) = (pipe.as_mut(), stdin) {
            // Small inputs only (a pipe holds 64 KiB): larger ones would block here.
            p.write_all(bytes)
                .unwrap_or_else(|e| panic!("writing stdin of {what}: {e}"));
        }
        Running {
            what,
            child,
            stdin: pipe,
            stdout,
            stderr,
        }
    }

    /// Closes the child's stdin (EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits until stdout contains `needle`; panics on timeout or if the
    /// process closes stdout first.
    #[track_caller]
    pub fn wait_stdout_contains(&self, needle: &str, timeout: Duration) {
        let n = needle.as_bytes();
        let found = self
            .stdout
            .wait_for(Instant::now() + timeout, |d| d.windows(n.len().max(1)).any(|w| w == n));
        if !found {
            panic!(
                "{}: {needle:?} did not appear on stdout within {timeout:?}\n--- stdout so far ---\n{}\n--- stderr so far ---\n{}",
                self.what,
                excerpt(&self.stdout.snapshot()),
                excerpt(&self.stderr.snapshot())
            );
        }
    }

    /// Waits for the exit and for both pipes to reach EOF; kills the process
    /// and panics after `timeout`.
    #[track_caller]
    pub fn wait(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        self.stdin = None;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) => {}
                Err(e) => panic!("waiting for {}: {e}", self.what),
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not finish within {timeout:?}; killed it\n--- stdout so far ---\n{}\n--- stderr so far ---\n{}",
                    self.what,
                    excerpt(&self.stdout.snapshot()),
                    excerpt(&self.stderr.snapshot())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // A grandchild may still hold a pipe; give it a moment, then take what is there.
        let pipes_deadline = Instant::now() + Duration::from_secs(5);
        self.stdout.wait_eof(pipes_deadline);
        self.stderr.wait_eof(pipes_deadline);
        Output {
            status,
            stdout: self.stdout.snapshot(),
            stderr: self.stderr.snapshot(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion (stdin /dev/null) within `timeout`.
#[track_caller]
pub fn run(cmd: Command, timeout: Duration) -> Output {
    Running::spawn(cmd, None).wait(timeout)
}

/// Runs `cmd` and panics unless it exits 0; returns its output.
#[track_caller]
pub fn run_ok(cmd: Command, timeout: Duration) -> Output {
    let what = describe(&cmd);
    let out = run(cmd, timeout);
    assert!(out.status.success(), "{what} failed; {out}");
    out
}

/// A short description of a command for messages: program and arguments.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`poll_until`], panicking with `what` at the deadline.
#[track_caller]
pub fn wait_until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, f).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}
