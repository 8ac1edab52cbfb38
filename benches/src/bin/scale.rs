//! The agent at scale: one real `shelltrail agent`, N concurrent simulated
//! recorders speaking the real protocol (`shelltrail_proto` framing; Open,
//! Chunk, Close; real chunks cut by `shelltrail_cast::Chunker`), each sending
//! a chunk every 100 ms, as busy interactive sessions do.
//!
//! Measured from outside the agent, changing nothing in it:
//! * added latency: from writing a Chunk frame to reading the Ack covering it;
//! * agent CPU seconds (`/proc/PID/stat`) over the measurement window;
//! * agent peak RSS (`VmHWM`);
//! * fsyncs/s: `strace -ttt -e trace=fdatasync -p TID` attached to the
//!   agent's `spool-writer` thread only (the other threads run untraced; the
//!   writer makes a handful of syscalls per group commit, each fdatasync
//!   takes about a millisecond here), counted over the window. Skipped when
//!   strace is not installed.
//!
//! Usage: `cargo build --release --bins && cargo run --release -p shelltrail-benches --bin scale -- [--quick]`
//! Options: `--quick` (200 sessions, 5 s), `--sessions N`, `--seconds S`, `--no-strace`.

use shelltrail_benches::{
    Agent, Opened, cpu_time, dir_bytes, machine, mib, next_frame, open_session, percentile, print_table, raise_nofile,
    status_kb, target_dir, unix_now, version_of, which,
};
use shelltrail_cast::{Chunker, Encoder, Header};
use shelltrail_proto::framing;
use shelltrail_proto::v1::{AgentFrame, Close, RecorderFrame, SessionMeta, agent_frame, recorder_frame};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const INTERVAL: Duration = Duration::from_millis(100);

