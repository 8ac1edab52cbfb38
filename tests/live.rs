//! Live response on a host: an administrator lists the sessions being
//! recorded right now, ends one with a reason (shown to the user, recorded
//! with who ended it, logged), locks the user out and lets them back in;
//! anyone else is refused.

use shelltrail_tests::proc::{run, run_ok};
use shelltrail_tests::{TIMEOUT, World};
use std::os::unix::process::CommandExt;
use std::time::Duration;

/// A live PTY session, typed into; its id.
fn live_session(w: &World, word: &str) -> (shelltrail_tests::Term, String) {
    let mut t = w.ssh().term(80, 24);
    t.line(&format!("echo {word}-$((6*7))"));
    t.expect(&format!("{word}-42"));
    let id = w
        .wait_session("the live session", TIMEOUT, |r| {
            r.mode == "pty" && r.live && r.chunks > 0 && !r.command.contains("unrecorded")
        })
        .id;
    (t, id)
}

fn live_rows(w: &World) -> Vec<serde_json::Value> {
    let out = run_ok(w.cli(&["sessions", "--live", "--json"]), TIMEOUT);
    serde_json::from_slice(&out.stdout).expect("sessions --live --json")
}

/// `sessions --live` lists the session with its user, client, idle time and
/// bytes; `kill` (by a fragment of the id) ends it: the client exits, the
/// user saw who ended it and why, the recording holds that as a marker
/// before its end, the end record names it, and the agent logged it.
#[test]
fn an_administrator_ends_a_live_session_and_the_recording_says_who_and_why() {
    let w = World::new();
    let (mut term, id) = live_session(&w, "before-kill");

    let rows = live_rows(&w);
    let row = rows
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} not in {rows:#?}"));
    assert_eq!(row["user"], w.user.name.as_str());
    assert_eq!(
        row["client"].as_str().map(|c| c.starts_with("127.0.0.1:")),
        Some(true),
        "{row}"
    );
    assert!(row["bytes"].as_u64().unwrap() > 0, "{row}");
    assert!(row["idle_ms"].as_i64().unwrap() >= 0, "{row}");
    let table = run_ok(w.cli(&["sessions", "--live"]), TIMEOUT).stdout_str();
    assert!(table.lines().any(|l| l.starts_with(&id)), "{table}");

    let out = run_ok(
        w.cli(&["kill", &id[id.len() - 12..], "--reason", "incident 4711: stop now"]),
        TIMEOUT,
    );
    assert!(out.stdout_str().contains(&format!("ended session {id}")), "{out}");
    term.wait_exit(Duration::from_secs(20));
    let seen = term.transcript();
    assert!(
        seen.contains("ended by root (uid 0) on this host: incident 4711: stop now"),
        "the user is not told: {seen:?}"
    );

    let ended = w.wait_closed(&id, TIMEOUT);
    assert_eq!(
        ended.end_cause.as_deref(),
        Some("ended by root (uid 0) on this host: incident 4711: stop now"),
        "{ended:#?}"
    );
    let cast = String::from_utf8(w.export_bytes(&id, &[])).unwrap();
    let lines: Vec<&str> = cast.lines().collect();
    let marker = lines
        .iter()
        .position(|l| l.contains("\"m\"") && l.contains("incident 4711"))
        .unwrap_or_else(|| panic!("no marker naming the end in the recording:\n{cast}"));
    let exit = lines.iter().position(|l| l.contains("\"x\"")).expect("an exit event");
    assert!(marker < exit, "the marker comes before the exit event:\n{cast}");
    assert!(cast.contains("before-kill-42"), "{cast}");
    let log = w.agent_log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("shelltrail::audit") && l.contains(&format!("ended session {id}"))),
        "no audit line:\n{log}"
    );
    // Reading the recording from the spool is in the agent's audit log too.
    assert!(
        log.lines().any(|l| l.contains("shelltrail::audit")
            && l.contains(&format!("read from the spool: export {id}"))
            && l.contains("root (uid 0)")),
        "the export is not audited:\n{log}"
    );
    assert!(
        live_rows(&w).iter().all(|r| r["id"] != id.as_str()),
        "still listed live"
    );
}

