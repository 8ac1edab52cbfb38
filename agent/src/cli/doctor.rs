//! `shelltrail doctor`: checks that this host records every session and
//! that nothing carries a session around the recording, and says how to fix
//! what it finds. `--json` for fleet tooling; the exit status is non-zero
//! when recording can be bypassed or is not working.
//!
//! What it reads is what takes effect: sshd's effective configuration
//! (`sshd -T`, per user with `-C`), the passwd database, the agent's socket
//! and spool. It changes nothing.

use crate::config::Config;
use anyhow::Result;
use std::path::PathBuf;
use std::process::Command;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Worth fixing; recording is not at stake.
    Warn,
    /// A session can escape the recording, in whole or in part.
    Bypass,
    /// Recording is not working.
    Fail,
}

/// One finding.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Status,
    pub detail: String,
    /// What to do; empty when all is well.
    pub fix: String,
}

fn finding(check: &str, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        check: check.into(),
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// Where sshd is.
#[derive(Debug, Clone)]
pub struct Options {
    pub sshd: PathBuf,
    pub sshd_config: PathBuf,
}

/// sshd's effective settings for a connection of `user`, lowercased keys.
fn sshd_settings(o: &Options, user: &str) -> Result<Vec<(String, String)>, String> {
    let out = Command::new(&o.sshd)
        .arg("-T")
        .arg("-f")
        .arg(&o.sshd_config)
        .arg("-C")
        .arg(format!("user={user},host=localhost,addr=127.0.0.1"))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", o.sshd.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect())
}

fn get<'a>(s: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    s.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

/// Login users: uid 1000 and up with a shell that is not nologin/false.
fn login_users() -> Vec<nix::unistd::User> {
    let Ok(text) = std::fs::read_to_string("/etc/passwd") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(':').next())
        .filter_map(|name| nix::unistd::User::from_name(name).ok().flatten())
        .filter(|u| u.uid.as_raw() >= 1000 && u.uid.as_raw() < 60000)
        .filter(|u| {
            let s = u.shell.to_string_lossy();
            !(s.ends_with("nologin") || s.ends_with("/false"))
        })
        .collect()
}

fn check_sshd(cfg: &Config, o: &Options, out: &mut Vec<Finding>) {
    let group_members = nix::unistd::Group::from_name(&cfg.shell.break_glass_group)
        .ok()
        .flatten()
        .map(|g| g.mem)
        .unwrap_or_default();
    // A user the break-glass Match does not apply to.
    let user = login_users()
        .into_iter()
        .map(|u| u.name)
        .find(|n| !group_members.contains(n))
        .unwrap_or_else(|| "root".into());
    let s = match sshd_settings(o, &user) {
        Ok(s) => s,
        Err(e) => {
            out.push(finding(
                "sshd.config",
                Status::Fail,
                format!("sshd's configuration does not load: {e}"),
                "fix sshd_config (sshd -t says where)",
            ));
            return;
        }
    };
    let force = get(&s, "forcecommand").first().copied().unwrap_or("none").to_string();
    if force.contains("shelltrail-shell") {
        out.push(finding(
            "sshd.forcecommand",
            Status::Ok,
            format!("ForceCommand {force} (for {user})"),
            "",
        ));
    } else {
        out.push(finding(
            "sshd.forcecommand",
            Status::Bypass,
            format!("sessions of {user} do not run the recorder (ForceCommand {force})"),
            "shelltrail enable",
        ));
    }
    if let Some(member) = group_members.first() {
        match sshd_settings(o, member) {
            Ok(bg)
                if get(&bg, "forcecommand")
                    .first()
                    .is_some_and(|c| c.contains("--break-glass")) =>
            {
                out.push(finding(
                    "sshd.break_glass",
                    Status::Ok,
                    format!("break-glass for {}", group_members.join(", ")),
                    "",
                ))
            }
            _ => out.push(finding(
                "sshd.break_glass",
                Status::Warn,
                format!(
                    "members of {} do not get the break-glass recorder: they are locked out while the agent is down",
                    cfg.shell.break_glass_group
                ),
                "shelltrail enable",
            )),
        }
    } else {
        out.push(finding(
            "sshd.break_glass",
            Status::Warn,
            format!(
                "the break-glass group {:?} has no members: nobody can log in while the agent is down",
                cfg.shell.break_glass_group
            ),
            format!("gpasswd -a ADMIN {}", cfg.shell.break_glass_group),
        ));
    }
    let yes = |k: &str| get(&s, k).first().is_some_and(|v| *v == "yes");
    let no = |k: &str| get(&s, k).first().is_none_or(|v| *v == "no");
    out.push(if yes("exposeauthinfo") {
        finding("sshd.exposeauthinfo", Status::Ok, "ExposeAuthInfo yes", "")
    } else {
        finding(
            "sshd.exposeauthinfo",
            Status::Warn,
            "ExposeAuthInfo is off: recordings do not say which key or certificate logged in",
            "ExposeAuthInfo yes (shelltrail enable sets it)",
        )
    });
    if yes("disableforwarding") {
        out.push(finding("sshd.forwarding", Status::Ok, "DisableForwarding yes", ""));
    } else {
        let open: Vec<&str> = [
            ("allowtcpforwarding", "TCP"),
            ("allowagentforwarding", "agent"),
            ("x11forwarding", "X11"),
            ("allowstreamlocalforwarding", "stream-local"),
        ]
        .into_iter()
        .filter(|(k, _)| !no(k))
        .map(|(_, what)| what)
        .collect();
        out.push(if open.is_empty() {
            finding("sshd.forwarding", Status::Ok, "no forwarding allowed", "")
        } else {
            finding(
                "sshd.forwarding",
                Status::Bypass,
                format!("{} forwarding carries data around the recording", open.join(", ")),
                "DisableForwarding yes (shelltrail enable sets it)",
            )
        });
    }
    for (key, what, fix) in [
        (
            "permittunnel",
            "tun/tap tunnels carry traffic around the recording",
            "PermitTunnel no",
        ),
        (
            "permituserenvironment",
            "~/.ssh/environment can set LD_PRELOAD for what sshd runs",
            "PermitUserEnvironment no",
        ),
        (
            "permituserrc",
            "~/.ssh/rc runs user code before the recorder",
            "PermitUserRC no",
        ),
    ] {
        out.push(if no(key) {
            finding(&format!("sshd.{key}"), Status::Ok, format!("{key} no"), "")
        } else {
            finding(
                &format!("sshd.{key}"),
                Status::Bypass,
                what,
                format!("{fix} (shelltrail enable sets it)"),
            )
        });
    }
    let dangerous: Vec<String> = get(&s, "acceptenv")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .filter(|p| {
            let p = p.to_ascii_uppercase();
            p == "*"
                || p.starts_with("LD_")
                || ["BASH_ENV", "ENV", "BASH_FUNC_*", "PATH", "SHELLOPTS"].contains(&p.as_str())
        })
        .map(str::to_string)
        .collect();
    out.push(if dangerous.is_empty() {
        finding(
            "sshd.acceptenv",
            Status::Ok,
            "AcceptEnv takes no variable that changes program loading",
            "",
        )
    } else {
        finding(
            "sshd.acceptenv",
            Status::Bypass,
            format!(
                "AcceptEnv {} lets the client change how the shell and programs load",
                dangerous.join(" ")
            ),
            "remove them from AcceptEnv (LANG LC_* is enough)",
        )
    });
}

