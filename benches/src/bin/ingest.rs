//! The collector under load: one real `shelltrail collector`, a separate
//! process on a loopback port with mutual TLS, so that its CPU
//! (`/proc/PID/stat`) and peak RSS (`VmHWM`) are its own.
//!
//! Phases (every chunk is real `shelltrail_cast::Chunker` output, at the
//! recorder's default zstd level, of asciicast from `Encoder`, chained per
//! session; all are built before any clock starts, so the load generator
//! only moves bytes):
//!
//! 1. **ingest, paced**: N sessions (default 1000) on K simulated hosts
//!    (default N/10). Each host is one `Ingest.Ship` stream with its own
//!    client certificate (the certificate names the host), spoken here
//!    directly as the agent's shipper speaks it: `AgentHello`, a
//!    `SessionStart` per session answered by `SessionPosition`, then chunks,
//!    each covered later by a `Committed`. Each session sends one chunk every
//!    100 ms (100-1500 bytes of terminal text, as busy interactive sessions
//!    do: the load of `scale`). Measured over the window: commit latency
//!    (from handing the chunk to the stream to reading the `Committed` that
//!    covers it), collector CPU per chunk, and store appends (one per
//!    `Committed`; the store makes one fdatasync per append).
//! 2. **ingest, saturation**: N new sessions on the same streams send about
//!    1 GiB of bulk chunks, as a busy `cat` produces them (4 KiB reads cut at
//!    the recorder's default `chunk_bytes` of asciicast, read from
//!    `shelltrail::config` so that the benchmark follows the recorder; text
//!    compresses about 3.9:1), as fast as the collector commits them:
//!    round-robin, 8 chunks per session per turn, within 16 MiB of
//!    unacknowledged bytes per stream (the agent's whole window). Measured
//!    from the first send to the last `Committed`: MiB/s and chunks/s, and
//!    the same per CPU-second of the collector (per core).
//! 3. **drain**: a real `shelltrail agent`, configured to ship to a collector
//!    that is not running (an outage), takes a backlog of B closed sessions
//!    (default 200, about 256 MiB of bulk chunks) over its socket, speaking the
//!    recorder protocol as `scale` does. Then the collector starts on a fresh
//!    data directory. The drain lasts from the collector's receipt of the
//!    first `SessionStart` to that of the last `SessionEnd` (the
//!    `received_unix_ms` it writes in each session's `start.json` and
//!    `end.json`). Meanwhile one live session writes a chunk every 100 ms to
//!    the agent and an operator follows it with `Query.ReadChunks`
//!    (`follow`): each live chunk's time from the recorder's write to its
//!    arrival at the follower, during the drain and after it, shows whether
//!    the backlog starves live sessions.
//! 4. **compaction and stored bytes**: a collector is started again on each
//!    phase's data directory and left until every ended session is compacted
//!    into runs (the collector of the phase stops with its compaction queue
//!    unfinished). Then the chunks as shipped, the stored recording
//!    (`runs.zst`) and the whole session directory, per MiB of asciicast,
//!    against `gzip -6` and `zstd -3` of the whole `.cast` file (on a sample
//!    of sessions), for interactive sessions (the paced ones: a chunk every
//!    100 ms) and bulk ones (the drained backlog). Every stored session is
//!    decompressed and compared with the `.cast` the generator encoded
//!    (length and SHA-256): mismatches are counted, not fatal.
//!
//! Also: a short fdatasync probe of the temporary directory's disk (1, 8 and
//! 64 concurrent writers), the system's CPU split (`/proc/stat`: user,
//! system, iowait, idle) and the mean number of tasks blocked on I/O
//! (`procs_blocked`) in each window: together they tell whether the
//! collector is bound by CPU or by fsyncs.
//!
//! Usage: `cargo build --release -p shelltrail --bins && cargo run --release -p shelltrail-benches --bin ingest -- [--quick]`
//! Options: `--quick` (200 sessions, 5 s, 256 MiB saturation, 50 sessions and
//! 32 MiB of backlog), `--sessions N`, `--hosts K`, `--seconds S`,
//! `--sat-mib M`, `--window-mib W`, `--backlog-sessions B`, `--backlog-mib M`,
//! `--chunk-kib C` (bulk chunk size; default the recorder's `chunk_bytes`),
//! `--sample N` (sessions compressed whole per group, default 20), `--keep`
//! (keep the temporary directory).

use shelltrail_benches::{
    Agent, CollectorProc, CollectorTls, Opened, Rng, SysWin, cpu_time, dir_bytes, free_port, machine, mib, mixed_text,
    next_frame, open_session, percentile, print_table, print_table_left, raise_nofile, status_kb, sys_cpu, sys_window,
    target_dir, unix_now, version_of, which,
};
use shelltrail_cast::{Chunker, Encoder, Header};
use shelltrail_collector::ClientTlsFiles;
use shelltrail_proto::framing;
use shelltrail_proto::v1::ingest_client::IngestClient;
use shelltrail_proto::v1::{
    AgentFrame, AgentHello, ChunkData, Close, GetSessionRequest, HostFacts, ReadChunksRequest, RecorderFrame,
    SessionMeta, SessionStart, ShipRequest, ShipResponse, agent_frame, recorder_frame, ship_request, ship_response,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc};
use tonic::transport::Channel;

/// Interactive sessions send a chunk this often (the recorder's `chunk_interval_ms`).
const INTERVAL: Duration = Duration::from_millis(100);
/// Bytes per simulated PTY read in bulk sessions.
const READ: usize = 4096;
/// Chunks one session sends per round-robin turn (4 MiB at 512 KiB chunks).
const PER_TURN: usize = 8;
/// Generated terminal text that sessions take their output from.
const POOL: usize = 16 << 20;
/// The name of the host whose agent drains the backlog.
const DRAIN_HOST: &str = "drain-host";

/// When the run started, for the progress lines.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line on stderr, stamped with the seconds since the start.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[{:5.1} s] {}",
            STARTED.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}

struct Opts {
    sessions: usize,
    hosts: usize,
    seconds: u64,
    sat_mib: u64,
    window_mib: u64,
    backlog_sessions: usize,
    backlog_mib: u64,
    sample: usize,
    /// Bulk chunks are cut at this much asciicast (KiB).
    chunk_kib: u64,
    /// The drain's agent cuts its spool into segments of this size.
    drain_segment_mib: u64,
    quick: bool,
    keep: bool,
}

/// The recorder's defaults (`[shell]`): chunk size, interval, zstd level.
fn recorder() -> shelltrail::config::ShellConfig {
    shelltrail::config::ShellConfig::default()
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        sessions: 0,
        hosts: 0,
        seconds: 0,
        sat_mib: 0,
        window_mib: 16,
        backlog_sessions: 0,
        backlog_mib: 0,
        sample: 20,
        chunk_kib: (recorder().chunk_bytes >> 10).max(1),
        drain_segment_mib: 64,
        quick: false,
        keep: false,
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
            "--keep" => o.keep = true,
            "--sessions" => o.sessions = num()? as usize,
            "--hosts" => o.hosts = num()? as usize,
            "--seconds" => o.seconds = num()?,
            "--sat-mib" => o.sat_mib = num()?,
            "--window-mib" => o.window_mib = num()?,
            "--backlog-sessions" => o.backlog_sessions = num()? as usize,
            "--backlog-mib" => o.backlog_mib = num()?,
            "--drain-segment-mib" => o.drain_segment_mib = num()?.max(1),
            "--sample" => o.sample = num()? as usize,
            "--chunk-kib" => o.chunk_kib = num()?,
            "-h" | "--help" => {
                println!(
                    "usage: ingest [--quick] [--sessions N] [--hosts K] [--seconds S] [--sat-mib M] [--window-mib W] \
                     [--backlog-sessions B] [--backlog-mib M] [--drain-segment-mib S] [--chunk-kib C] [--sample N] [--keep]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    let pick = |v: &mut u64, quick: u64, full: u64| {
        if *v == 0 {
            *v = if o.quick { quick } else { full };
        }
    };
    let (mut sessions, mut backlog) = (o.sessions as u64, o.backlog_sessions as u64);
    pick(&mut sessions, 200, 1000);
    pick(&mut backlog, 50, 200);
    let (mut seconds, mut sat, mut bl) = (o.seconds, o.sat_mib, o.backlog_mib);
    pick(&mut seconds, 5, 10);
    pick(&mut sat, 256, 1024);
    pick(&mut bl, 32, 256);
    o.sessions = sessions as usize;
    o.backlog_sessions = backlog as usize;
    o.seconds = seconds;
    o.sat_mib = sat;
    o.backlog_mib = bl;
    if o.chunk_kib > 4096 {
        return Err("--chunk-kib is at most 4096 (a bigger chunk would not fit the agent's max_frame_bytes)".into());
    }
    if o.hosts == 0 {
        o.hosts = (o.sessions / 10).max(1);
    }
    o.hosts = o.hosts.min(o.sessions);
    Ok(o)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ingest: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&opts) {
        eprintln!("ingest: cannot run: {e}");
        std::process::exit(1);
    }
}

// ----- sessions, built in advance -----

/// One session's chunks, and what its whole `.cast` must be.
struct Built {
    id: String,
    chunks: Vec<Vec<u8>>,
    cast_len: u64,
    cast_hash: [u8; 32],
}

/// What is known of a stored session once its chunks have been sent.
#[derive(Clone)]
struct Expect {
    host: String,
    id: String,
    chunks: usize,
    chunk_bytes: u64,
    cast_len: u64,
    cast_hash: [u8; 32],
}

impl Built {
    fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len() as u64).sum()
    }

    fn expect(&self, host: &str) -> Expect {
        Expect {
            host: host.to_string(),
            id: self.id.clone(),
            chunks: self.chunks.len(),
            chunk_bytes: self.bytes(),
            cast_len: self.cast_len,
            cast_hash: self.cast_hash,
        }
    }
}

fn new_session() -> (String, Encoder, Chunker, Vec<u8>) {
    let id = uuid::Uuid::now_v7().to_string();
    let mut enc = Encoder::new();
    let mut chunker = Chunker::new(&id, recorder().compression_level);
    let mut header = Header::new(120, 40);
    header.command = Some("simulated".into());
    enc.header(&header, chunker.buffer());
    (id, enc, chunker, Vec::new())
}

