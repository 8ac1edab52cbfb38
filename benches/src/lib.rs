//! Shared pieces of shelltrail's benchmarks: deterministic test text, process
//! sampling through `/proc`, statistics and small helpers.
//!
//! * `benches/micro.rs`: criterion micro-benchmarks of the encoder, the chunk
//!   compressor and the spool's group commit.
//! * `src/bin/compare.rs`: end-to-end runs inside a real PTY against a bare
//!   proxy, `script`, asciinema and tlog.
//! * `src/bin/scale.rs`: the agent with a thousand concurrent sessions.
//! * `src/bin/ingest.rs`: the collector: ingest throughput, backlog drain
//!   after an outage, stored bytes.

use shelltrail_proto::framing;
use shelltrail_proto::v1::AgentFrame;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// xorshift64*: deterministic, dependency-free pseudo-random numbers.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

const WORDS: &[&str] = &[
    "total",
    "drwxr-xr-x",
    "-rw-r--r--",
    "root",
    "staff",
    "4096",
    "Jan",
    "17",
    "12:03",
    "src",
    "Cargo.toml",
    "README.md",
    "target",
    "main.rs",
    "lib.rs",
    "error:",
    "warning:",
    "note:",
    "compiling",
    "running",
    "test",
    "ok",
    "FAILED",
    "GET",
    "/api/v1/sessions",
    "200",
    "404",
    "ms",
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "0x7ffd3a2c",
    "=>",
    "{",
    "}",
    "fn",
    "let",
    "mut",
    "self",
    "kB",
    "MiB",
    "systemd[1]:",
    "sshd[4242]:",
    "Accepted",
    "publickey",
    "for",
    "deploy",
    "from",
    "192.0.2.17",
    "port",
    "52311",
];
const UTF8_WORDS: &[&str] = &[
    "café",
    "naïve",
    "über",
    "Ærø",
    "żółć",
    "Привет",
    "мир",
    "Γειά",
    "σου",
    "日本語",
    "漢字",
    "中文字符",
    "한국어",
    "テスト",
    "→",
    "✓",
    "✗",
    "…",
    "│",
    "├──",
    "└──",
    "🙂",
    "🚀",
    "📦",
    "🔥",
    "👍🏽",
];
const SGR: &[&str] = &[
    "\x1b[0m",
    "\x1b[01;34m",
    "\x1b[01;32m",
    "\x1b[31m",
    "\x1b[1;33m",
    "\x1b[38;5;208m",
    "\x1b[48;2;30;30;30m",
    "\x1b[4m",
    "\x1b[K",
    "\x1b[2K\r",
    "\x1b[?25l",
    "\x1b[?25h",
];

/// Terminal-like mixed text: ASCII lines of varied length (as `ls -l`,
/// compilers and logs print), about one line in five coloured with SGR
/// escape sequences (as `ls --color`), about one in ten with non-ASCII UTF-8.
/// Exactly `len` bytes, always valid UTF-8 (the cut falls on a boundary),
/// newline-terminated lines (the PTY turns `\n` into `\r\n`).
pub fn mixed_text(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 256);
    while out.len() < len {
        let width = match rng.below(10) {
            0 => 0,
            1..=3 => 10 + rng.below(30),
            4..=7 => 40 + rng.below(40),
            _ => 80 + rng.below(100),
        } as usize;
        let colour = rng.below(5) == 0;
        let utf8 = rng.below(10) == 0;
        let start = out.len();
        while out.len() - start < width {
            if colour && rng.below(4) == 0 {
                out.extend_from_slice(SGR[rng.below(SGR.len() as u64) as usize].as_bytes());
            }
            let w = if utf8 && rng.below(3) == 0 {
                UTF8_WORDS[rng.below(UTF8_WORDS.len() as u64) as usize]
            } else {
                WORDS[rng.below(WORDS.len() as u64) as usize]
            };
            out.extend_from_slice(w.as_bytes());
            out.push(if rng.below(8) == 0 { b'\t' } else { b' ' });
        }
        if colour {
            out.extend_from_slice(b"\x1b[0m");
        }
        out.push(b'\n');
    }
    out.truncate(utf8_floor(&out, len));
    out
}

/// UTF-8 heavy text: CJK, Cyrillic, Greek, emoji and box drawing, with spaces
/// and newlines; exactly `len` bytes at most, valid UTF-8.
pub fn utf8_text(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 64);
    let mut col = 0;
    while out.len() < len {
        let w = UTF8_WORDS[rng.below(UTF8_WORDS.len() as u64) as usize];
        out.extend_from_slice(w.as_bytes());
        col += w.chars().count() + 1;
        if col > 60 + rng.below(30) as usize {
            out.push(b'\n');
            col = 0;
        } else {
            out.push(b' ');
        }
    }
    out.truncate(utf8_floor(&out, len));
    out
}

