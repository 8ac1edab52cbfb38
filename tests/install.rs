//! What a fleet rollout must never get wrong (issue 13): one agent per
//! spool, and never root on the service's spool; break-glass logins that
//! get in and are recorded when the agent is down.

use shelltrail_tests::proc::{run, run_ok};
use shelltrail_tests::{TIMEOUT, World};
use std::process::Command;

/// A second agent on the same configuration exits at once, naming the
/// first one's pid, without touching its socket: the first goes on
/// recording.
#[test]
fn a_second_agent_on_the_same_spool_refuses_to_start() {
    let w = World::new();
    let first = w.agent_pid();
    let mut second = Command::new(&w.cli_bin);
    second.arg("--config").arg(&w.config).arg("agent");
    let out = run(second, TIMEOUT);
    assert_ne!(out.code(), 0, "{out}");
    let said = out.stderr_str();
    assert!(
        said.contains("another shelltrail agent") && said.contains(&format!("(pid {first})")),
        "{said}"
    );
    assert!(w.agent_running(), "the first agent stopped");
    let r = w.ssh().command("echo still-$((6*7))").run_within(TIMEOUT);
    assert!(r.stdout_str().contains("still-42"), "{r}");
    w.wait_session("the session after the refused agent", TIMEOUT, |s| {
        s.command.contains("still-") && !s.live
    });
}

/// An agent started by hand as root on a spool that belongs to the
/// service's user refuses to run, saying how to start it: it would leave
/// root-owned segments the service cannot read or delete.
#[test]
fn root_refuses_to_run_the_agent_on_the_service_users_spool() {
    let w = World::new();
    w.stop_agent();
    std::os::unix::fs::chown(&w.spool, Some(w.user.uid), Some(w.user.uid)).unwrap();
    let mut agent = Command::new(&w.cli_bin);
    agent.arg("--config").arg(&w.config).arg("agent");
    let out = run(agent, TIMEOUT);
    assert_ne!(out.code(), 0, "{out}");
    assert!(
        out.stderr_str().contains(&format!("belongs to {}", w.user.name)) && out.stderr_str().contains("runuser -u"),
        "{out}"
    );
    std::os::unix::fs::chown(&w.spool, Some(0), Some(0)).unwrap();
    w.start_agent();
}

const BREAK_GLASS: &str = "shelltrail-e2e-bg";

