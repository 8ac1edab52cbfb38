//! `tail`: how live `shelltrail tail` is, on a host through the agent and
//! anywhere through the collector.
//!
//! A real agent and a real recorder (`shelltrail-shell`, on a PTY this
//! program holds, running `cat`); `shelltrail tail --raw` follows the
//! session. Measured on the host (`tail` talks to the agent's socket):
//! 1. **latency**: a line typed into the session's terminal (echoed by the
//!    PTY, recorded, checked by the agent, sent on) until the tailer prints
//!    it, `--samples N` times, paced 20 ms apart;
//! 2. **join**: from starting `shelltrail tail` (not raw) on a 200×60 screen
//!    full of coloured text until its snapshot has been printed whole;
//! 3. **throughput**: a session printing `--mib M` of base64 with no tailer
//!    and with ten, alternately, `--rounds R` each: wall time of the output.
//!
//! Then through a real collector (`shelltrail collector`, mutual TLS, a
//! throwaway CA), to which a second agent ships: `shelltrail tail --collector`
//! with an operator certificate goes through the collector's `Tail` call
//! (which has the agent cut chunks every 5 ms while the session is tailed):
//! 4. **latency** as in 1, and 5. **join** as in 2.
//!
//! `--host-only` skips 4 and 5, `--collector-only` skips 1 to 3.
//!
//! Needs release binaries: `cargo build --release --bins` first, then
//! `cargo run --release -p shelltrail-benches --bin tail`. Run as root (the
//! recorder's local mode) on an otherwise idle machine.

use shelltrail_benches::{Agent, CollectorProc, CollectorTls, free_port, median, percentile, target_dir};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Opts {
    samples: usize,
    mib: u64,
    rounds: usize,
    host: bool,
    collector: bool,
}

fn main() {
    let mut o = Opts {
        samples: 300,
        mib: 40,
        rounds: 3,
        host: true,
        collector: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match a.as_str() {
            "--samples" => o.samples = num().max(10) as usize,
            "--mib" => o.mib = num().max(1),
            "--rounds" => o.rounds = num().max(1) as usize,
            "--host-only" => o.collector = false,
            "--collector-only" => o.host = false,
            other => {
                eprintln!(
                    "tail: unknown option {other}; options: [--samples N] [--mib M] [--rounds R] \
                     [--host-only | --collector-only]"
                );
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = run(&o) {
        eprintln!("tail: {e}");
        std::process::exit(1);
    }
}

/// A recorder session on a PTY this program holds.
struct Session {
    child: Child,
    master: File,
}

impl Session {
    fn start(shell: &Path, config: &Path, command: &str, cols: u16, rows: u16) -> Result<Session, String> {
        let ws = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).map_err(|e| format!("openpty: {e}"))?;
        let slave: OwnedFd = pty.slave;
        let mut cmd = Command::new(shell);
        cmd.arg("--config").arg(config).args(["-c", command]);
        for v in ["SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY", "SSH_ORIGINAL_COMMAND"] {
            cmd.env_remove(v);
        }
        cmd.env("TERM", "xterm-256color").env("SHELL", "/bin/sh");
        let io = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(|e| e.to_string());
        cmd.stdin(io(&slave)?).stdout(io(&slave)?).stderr(io(&slave)?);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("{}: {e}", shell.display()))?;
        drop(slave);
        Ok(Session {
            child,
            master: File::from(pty.master),
        })
    }

    /// Reads (and drops) what the terminal shows, up to `ms` of quiet.
    fn drain(&self, ms: i32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let mut pfd = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on our stack.
            if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                return out;
            }
            match (&self.master).read(&mut buf) {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Seconds from `first` to `second` on the terminal, read as it comes.
    fn between(&self, first: &[u8], second: &[u8], timeout: Duration) -> Result<f64, String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut t0 = None;
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            let n = match (&self.master).read(&mut buf) {
                Ok(0) | Err(_) => return Err("the session's terminal closed".into()),
                Ok(n) => n,
            };
            seen.extend_from_slice(&buf[..n]);
            let needle = if t0.is_none() { first } else { second };
            if let Some(p) = seen.windows(needle.len()).position(|w| w == needle) {
                match t0 {
                    None => {
                        t0 = Some(Instant::now());
                        seen.drain(..p + needle.len());
                        if seen.windows(second.len()).any(|w| w == second) {
                            return Ok(0.0);
                        }
                    }
                    Some(t) => return Ok(t.elapsed().as_secs_f64()),
                }
            }
            let keep = seen.len().saturating_sub(first.len().max(second.len()));
            seen.drain(..keep);
        }
        Err("timed out".into())
    }

    fn wait_for(&self, needle: &[u8], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            seen.extend(self.drain(50));
            if seen.windows(needle.len()).any(|w| w == needle) {
                return Ok(());
            }
            // Only what a needle split across reads needs.
            let keep = seen.len().saturating_sub(needle.len());
            seen.drain(..keep);
        }
        Err(format!(
            "{:?} not seen on the session's terminal (last bytes: {:?})",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&seen)
        ))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a tailer printed, and when its length reached each value.