/// Uniformly random bytes: almost never valid UTF-8 (the encoder's raw path).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The largest `n <= len` such that `bytes[..n]` ends on a character boundary.
fn utf8_floor(bytes: &[u8], len: usize) -> usize {
    let mut n = len.min(bytes.len());
    while n > 0 && n < bytes.len() && bytes[n] & 0xC0 == 0x80 {
        n -= 1;
    }
    n
}

/// Clock ticks per second of `/proc/PID/stat` times.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// user+system CPU time of a process (all its threads, not its children),
/// from `/proc/PID/stat`. Readable for a zombie too, where it is final.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) may hold spaces and ')': split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_ascii_whitespace();
    // rest starts at field 3; utime and stime are fields 14 and 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let ticks = utime + stime;
    let hz = clk_tck();
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// The machine's CPU time counters (`/proc/stat`, first line): user, nice,
/// system, idle, iowait, irq, softirq, steal, in ticks.
pub fn sys_cpu() -> Option<[u64; 8]> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let mut out = [0u64; 8];
    for (o, x) in out.iter_mut().zip(v) {
        *o = x;
    }
    Some(out)
}

/// The machine's CPU time between two [`sys_cpu`] readings.
#[derive(Default, Clone)]
pub struct SysWin {
    /// "user / system / iowait / idle" in % of all CPUs.
    pub split: String,
    /// CPU seconds spent running anything (user, nice, system, irq, softirq).
    pub busy: Option<f64>,
}

pub fn sys_window(a: Option<[u64; 8]>, b: Option<[u64; 8]>) -> SysWin {
    let (Some(a), Some(b)) = (a, b) else {
        return SysWin {
            split: "-".into(),
            busy: None,
        };
    };
    let d: Vec<f64> = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| y.saturating_sub(*x) as f64)
        .collect();
    let total: f64 = d.iter().sum();
    if total <= 0.0 {
        return SysWin {
            split: "-".into(),
            busy: None,
        };
    }
    let pct = |x: f64| 100.0 * x / total;
    let busy = d[0] + d[1] + d[2] + d[5] + d[6];
    SysWin {
        split: format!(
            "{:.0} / {:.0} / {:.0} / {:.0}",
            pct(d[0] + d[1]),
            pct(d[2] + d[5] + d[6]),
            pct(d[4]),
            pct(d[3] + d[7])
        ),
        busy: Some(busy / clk_tck() as f64),
    }
}

/// A `kB` field of `/proc/PID/status` (VmHWM, VmRSS...), in bytes.
pub fn status_kb(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// One field of `/proc/PID/task/TID/io` (e.g. `syscw`) of the thread named `comm`.
pub fn thread_io(pid: i32, comm: &str, field: &str) -> Option<u64> {
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let dir = e.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim_end() != comm {
            continue;
        }
        let io = std::fs::read_to_string(dir.join("io")).ok()?;
        return io
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().parse().ok());
    }
    None
}

/// user+system CPU time of each thread of `pid`, summed by thread name.
pub fn thread_cpu(pid: i32) -> std::collections::BTreeMap<String, Duration> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    let hz = clk_tck();
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let mut f = stat[close + 2..].split_ascii_whitespace();
        let (Some(u), Some(s)) = (
            f.nth(11).and_then(|v| v.parse::<u64>().ok()),
            f.next().and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        *out.entry(name).or_insert(Duration::ZERO) += Duration::from_nanos((u + s) * 1_000_000_000 / hz);
    }
    out
}

/// What a [`Sampler`] saw last.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    pub cpu: Option<Duration>,
    /// Peak resident set (VmHWM), bytes.
    pub hwm: Option<u64>,
    /// CPU time by thread name (threads of one name summed), last seen.
    pub threads: std::collections::BTreeMap<String, Duration>,
}

/// Samples a process's CPU time and VmHWM every `period` on a thread, keeping
/// the last values read. VmHWM is a high-water mark, so the last sample is
/// the peak up to at most one period before the process exited.
pub struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Sample>>,
}

