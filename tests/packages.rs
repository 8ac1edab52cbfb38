//! The packages as an administrator installs them (issue 13): built by
//! the commands in docs/deployment.md, checked by lintian and rpm, then the
//! .deb installed on this machine with dpkg and used for real: its agent
//! (started by hand as the service user: no systemd runs here), an sshd
//! whose recording comes only from `shelltrail enable`, a recorded login,
//! a break-glass login with the agent down, an upgrade to a newer package
//! during a live session, `doctor`, and a purge that refuses while a login
//! shell still runs the recorder and succeeds once it does not.
//!
//! It changes the machine (packages, users, /etc/ssh/sshd_config.d) and
//! needs the packages: `tests/run.sh` builds them and then runs it with
//! `--ignored`, after the other tests, on the CI machine.

use shelltrail_tests::proc::{Output, run};
use shelltrail_tests::{Ssh, TIMEOUT, TestUser};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The one file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn package(dir: &str, prefix: &str, suffix: &str) -> PathBuf {
    let dir = repo().join(dir);
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (tests/run.sh builds the packages first)", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(suffix)
        })
        .collect();
    assert_eq!(found.len(), 1, "{prefix}*{suffix} in {}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
}

fn sh(cmd: &str) -> Output {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd);
    run(c, Duration::from_secs(300))
}

fn sh_ok(cmd: &str) -> Output {
    let out = sh(cmd);
    assert_eq!(out.code(), 0, "{cmd}: {out}");
    out
}

/// The installed agent, run as systemd would run it (its user, its
/// directories), killed on drop.
struct Agent(Child);