struct Opts {
    sessions: usize,
    seconds: u64,
    strace: bool,
    quick: bool,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        sessions: 0,
        seconds: 0,
        strace: true,
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = || -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
                .ok_or(format!("{a} needs a positive number"))
        };
        match a.as_str() {
            "--quick" => o.quick = true,
            "--sessions" => o.sessions = num()? as usize,
            "--seconds" => o.seconds = num()?,
            "--no-strace" => o.strace = false,
            "-h" | "--help" => {
                println!("usage: scale [--quick] [--sessions N] [--seconds S] [--no-strace]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if o.sessions == 0 {
        o.sessions = if o.quick { 200 } else { 1000 };
    }
    if o.seconds == 0 {
        o.seconds = if o.quick { 5 } else { 10 };
    }
    Ok(o)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("scale: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&opts) {
        eprintln!("scale: cannot run: {e}");
        std::process::exit(1);
    }
}

/// One simulated session: its id and its frames, encoded in advance so the
/// client spends no CPU on compression during the measurement.
struct Script {
    meta: SessionMeta,
    chunks: Vec<Vec<u8>>,
    close: Vec<u8>,
}

fn build_script(i: usize, ticks: usize) -> Script {
    let id = uuid::Uuid::now_v7().to_string();
    let mut enc = Encoder::new();
    let mut chunker = Chunker::new(&id, shelltrail::config::ShellConfig::default().compression_level);
    let mut header = Header::new(120, 40);
    header.command = Some("simulated".into());
    enc.header(&header, chunker.buffer());
    let text = shelltrail_benches::mixed_text(256 << 10, i as u64);
    let mut rng = shelltrail_benches::Rng::new(i as u64 + 7);
    let mut chunks = Vec::with_capacity(ticks);
    let mut pos = 0;
    for k in 0..ticks {
        // 100 ms of a busy interactive session: a few hundred bytes to ~1.5 KiB of output.
        let n = 100 + rng.below(1400) as usize;
        if pos + n > text.len() {
            pos = 0;
        }
        let t = INTERVAL * k as u32;
        enc.output(t, &text[pos..pos + n], chunker.buffer());
        pos += n;
        let ms = t.as_millis() as u64;
        let c = chunker.cut(ms, ms).expect("pending lines");
        let frame = RecorderFrame {
            body: Some(recorder_frame::Body::Chunk(shelltrail_proto::v1::Chunk {
                seq: c.seq,
                hash: c.hash.to_vec(),
                data: c.bytes,
            })),
        };
        let mut buf = Vec::new();
        framing::encode(&frame, &mut buf);
        chunks.push(buf);
    }
    let mut close = Vec::new();
    framing::encode(
        &RecorderFrame {
            body: Some(recorder_frame::Body::Close(Close {
                exit_status: 0,
                last_seq: ticks as u64 - 1,
                ..Default::default()
            })),
        },
        &mut close,
    );
    Script {
        meta: SessionMeta {
            session_id: id,
            user: "bench".into(),
            // The agent refuses a session naming a uid other than the connection's.
            uid: nix::unistd::getuid().as_raw(),
            mode: "pty".into(),
            command: "simulated".into(),
            recorder_version: "scale-bench".into(),
            ..Default::default()
        },
        chunks,
        close,
    }
}

/// What one session saw: (send time, ack latency) per chunk, and problems.
#[derive(Default)]
struct Outcome {
    lat: Vec<(Instant, Duration)>,
    sent: usize,
    acked: usize,
    closed: bool,
    error: Option<String>,
}

async fn session(opened: Opened, script: Arc<Script>, start: Instant) -> Outcome {
    let Opened { mut rd, mut wr, .. } = opened;
    let n = script.chunks.len();
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let reader = {
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut buf = Vec::new();
            let mut next = 0usize;
            loop {
                match next_frame(&mut rd, &mut buf).await {
                    Ok(Some(AgentFrame {
                        body: Some(agent_frame::Body::Ack(a)),
                    })) => {
                        let now = Instant::now();
                        let through = (a.through_seq as usize).min(n.saturating_sub(1));
                        let sent = sent_at.lock().expect("lock");
                        while next <= through && !a.closed {
                            if let Some(t) = sent[next] {
                                out.lat.push((t, now - t));
                            }
                            next += 1;
                        }
                        out.acked = next;
                        if a.closed {
                            out.closed = true;
                            return out;
                        }
                    }
                    Ok(Some(other)) => {
                        out.error = Some(format!("unexpected frame {other:?}"));
                        return out;
                    }
                    Ok(None) => {
                        out.error = Some("agent closed the connection".into());
                        return out;
                    }
                    Err(e) => {
                        out.error = Some(e);
                        return out;
                    }
                }
            }
        })
    };
    let mut sent = 0;
    let mut error = None;
    for (k, frame) in script.chunks.iter().enumerate() {
        tokio::time::sleep_until((start + INTERVAL * k as u32).into()).await;
        sent_at.lock().expect("lock")[k] = Some(Instant::now());
        if let Err(e) = wr.write_all(frame).await {
            error = Some(format!("write: {e}"));
            break;
        }
        sent += 1;
    }
    if error.is_none()
        && let Err(e) = wr.write_all(&script.close).await
    {
        error = Some(format!("write Close: {e}"));
    }
    let mut out = match tokio::time::timeout(Duration::from_secs(60), reader).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => Outcome {
            error: Some(format!("reader: {e}")),
            ..Default::default()
        },
        Err(_) => Outcome {
            error: Some("no Ack for Close within 60 s".into()),
            ..Default::default()
        },
    };
    out.sent = sent;
    if error.is_some() {
        out.error = error;
    }
    out
}

