//! End-to-end comparison of shelltrail with other terminal recorders, each run
//! inside a real PTY.
//!
//! The harness opens a PTY pair for the "user's terminal", runs the recorder
//! with stdin/stdout/stderr on its slave side (as its controlling terminal,
//! in a new session, the way sshd starts a login), and reads the master as
//! fast as it can, as a fast terminal emulator would. Peers:
//!
//! * `bare`: `peers/bareproxy.c`, a PTY proxy that records nothing: the floor.
//! * `recording-off`: shelltrail's own PTY proxy (`shelltrail::shell::pty::run`,
//!   the wrapper's copy loop and hand-off) with the recorder replaced by a sink
//!   that drops every burst: the wrapper with recording off. This binary runs
//!   it itself (`compare --recording-off SHELL -c WORKLOAD`), with the login
//!   shell shelltrail-shell would run.
//! * `shelltrail`, `shelltrail+input`: `shelltrail-shell -c WORKLOAD` with a
//!   real agent (fresh spool per run), `record_input` off and on.
//! * `script`: util-linux `script -qfc WORKLOAD FILE`.
//! * `asciinema`: asciinema 3, `asciinema rec -q --overwrite -c WORKLOAD FILE`.
//! * `tlog`: `tlog-rec --writer=file` (Debian's tlog), when installed.
//!
//! Peers alternate run by run (round-robin, the first peer rotating each
//! round) so that noise from other work on the machine spreads over all of
//! them; medians and ratios to `bare` are printed.
//!
//! Usage: `cargo build --release --bins && cargo run --release -p shelltrail-benches --bin compare -- [--quick]`
//! Options: `--quick`, `--rounds N`, `--peers a,b`, `--workloads a,b`, `--keep`,
//! `--level N` (shelltrail's `compression_level`, default: the config default, 1).

use nix::pty::{Winsize, openpty};
use shelltrail_benches::{
    Agent, Sampler, cpu_time, dir_bytes, machine, median, mib, percentile, print_table, print_table_left, status_kb,
    sys_cpu, sys_window, target_dir, version_of, which,
};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BARE_SOURCE: &str = include_str!("../../peers/bareproxy.c");
const SAMPLE_PERIOD: Duration = Duration::from_millis(10);
const MIB: f64 = (1u64 << 20) as f64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bare,
    RecordingOff,
    /// `setuid`: installed as the packages do (set-uid to its recorder user,
    /// with capabilities), so the privilege separation runs; else a plain
    /// copy run by root, which records without separating.
    Shelltrail {
        input: bool,
        setuid: bool,
    },
    Script,
    Asciinema,
    Tlog,
}

struct Peer {
    kind: Kind,
    name: &'static str,
    program: PathBuf,
    version: String,
}

#[derive(Clone, Debug)]
enum Work {
    /// Prints a lot; timed from spawn to exit.
    Output { cmd: String },
    /// Keystroke echo through `cat > /dev/null` on the cooked inner PTY.
    Echo { samples: usize },
    /// `true`: the cost of starting and ending a recorded session.
    Startup,
}

#[derive(Clone, Debug)]
struct Workload {
    name: String,
    what: String,
    work: Work,
    timeout: Duration,
}

impl Workload {
    fn command(&self) -> String {
        match &self.work {
            Work::Output { cmd } => cmd.clone(),
            Work::Echo { .. } => "echo READY; exec cat >/dev/null".into(),
            Work::Startup => "true".into(),
        }
    }
}

/// What one run measured.
#[derive(Default, Debug)]
struct Run {
    error: Option<String>,
    wall: Duration,
    /// Bytes the "terminal" (the harness) read from the outer master.
    out_bytes: u64,
    cpu: Option<Duration>,
    /// CPU seconds the whole machine was busy (every process, the kernel's
    /// tty work included) from spawning the recorder until it exited.
    machine_cpu: Option<f64>,
    hwm: Option<u64>,
    /// The recorder's CPU by thread name (last 10 ms sample before exit).
    threads: BTreeMap<String, Duration>,
    agent_cpu: Option<Duration>,
    agent_hwm: Option<u64>,
    /// Bytes the recorder stored: shelltrail's spool segments, the others' file.
    stored: Option<u64>,
    echo_us: Vec<f64>,
    exit: Option<i32>,
    export: Option<Export>,
}

/// Sizes around shelltrail's exported `.cast` (first round only).
#[derive(Debug, Clone)]
struct Export {
    cast: u64,
    gzip6: Option<u64>,
    zstd3: Option<u64>,
    /// `export --raw` gave back exactly the bytes the terminal received.
    raw_matches: Option<bool>,
}

struct Opts {
    quick: bool,
    rounds: usize,
    peers: Option<Vec<String>>,
    workloads: Option<Vec<String>>,
    keep: bool,
    level: Option<i32>,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        quick: false,
        rounds: 0,
        peers: None,
        workloads: None,
        keep: false,
        level: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let list = |v: Option<String>| -> Result<Vec<String>, String> {
            Ok(v.ok_or(format!("{a} needs a value"))?
                .split(',')
                .map(|s| s.trim().to_string())
                .collect())
        };
        match a.as_str() {
            "--quick" => o.quick = true,
            "--rounds" => {
                o.rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--rounds needs a positive number")?
            }
            "--peers" => o.peers = Some(list(it.next())?),
            "--workloads" => o.workloads = Some(list(it.next())?),
            "--keep" => o.keep = true,
            "--level" => {
                o.level = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .ok_or("--level needs a zstd level (-7..19)")?,
                )
            }
            "-h" | "--help" => {
                println!(
                    "usage: compare [--quick] [--rounds N] [--peers bare,shelltrail,shelltrail+input,script,asciinema,tlog] \
                     [--workloads text,lines,echo,startup] [--keep] [--level N]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if o.rounds == 0 {
        o.rounds = if o.quick { 2 } else { 5 };
    }
    Ok(o)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--recording-off") {
        std::process::exit(recording_off(&args[1..]));
    }
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::exit(2);
        }
    };
    match run(&opts) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("compare: cannot run: {e}");
            std::process::exit(1);
        }
    }
}

