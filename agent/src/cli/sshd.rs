//! `shelltrail enable` / `disable`: switch recording on and off in sshd, as
//! one drop-in file (`/etc/ssh/sshd_config.d/shelltrail.conf`), checked by
//! sshd itself before sshd is reloaded.
//!
//! A drop-in rather than lines appended to `sshd_config`: appended lines land
//! inside whatever `Match` block ends that file, and a package cannot undo an
//! edit made to a file the administrator owns. Debian and RHEL both read
//! `sshd_config.d/*.conf` first, and the first value sshd reads wins.
//!
//! The file is written from the template the packages ship
//! (`packaging/sshd/shelltrail.conf`, built in here), `sshd -t` must accept
//! the whole configuration with it, and `sshd -T` must show that it took
//! effect (a `sshd_config` without the `Include` ignores it); otherwise the
//! previous state is put back and the command says why.

use crate::config::Config;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The drop-in's template; `@SHELL@` and `@BREAK_GLASS_GROUP@` are filled in.
pub const TEMPLATE: &str = include_str!("../../../packaging/sshd/shelltrail.conf");
/// The drop-in's file name in sshd's drop-in directory.
pub const DROPIN: &str = "shelltrail.conf";

/// Where sshd and its configuration are (the defaults are Debian's and RHEL's).
#[derive(Debug, Clone)]
pub struct Sshd {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub dropin_dir: PathBuf,
    /// What sshd runs: the recorder, with its options.
    pub recorder: String,
    /// Reload sshd after the change (systemd's ssh or sshd unit).
    pub reload: bool,
}

impl Sshd {
    fn dropin(&self) -> PathBuf {
        self.dropin_dir.join(DROPIN)
    }

    /// `sshd -t`: the whole configuration parses; sshd's own words if not.
    fn check(&self) -> Result<(), String> {
        let out = Command::new(&self.binary)
            .arg("-t")
            .arg("-f")
            .arg(&self.config)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// sshd's effective `forcecommand` for a connection of `user`.
    fn force_command(&self, user: &str) -> Result<String, String> {
        let out = Command::new(&self.binary)
            .arg("-T")
            .arg("-f")
            .arg(&self.config)
            .arg("-C")
            .arg(format!("user={user},host=localhost,addr=127.0.0.1"))
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("forcecommand ").map(str::to_string))
            .unwrap_or_default())
    }

    fn reload_sshd(&self) -> Result<()> {
        if !self.reload {
            println!("sshd not reloaded (--no-reload): reload it to apply the change");
            return Ok(());
        }
        for unit in ["ssh.service", "sshd.service"] {
            let ok = Command::new("systemctl")
                .args(["reload", unit])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                println!("reloaded {unit}");
                return Ok(());
            }
        }
        bail!(
            "the configuration is in place, but neither ssh.service nor sshd.service could be reloaded: reload sshd yourself"
        )
    }
}

/// The drop-in for this configuration.
pub fn render(cfg: &Config, sshd: &Sshd) -> String {
    TEMPLATE
        .replace("@SHELL@", &sshd.recorder)
        .replace("@BREAK_GLASS_GROUP@", &cfg.shell.break_glass_group)
}

/// Writes `text` to `path` atomically (0644, root's).
fn write(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("conf.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))
}

/// Puts back what was at `path` before (`None`: nothing).
fn restore(path: &Path, before: Option<&str>) {
    let _ = match before {
        Some(text) => write(path, text),
        None => std::fs::remove_file(path).map_err(Into::into),
    };
}

/// `shelltrail enable`.
pub fn enable(cfg: &Config, sshd: &Sshd) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("enable changes sshd's configuration: run it as root");
    }
    let group = &cfg.shell.break_glass_group;
    let members = match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Some(g.mem),
        _ => None,
    };
    std::fs::create_dir_all(&sshd.dropin_dir).with_context(|| format!("creating {}", sshd.dropin_dir.display()))?;
    let path = sshd.dropin();
    let before = std::fs::read_to_string(&path).ok();
    write(&path, &render(cfg, sshd))?;
    if let Err(why) = sshd.check() {
        restore(&path, before.as_deref());
        bail!(
            "sshd does not accept its configuration with {} (put back as it was): {why}",
            path.display()
        );
    }
    // A user no break-glass Match applies to (root is rarely in the group).
    let effective = sshd.force_command("root");
    if effective.as_deref() != Ok(sshd.recorder.as_str())
        && members.as_ref().is_none_or(|m| !m.contains(&"root".into()))
    {
        restore(&path, before.as_deref());
        let got = match effective {
            Ok(c) if c.is_empty() => "no ForceCommand".to_string(),
            Ok(c) => format!("ForceCommand {c}"),
            Err(e) => e,
        };
        bail!(
            "sshd does not use {} ({got}): its configuration {} must read the drop-in directory. Add \
             `Include {}/*.conf` at the top of it (Debian and RHEL ship it there), then run enable again",
            path.display(),
            sshd.config.display(),
            sshd.dropin_dir.display()
        );
    }
    println!(
        "wrote {}: every SSH session now runs through the recorder",
        path.display()
    );
    match members {
        None => println!(
            "warning: the break-glass group {group:?} does not exist: nobody can log in while the agent is down. \
             Create it (groupadd --system {group}) and add the administrators who must always get in"
        ),
        Some(m) if m.is_empty() => println!(
            "warning: the break-glass group {group:?} has no members: nobody can log in while the agent is down \
             (gpasswd -a ADMIN {group})"
        ),
        Some(m) => println!("break-glass (recorded, logged): {}", m.join(", ")),
    }
    sshd.reload_sshd()
}

