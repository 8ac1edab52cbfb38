//! The shipping path's world: a certificate authority, a collector, a fault
//! proxy in front of it, and host agents shipping through the proxy.
//!
//! Layout of a [`ShipWorld`]'s directory (a fresh `/tmp/shelltrail-ship-*`):
//!
//! ```text
//! pki/ca.pem, ca.key                      the fleet's CA (`shelltrail pki init`)
//! pki/collector.pem, .key                 the collector's certificate: 127.0.0.1 and localhost
//! pki/operator.pem, .key                  the operator's client certificate (the CLI), role operator
//! pki/<host>.pem, .key                    one client certificate per host, naming it, role host
//! collector.toml, collector/, collector.log   the collector's config, data directory and log
//! hosts/<host>/shelltrail.toml, agent.sock, spool/, agent.log   one directory per host
//! ```
//!
//! Agents reach the collector through the [`FaultProxy`] (their `[ship]
//! collector` is the proxy's URL) unless a host is built with
//! [`HostBuilder::direct`]. The operator CLI always talks to the collector
//! directly, with the operator certificate: what a test reads never depends
//! on the faults it injects.
//!
//! Sessions are driven with `shelltrail-shell -c` outside any SSH session
//! (no sshd), running a deterministic [`Script`] whose exact output bytes
//! the test computes itself.
//!
//! As in the rest of the harness: every wait has a deadline, every process is
//! killed when its owner is dropped, and a panicking test prints the
//! collector's and agents' logs and the proxy's event list.

use crate::faultproxy::FaultProxy;
use crate::proc::{Output, Running, poll_until, run, run_ok};
use crate::world::{SessionRow, files_bytes, local_recorder, sessions_json, set_mode, spool_segments};
use crate::{TIMEOUT, bin_dir, strip_ansi};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a test waits for shipping to catch up once the link is good.
pub const SHIP_TIMEOUT: Duration = Duration::from_secs(60);

/// `shelltrail ARGS...` (the built binary).
fn shelltrail() -> Command {
    Command::new(bin_dir().join("shelltrail"))
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("finding a free port")
        .port()
}

// ----- certificates -----

/// A CA made with `shelltrail pki`, and the certificates it issued.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// `shelltrail pki init DIR --name NAME`
    pub fn init(dir: &Path, name: &str) -> Pki {
        let mut c = shelltrail();
        c.args(["pki", "init"]).arg(dir).args(["--name", name]);
        run_ok(c, TIMEOUT);
        Pki { dir: dir.to_path_buf() }
    }

    /// `shelltrail pki issue DIR NAME --role ROLE --san ...` (once; later
    /// calls reuse it). `role`: host, operator or collector. Returns the
    /// certificate and key paths.
    pub fn issue(&self, name: &str, role: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.files(name);
        if !cert.exists() {
            let mut c = shelltrail();
            c.args(["pki", "issue"]).arg(&self.dir).arg(name).args(["--role", role]);
            for s in sans {
                c.args(["--san", s]);
            }
            run_ok(c, TIMEOUT);
        }
        (cert, key)
    }

    pub fn files(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        )
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

// ----- a child process with a log file -----

/// A daemon (agent or collector) writing to a log file; restartable; killed on drop.
struct Daemon {
    what: String,
    args: Vec<String>,
    log: PathBuf,
    /// Text in the log (written after this start) that says it is ready.
    ready: &'static str,
    child: Mutex<Option<Child>>,
}

impl Daemon {
    fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn start(&self, extra_ready: impl Fn() -> bool) {
        let mut slot = self.child.lock().expect("daemon lock");
        assert!(slot.is_none(), "{} is already running", self.what);
        let offset = std::fs::metadata(&self.log).map_or(0, |m| m.len()) as usize;
        let spawn = || {
            let log = File::options()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("opening a log file");
            shelltrail()
                .args(&self.args)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", self.what))
        };
        let mut child = spawn();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.get(offset..).is_some_and(|t| t.contains(self.ready)) && extra_ready() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                // The data directory's lock is released when the previous
                // collector's descriptor is closed everywhere; a child this
                // test process forks at that moment holds a copy until it
                // execs (flock locks belong to the open file). Try again.
                let since = text.get(offset..).unwrap_or_default();
                if since.contains("is in use by another") && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                    child = spawn();
                    continue;
                }
                panic!(
                    "{} exited ({st}) during start-up\n--- log ---\n{}",
                    self.what,
                    strip_ansi(&text)
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not start within 20 s\n--- log ---\n{}",
                    self.what,
                    strip_ansi(&text)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *slot = Some(child);
    }