/// The `recording-off` peer: the wrapper's PTY proxy, as `shelltrail-shell`
/// runs it (same channels, same buffer recycling), feeding a sink instead of
/// the recorder thread. What recording costs is shelltrail's time over this.
fn recording_off(cmd: &[String]) -> i32 {
    use shelltrail::shell::{pty, record::Event};
    let Some((program, args)) = cmd.split_first() else {
        eprintln!("compare --recording-off: no command");
        return 2;
    };
    let (events, received) = mpsc::sync_channel(256);
    let (recycle, recycled) = mpsc::sync_channel(4);
    let sink = std::thread::spawn(move || {
        for ev in received {
            if let Event::Output(_, buf) = ev {
                let _ = recycle.try_send(buf);
            }
        }
    });
    let mut c = Command::new(program);
    c.args(args);
    let mut sep = shelltrail::shell::privsep::Separation::unseparated();
    let code = match pty::run(c, events, recycled, false, &mut sep) {
        Ok(outcome) => outcome.code,
        Err(e) => {
            eprintln!("compare --recording-off: {e:#}");
            1
        }
    };
    // Not joined: a background job may still hold the PTY (and so the copy
    // loop and the sink) after the drain gave up; exiting ends them.
    drop(sink);
    code
}

/// Everything a run needs.
struct Env {
    tmp: PathBuf,
    cli: PathBuf,
    level: Option<i32>,
}

