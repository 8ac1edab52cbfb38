//! An interactive terminal driver: a program (normally `ssh -tt`) running
//! on a pseudo-terminal made with portable-pty, so that it behaves exactly
//! as it would for a person: it sees a real terminal, puts it in raw mode,
//! receives SIGWINCH when the window is resized.
//!
//! Tests type with [`Term::line`] and wait for output with [`Term::expect`].
//! A marker to wait for should be text that only the command's output can
//! contain, not its echo: type `echo ok-$((40+2))` and expect `ok-42`.

use crate::EXPECT_TIMEOUT;
use crate::proc::{Collected, excerpt};
use portable_pty::{CommandBuilder, MasterPty, PtySize, native_pty_system};
use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Term {
    what: String,
    master: Box<dyn MasterPty + Send>,
    writer: Option<Box<dyn Write + Send>>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
    out: Arc<Collected>,
    /// Output before this offset has been consumed by `expect`.
    cursor: usize,
}

fn size(cols: u16, rows: u16) -> PtySize {
    PtySize {
        rows,
        cols,
        pixel_width: 0,
        pixel_height: 0,
    }
}

impl Term {
    /// Runs `cmd` (program, arguments and environment changes are taken
    /// from it) on a new PTY of `cols`x`rows`.
    pub fn spawn(cmd: &Command, cols: u16, rows: u16) -> Term {
        let what = crate::proc::describe(cmd);
        let pair = native_pty_system()
            .openpty(size(cols, rows))
            .unwrap_or_else(|e| panic!("openpty: {e}"));
        let mut b = CommandBuilder::new(cmd.get_program());
        b.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => b.env(k, v),
                None => b.env_remove(k),
            }
        }
        b.env("TERM", "xterm");
        let child = pair
            .slave
            .spawn_command(b)
            .unwrap_or_else(|e| panic!("starting {what} on a PTY: {e}"));
        // Our copy of the slave would keep the PTY open after the child exits.
        drop(pair.slave);
        let reader = pair
            .master
            .try_clone_reader()
            .unwrap_or_else(|e| panic!("PTY reader: {e}"));
        let writer = pair.master.take_writer().unwrap_or_else(|e| panic!("PTY writer: {e}"));
        Term {
            what,
            master: pair.master,
            writer: Some(writer),
            child,
            out: Collected::spawn(reader),
            cursor: 0,
        }
    }

    /// Types `s` as is.
    pub fn send(&mut self, s: &str) {
        let w = self.writer.as_mut().expect("the terminal's input is closed");
        w.write_all(s.as_bytes())
            .and_then(|_| w.flush())
            .unwrap_or_else(|e| panic!("typing into {}: {e}", self.what));
    }

    /// Types `s` and Enter (a terminal sends CR for Enter).
    pub fn line(&mut self, s: &str) {
        self.send(&format!("{s}\r"));
    }

    /// Waits for `needle` in the output after what earlier expects
    /// consumed; returns the output up to and including it.
    #[track_caller]
    pub fn expect(&mut self, needle: &str) -> String {
        self.expect_within(needle, EXPECT_TIMEOUT)
    }

    #[track_caller]
    pub fn expect_within(&mut self, needle: &str, timeout: Duration) -> String {
        let n = needle.as_bytes();
        let from = self.cursor;
        let found = |d: &[u8]| -> Option<usize> {
            d.get(from..)?
                .windows(n.len().max(1))
                .position(|w| w == n)
                .map(|p| from + p + n.len())
        };
        let ok = self.out.wait_for(Instant::now() + timeout, |d| found(d).is_some());
        let all = self.out.snapshot();
        if !ok {
            panic!(
                "{needle:?} did not appear in the terminal within {timeout:?} ({})\n\
                 --- terminal output after the last match ---\n{}",
                self.what,
                excerpt(&all[from.min(all.len())..])
            );
        }
        let end = found(&all).expect("found");
        self.cursor = end;
        String::from_utf8_lossy(&all[from..end]).into_owned()
    }

    /// Waits for the first shell prompt (the test users' bash prompt,
    /// Debian's default PS1, ends in `$ `). Keystrokes typed before it are
    /// echoed by every terminal on the way (ours, sshd's) while those are
    /// still in cooked mode, so a test comparing the recording with the
    /// screen types only after this.
    #[track_caller]
    pub fn wait_prompt(&mut self) -> String {
        self.expect("$ ")
    }

    /// Resizes the terminal; the program gets SIGWINCH.
    pub fn resize(&self, cols: u16, rows: u16) {
        self.master
            .resize(size(cols, rows))
            .unwrap_or_else(|e| panic!("resizing the PTY: {e}"));
    }

    /// Everything the terminal showed so far (lossy UTF-8).
    pub fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.out.snapshot()).into_owned()
    }

    /// Waits for the program to exit and returns its exit code; kills it
    /// and panics (with the transcript) after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    // What the program wrote before it exited may still be on
                    // its way from the PTY: read until the PTY says it ended
                    // (a short wait: its last writer is gone).
                    self.out.wait_for(Instant::now() + Duration::from_secs(2), |_| false);
                    return st.exit_code();
                }
                Ok(None) => {}
                Err(e) => panic!("waiting for {}: {e}", self.what),
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {timeout:?}; killed it\n--- terminal ---\n{}",
                    self.what,
                    excerpt(&self.out.snapshot())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        self.writer = None;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
