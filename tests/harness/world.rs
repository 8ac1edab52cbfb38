//! One test's private shelltrail host: binaries, config, agent, sshd.
//!
//! Layout of a world's directory (a fresh `/tmp/shelltrail-e2e-*`, mode 0755
//! so that the test user can reach the recorder binary and the agent socket):
//!
//! ```text
//! bin/shelltrail, bin/shelltrail-shell   copies of the built binaries (0755)
//! agent.sock, spool/, agent.log          the agent's socket, spool and stderr
//! sshd_config, sshd.log, host key        the private sshd (see `sshd`)
//! client_key[.pub], authorized_keys      the client's key pair and sshd's list
//! files/                                 owned by the test user: transfer targets, scratch files
//! ```
//!
//! The binaries are copied because the repository may live somewhere the
//! test user cannot enter (e.g. /root), and sshd runs the recorder as that
//! user.
//!
//! The config is `/etc/shelltrail/e2e/<world directory's name>.toml`,
//! root-owned 0644 and removed on drop: under sshd the recorder reads
//! configuration only from files under /etc/shelltrail, in directories only
//! root can change, so the tests hold to the rule a host does.

use crate::cast::Cast;
use crate::client::{Ssh, ssh_options};
use crate::collector::ShipWorld;
use crate::proc::{describe, poll_until, run, run_ok};
use crate::sshd::{Sshd, SshdSpec, keygen};
use crate::users::TestUser;
use crate::{TIMEOUT, bin_dir, require_root, strip_ansi};
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One row of `shelltrail sessions --json`: the CLI's own type, so the two cannot drift.
pub use shelltrail::cli::sessions::Row as SessionRow;

/// Settings for a [`World`]; see [`World::builder`].
pub struct WorldBuilder {
    shell: Vec<String>,
    agent: Vec<String>,
    sshd_extra: Vec<String>,
    start_agent: bool,
    sshd: bool,
    user: Option<TestUser>,
    user_ca: bool,
    tables: Vec<String>,
    break_glass: Option<String>,
}

impl WorldBuilder {
    /// Break-glass as the shipped sshd drop-in sets it up: members of
    /// `group` (made here, with the test user in it) get the recorder with
    /// `--break-glass`, whose fallback directory (`fallback/` in the world)
    /// belongs to the recorder's user.
    pub fn break_glass(mut self, group: &str) -> Self {
        self.break_glass = Some(group.to_string());
        self.shell.push(format!("break_glass_group = {group:?}"));
        self
    }

    /// Adds a line to the config's `[shell]` table, e.g. `record_input = true`.
    pub fn shell(mut self, line: &str) -> Self {
        self.shell.push(line.to_string());
        self
    }

    /// Adds a line to the config's `[agent]` table.
    pub fn agent_setting(mut self, line: &str) -> Self {
        self.agent.push(line.to_string());
        self
    }

    /// Adds a line to sshd_config.
    pub fn sshd_config(mut self, line: &str) -> Self {
        self.sshd_extra.push(line.to_string());
        self
    }

    /// Does not start the agent (tests of what happens without it).
    pub fn agent_down(mut self) -> Self {
        self.start_agent = false;
        self
    }

    /// No sshd: the test talks to the agent or runs the recorder directly.
    pub fn no_sshd(mut self) -> Self {
        self.sshd = false;
        self
    }

    /// Logs in as `user` instead of the shared test user.
    pub fn user(mut self, user: TestUser) -> Self {
        self.user = Some(user);
        self
    }

    /// Authenticates with an OpenSSH user certificate instead of a listed
    /// key: a CA signs the client key (key id `alice@example`, principal =
    /// the test user), sshd trusts the CA, and authorized_keys stays empty so
    /// that nothing but the certificate can log in.
    pub fn user_ca(mut self) -> Self {
        self.user_ca = true;
        self
    }

    /// Ships to `ship`'s collector directly (not through its proxy), as the
    /// host `host`: a `[ship]` table with a host certificate naming it.
    pub fn ship_to(mut self, ship: &ShipWorld, host: &str) -> Self {
        let (cert, key) = ship.pki.issue(host, "host", &[host]);
        self.tables.push(format!(
            "[ship]\ncollector = {collector:?}\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            collector = ship.collector.url(),
            ca = ship.pki.ca()
        ));
        self
    }

    pub fn build(self) -> World {
        World::create(self)
    }
}

