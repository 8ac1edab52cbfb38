//! Who and why: authentication details from sshd's ExposeAuthInfo, and the
//! reason `require_reason` asks for.

use shelltrail_tests::World;
use shelltrail_tests::world::fingerprint;
use std::path::PathBuf;
use std::time::Duration;

fn pubkey(key: &std::path::Path) -> PathBuf {
    PathBuf::from(format!("{}.pub", key.display()))
}

/// A plain key: its fingerprint is recorded as `ssh-keygen -l` prints it,
/// with the connection's addresses and the identity the agent verified.
#[test]
fn plain_key_metadata() {
    let w = World::new();
    w.ssh().command("true").run().assert_success();
    let s = w.only_session();
    let cast = w.export(&s.id);
    let m = cast.meta();
    let auth = &m["auth"];
    assert_eq!(auth["method"], "publickey", "{m:#}");
    assert_eq!(auth["key_type"], "ssh-ed25519", "{m:#}");
    assert_eq!(
        auth["key_fingerprint"].as_str(),
        Some(fingerprint(&pubkey(&w.client_key)).as_str()),
        "{m:#}"
    );
    assert_eq!(auth["cert_key_id"], "", "{m:#}");
    assert_eq!(m["user"], w.user.name.as_str());
    assert_eq!(m["uid"], w.user.uid);
    assert_eq!(m["verified_user"], w.user.name.as_str());
    assert_eq!(m["verified_uid"], w.user.uid);
    assert_eq!(m["client_addr"], "127.0.0.1");
    assert_eq!(m["server_port"], w.port());
    assert_eq!(s.client, format!("127.0.0.1:{}", m["client_port"]));
}

/// An OpenSSH user certificate: key id, principals, serial and both
/// fingerprints (the certified key's and the CA's).
#[test]
fn certificate_metadata() {
    let w = World::builder().user_ca().build();
    w.ssh().command("true").run().assert_success();
    let s = w.only_session();
    let cast = w.export(&s.id);
    let m = cast.meta();
    let auth = &m["auth"];
    assert_eq!(auth["method"], "publickey", "{m:#}");
    assert_eq!(auth["key_type"], "ssh-ed25519-cert-v01@openssh.com", "{m:#}");
    assert_eq!(auth["cert_key_id"], "alice@example", "{m:#}");
    let principals: Vec<&str> = auth["cert_principals"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
        .unwrap_or_default();
    assert!(principals.contains(&w.user.name.as_str()), "{m:#}");
    assert_eq!(
        auth["key_fingerprint"].as_str(),
        Some(fingerprint(&pubkey(&w.client_key)).as_str()),
        "{m:#}"
    );
    let ca = w.ca_pub.as_ref().expect("CA world");
    assert_eq!(
        auth["cert_ca_fingerprint"].as_str(),
        Some(fingerprint(ca).as_str()),
        "{m:#}"
    );
}

/// `require_reason`: a reason sent with `SendEnv` is recorded.
#[test]
fn reason_sent_by_the_client_is_recorded() {
    let w = World::builder().shell("require_reason = true").build();
    let out = w
        .ssh()
        .env("LC_SHELLTRAIL_REASON", "TICKET-4711")
        .send_env("LC_SHELLTRAIL_REASON")
        .command("echo with-reason")
        .run();
    out.assert_success();
    assert_eq!(out.stdout, b"with-reason\n");
    let s = w.only_session();
    assert_eq!(s.reason, "TICKET-4711");
    assert_eq!(w.export(&s.id).meta()["reason"], "TICKET-4711");
}

/// `require_reason` without a reason: a non-interactive session is refused,
/// with a message that says how to give one, and nothing runs.
#[test]
fn missing_reason_refuses_exec_sessions() {
    let w = World::builder().shell("require_reason = true").build();
    let marker = w.files.join("ran");
    let out = w
        .ssh()
        .command(&format!("touch {}; echo should-not-run", marker.display()))
        .run();
    assert_ne!(out.code(), 0, "{out}");
    assert!(!out.stdout_str().contains("should-not-run"), "{out}");
    assert!(!marker.exists(), "the command ran without a reason");
    let err = out.stderr_str();
    assert!(err.contains("reason"), "{out}");
    assert!(
        err.contains("LC_SHELLTRAIL_REASON"),
        "the refusal does not say how: {out}"
    );
    assert!(w.sessions().is_empty(), "{:#?}", w.sessions());
}

/// `require_reason` in an interactive session: the recorder asks for it.
#[test]
fn interactive_session_is_asked_for_a_reason() {
    let w = World::builder().shell("require_reason = true").build();
    let mut t = w.ssh().term(80, 24);
    t.expect("Reason for this session");
    t.line("CHG-1234");
    t.line("echo in-$((5+5))");
    t.expect("in-10");
    t.line("exit");
    assert_eq!(t.wait_exit(Duration::from_secs(30)), 0, "{}", t.transcript());
    let s = w.only_session();
    assert_eq!(s.reason, "CHG-1234");
    assert_eq!(s.mode, "pty");
}