    /// SIGKILL: a crash, no shutdown code runs.
    fn kill(&self) {
        let mut child = self
            .child
            .lock()
            .expect("daemon lock")
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.what));
        let _ = child.kill();
        let _ = child.wait();
    }

    fn running(&self) -> bool {
        let mut slot = self.child.lock().expect("daemon lock");
        matches!(slot.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().map(|mut s| s.take()).unwrap_or(None) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ----- the collector -----

/// `shelltrail collector` with mutual TLS on a fixed loopback port.
pub struct CollectorProc {
    pub port: u16,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    daemon: Daemon,
}

impl CollectorProc {
    /// Starts it and waits until it listens.
    pub fn start(&self) {
        let port = self.port;
        self.daemon
            .start(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    /// SIGKILL.
    pub fn kill(&self) {
        self.daemon.kill();
    }

    /// A crash and a restart on the same port and data directory.
    pub fn restart(&self) {
        self.kill();
        self.start();
    }

    pub fn running(&self) -> bool {
        self.daemon.running()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

// ----- the world -----

/// A collector, its CA and certificates, and a fault proxy in front of it.
/// See the module documentation.
pub struct ShipWorld {
    tempdir: Option<tempfile::TempDir>,
    pub path: PathBuf,
    pub pki: Pki,
    pub collector: CollectorProc,
    pub proxy: FaultProxy,
    /// The operator's client certificate and key (the CLI's identity):
    /// the view role, from `[collector] operators`.
    pub operator: (PathBuf, PathBuf),
    /// An operator with the respond role, from `[collector.roles]`.
    pub responder: (PathBuf, PathBuf),
}

impl ShipWorld {
    /// A running collector (mutual TLS) behind a passing proxy whose random
    /// choices follow `seed`.
    pub fn new(seed: u64) -> ShipWorld {
        let tempdir = tempfile::Builder::new()
            .prefix("shelltrail-ship-")
            .tempdir_in("/tmp")
            .expect("creating the world directory");
        let path = tempdir.path().to_path_buf();
        set_mode(&path, 0o755);
        let pki = Pki::init(&path.join("pki"), "shelltrail test CA");
        let (ccert, ckey) = pki.issue("collector", "collector", &["127.0.0.1", "localhost"]);
        let operator = pki.issue("operator", "operator", &["operator"]);
        let responder = pki.issue("responder", "operator", &["responder"]);

        let port = free_port();
        let data_dir = path.join("collector");
        let config = path.join("collector.toml");
        let text = format!(
            "# Written by the shelltrail shipping tests.\n\
             [collector]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {data_dir:?}\noperators = [\"operator\"]\n\n\
             [collector.roles]\nresponder = [\"respond\"]\n\n\
             [collector.tls]\ncert = {ccert:?}\nkey = {ckey:?}\nclient_ca = {ca:?}\n",
            ca = pki.ca(),
        );
        std::fs::write(&config, text).expect("writing the collector config");
        set_mode(&config, 0o644);
        let log = path.join("collector.log");
        let collector = CollectorProc {
            port,
            config: config.clone(),
            data_dir,
            log: log.clone(),
            daemon: Daemon {
                what: "the collector".into(),
                args: vec!["--config".into(), config.display().to_string(), "collector".into()],
                log,
                ready: "collector listening",
                child: Mutex::new(None),
            },
        };
        collector.start();
        let proxy = FaultProxy::start(collector.addr(), seed);
        ShipWorld {
            tempdir: Some(tempdir),
            path,
            pki,
            collector,
            proxy,
            operator,
            responder,
        }
    }

    /// A host named `name` (its certificate names it too); see [`HostBuilder`].
    pub fn host(&self, name: &str) -> HostBuilder<'_> {
        HostBuilder {
            world: self,
            name: name.to_string(),
            shell: Vec::new(),
            agent: Vec::new(),
            identity: None,
            direct: false,
            spool_from: None,
            start_agent: true,
        }
    }

    // ----- the operator CLI, against the collector -----

    /// `shelltrail --collector URL --ca --cert --key ARGS...` with the operator certificate.
    pub fn remote(&self, args: &[&str]) -> Command {
        self.remote_as(&self.operator.0, &self.operator.1, args)
    }

    /// The same with another client certificate.
    pub fn remote_as(&self, cert: &Path, key: &Path, args: &[&str]) -> Command {
        self.remote_via(&self.collector.url(), cert, key, args)
    }

    /// The same to the collector at `url` (a proxy in front of it, say).
    pub fn remote_via(&self, url: &str, cert: &Path, key: &Path, args: &[&str]) -> Command {
        let mut c = shelltrail();
        c.arg("--config")
            .arg(&self.collector.config)
            .arg("--collector")
            .arg(url)
            .arg("--ca")
            .arg(self.pki.ca())
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(args);
        c
    }

    /// `shelltrail ARGS... --collector URL --ca --cert --key`: the options
    /// after the subcommand, as a user may also write them.
    pub fn remote_after(&self, args: &[&str]) -> Command {
        let mut c = shelltrail();
        c.arg("--config")
            .arg(&self.collector.config)
            .args(args)
            .arg("--collector")
            .arg(self.collector.url())
            .arg("--ca")
            .arg(self.pki.ca())
            .arg("--cert")
            .arg(&self.operator.0)
            .arg("--key")
            .arg(&self.operator.1);
        c
    }

    /// `sessions --json` at the collector.
    pub fn remote_sessions(&self) -> Vec<SessionRow> {
        let out = run_ok(self.remote(&["sessions", "--json"]), TIMEOUT);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("sessions --json (collector) is not the expected JSON: {e}; {out}"))
    }

    /// Waits until a session at the collector satisfies `pred`.
    #[track_caller]
    pub fn wait_remote(&self, what: &str, timeout: Duration, pred: impl Fn(&SessionRow) -> bool) -> SessionRow {
        let mut last = Vec::new();
        poll_until(timeout, || {
            last = self.remote_sessions();
            last.iter().find(|r| pred(r)).cloned()
        })
        .unwrap_or_else(|| {
            panic!("no session at the collector matching {what} within {timeout:?}; sessions: {last:#?}")
        })
    }

    /// `verify ID` at the collector.
    pub fn remote_verify(&self, id: &str) -> Output {
        run(self.remote(&["verify", id]), TIMEOUT)
    }

    /// `export ID --raw` at the collector: the bytes the program wrote.
    pub fn remote_export_raw(&self, id: &str) -> Vec<u8> {
        run_ok(self.remote(&["export", id, "--raw"]), TIMEOUT).stdout
    }

    /// Everything the scenarios require of one shipped session: it reaches
    /// the collector ended (within `timeout`), complete (no chunk lost or
    /// missing), `verify` passes there (hash chain, no gap, no duplicate),
    /// and `export --raw` from the collector is exactly `expected`; and all
    /// of that again once the collector has compacted it into runs.
    /// Returns the collector's row.
    #[track_caller]
    pub fn assert_shipped(&self, host: &Host, id: &str, expected: &[u8], timeout: Duration) -> SessionRow {
        self.assert_shipped_from(&host.name, id, expected, timeout)
    }

    /// [`ShipWorld::assert_shipped`] for a session of the host named `host`
    /// (a [`World`](crate::World) shipping here, say).
    #[track_caller]
    pub fn assert_shipped_from(&self, host: &str, id: &str, expected: &[u8], timeout: Duration) -> SessionRow {
        let r = self.wait_remote(&format!("session {id} ended"), timeout, |r| r.id == id && !r.live);
        assert_eq!(r.host, host, "stored under the wrong host: {r:#?}");
        assert_eq!(r.exit_status, Some(0), "{r:#?}");
        assert_eq!(r.end_cause.as_deref(), Some("recorder"), "{r:#?}");
        assert_eq!(r.lost_chunks, 0, "{r:#?}");
        assert!(r.quarantine.is_empty(), "quarantined at the collector: {r:#?}");
        let last = r.last_seq.expect("an ended session names its last chunk");
        assert_eq!(r.chunks as u64, last + 1, "chunks missing at the collector: {r:#?}");
        let v = self.remote_verify(id);
        assert!(
            v.status.success() && v.stdout_str().starts_with("OK: ") && !v.stdout_str().contains("FAIL"),
            "verify at the collector failed: {v}"
        );
        let got = self.remote_export_raw(id);
        assert_bytes_eq(&got, expected, &format!("export --raw of {id} from the collector"));
        // The ended session is compacted into runs; it reads and verifies the same.
        let runs = self
            .collector
            .data_dir
            .join("sessions")
            .join(host)
            .join(id)
            .join("runs.zst");
        poll_until(timeout, || runs.exists().then_some(()))
            .unwrap_or_else(|| panic!("session {id} was not compacted at the collector within {timeout:?}"));
        let v = self.remote_verify(id);
        assert!(
            v.status.success() && v.stdout_str().starts_with("OK: ") && !v.stdout_str().contains("FAIL"),
            "verify of the compacted session at the collector failed: {v}"
        );
        let got = self.remote_export_raw(id);
        assert_bytes_eq(
            &got,
            expected,
            &format!("export --raw of compacted {id} from the collector"),
        );
        r
    }

    /// Checks that `host`'s spool holds nothing the collector lacks: every
    /// session in it is at the collector, ended, with at least the chunks
    /// the spool still has.
    #[track_caller]
    pub fn assert_spool_shipped(&self, host: &Host) {
        let remote = self.remote_sessions();
        for l in host.sessions() {
            let r = remote
                .iter()
                .find(|r| r.id == l.id)
                .unwrap_or_else(|| panic!("session {} of {} never reached the collector: {l:#?}", l.id, host.name));
            assert!(
                !r.live && !l.live,
                "session {} not ended: spool {l:#?}, collector {r:#?}",
                l.id
            );
            assert_eq!(r.last_seq, l.last_seq, "spool {l:#?}, collector {r:#?}");
        }
    }

    /// Prints the collector's log and the proxy's events; used when a test fails.
    fn dump_logs(&self) {
        eprintln!(
            "\n===== ship world {} =====\n--- collector.log ---\n{}\n--- proxy ({:?}) ---\n{}\n===== end of ship world logs =====",
            self.path.display(),
            self.collector.log_text(),
            self.proxy.stats(),
            self.proxy.events(),
        );
    }
}

impl Drop for ShipWorld {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::env::var_os("SHELLTRAIL_E2E_KEEP").is_some()
            && let Some(d) = self.tempdir.take()
        {
            eprintln!("keeping {}", d.keep().display());
        }
    }
}

/// Compares two byte strings and, when they differ, says where.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let ctx = |b: &[u8]| String::from_utf8_lossy(&b[at.saturating_sub(80)..(at + 80).min(b.len())]).into_owned();
    panic!(
        "{what}: {} bytes, expected {}; first difference at byte {at}\n--- got ---\n{}\n--- expected ---\n{}",
        got.len(),
        want.len(),
        ctx(got),
        ctx(want)
    );
}

// ----- hosts -----

/// Settings for a [`Host`]; see [`ShipWorld::host`].
pub struct HostBuilder<'w> {
    world: &'w ShipWorld,
    name: String,
    shell: Vec<String>,
    agent: Vec<String>,
    identity: Option<(PathBuf, PathBuf)>,
    direct: bool,
    spool_from: Option<PathBuf>,
    start_agent: bool,
}

impl HostBuilder<'_> {
    /// A line in the config's `[shell]` table.
    pub fn shell(mut self, line: &str) -> Self {
        self.shell.push(line.to_string());
        self
    }

    /// A line in the config's `[agent]` table.
    pub fn agent_setting(mut self, line: &str) -> Self {
        self.agent.push(line.to_string());
        self
    }

    /// Ships with this client certificate and key instead of the world's
    /// certificate for the host's name.
    pub fn identity(mut self, cert: &Path, key: &Path) -> Self {
        self.identity = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Ships to the collector directly, not through the proxy.
    pub fn direct(mut self) -> Self {
        self.direct = true;
        self
    }

    /// Starts with a copy of another host's spool (a replay).
    pub fn spool_copy_of(mut self, other: &Host) -> Self {
        self.spool_from = Some(other.spool.clone());
        self
    }

    /// Does not start the agent.
    pub fn agent_down(mut self) -> Self {
        self.start_agent = false;
        self
    }

    pub fn build(self) -> Host {
        let w = self.world;
        let dir = w.path.join("hosts").join(&self.name);
        std::fs::create_dir_all(&dir).expect("creating the host directory");
        let (cert, key) = self
            .identity
            .clone()
            .unwrap_or_else(|| w.pki.issue(&self.name, "host", &[&self.name]));
        let socket = dir.join("agent.sock");
        let spool = dir.join("spool");
        let fallback = dir.join("fallback");
        if let Some(from) = &self.spool_from {
            std::fs::create_dir_all(&spool).expect("creating the spool copy");
            for e in std::fs::read_dir(from).expect("reading the spool to copy").flatten() {
                std::fs::copy(e.path(), spool.join(e.file_name())).expect("copying a spool segment");
            }
            set_mode(&spool, 0o750);
        }
        let collector = if self.direct { w.collector.url() } else { w.proxy.url() };
        let mut text = format!(
            "# Written by the shelltrail shipping tests.\nsocket = {socket:?}\nspool_dir = {spool:?}\n\
             fallback_dir = {fallback:?}\n\
             # No sshd feeds these hosts (their recorders run unseparated, as root): with no recorder\n\
             # user the agent does not watch the machine's sshd sessions, which are other tests'.\n\
             recorder_user = \"shelltrail-e2e-none\"\n\n[shell]\n"
        );
        for l in &self.shell {
            text.push_str(l);
            text.push('\n');
        }
        // The spool's free-space floor is the machine's business, not the tests'.
        text.push_str("\n[agent]\nmin_free_bytes = \"1MiB\"\n");
        for l in &self.agent {
            text.push_str(l);
            text.push('\n');
        }
        text.push_str(&format!(
            "\n[ship]\ncollector = {collector:?}\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            ca = w.pki.ca()
        ));
        let config = dir.join("shelltrail.toml");
        std::fs::write(&config, text).expect("writing the host config");
        set_mode(&config, 0o644);
        let agent_log = dir.join("agent.log");
        let host = Host {
            name: self.name.clone(),
            dir,
            config: config.clone(),
            socket: socket.clone(),
            spool,
            agent_log: agent_log.clone(),
            daemon: Daemon {
                what: format!("the agent of {}", self.name),
                args: vec!["--config".into(), config.display().to_string(), "agent".into()],
                log: agent_log,
                ready: "listening",
                child: Mutex::new(None),
            },
        };
        if self.start_agent {
            host.start_agent();
        }
        host
    }
}

/// One host: its config, spool and agent. The agent is killed on drop; a
/// panicking test prints its log.
pub struct Host {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub spool: PathBuf,
    pub agent_log: PathBuf,
    daemon: Daemon,
}

impl Host {
    /// Starts the agent and waits until it listens on its socket.
    pub fn start_agent(&self) {
        let socket = self.socket.clone();
        self.daemon.start(|| socket.exists());
    }

    /// SIGKILL.
    pub fn kill_agent(&self) {
        self.daemon.kill();
    }

    pub fn agent_log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// `shelltrail-shell --config CONFIG -c COMMAND`, outside any SSH session.
    pub fn recorder(&self, command: &str) -> Command {
        local_recorder(&bin_dir().join("shelltrail-shell"), &self.config, command)
    }

    /// Runs `script` as a recorded session to its end; checks that the
    /// program's output passed through unchanged and returns the session's id.
    #[track_caller]
    pub fn run(&self, script: &Script) -> String {
        let out = run(self.recorder(&script.command()), TIMEOUT);
        out.assert_success();
        assert_bytes_eq(&out.stdout, &script.expected(), "the session's output");
        self.session_of(script).id
    }

    /// Starts `script` as a recorded session; see [`Host::finish`].
    pub fn spawn(&self, script: &Script) -> Running {
        Running::spawn(self.recorder(&script.command()), None)
    }

    /// Waits for a session [`Host::spawn`]ed to end; checks its output;
    /// returns its id.
    #[track_caller]
    pub fn finish(&self, session: Running, script: &Script) -> String {
        let out = session.wait(TIMEOUT);
        out.assert_success();
        assert_bytes_eq(&out.stdout, &script.expected(), "the session's output");
        self.session_of(script).id
    }

    /// `shelltrail --config CONFIG ARGS...`: the CLI on this host's spool.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = shelltrail();
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    /// `shelltrail sessions --json` on this host's spool.
    pub fn sessions(&self) -> Vec<SessionRow> {
        sessions_json(self.cli(&["sessions", "--json"]))
    }

    /// The spool's session that ran `script`.
    #[track_caller]
    pub fn session_of(&self, script: &Script) -> SessionRow {
        let all = self.sessions();
        let mut hits = all.iter().filter(|r| script.is(r));
        match (hits.next(), hits.next()) {
            (Some(r), None) => r.clone(),
            _ => panic!(
                "expected one session of {:?} in {}'s spool: {all:#?}",
                script.tag, self.name
            ),
        }
    }

    /// The spool's segment files, oldest first.
    pub fn segments(&self) -> Vec<PathBuf> {
        spool_segments(&self.spool)
    }

    /// Bytes in the spool's segments.
    pub fn spool_bytes(&self) -> u64 {
        files_bytes(&self.segments())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\n===== host {} ({}) =====\n--- agent.log ---\n{}\n===== end of host {} =====",
                self.name,
                self.dir.display(),
                self.agent_log_text(),
                self.name
            );
        }
    }
}