type Arrivals = Arc<Mutex<(Vec<u8>, Vec<(usize, Instant)>)>>;

/// A `shelltrail tail` whose stdout is read as it comes, with arrival times.
struct Tailer {
    child: Child,
    seen: Arrivals,
}

/// An operator's way to a collector: `--collector URL --ca --cert --key`.
struct Remote {
    url: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Remote {
    fn args(&self, cmd: &mut Command) {
        cmd.arg("--collector")
            .arg(&self.url)
            .arg("--ca")
            .arg(&self.ca)
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key);
    }
}

impl Tailer {
    /// `shelltrail tail [--raw] ID`, on this host, or through `remote`.
    fn start(cli: &Path, config: &Path, id: &str, raw: bool, remote: Option<&Remote>) -> Result<Tailer, String> {
        let mut cmd = Command::new(cli);
        cmd.arg("--config").arg(config).arg("tail");
        if raw {
            cmd.arg("--raw");
        }
        cmd.arg(id);
        if let Some(r) = remote {
            r.args(&mut cmd);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut out = child.stdout.take().expect("piped");
        let seen: Arrivals = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let s = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut s = s.lock().expect("lock");
                s.0.extend_from_slice(&buf[..n]);
                let len = s.0.len();
                s.1.push((len, Instant::now()));
            }
        });
        Ok(Tailer { child, seen })
    }

    /// When `needle` had fully arrived, waiting up to `timeout`.
    fn arrival(&self, needle: &[u8], from: usize, timeout: Duration) -> Option<(Instant, usize)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            {
                let s = self.seen.lock().expect("lock");
                if let Some(pos) = s.0[from.min(s.0.len())..]
                    .windows(needle.len())
                    .position(|w| w == needle)
                {
                    let end = from + pos + needle.len();
                    let t = s.1.iter().find(|(len, _)| *len >= end).map(|(_, t)| *t)?;
                    return Some((t, end));
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    }
}

impl Drop for Tailer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn live_id(cli: &Path, config: &Path) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = Command::new(cli)
            .arg("--config")
            .arg(config)
            .args(["sessions", "--live", "--json"])
            .output()
            .map_err(|e| e.to_string())?;
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = rows.first().and_then(|r| r["id"].as_str()) {
            return Ok(id.to_string());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("no live session listed within 10 s".into())
}

/// Waits until the collector lists `id` as live (the agent has shipped its start).
fn wait_listed(cli: &Path, config: &Path, remote: &Remote, id: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut cmd = Command::new(cli);
        cmd.arg("--config").arg(config).args(["sessions", "--live", "--json"]);
        remote.args(&mut cmd);
        let out = cmd.output().map_err(|e| e.to_string())?;
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if rows.iter().any(|r| r["id"].as_str() == Some(id)) {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "the collector did not list session {id} as live within 20 s ({last})"
    ))
}