/// Cuts what is pending into the next chunk, keeping a copy of the lines
/// for the expected `.cast`.
fn cut(chunker: &mut Chunker, cast: &mut Vec<u8>, chunks: &mut Vec<Vec<u8>>, start_ms: u64, end_ms: u64) {
    cast.extend_from_slice(chunker.buffer());
    if let Some(c) = chunker.cut(start_ms, end_ms) {
        chunks.push(c.bytes);
    }
}

fn finish(id: String, chunks: Vec<Vec<u8>>, cast: Vec<u8>) -> Built {
    Built {
        id,
        chunks,
        cast_len: cast.len() as u64,
        cast_hash: sha256(&cast),
    }
}

/// An interactive session: every 100 ms, 100 to 1500 bytes of output, one
/// chunk (the recorder cuts by time); the last one carries the exit.
fn build_interactive(pool: &[u8], seed: u64, ticks: usize) -> Built {
    let (id, mut enc, mut chunker, mut cast) = new_session();
    let mut rng = Rng::new(seed + 7);
    let mut pos = rng.below(pool.len() as u64) as usize;
    let mut chunks = Vec::with_capacity(ticks);
    for k in 0..ticks {
        let n = 100 + rng.below(1400) as usize;
        if pos + n > pool.len() {
            pos = 0;
        }
        let t = INTERVAL * k as u32;
        enc.output(t, &pool[pos..pos + n], chunker.buffer());
        pos += n;
        if k + 1 == ticks {
            enc.exit(t, 0, chunker.buffer());
        }
        let ms = t.as_millis() as u64;
        cut(&mut chunker, &mut cast, &mut chunks, ms, ms);
    }
    finish(id, chunks, cast)
}

/// A bulk session, as a busy `cat`: 4 KiB reads 1 ms apart, a chunk per
/// `chunk_bytes` of asciicast (the recorder cuts by size); the last carries the exit.
fn build_bulk(pool: &[u8], seed: u64, n_chunks: usize, chunk_bytes: usize) -> Built {
    let (id, mut enc, mut chunker, mut cast) = new_session();
    let mut rng = Rng::new(seed + 11);
    let mut pos = rng.below(pool.len() as u64) as usize;
    let mut chunks = Vec::with_capacity(n_chunks);
    let mut ms = 0u64;
    while chunks.len() < n_chunks {
        let first = ms;
        while chunker.pending_len() < chunk_bytes {
            if pos + READ > pool.len() {
                pos = 0;
            }
            enc.output(Duration::from_millis(ms), &pool[pos..pos + READ], chunker.buffer());
            pos += READ;
            ms += 1;
        }
        if chunks.len() + 1 == n_chunks {
            enc.exit(Duration::from_millis(ms), 0, chunker.buffer());
        }
        cut(&mut chunker, &mut cast, &mut chunks, first, ms);
    }
    finish(id, chunks, cast)
}

/// Builds `n` sessions on every CPU; `f(i)` builds session `i`.
fn build_all(n: usize, f: impl Fn(usize) -> Built + Sync) -> Vec<Built> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let f = &f;
    let mut all: Vec<(usize, Built)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..workers)
            .map(|w| s.spawn(move || (w..n).step_by(workers).map(|i| (i, f(i))).collect::<Vec<_>>()))
            .collect();
        hs.into_iter().flat_map(|h| h.join().expect("builder")).collect()
    });
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, b)| b).collect()
}

/// Chunks per bulk session so that `sessions` of them hold about `mib` MiB.
fn bulk_chunks_for(pool: &[u8], sessions: usize, mib: u64, chunk_bytes: usize) -> usize {
    let probe = build_bulk(pool, 999, 4, chunk_bytes);
    let per_chunk = (probe.bytes() / 4).max(1);
    ((mib << 20) / (per_chunk * sessions as u64)).max(1) as usize
}

// ----- certificates and the collector process -----

#[derive(Clone)]
struct Identity {
    name: String,
    cert: PathBuf,
    key: PathBuf,
}

struct Pki {
    ca: PathBuf,
    collector: (PathBuf, PathBuf),
    operator: Identity,
    hosts: Vec<Identity>,
    drain: Identity,
}

impl Pki {
    fn create(dir: &Path, hosts: usize) -> Result<Pki, String> {
        let ca = shelltrail::pki::Ca::create(dir, "shelltrail ingest benchmark CA").map_err(|e| format!("{e:#}"))?;
        use shelltrail::pki::CertRole;
        let issue = |file: &str, names: &[String], role| ca.issue(file, names, role).map_err(|e| format!("{e:#}"));
        let collector = issue(
            "collector",
            &["localhost".into(), "127.0.0.1".into()],
            CertRole::Collector,
        )?;
        let ident = |name: &str, role| -> Result<Identity, String> {
            let (cert, key) = issue(name, &[name.to_string()], role)?;
            Ok(Identity {
                name: name.to_string(),
                cert,
                key,
            })
        };
        Ok(Pki {
            ca: ca.cert_path(),
            collector,
            operator: ident("operator", CertRole::Operator)?,
            hosts: (0..hosts)
                .map(|i| ident(&format!("bench-host-{i:04}"), CertRole::Host))
                .collect::<Result<_, _>>()?,
            drain: ident(DRAIN_HOST, CertRole::Host)?,
        })
    }

    /// The collector's own certificate, key and client CA.
    fn collector_tls(&self) -> CollectorTls {
        CollectorTls {
            cert: self.collector.0.clone(),
            key: self.collector.1.clone(),
            client_ca: self.ca.clone(),
        }
    }

    fn client(&self, id: &Identity) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.ca.clone(),
            cert: id.cert.clone(),
            key: id.key.clone(),
            domain: None,
        }
    }
}

// ----- measuring from outside -----

/// CPU seconds the machine spent on other processes than `ours`.
fn others(sys: &SysWin, ours: &[Option<f64>]) -> Option<f64> {
    let mine: Option<f64> = ours.iter().copied().sum();
    sys.busy.zip(mine).map(|(b, m)| (b - m).max(0.0))
}

/// Tasks blocked on I/O right now, machine-wide (`procs_blocked`).
fn procs_blocked() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("procs_blocked ")?.trim().parse().ok())
}

/// A plain number field of `/proc/PID/status` (`Threads`...).
fn status_num(pid: i32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().parse().ok())
}

/// What a [`Probe`] saw.
#[derive(Default, Clone, Copy)]
struct Seen {
    /// Mean number of tasks blocked on I/O, machine-wide.
    blocked: f64,
    /// Largest VmRSS of the process, bytes.
    rss: u64,
    /// Threads of the process when sampling started, and the most seen.
    threads0: u64,
    threads: u64,
}

/// Samples `procs_blocked`, a process's VmRSS and thread count every 20 ms
/// on a thread.
struct Probe {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Seen>,
}

impl Probe {
    fn start(pid: i32) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut sum, mut n) = (0u64, 0u64);
            let mut seen = Seen {
                threads0: status_num(pid, "Threads").unwrap_or(0),
                ..Default::default()
            };
            while !flag.load(Ordering::Relaxed) {
                if let Some(b) = procs_blocked() {
                    sum += b;
                    n += 1;
                }
                seen.rss = seen.rss.max(status_kb(pid, "VmRSS").unwrap_or(0));
                seen.threads = seen.threads.max(status_num(pid, "Threads").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            seen.blocked = sum as f64 / n.max(1) as f64;
            seen
        });
        Probe { stop, thread }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// `writers` threads each write 4 KiB and fdatasync it, `each` times, to
/// their own file in `dir`: fdatasyncs per second, mean ms per fdatasync.
fn fsync_probe(dir: &Path, writers: usize, each: usize) -> Option<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir).ok()?;
    let t = Instant::now();
    let per: Vec<Option<Duration>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..writers)
            .map(|w| {
                s.spawn(move || -> Option<Duration> {
                    let f = std::fs::File::create(dir.join(format!("probe-{w}"))).ok()?;
                    let block = [b'x'; 4096];
                    let mut spent = Duration::ZERO;
                    for i in 0..each {
                        let t = Instant::now();
                        f.write_all_at(&block, (i * block.len()) as u64).ok()?;
                        f.sync_data().ok()?;
                        spent += t.elapsed();
                    }
                    Some(spent)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().ok().flatten()).collect()
    });
    let wall = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(dir);
    let spent: Option<Vec<Duration>> = per.into_iter().collect();
    let total: f64 = spent?.iter().map(Duration::as_secs_f64).sum();
    let n = (writers * each) as f64;
    Some((n / wall, total * 1e3 / n))
}

// ----- the Ingest stream, as an agent speaks it -----

fn ship(body: ship_request::Body) -> ShipRequest {
    ShipRequest { body: Some(body) }
}

/// One host's `Ship` stream after the collector's hello.
struct Conn {
    host: String,
    tx: mpsc::Sender<ShipRequest>,
    inbound: tonic::Streaming<ShipResponse>,
    _client: IngestClient<Channel>,
}