// ----- deterministic sessions -----

/// A session's program whose output the test knows byte for byte: numbered
/// lines, each with invalid UTF-8 (`ff fe 80`) and a two-byte character,
/// printed in batches with pauses between them; or ([`Script::cat`]) a
/// file's bytes.
#[derive(Debug, Clone)]
pub struct Script {
    /// Names the session: its command starts with `: TAG;`.
    pub tag: String,
    pub lines: u32,
    /// Lines per batch, and the pause after each batch (ms).
    pub batch: u32,
    pub pause_ms: u32,
    /// Instead of lines: `cat` this file, whose content is given.
    cat: Option<(PathBuf, std::sync::Arc<Vec<u8>>)>,
}

impl Script {
    /// `lines` lines at once, no pauses. `tag`: letters, digits and '-'.
    pub fn new(tag: &str, lines: u32) -> Script {
        assert!(
            tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "tag {tag:?}: letters, digits and '-' only"
        );
        Script {
            tag: tag.to_string(),
            lines,
            batch: lines.max(1),
            pause_ms: 0,
            cat: None,
        }
    }

    /// `cat FILE`, after writing `content` to it (a path without shell syntax).
    pub fn cat(tag: &str, file: &Path, content: Vec<u8>) -> Script {
        std::fs::write(file, &content).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
        let mut s = Script::new(tag, 0);
        s.cat = Some((file.to_path_buf(), std::sync::Arc::new(content)));
        s
    }

