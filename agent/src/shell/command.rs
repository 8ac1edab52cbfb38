//! Deciding what the recorder runs, from how sshd started it.
//!
//! sshd starts `shelltrail-shell` in one of three ways:
//! * as the ForceCommand (through the user's login shell: `sh -c "shelltrail-shell ..."`):
//!   the user's request is in `SSH_ORIGINAL_COMMAND` (exec and subsystem requests) or absent (shell);
//! * as the user's login shell for a shell request: argv[0] starts with `-`, no arguments;
//! * as the user's login shell for an exec request: `shelltrail-shell -c CMD`. When the
//!   ForceCommand is shelltrail-shell too, CMD is that ForceCommand line: the
//!   session is recorded once, by this process, with that line's options.
//!
//! File transfers (scp, sftp-server, rsync --server) are recognised only when the
//! command is exactly such a program with server-side flags and no shell syntax at
//! all; they are then exec'd directly, without a shell, so nothing can ride along.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Name the binary is installed under.
pub const SELF_NAME: &str = "shelltrail-shell";

/// What the recorder's own command line asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Invocation {
    /// `--config PATH`
    pub config: Option<PathBuf>,
    /// `-c CMD`: started as a login shell for an exec request (or for a ForceCommand).
    pub command: Option<String>,
    /// argv[0] began with `-`: started as a login shell.
    pub login: bool,
    /// `--break-glass`: the sshd drop-in's `Match Group` for the break-glass
    /// group (see `shell::fallback`).
    pub break_glass: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("usage: shelltrail-shell [--config PATH] [--break-glass] [-c COMMAND] (got {0:?})")]
    Usage(String),
}

/// Parses the recorder's argv. Deliberately tiny and strict: sshd and root
/// write this command line, and anything unexpected is refused rather than guessed.
pub fn parse_args(args: &[OsString]) -> Result<Invocation, UsageError> {
    let mut inv = Invocation {
        login: args
            .first()
            .and_then(|a| a.to_str())
            .is_some_and(|a| a.starts_with('-')),
        ..Default::default()
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        match s.as_ref() {
            "--config" => {
                let v = it
                    .next()
                    .ok_or_else(|| UsageError::Usage("--config needs a path".into()))?;
                inv.config = Some(PathBuf::from(v));
            }
            "-c" => {
                let v = it
                    .next()
                    .ok_or_else(|| UsageError::Usage("-c needs a command".into()))?;
                inv.command = Some(v.to_string_lossy().into_owned());
                // A shell ignores anything after the command string (it becomes $0, $1...).
                break;
            }
            // `bash -l`-style flag some tools pass to a login shell.
            "-l" | "--login" => inv.login = true,
            "--break-glass" => inv.break_glass = true,
            other => return Err(UsageError::Usage(other.to_string())),
        }
    }
    // sshd runs "shelltrail-shell -c '<ForceCommand>'" when the wrapper is both
    // the login shell and the ForceCommand: take that line's own options and
    // record once. Options in it are root's (sshd_config); the config file they
    // name must still pass the ownership check, so a user who sends this text as
    // an exec request gains nothing.
    if let Some(cmd) = &inv.command {
        let words: Vec<&str> = cmd.split_ascii_whitespace().collect();
        if words.first().is_some_and(|w| is_self(w)) {
            let inner: Vec<OsString> = words.iter().map(OsString::from).collect();
            let mut nested = parse_args(&inner)?;
            nested.login = inv.login;
            nested.break_glass |= inv.break_glass;
            return Ok(nested);
        }
    }
    Ok(inv)
}

fn is_self(word: &str) -> bool {
    Path::new(word).file_name().is_some_and(|n| n == SELF_NAME)
}

/// What to run, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Program to exec.
    pub program: PathBuf,
    /// argv[0] (e.g. "-bash" for a login shell).
    pub arg0: String,
    pub args: Vec<String>,
    /// The command as the user asked for it (for the metadata), or None for a shell.
    pub requested: Option<String>,
    /// A recognised file transfer: summarise instead of recording the payload.
    pub transfer: Option<Transfer>,
    /// The user's real shell, never shelltrail-shell: the child's `$SHELL`, so
    /// that programs starting `$SHELL` (script, vim's `:sh`, tmux) run a shell,
    /// not a second recorder.
    pub shell: PathBuf,
    /// The command came from `SSH_ORIGINAL_COMMAND` (we are the ForceCommand):
    /// it is consumed, and the child does not see the variable, as it would
    /// not had sshd run the command itself. A command from `-c` (we are the
    /// login shell, maybe under a `command="..."` key) leaves it for the
    /// program that reads it (rrsync, gitolite).
    pub consumes_original: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    Scp,
    Sftp,
    Rsync,
}

