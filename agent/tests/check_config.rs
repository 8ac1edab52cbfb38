//! `shelltrail agent --check-config`, the unit's `ExecStartPre`: a config
//! that cannot be read stops the service; shipping that cannot work is a
//! warning with what to fix (the agent must still start: without it every
//! login is refused, and it records into its spool meanwhile); a good config
//! is printed back in effect.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn check(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shelltrail"))
        .arg("--config")
        .arg(config)
        .args(["agent", "--check-config"])
        .output()
        .expect("running shelltrail")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A config in `dir` shipping to `url` with a host certificate from a fresh CA.
fn setup(dir: &Path, url: &str) -> PathBuf {
    let ca = shelltrail::pki::Ca::create(&dir.join("pki"), "test CA").expect("a CA");
    let (cert, key) = ca
        .issue("web-01", &["web-01".to_string()], shelltrail::pki::CertRole::Host)
        .expect("a host certificate");
    let config = dir.join("shelltrail.toml");
    std::fs::write(
        &config,
        format!(
            "socket = \"{d}/agent.sock\"\nspool_dir = \"{d}/spool\"\n[ship]\ncollector = \"{url}\"\n\
             ca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            d = dir.display(),
            ca = ca.cert_path().display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    config
}

#[test]
fn a_good_config_is_printed_back_in_effect() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "https://collector.example:7443");
    let out = check(&config);
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.starts_with("# configuration OK"), "{printed}");
    // Defaults included, and the printout is itself a valid config.
    assert!(printed.contains("compression_level = 1"), "{printed}");
    let again = dir.path().join("again.toml");
    std::fs::write(&again, &printed).unwrap();
    let out = check(&again);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn shipping_that_cannot_work_is_a_warning_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let warned = |o: &Output, what: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{}", text(o));
        assert!(
            err.starts_with("warning: [ship]: ") && err.contains(what),
            "{}",
            text(o)
        );
        assert!(err.contains("records into its spool"), "{}", text(o));
    };

    let config = setup(&dir.path().join("a"), "collector.example:7443");
    warned(&check(&config), "the URL must start with https://");

    let config = setup(&dir.path().join("b"), "https://collector.example:7443");
    let key = dir.path().join("b/pki/web-01.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    warned(&check(&config), "web-01.key is open to other users (mode 0640");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    std::fs::remove_file(dir.path().join("b/pki/ca.pem")).unwrap();
    let out = check(&config);
    warned(&out, "ca.pem");
    // The cause once, not once per level of the error chain.
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .matches("No such file or directory")
            .count(),
        1,
        "{}",
        text(&out)
    );
}

#[test]
fn a_config_that_cannot_be_read_stops_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shelltrail.toml");
    std::fs::write(&config, "[ship]\ncolector = \"https://typo.example\"\n").unwrap();
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("colector"),
        "{}",
        text(&out)
    );
}