/// strace attached to one thread, logging its fdatasync calls with their
/// wall-clock times.
struct Strace {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Strace {
    fn attach(tid: i32, dir: &std::path::Path) -> Result<Strace, String> {
        let strace = which("strace", &[]).ok_or("strace is not installed")?;
        let out = dir.join("strace.txt");
        let log = dir.join("strace.err");
        let child = std::process::Command::new(strace)
            .args(["-ttt", "-e", "trace=fdatasync", "-o"])
            .arg(&out)
            .arg("-p")
            .arg(tid.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut s = Strace { child, out };
        // strace says "Process TID attached" once it is.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("attached")) {
            if Instant::now() > deadline || matches!(s.child.try_wait(), Ok(Some(_))) {
                let why = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = s.child.kill();
                let _ = s.child.wait();
                return Err(format!("strace did not attach: {}", why.trim()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(s)
    }

    /// Detaches; returns the number of fdatasync calls made between the two
    /// Unix times.
    fn finish(mut self, from: f64, to: f64) -> Result<u64, String> {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).map_err(|e| e.to_string())?;
        let times: Vec<f64> = text
            .lines()
            .filter(|l| l.contains("fdatasync("))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        Ok(times.iter().filter(|&&t| t >= from && t < to).count() as u64)
    }
}

/// The id of the thread of `pid` named `comm`.
fn thread_id(pid: i32, comm: &str) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == comm))?
        .file_name()
        .to_str()?
        .parse()
        .ok()
}

/// What one phase (a fresh agent, every session run once) measured.
struct Phase {
    sessions: usize,
    open_lat: Vec<f64>,
    open_errors: Vec<String>,
    sent: usize,
    acked: usize,
    closed: usize,
    errors: Vec<String>,
    window: f64,
    /// (seconds after t0 the chunk was sent, ack latency ms), chunks sent in the window.
    lat: Vec<(f64, f64)>,
    cpu: Option<f64>,
    hwm: Option<u64>,
    hwm_after_open: Option<u64>,
    rss_max: u64,
    /// fdatasync calls in the window, when strace was attached.
    fsyncs: Option<Result<u64, String>>,
    spool: u64,
    load_cpu: Option<f64>,
}

fn phase(
    cli: &std::path::Path,
    dir: &std::path::Path,
    scripts: &[Arc<Script>],
    seconds: u64,
    with_strace: bool,
) -> Result<Phase, String> {
    let agent = Agent::start(
        cli,
        dir,
        "",
        "max_sessions_per_uid = 2000\nmax_connections_per_uid = 4096",
    )?;
    let apid = agent.pid();
    let socket = agent.dir.join("agent.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    // Open every session (64 connecting at a time), then start them together.
    eprintln!("opening {} sessions...", scripts.len());
    let opened: Vec<Result<Opened, String>> = rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut hs = Vec::new();
        for s in scripts {
            let (sem, socket, meta) = (sem.clone(), socket.clone(), s.meta.clone());
            hs.push(tokio::spawn(async move {
                let _p = sem.acquire_owned().await.expect("semaphore");
                open_session(&socket, meta.clone()).await
            }));
        }
        let mut v = Vec::new();
        for h in hs {
            v.push(h.await.unwrap_or_else(|e| Err(e.to_string())));
        }
        v
    });
    let open_lat: Vec<f64> = opened
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .map(|o| o.open_latency.as_secs_f64() * 1e3)
        .collect();
    let open_errors: Vec<String> = opened.iter().filter_map(|o| o.as_ref().err().cloned()).collect();
    if open_lat.is_empty() {
        return Err(format!(
            "no session could be opened: {}",
            open_errors.first().cloned().unwrap_or_default()
        ));
    }
    let hwm_after_open = status_kb(apid, "VmHWM");

    // strace on the spool writer thread only, attached before the window opens.
    let strace = if with_strace {
        match thread_id(apid, "spool-writer") {
            Some(tid) => Some(Strace::attach(tid, dir)),
            None => Some(Err("no spool-writer thread found".into())),
        }
    } else {
        None
    };
    let t0 = Instant::now() + Duration::from_millis(500);
    let n = scripts.len();
    let mut handles = Vec::new();
    for (i, (o, s)) in opened.into_iter().zip(scripts).enumerate() {
        if let Ok(o) = o {
            // Spread the sessions evenly over the interval.
            let start = t0 + INTERVAL.mul_f64(i as f64 / n as f64);
            handles.push(rt.spawn(session(o, s.clone(), start)));
        }
    }

