//! The recorded user attacks the separation between them and their recorder
//! (docs/design.md, "Security"): stopping it and talking to sshd's terminal
//! directly, holding that terminal open from before the recorder started,
//! reaching it from another session, tracing a recorder as it starts. Each
//! attack worked when the recorder ran as the user.

use shelltrail_tests::{TestUser, World, wait_until};
use std::time::Duration;

/// Writes `text` as `name` in the user's home, owned by the user.
fn dotfile(user: &TestUser, name: &str, text: &str) {
    let path = user.home.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    nix::unistd::chown(
        &path,
        Some(nix::unistd::Uid::from_raw(user.uid)),
        None::<nix::unistd::Gid>,
    )
    .expect("chown dotfile");
}

fn remove_dotfiles(user: &TestUser, names: &[&str]) {
    for n in names {
        let _ = std::fs::remove_file(user.home.join(n));
    }
}

/// The attack from the issue: a login script stops the recorder and runs a
/// shell on `$SSH_TTY`, or on the recorder's own terminal found with `ps`.
/// The recorder cannot be stopped, `$SSH_TTY` is the recorded inner
/// terminal, and the outer one is not the user's: what is typed is recorded.
#[test]
fn stopped_recorder_and_direct_terminal_shell_are_refused() {
    let user = TestUser::dedicated("shelltrail-e2e-stop");
    dotfile(
        &user,
        ".bash_profile",
        "kill -STOP $PPID; echo stop-rc=$?\n\
         T=/dev/$(ps -o tty= -p $PPID | tr -d ' ')\n\
         if ( exec 3<>\"$T\" ) 2>/dev/null; then echo outer-OPENED; else echo outer-denied; fi\n\
         exec bash -i <\"$SSH_TTY\" >\"$SSH_TTY\" 2>&1\n",
    );
    let w = World::builder().user(user.clone()).build();
    let mut t = w.ssh().term(80, 24);
    t.expect("stop-rc=1");
    t.expect("outer-denied");
    t.line("echo typed-$((6*7))");
    t.expect("typed-42");
    t.line("exit");
    t.wait_exit(Duration::from_secs(30));
    remove_dotfiles(&user, &[".bash_profile"]);
    assert!(!t.transcript().contains("outer-OPENED"), "{}", t.transcript());

    let id = w.only_session().id;
    let s = w.wait_closed(&id, Duration::from_secs(30));
    assert_eq!(s.end_cause.as_deref(), Some("recorder"), "{s:#?}");
    let out = w.export(&id).output();
    assert!(out.contains("stop-rc=1"), "{out}");
    assert!(
        out.contains("typed-42"),
        "the shell on $SSH_TTY was not recorded: {out}"
    );
}