/// A test's shelltrail host. Everything in it is stopped and removed on drop;
/// if the test is panicking, the agent's and sshd's logs are printed first.
pub struct World {
    tempdir: Option<tempfile::TempDir>,
    /// The world's directory.
    pub path: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub spool: PathBuf,
    /// The copied recorder binary (what sshd's ForceCommand runs).
    pub shell_bin: PathBuf,
    /// The copied CLI/agent binary.
    pub cli_bin: PathBuf,
    pub client_key: PathBuf,
    /// Set when the world uses a user certificate.
    pub client_cert: Option<PathBuf>,
    /// The CA's public key, in certificate worlds.
    pub ca_pub: Option<PathBuf>,
    /// The user sessions log in as.
    pub user: TestUser,
    /// A directory owned by the test user for files sessions write.
    pub files: PathBuf,
    pub agent_log: PathBuf,
    sshd: Option<Sshd>,
    agent: Mutex<Option<Child>>,
}

impl World {
    /// Agent and sshd with the default recorder settings, shared test user.
    pub fn new() -> World {
        World::builder().build()
    }

    pub fn builder() -> WorldBuilder {
        WorldBuilder {
            shell: Vec::new(),
            agent: Vec::new(),
            sshd_extra: Vec::new(),
            start_agent: true,
            sshd: true,
            user: None,
            user_ca: false,
            tables: Vec::new(),
            break_glass: None,
        }
    }

    fn create(b: WorldBuilder) -> World {
        require_root();
        let bins = bin_dir();
        let user = b.user.clone().unwrap_or_else(TestUser::shared);
        let tempdir = tempfile::Builder::new()
            .prefix("shelltrail-e2e-")
            .tempdir_in("/tmp")
            .expect("creating the world directory");
        let path = tempdir.path().to_path_buf();
        set_mode(&path, 0o755);

        let bin = path.join("bin");
        std::fs::create_dir(&bin).expect("mkdir bin");
        set_mode(&bin, 0o755);
        for name in crate::BINARIES {
            let to = bin.join(name);
            std::fs::copy(bins.join(name), &to).unwrap_or_else(|e| panic!("copying {name} into the world: {e}"));
            set_mode(&to, 0o755);
        }
        crate::users::install_setuid_recorder(&bin.join("shelltrail-shell"));

        let files = path.join("files");
        std::fs::create_dir(&files).expect("mkdir files");
        set_mode(&files, 0o755);
        nix::unistd::chown(
            &files,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            None::<nix::unistd::Gid>,
        )
        .expect("chown files/");

        let socket = path.join("agent.sock");
        let spool = path.join("spool");
        let config = config_path(&path);
        let fallback = path.join("fallback");
        let mut text = format!(
            "# Written by the shelltrail end-to-end tests.\n\
             socket = {socket:?}\n\
             spool_dir = {spool:?}\n\
             fallback_dir = {fallback:?}\n\
             recorder_user = {:?}\n\n[shell]\n",
            crate::users::RECORDER_USER
        );
        for l in &b.shell {
            text.push_str(l);
            text.push('\n');
        }
        // The spool's free-space floor is the host's business, not the tests'.
        text.push_str("\n[agent]\nmin_free_bytes = \"1MiB\"\n");
        for l in &b.agent {
            text.push_str(l);
            text.push('\n');
        }
        for t in &b.tables {
            text.push('\n');
            text.push_str(t);
        }
        std::fs::write(&config, text).expect("writing the config");
        set_mode(&config, 0o644);

        let client_key = path.join("client_key");
        keygen(&client_key);
        let authorized_keys = path.join("authorized_keys");
        let mut sshd_extra = b.sshd_extra.clone();
        let (mut client_cert, mut ca_pub) = (None, None);
        if b.user_ca {
            let ca = path.join("user_ca");
            keygen(&ca);
            let mut c = Command::new("ssh-keygen");
            c.args(["-q", "-s"])
                .arg(&ca)
                .args(["-I", "alice@example", "-n", &user.name, "-V", "-5m:+1h"])
                .arg(pub_path(&client_key));
            run_ok(c, TIMEOUT);
            std::fs::write(&authorized_keys, "").expect("writing authorized_keys");
            sshd_extra.push(format!("TrustedUserCAKeys {}", pub_path(&ca).display()));
            client_cert = Some(path.join("client_key-cert.pub"));
            ca_pub = Some(pub_path(&ca));
        } else {
            std::fs::copy(pub_path(&client_key), &authorized_keys).expect("writing authorized_keys");
        }
        set_mode(&authorized_keys, 0o644);

        let shell_bin = bin.join("shelltrail-shell");
        let cli_bin = bin.join("shelltrail");
        let force_command = format!("{} --config {}", shell_bin.display(), config.display());
        if let Some(group) = &b.break_glass {
            crate::users::ensure_group_with(group, &user.name);
            let fallback = path.join("fallback");
            std::fs::create_dir(&fallback).expect("mkdir fallback");
            set_mode(&fallback, 0o2770);
            let rec = nix::unistd::User::from_name(crate::users::RECORDER_USER)
                .unwrap()
                .expect("the recorder's user");
            nix::unistd::chown(&fallback, Some(rec.uid), None::<nix::unistd::Gid>).expect("chown fallback/");
            sshd_extra.push(format!(
                "Match Group {group}\n    ForceCommand {force_command} --break-glass"
            ));
        }
        let sshd = b.sshd.then(|| {
            Sshd::start(&SshdSpec {
                dir: &path,
                force_command: &force_command,
                authorized_keys: &authorized_keys,
                extra: &sshd_extra,
            })
        });

        let world = World {
            agent_log: path.join("agent.log"),
            tempdir: Some(tempdir),
            path,
            config,
            socket,
            spool,
            shell_bin,
            cli_bin,
            client_key,
            client_cert,
            ca_pub,
            user,
            files,
            sshd,
            agent: Mutex::new(None),
        };
        if b.start_agent {
            world.start_agent();
        }
        world
    }