/// The fallback files in the world's fallback directory.
fn fallback_files(w: &World) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(w.path.join("fallback"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// The agent is down, as during a bad rollout: a member of the break-glass
/// group still gets in (sshd's `Match Group` runs the recorder with
/// `--break-glass`), the session is recorded into a fallback file only the
/// recorder's user owns, and the agent, once back, imports it: listed and
/// flagged as break-glass, byte for byte, the file gone.
#[test]
fn break_glass_gets_in_without_the_agent_and_is_recorded_all_the_same() {
    use std::os::unix::fs::MetadataExt;
    let w = World::builder().break_glass(BREAK_GLASS).agent_down().build();
    let out = w.ssh().command("echo bg-$((6*7)); seq 1 3000").run_within(TIMEOUT);
    assert_eq!(out.code(), 0, "{out}");
    assert!(out.stdout_str().starts_with("bg-42\n"), "{out}");
    let files = fallback_files(&w);
    assert_eq!(files.len(), 1, "{files:?}; the session said: {}", out.stderr_str());
    let md = std::fs::metadata(&files[0]).unwrap();
    assert_eq!(
        md.uid(),
        shelltrail_tests::users::recorder_user(),
        "owned by the recorder's user"
    );
    assert_eq!(md.mode() & 0o777, 0o640, "{:o}", md.mode());

    w.start_agent();
    let row = w.wait_session("the imported break-glass session", TIMEOUT, |s| {
        s.break_glass && !s.live && s.exit_status == Some(0)
    });
    assert_eq!(
        w.export_raw(&row.id),
        out.stdout,
        "the imported recording is not the session"
    );
    assert!(fallback_files(&w).is_empty(), "the imported file is still there");
    let table = run_ok(w.cli(&["sessions"]), TIMEOUT).stdout_str();
    assert!(table.contains("[BREAK-GLASS]"), "{table}");
    assert!(w.agent_log_text().contains("importing a BREAK-GLASS session"));
    let verified = run(w.cli(&["verify", &row.id]), TIMEOUT);
    assert_eq!(verified.code(), 0, "{verified}");
}

/// A break-glass session whose agent dies mid-session (kill -9) goes on
/// into the fallback file; when the agent is back the session is resumed
/// from where the agent stood: nothing lost, nothing twice, `verify` OK.
#[test]
fn a_break_glass_session_survives_its_agent_and_is_resumed_from_the_file() {
    let w = World::builder().break_glass(BREAK_GLASS).build();
    let mut t = w.ssh().term(80, 24);
    t.line("echo one-$((6*7))");
    t.expect("one-42");
    let id = w
        .wait_session("the live break-glass session", TIMEOUT, |s| {
            s.live && s.break_glass && s.chunks > 0
        })
        .id;
    w.kill_agent();
    t.line("echo two-$((6*7))");
    t.expect("two-42");
    t.line("exit");
    t.wait_exit(TIMEOUT);
    assert_eq!(fallback_files(&w).len(), 1, "the rest went to the fallback file");
    w.start_agent();
    let row = w.wait_session("the resumed session", TIMEOUT, |s| {
        s.id == id && !s.live && s.exit_status.is_some()
    });
    assert_eq!(row.lost_chunks, 0, "{row:#?}");
    let cast = String::from_utf8_lossy(&w.export_raw(&id)).into_owned();
    assert!(cast.contains("one-42") && cast.contains("two-42"), "{cast:?}");
    let verified = run(w.cli(&["verify", &id]), TIMEOUT);
    assert_eq!(verified.code(), 0, "{verified}");
}

/// `--break-glass` is for the group's members only: anyone else calling
/// the set-uid recorder with it is refused, and `--help` just prints usage.
#[test]
fn break_glass_is_refused_to_others_and_help_is_plain() {
    use std::os::unix::process::CommandExt;
    let w = World::builder().no_sshd().build();
    let mut c2 = Command::new(&w.shell_bin);
    c2.args(["--config"])
        .arg(&w.config)
        .args(["--break-glass", "-c", "true"])
        .env_remove("SSH_CONNECTION")
        .uid(w.user.uid)
        .gid(w.user.uid);
    let out = run(c2, TIMEOUT);
    assert_ne!(out.code(), 0, "{out}");
    assert!(
        out.stderr_str().contains("--break-glass is for members of the group"),
        "{out}"
    );
    let mut help = Command::new(&w.shell_bin);
    help.arg("--help");
    let out = run(help, TIMEOUT);
    assert_eq!(out.code(), 0, "{out}");
    assert!(out.stdout_str().contains("usage: shelltrail-shell"), "{out}");
}

/// An sshd configuration like Debian's, in `dir`: the drop-in directory
/// included first, then the host's own settings (`extra` among them).
fn sshd_config(dir: &std::path::Path, include: bool, extra: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dropins = dir.join("sshd_config.d");
    std::fs::create_dir_all(&dropins).unwrap();
    let key = dir.join("host_key");
    if !key.exists() {
        let mut c = Command::new("ssh-keygen");
        c.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key);
        run_ok(c, TIMEOUT);
    }
    let config = dir.join("sshd_config");
    let include = if include {
        format!("Include {}/*.conf\n", dropins.display())
    } else {
        String::new()
    };
    std::fs::write(
        &config,
        format!(
            "{include}HostKey {}\nUsePAM no\nX11Forwarding yes\nAcceptEnv LANG LC_*\nSubsystem sftp internal-sftp\n{extra}",
            key.display()
        ),
    )
    .unwrap();
    (config, dropins)
}

/// sshd's effective value of `key` for a connection of `user`.
fn effective(config: &std::path::Path, user: &str, key: &str) -> String {
    let mut c = Command::new("/usr/sbin/sshd");
    c.arg("-T")
        .arg("-f")
        .arg(config)
        .arg("-C")
        .arg(format!("user={user},host=localhost,addr=127.0.0.1"));
    let out = run_ok(c, TIMEOUT).stdout_str();
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")).map(str::to_string))
        .unwrap_or_default()
}

/// `shelltrail enable` switches recording on with one drop-in that sshd
/// itself checks: every user gets the recorder, the break-glass group gets
/// it with `--break-glass`, forwarding and ~/.ssh/rc are off. A
/// configuration sshd refuses, or one that does not read the drop-in
/// directory, is put back as it was with sshd's reason; `disable` removes
/// it.
#[test]
fn enable_and_disable_switch_sshd_with_a_checked_drop_in() {
    let w = World::builder().break_glass(BREAK_GLASS).no_sshd().build();
    let dir = w.path.join("etc-ssh");
    let recorder = format!("{} --config {}", w.shell_bin.display(), w.config.display());
    let cmd = |verb: &str, config: &std::path::Path, dropins: &std::path::Path| {
        let mut c = w.cli(&[verb]);
        c.arg("--sshd-config")
            .arg(config)
            .arg("--sshd-config-dir")
            .arg(dropins)
            .arg("--recorder")
            .arg(&recorder)
            .arg("--no-reload");
        c
    };

    let (config, dropins) = sshd_config(&dir, true, "");
    let out = run_ok(cmd("enable", &config, &dropins), TIMEOUT);
    assert!(
        out.stdout_str()
            .contains(&format!("break-glass (recorded, logged): {}", w.user.name)),
        "{out}"
    );
    assert_eq!(effective(&config, "root", "forcecommand"), recorder);
    assert_eq!(
        effective(&config, &w.user.name, "forcecommand"),
        format!("{recorder} --break-glass")
    );
    assert_eq!(effective(&config, "root", "disableforwarding"), "yes");
    assert_eq!(effective(&config, "root", "permituserrc"), "no");
    assert_eq!(effective(&config, "root", "exposeauthinfo"), "yes");

    let out = run_ok(cmd("disable", &config, &dropins), TIMEOUT);
    assert!(out.stdout_str().contains("removed"), "{out}");
    assert_eq!(effective(&config, "root", "forcecommand"), "none");

    // sshd refuses the whole configuration: nothing is left behind.
    let (bad, bad_dropins) = sshd_config(&dir.join("bad"), true, "NoSuchKeyword yes\n");
    let out = run(cmd("enable", &bad, &bad_dropins), TIMEOUT);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.stderr_str().contains("NoSuchKeyword"), "sshd's own words: {out}");
    assert!(!bad_dropins.join("shelltrail.conf").exists());

    // No Include: the drop-in would be ignored, so it is not left in place.
    let (lone, lone_dropins) = sshd_config(&dir.join("lone"), false, "");
    let out = run(cmd("enable", &lone, &lone_dropins), TIMEOUT);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.stderr_str().contains("Include"), "{out}");
    assert!(!lone_dropins.join("shelltrail.conf").exists());
}