impl Transfer {
    pub fn name(self) -> &'static str {
        match self {
            Transfer::Scp => "scp",
            Transfer::Sftp => "sftp-server",
            Transfer::Rsync => "rsync",
        }
    }
}

/// Inputs to [`plan`], gathered by the caller from the process environment
/// and the passwd database (kept apart so the rules are testable).
pub struct Context<'a> {
    /// `SSH_ORIGINAL_COMMAND`
    pub original_command: Option<&'a str>,
    /// The user's login shell from passwd.
    pub passwd_shell: &'a Path,
    /// `shell.real_shell`: used when passwd names shelltrail-shell itself.
    pub real_shell: &'a Path,
    /// `shell.sftp_server`: what `internal-sftp` maps to.
    pub sftp_server: &'a Path,
}

/// Directories searched for transfer programs (never the user's PATH).
const SAFE_PATH: &[&str] = &["/usr/local/bin", "/usr/bin", "/bin"];

pub fn plan(inv: &Invocation, ctx: &Context<'_>) -> Plan {
    let shell = if is_self(&ctx.passwd_shell.to_string_lossy()) || ctx.passwd_shell.as_os_str().is_empty() {
        ctx.real_shell
    } else {
        ctx.passwd_shell
    };
    // Login-shell exec request: -c CMD (not our own ForceCommand, handled in parse_args).
    // Otherwise the ForceCommand case: SSH_ORIGINAL_COMMAND, when sshd set it.
    let requested = inv.command.as_deref().or(ctx.original_command);
    let consumes_original = inv.command.is_none() && ctx.original_command.is_some();
    if let Some(mut p) = requested.and_then(|cmd| transfer_plan(cmd, ctx.sftp_server, shell)) {
        p.consumes_original = consumes_original;
        return p;
    }
    let base = shell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (arg0, args) = match requested {
        // A shell request: the shell as a login shell ("-bash").
        None => (format!("-{base}"), vec![]),
        Some(cmd) => (base, vec!["-c".into(), cmd.to_string()]),
    };
    Plan {
        program: shell.to_path_buf(),
        arg0,
        args,
        requested: requested.map(str::to_string),
        transfer: None,
        shell: shell.to_path_buf(),
        consumes_original,
    }
}

/// Characters a transfer command line may contain. No quotes, no `$`, `;`,
/// `|`, `&`, `<`, `>`, backquotes, globs, braces or newlines: nothing a shell
/// would interpret. Paths with other characters are recorded in full instead.
fn plain_word(w: &str) -> bool {
    !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:,=@+%".contains(&b))
}

fn transfer_plan(cmd: &str, sftp_server: &Path, shell: &Path) -> Option<Plan> {
    // Split on single spaces only: tabs, newlines and runs of odd whitespace disqualify.
    if cmd.bytes().any(|b| b.is_ascii_whitespace() && b != b' ') {
        return None;
    }
    let words: Vec<&str> = cmd.split(' ').filter(|w| !w.is_empty()).collect();
    let (first, rest) = words.split_first()?;
    if !words.iter().all(|w| plain_word(w)) {
        return None;
    }
    let base = Path::new(first).file_name()?.to_str()?;
    let (kind, program) = match base {
        "internal-sftp" if *first == "internal-sftp" => (Transfer::Sftp, sftp_server.to_path_buf()),
        "sftp-server" => {
            // Only the configured server, or a bare name resolving to it.
            let p = Path::new(first);
            if p.is_absolute() && p != sftp_server {
                return None;
            }
            (Transfer::Sftp, sftp_server.to_path_buf())
        }
        "scp" => (Transfer::Scp, resolve(first)?),
        "rsync" => (Transfer::Rsync, resolve(first)?),
        _ => return None,
    };
    let ok = match kind {
        Transfer::Sftp => rest.iter().all(|w| sftp_flag(w)),
        Transfer::Scp => scp_args_ok(rest),
        Transfer::Rsync => rsync_args_ok(rest),
    };
    if !ok {
        return None;
    }
    Some(Plan {
        arg0: base.replace("internal-sftp", "sftp-server"),
        program,
        args: rest.iter().map(|s| s.to_string()).collect(),
        requested: Some(cmd.to_string()),
        transfer: Some(kind),
        shell: shell.to_path_buf(),
        consumes_original: false,
    })
}