impl Sampler {
    pub fn start(pid: i32, period: Duration) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = Sample::default();
            loop {
                if let Some(c) = cpu_time(pid) {
                    last.cpu = Some(c);
                }
                if let Some(h) = status_kb(pid, "VmHWM") {
                    last.hwm = Some(h);
                }
                // Threads that exited vanish from /proc: keep what they showed last.
                for (name, t) in thread_cpu(pid) {
                    let e = last.threads.entry(name).or_insert(t);
                    *e = (*e).max(t);
                }
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return last;
                }
                std::thread::sleep(period);
            }
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns the last sample.
    pub fn finish(mut self) -> Sample {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The median of `v` (mean of the two middle values for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// The `p`-th percentile (0..=100) of `v`, nearest rank.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// The machine, for the report: CPUs, CPU model, kernel, OS.
pub fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = status_like("/proc/meminfo", "MemTotal")
        .map_or("?".into(), |b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64));
    let kernel = format!(
        "{} {} {}",
        read_trim("/proc/sys/kernel/ostype"),
        read_trim("/proc/sys/kernel/osrelease"),
        std::env::consts::ARCH
    );
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
        .unwrap_or_else(|| "?".into());
    vec![
        ("nproc".into(), nproc.to_string()),
        ("cpu".into(), model),
        ("memory".into(), mem),
        ("kernel".into(), kernel),
        ("os".into(), os),
    ]
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "?".into(), |s| s.trim().to_string())
}

fn status_like(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        Some(v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
    })
}

/// The git commit of the workspace the benchmarks were built from, marked
/// "+ uncommitted changes" when the recorder's sources differ from it.
pub fn source_version() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--", "agent", "cast", "proto"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("git {head} + uncommitted changes in agent/, cast/ or proto/")
            } else {
                format!("git {head}")
            }
        }
        None => "unknown (not a git checkout)".into(),
    }
}

/// First line of `program args...`'s output (stdout, else stderr), if it runs.
pub fn version_of(program: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8_lossy(&text)
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

/// Finds `name` on `$PATH` (and in `extra` directories first).
pub fn which(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    extra
        .iter()
        .cloned()
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The directory holding this executable (`target/release`), where the
/// shelltrail binaries are built too.
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

/// Bytes as MiB with one decimal.
pub fn mib(b: f64) -> String {
    format!("{:.1}", b / (1u64 << 20) as f64)
}

/// Total size of the regular files in `dir` whose names end with `suffix`.
pub fn dir_bytes(dir: &Path, suffix: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Prints a Markdown table: a header row, then rows, columns padded; the
/// first column left-aligned, the others right-aligned.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    print_table_left(header, rows, 1)
}

/// [`print_table`] with the first `left` columns left-aligned.
pub fn print_table_left(header: &[&str], rows: &[Vec<String>], left: usize) {
    let cols = header.len();
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::from("|");
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            if i < left {
                s.push_str(&format!(" {c}{} |", " ".repeat(pad)));
            } else {
                s.push_str(&format!(" {}{c} |", " ".repeat(pad)));
            }
        }
        println!("{s}");
    };
    line(header.iter().map(|h| h.to_string()).collect());
    let mut sep = String::from("|");
    for (i, wi) in w.iter().enumerate() {
        if i < left {
            sep.push_str(&format!(" {} |", "-".repeat(*wi)));
        } else {
            sep.push_str(&format!(" {}: |", "-".repeat(wi.saturating_sub(1))));
        }
    }
    println!("{sep}");
    for r in rows {
        line(r.clone());
    }
}

/// A `shelltrail agent` started for a benchmark, in its own directory (socket,
/// spool, config and log); stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Agent {
    child: std::process::Child,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub spool: PathBuf,
}

impl Agent {
    /// Writes a config (`socket` and `spool_dir` in `dir`, plus `shell_extra`
    /// lines under `[shell]` and `agent_extra` under `[agent]`) and starts
    /// `cli --config CFG agent`, waiting until its socket exists.
    pub fn start(cli: &Path, dir: &Path, shell_extra: &str, agent_extra: &str) -> Result<Agent, String> {
        Self::start_with(cli, dir, shell_extra, agent_extra, "")
    }

