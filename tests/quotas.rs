//! Spool quotas on every chunk, with a real sshd: one user's session that
//! writes as fast as it can (`base64 /dev/urandom`) is held at its user's
//! quota and, under `on_agent_unavailable = "deny"`, ended with a message;
//! under "allow" it runs on and its recording names the gap. Meanwhile
//! another user logs in and is recorded.

use shelltrail_tests::{SessionRow, TestUser, World, poll_until};
use std::time::Duration;

#[track_caller]
fn wait_log(w: &World, text: &str, timeout: Duration) {
    let found = poll_until(timeout, || w.agent_log_text().contains(text).then_some(()));
    assert!(
        found.is_some(),
        "the agent logged nothing about {text:?} within {timeout:?}:\n{}",
        w.agent_log_text()
    );
}

/// The session whose command is `command`.
#[track_caller]
fn by_command(w: &World, command: &str) -> SessionRow {
    let all = w.sessions();
    all.iter()
        .find(|r| r.command == command)
        .cloned()
        .unwrap_or_else(|| panic!("no session running {command:?}: {all:#?}"))
}

/// Another user logs in while the hog is held, and is recorded in full.
#[track_caller]
fn another_user_is_recorded(w: &World, word: &str) {
    let cmd = format!("echo {word}-$((6*7))");
    let out = w.ssh().command(&cmd).run();
    out.assert_success();
    assert_eq!(out.stdout_str(), format!("{word}-42\n"), "{out}");
    let s = by_command(w, &cmd);
    assert!(!s.live && s.exit_status == Some(0) && s.lost_chunks == 0, "{s:#?}");
    assert_eq!(w.export(&s.id).output(), format!("{word}-42\n"));
}

const QUOTA: u64 = 4 << 20;

#[test]
fn a_spool_hog_is_stopped_while_another_user_logs_in_and_is_recorded() {
    let hog = TestUser::dedicated("shelltrail-e2e-hog");
    let w = World::builder()
        .agent_setting(&format!("spool_max_bytes_per_uid = {QUOTA}"))
        .agent_setting("quota_wait_secs = 8")
        .build();

    let running = w.ssh().as_user(&hog.name).command("base64 /dev/urandom").spawn();
    wait_log(&w, "session held from chunk", Duration::from_secs(60));
    // Held, the hog's output waits; the other user is not held back.
    another_user_is_recorded(&w, "other");

    // After quota_wait_secs the agent ends the hog's recording and the
    // recorder ends the session, telling the user why.
    let out = running.wait(Duration::from_secs(60));
    assert_ne!(out.code(), 0, "{out}");
    let err = out.stderr_str();
    assert!(
        err.contains("stopped recording this session") && err.contains("spool_max_bytes_per_uid"),
        "{out}"
    );
    let s = by_command(&w, "base64 /dev/urandom");
    assert!(!s.live, "{s:#?}");
    let cause = s.end_cause.clone().unwrap_or_default();
    assert!(
        cause.starts_with("stopped by the agent") && cause.contains("spool_max_bytes_per_uid"),
        "{s:#?}"
    );
    assert!(s.stored_bytes <= QUOTA, "{s:#?}");
    // The recorder's own end record made it: the exit status of the killed
    // command, and what reached the client beyond what was stored.
    assert_eq!(s.exit_status, Some(128 + 15), "{s:#?}");
    assert_eq!(s.bytes_out, out.stdout.len() as u64, "{s:#?}");
    assert!(s.lost_chunks > 0, "{s:#?}");
    eprintln!(
        "hog: {} bytes reached the client, {} bytes of recording stored (quota {QUOTA}), {} chunks named lost",
        out.stdout.len(),
        s.stored_bytes,
        s.lost_chunks
    );
    // What was recorded is what the client saw first, in order.
    let recorded = w.export_raw(&s.id);
    assert!(
        !recorded.is_empty() && out.stdout.starts_with(&recorded),
        "the recording is not a prefix of the output"
    );

    // The hog's user has less than a chunk of its quota left: its next
    // login is refused, with the reason.
    let again = w.ssh().as_user(&hog.name).command("echo again").run();
    assert_ne!(again.code(), 0, "{again}");
    assert!(again.stderr_str().contains("spool_max_bytes_per_uid"), "{again}");
    // Others still log in.
    another_user_is_recorded(&w, "still");
}

#[test]
fn under_allow_a_hog_runs_on_and_its_recording_names_the_gap() {
    let hog = TestUser::dedicated("shelltrail-e2e-hog2");
    let w = World::builder()
        .shell("on_agent_unavailable = \"allow\"")
        .agent_setting(&format!("spool_max_bytes_per_uid = {QUOTA}"))
        .build();

    // 420000 lines of 76 characters.
    let cmd = "head -c 23940000 /dev/urandom | base64; echo done-$((1+1))";
    let running = w.ssh().as_user(&hog.name).command(cmd).spawn();
    wait_log(&w, "session held from chunk", Duration::from_secs(60));
    another_user_is_recorded(&w, "other");

    let out = running.wait(Duration::from_secs(120));
    out.assert_success();
    // The session ran to its end: all of its output reached the client.
    assert_eq!(out.stdout.len(), 420_000 * 77 + "done-2\n".len(), "{out}");
    assert!(out.stdout.ends_with(b"done-2\n"));
    let s = by_command(&w, cmd);
    assert!(!s.live && s.exit_status == Some(0), "{s:#?}");
    assert!(s.lost_chunks > 0, "no gap recorded: {s:#?}");
    let cause = s.end_cause.clone().unwrap_or_default();
    assert!(
        cause.contains("not stored") && cause.contains("spool_max_bytes_per_uid"),
        "{s:#?}"
    );
    assert!(s.stored_bytes <= QUOTA, "{s:#?}");
    eprintln!(
        "allowed hog: {} bytes to the client, {} stored (quota {QUOTA}), {} chunks named lost",
        out.stdout.len(),
        s.stored_bytes,
        s.lost_chunks
    );
}