async fn connect(url: String, tls: ClientTlsFiles, host: String) -> Result<Conn, String> {
    let channel = shelltrail_collector::connect(&url, Some(&tls))
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    let mut client = shelltrail_collector::ingest_client(channel);
    let (tx, rx) = mpsc::channel(64);
    tx.send(ship(ship_request::Body::Hello(AgentHello {
        agent_version: "ingest-bench".into(),
        facts: Some(HostFacts {
            hostname: host.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })))
    .await
    .map_err(|e| e.to_string())?;
    let mut inbound = client
        .ship(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("{host}: opening the stream: {e}"))?
        .into_inner();
    match inbound.message().await {
        Ok(Some(ShipResponse {
            body: Some(ship_response::Body::Hello(h)),
        })) if h.host == host => Ok(Conn {
            host,
            tx,
            inbound,
            _client: client,
        }),
        other => Err(format!(
            "{host}: expected CollectorHello naming the host, got {other:?}"
        )),
    }
}

fn session_start(id: &str, host: &str) -> SessionStart {
    let now_ms = (unix_now() * 1e3) as i64;
    SessionStart {
        meta: Some(SessionMeta {
            session_id: id.to_string(),
            host: host.to_string(),
            user: "bench".into(),
            mode: "pty".into(),
            command: "simulated".into(),
            start_unix_ms: now_ms,
            recorder_version: "ingest-bench".into(),
            ..Default::default()
        }),
        verified_uid: nix::unistd::getuid().as_raw(),
        verified_user: "bench".into(),
        verified_pid: std::process::id() as i32,
        opened_unix_ms: now_ms,
    }
}

/// Announces sessions on a stream and waits for every `SessionPosition`:
/// the ms each took (the collector creates the session's directory
/// durably), and problems.
async fn announce(conn: &mut Conn, ids: &[String]) -> (Vec<f64>, Vec<String>) {
    let sent: Mutex<HashMap<String, Instant>> = Mutex::new(HashMap::new());
    let host = conn.host.clone();
    let send = async {
        for id in ids {
            sent.lock().expect("lock").insert(id.clone(), Instant::now());
            if conn
                .tx
                .send(ship(ship_request::Body::Start(session_start(id, &host))))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let receive = async {
        let mut lat = Vec::new();
        let mut errors = Vec::new();
        while lat.len() + errors.len() < ids.len() {
            match tokio::time::timeout(Duration::from_secs(60), conn.inbound.message()).await {
                Ok(Ok(Some(ShipResponse { body: Some(b) }))) => match b {
                    ship_response::Body::Position(p) => {
                        let t = sent.lock().expect("lock").get(&p.session_id).copied();
                        if let Some(t) = t {
                            if p.next_seq != 0 || p.ended {
                                errors.push(format!("{}: new session at position {p:?}", p.session_id));
                            } else {
                                lat.push(t.elapsed().as_secs_f64() * 1e3);
                            }
                        }
                    }
                    ship_response::Body::Rejected(r) => {
                        errors.push(format!("{}: rejected: {}", r.session_id, r.reason))
                    }
                    _ => {}
                },
                Ok(Ok(_)) => {
                    errors.push(format!("{host}: the collector closed the stream"));
                    break;
                }
                Ok(Err(status)) => {
                    errors.push(format!("{host}: {status}"));
                    break;
                }
                Err(_) => {
                    errors.push(format!("{host}: no SessionPosition within 60 s"));
                    break;
                }
            }
        }
        (lat, errors)
    };
    let ((), out) = tokio::join!(send, receive);
    out
}

/// How a host's stream sends.
enum Pace {
    /// When each session sends its first chunk; then one every INTERVAL.
    Paced(Vec<Instant>),
    /// From this time on, as fast as this many unacknowledged bytes allow.
    Window(Instant, u64),
}

/// What one host's stream carries in a phase.
struct Load {
    sessions: Vec<(String, Vec<ShipRequest>, Vec<u32>)>,
    pace: Pace,
}

impl Load {
    fn new(built: Vec<Built>, pace: Pace) -> Load {
        let sessions = built
            .into_iter()
            .map(|b| {
                let sizes = b.chunks.iter().map(|c| c.len() as u32).collect();
                let reqs = b
                    .chunks
                    .into_iter()
                    .enumerate()
                    .map(|(k, data)| {
                        ship(ship_request::Body::Chunk(ChunkData {
                            session_id: b.id.clone(),
                            seq: k as u64,
                            data,
                        }))
                    })
                    .collect();
                (b.id, reqs, sizes)
            })
            .collect();
        Load { sessions, pace }
    }
}

/// What a host's stream saw in a phase.
#[derive(Default)]
struct Track {
    index: HashMap<String, usize>,
    sizes: Vec<Vec<u32>>,
    sent: Vec<Vec<Option<Instant>>>,
    acked: Vec<usize>,
    remaining: usize,
    in_flight: u64,
    /// (send time, commit latency ms) per committed chunk.
    lat: Vec<(Instant, f64)>,
    /// (time, bytes, chunks) per `Committed`: one store append each.
    commits: Vec<(Instant, u64, u32)>,
    sent_count: usize,
    errors: Vec<String>,
    done: bool,
}

impl Track {
    /// Marks a session's chunks as settled without a commit (rejected).
    fn give_up(&mut self, s: usize) {
        let left = self.sizes[s].len() - self.acked[s];
        self.remaining -= left;
        for k in self.acked[s]..self.sizes[s].len() {
            if self.sent[s][k].is_some() {
                self.in_flight = self.in_flight.saturating_sub(u64::from(self.sizes[s][k]));
            }
        }
        self.acked[s] = self.sizes[s].len();
    }
}

fn lock(t: &Mutex<Track>) -> std::sync::MutexGuard<'_, Track> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

async fn send_paced(
    tx: &mpsc::Sender<ShipRequest>,
    mut queues: Vec<VecDeque<ShipRequest>>,
    starts: Vec<Instant>,
    track: &Mutex<Track>,
) {
    let mut plan: Vec<(Instant, usize, usize)> = queues
        .iter()
        .enumerate()
        .flat_map(|(s, q)| (0..q.len()).map(move |k| (s, k)))
        .map(|(s, k)| (starts[s] + INTERVAL * k as u32, s, k))
        .collect();
    plan.sort_by_key(|p| p.0);
    for (due, s, k) in plan {
        tokio::time::sleep_until(due.into()).await;
        let Some(req) = queues[s].pop_front() else { continue };
        {
            let mut t = lock(track);
            t.sent[s][k] = Some(Instant::now());
            t.sent_count += 1;
        }
        if tx.send(req).await.is_err() {
            lock(track).errors.push("the stream closed while sending".into());
            return;
        }
    }
}

async fn send_windowed(
    tx: &mpsc::Sender<ShipRequest>,
    mut queues: Vec<VecDeque<ShipRequest>>,
    (from, window): (Instant, u64),
    track: &Mutex<Track>,
    wake: &Notify,
) {
    tokio::time::sleep_until(from.into()).await;
    let mut next = vec![0usize; queues.len()];
    loop {
        let mut any = false;
        for s in 0..queues.len() {
            for _ in 0..PER_TURN {
                let Some(req) = queues[s].pop_front() else { break };
                any = true;
                loop {
                    let woken = wake.notified();
                    {
                        let t = lock(track);
                        if t.done {
                            return;
                        }
                        if t.in_flight < window {
                            break;
                        }
                    }
                    woken.await;
                }
                {
                    let mut t = lock(track);
                    let k = next[s];
                    t.sent[s][k] = Some(Instant::now());
                    t.in_flight += u64::from(t.sizes[s][k]);
                    t.sent_count += 1;
                }
                next[s] += 1;
                if tx.send(req).await.is_err() {
                    lock(track).errors.push("the stream closed while sending".into());
                    return;
                }
            }
        }
        if !any {
            return;
        }
    }
}

/// Waits for every task; returns the errors, a task's own or its panic.
async fn join_errors(tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>) -> Vec<String> {
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors
}

/// Ends `sessions` (id, last seq) on a host's stream and waits until the
/// collector has committed every end.
async fn end_sessions(mut conn: Conn, sessions: Vec<(String, u64)>) -> Result<(), String> {
    let mut open: HashSet<String> = sessions.iter().map(|(id, _)| id.clone()).collect();
    for (id, last_seq) in sessions {
        let end = shelltrail_proto::v1::SessionEnd {
            session_id: id,
            close: Some(Close {
                exit_status: 0,
                last_seq,
                end_unix_ms: (unix_now() * 1e3) as i64,
                ..Default::default()
            }),
            cause: "recorder".into(),
            closed_unix_ms: (unix_now() * 1e3) as i64,
            ..Default::default()
        };
        conn.tx
            .send(ship(ship_request::Body::End(end)))
            .await
            .map_err(|_| format!("{}: the stream closed", conn.host))?;
    }
    while !open.is_empty() {
        match tokio::time::timeout(Duration::from_secs(60), conn.inbound.message()).await {
            Ok(Ok(Some(ShipResponse {
                body: Some(ship_response::Body::Committed(c)),
            }))) if c.ended => {
                open.remove(&c.session_id);
            }
            Ok(Ok(Some(ShipResponse {
                body: Some(ship_response::Body::Rejected(r)),
            }))) => return Err(format!("{}: end rejected: {}", r.session_id, r.reason)),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return Err(format!("{}: the collector closed the stream", conn.host)),
            Ok(Err(status)) => return Err(format!("{}: {status}", conn.host)),
            Err(_) => return Err(format!("{}: {} ends not committed within 60 s", conn.host, open.len())),
        }
    }
    Ok(())
}

/// Runs one host's load on its stream until every chunk is committed (or
/// the stream fails); gives the stream back for the next phase.
async fn run_host(conn: Conn, load: Load) -> (Conn, Track) {
    let Conn {
        host,
        tx,
        mut inbound,
        _client,
    } = conn;
    let mut t = Track::default();
    let mut queues = Vec::new();
    for (s, (id, reqs, sizes)) in load.sessions.into_iter().enumerate() {
        t.index.insert(id, s);
        t.remaining += sizes.len();
        t.sent.push(vec![None; sizes.len()]);
        t.sizes.push(sizes);
        t.acked.push(0);
        queues.push(VecDeque::from(reqs));
    }
    let track = Arc::new(Mutex::new(t));
    let wake = Arc::new(Notify::new());
    let sender = {
        let (track, wake) = (track.clone(), wake.clone());
        tokio::spawn(async move {
            match load.pace {
                Pace::Paced(starts) => send_paced(&tx, queues, starts, &track).await,
                Pace::Window(from, window) => send_windowed(&tx, queues, (from, window), &track, &wake).await,
            }
            tx
        })
    };
    loop {
        if lock(&track).remaining == 0 {
            break;
        }
        let msg = tokio::time::timeout(Duration::from_secs(60), inbound.message()).await;
        let now = Instant::now();
        let mut guard = lock(&track);
        let t = &mut *guard;
        match msg {
            Ok(Ok(Some(ShipResponse { body: Some(b) }))) => match b {
                ship_response::Body::Committed(c) => {
                    let Some(&s) = t.index.get(&c.session_id) else { continue };
                    let (mut bytes, mut n) = (0u64, 0u32);
                    while t.acked[s] < t.sizes[s].len() && t.acked[s] as u64 <= c.through_seq {
                        let k = t.acked[s];
                        if let Some(sent) = t.sent[s][k] {
                            t.lat.push((sent, (now - sent).as_secs_f64() * 1e3));
                        }
                        bytes += u64::from(t.sizes[s][k]);
                        n += 1;
                        t.acked[s] += 1;
                    }
                    t.in_flight = t.in_flight.saturating_sub(bytes);
                    t.remaining -= n as usize;
                    t.commits.push((now, bytes, n));
                }
                ship_response::Body::Position(p) => {
                    t.errors.push(format!(
                        "{}: the collector asked for chunks again from {}",
                        p.session_id, p.next_seq
                    ));
                    if let Some(&s) = t.index.get(&p.session_id) {
                        t.give_up(s);
                    }
                }
                ship_response::Body::Rejected(r) => {
                    t.errors.push(format!("{}: rejected: {}", r.session_id, r.reason));
                    if let Some(&s) = t.index.get(&r.session_id) {
                        t.give_up(s);
                    }
                }
                ship_response::Body::Hello(_) | ship_response::Body::Order(_) => {}
            },
            Ok(Ok(_)) => {
                t.errors.push(format!("{host}: the collector closed the stream"));
                break;
            }
            Ok(Err(status)) => {
                t.errors.push(format!("{host}: {status}"));
                break;
            }
            Err(_) => {
                t.errors.push(format!("{host}: nothing committed for 60 s"));
                break;
            }
        }
        drop(guard);
        wake.notify_one();
    }
    lock(&track).done = true;
    wake.notify_one();
    let tx = match sender.await {
        Ok(tx) => tx,
        Err(e) => {
            lock(&track).errors.push(format!("sender: {e}"));
            mpsc::channel(1).0
        }
    };
    let t = std::mem::take(&mut *lock(&track));
    (
        Conn {
            host,
            tx,
            inbound,
            _client,
        },
        t,
    )
}

// ----- phase 1 and 2: ingest -----

/// What one ingest sub-phase measured.
#[derive(Default)]
struct Ran {
    hosts: usize,
    sessions: usize,
    announced: usize,
    start_lat: Vec<f64>,
    sent: usize,
    committed: usize,
    chunk_bytes: u64,
    chunks_total: usize,
    window: f64,
    /// Commit latencies (ms) of chunks sent in the window.
    lat: Vec<f64>,
    /// The same by second of send time since the window opened.
    lat_by_sec: Vec<Vec<f64>>,
    /// Chunks, bytes and appends committed in the window.
    win_chunks: u64,
    win_bytes: u64,
    win_appends: u64,
    /// Committed (bytes, chunks) per second since the window opened.
    per_second: Vec<(u64, u64)>,
    cpu: Option<f64>,
    load_cpu: Option<f64>,
    sys: SysWin,
    seen: Seen,
    hwm: Option<u64>,
    /// CPU µs per chunk that the store's own checks of a chunk (decompress,
    /// SHA-256) take, measured in this process on the same chunks.
    checks_us: Option<f64>,
    errors: Vec<String>,
}

/// Announces each host's sessions, runs the loads, measures the window.
/// `paced`: the window is `[t0, t0 + seconds)`; otherwise from the first
/// send to the last commit.
fn sub_phase(
    rt: &tokio::runtime::Runtime,
    collector: &CollectorProc,
    conns: Vec<Conn>,
    per_host: Vec<(String, Vec<Built>)>,
    paced: Option<u64>,
    window: u64,
) -> (Vec<Conn>, Ran) {
    let mut ran = Ran {
        hosts: per_host.len(),
        sessions: per_host.iter().map(|(_, v)| v.len()).sum(),
        chunk_bytes: per_host.iter().flat_map(|(_, v)| v).map(Built::bytes).sum(),
        chunks_total: per_host.iter().flat_map(|(_, v)| v).map(|b| b.chunks.len()).sum(),
        ..Default::default()
    };
    let mut ids: HashMap<String, Vec<String>> = per_host
        .iter()
        .map(|(h, v)| (h.clone(), v.iter().map(|b| b.id.clone()).collect()))
        .collect();
    progress!("  announcing {} sessions...", ran.sessions);
    let mut conns: HashMap<String, Conn> = rt.block_on(async {
        let hs: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                let ids = ids.remove(&c.host).unwrap_or_default();
                tokio::spawn(async move {
                    let r = announce(&mut c, &ids).await;
                    (c, r)
                })
            })
            .collect();
        let mut out = HashMap::new();
        for h in hs {
            match h.await {
                Ok((c, (lat, errors))) => {
                    ran.announced += lat.len();
                    ran.start_lat.extend(lat);
                    ran.errors.extend(errors);
                    out.insert(c.host.clone(), c);
                }
                Err(e) => ran.errors.push(format!("announce: {e}")),
            }
        }
        out
    });
    let cpid = collector.pid();
    let me = std::process::id() as i32;
    let n = ran.sessions;
    let t0 = Instant::now() + Duration::from_millis(if paced.is_some() { 500 } else { 100 });
    let mut handles = Vec::new();
    for (i, (host, built)) in per_host.into_iter().enumerate() {
        let Some(c) = conns.remove(&host) else {
            ran.errors
                .push(format!("{host}: no stream left for its {} sessions", built.len()));
            continue;
        };
        let pace = match paced {
            // Session i (numbered across hosts, hosts interleaved) starts
            // i/N of an interval after t0: the load is spread evenly.
            Some(_) => Pace::Paced(
                (0..built.len())
                    .map(|j| t0 + INTERVAL.mul_f64(((j * ran.hosts + i) % n.max(1)) as f64 / n.max(1) as f64))
                    .collect(),
            ),
            None => Pace::Window(t0, window),
        };
        handles.push(rt.spawn(run_host(c, Load::new(built, pace))));
    }
    std::thread::sleep(t0.saturating_duration_since(Instant::now()));
    let probe = Probe::start(cpid);
    let (cpu0, me0, sys0) = (cpu_time(cpid), cpu_time(me), sys_cpu());
    let mut end = None;
    if let Some(seconds) = paced {
        let e = t0 + Duration::from_secs(seconds);
        std::thread::sleep(e.saturating_duration_since(Instant::now()));
        end = Some(e);
    }
    let results: Vec<(Conn, Track)> = rt.block_on(async {
        let mut v = Vec::new();
        for h in handles {
            match h.await {
                Ok(r) => v.push(r),
                Err(e) => ran.errors.push(format!("host task: {e}")),
            }
        }
        v
    });
    let last_commit = results
        .iter()
        .flat_map(|(_, t)| t.commits.last().map(|c| c.0))
        .max()
        .unwrap_or(t0);
    // Saturation: the window closes at the last commit (the /proc readings
    // follow it by a few ms, while the collector is idle again).
    let (cpu1, me1, sys1) = (cpu_time(cpid), cpu_time(me), sys_cpu());
    ran.seen = probe.finish();
    let end = end.unwrap_or(last_commit);
    ran.window = end.saturating_duration_since(t0).as_secs_f64();
    let secs = |a: Option<Duration>, b: Option<Duration>| a.zip(b).map(|(a, b)| (b - a).as_secs_f64());
    ran.cpu = secs(cpu0, cpu1);
    ran.load_cpu = secs(me0, me1);
    ran.sys = sys_window(sys0, sys1);
    ran.hwm = status_kb(cpid, "VmHWM");
    ran.per_second = vec![(0, 0); ran.window.ceil() as usize + 1];
    ran.lat_by_sec = vec![Vec::new(); ran.window.ceil() as usize + 1];
    // Streams of hosts that had nothing to send in this phase, then the others.
    let mut conns: Vec<Conn> = conns.into_values().collect();
    for (c, t) in results {
        ran.sent += t.sent_count;
        ran.committed += t.lat.len();
        for &(sent, ms) in t.lat.iter().filter(|(s, _)| *s >= t0 && *s < end) {
            ran.lat.push(ms);
            if let Some(v) = ran
                .lat_by_sec
                .get_mut(sent.saturating_duration_since(t0).as_secs() as usize)
            {
                v.push(ms);
            }
        }
        for &(at, bytes, chunks) in &t.commits {
            if at >= t0 && at <= end {
                ran.win_chunks += u64::from(chunks);
                ran.win_bytes += bytes;
                ran.win_appends += 1;
            }
            let sec = at.saturating_duration_since(t0).as_secs() as usize;
            if let Some(p) = ran.per_second.get_mut(sec) {
                p.0 += bytes;
                p.1 += u64::from(chunks);
            }
        }
        ran.errors.extend(t.errors);
        conns.push(c);
    }
    (conns, ran)
}

struct IngestReport {
    paced: Ran,
    sat: Ran,
    connect_errors: Vec<String>,
    /// Sessions as stored, for the size and correctness checks.
    interactive: Vec<Expect>,
    bulk: Vec<Expect>,
    data: PathBuf,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// CPU µs per chunk of what the store does to check a chunk before it
/// stores it (`chunk::decompress`, `chunk::link_hash`), timed on up to 2000 of
/// the chunks in one thread.
fn checks_us(built: &[Built]) -> Option<f64> {
    let chunks: Vec<&Vec<u8>> = built.iter().flat_map(|b| b.chunks.iter()).take(2000).collect();
    let t = cpu_time(std::process::id() as i32)?;
    let wall = Instant::now();
    for c in &chunks {
        let (header, raw) = shelltrail_cast::chunk::decompress(c).ok()?;
        std::hint::black_box(shelltrail_cast::chunk::link_hash(&header, &raw));
    }
    // Process CPU time has 10 ms ticks: use the wall time of this one
    // thread when the run was too short to register.
    let cpu = (cpu_time(std::process::id() as i32)? - t).as_secs_f64();
    let spent = if cpu >= 0.1 { cpu } else { wall.elapsed().as_secs_f64() };
    Some(spent * 1e6 / chunks.len().max(1) as f64)
}

/// Deals sessions out to hosts: session i to host i % K.
fn deal(built: Vec<Built>, hosts: &[Identity]) -> Vec<(String, Vec<Built>)> {
    let mut per: Vec<(String, Vec<Built>)> = hosts.iter().map(|h| (h.name.clone(), Vec::new())).collect();
    for (i, b) in built.into_iter().enumerate() {
        per[i % hosts.len()].1.push(b);
    }
    per
}

fn ingest(
    rt: &tokio::runtime::Runtime,
    cli: &Path,
    dir: &Path,
    pki: &Pki,
    opts: &Opts,
    pool: &[u8],
) -> Result<IngestReport, String> {
    let ticks = (opts.seconds * 1000 / INTERVAL.as_millis() as u64) as usize;
    progress!("building {} interactive sessions x {ticks} chunks...", opts.sessions);
    let paced = build_all(opts.sessions, |i| build_interactive(pool, i as u64, ticks));
    let chunk = opts.chunk_kib as usize * 1024;
    let sat_chunks = bulk_chunks_for(pool, opts.sessions, opts.sat_mib, chunk);
    progress!(
        "building {} bulk sessions x {sat_chunks} chunks of {} KiB of asciicast...",
        opts.sessions,
        opts.chunk_kib
    );
    let sat = build_all(opts.sessions, |i| {
        build_bulk(pool, 1_000_000 + i as u64, sat_chunks, chunk)
    });
    let hosts = &pki.hosts[..opts.hosts];
    let paced_expect: Vec<Expect> = paced
        .iter()
        .enumerate()
        .map(|(i, b)| b.expect(&hosts[i % hosts.len()].name))
        .collect();
    let sat_expect: Vec<Expect> = sat
        .iter()
        .enumerate()
        .map(|(i, b)| b.expect(&hosts[i % hosts.len()].name))
        .collect();

    let (paced_checks, sat_checks) = (checks_us(&paced), checks_us(&sat));
    let collector = CollectorProc::start(cli, &dir.join("collector"), &pki.collector_tls(), free_port()?)?;
    progress!("connecting {} host streams...", hosts.len());
    let url = collector.url();
    let mut connect_errors = Vec::new();
    let conns: Vec<Conn> = rt.block_on(async {
        let hs: Vec<_> = hosts
            .iter()
            .map(|h| tokio::spawn(connect(url.clone(), pki.client(h), h.name.clone())))
            .collect();
        let mut v = Vec::new();
        for h in hs {
            match h.await {
                Ok(Ok(c)) => v.push(c),
                Ok(Err(e)) => connect_errors.push(e),
                Err(e) => connect_errors.push(e.to_string()),
            }
        }
        v
    });
    if conns.len() != hosts.len() {
        return Err(format!(
            "{} of {} host streams failed to open: {}",
            hosts.len() - conns.len(),
            hosts.len(),
            connect_errors.first().cloned().unwrap_or_default()
        ));
    }
    progress!("phase 1: paced, {} s", opts.seconds);
    let (conns, mut paced_ran) = sub_phase(rt, &collector, conns, deal(paced, hosts), Some(opts.seconds), 0);
    paced_ran.checks_us = paced_checks;
    progress!("phase 2: saturation");
    let (conns, mut sat_ran) = sub_phase(rt, &collector, conns, deal(sat, hosts), None, opts.window_mib << 20);
    sat_ran.checks_us = sat_checks;
    // The sessions end, as sessions do: the collector then compacts them.
    progress!("ending the {} sessions...", paced_expect.len() + sat_expect.len());
    let groups = [&paced_expect[..], &sat_expect[..]];
    let end_errors: Vec<String> = rt.block_on(async {
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|c| {
                let mine: Vec<(String, u64)> = groups
                    .iter()
                    .flat_map(|g| g.iter())
                    .filter(|e| e.host == c.host)
                    .map(|e| (e.id.clone(), e.chunks as u64 - 1))
                    .collect();
                tokio::spawn(end_sessions(c, mine))
            })
            .collect();
        join_errors(tasks).await
    });
    if let Some(e) = end_errors.first() {
        progress!("{} host streams could not end their sessions: {e}", end_errors.len());
    }
    let data = collector.data.clone();
    drop(collector);
    Ok(IngestReport {
        paced: paced_ran,
        sat: sat_ran,
        connect_errors,
        interactive: paced_expect,
        bulk: sat_expect,
        data,
    })
}

// ----- phase 3: drain after an outage -----

fn frame(body: recorder_frame::Body) -> Vec<u8> {
    let mut buf = Vec::new();
    framing::encode(&RecorderFrame { body: Some(body) }, &mut buf);
    buf
}

fn recorder_meta(id: &str) -> SessionMeta {
    SessionMeta {
        session_id: id.to_string(),
        host: DRAIN_HOST.into(),
        user: "bench".into(),
        // The agent refuses a session naming a uid other than the connection's.
        uid: nix::unistd::getuid().as_raw(),
        mode: "pty".into(),
        command: "simulated".into(),
        start_unix_ms: (unix_now() * 1e3) as i64,
        recorder_version: "ingest-bench".into(),
        ..Default::default()
    }
}

/// A whole session into the agent: Open, every chunk, Close, until `Ack{closed}`.
async fn feed_one(socket: PathBuf, id: String, frames: Vec<Vec<u8>>) -> Result<(), String> {
    let Opened { mut rd, mut wr, .. } = open_session(&socket, recorder_meta(&id)).await?;
    let last_seq = frames.len() as u64 - 1;
    for f in &frames {
        wr.write_all(f).await.map_err(|e| format!("write: {e}"))?;
    }
    let close = frame(recorder_frame::Body::Close(Close {
        exit_status: 0,
        last_seq,
        end_unix_ms: (unix_now() * 1e3) as i64,
        ..Default::default()
    }));
    wr.write_all(&close).await.map_err(|e| format!("write Close: {e}"))?;
    let mut buf = Vec::new();
    loop {
        match next_frame(&mut rd, &mut buf).await? {
            Some(AgentFrame {
                body: Some(agent_frame::Body::Ack(a)),
            }) if a.closed => return Ok(()),
            Some(AgentFrame {
                body: Some(agent_frame::Body::Ack(_)),
            }) => {}
            other => return Err(format!("unexpected frame {other:?}")),
        }
    }
}

fn chunk_frames(b: Built) -> Vec<Vec<u8>> {
    b.chunks
        .into_iter()
        .enumerate()
        .map(|(k, data)| {
            frame(recorder_frame::Body::Chunk(shelltrail_proto::v1::Chunk {
                seq: k as u64,
                hash: shelltrail_cast::chunk::hash(&data).expect("a chunk we built").to_vec(),
                data,
            }))
        })
        .collect()
}

/// The live session: one chunk every 100 ms into the agent until `stop`,
/// then Close. Returns the Unix time each chunk was written.
async fn live_session(
    socket: PathBuf,
    built: Built,
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<f64>>>,
) -> Result<(), String> {
    let id = built.id.clone();
    let frames = chunk_frames(built);
    let Opened { mut rd, mut wr, .. } = open_session(&socket, recorder_meta(&id)).await?;
    let closed = tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            match next_frame(&mut rd, &mut buf).await {
                Ok(Some(AgentFrame {
                    body: Some(agent_frame::Body::Ack(a)),
                })) if a.closed => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => return Err("the agent closed the live session's connection".to_string()),
                Err(e) => return Err(e),
            }
        }
    });
    let t0 = Instant::now();
    let mut n = 0u64;
    for (k, f) in frames.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep_until((t0 + INTERVAL * k as u32).into()).await;
        sent.lock().expect("lock").push(unix_now());
        wr.write_all(f).await.map_err(|e| format!("live write: {e}"))?;
        n += 1;
    }
    let close = frame(recorder_frame::Body::Close(Close {
        exit_status: 0,
        last_seq: n.saturating_sub(1),
        end_unix_ms: (unix_now() * 1e3) as i64,
        ..Default::default()
    }));
    wr.write_all(&close).await.map_err(|e| format!("live Close: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(30), closed).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no Ack for the live session's Close within 30 s".into()),
    }
}