/// `kill --lock` refuses the user's next login with a message that says
/// why and by whom, across an agent restart, until `unlock`.
#[test]
fn a_locked_out_user_is_refused_until_unlocked() {
    let w = World::new();
    let (mut term, id) = live_session(&w, "locked");
    run_ok(
        w.cli(&["kill", &id, "--reason", "account compromised", "--lock"]),
        TIMEOUT,
    );
    term.wait_exit(Duration::from_secs(20));

    w.restart_agent();
    let refused = w.ssh().command("echo should-not-run").run_within(TIMEOUT);
    assert_ne!(refused.code(), 0, "{refused}");
    let said = refused.stderr_str() + &refused.stdout_str();
    assert!(!said.contains("should-not-run"), "{said}");
    assert!(
        said.contains("locked by root (uid 0) on this host") && said.contains("account compromised"),
        "the refusal does not say why: {said}"
    );

    let out = run_ok(w.cli(&["unlock", &w.user.name]), TIMEOUT);
    assert!(out.stdout_str().contains("unlocked"), "{out}");
    let back = w.ssh().command("echo back-$((2+3))").run_within(TIMEOUT);
    assert_eq!(back.code(), 0, "{back}");
    assert!(back.stdout_str().contains("back-5"), "{back}");
    let again = run(w.cli(&["unlock", &w.user.name]), TIMEOUT);
    assert_ne!(again.code(), 0, "unlocking a user who is not locked says so");
    assert!(again.stderr_str().contains("is not locked"), "{again}");
}

/// The recorded user (not root, not in admin_group) can neither list nor
/// end sessions through the agent; a member of admin_group can.
#[test]
fn only_root_and_the_admin_group_may_end_sessions() {
    let group = "shelltrail-e2e-adm";
    // Made once per machine; "already exists" on later runs is fine.
    let _ = std::process::Command::new("groupadd")
        .arg(group)
        .stderr(std::process::Stdio::null())
        .status();
    let w = World::builder()
        .agent_setting(&format!("admin_group = \"{group}\""))
        .build();
    let (_term, id) = live_session(&w, "victim");
    let as_user = |args: &[&str]| {
        let mut c = w.cli(args);
        // std drops root's supplementary groups when it switches uid.
        c.uid(w.user.uid).gid(w.user.uid);
        c
    };
    for args in [
        vec!["kill", id.as_str(), "--reason", "no"],
        vec!["sessions", "--live"],
        vec!["unlock", "root"],
    ] {
        let out = run(as_user(&args), TIMEOUT);
        assert_ne!(out.code(), 0, "{args:?} as the user: {out}");
        assert!(
            out.stderr_str().contains("permission denied") && out.stderr_str().contains(group),
            "{args:?}: {out}"
        );
    }
    assert!(
        w.session(&id).live,
        "the session survived the user's attempts to end it"
    );
    let log = w.agent_log_text();
    assert!(
        log.lines()
            .filter(|l| l.contains("shelltrail::audit") && l.contains("refused"))
            .count()
            >= 3,
        "refusals are logged:\n{log}"
    );

    // A member of the admin group may (here its primary group: the agent
    // reads the peer's groups from the kernel, /proc/PID/status).
    let gid = nix::unistd::Group::from_name(group).unwrap().expect("the group").gid;
    let mut c = w.cli(&["kill", &id, "--reason", "by an admin"]);
    c.uid(w.user.uid).gid(gid.as_raw());
    let out = run(c, TIMEOUT);
    assert_eq!(out.code(), 0, "{out}");
    let ended = w.wait_closed(&id, TIMEOUT);
    assert!(
        ended
            .end_cause
            .as_deref()
            .is_some_and(|c| c.contains(&format!("ended by {}", w.user.name)) && c.contains("by an admin")),
        "{ended:#?}"
    );
}

/// The screen a terminal of `cols`×`rows` shows after `bytes`.
fn screen_after(bytes: &str, cols: u16, rows: u16) -> Vec<u8> {
    let mut s = shelltrail_cast::Screen::new(cols, rows);
    s.feed(bytes.as_bytes());
    s.snapshot().bytes
}

