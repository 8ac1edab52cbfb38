//! A private OpenSSH sshd per test world.
//!
//! It is the real daemon (`/usr/sbin/sshd -D -e -f CONFIG`) with the
//! settings a shelltrail host uses (ForceCommand to the recorder,
//! ExposeAuthInfo, AcceptEnv LC_*), listening on a free loopback port with
//! its own host key, so tests never touch the machine's own sshd or keys.

use crate::proc::run_ok;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the sshd of a world is configured with.
pub struct SshdSpec<'a> {
    /// Directory for the host key, config and log.
    pub dir: &'a Path,
    /// The `ForceCommand` line.
    pub force_command: &'a str,
    /// Root-owned `AuthorizedKeysFile` (may be empty).
    pub authorized_keys: &'a Path,
    /// Extra `sshd_config` lines (e.g. `TrustedUserCAKeys ...`).
    pub extra: &'a [String],
}

/// A running sshd; stopped on drop.
pub struct Sshd {
    pub port: u16,
    pub log: PathBuf,
    pub config: PathBuf,
    child: Child,
}

/// Creates an ed25519 key pair at `path` / `path.pub` with no passphrase.
pub fn keygen(path: &Path) {
    let mut c = Command::new("ssh-keygen");
    c.args(["-q", "-t", "ed25519", "-N", "", "-C", "shelltrail-e2e", "-f"])
        .arg(path);
    run_ok(c, Duration::from_secs(20));
}

/// A port nobody listens on right now (the kernel's pick). Another process
/// may take it before sshd binds it: [`Sshd::start`] retries then.
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a free port");
    l.local_addr().expect("local addr").port()
}

impl Sshd {
    pub fn start(spec: &SshdSpec<'_>) -> Sshd {
        // sshd needs its privilege-separation directory.
        std::fs::create_dir_all("/run/sshd").expect("creating /run/sshd");
        let host_key = spec.dir.join("ssh_host_ed25519_key");
        if !host_key.exists() {
            keygen(&host_key);
        }
        let log = spec.dir.join("sshd.log");
        let config = spec.dir.join("sshd_config");
        let mut last_failure = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut text = format!(
                "# Written by the shelltrail end-to-end tests.\n\
                 ListenAddress 127.0.0.1:{port}\n\
                 HostKey {host_key}\n\
                 PidFile none\n\
                 AuthorizedKeysFile {keys}\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PermitRootLogin no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 AcceptEnv LANG LC_*\n\
                 ExposeAuthInfo yes\n\
                 LogLevel VERBOSE\n\
                 Subsystem sftp internal-sftp\n\
                 ForceCommand {force}\n",
                host_key = host_key.display(),
                keys = spec.authorized_keys.display(),
                force = spec.force_command,
            );
            for l in spec.extra {
                text.push_str(l);
                text.push('\n');
            }
            std::fs::write(&config, text).expect("writing sshd_config");

            let log_offset = std::fs::metadata(&log).map_or(0, |m| m.len()) as usize;
            let log_file = File::options()
                .create(true)
                .append(true)
                .open(&log)
                .expect("opening sshd.log");
            // The absolute path is required: sshd re-executes itself.
            let mut child = Command::new("/usr/sbin/sshd")
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("dup log"))
                .stderr(log_file)
                .spawn()
                .expect("starting /usr/sbin/sshd (is openssh-server installed?)");
            match wait_ready(port, &log, log_offset, &mut child, Duration::from_secs(20)) {
                Ok(()) => {
                    return Sshd {
                        port,
                        log,
                        config,
                        child,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_failure = e;
                }
            }
        }
        panic!(
            "sshd did not start: {last_failure}\n--- sshd.log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits until this sshd says it listens on `port` (its log after
/// `log_offset`) and answers with an SSH banner. The log line matters: if
/// another process took the port first, the banner could come from it.
fn wait_ready(port: u16, log: &Path, log_offset: usize, child: &mut Child, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let listening = format!("Server listening on 127.0.0.1 port {port}.");
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("sshd exited with {st}"));
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.get(log_offset..).is_some_and(|t| t.contains(&listening)) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "sshd did not report listening on port {port} within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut banner = [0u8; 8];
            if s.read_exact(&mut banner).is_ok() && banner.starts_with(b"SSH-") {
                // Say goodbye politely; sshd only logs the early close.
                let _ = s.write_all(b"SSH-2.0-shelltrail-e2e-probe\r\n");
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no SSH banner on port {port} within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
