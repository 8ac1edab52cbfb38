//! Live response through the collector: a responder anywhere lists the
//! fleet's live sessions, tails one (its current screen, then its output),
//! keeps the tail through a link that keeps breaking, ends a session on its
//! host (now, or when an offline agent returns), locks and unlocks its user;
//! the roles decide who may, and the audit log records every look.
//!
//! Each test runs a real sshd host whose agent ships over mutual TLS to a
//! real collector ([`ShipWorld`]); the CLI talks to the collector with
//! operator certificates: `operator` has the view role, `responder` the
//! respond role.

use shelltrail_tests::faultproxy::FaultProxy;
use shelltrail_tests::proc::{run, run_ok};
use shelltrail_tests::{Running, ShipWorld, TIMEOUT, Term, World};
use std::time::{Duration, Instant};

const HOST: &str = "web-1";

fn world(seed: u64) -> (ShipWorld, World) {
    let ship = ShipWorld::new(seed);
    let w = World::builder().ship_to(&ship, HOST).build();
    (ship, w)
}

/// `sessions --live --json` at the collector, filtered to `HOST`.
fn fleet_live(ship: &ShipWorld) -> Vec<serde_json::Value> {
    let out = run_ok(ship.remote(&["sessions", "--live", "--host", HOST, "--json"]), TIMEOUT);
    serde_json::from_slice(&out.stdout).expect("sessions --live --json")
}

/// Waits until the collector lists `pred`'s session live; its id.
fn wait_fleet_live(ship: &ShipWorld, pred: impl Fn(&serde_json::Value) -> bool) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let rows = fleet_live(ship);
        if let Some(r) = rows.iter().find(|r| pred(r)) {
            return r["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "not listed live at the collector: {rows:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn responder(ship: &ShipWorld, args: &[&str]) -> std::process::Command {
    ship.remote_as(&ship.responder.0, &ship.responder.1, args)
}

fn audit(ship: &ShipWorld, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["audit", "--json"];
    all.extend_from_slice(args);
    let out = run_ok(ship.remote(&all), TIMEOUT);
    serde_json::from_slice(&out.stdout).expect("audit --json")
}

fn screen_after(bytes: &str, cols: u16, rows: u16) -> Vec<u8> {
    let mut s = shelltrail_cast::Screen::new(cols, rows);
    s.feed(bytes.as_bytes());
    s.snapshot().bytes
}

/// The whole response, through the collector: the session is listed live
/// fleet-wide with its user and client; a tail through the collector draws
/// the user's screen cell for cell and follows what they type; the viewer
/// may not end it, the responder does (with `--lock`): the user sees who
/// and why, the tail sees the end, the next login is refused until `unlock
/// --host`; a host's certificate can neither tail nor kill; every step,
/// refusals included, is in `shelltrail audit`.
#[test]
fn a_responder_tails_and_ends_a_session_through_the_collector_and_it_is_all_audited() {
    let (ship, w) = world(0x51);
    let mut term = w.ssh().term(80, 24);
    term.line("echo fleet-$((6*7))");
    term.expect("fleet-42");
    let id = wait_fleet_live(&ship, |r| r["mode"] == "pty");
    let row = fleet_live(&ship).into_iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(row["user"], w.user.name.as_str(), "{row}");
    assert_eq!(row["host_connected"], true, "{row}");
    assert!(row["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{row}");

    term.line(concat!(
        r"printf '\033[H\033[2J\033[?1049h\033[2J\033[3;5H\033[1;31mALT-SCREEN\033[0m ",
        r"\033[7mINVERSE\033[0m\033[6;1H'; cat"
    ));
    term.expect("INVERSE");
    // The viewer's tail, joining by a fragment of the id.
    let mut tail = Term::spawn(&ship.remote(&["tail", &id[id.len() - 10..]]), 80, 24);
    tail.expect("INVERSE");
    std::thread::sleep(Duration::from_millis(300));
    let (t, u) = (tail.transcript(), term.transcript());
    // The tail's own notices go to the same terminal: compare from the screen on.
    let from = t.find("\x1bc").unwrap_or(0);
    assert_eq!(
        screen_after(&t[from..], 80, 24),
        screen_after(&u, 80, 24),
        "the tail's screen is not the user's:\n--- user ---\n{u:?}\n--- tail ---\n{t:?}"
    );
    term.line("TYPED-AFTER-JOIN");
    tail.expect("TYPED-AFTER-JOIN");

    // A host certificate reads nothing; the viewer may not end sessions.
    let (hc, hk) = ship.pki.issue("web-9", "host", &["web-9"]);
    let out = run(ship.remote_as(&hc, &hk, &["tail", "--raw", &id]), TIMEOUT);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.stderr_str().contains("operator certificates only"), "{out}");
    let out = run(ship.remote(&["kill", &id, "--reason", "no"]), TIMEOUT);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.stderr_str().contains("view role only"), "{out}");

    let out = run_ok(
        responder(&ship, &["kill", &id, "--reason", "incident 99: contain", "--lock"]),
        TIMEOUT,
    );
    assert!(out.stdout_str().contains(&format!("ended session {id}")), "{out}");
    term.wait_exit(Duration::from_secs(30));
    let seen = term.transcript();
    assert!(
        seen.contains("ended by responder (operator, from 127.0.0.1:") && seen.contains("incident 99: contain"),
        "the user is not told who and why: {seen:?}"
    );
    assert_eq!(tail.wait_exit(TIMEOUT), 0);
    assert!(tail.transcript().contains("the session ended"), "{}", tail.transcript());

    let refused = w.ssh().command("echo should-not-run").run_within(TIMEOUT);
    assert_ne!(refused.code(), 0, "{refused}");
    assert!(
        (refused.stderr_str() + &refused.stdout_str()).contains("locked by responder"),
        "{refused}"
    );
    let out = run(responder(&ship, &["unlock", &w.user.name]), TIMEOUT);
    assert!(
        out.stderr_str().contains("--host"),
        "unlock at a collector names the host: {out}"
    );
    let out = run_ok(responder(&ship, &["unlock", &w.user.name, "--host", HOST]), TIMEOUT);
    assert!(out.stdout_str().contains("unlocked"), "{out}");
    let back = w.ssh().command("echo back-$((2+3))").run_within(TIMEOUT);
    assert!(back.stdout_str().contains("back-5"), "{back}");

    // The recording says who ended it, shipped whole.
    let ended = ship.wait_remote("the ended session", TIMEOUT, |r| r.id == id && !r.live);
    assert!(
        ended
            .end_cause
            .as_deref()
            .is_some_and(|c| c.contains("ended by responder")),
        "{ended:#?}"
    );

    // Reading the recording is audited with what it was read for.
    run_ok(ship.remote(&["export", &id, "-o", "/dev/null"]), TIMEOUT);
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    let log = audit(&ship, &[]);
    assert!(
        log.iter()
            .any(|e| e["who"] == "operator" && e["action"] == "export" && e["session_id"] == id.as_str()),
        "{log:#?}"
    );
    let has = |who: &str, action: &str, allowed: bool| {
        log.iter()
            .any(|e| e["who"] == who && e["action"] == action && e["allowed"] == allowed)
    };
    assert!(has("operator", "list", true), "{log:#?}");
    assert!(has("operator", "tail", true), "{log:#?}");
    assert!(has("operator", "kill", false), "the viewer's refused kill: {log:#?}");
    assert!(has("web-9 (refused certificate)", "tail", false), "{log:#?}");
    assert!(
        log.iter().any(|e| e["who"] == "responder"
            && e["action"] == "lock"
            && e["detail"].as_str().unwrap().starts_with("done:")),
        "{log:#?}"
    );
    assert!(has("responder", "unlock", true), "{log:#?}");
    let about = audit(&ship, &["--session", &id]);
    assert!(
        !about.is_empty() && about.iter().all(|e| e["session_id"] == id.as_str()),
        "{about:#?}"
    );
    let table = run_ok(ship.remote(&["audit"]), TIMEOUT).stdout_str();
    assert!(table.contains("REFUSED") && table.contains("responder"), "{table}");
}

/// A tail through the collector survives its link being cut again and
/// again (a fault proxy between the CLI and the collector): it says it
/// reconnected, and what it prints is the session's output exactly, with
/// no gap and nothing twice.
#[test]
fn a_tail_through_the_collector_resumes_after_cuts_with_no_gap_and_no_repeat() {
    let (ship, w) = world(0x52);
    let session = w
        .ssh()
        .command("sleep 1; for i in $(seq 1 600); do echo line-$i; sleep 0.01; done; echo END-$((40+2))")
        .spawn();
    let id = wait_fleet_live(&ship, |r| r["mode"] == "exec");
    let proxy = FaultProxy::start(ship.collector.addr(), 0x52);
    let tail = Running::spawn(
        ship.remote_via(
            &proxy.url(),
            &ship.operator.0,
            &ship.operator.1,
            &["tail", "--raw", "--from-start", &id],
        ),
        None,
    );
    let mut cuts = 0;
    let started = Instant::now();
    while cuts < 12 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(250));
        proxy.cut_all();
        cuts += 1;
    }
    let out = session.wait(Duration::from_secs(120));
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    let tailed = tail.wait(TIMEOUT);
    assert_eq!(tailed.code(), 0, "{tailed}");
    assert_eq!(
        tailed.stdout_str(),
        out.stdout_str(),
        "the tail printed a gap or a repeat; its notices:\n{}",
        tailed.stderr_str()
    );
    assert!(
        tailed.stderr_str().contains("reconnected"),
        "it never said it reconnected ({cuts} cuts; proxy {:?}): {}",
        proxy.stats(),
        tailed.stderr_str()
    );
}