/// `tail` on the host: a responder joining a full-screen program sees the
/// same screen as the user's own terminal, cell for cell (attributes, the
/// alternate screen and the cursor included); what the user types next
/// reaches the tail as it happens, a resize is shown, and the tail ends
/// with the session and its exit status. `--raw` follows the output bytes
/// only, for a pipe; a joiner is audited.
#[test]
fn tail_draws_the_current_screen_then_follows_the_session_to_its_end() {
    let w = World::new();
    let (mut term, id) = live_session(&w, "tail");
    // A full-screen program: clear, the alternate screen, colours, a cursor
    // position, then `cat` echoing what is typed.
    term.line(concat!(
        r"printf '\033[H\033[2J\033[?1049h\033[2J\033[3;5H\033[1;31mALT-SCREEN\033[0m ",
        r"\033[7mINVERSE\033[0m\033[6;1H'; cat"
    ));
    term.expect("INVERSE");

    let mut tail = shelltrail_tests::Term::spawn(&w.cli(&["tail", &id[id.len() - 8..]]), 80, 24);
    tail.expect("INVERSE");
    let raw = shelltrail_tests::Running::spawn(w.cli(&["tail", "--raw", &id]), None);
    let replay = shelltrail_tests::Running::spawn(w.cli(&["tail", "--raw", "--from-start", &id]), None);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        screen_after(&tail.transcript(), 80, 24),
        screen_after(&term.transcript(), 80, 24),
        "the tail's screen is not the user's:\n--- user ---\n{:?}\n--- tail ---\n{:?}",
        term.transcript(),
        tail.transcript()
    );

    term.line("LIVE-TYPED-ONE");
    tail.expect("LIVE-TYPED-ONE");
    raw.wait_stdout_contains("LIVE-TYPED-ONE", TIMEOUT);
    assert_eq!(
        screen_after(&tail.transcript(), 80, 24),
        screen_after(&term.transcript(), 80, 24),
        "the screens part after live output"
    );

    term.resize(100, 30);
    tail.expect("the session's terminal is now 100x30");
    // Out of cat (Ctrl-D), out of the alternate screen, and out.
    term.send("\x04");
    term.line(r"printf '\033[?1049l'; exit 3");
    assert_eq!(tail.wait_exit(TIMEOUT), 0);
    assert!(
        tail.transcript().contains("the session ended (exit 3)"),
        "{}",
        tail.transcript()
    );
    let raw = raw.wait(TIMEOUT);
    assert_eq!(raw.code(), 0, "{raw}");
    let raw_out = raw.stdout_str();
    assert!(raw_out.contains("LIVE-TYPED-ONE"), "{raw_out:?}");
    assert!(
        !raw_out.contains("ALT-SCREEN"),
        "--raw sends no screen, only what follows: {raw_out:?}"
    );
    // --from-start: the output from the session's first byte, then on.
    let replay = replay.wait(TIMEOUT);
    assert_eq!(replay.code(), 0, "{replay}");
    let replayed = replay.stdout_str();
    let (a, b, c) = (
        replayed.find("tail-42"),
        replayed.find("ALT-SCREEN"),
        replayed.find("LIVE-TYPED-ONE"),
    );
    assert!(
        a.is_some() && a < b && b < c,
        "--from-start did not replay then follow: {replayed:?}"
    );
    let log = w.agent_log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("shelltrail::audit") && l.contains(&format!("tailing session {id}"))),
        "no audit line:\n{log}"
    );
}