fn check_login_shells(out: &mut Vec<Finding>) {
    let readers: Vec<String> = login_users()
        .into_iter()
        .filter(|u| {
            let s = u.shell.to_string_lossy();
            s.ends_with("/bash") || s.ends_with("/zsh")
        })
        .map(|u| format!("{} ({})", u.name, u.shell.display()))
        .collect();
    out.push(if readers.is_empty() {
        finding(
            "users.login_shell",
            Status::Ok,
            "no login user's shell reads their files before the recorder",
            "",
        )
    } else {
        finding(
            "users.login_shell",
            Status::Bypass,
            format!(
                "sshd runs the ForceCommand through the login shell, which reads the user's own files first \
                 (bash: ~/.bashrc for `bash -c`, zsh: ~/.zshenv): {}",
                readers.join(", ")
            ),
            "usermod -s /usr/bin/shelltrail-shell USER (the recorder then starts the real shell)",
        )
    });
}

fn check_agent(cfg: &Config, out: &mut Vec<Finding>) {
    use std::os::unix::fs::MetadataExt;
    match std::os::unix::net::UnixStream::connect(&cfg.socket) {
        Ok(_) => out.push(finding(
            "agent.socket",
            Status::Ok,
            format!("the agent answers at {}", cfg.socket.display()),
            "",
        )),
        Err(e) => out.push(finding(
            "agent.socket",
            Status::Fail,
            format!(
                "the agent does not answer at {}: {e}: logins are refused (break-glass aside)",
                cfg.socket.display()
            ),
            "systemctl start shelltrail-agent; journalctl -u shelltrail-agent",
        )),
    }
    let lock = cfg.spool_dir.join(crate::agent::spool::log::LOCK_FILE);
    let pid = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok());
    if let Some(pid) = pid
        && let Ok(md) = std::fs::metadata(format!("/proc/{pid}"))
    {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(md.uid()))
            .ok()
            .flatten()
            .map_or_else(|| md.uid().to_string(), |u| u.name);
        let spool_owner = std::fs::metadata(&cfg.spool_dir).map(|m| m.uid()).ok();
        out.push(if Some(md.uid()) == spool_owner {
            finding(
                "agent.user",
                Status::Ok,
                format!("the agent (pid {pid}) runs as {user}, who owns the spool"),
                "",
            )
        } else {
            finding(
                "agent.user",
                Status::Warn,
                format!(
                    "the agent (pid {pid}) runs as {user}, who does not own the spool {}",
                    cfg.spool_dir.display()
                ),
                "run it through systemctl (as shelltrail)",
            )
        });
    }
    if let Ok(st) = nix::sys::statvfs::statvfs(&cfg.spool_dir) {
        let free = st.blocks_available() * st.fragment_size();
        out.push(if free > cfg.agent.min_free_bytes {
            finding(
                "agent.spool_room",
                Status::Ok,
                format!("{} MiB free for the spool", free >> 20),
                "",
            )
        } else {
            finding(
                "agent.spool_room",
                Status::Fail,
                format!(
                    "{} MiB free, below min_free_bytes ({} MiB): new sessions are refused",
                    free >> 20,
                    cfg.agent.min_free_bytes >> 20
                ),
                "free space on the spool's filesystem, or check that the collector takes the backlog",
            )
        });
    }
    out.push(if cfg.shell.sftp_server.exists() {
        finding(
            "shell.sftp_server",
            Status::Ok,
            format!("{} exists", cfg.shell.sftp_server.display()),
            "",
        )
    } else {
        finding(
            "shell.sftp_server",
            Status::Warn,
            format!("{} does not exist: sftp sessions fail", cfg.shell.sftp_server.display()),
            "set [shell] sftp_server (RHEL: /usr/libexec/openssh/sftp-server)",
        )
    });
}

