//! `shelltrail demo`: the whole host path in one command, without root or
//! sshd. An agent with its spool in a new temporary directory, and a recorded
//! shell in the current terminal; afterwards, how to play it back.

use crate::config::Config;
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
    let config_path = dir.join("shelltrail.toml");
    let text = format!(
        "# Written by `shelltrail demo`.\nsocket = {:?}\nspool_dir = {:?}\n\n[shell]\non_agent_unavailable = \"deny\"\n",
        dir.join("agent.sock"),
        dir.join("spool")
    );
    std::fs::write(&config_path, text)?;
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644))?;
    let cfg = Config::load(Some(&config_path))?;

    let shell_bin = match shell_bin {
        Some(p) => p,
        None => sibling("shelltrail-shell")?,
    };

    // The agent, in this process.
    let agent_cfg = cfg.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.spawn(async move {
        if let Err(e) = crate::agent::run(agent_cfg).await {
            eprintln!("shelltrail demo: agent failed: {e:#}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cfg.socket.exists() {
        if Instant::now() > deadline {
            bail!("the demo agent did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    eprintln!("shelltrail demo: recording a shell. Type `exit` to end it.");
    // Not an SSH session: drop sshd's variables if the demo itself runs in one.
    let status = std::process::Command::new(&shell_bin)
        .arg("--config")
        .arg(&config_path)
        .env_remove("SSH_CONNECTION")
        .env_remove("SSH_ORIGINAL_COMMAND")
        .env_remove("SSH_USER_AUTH")
        .status()
        .with_context(|| format!("starting {}", shell_bin.display()))?;

    let rows = crate::cli::Source::open(&cfg, None)?.list()?;
    let Some(s) = rows.last() else {
        bail!("no session was recorded (exit status {status})");
    };
    let me = std::env::current_exe().unwrap_or_else(|_| "shelltrail".into());
    let cfg_arg = config_path.display();
    let mut err = std::io::stderr();
    writeln!(err, "\nshelltrail demo: recorded session {}", s.id)?;
    writeln!(err, "  list it:   {} --config {cfg_arg} sessions", me.display())?;
    writeln!(err, "  play it:   {} --config {cfg_arg} play {}", me.display(), s.id)?;
    writeln!(
        err,
        "  export it: {} --config {cfg_arg} export {} -o demo.cast",
        me.display(),
        s.id
    )?;
    writeln!(err, "  (spool and config are kept in {})", dir.display())?;
    drop(rt);
    Ok(status.code().unwrap_or(1))
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
