//! The real OpenSSH client, pointed at a world's sshd.
//!
//! Options are chosen so that nothing on the machine running the tests leaks
//! in: no ssh_config (`-F /dev/null`), only the world's key (no ssh-agent,
//! no ~/.ssh identities), no known_hosts, and no prompts (`BatchMode`).

use crate::TIMEOUT;
use crate::proc::{Output, Running};
use crate::term::Term;
use crate::world::World;
use std::process::Command;
use std::time::Duration;

/// The client options for `world`.
pub fn ssh_options(world: &World) -> Vec<String> {
    let mut o = base_options(&world.client_key);
    if let Some(cert) = &world.client_cert {
        o.push("-o".into());
        o.push(format!("CertificateFile={}", cert.display()));
    }
    o
}

/// No user config, this key only, no host key checks, no prompts.
fn base_options(key: &std::path::Path) -> Vec<String> {
    let mut o: Vec<String> = vec!["-F".into(), "/dev/null".into(), "-i".into(), key.display().to_string()];
    for opt in [
        "IdentitiesOnly=yes",
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "BatchMode=yes",
        "LogLevel=ERROR",
        "ConnectTimeout=20",
    ] {
        o.push("-o".into());
        o.push(opt.into());
    }
    o
}

/// An `ssh` invocation being put together: `ssh OPTIONS ARGS user@127.0.0.1 [COMMAND]`.
pub struct Ssh {
    options: Vec<String>,
    port: u16,
    user: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    command: Option<String>,
    stdin: Option<Vec<u8>>,
}

impl Ssh {
    pub(crate) fn new(world: &World) -> Ssh {
        Ssh {
            options: ssh_options(world),
            port: world.port(),
            user: world.user.name.clone(),
            args: Vec::new(),
            env: Vec::new(),
            command: None,
            stdin: None,
        }
    }

    /// A client of an sshd the test started itself (not a world's): port,
    /// user, and the private key sshd accepts for them.
    pub fn to(port: u16, user: &str, key: &std::path::Path) -> Ssh {
        Ssh {
            options: base_options(key),
            port,
            user: user.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            command: None,
            stdin: None,
        }
    }

    /// Logs in as `user` instead of the world's user (sshd takes the
    /// world's key for any account).
    pub fn as_user(mut self, user: &str) -> Self {
        self.user = user.to_string();
        self
    }

    /// An extra client argument (before the destination), e.g. `-n`.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    /// Sets a variable in the client's environment.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Sends the client-side variable `name` to the server (`-o SendEnv=`).
    pub fn send_env(self, name: &str) -> Self {
        self.arg("-o").arg(&format!("SendEnv={name}"))
    }

    /// The remote command (an exec request); without it, a shell request.
    pub fn command(mut self, cmd: &str) -> Self {
        self.command = Some(cmd.to_string());
        self
    }

    /// Bytes for the client's stdin (kept open until the client exits or
    /// is waited for). Without this, stdin is /dev/null.
    pub fn stdin(mut self, bytes: &[u8]) -> Self {
        self.stdin = Some(bytes.to_vec());
        self
    }

    /// The command line, for running it some other way.
    pub fn build(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(&self.options)
            .arg("-p")
            .arg(self.port.to_string())
            .args(&self.args)
            .arg(format!("{}@127.0.0.1", self.user));
        if let Some(cmd) = &self.command {
            c.arg(cmd);
        }
        c.env_remove("SSH_AUTH_SOCK");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs it to the end (timeout [`TIMEOUT`]).
    #[track_caller]
    pub fn run(self) -> Output {
        self.run_within(TIMEOUT)
    }

    #[track_caller]
    pub fn run_within(self, timeout: Duration) -> Output {
        self.spawn().wait(timeout)
    }

    /// Starts it; the caller watches its output while it runs.
    pub fn spawn(self) -> Running {
        Running::spawn(self.build(), self.stdin.as_deref())
    }

    /// `ssh -tt` inside a new pseudo-terminal of `cols`x`rows`, like a
    /// person's terminal: the remote side gets a PTY and sees our size.
    pub fn term(self, cols: u16, rows: u16) -> Term {
        let c = self.arg("-tt").build();
        Term::spawn(&c, cols, rows)
    }
}