/// A process started before the recorder (sshd runs `bash -c ForceCommand`,
/// and Debian's bash reads ~/.bashrc first) opens sshd's terminal and keeps
/// it. Once the recorder has taken the terminal that descriptor is dead: it
/// can neither write to the client nor read what the client types.
#[test]
fn terminal_opened_before_the_recorder_is_hung_up() {
    let user = TestUser::dedicated("shelltrail-e2e-early");
    let stolen = user.home.join("stolen");
    let _ = std::fs::remove_file(&stolen);
    dotfile(
        &user,
        ".bashrc",
        "if [ -n \"$SSH_TTY\" ] && [ -z \"$EARLY_DONE\" ]; then\n\
           export EARLY_DONE=1\n\
           touch ~/bashrc-ran\n\
           setsid bash -c 'exec 3<>\"$0\"; echo holding >~/holding; sleep 2; \
             for i in 1 2 3 4 5; do echo LEAKED-$i >&3 || echo write-failed >>~/holding; sleep 0.2; done; \
             timeout 3 cat <&3 >~/stolen; echo read-ended >>~/holding' \"$SSH_TTY\" </dev/null >/dev/null 2>&1 &\n\
           sleep 0.3\n\
         fi\n",
    );
    // A login shell reads ~/.bash_profile, not ~/.bashrc: only the early bash does the above.
    dotfile(&user, ".bash_profile", "PS1='$ '\n");
    let w = World::builder().user(user.clone()).build();
    let mut t = w.ssh().term(80, 24);
    t.line("echo up-$((1+1))");
    t.expect("up-2");
    assert!(
        user.home.join("bashrc-ran").exists(),
        "~/.bashrc did not run before the recorder"
    );
    assert!(
        user.home.join("holding").exists(),
        "the early process did not open the terminal"
    );
    // While the early process tries to write and read, type into the session.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    while std::time::Instant::now() < deadline {
        n += 1;
        t.line(&format!("echo typed-{n}"));
        t.expect(&format!("typed-{n}"));
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_until("the early process to give up", Duration::from_secs(15), || {
        std::fs::read_to_string(user.home.join("holding"))
            .ok()
            .filter(|h| h.contains("read-ended"))
    });
    t.line("exit");
    t.wait_exit(Duration::from_secs(30));
    let holding = std::fs::read_to_string(user.home.join("holding")).unwrap_or_default();
    let stolen_text = std::fs::read_to_string(&stolen).unwrap_or_default();
    remove_dotfiles(&user, &[".bashrc", ".bash_profile", "bashrc-ran", "holding", "stolen"]);
    assert!(!t.transcript().contains("LEAKED"), "{}", t.transcript());
    assert!(holding.contains("write-failed"), "{holding}");
    // A recorded session (seen by the agent's sweeps for several seconds) is
    // never reported as unrecorded.
    let log = w.agent_log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("without a recording") && l.contains(&format!("uid={}", w.user.uid))),
        "{log}"
    );
    assert!(
        !stolen_text.contains("typed"),
        "the early process read keystrokes: {stolen_text:?}"
    );
}

/// From a second session of the same user: the first session's terminal
/// belongs to the recorder (0600), and its recorder cannot be stopped,
/// killed, or read through /proc.
#[test]
fn other_sessions_of_the_user_cannot_reach_a_session() {
    let user = TestUser::dedicated("shelltrail-e2e-other");
    let w = World::builder().user(user.clone()).build();
    let mut t = w.ssh().term(80, 24);
    t.line("echo up-$((1+1))");
    t.expect("up-2");
    let recorder = wait_until("the first session's recorder", Duration::from_secs(10), || {
        let out = std::process::Command::new("pgrep")
            .args(["-x", "shelltrail-shel"])
            .output()
            .ok()?;
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        pids.into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.contains(&*w.path.to_string_lossy()))
        })
    });
    let script = format!(
        "T=/dev/$(ps -o tty= -p {recorder} | tr -d ' '); echo tty=$T owner=$(stat -c %U:%a $T); \
         (echo INJECTED > $T) 2>/dev/null && echo write-OK || echo write-denied; \
         kill -STOP {recorder} 2>/dev/null && echo stop-OK || echo stop-denied; \
         kill -KILL {recorder} 2>/dev/null && echo kill-OK || echo kill-denied; \
         head -c 16 /proc/{recorder}/environ >/dev/null 2>&1 && echo environ-OK || echo environ-denied; \
         head -c 16 /proc/{recorder}/mem >/dev/null 2>&1 && echo mem-OK || echo mem-denied"
    );
    let out = w.ssh().command(&script).run();
    let text = out.stdout_str();
    for denied in [
        "write-denied",
        "stop-denied",
        "kill-denied",
        "environ-denied",
        "mem-denied",
    ] {
        assert!(text.contains(denied), "{denied} missing: {out}");
    }
    assert!(text.contains("owner=shelltrail-e2e-rec:600"), "{out}");
    t.line("echo after-$((2+2))");
    t.expect("after-4");
    assert!(!t.transcript().contains("INJECTED"), "{}", t.transcript());
    t.line("exit");
    t.wait_exit(Duration::from_secs(30));
}

/// Exec sessions get the same separation: the program runs as the user, the
/// recorder as its own user, and the command cannot stop or kill it.
#[test]
fn exec_session_runs_as_the_user_and_cannot_stop_its_recorder() {
    let w = World::new();
    let out = w
        .ssh()
        .command("id -u; ps -o user:32= -p $PPID; kill -STOP $PPID; echo stop-rc=$?; echo done")
        .run();
    let text = out.stdout_str();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(w.user.uid.to_string().as_str()), "{out}");
    assert_eq!(lines.next().map(str::trim), Some("shelltrail-e2e-rec"), "{out}");
    assert!(text.contains("stop-rc=1") && text.contains("done"), "{out}");
    let s = w.only_session();
    assert_eq!(s.user, w.user.name, "{s:#?}");
}