/// Ten tailers follow a session writing megabytes while an eleventh never
/// reads: the session runs to its end and is recorded whole, the ten see
/// its output to the last line, and the stalled one, read at last, was
/// skipped ahead with a notice (and told of the end) instead of being
/// waited for.
#[test]
fn a_stalled_tailer_is_skipped_ahead_and_ten_tailers_follow() {
    use std::io::Read;
    use std::process::Stdio;
    let w = World::new();
    let session = w
        .ssh()
        .command("sleep 3; head -c 24000000 /dev/urandom | base64 -w 100; echo DONE-$((40+2))")
        .spawn();
    let id = w
        .wait_session("the session", TIMEOUT, |r| r.live && r.mode == "exec")
        .id;

    let tailers: Vec<_> = (0..10)
        .map(|_| shelltrail_tests::Running::spawn(w.cli(&["tail", "--raw", &id]), None))
        .collect();
    // Its stdout a pipe nobody reads until the end: it stops reading its
    // socket once the pipe is full.
    let mut stalled = w
        .cli(&["tail", "--raw", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the stalled tailer");

    let out = session.wait(Duration::from_secs(120));
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert!(out.stdout_str().ends_with("DONE-42\n"));
    let row = w.wait_closed(&id, TIMEOUT);
    assert_eq!(w.export_raw(&row.id), out.stdout, "the recording is whole");

    for t in tailers {
        let got = t.wait(TIMEOUT);
        assert_eq!(got.code(), 0, "{got}");
        assert!(got.stdout_str().ends_with("DONE-42\n"), "a tailer missed the end");
    }
    let mut seen = Vec::new();
    stalled.stdout.take().unwrap().read_to_end(&mut seen).unwrap();
    let mut notices = String::new();
    stalled.stderr.take().unwrap().read_to_string(&mut notices).unwrap();
    assert!(stalled.wait().unwrap().success(), "{notices}");
    assert!(
        notices.contains("fell behind"),
        "the stalled tailer was not told: {notices}"
    );
    assert!(notices.contains("the session ended (exit 0)"), "{notices}");
    // --raw draws no screen: what it skipped is simply not there.
    assert!(
        seen.len() < out.stdout.len(),
        "the stalled tailer was not skipped ahead ({} of {} bytes)",
        seen.len(),
        out.stdout.len()
    );
}

/// The user first kills every process of theirs that belongs to the
/// recorder (its signaller, through which the session's signals go); the
/// administrator's kill still ends the session: the recorder gives up on
/// the program after the grace and closes the terminal behind it.
#[test]
fn a_user_who_killed_the_signaller_does_not_survive_kill() {
    let w = World::new();
    let (mut term, id) = live_session(&w, "victim");
    term.line(
        "me=$(id -u); for d in /proc/[0-9]*; do c=$(cat $d/comm 2>/dev/null); \
         u=$(awk '/^Uid:/{print $2}' $d/status 2>/dev/null); \
         case $c in shelltrail*) [ \"$u\" = \"$me\" ] && kill -9 ${d#/proc/} && echo KILLED-${d#/proc/}-$c;; esac; done; \
         trap '' HUP TERM; echo scan-$((1+1))",
    );
    term.expect("scan-2");
    assert!(
        term.transcript().contains("KILLED-"),
        "no signaller found: {}",
        term.transcript()
    );
    run_ok(w.cli(&["kill", &id, "--reason", "incident: stop now"]), TIMEOUT);
    term.expect("ended by root");
    // Grace (5 s) and the give-up (2 s) later, the client is gone.
    term.wait_exit(Duration::from_secs(30));
    let ended = w.wait_closed(&id, TIMEOUT);
    assert_eq!(ended.exit_status, Some(137), "{ended:#?}");
    assert!(live_rows(&w).iter().all(|r| r["id"] != id.as_str()));
}

/// `kill --lock` is about the user: their other live session ends too.
#[test]
fn kill_lock_ends_the_users_other_sessions_too() {
    let w = World::new();
    let (mut a, id_a) = live_session(&w, "first");
    let mut b = w.ssh().term(80, 24);
    b.line("echo second-$((6*7))");
    b.expect("second-42");
    let out = run_ok(w.cli(&["kill", &id_a, "--reason", "compromised", "--lock"]), TIMEOUT);
    assert!(out.stdout_str().contains("also ended"), "{out}");
    a.wait_exit(Duration::from_secs(20));
    b.wait_exit(Duration::from_secs(20));
    assert!(b.transcript().contains("ended by root"), "{}", b.transcript());
    run_ok(w.cli(&["unlock", &w.user.name]), TIMEOUT);
}

/// The user's command line goes into the agent's audit line when an
/// administrator ends the session: it cannot forge lines or carry escapes.
#[test]
fn a_users_command_cannot_forge_audit_lines() {
    let w = World::new();
    let r = w
        .ssh()
        .command("sleep 100; exit\nFORGED shelltrail::audit: unlocked mallory \u{1b}]0;pwn\u{7} done")
        .spawn();
    let id = w
        .wait_session("the exec session", TIMEOUT, |s| {
            s.live && s.command.contains("sleep 100")
        })
        .id;
    run_ok(w.cli(&["kill", &id, "--reason", "x"]), TIMEOUT);
    let _ = r.wait(TIMEOUT);
    let log = w.agent_log_text();
    assert!(log.contains(&format!("ended session {id}")), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "a forged line:\n{log}");
    assert!(!log.contains('\u{1b}'), "an escape reached the log");
}

/// With `notify_on_tail`, the user is told (one line on their terminal,
/// also recorded) when someone starts tailing their session; without it
/// (the default, every other test here), nothing is shown.
#[test]
fn the_user_is_told_when_watched_if_the_host_says_so() {
    let w = World::builder().agent_setting("notify_on_tail = true").build();
    let (mut term, id) = live_session(&w, "watched");
    let tail = shelltrail_tests::Running::spawn(w.cli(&["tail", "--raw", &id]), None);
    term.expect("root (uid 0) on this host is watching this session");
    term.line("exit");
    term.wait_exit(TIMEOUT);
    let _ = tail.wait(TIMEOUT);
    w.wait_closed(&id, TIMEOUT);
    let cast = String::from_utf8(w.export_bytes(&id, &[])).unwrap();
    assert!(
        cast.lines()
            .any(|l| l.contains("\"m\"") && l.contains("is watching this session")),
        "not recorded:\n{cast}"
    );
}