fn run(opts: &Opts) -> Result<(), String> {
    let bin = target_dir();
    let shell = bin.join("shelltrail-shell");
    let cli = bin.join("shelltrail");
    for b in [&shell, &cli] {
        if !b.is_file() {
            return Err(format!(
                "{} is missing: build it first with `cargo build --release -p shelltrail --bins`",
                b.display()
            ));
        }
    }
    warn_if_stale(&shell);

    let tmp = tempfile::Builder::new()
        .prefix("shelltrail-compare-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let tmp_path = tmp.path().to_path_buf();

    // The floor: compile the bare proxy.
    let src = tmp_path.join("bareproxy.c");
    std::fs::write(&src, BARE_SOURCE).map_err(|e| e.to_string())?;
    let bare = tmp_path.join("bareproxy");
    let cc = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bare)
        .arg(&src)
        .arg("-lutil")
        .status()
        .map_err(|e| format!("cc: {e} (install gcc)"))?;
    if !cc.success() {
        return Err(format!("compiling the bare proxy failed: {cc}"));
    }

    // The peers that exist here.
    let home_cargo = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin"))
        .into_iter()
        .collect::<Vec<_>>();
    let mut peers = vec![Peer {
        kind: Kind::Bare,
        name: "bare",
        program: bare.clone(),
        version: format!(
            "peers/bareproxy.c, {}",
            version_of(Path::new("cc"), &["--version"]).unwrap_or_else(|| "cc".into())
        ),
    }];
    let st_version = version_of(&cli, &["--version"]).unwrap_or_else(|| "?".into());
    peers.push(Peer {
        kind: Kind::RecordingOff,
        name: "recording-off",
        program: std::env::current_exe().map_err(|e| format!("this executable: {e}"))?,
        version: format!("{st_version}: shelltrail::shell::pty::run with the recorder replaced by a sink"),
    });
    let setuid_copy = install_setuid(&shell, &tmp_path);
    if let Err(e) = &setuid_copy {
        eprintln!("compare: no set-uid shelltrail peer: {e}");
    }
    let mut variants = vec![(false, false, "shelltrail-nosep", shell.clone())];
    if let Ok(p) = &setuid_copy {
        variants.push((false, true, "shelltrail", p.clone()));
        variants.push((true, true, "shelltrail+input", p.clone()));
    } else {
        variants.push((true, false, "shelltrail+input", shell.clone()));
    }
    for (input, setuid, name, program) in variants {
        peers.push(Peer {
            kind: Kind::Shelltrail { input, setuid },
            name,
            program: program.clone(),
            version: format!(
                "{st_version} ({}{}, record_input = {input}, compression_level = {})",
                program.display(),
                if setuid {
                    ", set-uid shelltrail-bench-rec + capabilities: privilege separation"
                } else {
                    ", not set-uid: no privilege separation"
                },
                opts.level.map_or_else(
                    || format!(
                        "{} (default)",
                        shelltrail::config::ShellConfig::default().compression_level
                    ),
                    |l| l.to_string()
                )
            ),
        });
    }
    let mut missing = Vec::new();
    match which("script", &[]) {
        Some(p) => peers.push(Peer {
            kind: Kind::Script,
            name: "script",
            version: version_of(&p, &["--version"]).unwrap_or_default(),
            program: p,
        }),
        None => missing.push("script: not installed (apt-get install -y util-linux), skipped"),
    }
    match which("asciinema", &home_cargo) {
        Some(p) => peers.push(Peer {
            kind: Kind::Asciinema,
            name: "asciinema",
            version: version_of(&p, &["--version"]).unwrap_or_default(),
            program: p,
        }),
        None => missing.push("asciinema: not installed (cargo install --locked asciinema), skipped"),
    }
    match which("tlog-rec", &[]) {
        // tlog-rec refuses to run without a utmp file, which containers lack.
        Some(_) if !Path::new("/run/utmp").exists() && !Path::new("/var/run/utmp").exists() => missing.push(
            "tlog: /run/utmp is missing (tlog-rec needs it; create it with \
             `install -m 664 -g utmp /dev/null /run/utmp`), skipped",
        ),
        Some(p) => peers.push(Peer {
            kind: Kind::Tlog,
            name: "tlog",
            version: format!(
                "{} (tlog-rec --writer=file)",
                version_of(&p, &["--version"]).unwrap_or_default()
            ),
            program: p,
        }),
        None => missing.push("tlog: not installed, skipped"),
    }
    if let Some(want) = &opts.peers {
        peers.retain(|p| matches!(p.kind, Kind::Bare | Kind::RecordingOff) || want.iter().any(|w| w == p.name));
    }

    // Workloads.
    let text_bytes: u64 = if opts.quick { 64 << 20 } else { 512 << 20 };
    let lines: u64 = if opts.quick { 200_000 } else { 2_000_000 };
    let samples = if opts.quick { 500 } else { 2000 };
    let text_file = tmp_path.join("mixed.txt");
    let mut workloads = vec![
        Workload {
            name: "text".into(),
            what: format!(
                "`cat` of {} MiB of mixed text (ASCII lines of varied length, SGR colours, some UTF-8)",
                text_bytes >> 20
            ),
            work: Work::Output {
                cmd: format!("cat {}", text_file.display()),
            },
            timeout: Duration::from_secs(600),
        },
        Workload {
            name: "lines".into(),
            what: format!("`seq {lines}`: {lines} short lines, one write(2) each"),
            work: Work::Output {
                cmd: format!("seq {lines}"),
            },
            timeout: Duration::from_secs(600),
        },
        Workload {
            name: "echo".into(),
            what: format!(
                "keystroke echo: {samples} single bytes (CR every 50th) into `cat > /dev/null` on the cooked inner PTY, ~1 ms apart"
            ),
            work: Work::Echo { samples },
            timeout: Duration::from_secs(120),
        },
        Workload {
            name: "startup".into(),
            what: "`true`: start and end one recorded session".into(),
            work: Work::Startup,
            timeout: Duration::from_secs(60),
        },
    ];
    if let Some(want) = &opts.workloads {
        workloads.retain(|w| want.contains(&w.name));
    }

    // The header: machine and versions.
    println!("# shelltrail end-to-end comparison");
    println!();
    for (k, v) in machine() {
        println!("{k:>8}: {v}");
    }
    println!("  source: {}", shelltrail_benches::source_version());
    println!();
    println!("peers:");
    for p in &peers {
        println!("  {:<17} {}", p.name, p.version);
    }
    for m in &missing {
        println!("  {m}");
    }
    println!(
        "  gzip: {}; zstd: {}",
        version_of(Path::new("gzip"), &["--version"]).unwrap_or_else(|| "not installed".into()),
        version_of(Path::new("zstd"), &["--version"]).unwrap_or_else(|| "not installed".into())
    );
    println!(
        "rounds: {} (peers alternate run by run){}",
        opts.rounds,
        if opts.quick { "; --quick" } else { "" }
    );
    println!();

    if workloads.iter().any(|w| w.name == "text") {
        eprintln!("generating {} MiB of mixed text...", text_bytes >> 20);
        write_text(&text_file, text_bytes)?;
    }
    let env = Env {
        tmp: tmp_path.clone(),
        cli: cli.clone(),
        level: opts.level,
    };

    for w in &workloads {
        let mut runs: BTreeMap<&'static str, Vec<Run>> = BTreeMap::new();
        for round in 0..opts.rounds {
            for i in 0..peers.len() {
                let p = &peers[(i + round) % peers.len()];
                let export = round == 0 && matches!(p.kind, Kind::Shelltrail { input: false, .. });
                let r = run_one(&env, p, w, round, export && matches!(w.work, Work::Output { .. }));
                eprintln!(
                    "  [{} {}/{}] {:<17} {}",
                    w.name,
                    round + 1,
                    opts.rounds,
                    p.name,
                    match &r.error {
                        Some(e) => format!("FAILED: {e}"),
                        None => format!(
                            "{:.3} s, {} MiB out{}",
                            r.wall.as_secs_f64(),
                            mib(r.out_bytes as f64),
                            if r.echo_us.is_empty() {
                                String::new()
                            } else {
                                format!(", echo p50 {:.0} us", median(&r.echo_us).unwrap_or(f64::NAN))
                            }
                        ),
                    }
                );
                runs.entry(p.name).or_default().push(r);
                // Dirty pages of this run's recording must not slow the next one.
                // SAFETY: sync(2) has no preconditions.
                unsafe { libc::sync() };
            }
        }
        report(w, &peers, &runs);
    }

    let _ = std::fs::remove_dir_all(trusted_dir());
    if opts.keep {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(())
}

/// Warns when a source file of the recorder is newer than its binary.
fn warn_if_stale(bin: &Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest = None;
    let mut stack = vec![root.join("agent/src"), root.join("cast/src"), root.join("proto/src")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified())
                && m > built
            {
                newest = Some(p);
            }
        }
    }
    if let Some(p) = newest {
        eprintln!(
            "compare: warning: {} is newer than {}: rebuild with `cargo build --release -p shelltrail --bins`",
            p.display(),
            bin.display()
        );
    }
}