/// An exec session whose command leaves a background job printing, and an
/// agent slow to acknowledge the end: once the recording has its exit event,
/// nothing more passes between the job and the client. Every line the
/// client received is in the recording.
#[test]
fn nothing_reaches_an_exec_client_after_the_recording_ends() {
    let w = World::builder().shell("close_timeout_secs = 20").build();
    let run = w
        .ssh()
        .command("echo start; (for i in $(seq 1 60); do echo bg-$i; sleep 0.1; done) & sleep 0.2; echo fg-done")
        .spawn();
    let id = wait_until("the exec session", Duration::from_secs(20), || {
        w.sessions().into_iter().find(|s| s.mode == "exec").map(|s| s.id)
    });
    // The job prints for 6 s; the agent stays frozen for 4 of them, so the
    // recorder waits for its Close to be acknowledged while the job goes on.
    let resume = w.pause_agent(Duration::from_secs(4));
    let out = run.wait(Duration::from_secs(60));
    resume.join().expect("SIGCONT thread");
    let s = w.wait_closed(&id, Duration::from_secs(30));
    let recorded = w.export(&id).output();
    let stdout = out.stdout_str();
    let seen: Vec<&str> = stdout.lines().filter(|l| l.starts_with("bg-")).map(str::trim).collect();
    assert!(!seen.is_empty(), "{out}");
    assert!(
        seen.len() < 60,
        "the client saw the whole job, after the recording ended: {out}"
    );
    for l in &seen {
        assert!(
            recorded.lines().any(|r| r.trim() == *l),
            "{l} reached the client but is not recorded ({s:?}):\n{recorded}"
        );
    }
}

/// A recorder that cannot separate itself from the user under sshd refuses
/// the session, and says why: installed without its set-uid bit, or started
/// with no_new_privs (exec then ignores set-uid and capabilities).
#[test]
fn recorder_that_cannot_separate_fails_closed() {
    let w = World::builder().no_sshd().build();
    let plain = w.path.join("bin/shelltrail-shell-plain");
    std::fs::copy(&w.shell_bin, &plain).expect("copy the recorder");
    shelltrail_tests::world::set_mode(&plain, 0o755);
    let as_user = |program: &std::path::Path, no_new_privs: bool| {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", &w.user.name, "--"]);
        if no_new_privs {
            c.args(["setpriv", "--no-new-privs"]);
        }
        c.arg("env")
            .arg("SSH_CONNECTION=127.0.0.1 50000 127.0.0.1 22")
            .arg(program)
            .arg("--config")
            .arg(&w.config)
            .args(["-c", "echo RAN-UNRECORDED"]);
        shelltrail_tests::proc::run(c, Duration::from_secs(20))
    };
    let out = as_user(&plain, false);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr_str().contains("not installed set-uid"), "{out}");
    assert!(!out.stdout_str().contains("RAN-UNRECORDED"), "{out}");

    let out = as_user(&w.shell_bin, true);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr_str().contains("no_new_privs"), "{out}");
    assert!(!out.stdout_str().contains("RAN-UNRECORDED"), "{out}");

    // The same set-uid recorder without no_new_privs runs and records.
    let out = as_user(&w.shell_bin, false);
    assert_eq!(out.status.code(), Some(0), "{out}");
    assert!(out.stdout_str().contains("RAN-UNRECORDED"), "{out}");
    assert_eq!(w.only_session().user, w.user.name);
}

