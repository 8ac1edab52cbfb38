//! Sessions without a terminal: `ssh host cmd`, scp, sftp, rsync, git. Bytes
//! pass through unchanged; stdout and stderr stay separate; closed stdin
//! (`ssh -n`) closes the child's.
//!
//! For a recognised file transfer the payload is not recorded (unless the
//! config asks): the copy loops count and hash each direction instead, so a
//! 1 GiB upload costs the spool a few hundred bytes.

use crate::shell::privsep::Separation;
use crate::shell::record::Event;
use crate::shell::{Outcome, exit_code};
use crate::sys;
use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use shelltrail_proto::v1::TransferSummary;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Command, Stdio};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// After the child exits, how long to wait for a background process that
/// still holds stdout or stderr open.
const LINGER: Duration = Duration::from_secs(1);

/// How a byte stream is kept.
#[derive(Clone, Copy)]
enum Keep {
    /// As `o` events.
    Output,
    /// As `i` events.
    Input,
    /// Counted and hashed only.
    Summary,
    /// Neither recorded nor hashed (input with input recording off).
    Nothing,
}

struct Copied {
    bytes: u64,
    sha256: Option<String>,
}

/// What one copy loop has passed on so far, shared with the session owner.
/// The owner reads it once the child has exited, finished loop or not: the
/// input loop is usually still blocked reading the client (an rsync or sftp
/// client keeps its side open after the server is done), and what it has
/// already copied must be counted and hashed all the same.
struct Tally {
    bytes: u64,
    hash: Option<Sha256>,
}

impl Tally {
    fn new(keep: Keep) -> Arc<Mutex<Tally>> {
        Arc::new(Mutex::new(Tally {
            bytes: 0,
            hash: matches!(keep, Keep::Summary).then(Sha256::new),
        }))
    }

    fn snapshot(tally: &Mutex<Tally>) -> Copied {
        // A copy loop that panicked left a consistent tally: it only adds under the lock.
        let t = tally.lock().unwrap_or_else(|e| e.into_inner());
        Copied {
            bytes: t.bytes,
            sha256: t.hash.clone().map(|h| hex::encode(h.finalize())),
        }
    }
}