    /// Pauses `pause_ms` after every `batch` lines: the session lasts about
    /// `lines / batch * pause_ms` ms.
    pub fn paced(mut self, batch: u32, pause_ms: u32) -> Script {
        self.batch = batch.max(1);
        self.pause_ms = pause_ms;
        self
    }

    /// The shell command.
    pub fn command(&self) -> String {
        if let Some((file, _)) = &self.cat {
            return format!(": {}; cat {}", self.tag, file.display());
        }
        let pause = if self.pause_ms > 0 {
            format!(
                " if [ $((i % {})) -eq 0 ]; then sleep {}.{:03}; fi;",
                self.batch,
                self.pause_ms / 1000,
                self.pause_ms % 1000
            )
        } else {
            String::new()
        };
        format!(
            ": {tag}; for i in $(seq 1 {n}); do printf '{tag} %05d \\xff\\xfe\\x80 \\xc3\\xa9 ok\\n' \"$i\";{pause} done",
            tag = self.tag,
            n = self.lines
        )
    }

    /// Exactly what the command writes.
    pub fn expected(&self) -> Vec<u8> {
        if let Some((_, content)) = &self.cat {
            return content.to_vec();
        }
        let mut out = Vec::new();
        for i in 1..=self.lines {
            out.extend_from_slice(format!("{} {i:05} ", self.tag).as_bytes());
            out.extend_from_slice(b"\xff\xfe\x80 \xc3\xa9 ok\n");
        }
        out
    }

    /// Whether `row` is this script's session.
    pub fn is(&self, row: &SessionRow) -> bool {
        row.command.starts_with(&format!(": {};", self.tag))
    }
}