/// A process of the user races every new recorder for its /proc entries
/// (tests/attackers/proc_race.c polls the newest pids and opens
/// /proc/PID/environ the moment one is named shelltrail-shel, and again for
/// as long as it lives): a set-uid recorder is not dumpable from its first
/// instruction to its last, so not one open succeeds. The issue reported an
/// unseparated recorder (non-dumpable only after reading its arguments and
/// configuration) attached in 3 of 20 starts; this attacker caught none of
/// 20 such starts here, so the test guards the property over the recorder's
/// whole life rather than reproducing that narrow race.
#[test]
fn recorder_cannot_be_traced_even_as_it_starts() {
    // A user of its own: other tests run unseparated copies of the recorder
    // (readable by their user, by design) under the shared user.
    let user = TestUser::dedicated("shelltrail-e2e-race");
    let w = World::builder().user(user).build();
    let attacker = w.path.join("bin/proc_race");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("attackers/proc_race.c");
    let mut cc = std::process::Command::new("cc");
    cc.args(["-O2", "-o"]).arg(&attacker).arg(&src);
    shelltrail_tests::proc::run_ok(cc, Duration::from_secs(60));
    shelltrail_tests::world::set_mode(&attacker, 0o755);

    let race = w.ssh().command(&format!("{} 12", attacker.display())).spawn();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..20 {
        let out = w.ssh().command("true").run();
        assert_eq!(out.code(), 0, "{out}");
    }
    let out = race.wait(Duration::from_secs(60));
    let text = out.stdout_str();
    let field = |name: &str| -> u64 {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the attacker's output: {out}"))
    };
    assert!(
        field("seen=") >= 10,
        "the attacker saw too few recorders start to mean anything: {out}"
    );
    assert_eq!(field("readable="), 0, "a recorder was readable by its user: {out}");
}

/// The window the separation leaves: a recorder stopped before it runs as
/// its own user (its real uid is still the user's) has not connected to the
/// agent, so no session shows it. The agent finds it in /proc and says which
/// terminal may be in use unrecorded. Here the recorder is stopped while it
/// asks for a reason (before it connects), by root, since the microseconds
/// after exec cannot be hit on purpose; what the agent sees is the same.
#[test]
fn agent_reports_a_recorder_stopped_before_it_started_recording() {
    let user = TestUser::dedicated("shelltrail-e2e-stopped");
    let w = World::builder().user(user).shell("require_reason = true").build();
    let mut t = w.ssh().term(80, 24);
    t.expect("Reason for this session");
    let recorder = wait_until("the recorder", Duration::from_secs(10), || {
        let out = std::process::Command::new("pgrep")
            .args(["-x", "shelltrail-shel"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.contains(&*w.config.to_string_lossy()))
            })
    });
    let pid = nix::unistd::Pid::from_raw(recorder);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let line = wait_until(
        "the agent to report the stopped recorder",
        Duration::from_secs(30),
        || {
            w.agent_log_text()
                .lines()
                .find(|l| l.contains("stopped before it started recording"))
                .map(String::from)
        },
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    assert!(line.contains(&format!("pid={recorder}")), "{line}");
    assert!(line.contains(&format!("uid={}", w.user.uid)), "{line}");
    assert!(line.contains("tty=\"/dev/pts/"), "{line}");
    t.line("CHG-1");
    t.line("echo in-$((5+5))");
    t.expect("in-10");
    t.line("exit");
    t.wait_exit(Duration::from_secs(30));
    // Listed twice: the gap (no chunks, its end says why) and, once the
    // recorder went on, the session it recorded.
    let rows = w.sessions();
    let gap = rows.iter().find(|r| r.mode == "unrecorded").expect("the gap is listed");
    assert_eq!((gap.user.as_str(), gap.live), (w.user.name.as_str(), false), "{gap:#?}");
    assert!(
        gap.end_cause.as_deref().unwrap_or_default().contains("stopped before"),
        "{gap:#?}"
    );
    let recorded = rows.iter().find(|r| r.mode == "pty").expect("the recorded session");
    assert_eq!(recorded.reason, "CHG-1");
}