/// Runs `cmd` with pipes until it exits.
pub fn run(
    mut cmd: Command,
    events: SyncSender<Event>,
    record_input: bool,
    transfer: Option<&'static str>,
    sep: &mut Separation,
) -> Result<Outcome> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT, SIGQUIT])?;
    let setup = sys::ChildSetup {
        controlling_tty: false,
        credentials: sep.credentials(),
    };
    let mut child = sys::spawn(&mut cmd, setup).with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let pgid = Pid::from_raw(child.id() as i32);
    let session_signals = sep.become_recorder(pgid)?;

    let (out_keep, in_keep) = match (transfer.is_some(), record_input) {
        (true, _) => (Keep::Summary, Keep::Summary),
        (false, true) => (Keep::Output, Keep::Input),
        (false, false) => (Keep::Output, Keep::Nothing),
    };
    let child_in = child.stdin.take().context("child stdin")?;
    let child_out = child.stdout.take().context("child stdout")?;
    let child_err = child.stderr.take().context("child stderr")?;

    let stdin = dup(std::io::stdin().as_fd())?;
    let stdout = dup(std::io::stdout().as_fd())?;
    let stderr = dup(std::io::stderr().as_fd())?;
    let (in_tally, out_tally, err_tally) = (Tally::new(in_keep), Tally::new(out_keep), Tally::new(Keep::Output));
    let ended = Arc::new(Mutex::new(false));
    let (ev, tally, end) = (events.clone(), in_tally.clone(), ended.clone());
    std::thread::spawn(move || copy(stdin, child_in, in_keep, &ev, &tally, &end));
    let (ev, tally, end) = (events.clone(), out_tally.clone(), ended.clone());
    let output = std::thread::spawn(move || copy(child_out, stdout, out_keep, &ev, &tally, &end));
    let (ev, tally, end) = (events.clone(), err_tally, ended.clone());
    // stderr is always recorded: for a transfer it carries only error messages.
    let errors = std::thread::spawn(move || copy(child_err, stderr, Keep::Output, &ev, &tally, &end));

    let handle = signals.handle();
    let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ending = exited.clone();
    // The child's end, or the recorder giving up on it (see SessionSignals::end).
    let (over_tx, over) = std::sync::mpsc::channel::<Option<std::process::ExitStatus>>();
    let abandon = over_tx.clone();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let sig = Signal::try_from(sig).unwrap_or(Signal::SIGHUP);
            let abandon = abandon.clone();
            session_signals.end(sig, crate::shell::pty::END_GRACE, ending.clone(), move || {
                let _ = abandon.send(None);
            });
        }
    });
    std::thread::spawn(move || {
        let _ = over_tx.send(child.wait().ok());
    });
    let status = match over.recv() {
        Ok(Some(st)) => st,
        Ok(None) => {
            crate::shell::syslog::warning(
                "the session's program survived SIGHUP and SIGKILL (its signaller is gone): ending the session without it",
            );
            std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL)
        }
        Err(_) => anyhow::bail!("lost track of the session's program"),
    };
    exited.store(true, std::sync::atomic::Ordering::Release);
    handle.close();

    // Output still in the pipes is copied; a background process holding
    // them open is given up on after LINGER.
    let deadline = Instant::now() + LINGER;
    join_by(output, deadline);
    join_by(errors, deadline);
    // The recording ends here: loops still running (a background job holds
    // the pipes) pass nothing more on, either way.
    *ended.lock().unwrap_or_else(|e| e.into_inner()) = true;
    // The child is gone, so nothing more reaches it: the input tally is final
    // even though its loop may still be blocked reading the client.
    let inp = Tally::snapshot(&in_tally);
    let out = Tally::snapshot(&out_tally);

    let summary = transfer.map(|program| TransferSummary {
        program: program.to_string(),
        bytes_from_client: inp.bytes,
        bytes_to_client: out.bytes,
        sha256_from_client: inp.sha256.clone().unwrap_or_default(),
        sha256_to_client: out.sha256.clone().unwrap_or_default(),
    });
    Ok(Outcome {
        code: exit_code(status),
        bytes_out: out.bytes,
        bytes_in: inp.bytes,
        transfer: summary,
    })
}

fn join_by(t: std::thread::JoinHandle<()>, deadline: Instant) {
    while !t.is_finished() {
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = t.join();
}

/// Copies until EOF: each read is first counted (and hashed) into `tally`
/// and recorded, then written on. Closing `to` at the end (drop) passes EOF
/// on, which is what makes `ssh -n` work.
///
/// Recording comes first, under the `ended` gate: once the session owner
/// has closed it (the recording is about to end), nothing more is passed on
/// in either direction, so no byte crosses between a background job and the
/// client without being in the recording.
fn copy(
    mut from: impl Read,
    mut to: impl Write,
    keep: Keep,
    events: &SyncSender<Event>,
    tally: &Mutex<Tally>,
    ended: &Mutex<bool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut recording = true;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let now = Instant::now();
        {
            let ended = ended.lock().unwrap_or_else(|e| e.into_inner());
            if *ended {
                break;
            }
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            t.bytes += n as u64;
            if let Some(h) = t.hash.as_mut() {
                h.update(&buf[..n]);
            }
            drop(t);
            if recording {
                let ev = match keep {
                    Keep::Output => Some(Event::Output(now, buf[..n].to_vec())),
                    Keep::Input => Some(Event::Input(now, buf[..n].to_vec())),
                    Keep::Summary | Keep::Nothing => None,
                };
                if let Some(ev) = ev {
                    recording = events.send(ev).is_ok();
                }
            }
        }
        if to.write_all(&buf[..n]).and_then(|_| to.flush()).is_err() {
            break;
        }
    }
}

/// Our own handle on a standard stream: unbuffered, unlike `std::io::stdout()`.
fn dup(fd: BorrowedFd<'_>) -> std::io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}