/// An operator following the live session at the collector: waits until
/// the collector knows it, then `ReadChunks` with follow; the Unix time each
/// chunk arrived, by seq.
async fn follow(
    url: String,
    tls: ClientTlsFiles,
    id: String,
    seen: Arc<Mutex<Vec<Option<f64>>>>,
) -> Result<(), String> {
    let channel = shelltrail_collector::connect(&url, Some(&tls))
        .await
        .map_err(|e| e.to_string())?;
    let mut q = shelltrail_collector::query_client(channel);
    loop {
        let known = q.get_session(GetSessionRequest { session_id: id.clone() }).await;
        match known {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::NotFound => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(s) => return Err(format!("GetSession: {s}")),
        }
    }
    let mut stream = q
        .read_chunks(ReadChunksRequest {
            session_id: id,
            from_seq: 0,
            follow: true,
            purpose: String::new(),
        })
        .await
        .map_err(|s| format!("ReadChunks: {s}"))?
        .into_inner();
    while let Some(c) = stream.message().await.map_err(|s| format!("ReadChunks: {s}"))? {
        let now = unix_now();
        let mut v = seen.lock().expect("lock");
        let k = c.seq as usize;
        if k >= v.len() {
            v.resize(k + 1, None);
        }
        v[k].get_or_insert(now);
    }
    Ok(())
}