/// Lines typed into `s`, paced 20 ms apart, until `t` prints each: ms.
fn latencies(s: &Session, t: &Tailer, samples: usize) -> Result<Vec<f64>, String> {
    let mut lat = Vec::with_capacity(samples);
    let mut from = 0;
    for i in 0..samples {
        let line = format!("L{i:06}Q");
        let t0 = Instant::now();
        (&s.master)
            .write_all(format!("{line}\r").as_bytes())
            .map_err(|e| e.to_string())?;
        let (at, end) = t
            .arrival(line.as_bytes(), from, Duration::from_secs(5))
            .ok_or_else(|| format!("sample {i}: the tailer did not print it within 5 s"))?;
        from = end;
        lat.push(ms(at.saturating_duration_since(t0)));
        s.drain(0);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(lat)
}

fn print_latency(lat: &[f64], how: &str) {
    let q = |p: f64| percentile(lat, p).map_or("-".into(), |v| format!("{v:.2}"));
    println!(
        "\n## Latency{how}: typed line -> printed by `tail --raw` ({} samples, ms)",
        lat.len()
    );
    println!("| p50 | p90 | p99 | max |\n| ---: | ---: | ---: | ---: |");
    println!("| {} | {} | {} | {} |", q(50.0), q(90.0), q(99.0), q(100.0));
}

/// A session drawing a 200x60 screen full of colour, ending with `SCREEN-END`.
const DRAW: &str = "i=0; while [ $i -lt 59 ]; do printf '\\033[3%dm%03d %0190d\\033[0m\\n' $((i%8)) $i 0; i=$((i+1)); done; \
                    printf 'SCREEN-END'; exec cat";

/// Ten joins of `shelltrail tail` (not raw) on session `id`: ms until the screen is drawn.
fn joins(cli: &Path, config: &Path, id: &str, remote: Option<&Remote>) -> Result<Vec<f64>, String> {
    let mut joins = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        let t = Tailer::start(cli, config, id, false, remote)?;
        let (at, _) = t
            .arrival(b"SCREEN-END", 0, Duration::from_secs(10))
            .ok_or("the joiner never drew the screen")?;
        joins.push(ms(at.saturating_duration_since(t0)));
    }
    Ok(joins)
}