    /// [`start`](Self::start) with `tables` (whole TOML tables, such as
    /// `[ship]`) appended to the config after `[agent]`.
    pub fn start_with(
        cli: &Path,
        dir: &Path,
        shell_extra: &str,
        agent_extra: &str,
        tables: &str,
    ) -> Result<Agent, String> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Reachable by a set-uid recorder (its own user), as /run/shelltrail is.
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        let socket = dir.join("agent.sock");
        let spool = dir.join("spool");
        let fallback = dir.join("fallback");
        let config = dir.join("shelltrail.toml");
        let text = format!(
            "# Written by the shelltrail benchmarks.\nsocket = {socket:?}\nspool_dir = {spool:?}\n\
             fallback_dir = {fallback:?}\n\
             recorder_user = \"shelltrail-bench-rec\"\n\n[shell]\n{shell_extra}\n\n[agent]\n{agent_extra}\n"
        );
        let text = if tables.is_empty() {
            text
        } else {
            format!("{text}\n{tables}\n")
        };
        std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        // The recorder refuses a config file others can write.
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("agent.log")).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(cli)
            .arg("--config")
            .arg(&config)
            .arg("agent")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", cli.display()))?;
        let mut agent = Agent {
            child,
            dir: dir.to_path_buf(),
            config,
            spool,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !socket.exists() {
            if let Ok(Some(st)) = agent.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
                return Err(format!("the agent exited ({st}): {}", log.trim()));
            }
            if std::time::Instant::now() > deadline {
                return Err("the agent did not create its socket within 15 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(agent)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Stops the agent: SIGTERM, up to 5 s, then SIGKILL.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one agent frame from the agent's socket (`None` at end of stream).
pub async fn next_frame(
    r: &mut tokio::net::unix::OwnedReadHalf,
    buf: &mut Vec<u8>,
) -> Result<Option<AgentFrame>, String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(f) = framing::take::<AgentFrame>(buf, 1 << 20).map_err(|e| e.to_string())? {
            return Ok(Some(f));
        }
        let n = r.read_buf(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
    }
}

/// A recorder's side of one session on the agent's socket, after `Accepted`.
pub struct Opened {
    pub rd: tokio::net::unix::OwnedReadHalf,
    pub wr: tokio::net::unix::OwnedWriteHalf,
    /// From connecting to reading `Accepted`.
    pub open_latency: Duration,
}

/// Opens a new session on the agent's socket as a recorder does: connect,
/// send `Open`, expect `Accepted` at seq 0.
pub async fn open_session(socket: &Path, meta: shelltrail_proto::v1::SessionMeta) -> Result<Opened, String> {
    use shelltrail_proto::v1::{Open, RecorderFrame, agent_frame, recorder_frame};
    use tokio::io::AsyncWriteExt;
    let t = std::time::Instant::now();
    let s = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut rd, mut wr) = s.into_split();
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
    wr.write_all(&buf).await.map_err(|e| e.to_string())?;
    let mut rbuf = Vec::new();
    match next_frame(&mut rd, &mut rbuf).await? {
        Some(AgentFrame {
            body: Some(agent_frame::Body::Accepted(a)),
        }) if a.next_seq == 0 => Ok(Opened {
            rd,
            wr,
            open_latency: t.elapsed(),
        }),
        Some(AgentFrame {
            body: Some(agent_frame::Body::Refused(r)),
        }) => Err(format!("refused: {}", r.reason)),
        other => Err(format!("unexpected answer to Open: {other:?}")),
    }
}

/// Raises the soft open-file limit to the hard one, at most 65 536 (what the
/// systemd units give the agent and the collector): thousands of sessions or
/// host streams each hold a socket, and the peers started here inherit it.
/// Returns the limit now in force.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let want = hard.min(65536).max(soft);
            if setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
                want
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A `shelltrail collector` process; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct CollectorProc {
    child: std::process::Child,
    pub port: u16,
    /// Its `data_dir`.
    pub data: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

/// A collector's own certificate and key, and the CA its clients' are checked against.
#[derive(Debug, Clone)]
pub struct CollectorTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl CollectorProc {
    /// Writes the collector's config in `dir` and starts it on `port`,
    /// storing in `dir/data`; returns once the port accepts connections.
    pub fn start(cli: &Path, dir: &Path, tls: &CollectorTls, port: u16) -> Result<CollectorProc, String> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let data = dir.join("data");
        let config = dir.join("collector.toml");
        let text = format!(
            "# Written by the shelltrail benchmarks.\n\
             [collector]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {data:?}\noperators = [\"operator\"]\n\n\
             [collector.tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\n",
            cert = tls.cert,
            key = tls.key,
            ca = tls.client_ca,
        );
        std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())?;
        let log = dir.join("collector.log");
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(cli)
            .arg("--config")
            .arg(&config)
            .arg("collector")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", cli.display()))?;
        let mut c = CollectorProc { child, port, data, log };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(st)) = c.child.try_wait() {
                return Err(format!("the collector exited ({st}): {}", c.log_text()));
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("the collector did not listen within 15 s: {}", c.log_text()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(c)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Stops the collector: SIGTERM, up to 20 s (it gives streams 10 s), then SIGKILL.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CollectorProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Seconds since the Unix epoch, as the collector writes `received_unix_ms`.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_exact_and_valid() {
        let m = mixed_text(100_000, 1);
        assert!(m.len() <= 100_000 && m.len() > 99_990);
        assert!(std::str::from_utf8(&m).is_ok());
        assert!(m.contains(&0x1b));
        let u = utf8_text(50_000, 2);
        assert!(std::str::from_utf8(&u).is_ok());
        assert_eq!(random_bytes(1000, 3).len(), 1000);
        assert!(std::str::from_utf8(&random_bytes(1000, 3)).is_err());
    }

    #[test]
    fn stats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
    }

    #[test]
    fn proc_of_self() {
        let me = std::process::id() as i32;
        assert!(cpu_time(me).is_some());
        assert!(status_kb(me, "VmHWM").unwrap() > 0);
    }
}
