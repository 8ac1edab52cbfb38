//! What a fleet rollout must never get wrong (issue 13): one agent per
//! spool, and never root on the service's spool; ...

use shelltrail_tests::proc::run;
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