impl Agent {
    fn start(log: &Path) -> Agent {
        sh_ok("install -d -o shelltrail -g shelltrail -m 0755 /run/shelltrail");
        sh_ok("install -d -o shelltrail -g shelltrail -m 0750 /var/lib/shelltrail");
        let log = std::fs::File::options().create(true).append(true).open(log).unwrap();
        let child = Command::new("runuser")
            .args(["-u", "shelltrail", "--", "/usr/bin/shelltrail", "agent"])
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !Path::new("/run/shelltrail/agent.sock").exists() {
            assert!(Instant::now() < deadline, "the installed agent did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        Agent(child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // runuser's child: signal the whole group it made.
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", "shelltrail", "-x", "shelltrail"])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// sshd with the machine's own configuration (so only `shelltrail enable`
/// wires the recorder), on a test port with a test key list.
struct Sshd(Child, u16);

impl Sshd {
    fn start(dir: &Path, authorized_keys: &Path) -> Sshd {
        // sshd's privilege separation directory (the service would make it).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = shelltrail_tests::sshd::free_port();
        let host_key = dir.join("host_key");
        if !host_key.exists() {
            sh_ok(&format!("ssh-keygen -q -t ed25519 -N '' -f {}", host_key.display()));
        }
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", "/etc/ssh/sshd_config", "-p", &port.to_string()])
            .arg("-o")
            .arg(format!("HostKey={}", host_key.display()))
            .arg("-o")
            .arg(format!("AuthorizedKeysFile={}", authorized_keys.display()))
            .args([
                "-o",
                "StrictModes=no",
                "-o",
                "UsePAM=no",
                "-o",
                "PidFile=none",
                "-o",
                "ListenAddress=127.0.0.1",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd(child, port)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The installed CLI's `sessions --json`.
fn sessions() -> Vec<serde_json::Value> {
    let out = sh_ok("/usr/bin/shelltrail sessions --json");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn wait_session(what: &str, log: &Path, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let rows = sessions();
        if let Some(r) = rows.iter().find(|r| pred(r)) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no session: {what}; sessions: {rows:#?}\n--- agent ---\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "installs the packages on this machine: tests/run.sh builds them and runs this with --ignored"]
fn the_packages_install_record_upgrade_and_refuse_an_unsafe_purge() {
    let deb = package("target/deb", "shelltrail_", ".deb");
    let upgrade = package("target/deb-upgrade", "shelltrail_", ".deb");
    let rpm = package("target/rpmbuild/RPMS/x86_64", "shelltrail-", ".rpm");

    // What a packager's tools say.
    let lint = sh(&format!("lintian --fail-on error,warning {}", deb.display()));
    assert_eq!(lint.code(), 0, "lintian: {lint}");
    let requires = sh_ok(&format!("rpm -qp --requires {}", rpm.display())).stdout_str();
    for want in ["openssh-server", "libcap", "shadow-utils"] {
        assert!(requires.contains(want), "rpm requires no {want}: {requires}");
    }
    let files = sh_ok(&format!("rpm -qp -l {}", rpm.display())).stdout_str();
    for want in [
        "/usr/bin/shelltrail-shell",
        "/usr/lib/systemd/system/shelltrail-agent.socket",
        "/usr/lib/sysusers.d/shelltrail.conf",
        "/usr/lib/tmpfiles.d/shelltrail.conf",
        "/usr/share/man/man1/shelltrail-shell.1",
    ] {
        assert!(files.lines().any(|l| l == want), "the rpm lacks {want}: {files}");
    }
    // The directories it owns, with their owners and modes.
    let modes = sh_ok(&format!(
        "rpm -qp --queryformat '[%{{FILENAMES}} %{{FILEUSERNAME}} %{{FILEMODES:perms}}\\n]' {}",
        rpm.display()
    ))
    .stdout_str();
    for want in [
        "/etc/shelltrail root drwxr-xr-x",
        "/var/lib/shelltrail shelltrail drwxr-x---",
    ] {
        assert!(modes.lines().any(|l| l == want), "the rpm does not own {want}: {modes}");
    }
    let scripts = sh_ok(&format!("rpm -qp --scripts {}", rpm.display())).stdout_str();
    assert!(scripts.contains("disable --package-removal"), "{scripts}");
    for want in ["preinstall scriptlet", "postuninstall scriptlet"] {
        assert!(scripts.contains(want), "no {want}: {scripts}");
    }
    // The config survives an upgrade with an administrator's edits: %config(noreplace).
    let flags = sh_ok(&format!(
        "rpm -qp --queryformat '[%{{FILENAMES}} %{{FILEFLAGS:fflags}}\\n]' {}",
        rpm.display()
    ))
    .stdout_str();
    let conf = flags
        .lines()
        .find(|l| l.starts_with("/etc/shelltrail/shelltrail.toml "))
        .unwrap_or_else(|| panic!("{flags}"));
    assert!(conf.ends_with(" cn"), "not config(noreplace): {conf}");

    // Install, and look at what it made.
    let dir = tempfile::Builder::new()
        .prefix("shelltrail-pkg-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    sh_ok(&format!("dpkg -i {}", deb.display()));
    sh_ok("id shelltrail && id shelltrail-rec && getent group shelltrail-breakglass");
    let recorder = std::fs::metadata("/usr/bin/shelltrail-shell").unwrap();
    assert_eq!(recorder.mode() & 0o7777, 0o4755);
    let rec_uid = nix::unistd::User::from_name("shelltrail-rec")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    assert_eq!(recorder.uid(), rec_uid);
    assert!(
        sh_ok("getcap /usr/bin/shelltrail-shell")
            .stdout_str()
            .contains("cap_chown,cap_sys_tty_config")
    );
    let conf = std::fs::metadata("/etc/shelltrail/shelltrail.toml").unwrap();
    assert_eq!((conf.uid(), conf.mode() & 0o777), (0, 0o644));
    let fallback = std::fs::metadata("/var/lib/shelltrail-breakglass").unwrap();
    assert_eq!((fallback.uid(), fallback.mode() & 0o7777), (rec_uid, 0o2770));
    for f in [
        "/usr/lib/systemd/system/shelltrail-agent.service",
        "/usr/lib/systemd/system/shelltrail-agent.socket",
        "/usr/share/bash-completion/completions/shelltrail",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    assert!(sh("ls /usr/share/man/man1/shelltrail-shell.1*").code() == 0);

    // Recording, switched on by `enable` alone.
    let user = TestUser::shared();
    let key = dir.path().join("client_key");
    sh_ok(&format!("ssh-keygen -q -t ed25519 -N '' -f {}", key.display()));
    let keys = dir.path().join("authorized_keys");
    std::fs::copy(dir.path().join("client_key.pub"), &keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let agent_log = dir.path().join("agent.log");
    let mut agent = Agent::start(&agent_log);
    sh_ok("/usr/bin/shelltrail enable --no-reload");
    let sshd = Sshd::start(dir.path(), &keys);
    let out = Ssh::to(sshd.1, &user.name, &key)
        .command("echo pkg-$((6*7))")
        .run_within(TIMEOUT);
    assert_eq!(out.code(), 0, "{out}");
    let row = wait_session("the recorded login", &agent_log, |r| {
        r["command"].as_str().is_some_and(|c| c.contains("pkg-")) && r["live"] == false
    });
    let exported = sh_ok(&format!(
        "/usr/bin/shelltrail export {} --raw",
        row["id"].as_str().unwrap()
    ));
    assert_eq!(exported.stdout, out.stdout);

    // doctor: sshd as the drop-in made it has no way around the recorder.
    let found = sh("/usr/bin/shelltrail doctor --json");
    let findings: Vec<serde_json::Value> =
        serde_json::from_slice(&found.stdout).unwrap_or_else(|e| panic!("{e}: {found}"));
    let sshd_bad: Vec<_> = findings
        .iter()
        .filter(|f| {
            f["check"].as_str().unwrap().starts_with("sshd.") && f["status"] != "ok" && f["check"] != "sshd.break_glass"
        })
        .collect();
    assert!(sshd_bad.is_empty(), "{sshd_bad:#?}");

    // Break-glass with the agent down: in, recorded to the fallback, imported.
    sh_ok(&format!("gpasswd -a {} shelltrail-breakglass", user.name));
    drop(agent);
    let bg = Ssh::to(sshd.1, &user.name, &key)
        .command("echo bg-$((6*7))")
        .run_within(TIMEOUT);
    assert_eq!(bg.code(), 0, "{bg}");
    assert_eq!(
        sh_ok("ls /var/lib/shelltrail-breakglass | wc -l").stdout_str().trim(),
        "1"
    );
    agent = Agent::start(&agent_log);
    let row = wait_session("the break-glass login", &agent_log, |r| {
        r["break_glass"] == true && r["live"] == false
    });
    assert!(row["command"].as_str().unwrap().contains("bg-"));
    sh_ok(&format!("gpasswd -d {} shelltrail-breakglass", user.name));

    // Upgrade to a newer package during a live session; the agent restarts
    // as systemd's try-restart would. The session goes on, recorded whole.
    let mut term = Ssh::to(sshd.1, &user.name, &key).arg("-tt").term(80, 24);
    term.line("echo before-$((6*7))");
    term.expect("before-42");
    sh_ok(&format!("dpkg -i {}", upgrade.display()));
    drop(agent);
    agent = Agent::start(&agent_log);
    term.line("echo after-$((6*7))");
    term.expect("after-42");
    term.line("exit");
    term.wait_exit(TIMEOUT);
    let row = wait_session("the session across the upgrade", &agent_log, |r| {
        r["mode"] == "pty" && r["live"] == false && r["exit_status"] == 0
    });
    let raw = sh_ok(&format!(
        "/usr/bin/shelltrail export {} --raw",
        row["id"].as_str().unwrap()
    ))
    .stdout_str();
    assert!(raw.contains("before-42") && raw.contains("after-42"), "{raw:?}");
    assert_eq!(row["lost_chunks"], 0, "{row:#}");

    // Purge while a login shell is the recorder: refused, nothing removed.
    let victim = "shelltrail-pkg-shell";
    let _ = sh(&format!("userdel {victim}"));
    sh_ok(&format!("useradd -M -s /usr/bin/shelltrail-shell {victim}"));
    let refused = sh("SHELLTRAIL_FORCE_REMOVE= dpkg --purge shelltrail");
    assert_ne!(refused.code(), 0, "{refused}");
    let said = refused.stdout_str() + &refused.stderr_str();
    assert!(said.contains(victim) && said.contains("usermod -s"), "{said}");
    assert!(Path::new("/usr/bin/shelltrail-shell").exists());
    assert!(
        Path::new("/etc/ssh/sshd_config.d/shelltrail.conf").exists(),
        "the drop-in was not put back"
    );
    sh_ok(&format!("userdel {victim}"));
    drop(agent);
    drop(sshd);
    let purged = sh_ok("dpkg --purge shelltrail").stdout_str();
    assert!(
        purged.contains("keeps the spool /var/lib/shelltrail/spool") && purged.contains("/etc/shelltrail/tls"),
        "the purge does not say what it keeps: {purged}"
    );
    assert!(!Path::new("/usr/bin/shelltrail-shell").exists());
    assert!(!Path::new("/etc/ssh/sshd_config.d/shelltrail.conf").exists());
    assert!(
        Path::new("/var/lib/shelltrail/spool").exists(),
        "purge keeps the recordings"
    );
}