/// `doctor --json` at the host's findings.
fn doctor(w: &World, config: &std::path::Path) -> (i32, Vec<serde_json::Value>) {
    let mut c = w.cli(&["doctor", "--json"]);
    c.arg("--sshd-config").arg(config);
    let out = run(c, TIMEOUT);
    let findings = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("doctor --json: {e}; {out}"));
    (out.code(), findings)
}

fn status<'a>(findings: &'a [serde_json::Value], check: &str) -> &'a str {
    findings
        .iter()
        .find(|f| f["check"] == check)
        .and_then(|f| f["status"].as_str())
        .unwrap_or_else(|| panic!("no {check} in {findings:#?}"))
}

/// `doctor` names each way around the recording that a weak sshd
/// configuration leaves open (each with its fix, exit status 2), and none
/// of sshd's once `enable`'s drop-in is in; a client-set LD_PRELOAD through
/// AcceptEnv is named too.
#[test]
fn doctor_names_every_bypass_of_a_weak_sshd_and_none_with_the_drop_in() {
    let w = World::builder().break_glass(BREAK_GLASS).no_sshd().build();
    let dir = w.path.join("etc-ssh");
    let (config, dropins) = sshd_config(
        &dir,
        true,
        "AllowTcpForwarding yes\nPermitTunnel yes\nPermitUserRC yes\n",
    );
    let (code, found) = doctor(&w, &config);
    assert_eq!(code, 2, "{found:#?}");
    for check in [
        "sshd.forcecommand",
        "sshd.forwarding",
        "sshd.permittunnel",
        "sshd.permituserrc",
    ] {
        assert_eq!(status(&found, check), "bypass", "{check}: {found:#?}");
        let fix = found.iter().find(|f| f["check"] == check).unwrap()["fix"]
            .as_str()
            .unwrap();
        assert!(!fix.is_empty(), "{check} has no fix");
    }
    assert_eq!(status(&found, "agent.socket"), "ok", "{found:#?}");

    let recorder = format!("{} --config {}", w.shell_bin.display(), w.config.display());
    let mut enable = w.cli(&["enable", "--no-reload", "--recorder", &recorder]);
    enable
        .arg("--sshd-config")
        .arg(&config)
        .arg("--sshd-config-dir")
        .arg(&dropins);
    run_ok(enable, TIMEOUT);
    let (_, found) = doctor(&w, &config);
    let sshd_bad: Vec<_> = found
        .iter()
        .filter(|f| f["check"].as_str().unwrap().starts_with("sshd.") && f["status"] != "ok")
        .collect();
    assert!(sshd_bad.is_empty(), "with the drop-in: {sshd_bad:#?}");

    let (leaky, _) = sshd_config(&dir.join("leaky"), true, "AcceptEnv LD_PRELOAD BASH_ENV\n");
    let (code, found) = doctor(&w, &leaky);
    assert_eq!(code, 2);
    assert_eq!(status(&found, "sshd.acceptenv"), "bypass", "{found:#?}");
    w.stop_agent();
    let (_, found) = doctor(&w, &config);
    assert_eq!(status(&found, "agent.socket"), "fail", "{found:#?}");
}