/// Another local user hands the set-uid recorder a terminal that looks like
/// a recorded session's (the same /dev/pts/K name and device number, from a
/// devpts instance of their own namespace: tests/attackers/nspts.c), hoping
/// it takes and reopens the real one, and then a terminal that is not theirs
/// at all (root's). The recorder takes only the caller's own SSH terminal:
/// the session's client sees nothing of the attacker, and root's terminal
/// keeps its owner.
#[test]
fn another_user_cannot_make_the_recorder_take_a_terminal() {
    let victim = TestUser::dedicated("shelltrail-e2e-victim");
    let attacker = TestUser::dedicated("shelltrail-e2e-other2");
    let w = World::builder().user(victim).build();
    let nspts = w.path.join("bin/nspts");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("attackers/nspts.c");
    let mut cc = std::process::Command::new("cc");
    cc.args(["-O2", "-o"]).arg(&nspts).arg(&src);
    shelltrail_tests::proc::run_ok(cc, Duration::from_secs(60));
    shelltrail_tests::world::set_mode(&nspts, 0o755);

    let mut t = w.ssh().term(80, 24);
    t.line("echo up-$((1+1))");
    t.expect("up-2");
    let pts = wait_until("the session's terminal", Duration::from_secs(10), || {
        let out = std::process::Command::new("ps")
            .args(["-o", "tty=", "-u", &w.user.name])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|t| t.strip_prefix("pts/")?.parse::<u32>().ok())
            .min()
    });

    // The attacker's recorder, on their namespace's pts number `pts`.
    let mut c = std::process::Command::new("runuser");
    c.args(["-u", &attacker.name, "--", "setsid"])
        .arg(&nspts)
        .arg(pts.to_string())
        .arg(&w.shell_bin)
        .arg("--config")
        .arg(&w.config)
        .args(["-c", "printf 'INJECTED-PROMPT: '; sleep 2"]);
    let out = shelltrail_tests::proc::run(c, Duration::from_secs(30));
    assert!(
        !out.stderr_str().contains("unshare") && !out.stderr_str().contains("mount"),
        "the namespace attack could not be set up here: {out}"
    );
    t.line("echo victim-$((3+4))");
    t.expect("victim-7");
    let host_pts = format!("/dev/pts/{pts}");
    let owner = nix::sys::stat::stat(host_pts.as_str()).expect("stat the session's terminal");
    let rec = nix::unistd::User::from_name(shelltrail_tests::users::RECORDER_USER)
        .ok()
        .flatten()
        .expect("recorder user");
    assert_eq!(owner.st_uid, rec.uid.as_raw(), "{host_pts} changed hands");
    t.line("exit");
    t.wait_exit(Duration::from_secs(30));
    assert!(!t.transcript().contains("INJECTED"), "{}", t.transcript());

    // A terminal that is root's: the attacker's recorder leaves it as it is.
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&pty.slave)))
        .expect("slave name");
    let before = nix::sys::stat::stat(&slave).expect("stat slave");
    let mut c = std::process::Command::new("runuser");
    c.args(["-u", &attacker.name, "--"])
        .arg(&w.shell_bin)
        .arg("--config")
        .arg(&w.config)
        .args(["-c", "true"])
        .stdin(std::process::Stdio::from(pty.slave.try_clone().expect("dup slave")));
    let _ = shelltrail_tests::proc::run(c, Duration::from_secs(30));
    let after = nix::sys::stat::stat(&slave).expect("stat slave");
    assert_eq!(
        (after.st_uid, after.st_mode),
        (before.st_uid, before.st_mode),
        "{}",
        slave.display()
    );
}

/// The client goes away from a session whose program ignores the hangup:
/// the recorder, which the user cannot stop, must neither spin nor keep the
/// session for ever. The program gets SIGHUP, then SIGKILL after a grace
/// period, and the recording ends.
#[test]
fn a_program_ignoring_the_hangup_does_not_keep_the_session() {
    let user = TestUser::dedicated("shelltrail-e2e-hup");
    let w = World::builder().user(user.clone()).build();
    let mut t = w
        .ssh()
        .command("trap '' HUP TERM INT; echo ready; sleep 300")
        .term(80, 24);
    t.expect("ready");
    let id = w.only_session().id;
    drop(t);
    let s = w.wait_closed(&id, Duration::from_secs(40));
    assert_eq!(s.exit_status, Some(128 + 9), "{s:#?}");
    wait_until("the user's processes to end", Duration::from_secs(20), || {
        user.processes().is_empty().then_some(())
    });
}