/// CPU times of the collector, the agent and this process, and the machine's.
#[derive(Default)]
struct Readings {
    collector: Option<Duration>,
    agent: Option<Duration>,
    me: Option<Duration>,
    sys: Option<[u64; 8]>,
}

/// `received_unix_ms` of a session's `start.json` or `end.json`, in seconds.
fn received(path: &Path) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some(v.get("received_unix_ms")?.as_i64()? as f64 / 1e3)
}

#[derive(Default)]
struct DrainReport {
    /// Why the phase could not run, if it could not.
    failed: Option<String>,
    sessions: usize,
    chunks: usize,
    bytes: u64,
    feed_secs: f64,
    feed_errors: Vec<String>,
    spool_before: u64,
    spool_after: u64,
    /// From the live session's end to a spool of at most two segments.
    spool_freed_secs: Option<f64>,
    /// Seconds from the collector's start to the agent's first SessionStart.
    reconnect: Option<f64>,
    /// First SessionStart received to last SessionEnd received.
    window: Option<f64>,
    ended: usize,
    collector_cpu: Option<f64>,
    agent_cpu: Option<f64>,
    load_cpu: Option<f64>,
    /// Collector CPU from its start to the end of the drain (start-up included).
    collector_cpu_total: Option<f64>,
    sys: SysWin,
    seen: Seen,
    collector_hwm: Option<u64>,
    agent_hwm: Option<u64>,
    /// Live chunks: (send Unix time, arrival at the follower).
    live: Vec<(f64, Option<f64>)>,
    live_error: Option<String>,
    follow_error: Option<String>,
    first_start: Option<f64>,
    last_end: Option<f64>,
    expect: Vec<Expect>,
    data: PathBuf,
    agent_log_tail: String,
}