fn write_text(path: &Path, bytes: u64) -> Result<(), String> {
    let mut f = std::io::BufWriter::new(File::create(path).map_err(|e| e.to_string())?);
    let piece = 8 << 20;
    let mut left = bytes as usize;
    let mut seed = 100;
    while left > 0 {
        let n = left.min(piece);
        let text = shelltrail_benches::mixed_text(n, seed);
        f.write_all(&text).map_err(|e| e.to_string())?;
        left -= n;
        seed += 1;
    }
    f.flush().map_err(|e| e.to_string())
}

/// The system user the set-uid peer runs as (created when missing).
const BENCH_RECORDER_USER: &str = "shelltrail-bench-rec";

/// A copy of the recorder in `dir`, installed as the packages install it:
/// owned by [`BENCH_RECORDER_USER`], set-uid, with the capabilities to take
/// the terminal. Needs root (useradd, chown, setcap).
fn install_setuid(shell: &Path, dir: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        return Err("not root (the set-uid install needs root)".into());
    }
    let user = match nix::unistd::User::from_name(BENCH_RECORDER_USER).map_err(|e| e.to_string())? {
        Some(u) => u,
        None => {
            let st = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    BENCH_RECORDER_USER,
                ])
                .status()
                .map_err(|e| format!("useradd: {e}"))?;
            if !st.success() {
                return Err(format!("useradd {BENCH_RECORDER_USER}: {st}"));
            }
            nix::unistd::User::from_name(BENCH_RECORDER_USER)
                .map_err(|e| e.to_string())?
                .ok_or("useradd made no user")?
        }
    };
    // The recorder, once it runs as its own user, reads the config and
    // reaches the socket under here.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let sub = dir.join("setuid");
    std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
    let to = sub.join("shelltrail-shell");
    std::fs::copy(shell, &to).map_err(|e| format!("copying {}: {e}", shell.display()))?;
    nix::unistd::chown(&to, Some(user.uid), None).map_err(|e| format!("chown: {e}"))?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o4755)).map_err(|e| e.to_string())?;
    let st = Command::new("setcap")
        .arg("cap_chown,cap_sys_tty_config+ep")
        .arg(&to)
        .status()
        .map_err(|e| format!("setcap: {e} (install libcap2-bin)"))?;
    if !st.success() {
        return Err(format!("setcap: {st}"));
    }
    Ok(to)
}

/// Where the set-uid peer's configs go: the recorder reads only files under
/// /etc/shelltrail. Removed when compare ends.
fn trusted_dir() -> PathBuf {
    PathBuf::from(format!("/etc/shelltrail/compare-{}", std::process::id()))
}

/// A root-owned copy of `config` under [`trusted_dir`].
fn trusted_copy(config: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = trusted_dir();
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
    let to = dir.join(format!(
        "{}.toml",
        config
            .parent()
            .and_then(|p| p.parent())
            .and_then(|p| p.file_name())
            .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned())
    ));
    let _ = std::fs::copy(config, &to);
    let _ = std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644));
    to
}

/// The command line of `peer` running `workload`, recording into `out`.
fn command(peer: &Peer, workload: &str, out: &Path, agent: Option<&Agent>) -> Command {
    let mut c = Command::new(&peer.program);
    match peer.kind {
        Kind::Bare => {
            c.args(["/bin/sh", "-c", workload]);
        }
        Kind::RecordingOff => {
            // The shell shelltrail-shell runs: this user's login shell.
            let shell = nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map_or_else(|| PathBuf::from("/bin/sh"), |u| u.shell);
            c.arg("--recording-off").arg(shell).args(["-c", workload]);
        }
        Kind::Shelltrail { setuid, .. } => {
            let config = agent.expect("an agent").config.clone();
            // A set-uid recorder reads only root's files under /etc/shelltrail.
            let config = if setuid { trusted_copy(&config) } else { config };
            c.arg("--config").arg(config).args(["-c", workload]);
        }
        Kind::Script => {
            c.arg("-qfc").arg(workload).arg(out);
        }
        Kind::Asciinema => {
            c.args(["rec", "-q", "--overwrite", "-c", workload]).arg(out);
        }
        Kind::Tlog => {
            // The default rate limit (16 KiB/s, then "pass": stop logging)
            // would drop almost everything: log it all, as an audit must.
            c.args([
                "--writer=file",
                "--limit-rate=1000000000000",
                "--limit-burst=1000000000000",
                "--limit-action=pass",
            ])
            .arg(format!("--file-path={}", out.display()))
            .args(["/bin/sh", "-c", workload]);
        }
    }
    // Outside ssh, with the same terminal type for everyone.
    for v in [
        "SSH_CONNECTION",
        "SSH_CLIENT",
        "SSH_TTY",
        "SSH_ORIGINAL_COMMAND",
        "SSH_USER_AUTH",
        "ASCIINEMA_REC",
        "ASCIINEMA_SESSION",
    ] {
        c.env_remove(v);
    }
    c.env("TERM", "xterm-256color")
        .env("SHELL", "/bin/sh")
        .env("LANG", "C.UTF-8");
    c
}