/// Small things an administrator trips over: a session is named by any
/// unique part of its id (here its middle), and an `export -o FILE` that
/// fails leaves no empty file behind.
#[test]
fn ids_by_any_part_and_failed_exports_leave_nothing() {
    let w = World::new();
    let out = w.ssh().command("echo middle-$((6*7))").run_within(TIMEOUT);
    assert_eq!(out.code(), 0, "{out}");
    let id = w
        .wait_session("the session", TIMEOUT, |s| !s.live && s.command.contains("middle-"))
        .id;
    let middle = &id[9..18];
    let got = run_ok(w.cli(&["export", middle, "--raw"]), TIMEOUT);
    assert_eq!(got.stdout, out.stdout);

    // A device is written to, never replaced by a file.
    run_ok(w.cli(&["export", middle, "-o", "/dev/null"]), TIMEOUT);
    use std::os::unix::fs::FileTypeExt;
    let still = std::fs::symlink_metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device();
    if !still {
        // Put the machine right before failing: every later test needs it.
        let _ = std::fs::remove_file("/dev/null");
        let _ = Command::new("mknod")
            .args(["-m", "666", "/dev/null", "c", "1", "3"])
            .status();
    }
    assert!(still, "export -o /dev/null replaced /dev/null with a file");

    let file = w.path.join("nothing.cast");
    let failed = run(w.cli(&["export", "ffffffff", "-o", file.to_str().unwrap()]), TIMEOUT);
    assert_ne!(failed.code(), 0, "{failed}");
    assert!(!file.exists(), "a failed export left {}", file.display());
    let leftovers: Vec<_> = std::fs::read_dir(&w.path)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// What the packages run before removing the recorder: the drop-in of
/// `enable` is taken out, but while sshd_config itself or a user's login
/// shell still runs the recorder, removal is refused (that would lock those
/// logins out), naming what to undo, and the drop-in is left as it was.
#[test]
fn package_removal_refuses_to_leave_logins_running_a_missing_recorder() {
    let w = World::builder().break_glass(BREAK_GLASS).no_sshd().build();
    let dir = w.path.join("etc-ssh");
    let recorder = format!("{} --config {}", w.shell_bin.display(), w.config.display());
    let passwd_clean = w.path.join("passwd-clean");
    std::fs::write(&passwd_clean, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    let passwd_wired = w.path.join("passwd-wired");
    std::fs::write(
        &passwd_wired,
        format!(
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1001:1001::/home/alice:{}\nbob:x:1002:1002::/home/bob:/opt/other/shelltrail-shell\n",
            w.shell_bin.display()
        ),
    )
    .unwrap();
    let verb = |args: &[&str], config: &std::path::Path, dropins: &std::path::Path| {
        let mut c = w.cli(args);
        c.arg("--sshd-config")
            .arg(config)
            .arg("--sshd-config-dir")
            .arg(dropins)
            .arg("--recorder")
            .arg(&recorder)
            .arg("--no-reload");
        c
    };
    let (clean, wired) = (passwd_clean.display().to_string(), passwd_wired.display().to_string());
    fn removal(passwd: &str) -> [&str; 4] {
        ["disable", "--package-removal", "--passwd", passwd]
    }

    // sshd_config itself also runs the recorder.
    let (config, dropins) = sshd_config(&dir.join("a"), true, &format!("ForceCommand {recorder}\n"));
    run_ok(verb(&["enable"], &config, &dropins), TIMEOUT);
    let out = run(verb(&removal(&clean), &config, &dropins), TIMEOUT);
    assert_ne!(out.code(), 0, "{out}");
    assert!(
        out.stderr_str().contains("refusing to remove") && out.stderr_str().contains("ForceCommand"),
        "{out}"
    );
    assert!(dropins.join("shelltrail.conf").exists(), "the drop-in was not put back");

    // A user's login shell is the recorder.
    let (config, dropins) = sshd_config(&dir.join("b"), true, "");
    run_ok(verb(&["enable"], &config, &dropins), TIMEOUT);
    let out = run(verb(&removal(&wired), &config, &dropins), TIMEOUT);
    assert_ne!(out.code(), 0, "{out}");
    assert!(
        out.stderr_str().contains("alice") && out.stderr_str().contains("usermod -s"),
        "{out}"
    );
    assert!(dropins.join("shelltrail.conf").exists());

    // Nothing else runs it: the drop-in goes, sshd no longer runs the recorder.
    let out = run_ok(verb(&removal(&clean), &config, &dropins), TIMEOUT);
    assert!(out.stdout_str().contains("removed"), "{out}");
    assert!(
        out.stdout_str()
            .contains(&format!("keeps the spool {}", w.spool.display())),
        "it does not say what removal keeps: {out}"
    );
    assert!(!dropins.join("shelltrail.conf").exists());
    assert_eq!(effective(&config, "root", "forcecommand"), "none");
}

/// Socket activation as systemd does it (`systemd-socket-activate`, which
/// holds the socket and starts the agent on the first connection): the
/// agent takes the socket it is given rather than binding its own, the
/// session that woke it is recorded, and the agent says READY=1 on
/// `$NOTIFY_SOCKET` once it serves (`Type=notify`).
#[test]
fn the_agent_takes_its_socket_from_systemd_and_says_when_it_is_ready() {
    use std::os::unix::net::UnixDatagram;
    let w = World::builder().agent_down().build();
    let notify_path = w.path.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(TIMEOUT)).unwrap();
    let log = std::fs::File::create(w.path.join("activated-agent.log")).unwrap();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "exec systemd-socket-activate -l {} -E NOTIFY_SOCKET={} -E RUST_LOG=info {} --config {} agent",
            w.socket.display(),
            notify_path.display(),
            w.cli_bin.display(),
            w.config.display()
        ))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut activator = c.spawn().unwrap();
    shelltrail_tests::wait_until("the socket", TIMEOUT, || w.socket.exists().then_some(()));
    // SocketMode=0666 in shelltrail-agent.socket.
    shelltrail_tests::world::set_mode(&w.socket, 0o666);

    let out = w.ssh().command("echo activated-$((6*7))").run_within(TIMEOUT);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no READY=1 from the agent");
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    let agent_log = std::fs::read_to_string(w.path.join("activated-agent.log")).unwrap_or_default();
    let _ = activator.kill();
    let _ = activator.wait();
    assert_eq!(out.code(), 0, "{out}\n--- agent ---\n{agent_log}");
    assert!(out.stdout_str().contains("activated-42"), "{out}");
    assert!(said.contains("READY=1"), "{said:?}");
    assert!(agent_log.contains("using the socket systemd passed"), "{agent_log}");
    let row = w.wait_session("the session through the passed socket", TIMEOUT, |s| {
        s.command.contains("activated-") && !s.live
    });
    assert_eq!(w.export_raw(&row.id), out.stdout);
}

