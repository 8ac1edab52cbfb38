//! `shelltrail demo`: the whole path in one command, without root or sshd.
//!
//! In a new temporary directory: a certificate authority and certificates
//! (`shelltrail pki`), a collector on a loopback port with mutual TLS, an
//! agent that ships to it, and a recorded shell in the current terminal.
//! When the shell exits, the session is listed from the collector and the
//! commands to play it back are printed.

use crate::cli::{CollectorArgs, Source};
use crate::config::Config;
use crate::pki::{Ca, CertRole};
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn run(shell_bin: Option<PathBuf>) -> Result<i32> {
    let dir = tempfile::Builder::new()
        .prefix("shelltrail-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let dir = dir.keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;

    // Mutual TLS for real, with throwaway certificates.
    let pki = dir.join("pki");
    let ca = Ca::create(&pki, "shelltrail demo CA")?;
    ca.issue(
        "collector",
        &["localhost".into(), "127.0.0.1".into()],
        CertRole::Collector,
    )?;
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "demo-host".into());
    let host = if shelltrail_collector::valid_host(&host) {
        host
    } else {
        "demo-host".into()
    };
    let (host_cert, host_key) = ca.issue("host", std::slice::from_ref(&host), CertRole::Host)?;
    let (op_cert, op_key) = ca.issue("operator", &["operator".into()], CertRole::Operator)?;
    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}");

    let config_path = dir.join("shelltrail.toml");
    let text = format!(
        "# Written by `shelltrail demo`.\n\
         socket = {sock:?}\nspool_dir = {spool:?}\nfallback_dir = {fallback:?}\n\n\
         [shell]\non_agent_unavailable = \"deny\"\n\n\
         [ship]\ncollector = {url:?}\nca = {ca:?}\ncert = {hc:?}\nkey = {hk:?}\n\n\
         [collector]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {data:?}\noperators = [\"operator\"]\n\n\
         [collector.tls]\ncert = {cc:?}\nkey = {ck:?}\nclient_ca = {ca:?}\n",
        sock = dir.join("agent.sock"),
        spool = dir.join("spool"),
        fallback = dir.join("fallback"),
        ca = ca.cert_path(),
        hc = host_cert,
        hk = host_key,
        data = dir.join("collector"),
        cc = pki.join("collector.pem"),
        ck = pki.join("collector.key"),
    );
    std::fs::write(&config_path, text)?;
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644))?;
    let cfg = Config::load(Some(&config_path))?;
    let shell_bin = match shell_bin {
        Some(p) => p,
        None => sibling("shelltrail-shell")?,
    };

    // The collector and the agent, in this process.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let collector_cfg = cfg.collector.clone().context("demo config has a [collector] table")?;
    rt.spawn(async move {
        if let Err(e) = shelltrail_collector::serve(collector_cfg, std::future::pending()).await {
            eprintln!("shelltrail demo: collector failed: {e:#}");
        }
    });
    let agent_cfg = cfg.clone();
    rt.spawn(async move {
        if let Err(e) = crate::agent::run(agent_cfg).await {
            eprintln!("shelltrail demo: agent failed: {e:#}");
        }
    });
    wait_for("the demo agent", || cfg.socket.exists())?;

    eprintln!("shelltrail demo: recording a shell (shipped to the collector at {url}). Type `exit` to end it.");
    // Not an SSH session: drop sshd's variables if the demo itself runs in one.
    let status = std::process::Command::new(&shell_bin)
        .arg("--config")
        .arg(&config_path)
        .env_remove("SSH_CONNECTION")
        .env_remove("SSH_ORIGINAL_COMMAND")
        .env_remove("SSH_USER_AUTH")
        .status()
        .with_context(|| format!("starting {}", shell_bin.display()))?;

    let Some(id) = Source::open(&cfg, None)?.list()?.last().map(|r| r.id.clone()) else {
        bail!("no session was recorded (exit status {status})");
    };
    let operator = CollectorArgs {
        url: url.clone(),
        ca: None,
        cert: Some(op_cert.clone()),
        key: Some(op_key.clone()),
        insecure: false,
    };
    // The agent ships within moments; wait until the collector has the end.
    let mut err = std::io::stderr();
    let mut shipped = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(rows) = Source::open(&cfg, Some(&operator)).and_then(|mut s| s.list())
            && rows.iter().any(|r| r.id == id && !r.live)
        {
            writeln!(err, "\nshelltrail demo: the collector holds the session:")?;
            crate::cli::sessions::run(&rows, false, &mut err)?;
            shipped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !shipped {
        writeln!(
            err,
            "\nshelltrail demo: the session did not reach the collector in time; it is in the spool"
        )?;
    }
    let me = std::env::current_exe().unwrap_or_else(|_| "shelltrail".into());
    let cfg_arg = config_path.display();
    writeln!(err, "\nshelltrail demo: recorded session {id}")?;
    writeln!(err, "  list it:   {} --config {cfg_arg} sessions", me.display())?;
    writeln!(err, "  play it:   {} --config {cfg_arg} play {id}", me.display())?;
    writeln!(
        err,
        "  export it: {} --config {cfg_arg} export {id} -o demo.cast",
        me.display()
    )?;
    writeln!(err, "  verify it: {} --config {cfg_arg} verify {id}", me.display())?;
    writeln!(
        err,
        "  (the collector and agent stop now; the spool, the collector's data and the certificates stay in {})",
        dir.display()
    )?;
    drop(rt);
    Ok(status.code().unwrap_or(1))
}

fn wait_for(what: &str, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A binary installed next to this one.
pub fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating this executable")?;
    let p = me.parent().unwrap_or(Path::new("/")).join(name);
    if !p.exists() {
        bail!(
            "{} not found next to {}; build it with `cargo build --bins`",
            name,
            me.display()
        );
    }
    Ok(p)
}