/// Stops the watchdog when dropped.
struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    /// SIGKILLs `pid` if not disarmed within `timeout`.
    fn arm(pid: i32, timeout: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let fired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = fired.clone();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                // SAFETY: our unreaped child (the watchdog is disarmed before reaping).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        });
        Watchdog { done: Some(tx), fired }
    }

    fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

fn run_one(env: &Env, peer: &Peer, w: &Workload, round: usize, export: bool) -> Run {
    let dir = env.tmp.join(format!("run-{}-{}-{round}", peer.name, w.name));
    let mut run = Run::default();
    if let Err(e) = run_in(env, peer, w, &dir, export, &mut run) {
        run.error = Some(e);
    }
    let _ = std::fs::remove_dir_all(&dir);
    run
}

fn run_in(env: &Env, peer: &Peer, w: &Workload, dir: &Path, export: bool, run: &mut Run) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let agent = match peer.kind {
        Kind::Shelltrail { input, .. } => Some(Agent::start(
            &env.cli,
            &dir.join("agent"),
            &format!(
                "record_input = {input}\n{}",
                env.level.map_or(String::new(), |l| format!("compression_level = {l}"))
            ),
            "",
        )?),
        _ => None,
    };
    let out = dir.join("recording");
    let mut cmd = command(peer, &w.command(), &out, agent.as_ref());

    // The user's terminal.
    let ws = Winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&ws), None).map_err(|e| format!("openpty: {e}"))?;
    let slave = pty.slave;
    let master = File::from(pty.master);
    cmd.stdin(stdio(&slave)?).stdout(stdio(&slave)?).stderr(stdio(&slave)?);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let sys0 = sys_cpu();
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", peer.program.display()))?;
    drop(cmd);
    drop(slave);
    let pid = child.id() as i32;
    let sampler = Sampler::start(pid, SAMPLE_PERIOD);
    let dog = Watchdog::arm(pid, w.timeout);

    let mut err = None;
    let mut term = Terminal::default();
    match &w.work {
        Work::Output { .. } | Work::Startup => {}
        Work::Echo { samples } => match echo(&master, *samples, &mut run.out_bytes, &mut term) {
            Ok(v) => run.echo_us = v,
            Err(e) => err = Some(e),
        },
    }
    run.out_bytes += drain(&master, &mut term);
    // Exited, not yet reaped: /proc/PID/stat of the zombie holds the final CPU time.
    wait_exited(pid);
    run.wall = t0.elapsed();
    run.machine_cpu = sys_window(sys0, sys_cpu()).busy;
    let final_cpu = cpu_time(pid);
    let sample = sampler.finish();
    run.cpu = final_cpu.or(sample.cpu);
    run.hwm = sample.hwm;
    run.threads = sample.threads;
    // Disarm the watchdog before reaping: the pid may be reused afterwards.
    let timed_out = dog.fired();
    drop(dog);
    let status = child.wait().map_err(|e| e.to_string())?;
    if timed_out {
        return Err(format!("timed out after {} s", w.timeout.as_secs()));
    }
    run.exit = status.code();
    if let Some(e) = err {
        return Err(e);
    }
    if !status.success() {
        return Err(format!("exited with {status}"));
    }

    match (&agent, peer.kind) {
        (Some(a), Kind::Shelltrail { .. }) => {
            run.agent_cpu = cpu_time(a.pid());
            run.agent_hwm = status_kb(a.pid(), "VmHWM");
            run.stored = Some(dir_bytes(&a.spool, ".seg"));
            if export {
                run.export = Some(export_sizes(env, a, dir, run.out_bytes)?);
            }
        }
        _ => run.stored = std::fs::metadata(&out).ok().map(|m| m.len()),
    }
    drop(agent);
    Ok(())
}

fn stdio(fd: &OwnedFd) -> Result<Stdio, String> {
    Ok(Stdio::from(fd.try_clone().map_err(|e| e.to_string())?))
}

/// Waits until `pid` has exited, without reaping it.
fn wait_exited(pid: i32) {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with valid pointers; WNOWAIT leaves the child waitable.
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// The few terminal answers a real terminal would give. asciinema 3 queries
/// the terminal at start (XTVERSION, colours, palette, then DA1 as a
/// sentinel) and waits about a second unless the DA1 query is answered.
#[derive(Default)]
struct Terminal {
    /// Output bytes scanned for queries so far (only the start is scanned).
    scanned: u64,
    /// Last two bytes of the previous read, for a query split across reads.
    carry: Vec<u8>,
}

const SCAN_LIMIT: u64 = 256 << 10;

impl Terminal {
    /// Looks for DA1 (`ESC [ c`) in `data` and answers it as a VT220 would.
    fn answer(&mut self, master: &File, data: &[u8]) {
        if self.scanned >= SCAN_LIMIT {
            return;
        }
        self.scanned += data.len() as u64;
        let mut hay = std::mem::take(&mut self.carry);
        hay.extend_from_slice(data);
        let count = hay.windows(3).filter(|w| *w == b"\x1b[c").count();
        for _ in 0..count {
            let mut w = master;
            let _ = w.write_all(b"\x1b[?62;22c");
        }
        self.carry = hay[hay.len().saturating_sub(2)..].to_vec();
    }
}

/// Reads the master until every holder of the slave has closed it.
fn drain(master: &File, term: &mut Terminal) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    let mut r = master;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => {
                total += n as u64;
                term.answer(master, &buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: the slave side is closed.
            Err(_) => return total,
        }
    }
}