    // The measurement window: [t0, t0 + seconds), read from /proc.
    std::thread::sleep(t0.saturating_duration_since(Instant::now()));
    let unix0 = unix_now();
    let cpu0 = cpu_time(apid);
    let me0 = cpu_time(std::process::id() as i32);
    let mut rss_max = 0u64;
    let end = t0 + Duration::from_secs(seconds);
    while Instant::now() < end {
        rss_max = rss_max.max(status_kb(apid, "VmRSS").unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100).min(end.saturating_duration_since(Instant::now())));
    }
    let window = (Instant::now() - t0).as_secs_f64();
    let unix1 = unix_now();
    let cpu1 = cpu_time(apid);
    let me1 = cpu_time(std::process::id() as i32);
    let fsyncs = strace.map(|s| s.and_then(|s| s.finish(unix0, unix1)));

    let outcomes: Vec<Outcome> = rt.block_on(async {
        let mut v = Vec::new();
        for h in handles {
            v.push(h.await.unwrap_or_else(|e| Outcome {
                error: Some(e.to_string()),
                ..Default::default()
            }));
        }
        v
    });
    let hwm = status_kb(apid, "VmHWM");
    let spool = dir_bytes(&agent.spool, ".seg");
    drop(agent);
    let lat = outcomes
        .iter()
        .flat_map(|o| o.lat.iter())
        .filter(|(t, _)| *t < end)
        .map(|(t, d)| (t.saturating_duration_since(t0).as_secs_f64(), d.as_secs_f64() * 1e3))
        .collect();
    let secs = |a: Option<Duration>, b: Option<Duration>| a.zip(b).map(|(a, b)| (b - a).as_secs_f64());
    Ok(Phase {
        sessions: n,
        open_lat,
        open_errors,
        sent: outcomes.iter().map(|o| o.sent).sum(),
        acked: outcomes.iter().map(|o| o.acked).sum(),
        closed: outcomes.iter().filter(|o| o.closed).count(),
        errors: outcomes.iter().filter_map(|o| o.error.clone()).collect(),
        window,
        lat,
        cpu: secs(cpu0, cpu1),
        hwm,
        hwm_after_open,
        rss_max,
        fsyncs,
        spool,
        load_cpu: secs(me0, me1),
    })
}