/// A kill for a host whose agent is not connected is queued (the command
/// says so, exit 2) and carried out when the agent returns; the audit log
/// says when it was done.
#[test]
fn a_kill_for_an_offline_host_is_delivered_when_its_agent_returns() {
    let (ship, w) = world(0x53);
    let mut term = w.ssh().term(80, 24);
    term.line("echo offline-$((6*7))");
    term.expect("offline-42");
    let id = wait_fleet_live(&ship, |r| r["mode"] == "pty");
    w.stop_agent();
    // The collector notices the agent's stream ended.
    let deadline = Instant::now() + TIMEOUT;
    while fleet_live(&ship)
        .iter()
        .any(|r| r["id"] == id.as_str() && r["host_connected"] == true)
    {
        assert!(Instant::now() < deadline, "the collector still sees the agent");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = run(responder(&ship, &["kill", &id, "--reason", "while away"]), TIMEOUT);
    assert_eq!(out.code(), 2, "{out}");
    assert!(out.stderr_str().contains("queued"), "{out}");
    w.start_agent();
    term.wait_exit(Duration::from_secs(60));
    assert!(term.transcript().contains("while away"), "{}", term.transcript());
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = audit(&ship, &["--session", &id]);
        if log
            .iter()
            .any(|e| e["action"] == "kill" && e["detail"].as_str().unwrap().contains("delivered later"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no late delivery in the audit log: {log:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