/// Waits up to `ms` for the master to be readable.
fn readable(master: &File, ms: u16) -> Result<bool, String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
    }
}

/// The keystroke echo test. Returns the latency of each sample in µs.
fn echo(master: &File, samples: usize, read_total: &mut u64, term: &mut Terminal) -> Result<Vec<f64>, String> {
    let mut r = master;
    let mut w = master;
    let mut buf = vec![0u8; 64 << 10];
    // The inner program is running once it printed READY (the recorder put
    // the outer terminal in raw mode before starting it).
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.windows(5).any(|x| x == b"READY") {
        if Instant::now() > deadline {
            return Err(format!(
                "no READY within 30 s (got {:?})",
                String::from_utf8_lossy(&seen)
            ));
        }
        if readable(master, 100)? {
            let n = r.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("EOF before READY".into());
            }
            *read_total += n as u64;
            term.answer(master, &buf[..n]);
            seen.extend_from_slice(&buf[..n]);
        }
    }
    // Let `cat` reach its read(2), then discard anything pending.
    std::thread::sleep(Duration::from_millis(200));
    while readable(master, 0)? {
        let n = r.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        *read_total += n as u64;
    }
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        // Typing Enter sends CR; the inner ICRNL/ONLCR echo it as CR LF.
        let (byte, expect) = if i % 50 == 49 {
            (b'\r', 2)
        } else {
            (b'a' + (i % 26) as u8, 1)
        };
        let t = Instant::now();
        w.write_all(&[byte]).map_err(|e| format!("write: {e}"))?;
        let mut got = 0;
        while got < expect {
            if !readable(master, 5000)? {
                return Err(format!("sample {i}: no echo within 5 s"));
            }
            let n = r.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("sample {i}: EOF"));
            }
            got += n;
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        *read_total += got as u64;
        std::thread::sleep(Duration::from_millis(1));
    }
    // End the line, then EOF: cat exits and the session ends.
    w.write_all(b"\r").map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(20));
    w.write_all(&[4]).map_err(|e| e.to_string())?;
    Ok(lat)
}

/// Exports the session as a .cast and measures it, gzip -6 and zstd -3 of it,
/// and checks `export --raw` against what the terminal received.
fn export_sizes(env: &Env, agent: &Agent, dir: &Path, terminal: u64) -> Result<Export, String> {
    let sessions = Command::new(&env.cli)
        .arg("--config")
        .arg(&agent.config)
        .args(["sessions", "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&sessions.stdout).map_err(|e| format!("sessions --json: {e}"))?;
    let id = v
        .as_array()
        .and_then(|a| a.last())
        .and_then(|s| s.get("id"))
        .and_then(|s| s.as_str())
        .ok_or("sessions --json: no session id")?
        .to_string();
    let cast = dir.join("export.cast");
    let st = Command::new(&env.cli)
        .arg("--config")
        .arg(&agent.config)
        .args(["export", &id, "-o"])
        .arg(&cast)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("export failed: {st}"));
    }
    let cast_len = std::fs::metadata(&cast).map_err(|e| e.to_string())?.len();
    let compressed = |prog: &str, args: &[&str]| -> Option<u64> {
        let dest = dir.join(format!("export.{prog}"));
        let f = File::create(&dest).ok()?;
        let st = Command::new(prog).args(args).arg(&cast).stdout(f).status().ok()?;
        let n = std::fs::metadata(&dest).ok()?.len();
        let _ = std::fs::remove_file(&dest);
        st.success().then_some(n)
    };
    eprintln!("    (measuring the exported .cast with gzip -6 and zstd -3...)");
    let gzip6 = compressed("gzip", &["-6", "-c"]);
    let zstd3 = compressed("zstd", &["-3", "-q", "-c"]);
    let _ = std::fs::remove_file(&cast);
    let raw = dir.join("export.raw");
    let raw_matches = Command::new(&env.cli)
        .arg("--config")
        .arg(&agent.config)
        .args(["export", &id, "--raw", "-o"])
        .arg(&raw)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&raw).ok())
        .map(|m| m.len() == terminal);
    let _ = std::fs::remove_file(&raw);
    Ok(Export {
        cast: cast_len,
        gzip6,
        zstd3,
        raw_matches,
    })
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

