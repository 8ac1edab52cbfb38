//! Harness for shelltrail's end-to-end tests.
//!
//! Every test gets a [`World`]: a temporary directory with its own copy of
//! the binaries, a root-owned config file (under /etc/shelltrail/e2e), a
//! running agent and (usually) a real OpenSSH `sshd` on a loopback port
//! whose `ForceCommand` is the recorder.
//! Tests then drive real clients against it: `ssh` (see [`Ssh`]), `ssh -tt`
//! inside a pseudo-terminal (see [`Term`]), `scp`, `sftp` and `rsync`, and
//! inspect what was recorded through the operator CLI (`shelltrail sessions
//! --json`, `shelltrail export`), never through the spool's internals.
//!
//! The shipping tests get a [`ShipWorld`] instead: a collector with its own
//! certificate authority, a [`FaultProxy`] in front of it, and [`Host`]s
//! whose agents ship through the proxy (see [`collector`]).
//!
//! Ground rules the harness enforces so that a broken product fails a test
//! instead of hanging the suite:
//! * every wait has a timeout, and a timeout panics with what was seen so far;
//! * every process a test starts is killed when its owner is dropped;
//! * when a test panics, its world prints the agent's and sshd's logs.
//!
//! The tests need root (they create users and run sshd) and the binaries
//! built by `cargo build --bins`; `tests/run.sh` does both. Set
//! `SHELLTRAIL_E2E_KEEP=1` to keep each world's directory and config (spool,
//! logs) for inspection.

pub mod asciinema;
pub mod cast;
pub mod client;
pub mod collector;
pub mod faultproxy;
pub mod proc;
pub mod sshd;
pub mod term;
pub mod users;
pub mod world;

pub use cast::{Cast, Event};
pub use client::Ssh;
pub use collector::{Host, HostBuilder, Pki, SHIP_TIMEOUT, Script, ShipWorld};
pub use faultproxy::{FaultProxy, XorShift};
pub use proc::{Output, Running, poll_until, wait_until};
pub use term::Term;
pub use users::TestUser;
pub use world::{SessionRow, World, WorldBuilder};

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Default limit for one client command (ssh, scp, CLI call). Generous: the
/// machine running the suite may be small and busy; a hang still ends.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Limit for one expected piece of terminal output to arrive.
pub const EXPECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The binaries under test.
pub const BINARIES: [&str; 2] = ["shelltrail", "shelltrail-shell"];

/// The directory holding the built binaries (`target/debug`).
///
/// Found from the test executable itself (`target/debug/deps/e2e-<hash>`, so
/// two levels up) rather than from environment variables: it is right for
/// any target dir and profile the tests were built with.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("locating the test executable");
        let dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()))
            .to_path_buf();
        for name in BINARIES {
            let p = dir.join(name);
            assert!(
                p.is_file(),
                "{} is missing: the end-to-end tests run the built binaries; \
                 run `cargo build --bins` first (tests/run.sh does it)",
                p.display()
            );
        }
        dir
    })
    .clone()
}

/// Panics unless the tests run as root: they create system users, start sshd
/// and need to read the spool as an operator would.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests must run as root: they create test users and start a real sshd \
         (run tests/run.sh as root, or with sudo)"
    );
}

/// SHA-256 of `data`, lowercase hex (the form the recorder writes in markers).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for the
/// 64 MiB transfer files and free of any dependency on /dev/urandom speed.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Removes terminal escape sequences (CSI and OSC) so that text checks see
/// what a person would read. Used for logs (tracing colours its output) and
/// terminal transcripts.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        match it.peek() {
            Some('[') => {
                it.next();
                // Parameters and intermediates, then one final byte in @..~.
                for c in it.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                it.next();
                // Until BEL or ST (ESC \).
                while let Some(c) = it.next() {
                    if c == '\x07' {
                        break;
                    }
                    if c == '\x1b' {
                        it.next();
                        break;
                    }
                }
            }
            _ => {
                it.next();
            }
        }
    }
    out
}