fn run(opts: &Opts) -> Result<(), String> {
    let cli = target_dir().join("shelltrail");
    if !cli.is_file() {
        return Err(format!(
            "{} is missing: build it first with `cargo build --release -p shelltrail --bins`",
            cli.display()
        ));
    }
    let nofile = raise_nofile();
    let strace = opts.strace && which("strace", &[]).is_some();
    let ticks = (opts.seconds * 1000 / INTERVAL.as_millis() as u64) as usize;

    println!("# shelltrail agent at scale");
    println!();
    for (k, v) in machine() {
        println!("{k:>8}: {v}");
    }
    println!("  source: {}", shelltrail_benches::source_version());
    println!("   agent: {}", version_of(&cli, &["--version"]).unwrap_or_default());
    println!(
        "sessions: {} concurrent, each sending one chunk every {} ms for {} s; open files limit {nofile}",
        opts.sessions,
        INTERVAL.as_millis(),
        opts.seconds,
    );
    println!();

    let tmp = tempfile::Builder::new()
        .prefix("shelltrail-scale-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    eprintln!("building {} x {ticks} chunks in advance...", opts.sessions);
    let scripts: Vec<Arc<Script>> = {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut all: Vec<(usize, Script)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..workers)
                .map(|w| {
                    s.spawn(move || {
                        (0..opts.sessions)
                            .filter(|i| i % workers == w)
                            .map(|i| (i, build_script(i, ticks)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().expect("builder")).collect()
        });
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, s)| Arc::new(s)).collect()
    };
    let chunk_bytes: usize = scripts.iter().flat_map(|s| s.chunks.iter().map(Vec::len)).sum();

    // Phase 1 measures everything but fsyncs; phase 2, with a fresh agent,
    // counts fsyncs with strace on the writer thread (ptrace costs the agent
    // CPU, so phase 1 is the reference for CPU and latency).
    eprintln!("phase 1: no tracing");
    let plain = phase(&cli, &tmp.path().join("plain"), &scripts, opts.seconds, false)?;
    let traced = if strace {
        eprintln!("phase 2: strace on the spool writer");
        Some(phase(&cli, &tmp.path().join("traced"), &scripts, opts.seconds, true))
    } else {
        None
    };

    let f = |v: Option<f64>, d: usize| v.map_or("-".into(), |x| format!("{x:.d$}"));
    let column = |p: &Phase| -> Vec<String> {
        let lat: Vec<f64> = p.lat.iter().map(|x| x.1).collect();
        let rate = lat.len() as f64 / p.window;
        let fsyncs = match &p.fsyncs {
            Some(Ok(n)) => Some(*n as f64 / p.window),
            _ => None,
        };
        vec![
            format!("{} / {}", p.open_lat.len(), p.sessions),
            format!(
                "{} / {}",
                f(percentile(&p.open_lat, 50.0), 1),
                f(percentile(&p.open_lat, 99.0), 1)
            ),
            format!("{} / {}", p.sent, p.acked),
            format!("{} / {}", p.closed, p.sessions),
            format!("{:.2} s", p.window),
            format!("{rate:.0}"),
            format!(
                "{} / {} / {} / {}",
                f(percentile(&lat, 50.0), 2),
                f(percentile(&lat, 90.0), 2),
                f(percentile(&lat, 99.0), 2),
                f(percentile(&lat, 100.0), 2)
            ),
            format!(
                "{} ({})",
                f(p.cpu, 2),
                p.cpu
                    .map_or("-".into(), |c| format!("{:.0}% of a core", 100.0 * c / p.window))
            ),
            p.cpu
                .map_or("-".into(), |c| format!("{:.0}", c * 1e6 / lat.len().max(1) as f64)),
            p.hwm.map_or("-".into(), |h| format!("{} MiB", mib(h as f64))),
            format!(
                "{} / {} MiB",
                p.hwm_after_open.map_or("-".into(), |h| mib(h as f64)),
                mib(p.rss_max as f64)
            ),
            match &p.fsyncs {
                Some(Ok(_)) => f(fsyncs, 0),
                Some(Err(e)) => format!("failed: {e}"),
                None => "not measured".into(),
            },
            f(fsyncs.map(|x| rate / x), 1),
            format!("{} MiB", mib(p.spool as f64)),
            f(p.load_cpu, 2),
        ]
    };
    let names = [
        "sessions opened / asked",
        "Open -> Accepted ms p50 / p99",
        "chunks sent / acked (whole run)",
        "sessions closed and acked",
        "measurement window",
        "chunks acked per s",
        "ack latency ms p50 / p90 / p99 / max",
        "agent CPU s in window",
        "agent CPU us per chunk",
        "agent peak RSS (VmHWM) at the end",
        "agent VmHWM after opening / max VmRSS in window",
        "fsyncs/s (strace -e fdatasync on spool-writer)",
        "chunk records per fsync",
        "spool bytes written",
        "load generator CPU s in window (same cores)",
    ];
    let a = column(&plain);
    let b = match &traced {
        Some(Ok(p)) => column(p),
        Some(Err(e)) => vec![format!("failed: {e}"); names.len()],
        None => vec!["skipped".into(); names.len()],
    };
    let rows: Vec<Vec<String>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| vec![n.to_string(), a[i].clone(), b[i].clone()])
        .collect();
    println!(
        "mean chunk frame on the wire: {} B",
        chunk_bytes / (scripts.len() * ticks).max(1)
    );
    println!();
    print_table(&["measure", "phase 1: plain", "phase 2: strace on the writer"], &rows);
    println!();

    // Ack latency second by second (by send time) in phase 1: is it steady?
    let mut by_sec: Vec<Vec<f64>> = vec![Vec::new(); opts.seconds as usize + 1];
    for (t, d) in &plain.lat {
        if let Some(v) = by_sec.get_mut(*t as usize) {
            v.push(*d);
        }
    }
    let sec_rows: Vec<Vec<String>> = by_sec
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .map(|(s, v)| {
            vec![
                format!("{s}-{}", s + 1),
                v.len().to_string(),
                f(percentile(v, 50.0), 2),
                f(percentile(v, 99.0), 2),
                f(percentile(v, 100.0), 2),
            ]
        })
        .collect();
    println!("phase 1, second by second:");
    println!();
    print_table(
        &["second", "chunks", "ack p50 ms", "ack p99 ms", "ack max ms"],
        &sec_rows,
    );
    println!();
    for p in std::iter::once(&plain).chain(traced.as_ref().and_then(|t| t.as_ref().ok())) {
        for e in p.open_errors.iter().take(5) {
            println!("open failed: {e}");
        }
        for e in p.errors.iter().take(5) {
            println!("session error: {e}");
        }
        if p.errors.len() > 5 {
            println!("... {} session errors in all", p.errors.len());
        }
    }
    Ok(())
}