fn med_of(runs: &[&Run], f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
    median(&v)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// The runs of `name` that succeeded.
fn ok_runs<'a>(runs: &'a BTreeMap<&'static str, Vec<Run>>, name: &str) -> Vec<&'a Run> {
    runs.get(name)
        .map(|v| v.iter().filter(|r| r.error.is_none()).collect())
        .unwrap_or_default()
}

fn report(w: &Workload, peers: &[Peer], runs: &BTreeMap<&'static str, Vec<Run>>) {
    println!("## {}: {}", w.name, w.what);
    println!();
    let ok = |name: &str| ok_runs(runs, name);
    let bare = ok("bare");
    let bare_wall = med_of(&bare, |r| Some(r.wall.as_secs_f64()));
    let off_wall = med_of(&ok("recording-off"), |r| Some(r.wall.as_secs_f64()));
    let failures: Vec<String> = peers
        .iter()
        .flat_map(|p| {
            runs.get(p.name)
                .into_iter()
                .flatten()
                .filter_map(move |r| r.error.as_ref().map(|e| format!("{}: {e}", p.name)))
        })
        .collect();

    match &w.work {
        Work::Output { .. } | Work::Startup => {
            let output = matches!(w.work, Work::Output { .. });
            let mut rows = Vec::new();
            for p in peers {
                let rs = ok(p.name);
                let total = runs.get(p.name).map_or(0, Vec::len);
                let wall = med_of(&rs, |r| Some(r.wall.as_secs_f64()));
                let (lo, hi) = rs
                    .iter()
                    .map(|r| r.wall.as_secs_f64())
                    .fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
                let out = med_of(&rs, |r| Some(r.out_bytes as f64));
                let cpu = med_of(&rs, |r| secs(r.cpu));
                let per200 = cpu.zip(out).map(|(c, o)| c * 200.0 * MIB / o);
                let mut row = vec![p.name.to_string(), format!("{}/{}", rs.len(), total)];
                if output {
                    row.push(fmt(wall, 3));
                } else {
                    row.push(fmt(wall.map(|x| x * 1000.0), 1));
                }
                row.push(if rs.is_empty() {
                    "-".into()
                } else if output {
                    format!("{lo:.3}-{hi:.3}")
                } else {
                    format!("{:.1}-{:.1}", lo * 1000.0, hi * 1000.0)
                });
                row.push(fmt(wall.zip(bare_wall).map(|(a, b)| a / b), 3));
                if output {
                    row.push(fmt(wall.zip(off_wall).map(|(a, b)| a / b), 3));
                    row.push(fmt(out.zip(wall).map(|(o, t)| o / MIB / t), 1));
                }
                // A session of `true` is too short for CPU and RSS samples to mean anything.
                if output {
                    row.push(fmt(cpu, 2));
                    row.push(fmt(per200, 2));
                    row.push(fmt(med_of(&rs, |r| r.hwm.map(|h| h as f64 / MIB)), 1));
                    row.push(fmt(med_of(&rs, |r| secs(r.agent_cpu)), 2));
                    row.push(fmt(med_of(&rs, |r| r.agent_hwm.map(|h| h as f64 / MIB)), 1));
                }
                rows.push(row);
            }
            if output {
                print_table(
                    &[
                        "peer",
                        "ok",
                        "time s (median)",
                        "min-max s",
                        "x bare",
                        "x rec. off",
                        "MiB/s",
                        "recorder CPU s",
                        "CPU s per 200 MiB",
                        "recorder peak RSS MiB",
                        "agent CPU s",
                        "agent peak RSS MiB",
                    ],
                    &rows,
                );
            } else {
                print_table(&["peer", "ok", "time ms (median)", "min-max ms", "x bare"], &rows);
            }
            println!();
            if output {
                threads(peers, runs);
                machine_load(peers, runs);
                storage(peers, runs);
            }
        }
        Work::Echo { .. } => {
            let pooled = |name: &str| -> Vec<f64> { ok(name).iter().flat_map(|r| r.echo_us.iter().copied()).collect() };
            let bare_all = pooled("bare");
            let (b50, b99) = (percentile(&bare_all, 50.0), percentile(&bare_all, 99.0));
            let mut rows = Vec::new();
            for p in peers {
                let all = pooled(p.name);
                let rs = ok(p.name);
                let total = runs.get(p.name).map_or(0, Vec::len);
                let (p50, p90, p99) = (percentile(&all, 50.0), percentile(&all, 90.0), percentile(&all, 99.0));
                rows.push(vec![
                    p.name.to_string(),
                    format!("{}/{}", rs.len(), total),
                    all.len().to_string(),
                    fmt(p50, 0),
                    fmt(p90, 0),
                    fmt(p99, 0),
                    fmt(percentile(&all, 100.0), 0),
                    fmt(p50.zip(b50).map(|(a, b)| a - b), 0),
                    fmt(p99.zip(b99).map(|(a, b)| a / b), 2),
                    fmt(med_of(&rs, |r| secs(r.cpu)), 2),
                    fmt(med_of(&rs, |r| r.hwm.map(|h| h as f64 / MIB)), 1),
                    fmt(med_of(&rs, |r| secs(r.agent_cpu)), 2),
                ]);
            }
            print_table(
                &[
                    "peer",
                    "ok",
                    "samples",
                    "p50 us",
                    "p90 us",
                    "p99 us",
                    "max us",
                    "p50 - bare us",
                    "p99 / bare",
                    "recorder CPU s",
                    "recorder peak RSS MiB",
                    "agent CPU s",
                ],
                &rows,
            );
            println!();
        }
    }
    for f in &failures {
        println!("failed run: {f}");
    }
    if !failures.is_empty() {
        println!();
    }
}

/// The whole machine during each peer's runs: how much CPU the session cost
/// in total (the workload, the kernel's tty work, the harness reading the
/// terminal, the agent), and how busy that kept the CPUs. When `bare` keeps
/// them nearly saturated, a recorder's time cannot fall below its machine
/// CPU over bare's, whatever it does with its threads.
fn machine_load(peers: &[Peer], runs: &BTreeMap<&'static str, Vec<Run>>) {
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let bare_cpu = med_of(&ok_runs(runs, "bare"), |r| r.machine_cpu);
    let mut rows = Vec::new();
    for p in peers {
        let rs = ok_runs(runs, p.name);
        let cpu = med_of(&rs, |r| r.machine_cpu);
        let busy = med_of(&rs, |r| {
            r.machine_cpu.map(|c| 100.0 * c / (nproc * r.wall.as_secs_f64()))
        });
        rows.push(vec![
            p.name.to_string(),
            fmt(cpu, 2),
            fmt(busy, 0),
            fmt(cpu.zip(bare_cpu).map(|(c, b)| c - b), 2),
            fmt(cpu.zip(bare_cpu).map(|(c, b)| c / b), 3),
        ]);
    }
    print_table(
        &[
            "peer",
            "machine CPU s (all processes)",
            &format!("busy % of {nproc} CPUs"),
            "more than bare, s",
            "machine CPU x bare",
        ],
        &rows,
    );
    println!();
}

/// Where the multi-threaded recorders spend their CPU: median per thread
/// name, from the last sample before exit (up to 10 ms of work unseen).
fn threads(peers: &[Peer], runs: &BTreeMap<&'static str, Vec<Run>>) {
    let mut lines = Vec::new();
    for p in peers {
        let rs = ok_runs(runs, p.name);
        let mut names: Vec<&String> = rs.iter().flat_map(|r| r.threads.keys()).collect();
        names.sort();
        names.dedup();
        if names.len() < 2 {
            continue;
        }
        let mut parts: Vec<(f64, String)> = names
            .iter()
            .filter_map(|n| {
                let m = med_of(&rs, |r| r.threads.get(*n).map(|d| d.as_secs_f64()))?;
                Some((m, format!("{n} {m:.2}")))
            })
            .filter(|(m, _)| *m >= 0.005)
            .collect();
        if parts.is_empty() {
            continue;
        }
        parts.sort_by(|a, b| b.0.total_cmp(&a.0));
        let parts: Vec<String> = parts.into_iter().map(|p| p.1).collect();
        lines.push(format!("  {:<17} {}", p.name, parts.join(", ")));
    }
    if !lines.is_empty() {
        println!("recorder CPU s by thread (median):");
        for l in lines {
            println!("{l}");
        }
        println!();
    }
}

fn storage(peers: &[Peer], runs: &BTreeMap<&'static str, Vec<Run>>) {
    let ok = |name: &str| ok_runs(runs, name);
    let export = runs
        .get("shelltrail")
        .and_then(|v| v.iter().find_map(|r| r.export.clone()));
    let out = peers
        .iter()
        .find_map(|p| med_of(&ok(p.name), |r| Some(r.out_bytes as f64)));
    let zstd3 = export.as_ref().and_then(|e| e.zstd3).map(|z| z as f64);
    let mut rows = Vec::new();
    for p in peers {
        let rs = ok(p.name);
        let stored = med_of(&rs, |r| r.stored.map(|s| s as f64));
        let per = stored.zip(out).map(|(s, o)| s / (o / MIB));
        let what = match p.kind {
            Kind::Bare | Kind::RecordingOff => "nothing",
            Kind::Shelltrail { .. } => "spool segments (zstd chunks + records)",
            Kind::Script => "typescript (raw bytes)",
            Kind::Asciinema => "asciicast v3 .cast",
            Kind::Tlog => "tlog JSON log",
        };
        rows.push(vec![
            p.name.to_string(),
            what.to_string(),
            fmt(stored.map(|s| s / MIB), 2),
            fmt(per.map(|x| x / 1024.0), 1),
            fmt(stored.zip(zstd3).map(|(s, z)| s / z), 3),
        ]);
    }
    if let Some(e) = &export {
        let per = |b: f64| out.map(|o| b / (o / MIB) / 1024.0);
        rows.push(vec![
            "(shelltrail export)".into(),
            "whole .cast, uncompressed".into(),
            fmt(Some(e.cast as f64 / MIB), 2),
            fmt(per(e.cast as f64), 1),
            fmt(zstd3.map(|z| e.cast as f64 / z), 3),
        ]);
        if let Some(g) = e.gzip6 {
            rows.push(vec![
                "(gzip -6 of it)".into(),
                "whole .cast".into(),
                fmt(Some(g as f64 / MIB), 2),
                fmt(per(g as f64), 1),
                fmt(zstd3.map(|z| g as f64 / z), 3),
            ]);
        }
        if let Some(z) = e.zstd3 {
            rows.push(vec![
                "(zstd -3 of it)".into(),
                "whole .cast".into(),
                fmt(Some(z as f64 / MIB), 2),
                fmt(per(z as f64), 1),
                "1.000".into(),
            ]);
        }
    }
    print_table_left(
        &[
            "stored by",
            "what",
            "MiB",
            "KiB per MiB of output",
            "x zstd -3 of .cast",
        ],
        &rows,
        2,
    );
    if let Some(e) = &export {
        println!();
        println!(
            "terminal output (median): {} MiB; `shelltrail export --raw` of round 1 {}",
            fmt(out.map(|o| o / MIB), 2),
            match e.raw_matches {
                Some(true) => "has exactly as many bytes as the terminal received",
                Some(false) => "DIFFERS in length from what the terminal received",
                None => "could not be checked",
            }
        );
    }
    println!();
}