/// Only the set-uid recorder's word that a session is break-glass counts
/// (it checked the group): any other client of the agent's socket, root
/// included, claiming it gets an ordinary session, and the agent says so.
#[test]
fn a_break_glass_claim_from_another_client_is_dropped() {
    use shelltrail_proto::v1::{AgentFrame, Open, RecorderFrame, SessionMeta, agent_frame, recorder_frame};
    use std::io::{Read, Write};
    let w = World::builder().no_sshd().build();
    let id = uuid::Uuid::now_v7().to_string();
    let mut buf = Vec::new();
    shelltrail_proto::framing::encode(
        &RecorderFrame {
            body: Some(recorder_frame::Body::Open(Open {
                meta: Some(SessionMeta {
                    session_id: id.clone(),
                    mode: "exec".into(),
                    break_glass: true,
                    ..Default::default()
                }),
                resume: false,
            })),
        },
        &mut buf,
    );
    let mut s = std::os::unix::net::UnixStream::connect(&w.socket).unwrap();
    s.write_all(&buf).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    let reply: AgentFrame = shelltrail_proto::framing::decode(&body).unwrap();
    assert!(matches!(reply.body, Some(agent_frame::Body::Accepted(_))), "{reply:?}");
    let row = w.wait_session("the claimed session", TIMEOUT, |r| r.id == id);
    assert!(!row.break_glass, "{row:#?}");
    assert!(
        w.agent_log_text()
            .contains("a break-glass claim not from the recorder; ignored")
    );
    drop(s);
}