/// A PTY session whose shell exits while a background job floods the
/// terminal, with a client that reads slowly (writes to it block): every
/// line the client received is in the recording. (Without the gate at the
/// end of pty.rs's drain, 80 to 258 lines reached the client unrecorded in
/// each of 3 runs here: a burst written to the terminal was handed to the
/// recorder only after the exit event.)
#[test]
fn nothing_reaches_a_slow_pty_client_after_the_recording_ends() {
    let w = World::new();
    let out = w.path.join("files/client-output");
    let ssh = w
        .ssh()
        .arg("-tt")
        .command("P=$(printf %0200d 0); (i=0; while :; do i=$((i+1)); echo \"L$i $P\"; done) & sleep 0.3; exit 0")
        .build();
    let mut line: Vec<String> = vec![ssh.get_program().to_string_lossy().into_owned()];
    line.extend(ssh.get_args().map(|a| a.to_string_lossy().into_owned()));
    let quoted: Vec<String> = line.iter().map(|a| format!("'{}'", a.replace('\'', "'\\''"))).collect();
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c").arg(format!(
        "{} </dev/null | (sleep 6; cat) > '{}'",
        quoted.join(" "),
        out.display()
    ));
    shelltrail_tests::proc::run(sh, Duration::from_secs(60));
    let id = w.only_session().id;
    w.wait_closed(&id, Duration::from_secs(30));
    let client = std::fs::read_to_string(&out).unwrap_or_default();
    let recorded = String::from_utf8_lossy(&w.export_raw(&id)).into_owned();
    let lines = |text: &str| -> std::collections::HashSet<String> {
        text.split(['\r', '\n'])
            .filter(|l| l.starts_with('L') && l.ends_with(&"0".repeat(200)))
            .map(String::from)
            .collect()
    };
    let (seen, kept) = (lines(&client), lines(&recorded));
    assert!(!seen.is_empty(), "the client got no lines: {client:?}");
    let leaked: Vec<&String> = seen.difference(&kept).collect();
    assert!(
        leaked.is_empty(),
        "{} lines reached the client unrecorded, e.g. {:?}",
        leaked.len(),
        leaked.iter().take(5).collect::<Vec<_>>()
    );
}

/// The ~/.bashrc bypass of ForceCommand-only setups (Debian's bash reads it
/// before running the ForceCommand, so `exec bash` there never reaches the
/// recorder; docs/deployment.md closes it by making the recorder the login
/// shell). Where it is left open, the session is not recorded, but the
/// agent sees sshd's session program that is not a recorder and says so.
#[test]
fn agent_reports_an_ssh_session_that_never_reached_the_recorder() {
    let user = TestUser::dedicated("shelltrail-e2e-bypass");
    dotfile(
        &user,
        ".bashrc",
        "if [ -n \"$SSH_CONNECTION\" ] && [ -z \"$BYPASS\" ]; then export BYPASS=1; PS1='$ ' exec bash --norc -i; fi\n",
    );
    let w = World::builder().user(user.clone()).build();
    let mut t = w.ssh().term(80, 24);
    t.line("echo unrecorded-$((20+1))");
    t.expect("unrecorded-21");
    let line = wait_until(
        "the agent to report the unrecorded session",
        Duration::from_secs(30),
        || {
            w.agent_log_text()
                .lines()
                .find(|l| l.contains("runs without a recording") && l.contains(&format!("uid={}", user.uid)))
                .map(String::from)
        },
    );
    t.line("exit");
    t.wait_exit(Duration::from_secs(30));
    remove_dotfiles(&user, &[".bashrc"]);
    assert!(
        line.contains("program=bash") && line.contains("tty=\"/dev/pts/"),
        "{line}"
    );
    // Not recorded, but listed as a gap: no chunks, and an end that says why.
    let rows = w.sessions();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let gap = &rows[0];
    assert_eq!(
        (gap.mode.as_str(), gap.user.as_str(), gap.chunks),
        ("unrecorded", user.name.as_str(), 0),
        "{gap:#?}"
    );
    assert!(
        gap.end_cause
            .as_deref()
            .unwrap_or_default()
            .contains("never started the recorder"),
        "{gap:#?}"
    );
}