/// How long before a certificate's end doctor starts to warn.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// The collector this host ships to: its certificate's validity, and
/// whether a connection (mutual TLS) gets through now.
fn check_collector(cfg: &Config, out: &mut Vec<Finding>) {
    if cfg.ship.collector.is_empty() {
        out.push(finding(
            "ship.collector",
            Status::Ok,
            "no collector configured: recordings stay on this host",
            "",
        ));
        return;
    }
    if !cfg.ship.insecure {
        let now = crate::cli::now_ms() / 1000;
        for (what, path) in [("this host's certificate", &cfg.ship.cert), ("the CA", &cfg.ship.ca)] {
            let check = format!("ship.{}", if what.contains("CA") { "ca" } else { "cert" });
            out.push(match shelltrail_collector::tls::certificate_not_after(path) {
                Ok(end) if end <= now => finding(
                    &check,
                    Status::Fail,
                    format!(
                        "{what} {} expired {} days ago: shipping fails",
                        path.display(),
                        (now - end) / 86_400
                    ),
                    "issue a new one (shelltrail pki issue ... --role host) and restart the agent",
                ),
                Ok(end) if end - now < EXPIRY_WARNING_DAYS * 86_400 => finding(
                    &check,
                    Status::Warn,
                    format!("{what} {} expires in {} days", path.display(), (end - now) / 86_400),
                    "issue a new one before then",
                ),
                Ok(end) => finding(
                    &check,
                    Status::Ok,
                    format!(
                        "{what} {} is valid for {} more days",
                        path.display(),
                        (end - now) / 86_400
                    ),
                    "",
                ),
                Err(e) => finding(&check, Status::Fail, format!("{what}: {e}"), "fix [ship] ca/cert/key"),
            });
        }
    }
    let reached = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    crate::agent::collector_channel(&cfg.ship),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(shelltrail_collector::tls::with_causes(e.as_ref())),
                    Err(_) => Err("no answer within 10 s".into()),
                }
            })
        });
    out.push(match reached {
        Ok(()) => finding(
            "ship.reachable",
            Status::Ok,
            format!("the collector {} answers (mutual TLS)", cfg.ship.collector),
            "",
        ),
        Err(e) => finding(
            "ship.reachable",
            Status::Warn,
            format!(
                "the collector {} cannot be reached now ({e}): sessions wait in the spool",
                cfg.ship.collector
            ),
            "check the network, the collector and the certificates (journalctl -u shelltrail-agent says more)",
        ),
    });
}

/// Runs every check; prints them; the exit status (0 fine, 1 warnings, 2 a
/// bypass or a failure).
pub fn run(cfg: &Config, o: &Options, json: bool) -> Result<i32> {
    let mut out = Vec::new();
    check_sshd(cfg, o, &mut out);
    check_login_shells(&mut out);
    check_agent(cfg, &mut out);
    check_collector(cfg, &mut out);
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for f in &out {
            let tag = match f.status {
                Status::Ok => "ok    ",
                Status::Warn => "WARN  ",
                Status::Bypass => "BYPASS",
                Status::Fail => "FAIL  ",
            };
            println!("{tag} {:<24} {}", f.check, f.detail);
            if !f.fix.is_empty() {
                println!("       {:<24} fix: {}", "", f.fix);
            }
        }
    }
    let worst = out.iter().map(|f| f.status).fold(Status::Ok, |a, b| match (a, b) {
        (Status::Fail, _) | (_, Status::Fail) => Status::Fail,
        (Status::Bypass, _) | (_, Status::Bypass) => Status::Bypass,
        (Status::Warn, _) | (_, Status::Warn) => Status::Warn,
        _ => Status::Ok,
    });
    Ok(match worst {
        Status::Ok => 0,
        Status::Warn => 1,
        Status::Bypass | Status::Fail => 2,
    })
}