/// `doctor` on a host that ships: its certificate's validity (a
/// certificate that ends within two weeks is named) and whether the
/// collector answers over mutual TLS (and says so when it does not).
#[test]
fn doctor_checks_the_collector_and_the_certificate() {
    let ship = shelltrail_tests::ShipWorld::new(0x61);
    let w = World::builder().ship_to(&ship, "web-1").no_sshd().build();
    let (_, found) = doctor(&w, std::path::Path::new("/etc/ssh/sshd_config"));
    assert_eq!(status(&found, "ship.reachable"), "ok", "{found:#?}");
    assert_eq!(status(&found, "ship.cert"), "ok", "{found:#?}");

    // A certificate that ends in five days.
    let mut issue = Command::new(&w.cli_bin);
    issue.args(["pki", "issue"]).arg(&ship.pki.dir).args([
        "web-1-short",
        "--role",
        "host",
        "--san",
        "web-1",
        "--days",
        "5",
    ]);
    run_ok(issue, TIMEOUT);
    let text = std::fs::read_to_string(&w.config).unwrap();
    let short = ship.pki.dir.join("web-1-short.pem");
    let config = w.path.join("short.toml");
    std::fs::write(
        &config,
        text.replace(&format!("{:?}", ship.pki.dir.join("web-1.pem")), &format!("{short:?}")),
    )
    .unwrap();
    let mut c = Command::new(&w.cli_bin);
    c.args(["--config"]).arg(&config).args(["doctor", "--json"]);
    let out = run(c, TIMEOUT);
    let found: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status(&found, "ship.cert"), "warn", "{found:#?}");
    let detail = found.iter().find(|f| f["check"] == "ship.cert").unwrap()["detail"].to_string();
    assert!(
        detail.contains("expires in 4 days") || detail.contains("expires in 5 days"),
        "{detail}"
    );

    ship.collector.kill();
    let (_, found) = doctor(&w, std::path::Path::new("/etc/ssh/sshd_config"));
    assert_eq!(status(&found, "ship.reachable"), "warn", "{found:#?}");
}
