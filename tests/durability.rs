//! The agent going away: killed mid-session, or absent at login.

use shelltrail_tests::{TIMEOUT, World, strip_ansi};
use std::time::Duration;

const LINES: u32 = 60;

/// Prints line-1 .. line-60 over about three seconds.
fn numbered_lines_command() -> String {
    format!("for i in $(seq 1 {LINES}); do echo line-$i; sleep 0.05; done")
}

/// Asserts that `text`, split into lines (CR removed), holds line-1 ..
/// line-N each exactly once and in order.
#[track_caller]
fn assert_each_line_once(text: &str) {
    // A terminal line may carry escape sequences (bash's bracketed-paste
    // switch precedes the first line of output) and carriage returns.
    let clean = strip_ansi(text);
    let got: Vec<&str> = clean
        .split('\n')
        .map(|l| l.trim_matches('\r'))
        .filter(|l| l.starts_with("line-"))
        .collect();
    let want: Vec<String> = (1..=LINES).map(|i| format!("line-{i}")).collect();
    assert_eq!(got, want, "recorded lines differ (lost or duplicated)");
}

/// SIGKILL the agent while an exec session prints, restart it: the session
/// goes on, and the recording has every line exactly once.
#[test]
fn agent_killed_mid_exec_session_loses_nothing() {
    let w = World::new();
    let ssh = w.ssh().command(&numbered_lines_command()).spawn();
    ssh.wait_stdout_contains("line-10\n", Duration::from_secs(20));
    w.kill_agent();
    // The session keeps running with the agent gone.
    ssh.wait_stdout_contains("line-25\n", Duration::from_secs(20));
    w.start_agent();
    let out = ssh.wait(TIMEOUT);
    out.assert_success();
    assert_each_line_once(&out.stdout_str());

    let s = w.only_session();
    assert!(!s.live, "{s:#?}");
    assert_eq!(s.exit_status, Some(0));
    assert_eq!(s.end_cause.as_deref(), Some("recorder"));
    assert_eq!(s.lost_chunks, 0);
    let cast = w.export(&s.id);
    assert_eq!(cast.output(), out.stdout_str());
    assert_each_line_once(&cast.output());
    assert_eq!((cast.last().code.as_str(), cast.last().data.as_str()), ("x", "0"));
    assert!(
        w.agent_log_text().contains("session resumed"),
        "the recorder did not resume its session:\n{}",
        w.agent_log_text()
    );
}

/// The same for an interactive session.
#[test]
fn agent_killed_mid_interactive_session_loses_nothing() {
    let w = World::new();
    let mut t = w.ssh().term(80, 24);
    t.wait_prompt();
    t.line(&numbered_lines_command());
    t.expect("line-10\r\n");
    w.kill_agent();
    t.expect("line-25\r\n");
    w.start_agent();
    t.expect(&format!("line-{LINES}\r\n"));
    t.line("exit 0");
    assert_eq!(t.wait_exit(Duration::from_secs(30)), 0, "{}", t.transcript());

    let s = w.only_session();
    assert!(!s.live, "{s:#?}");
    assert_eq!(s.exit_status, Some(0));
    assert_eq!(s.lost_chunks, 0);
    let cast = w.export(&s.id);
    assert_each_line_once(&cast.output());
    assert_eq!(
        String::from_utf8_lossy(&w.export_raw(&s.id)),
        t.transcript(),
        "the recording differs from what the terminal showed"
    );
}

/// `on_agent_unavailable = "deny"` (the default): no agent, no login, and
/// the user is told why.
#[test]
fn agent_down_at_login_denies() {
    let w = World::builder().agent_down().build();
    let marker = w.files.join("ran");
    let out = w
        .ssh()
        .command(&format!("touch {}; echo should-not-run", marker.display()))
        .run();
    out.assert_code(1);
    assert!(!out.stdout_str().contains("should-not-run"), "{out}");
    assert!(!marker.exists(), "the command ran without a recording");
    let err = out.stderr_str();
    assert!(err.contains("agent"), "the refusal does not mention the agent: {out}");
    assert!(err.contains("refused"), "{out}");

    // Interactive logins too.
    let mut t = w.ssh().term(80, 24);
    t.expect("agent");
    assert_eq!(t.wait_exit(Duration::from_secs(30)), 1, "{}", t.transcript());
}

/// `on_agent_unavailable = "allow"`: the session runs without the agent.
#[test]
fn agent_down_at_login_allowed_runs() {
    let w = World::builder()
        .agent_down()
        .shell("on_agent_unavailable = \"allow\"")
        .shell("close_timeout_secs = 1")
        .build();
    let out = w.ssh().command("echo allowed-run; exit 4").run();
    out.assert_code(4);
    assert_eq!(out.stdout, b"allowed-run\n", "{out}");
}

/// `on_agent_unavailable = "allow"` and the agent comes up while the
/// session runs: the session is delivered, whole.
#[test]
fn agent_started_during_allowed_session_receives_it() {
    let w = World::builder()
        .agent_down()
        .shell("on_agent_unavailable = \"allow\"")
        .build();
    let ssh = w.ssh().command("echo early; sleep 2; echo late").spawn();
    ssh.wait_stdout_contains("early\n", Duration::from_secs(20));
    w.start_agent();
    let out = ssh.wait(TIMEOUT);
    out.assert_success();
    assert_eq!(out.stdout, b"early\nlate\n", "{out}");

    let s = w.wait_session("the allowed session", Duration::from_secs(30), |r| {
        r.command.contains("echo late") && !r.live
    });
    assert_eq!(s.exit_status, Some(0), "{s:#?}");
    assert_eq!(s.lost_chunks, 0, "{s:#?}");
    let cast = w.export(&s.id);
    assert_eq!(cast.output(), "early\nlate\n");
}