/// A transfer program named bare or by an absolute path in the safe directories.
fn resolve(word: &str) -> Option<PathBuf> {
    let p = Path::new(word);
    if p.is_absolute() {
        let dir = p.parent()?.to_str()?;
        return (SAFE_PATH.contains(&dir) && p.is_file()).then(|| p.to_path_buf());
    }
    if word.contains('/') {
        return None;
    }
    SAFE_PATH.iter().map(|d| Path::new(d).join(word)).find(|p| p.is_file())
}

/// sftp-server's own flags and their values (-l LEVEL, -f FACILITY, -u UMASK, -e, -R ...).
fn sftp_flag(w: &str) -> bool {
    // Values are plain words already; refuse flags that change files or users of sftp-server? None do.
    !w.starts_with("--")
}

/// scp's server side: `scp [-v] [-r] [-p] [-d] -t|-f [--] PATH...`
fn scp_args_ok(args: &[&str]) -> bool {
    let mut has_mode = false;
    let mut paths = 0;
    let mut after_dashdash = false;
    for a in args {
        if !after_dashdash && *a == "--" {
            after_dashdash = true;
        } else if !after_dashdash && a.starts_with('-') {
            if !a[1..].bytes().all(|b| b"tfdrpvqT".contains(&b)) || a.len() < 2 {
                return false;
            }
            has_mode |= a.contains('t') || a.contains('f');
        } else {
            paths += 1;
        }
    }
    has_mode && paths >= 1
}