fn print_joins(joins: &[f64], how: &str) {
    println!(
        "\n## Join{how}: `shelltrail tail` started -> 200x60 screen drawn ({} joins, ms, process start included)",
        joins.len()
    );
    println!(
        "median {:.1}, max {:.1}",
        median(joins).unwrap_or(0.0),
        joins.iter().copied().fold(0.0, f64::max)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(o: &Opts) -> Result<(), String> {
    let bin = target_dir();
    let (cli, shell) = (bin.join("shelltrail"), bin.join("shelltrail-shell"));
    for b in [&cli, &shell] {
        if !b.exists() {
            return Err(format!("{} is missing: cargo build --release --bins", b.display()));
        }
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    println!(
        "# shelltrail tail: live output through the agent and through the collector ({})",
        shelltrail_benches::source_version()
    );
    if o.host {
        host(o, &cli, &shell, dir.path())?;
    }
    if o.collector {
        through_collector(o, &cli, &shell, dir.path())?;
    }
    Ok(())
}

/// 1 to 3: `shelltrail tail` on the host, from the agent's socket.
fn host(o: &Opts, cli: &Path, shell: &Path, dir: &Path) -> Result<(), String> {
    let agent = Agent::start(cli, &dir.join("agent"), "", "")?;
    let config: PathBuf = agent.config.clone();

    // 1. Latency.
    let s = Session::start(shell, &config, "printf 'READY\\n'; exec cat", 120, 40)?;
    s.wait_for(b"READY", Duration::from_secs(15))?;
    let id = live_id(cli, &config)?;
    let t = Tailer::start(cli, &config, &id, true, None)?;
    std::thread::sleep(Duration::from_millis(500));
    let lat = latencies(&s, &t, o.samples)?;
    drop(t);
    drop(s);
    print_latency(&lat, " on the host");

    // 2. Join on a 200x60 screen full of colour.
    let s = Session::start(shell, &config, DRAW, 200, 60)?;
    s.wait_for(b"SCREEN-END", Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_millis(300));
    let id = live_id(cli, &config)?;
    let j = joins(cli, &config, &id, None)?;
    drop(s);
    print_joins(&j, " on the host");

    // 3. Throughput with ten tailers against none.
    let bytes = o.mib << 20;
    let work = format!("sleep 1; printf 'GO\\n'; head -c {bytes} /dev/urandom | base64 -w 100; printf 'THE-END\\n'");
    let mut plain = Vec::new();
    let mut watched = Vec::new();
    for round in 0..o.rounds * 2 {
        let with = round % 2 == 1;
        let s = Session::start(shell, &config, &work, 120, 40)?;
        let id = live_id(cli, &config)?;
        let tailers: Vec<Tailer> = if with {
            (0..10)
                .map(|_| Tailer::start(cli, &config, &id, true, None))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let secs = s.between(b"GO", b"THE-END", Duration::from_secs(300))?;
        if with { &mut watched } else { &mut plain }.push(secs);
        drop(tailers);
        drop(s);
    }
    let (p, w) = (median(&plain).unwrap_or(0.0), median(&watched).unwrap_or(0.0));
    println!(
        "\n## Throughput on the host: {} MiB of base64 through the session, {} rounds each (s)",
        o.mib, o.rounds
    );
    println!("| tailers | runs | median |\n| ---: | --- | ---: |");
    println!("| 0 | {plain:.2?} | {p:.2} |");
    println!("| 10 | {watched:.2?} | {w:.2} |");
    println!("ratio (10 tailers / none): {:.3}", if p > 0.0 { w / p } else { 0.0 });
    drop(agent);
    Ok(())
}

/// The host name in the agent's certificate: the collector files its sessions under it.
const HOST: &str = "tail-bench-host";

/// 4 and 5: `shelltrail tail --collector`, through the collector's `Tail` call,
/// with an agent that ships to it.
fn through_collector(o: &Opts, cli: &Path, shell: &Path, dir: &Path) -> Result<(), String> {
    use shelltrail::pki::{Ca, CertRole};
    let ca = Ca::create(&dir.join("pki"), "shelltrail tail benchmark CA").map_err(|e| format!("{e:#}"))?;
    let issue = |file: &str, names: &[&str], role| {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        ca.issue(file, &names, role).map_err(|e| format!("{e:#}"))
    };
    let (cert, key) = issue("collector", &["localhost", "127.0.0.1"], CertRole::Collector)?;
    let (host_cert, host_key) = issue(HOST, &[HOST], CertRole::Host)?;
    let (op_cert, op_key) = issue("operator", &["operator"], CertRole::Operator)?;
    let tls = CollectorTls {
        cert,
        key,
        client_ca: ca.cert_path(),
    };
    let collector = CollectorProc::start(cli, &dir.join("collector"), &tls, free_port()?)?;
    let ship = format!(
        "[ship]\ncollector = {url:?}\nca = {ca:?}\ncert = {host_cert:?}\nkey = {host_key:?}\n",
        url = collector.url(),
        ca = ca.cert_path(),
    );
    let agent = Agent::start_with(cli, &dir.join("agent-ship"), "", "", &ship)?;
    let config: PathBuf = agent.config.clone();
    let remote = Remote {
        url: collector.url(),
        ca: ca.cert_path(),
        cert: op_cert,
        key: op_key,
    };

    // 4. Latency.
    let s = Session::start(shell, &config, "printf 'READY\\n'; exec cat", 120, 40)?;
    s.wait_for(b"READY", Duration::from_secs(15))?;
    let id = live_id(cli, &config)?;
    wait_listed(cli, &config, &remote, &id)?;
    let t = Tailer::start(cli, &config, &id, true, Some(&remote))?;
    std::thread::sleep(Duration::from_millis(500));
    let lat = latencies(&s, &t, o.samples).map_err(|e| format!("through the collector: {e}"))?;
    drop(t);
    drop(s);
    print_latency(&lat, " through the collector");

    // 5. Join on a 200x60 screen full of colour.
    let s = Session::start(shell, &config, DRAW, 200, 60)?;
    s.wait_for(b"SCREEN-END", Duration::from_secs(15))?;
    let id = live_id(cli, &config)?;
    wait_listed(cli, &config, &remote, &id)?;
    // Until its last chunk (cut within [shell] chunk_interval_ms) is shipped.
    std::thread::sleep(Duration::from_millis(500));
    let j = joins(cli, &config, &id, Some(&remote)).map_err(|e| format!("through the collector: {e}"))?;
    drop(s);
    print_joins(&j, " through the collector");
    drop(agent);
    drop(collector);
    Ok(())
}