fn drain(
    rt: &tokio::runtime::Runtime,
    cli: &Path,
    dir: &Path,
    pki: &Pki,
    opts: &Opts,
    pool: &[u8],
) -> Result<DrainReport, String> {
    let n = opts.backlog_sessions;
    let chunk = opts.chunk_kib as usize * 1024;
    let per = bulk_chunks_for(pool, n, opts.backlog_mib, chunk);
    progress!("building a backlog of {n} bulk sessions x {per} chunks...");
    let backlog = build_all(n, |i| build_bulk(pool, 2_000_000 + i as u64, per, chunk));
    let live_built = build_interactive(pool, 3_000_000, 3000);
    let live_id = live_built.id.clone();
    let expect: Vec<Expect> = backlog.iter().map(|b| b.expect(DRAIN_HOST)).collect();
    let bytes: u64 = expect.iter().map(|e| e.chunk_bytes).sum();
    let chunks: usize = expect.iter().map(|e| e.chunks).sum();
    let scripts: Vec<(String, Vec<Vec<u8>>)> = backlog.into_iter().map(|b| (b.id.clone(), chunk_frames(b))).collect();

    // The agent ships to a port where nothing listens yet: the outage.
    let port = free_port()?;
    let tls = pki.client(&pki.drain);
    let ship = format!(
        "[ship]\ncollector = \"https://127.0.0.1:{port}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        tls.ca, tls.cert, tls.key
    );
    let agent = Agent::start_with(
        cli,
        &dir.join("agent"),
        "",
        &format!(
            "max_sessions_per_uid = 4096\nmax_connections = 8192\nmax_connections_per_uid = 8192\n\
             segment_bytes = \"{}MiB\"",
            opts.drain_segment_mib
        ),
        &ship,
    )?;
    let apid = agent.pid();
    let socket = agent.dir.join("agent.sock");

    progress!("feeding the backlog to the agent while the collector is down...");
    let t_feed = Instant::now();
    let feed_errors: Vec<String> = rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(32));
        let hs: Vec<_> = scripts
            .into_iter()
            .map(|(id, frames)| {
                let (sem, socket) = (sem.clone(), socket.clone());
                tokio::spawn(async move {
                    let _p = sem.acquire_owned().await.expect("semaphore");
                    feed_one(socket, id, frames).await
                })
            })
            .collect();
        join_errors(hs).await
    });
    let feed_secs = t_feed.elapsed().as_secs_f64();
    let spool_before = dir_bytes(&agent.spool, ".seg");

    // The live session starts during the outage and runs through the drain.
    let stop = Arc::new(AtomicBool::new(false));
    let live_sent = Arc::new(Mutex::new(Vec::new()));
    let live = rt.spawn(live_session(
        socket.clone(),
        live_built,
        stop.clone(),
        live_sent.clone(),
    ));

    progress!("starting the collector (the outage ends)...");
    let mut collector = CollectorProc::start(cli, &dir.join("drain-collector"), &pki.collector_tls(), port)?;
    let t_up = unix_now();
    let cpid = collector.pid();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let follower = rt.spawn(follow(
        collector.url(),
        pki.client(&pki.operator),
        live_id.clone(),
        seen.clone(),
    ));
    let host_dir = collector.data.join("sessions").join(DRAIN_HOST);
    let probe = Probe::start(cpid);
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(300);
    let read = || Readings {
        collector: cpu_time(cpid),
        agent: cpu_time(apid),
        me: cpu_time(me),
        sys: sys_cpu(),
    };
    let mut first: Option<Readings> = None;
    let mut pending: HashSet<String> = expect.iter().map(|e| e.id.clone()).collect();
    while !pending.is_empty() && Instant::now() < deadline {
        if first.is_none() && host_dir.is_dir() {
            first = Some(read());
            progress!("  the agent reconnected; draining...");
        }
        if first.is_some() {
            pending.retain(|id| !host_dir.join(id).join("end.json").exists());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = read();
    let seen_probe = probe.finish();
    let collector_hwm = status_kb(cpid, "VmHWM");
    let agent_hwm = status_kb(apid, "VmHWM");
    let ended = expect.len() - pending.len();

    // Live chunks after the drain, then the live session ends.
    std::thread::sleep(Duration::from_secs(if opts.quick { 2 } else { 3 }));
    stop.store(true, Ordering::Relaxed);
    let live_error = match rt.block_on(async { tokio::time::timeout(Duration::from_secs(40), live).await }) {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(e))) => Some(e),
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("the live session did not finish within 40 s".into()),
    };
    let follow_error = match rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), follower).await }) {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(e))) => Some(e),
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("the follower did not see the live session end within 20 s".into()),
    };
    // The agent deletes shipped segments as the collector commits them:
    // how long after the drain until the spool is down to its active
    // segment and the one before (what the live session still holds).
    let t_drained = Instant::now();
    let segment_cap = 2 * (opts.drain_segment_mib << 20) + (1 << 20);
    let mut spool_after = dir_bytes(&agent.spool, ".seg");
    while spool_after > segment_cap && t_drained.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
        spool_after = dir_bytes(&agent.spool, ".seg");
    }
    let spool_freed_secs = (spool_after <= segment_cap).then(|| t_drained.elapsed().as_secs_f64());

    let starts: Vec<f64> = expect
        .iter()
        .filter_map(|e| received(&host_dir.join(&e.id).join("start.json")))
        .collect();
    let ends: Vec<f64> = expect
        .iter()
        .filter_map(|e| received(&host_dir.join(&e.id).join("end.json")))
        .collect();
    let first_start = starts.iter().copied().reduce(f64::min);
    let last_end = (ends.len() == expect.len())
        .then(|| ends.iter().copied().reduce(f64::max))
        .flatten();
    let secs = |a: Option<Duration>, b: Option<Duration>| a.zip(b).map(|(a, b)| (b - a).as_secs_f64());
    let first = first.unwrap_or_default();
    let sent = live_sent.lock().expect("lock").clone();
    let seen = seen.lock().expect("lock").clone();
    let live_lat = sent
        .iter()
        .enumerate()
        .map(|(k, &s)| (s, seen.get(k).copied().flatten()))
        .collect();
    let agent_log = std::fs::read_to_string(agent.dir.join("agent.log")).unwrap_or_default();
    let agent_log_tail = agent_log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
    let data = collector.data.clone();
    drop(agent);
    collector.stop();
    Ok(DrainReport {
        failed: None,
        sessions: n,
        chunks,
        bytes,
        feed_secs,
        feed_errors,
        spool_before,
        spool_after,
        spool_freed_secs,
        reconnect: first_start.map(|f| f - t_up),
        window: first_start.zip(last_end).map(|(a, b)| b - a),
        ended,
        collector_cpu: secs(first.collector, last.collector),
        agent_cpu: secs(first.agent, last.agent),
        load_cpu: secs(first.me, last.me),
        collector_cpu_total: last.collector.map(|d| d.as_secs_f64()),
        sys: sys_window(first.sys, last.sys),
        seen: seen_probe,
        collector_hwm,
        agent_hwm,
        live: live_lat,
        live_error,
        follow_error,
        first_start,
        last_end,
        expect,
        data,
        agent_log_tail,
    })
}

// ----- phase 4: stored bytes and correctness -----

/// Sizes of a group of stored sessions, over a sample.
#[derive(Default)]
struct Sizes {
    sessions: usize,
    verified: usize,
    /// Sessions stored as runs (compacted) rather than as their chunks.
    compacted: usize,
    /// Bytes of the chunks the sample's sessions were shipped as.
    shipped: u64,
    mismatches: Vec<String>,
    sample: usize,
    chunks: usize,
    cast: u64,
    stored: u64,
    dir: u64,
    gzip6: Option<u64>,
    zstd3: Option<u64>,
}

/// After a phase: a collector started again on its data directory compacts
/// every ended session that is not compacted yet (the one that ingested
/// them stops right after the load, its compaction queue unfinished).
/// Returns the seconds until all of `groups` are, or why they were not.
fn compact_all(cli: &Path, pki: &Pki, data: &Path, groups: &[&[Expect]]) -> Result<f64, String> {
    let parent = data.parent().ok_or("data directory without a parent")?;
    let t0 = Instant::now();
    let mut c = CollectorProc::start(cli, parent, &pki.collector_tls(), free_port()?)?;
    let dirs: Vec<PathBuf> = groups
        .iter()
        .flat_map(|g| g.iter())
        .map(|e| data.join("sessions").join(&e.host).join(&e.id).join("runs.zst"))
        .collect();
    let deadline = t0 + Duration::from_secs(300);
    let mut left = dirs.len();
    while Instant::now() < deadline {
        left = dirs.iter().filter(|p| !p.exists()).count();
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t0.elapsed().as_secs_f64();
    c.stop();
    if left > 0 {
        return Err(format!(
            "{left} of {} sessions not compacted after {secs:.0} s",
            dirs.len()
        ));
    }
    Ok(secs)
}

/// Checks every session of a group (its stored recording, `runs.zst` once
/// compacted, else `chunks.zst`, decompresses to exactly the `.cast` the
/// generator encoded) and sizes a sample.
fn sizes(data: &Path, group: &[Expect], sample: usize, tmp: &Path) -> Sizes {
    let mut out = Sizes {
        sessions: group.len(),
        gzip6: Some(0),
        zstd3: Some(0),
        ..Default::default()
    };
    let step = (group.len() / sample.max(1)).max(1);
    for (i, e) in group.iter().enumerate() {
        let dir = data.join("sessions").join(&e.host).join(&e.id);
        let (stored, compacted) = match std::fs::read(dir.join("runs.zst")) {
            Ok(s) => (s, true),
            Err(_) => match std::fs::read(dir.join("chunks.zst")) {
                Ok(s) => (s, false),
                Err(err) => {
                    out.mismatches.push(format!("{}: {err}", e.id));
                    continue;
                }
            },
        };
        out.compacted += usize::from(compacted);
        let cast = match zstd::stream::decode_all(&stored[..]) {
            Ok(c) => c,
            Err(err) => {
                out.mismatches
                    .push(format!("{}: the stored recording does not decompress: {err}", e.id));
                continue;
            }
        };
        if cast.len() as u64 != e.cast_len || sha256(&cast) != e.cast_hash {
            out.mismatches.push(format!(
                "{}: decompresses to {} bytes, not the {} bytes encoded (or they differ)",
                e.id,
                cast.len(),
                e.cast_len
            ));
            continue;
        }
        out.verified += 1;
        if i % step != 0 || out.sample >= sample {
            continue;
        }
        out.sample += 1;
        out.chunks += e.chunks;
        out.shipped += e.chunk_bytes;
        out.cast += cast.len() as u64;
        out.stored += stored.len() as u64;
        out.dir += dir_bytes(&dir, "");
        let path = tmp.join("sample.cast");
        if std::fs::write(&path, &cast).is_err() {
            out.gzip6 = None;
            out.zstd3 = None;
            continue;
        }
        let size = |prog: &str, args: &[&str]| -> Option<u64> {
            let o = std::process::Command::new(prog).args(args).arg(&path).output().ok()?;
            o.status.success().then_some(o.stdout.len() as u64)
        };
        out.gzip6 = out.gzip6.zip(size("gzip", &["-6", "-c"])).map(|(a, b)| a + b);
        out.zstd3 = out.zstd3.zip(size("zstd", &["-3", "-q", "-c"])).map(|(a, b)| a + b);
        let _ = std::fs::remove_file(&path);
    }
    out
}

// ----- the report -----

fn f(v: Option<f64>, d: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.d$}"))
}