    /// The sshd's port (panics in a world without sshd).
    pub fn port(&self) -> u16 {
        self.sshd.as_ref().expect("this world has no sshd").port
    }

    // ----- the agent -----

    /// Starts the agent and waits until it listens. Panics if it is running.
    pub fn start_agent(&self) {
        let mut slot = self.agent.lock().expect("agent lock");
        assert!(slot.is_none(), "the agent is already running");
        let offset = std::fs::metadata(&self.agent_log).map_or(0, |m| m.len()) as usize;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.agent_log)
            .expect("opening agent.log");
        let mut child = Command::new(&self.cli_bin)
            .arg("--config")
            .arg(&self.config)
            .arg("agent")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.agent_log_text();
            if text.get(offset..).is_some_and(|t| t.contains("listening")) && self.socket.exists() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("the agent exited ({st}) during start-up\n--- agent.log ---\n{text}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not start listening within 20 s\n--- agent.log ---\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *slot = Some(child);
    }

    /// The running agent's pid (panics if it is not running).
    pub fn agent_pid(&self) -> u32 {
        self.agent
            .lock()
            .expect("agent lock")
            .as_ref()
            .expect("the agent is not running")
            .id()
    }

    /// Whether the agent is still running (it has not exited).
    pub fn agent_running(&self) -> bool {
        self.agent
            .lock()
            .expect("agent lock")
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the agent with SIGKILL (a crash: no shutdown code runs).
    pub fn kill_agent(&self) {
        let mut slot = self.agent.lock().expect("agent lock");
        let mut child = slot.take().expect("the agent is not running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the agent as a service manager does: SIGTERM, then waits for it
    /// to exit (panics if it is still running after 30 s).
    pub fn stop_agent(&self) {
        let mut slot = self.agent.lock().expect("agent lock");
        let mut child = slot.take().expect("the agent is not running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the agent");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the agent did not exit within 30 s of SIGTERM\n--- agent.log ---\n{}",
                        self.agent_log_text()
                    );
                }
            }
        }
    }

    /// Freezes the agent (SIGSTOP) for `pause`, from a thread: it neither
    /// reads nor acknowledges meanwhile, as an agent stuck on a slow disk.
    pub fn pause_agent(&self, pause: Duration) -> std::thread::JoinHandle<()> {
        let pid = self
            .agent
            .lock()
            .expect("agent lock")
            .as_ref()
            .expect("the agent is not running")
            .id();
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP the agent");
        std::thread::spawn(move || {
            std::thread::sleep(pause);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        })
    }

    /// A crash and a restart: SIGKILL, then a new agent on the same spool.
    pub fn restart_agent(&self) {
        self.kill_agent();
        self.start_agent();
    }

    /// The spool's segment files, oldest first.
    pub fn segments(&self) -> Vec<PathBuf> {
        spool_segments(&self.spool)
    }

    /// Bytes in the spool's segments.
    pub fn spool_bytes(&self) -> u64 {
        files_bytes(&self.segments())
    }

    /// The agent's log (colour codes removed).
    pub fn agent_log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.agent_log).unwrap_or_default())
    }

    /// sshd's log.
    pub fn sshd_log_text(&self) -> String {
        self.sshd.as_ref().map(|s| s.log_text()).unwrap_or_default()
    }

    // ----- the operator CLI -----

    /// `shelltrail --config CONFIG ARGS...`
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.cli_bin);
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    /// `shelltrail sessions --json`, parsed.
    ///
    /// Every agent looks at every sshd session on the machine for ones that
    /// are not being recorded (`agent/src/agent/watch.rs`), and lists each it
    /// finds as an `unrecorded` gap. On a real host there is one agent; here
    /// each test world has its own, so another test's unrecorded session can
    /// show up as a gap in this world's spool: those rows (gaps of other
    /// users) are left out.
    pub fn sessions(&self) -> Vec<SessionRow> {
        sessions_json(self.cli(&["sessions", "--json"]))
            .into_iter()
            .filter(|r| r.mode != "unrecorded" || r.user == self.user.name)
            .collect()
    }

    /// The session with this id.
    #[track_caller]
    pub fn session(&self, id: &str) -> SessionRow {
        let all = self.sessions();
        all.iter()
            .find(|r| r.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("no session {id} in {all:#?}"))
    }

    /// The world's only session; panics if there are none or several.
    #[track_caller]
    pub fn only_session(&self) -> SessionRow {
        let all = self.sessions();
        assert_eq!(all.len(), 1, "expected exactly one session: {all:#?}");
        all[0].clone()
    }

    /// Waits until a session satisfying `pred` is listed.
    #[track_caller]
    pub fn wait_session(&self, what: &str, timeout: Duration, pred: impl Fn(&SessionRow) -> bool) -> SessionRow {
        let mut last = Vec::new();
        poll_until(timeout, || {
            last = self.sessions();
            last.iter().find(|r| pred(r)).cloned()
        })
        .unwrap_or_else(|| panic!("no session matching {what} within {timeout:?}; sessions: {last:#?}"))
    }

    /// Waits until the session has ended (its Close is in the spool).
    #[track_caller]
    pub fn wait_closed(&self, id: &str, timeout: Duration) -> SessionRow {
        self.wait_session(&format!("session {id} closed"), timeout, |r| r.id == id && !r.live)
    }

    /// `shelltrail export ID ARGS...`: the bytes it writes.
    pub fn export_bytes(&self, id: &str, args: &[&str]) -> Vec<u8> {
        let mut a = vec!["export", id];
        a.extend_from_slice(args);
        run_ok(self.cli(&a), TIMEOUT).stdout
    }

    /// The session's recording (asciicast v3), parsed.
    pub fn export(&self, id: &str) -> Cast {
        let bytes = self.export_bytes(id, &[]);
        Cast::parse(&String::from_utf8(bytes).expect("the v3 export is UTF-8"))
    }

    /// `export --raw`: the exact output bytes.
    pub fn export_raw(&self, id: &str) -> Vec<u8> {
        self.export_bytes(id, &["--raw"])
    }

    /// Writes the export to a file in the world (`export -o`) and returns its path.
    pub fn export_to_file(&self, id: &str, format: &str) -> PathBuf {
        let out = self.path.join(format!("{id}.{format}.cast"));
        let o = out.to_str().expect("UTF-8 path").to_string();
        run_ok(self.cli(&["export", id, "--format", format, "-o", &o]), TIMEOUT);
        out
    }

    // ----- clients -----

    /// An `ssh` client command for the world's sshd, as the world's user.
    pub fn ssh(&self) -> Ssh {
        Ssh::new(self)
    }

    /// The options every OpenSSH client here gets (key, no config, no host key checks).
    pub fn ssh_options(&self) -> Vec<String> {
        ssh_options(self)
    }

    /// `user@127.0.0.1:PATH` for scp/sftp/rsync.
    pub fn remote(&self, path: &Path) -> String {
        format!("{}@127.0.0.1:{}", self.user.name, path.display())
    }

    /// `scp` with the world's options; add flags, source and destination.
    pub fn scp(&self) -> Command {
        let mut c = Command::new("scp");
        c.args(self.ssh_options()).arg("-P").arg(self.port().to_string());
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// `sftp -b BATCH user@host` with the world's options.
    pub fn sftp_batch(&self, batch: &str) -> Command {
        let file = self.path.join(format!(
            "sftp-batch-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::write(&file, batch).expect("writing the sftp batch file");
        let mut c = Command::new("sftp");
        c.args(self.ssh_options())
            .arg("-P")
            .arg(self.port().to_string())
            .arg("-b")
            .arg(&file)
            .arg(format!("{}@127.0.0.1", self.user.name));
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// `rsync -e "ssh OPTIONS"`; add flags, source and destination.
    pub fn rsync(&self) -> Command {
        let mut e = vec!["ssh".to_string()];
        e.extend(self.ssh_options());
        e.push("-p".into());
        e.push(self.port().to_string());
        let mut c = Command::new("rsync");
        c.arg("-e").arg(e.join(" "));
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// The recorder run directly, as root, outside any SSH session (sshd's
    /// variables removed): a session that reaches the agent without sshd.
    pub fn local_recorder(&self, command: &str) -> Command {
        local_recorder(&self.shell_bin, &self.config, command)
    }

    /// Prints the logs; used when a test fails.
    fn dump_logs(&self) {
        eprintln!(
            "\n===== world {} =====\n--- agent.log ---\n{}\n--- sshd.log ---\n{}\n===== end of world logs =====",
            self.path.display(),
            self.agent_log_text(),
            self.sshd_log_text()
        );
    }

    /// Kills every process still running a binary of this world (recorders
    /// of sessions a failed test left behind).
    fn kill_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(exe) = std::fs::read_link(e.path().join("exe"))
                && exe.starts_with(&self.path)
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.sshd = None;
        self.kill_leftovers();
        if let Some(mut a) = self.agent.lock().map(|mut s| s.take()).unwrap_or(None) {
            let _ = a.kill();
            let _ = a.wait();
        }
        if std::env::var_os("SHELLTRAIL_E2E_KEEP").is_some()
            && let Some(d) = self.tempdir.take()
        {
            eprintln!("keeping {} and {}", d.keep().display(), self.config.display());
        } else {
            let _ = std::fs::remove_file(&self.config);
        }
    }
}

/// Where the recorder under sshd accepts configuration files.
pub const CONFIG_DIR: &str = "/etc/shelltrail/e2e";

/// The config of the world in `dir`: `CONFIG_DIR/<dir's name>.toml`, its
/// directories made root's and 0755 (the recorder checks every one).
fn config_path(dir: &Path) -> PathBuf {
    let etc = Path::new(CONFIG_DIR);
    for d in [etc.parent().expect("/etc/shelltrail"), etc] {
        match std::fs::create_dir(d) {
            Ok(()) => set_mode(d, 0o755),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!("creating {}: {e}", d.display()),
        }
    }
    let name = dir.file_name().expect("the world directory has a name");
    etc.join(format!("{}.toml", name.to_string_lossy()))
}

/// `chmod MODE PATH`
pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// `ssh-keygen -lf KEY`: the SHA256 fingerprint OpenSSH prints for a key.
pub fn fingerprint(public_key: &Path) -> String {
    let mut c = Command::new("ssh-keygen");
    c.arg("-lf").arg(public_key);
    let what = describe(&c);
    let out = run(c, TIMEOUT);
    assert!(out.status.success(), "{what}: {out}");
    out.stdout_str()
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected ssh-keygen -l output: {out}"))
        .to_string()
}

/// `shelltrail-shell --config CONFIG -c COMMAND` outside any SSH session
/// (sshd's variables removed): a recorded session without sshd.
pub fn local_recorder(shell_bin: &Path, config: &Path, command: &str) -> Command {
    let mut c = Command::new(shell_bin);
    c.arg("--config").arg(config).arg("-c").arg(command);
    for v in [
        "SSH_CONNECTION",
        "SSH_CLIENT",
        "SSH_TTY",
        "SSH_ORIGINAL_COMMAND",
        "SSH_USER_AUTH",
    ] {
        c.env_remove(v);
    }
    c
}

/// The segment files (`*.seg`) in a spool directory, oldest first.
pub fn spool_segments(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(spool)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The sizes of `files` added up (files gone meanwhile count nothing).
pub fn files_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Runs a `shelltrail ... sessions --json` command and parses its rows.
pub fn sessions_json(cmd: Command) -> Vec<SessionRow> {
    let out = run_ok(cmd, TIMEOUT);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("sessions --json is not the expected JSON: {e}; {out}"))
}