/// rsync's server side: `rsync --server [--sender] FLAGS . PATH...`. Daemon
/// mode over ssh is excluded: its config file can run commands (pre-xfer exec).
fn rsync_args_ok(args: &[&str]) -> bool {
    args.first() == Some(&"--server")
        && !args
            .iter()
            .any(|a| a.starts_with("--daemon") || a.starts_with("--config") || a.starts_with("--dparam") || *a == "-M")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(orig: Option<&'a str>, shell: &'a str) -> Context<'a> {
        Context {
            original_command: orig,
            passwd_shell: Path::new(shell),
            real_shell: Path::new("/bin/bash"),
            sftp_server: Path::new("/usr/lib/openssh/sftp-server"),
        }
    }

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn force_command_shell_request_runs_login_shell() {
        let inv = parse_args(&args(&["shelltrail-shell", "--config", "/etc/x.toml"])).unwrap();
        assert_eq!(inv.config, Some(PathBuf::from("/etc/x.toml")));
        let p = plan(&inv, &ctx(None, "/bin/zsh"));
        assert_eq!(p.program, PathBuf::from("/bin/zsh"));
        assert_eq!(p.arg0, "-zsh");
        assert!(p.args.is_empty());
    }

    #[test]
    fn passwd_shell_is_self_uses_real_shell() {
        let inv = parse_args(&args(&["-shelltrail-shell"])).unwrap();
        assert!(inv.login);
        let p = plan(&inv, &ctx(None, "/usr/bin/shelltrail-shell"));
        assert_eq!(p.program, PathBuf::from("/bin/bash"));
        assert_eq!(p.arg0, "-bash");
    }

    #[test]
    fn login_shell_and_force_command_records_once() {
        // sshd: execve("/usr/bin/shelltrail-shell", ["shelltrail-shell", "-c", "<ForceCommand>"])
        let inv = parse_args(&args(&[
            "shelltrail-shell",
            "-c",
            "/usr/bin/shelltrail-shell --config /etc/shelltrail/t.toml",
        ]))
        .unwrap();
        assert_eq!(inv.command, None);
        assert_eq!(inv.config, Some(PathBuf::from("/etc/shelltrail/t.toml")));
        // ...and the user's command is then in SSH_ORIGINAL_COMMAND:
        let p = plan(&inv, &ctx(Some("uptime"), "/usr/bin/shelltrail-shell"));
        assert_eq!(p.args, vec!["-c", "uptime"]);
        assert_eq!(p.program, PathBuf::from("/bin/bash"));
        assert_eq!(p.shell, PathBuf::from("/bin/bash"), "$SHELL is never the recorder");
        assert!(p.consumes_original, "the ForceCommand consumes SSH_ORIGINAL_COMMAND");
    }

    #[test]
    fn a_login_shell_command_leaves_ssh_original_command_to_its_program() {
        // No ForceCommand, a `command="rrsync /backup"` key: sshd runs
        // `shelltrail-shell -c 'rrsync /backup'` with the client's request in
        // SSH_ORIGINAL_COMMAND, which rrsync reads.
        let inv = parse_args(&args(&["shelltrail-shell", "-c", "rrsync /backup"])).unwrap();
        let p = plan(
            &inv,
            &ctx(Some("rsync --server -e.LsfxC . x"), "/usr/bin/shelltrail-shell"),
        );
        assert_eq!(p.args, vec!["-c", "rrsync /backup"]);
        assert!(!p.consumes_original);
        let p = plan(&inv, &ctx(None, "/usr/bin/shelltrail-shell"));
        assert!(!p.consumes_original);
    }

    #[test]
    fn login_shell_exec_request_runs_it_through_the_real_shell() {
        let inv = parse_args(&args(&["shelltrail-shell", "-c", "echo hi; id"])).unwrap();
        let p = plan(&inv, &ctx(None, "/usr/bin/shelltrail-shell"));
        assert_eq!(
            (p.arg0.as_str(), p.args.clone()),
            ("bash", vec!["-c".to_string(), "echo hi; id".into()])
        );
        assert_eq!(p.transfer, None);
    }

    #[test]
    fn transfers_are_recognised_only_when_plain() {
        let t = |c: &str| plan(&Invocation::default(), &ctx(Some(c), "/bin/bash")).transfer;
        assert_eq!(t("internal-sftp"), Some(Transfer::Sftp));
        assert_eq!(t("/usr/lib/openssh/sftp-server"), Some(Transfer::Sftp));
        assert_eq!(t("/usr/lib/openssh/sftp-server -l INFO"), Some(Transfer::Sftp));
        assert_eq!(t("scp -t /tmp"), Some(Transfer::Scp));
        assert_eq!(t("scp -r -d -t -- /tmp/x"), Some(Transfer::Scp));
        assert_eq!(t("scp -f /etc/hostname"), Some(Transfer::Scp));
        assert_eq!(
            t("rsync --server -vlogDtpre.iLsfxCIvu . /tmp/dest"),
            Some(Transfer::Rsync)
        );
        assert_eq!(
            t("rsync --server --sender -vlogDtpre.iLsfxCIvu . /tmp/src"),
            Some(Transfer::Rsync)
        );
        // Smuggling attempts are recorded in full, through the shell.
        for c in [
            "scp -t /tmp; bash -i",
            "scp -t /tmp && bash",
            "scp -t /tmp | sh",
            "scp -t $(bash)",
            "scp -t `bash`",
            "scp -t '/tmp'",
            "scp -t /tmp\nbash",
            "scp -t\t/tmp",
            "scp -S /bin/sh -t /tmp",
            "scp /tmp",
            "rsync --server --daemon .",
            "rsync --server --config=/home/u/r.conf --daemon .",
            "rsync -e sh",
            "/tmp/scp -t /tmp",
            "./scp -t /tmp",
            "/home/u/sftp-server",
            "bash -c 'scp -t /tmp'",
            "scp -t /tmp > /dev/null",
        ] {
            assert_eq!(t(c), None, "{c:?} must not count as a transfer");
        }
    }

    #[test]
    fn transfers_exec_directly() {
        let p = plan(&Invocation::default(), &ctx(Some("internal-sftp -l INFO"), "/bin/bash"));
        assert_eq!(p.program, PathBuf::from("/usr/lib/openssh/sftp-server"));
        assert_eq!(p.arg0, "sftp-server");
        assert_eq!(p.args, vec!["-l", "INFO"]);
        assert_eq!(p.shell, PathBuf::from("/bin/bash"));
    }

    #[test]
    fn bad_usage_is_refused() {
        assert!(parse_args(&args(&["shelltrail-shell", "--evil"])).is_err());
        assert!(parse_args(&args(&["shelltrail-shell", "--config"])).is_err());
    }
}