fn pcts(v: &[f64], d: usize) -> String {
    format!(
        "{} / {} / {} / {}",
        f(percentile(v, 50.0), d),
        f(percentile(v, 90.0), d),
        f(percentile(v, 99.0), d),
        f(percentile(v, 100.0), d)
    )
}

fn mibs(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn ingest_column(r: &Ran) -> Vec<String> {
    let rate = |x: f64| if r.window > 0.0 { x / r.window } else { 0.0 };
    let per_core = |x: f64| r.cpu.filter(|c| *c > 0.0).map(|c| x / c);
    vec![
        format!("{} / {}", r.hosts, r.sessions),
        format!("{} / {}", r.announced, r.sessions),
        format!(
            "{} / {}",
            f(percentile(&r.start_lat, 50.0), 1),
            f(percentile(&r.start_lat, 99.0), 1)
        ),
        format!("{} / {} / {}", r.chunks_total, r.sent, r.committed),
        format!("{}", r.chunk_bytes / r.chunks_total.max(1) as u64),
        format!("{:.2} s", r.window),
        format!("{:.0}", rate(r.win_chunks as f64)),
        format!("{:.1}", rate(mibs(r.win_bytes))),
        pcts(&r.lat, 2),
        format!(
            "{} ({})",
            f(r.cpu, 2),
            r.cpu.map_or("-".into(), |c| format!(
                "{:.0}% of a core",
                100.0 * c / r.window.max(1e-9)
            ))
        ),
        r.cpu
            .map_or("-".into(), |c| format!("{:.0}", c * 1e6 / r.win_chunks.max(1) as f64)),
        f(r.checks_us, 0),
        f(per_core(mibs(r.win_bytes)), 1),
        f(per_core(r.win_chunks as f64), 0),
        format!("{:.0}", rate(r.win_appends as f64)),
        format!("{:.2}", r.win_chunks as f64 / r.win_appends.max(1) as f64),
        r.sys.split.clone(),
        f(others(&r.sys, &[r.cpu, r.load_cpu]), 2),
        format!("{:.1}", r.seen.blocked),
        format!("{} / {}", r.seen.threads0, r.seen.threads),
        format!(
            "{} / {} MiB",
            r.hwm.map_or("-".into(), |h| mib(h as f64)),
            mib(r.seen.rss as f64)
        ),
        f(r.load_cpu, 2),
        r.errors.len().to_string(),
    ]
}

fn run(opts: &Opts) -> Result<(), String> {
    let cli = target_dir().join("shelltrail");
    if !cli.is_file() {
        return Err(format!(
            "{} is missing: build it first with `cargo build --release -p shelltrail --bins`",
            cli.display()
        ));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let nofile = raise_nofile();
    let t_run = *STARTED.get_or_init(Instant::now);

    println!("# shelltrail collector: ingest, drain, stored bytes");
    println!();
    for (k, v) in machine() {
        println!("{k:>10}: {v}");
    }
    println!("    source: {}", shelltrail_benches::source_version());
    println!("shelltrail: {}", version_of(&cli, &["--version"]).unwrap_or_default());
    let tool = |name: &str| {
        which(name, &[])
            .and_then(|p| version_of(&p, &["--version"]))
            .unwrap_or_else(|| "not installed".into())
    };
    println!("      gzip: {}", tool("gzip"));
    println!("      zstd: {}", tool("zstd"));
    let rec = recorder();
    println!(
        "  recorder: chunk_bytes {} KiB (bulk chunks here: {} KiB), chunk_interval_ms {} (interactive chunks here: \
         every {} ms), compression_level {}",
        rec.chunk_bytes >> 10,
        opts.chunk_kib,
        rec.chunk_interval_ms,
        INTERVAL.as_millis(),
        rec.compression_level
    );
    println!(
        "      load: {} sessions on {} host streams (one client certificate each); {} s paced; {} MiB saturation; \
         backlog {} sessions, {} MiB; open files limit {nofile}",
        opts.sessions, opts.hosts, opts.seconds, opts.sat_mib, opts.backlog_sessions, opts.backlog_mib
    );
    println!();

    let tmp = tempfile::Builder::new()
        .prefix("shelltrail-ingest-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let dir = tmp.path().to_path_buf();
    progress!("generating text and {} host certificates...", opts.hosts);
    let pool = mixed_text(POOL, 1);
    let pki = Pki::create(&dir.join("pki"), opts.hosts)?;

    // The disk, before any load: what fdatasync costs here.
    progress!("probing fdatasync...");
    let probes: Vec<(usize, Option<(f64, f64)>)> = [(1usize, 200usize), (8, 50), (64, 10)]
        .iter()
        .map(|&(w, n)| {
            let n = if opts.quick { n / 2 } else { n };
            (w, fsync_probe(&dir.join("probe"), w, n))
        })
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let ing = ingest(&rt, &cli, &dir, &pki, opts, &pool)?;
    progress!("phase 3: backlog drain after an outage");
    let dr = drain(&rt, &cli, &dir, &pki, opts, &pool).unwrap_or_else(|e| DrainReport {
        failed: Some(e),
        ..Default::default()
    });
    progress!("phase 4: compaction; the collector restarted on each data directory compacts what is left...");
    let compaction = [
        compact_all(&cli, &pki, &ing.data, &[&ing.interactive, &ing.bulk]),
        compact_all(&cli, &pki, &dr.data, &[&dr.expect]),
    ];
    progress!("phase 4: stored bytes; checking every stored session against its .cast...");
    let sz_inter = sizes(&ing.data, &ing.interactive, opts.sample, &dir);
    let sz_sat = sizes(&ing.data, &ing.bulk, 0, &dir);
    let sz_bulk = sizes(&dr.data, &dr.expect, opts.sample, &dir);
    drop(rt);

    // ----- ingest -----
    println!("## Ingest: {} sessions, {} host streams", opts.sessions, opts.hosts);
    println!();
    let names = [
        "host streams / sessions",
        "sessions announced (SessionPosition received)",
        "SessionStart -> SessionPosition ms p50 / p99",
        "chunks built / sent / committed",
        "mean chunk on the wire B",
        "measurement window",
        "chunks committed per s",
        "MiB committed per s (chunk bytes)",
        "commit latency ms p50 / p90 / p99 / max",
        "collector CPU s in window",
        "collector CPU us per chunk",
        "  of which the store's chunk checks (decompress + SHA-256, timed here)",
        "MiB/s per collector core (per CPU-second)",
        "chunks/s per collector core",
        "store appends/s (one fdatasync each)",
        "chunks per append",
        "machine CPU % user / system / iowait / idle",
        "CPU s of other processes and kernel threads in window",
        "tasks blocked on I/O (mean procs_blocked)",
        "collector threads at window start / most seen",
        "collector VmHWM at end / max VmRSS in window",
        "load generator CPU s in window (same cores)",
        "errors",
    ];
    let a = ingest_column(&ing.paced);
    let b = ingest_column(&ing.sat);
    let rows: Vec<Vec<String>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| vec![n.to_string(), a[i].clone(), b[i].clone()])
        .collect();
    let sat_head = format!(
        "saturation: {} KiB-text chunks, {} MiB window per stream",
        opts.chunk_kib, opts.window_mib
    );
    print_table(
        &["measure", "paced: a chunk per session every 100 ms", &sat_head],
        &rows,
    );
    println!();
    println!(
        "Paced: the window is {} s from the first scheduled send; latency is from handing a chunk to its host's stream \
         to the Committed covering it. Saturation: the window runs from the first send to the last Committed.",
        opts.seconds
    );
    println!();
    let sec_rows: Vec<Vec<String>> = ing
        .sat
        .per_second
        .iter()
        .enumerate()
        .filter(|(_, p)| p.1 > 0)
        .map(|(s, p)| vec![format!("{s}-{}", s + 1), p.1.to_string(), format!("{:.1}", mibs(p.0))])
        .collect();
    let paced_rows: Vec<Vec<String>> = ing
        .paced
        .lat_by_sec
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .map(|(s, v)| {
            vec![
                format!("{s}-{}", s + 1),
                v.len().to_string(),
                f(percentile(v, 50.0), 1),
                f(percentile(v, 99.0), 1),
                f(percentile(v, 100.0), 1),
            ]
        })
        .collect();
    println!("paced, second by second (by send time):");
    println!();
    print_table(
        &["second", "chunks", "commit p50 ms", "commit p99 ms", "commit max ms"],
        &paced_rows,
    );
    println!();
    println!("saturation, second by second (by commit time):");
    println!();
    print_table(&["second", "chunks committed", "MiB committed"], &sec_rows);
    println!();
    let probe_rows: Vec<Vec<String>> = probes
        .iter()
        .map(|(w, p)| vec![w.to_string(), f(p.map(|x| x.0), 0), f(p.map(|x| x.1), 2)])
        .collect();
    println!("the disk (4 KiB write + fdatasync per call, each writer its own file, before any load):");
    println!();
    print_table(&["concurrent writers", "fdatasyncs/s", "ms per fdatasync"], &probe_rows);
    println!();

    // ----- drain -----
    println!(
        "## Drain: a real agent's backlog after an outage ({} sessions, {} chunks, {} MiB)",
        dr.sessions,
        dr.chunks,
        mib(dr.bytes as f64)
    );
    println!();
    if let Some(e) = &dr.failed {
        println!("the drain could not run: {e}");
        println!();
    }
    let dw = dr.window;
    let drate = |x: f64| dw.filter(|w| *w > 0.0).map(|w| x / w);
    let dcore = |x: f64| dr.collector_cpu.filter(|c| *c > 0.0).map(|c| x / c);
    let drows: Vec<Vec<String>> = vec![
        vec![
            "backlog fed to the agent (collector down)".into(),
            format!(
                "{:.2} s ({:.0} MiB/s into the spool), {} errors",
                dr.feed_secs,
                mibs(dr.bytes) / dr.feed_secs.max(1e-9),
                dr.feed_errors.len()
            ),
        ],
        vec![
            "agent spool after feeding / after the drain".into(),
            format!("{} / {} MiB", mib(dr.spool_before as f64), mib(dr.spool_after as f64)),
        ],
        vec![
            "live session ended -> spool down to two segments".into(),
            format!("{} s", f(dr.spool_freed_secs, 2)),
        ],
        vec![
            "collector start -> first SessionStart received".into(),
            format!("{} s (the agent's reconnect backoff)", f(dr.reconnect, 2)),
        ],
        vec![
            "sessions ended at the collector".into(),
            format!("{} / {}", dr.ended, dr.sessions),
        ],
        vec![
            "drain time (first SessionStart -> last SessionEnd received)".into(),
            format!("{} s", f(dw, 2)),
        ],
        vec![
            "drain MiB/s / chunks/s".into(),
            format!("{} / {}", f(drate(mibs(dr.bytes)), 1), f(drate(dr.chunks as f64), 0)),
        ],
        vec![
            "collector CPU s during the drain".into(),
            format!(
                "{} ({} s since its start)",
                f(dr.collector_cpu, 2),
                f(dr.collector_cpu_total, 2)
            ),
        ],
        vec![
            "drain MiB/s / chunks/s per collector core".into(),
            format!("{} / {}", f(dcore(mibs(dr.bytes)), 1), f(dcore(dr.chunks as f64), 0)),
        ],
        vec!["agent CPU s during the drain".into(), f(dr.agent_cpu, 2)],
        vec!["load generator CPU s during the drain".into(), f(dr.load_cpu, 2)],
        vec![
            "machine CPU % user / system / iowait / idle".into(),
            dr.sys.split.clone(),
        ],
        vec![
            "CPU s of other processes and kernel threads".into(),
            f(others(&dr.sys, &[dr.collector_cpu, dr.agent_cpu, dr.load_cpu]), 2),
        ],
        vec![
            "tasks blocked on I/O (mean procs_blocked)".into(),
            format!("{:.1}", dr.seen.blocked),
        ],
        vec![
            "collector threads at its start / most seen".into(),
            format!("{} / {}", dr.seen.threads0, dr.seen.threads),
        ],
        vec![
            "collector / agent VmHWM".into(),
            format!(
                "{} / {} MiB",
                dr.collector_hwm.map_or("-".into(), |h| mib(h as f64)),
                dr.agent_hwm.map_or("-".into(), |h| mib(h as f64))
            ),
        ],
    ];
    print_table_left(&["measure", "value"], &drows, 1);
    println!();

    // Live session: by when its chunk was written, relative to the drain.
    let (fs, le) = (dr.first_start.unwrap_or(f64::MAX), dr.last_end.unwrap_or(f64::MAX));
    // 0: written during the outage, 1: during the drain, 2: after it.
    let class = |t: f64| {
        if t < fs {
            0
        } else if t < le {
            1
        } else {
            2
        }
    };
    let classes = [
        "written during the outage",
        "written during the drain",
        "written after the drain",
    ];
    let mut live_rows = Vec::new();
    for (i, name) in classes.iter().enumerate() {
        let all: Vec<&(f64, Option<f64>)> = dr.live.iter().filter(|(s, _)| class(*s) == i).collect();
        let lat: Vec<f64> = all.iter().filter_map(|(s, a)| a.map(|a| (a - s) * 1e3)).collect();
        live_rows.push(vec![
            name.to_string(),
            all.len().to_string(),
            lat.len().to_string(),
            pcts(&lat, 1),
        ]);
    }
    println!(
        "the live session (a chunk every 100 ms into the agent; an operator follows it with ReadChunks): \
         ms from the recorder's write to the follower"
    );
    println!();
    print_table(
        &[
            "live chunks",
            "written",
            "seen at the collector",
            "ms p50 / p90 / p99 / max",
        ],
        &live_rows,
    );
    println!();
    for e in [&dr.live_error, &dr.follow_error].into_iter().flatten() {
        println!("live session: {e}");
    }
    if dr.ended < dr.sessions {
        println!("agent log (last lines): {}", dr.agent_log_tail);
    }

    // ----- stored bytes -----
    println!("## Stored bytes");
    println!();
    let mut srows = Vec::new();
    let bulk_label = format!("bulk: {} KiB chunks (drained backlog)", opts.chunk_kib);
    for (label, s) in [
        ("interactive: a chunk every 100 ms (paced)", &sz_inter),
        (bulk_label.as_str(), &sz_bulk),
    ] {
        let z = s.zstd3.filter(|z| *z > 0).map(|z| z as f64);
        let row = |what: &str, b: Option<u64>| -> Vec<String> {
            vec![
                label.to_string(),
                what.to_string(),
                b.map_or("-".into(), |b| format!("{:.2}", mibs(b))),
                b.map_or("-".into(), |b| {
                    format!("{:.1}", b as f64 * 1024.0 / s.cast.max(1) as f64)
                }),
                f(b.zip(z).map(|(b, z)| b as f64 / z), 3),
            ]
        };
        srows.push(row(
            &format!(".cast ({} sessions, {} chunks)", s.sample, s.chunks),
            Some(s.cast),
        ));
        srows.push(row("the chunks as shipped (recorder's level)", Some(s.shipped)));
        srows.push(row(
            &format!("stored ({}/{} sessions compacted into runs)", s.compacted, s.sessions),
            Some(s.stored),
        ));
        srows.push(row("session directories (all files)", Some(s.dir)));
        srows.push(row("gzip -6 of the whole .cast", s.gzip6));
        srows.push(row("zstd -3 of the whole .cast", s.zstd3));
    }
    print_table_left(
        &["sessions", "what", "MiB", "KiB per MiB of .cast", "x zstd -3 of .cast"],
        &srows,
        2,
    );
    println!();
    println!(
        "stored sessions that decompress to exactly the encoded .cast: interactive {}/{}, saturation {}/{}, \
         backlog {}/{}",
        sz_inter.verified, sz_inter.sessions, sz_sat.verified, sz_sat.sessions, sz_bulk.verified, sz_bulk.sessions
    );
    for m in [&sz_inter, &sz_sat, &sz_bulk]
        .iter()
        .flat_map(|s| s.mismatches.iter())
        .take(5)
    {
        println!("mismatch: {m}");
    }
    println!(
        "compacted into runs: interactive {}/{}, saturation {}/{}, backlog {}/{}",
        sz_inter.compacted, sz_inter.sessions, sz_sat.compacted, sz_sat.sessions, sz_bulk.compacted, sz_bulk.sessions
    );
    for (what, c) in ["ingest", "drain"].iter().zip(&compaction) {
        match c {
            Ok(secs) => println!(
                "{what} data directory: every session compacted {secs:.1} s after a collector was started on it again"
            ),
            Err(e) => println!("{what} data directory: {e}"),
        }
    }
    println!();

    // ----- problems and summary -----
    for e in ing
        .connect_errors
        .iter()
        .chain(&ing.paced.errors)
        .chain(&ing.sat.errors)
        .chain(&dr.feed_errors)
        .take(8)
    {
        println!("error: {e}");
    }
    let live_p99 = |i: usize| {
        let lat: Vec<f64> = dr
            .live
            .iter()
            .filter(|(s, _)| class(*s) == i)
            .filter_map(|(s, a)| a.map(|a| (a - s) * 1e3))
            .collect();
        (percentile(&lat, 50.0), percentile(&lat, 99.0))
    };
    let (d50, d99) = live_p99(1);
    let (a50, a99) = live_p99(2);
    let sat = &ing.sat;
    println!("Summary:");
    println!(
        "* saturation: {} MiB/s, {} chunks/s committed; per collector core {} MiB/s, {} chunks/s; \
         machine iowait {}",
        f(Some(mibs(sat.win_bytes) / sat.window.max(1e-9)), 1),
        f(Some(sat.win_chunks as f64 / sat.window.max(1e-9)), 0),
        f(sat.cpu.map(|c| mibs(sat.win_bytes) / c.max(1e-9)), 1),
        f(sat.cpu.map(|c| sat.win_chunks as f64 / c.max(1e-9)), 0),
        sat.sys
            .split
            .split(" / ")
            .nth(2)
            .map_or("-".into(), |x| format!("{x}%")),
    );
    println!(
        "* paced: {} chunks/s from {} sessions committed in {} ms p50, {} ms p99; {} us of collector CPU per chunk",
        f(Some(ing.paced.win_chunks as f64 / ing.paced.window.max(1e-9)), 0),
        opts.sessions,
        f(percentile(&ing.paced.lat, 50.0), 1),
        f(percentile(&ing.paced.lat, 99.0), 1),
        f(ing.paced.cpu.map(|c| c * 1e6 / ing.paced.win_chunks.max(1) as f64), 0),
    );
    println!(
        "* drain: {} MiB in {} s ({} MiB/s), starting {} s after the collector came back; live chunks p50 / p99 {} / {} ms \
         during the drain, {} / {} ms after",
        mib(dr.bytes as f64),
        f(dw, 2),
        f(drate(mibs(dr.bytes)), 1),
        f(dr.reconnect, 1),
        f(d50, 0),
        f(d99, 0),
        f(a50, 0),
        f(a99, 0),
    );
    let ratio = |s: &Sizes| f(s.zstd3.filter(|z| *z > 0).map(|z| s.stored as f64 / z as f64), 3);
    println!(
        "* stored chunks x zstd -3 of the whole .cast: interactive {}, bulk {} (goal: within 1.10)",
        ratio(&sz_inter),
        ratio(&sz_bulk)
    );
    println!("* run time {:.0} s", t_run.elapsed().as_secs_f64());
    if opts.keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    } else {
        let t = Instant::now();
        drop(tmp);
        progress!("removed the temporary directory in {:.1} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}