/// `shelltrail disable`.
pub fn disable(sshd: &Sshd) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("disable changes sshd's configuration: run it as root");
    }
    let path = sshd.dropin();
    let before = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "{} is not there: recording was not switched on by enable",
                path.display()
            );
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    if let Err(why) = sshd.check() {
        restore(&path, Some(&before));
        bail!(
            "sshd does not accept its configuration without {} (put back): {why}",
            path.display()
        );
    }
    println!(
        "removed {}: sessions are no longer recorded (unless sshd_config or a login shell still runs the recorder)",
        path.display()
    );
    sshd.reload_sshd()
}

/// Says what removing the package leaves behind, and where: recordings
/// are evidence and keys are keys, removed only by hand.
fn kept(cfg: &Config) {
    let rows = crate::cli::Source::open(cfg, None).and_then(|mut s| {
        s.read_for("");
        s.list()
    });
    match rows {
        Ok(rows) => {
            let unshipped = rows.iter().filter(|r| !r.shipped && !r.live).count();
            let live = rows.iter().filter(|r| r.live).count();
            println!(
                "shelltrail: the package's removal keeps the spool {} ({} sessions: {unshipped} ended and not \
                 shipped to a collector, {live} live), the signing key {}, break-glass files in {}, and the \
                 TLS keys in /etc/shelltrail/tls; remove them by hand once they are no longer needed",
                cfg.spool_dir.display(),
                rows.len(),
                cfg.signing_key().display(),
                cfg.fallback_dir().display()
            );
            if unshipped > 0 {
                println!(
                    "shelltrail: {unshipped} recorded sessions exist only in {}: ship or export them first if they matter",
                    cfg.spool_dir.display()
                );
            }
        }
        Err(e) => println!(
            "shelltrail: the package's removal keeps the spool {} (it cannot be read now: {e:#}), the signing \
             key and the TLS keys in /etc/shelltrail/tls",
            cfg.spool_dir.display()
        ),
    }
}

/// Users whose login shell (in `passwd`) is `binary`, the recorder being removed.
fn recorder_shell_users(passwd: &Path, binary: &str) -> Vec<String> {
    std::fs::read_to_string(passwd)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 7 && f[6].trim() == binary).then(|| f[0].to_string())
        })
        .collect()
}

/// `disable --package-removal`, run by the packages before they remove
/// the recorder: undoes what `enable` set up, and refuses (non-zero) when
/// the recorder is still wired in some other way, since removing it would
/// lock those logins out (sshd runs a ForceCommand or login shell that no
/// longer exists). Says what to undo; `SHELLTRAIL_FORCE_REMOVE=1` in the
/// packages' environment skips this.
pub fn release(cfg: &Config, sshd: &Sshd, passwd: &Path) -> Result<()> {
    let path = sshd.dropin();
    let before = std::fs::read_to_string(&path).ok();
    if before.is_some() {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    // The binary the removal takes away: what must no longer be run.
    let binary = sshd.recorder.split_whitespace().next().unwrap_or_default().to_string();
    let mut wired = Vec::new();
    match sshd.force_command("root") {
        Ok(c) if c.split_whitespace().next() == Some(binary.as_str()) => wired.push(format!(
            "sshd still runs `ForceCommand {c}` from {} (or a file it includes): remove that line",
            sshd.config.display()
        )),
        Ok(_) => {}
        // No sshd, or a configuration it refuses: nothing of ours to check.
        Err(_) => {}
    }
    let users = recorder_shell_users(passwd, &binary);
    if !users.is_empty() {
        wired.push(format!(
            "the login shell of {} is the recorder: `usermod -s /bin/bash USER` for each",
            users.join(", ")
        ));
    }
    if !wired.is_empty() {
        if let Some(text) = &before {
            restore(&path, Some(text));
        }
        bail!(
            "refusing to remove the recorder: logins that run it would fail once it is gone, and could lock \
             you out of this host. {}. Then remove the package again (or set SHELLTRAIL_FORCE_REMOVE=1 to \
             remove it anyway)",
            wired.join("; ")
        );
    }
    kept(cfg);
    if before.is_some() {
        println!("removed {}: sshd no longer runs the recorder", path.display());
        // The removal goes on: refusing it would not make sshd reload.
        if let Err(e) = sshd.reload_sshd() {
            eprintln!(
                "shelltrail: WARNING: {e:#}. Until sshd rereads its configuration it still runs the recorder, \
                 which is being removed: reload it now"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_template_names_the_recorder_and_the_group_everywhere() {
        let cfg = crate::config::Config::default();
        let sshd = super::Sshd {
            binary: "/usr/sbin/sshd".into(),
            config: "/etc/ssh/sshd_config".into(),
            dropin_dir: "/etc/ssh/sshd_config.d".into(),
            recorder: "/usr/bin/shelltrail-shell".into(),
            reload: false,
        };
        let text = super::render(&cfg, &sshd);
        assert!(!text.contains('@'), "{text}");
        assert!(text.contains("ForceCommand /usr/bin/shelltrail-shell\n"));
        assert!(
            text.contains(
                "Match Group shelltrail-breakglass\n    ForceCommand /usr/bin/shelltrail-shell --break-glass"
            )
        );
        assert!(text.trim_end().ends_with("Match all"));
    }
}
