//! `shelltrail-e2e-flood`: a hostile local user's client of the agent's
//! socket, for the tests that check no user can take the agent down. The
//! tests run it as an unprivileged test user (the agent counts connections
//! and memory per uid, so the attacker must not be root).
//!
//! ```text
//! shelltrail-e2e-flood SOCKET connect N HOLD_SECS
//!     opens N connections as fast as it can (non-blocking: a full listen
//!     queue is counted, not waited for), sends nothing, holds them
//! shelltrail-e2e-flood SOCKET partial N HOLD_SECS FRAME_BYTES
//!     opens N sessions, then starts a frame of FRAME_BYTES on each: the
//!     length prefix and as much of the body as the agent takes, less 1 KiB,
//!     held unfinished
//! ```
//!
//! It prints `holding` once everything is sent, then after HOLD_SECS one
//! line of counts (`key=value ...`) and exits.

use shelltrail_proto::framing;
use shelltrail_proto::v1::{Open, RecorderFrame, SessionMeta, recorder_frame};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!("usage: shelltrail-e2e-flood SOCKET connect|partial N HOLD_SECS [FRAME_BYTES]");
    std::process::exit(2)
}

/// A non-blocking connect: Err(WouldBlock) when the listen queue is full.
fn connect(path: &str) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path).map_err(std::io::Error::from)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(std::io::Error::from)?;
    Ok(UnixStream::from(fd))
}

/// Whether the agent has closed this connection (EOF or reset).
fn closed_by_agent(s: &mut UnixStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

fn open_frame() -> Vec<u8> {
    let meta = SessionMeta {
        session_id: uuid_v4_like(),
        uid: nix::unistd::getuid().as_raw(),
        mode: "exec".into(),
        ..Default::default()
    };
    let mut buf = Vec::new();
    framing::encode(
        &RecorderFrame {
            body: Some(recorder_frame::Body::Open(Open {
                meta: Some(meta),
                resume: false,
            })),
        },
        &mut buf,
    );
    buf
}

/// A canonical, unique UUID without a dependency on the uuid crate.
fn uuid_v4_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let p = u64::from(std::process::id());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (t >> 32) as u32,
        (t >> 16) as u16,
        (t & 0xfff) as u16,
        (p & 0xfff) as u16,
        n & 0xffff_ffff_ffff
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        usage();
    }
    let socket = &args[1];
    let n: usize = args[3].parse().unwrap_or_else(|_| usage());
    let hold = Duration::from_secs(args[4].parse().unwrap_or_else(|_| usage()));
    let mut conns = Vec::new();
    let (mut queue_full, mut failed, mut accepted, mut refused) = (0, 0, 0, 0);
    // partial: bytes of each connection's frame body sent so far, of body_len.
    let (mut sent, mut body_len): (Vec<usize>, usize) = (Vec::new(), 0);
    match args[2].as_str() {
        "connect" => {
            for _ in 0..n {
                match connect(socket) {
                    Ok(s) => conns.push(s),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => queue_full += 1,
                    Err(_) => failed += 1,
                }
            }
        }
        "partial" => {
            let frame: usize = args.get(5).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            for _ in 0..n {
                let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
                    failed += 1;
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                if s.write_all(&open_frame()).is_err() {
                    failed += 1;
                    continue;
                }
                // The agent's answer: Accepted (or Refused).
                let mut head = [0u8; 64];
                match s.read(&mut head) {
                    Ok(k) if k > 4 && head[4] == 0x0a => accepted += 1,
                    _ => {
                        refused += 1;
                        continue;
                    }
                }
                conns.push(s);
            }
            // Every session open first, then every frame started.
            for s in &mut conns {
                let _ = s.set_nonblocking(true);
                let _ = s.write_all(&(frame as u32).to_be_bytes());
            }
            sent = vec![0usize; conns.len()];
            body_len = frame - 1024;
        }
        _ => usage(),
    }
    println!("holding {}", conns.len());
    let _ = std::io::stdout().flush();
    // Push as much of each body as the agent takes, for as long as it holds.
    let body = vec![0x5au8; body_len];
    let until = Instant::now() + hold;
    while Instant::now() < until {
        let mut progress = false;
        for (s, at) in conns.iter_mut().zip(sent.iter_mut()) {
            while *at < body.len() {
                match s.write(&body[*at..]) {
                    Ok(k) => {
                        *at += k;
                        progress = true;
                    }
                    Err(_) => break,
                }
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let body_bytes: usize = sent.iter().sum();
    let closed = conns.iter_mut().map(closed_by_agent).filter(|c| *c).count();
    println!(
        "connected={} queue_full={queue_full} failed={failed} accepted={accepted} refused={refused} \
         body_bytes={body_bytes} closed_by_agent={closed}",
        conns.len()
    );
}
