//! The one configuration loader, shared by the recorder, the agent and the CLI.
//!
//! Configuration comes from a TOML file (default `/etc/shelltrail/shelltrail.toml`)
//! and the command line, never from environment variables: the recorder runs
//! as the user being recorded, and a user can set variables. Every path is a
//! key, so tests and `shelltrail demo` run unprivileged in a temporary
//! directory. A missing default file means "all defaults" (production paths).
//!
//! Every caller goes through [`Config::load_trusted`]: the file is opened
//! once and read from that descriptor. For the recorder, how much the file
//! must prove depends on who could have written it ([`Trust`]).

use crate::trusted_file::{OpenError, Rules, open_trusted};
use serde::{Deserialize, Deserializer, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where the production configuration lives.
pub const DEFAULT_PATH: &str = "/etc/shelltrail/shelltrail.toml";

/// Under sshd the recorder reads configuration from this directory only.
pub const TRUSTED_DIR: &str = "/etc/shelltrail";

/// Largest configuration file read (the documented one is a few KiB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Who reads the configuration, and so what the file must prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The recorder under sshd (`SSH_CONNECTION` set): the user being
    /// recorded can name any path (`shelltrail-shell --config PATH` as an
    /// exec request when the recorder is the login shell). Only a file
    /// under [`TRUSTED_DIR`] is read, root's, in directories only root can
    /// change, reached without following any link.
    Sshd,
    /// The recorder outside any SSH session (`shelltrail demo`, tests): the
    /// same walk, but the file and its directories may also be the running
    /// user's, anywhere (`/tmp` too): nobody else is being recorded.
    Local,
    /// The agent, the collector and the CLI: whoever starts them names the
    /// file (root in the units), so it is read as named.
    Caller,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is in the message, so it is not also the `source`: printed
    // with its chain (`{:#}`), it would appear twice.
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "refusing config file {path}: {why}. The file, and every directory above it, must be owned by root and \
         writable only by root (chown root:root PATH; chmod 644 FILE, 755 DIRECTORY), and no part of the path a \
         symbolic link"
    )]
    Untrusted { path: PathBuf, why: String },
    #[error(
        "refusing config file {path}: in an SSH session the recorder reads configuration only from \
         {TRUSTED_DIR}/ (a user can name any path); put the file there and name it in ForceCommand"
    )]
    OutsideTrustedDir { path: PathBuf },
}

/// The whole configuration file. Unknown keys are errors: a typo must not
/// silently switch a security setting back to its default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The agent's Unix socket; recorders connect here.
    pub socket: PathBuf,
    /// The durable spool (agent-owned, mode 0750).
    pub spool_dir: PathBuf,
    /// Where a break-glass session is recorded while the agent cannot be
    /// reached (see `shell/fallback.rs`): owned by `recorder_user`, group
    /// the agent's, mode 0770 (the packages' tmpfiles.d entry); the agent
    /// imports and deletes what it finds. Outside the agent's state
    /// directory, whose ownership systemd resets to the agent's user.
    pub fallback_dir: PathBuf,
    /// The system user `shelltrail-shell` is installed set-uid to. The
    /// recorder runs as it once the session's child is started, so the
    /// recorded user can neither signal nor trace it; the agent believes the
    /// user a connection names only when the connection comes from this
    /// user (every other peer is the user SO_PEERCRED says it is).
    pub recorder_user: String,
    pub shell: ShellConfig,
    pub agent: AgentConfig,
    pub ship: ShipConfig,
    /// `shelltrail collector`: only on the collector's machine.
    pub collector: Option<shelltrail_collector::CollectorConfig>,
}

/// What happens when recording cannot be guaranteed at login: the agent is
/// unreachable, or refuses the session (spool at its cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unavailable {
    /// Refuse the login with a message and a log line (default).
    Deny,
    /// Run the session; record into memory and deliver when the agent returns.
    Allow,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShellConfig {
    /// The shell to run when the user's passwd shell is shelltrail-shell itself.
    pub real_shell: PathBuf,
    /// What `internal-sftp` (which lives inside sshd) maps to. Empty: the
    /// first of [`SFTP_SERVERS`] that exists (Debian's, then RHEL's...).
    pub sftp_server: PathBuf,
    /// Record keystrokes (`i` events). Off by default: input holds secrets.
    pub record_input: bool,
    /// Record the payload of scp/sftp/rsync transfers instead of a summary.
    pub record_transfer_payloads: bool,
    /// Ask for a reason (ticket id) before the session starts.
    pub require_reason: bool,
    pub on_agent_unavailable: Unavailable,
    /// Unacknowledged recording held in memory while the agent is away.
    #[serde(deserialize_with = "bytes")]
    pub buffer_bytes: u64,
    /// Cut a chunk when this much encoded recording is pending...
    #[serde(deserialize_with = "bytes")]
    pub chunk_bytes: u64,
    /// ...or when the oldest pending event is this old.
    pub chunk_interval_ms: u64,
    /// zstd level for chunks: cheap, since it is paid on the user's hot path
    /// and the collector compresses ended sessions again, denser.
    pub compression_level: i32,
    /// Seconds to wait at session end for the agent to acknowledge the rest.
    pub close_timeout_secs: u64,
    /// Members of this group may log in with `shelltrail-shell --break-glass`
    /// (the shipped sshd drop-in's `Match Group`): never refused because the
    /// agent is away, recorded to the agent when it answers and otherwise
    /// to `fallback_dir`, logged loudly and flagged in listings.
    pub break_glass_group: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// New sessions are refused once the spool holds this much.
    #[serde(deserialize_with = "bytes")]
    pub spool_max_bytes: u64,
    /// New sessions are refused when the spool's filesystem has less free space.
    #[serde(deserialize_with = "bytes")]
    pub min_free_bytes: u64,
    /// A spool segment file is closed and a new one started past this size.
    #[serde(deserialize_with = "bytes")]
    pub segment_bytes: u64,
    /// Concurrent sessions one uid may record.
    pub max_sessions_per_uid: u32,
    /// Largest frame a recorder may send; larger closes that connection.
    #[serde(deserialize_with = "bytes")]
    pub max_frame_bytes: u64,
    /// The host's Ed25519 key that seals every session as it ends (PEM,
    /// PKCS#8, mode 0400, the agent's user's own); created at the agent's
    /// first start. Unset: `signing.key` beside the spool directory (see
    /// [`Config::signing_key`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<PathBuf>,
    /// Connections to the agent's socket at once, over all users; also the
    /// cap of the recorder's own user (`recorder_user`), whose connections
    /// carry every user's sessions.
    pub max_connections: u32,
    /// Connections one other uid may hold at once: more are closed as they
    /// are accepted, so no user can exhaust the agent's descriptors.
    pub max_connections_per_uid: u32,
    /// Frame bytes the agent holds in memory at once, over all connections
    /// (read and not yet durable). A connection waiting for room stops
    /// reading; one uid other than the recorder's gets a quarter of it.
    #[serde(deserialize_with = "bytes")]
    pub buffer_bytes: u64,
    /// Recording (compressed) one uid's sessions may hold in the spool.
    /// Checked on every chunk: the session that would pass it is held.
    #[serde(deserialize_with = "bytes")]
    pub spool_max_bytes_per_uid: u64,
    /// Recording (compressed) one session may hold in the spool.
    #[serde(deserialize_with = "bytes")]
    pub spool_max_bytes_per_session: u64,
    /// Tell the user, on their terminal, when someone starts tailing their
    /// session (also recorded as a marker). Off by default.
    pub notify_on_tail: bool,
    /// Members of this group (besides root) may list live sessions, end
    /// them and lock users out through the agent (`shelltrail kill`).
    pub admin_group: String,
    /// How long a session held at a limit may wait for room under
    /// `on_agent_unavailable = "deny"` before the agent ends its recording
    /// (and the recorder the session). Under "allow" it waits as long as
    /// it runs, dropping chunks and recording the gap.
    pub quota_wait_secs: u64,
}

/// Where the agent ships recordings. Mutual TLS: the collector checks the
/// agent's certificate, whose name is the host's identity.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShipConfig {
    /// Collector URL (`https://collector.example:7443`). Empty: recordings stay on this host.
    pub collector: String,
    /// CA certificate (PEM) that signed the collector's certificate.
    pub ca: PathBuf,
    /// This host's client certificate (PEM); its name is the host identity.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Plaintext, no certificates: local development only (logged loudly).
    pub insecure: bool,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            collector: String::new(),
            ca: "/etc/shelltrail/tls/ca.pem".into(),
            cert: "/etc/shelltrail/tls/host.pem".into(),
            key: "/etc/shelltrail/tls/host.key".into(),
            insecure: false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: "/run/shelltrail/agent.sock".into(),
            spool_dir: "/var/lib/shelltrail/spool".into(),
            fallback_dir: "/var/lib/shelltrail-breakglass".into(),
            recorder_user: "shelltrail-rec".into(),
            shell: ShellConfig::default(),
            agent: AgentConfig::default(),
            ship: ShipConfig::default(),
            collector: None,
        }
    }
}

/// Where distributions install OpenSSH's sftp-server: Debian and Ubuntu,
/// RHEL and Fedora, Arch, others.
pub const SFTP_SERVERS: [&str; 4] = [
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
];

impl ShellConfig {
    /// The sftp-server to run: the configured one, or the first known one
    /// that exists (Debian's path when none does: the error then names it).
    pub fn sftp_server(&self) -> PathBuf {
        if !self.sftp_server.as_os_str().is_empty() {
            return self.sftp_server.clone();
        }
        SFTP_SERVERS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(SFTP_SERVERS[0]))
    }
}

impl Default for ShellConfig {
    fn default() -> Self {
        ShellConfig {
            real_shell: "/bin/bash".into(),
            sftp_server: PathBuf::new(),
            record_input: false,
            record_transfer_payloads: false,
            require_reason: false,
            on_agent_unavailable: Unavailable::Deny,
            buffer_bytes: 64 << 20,
            chunk_bytes: 512 << 10,
            chunk_interval_ms: 100,
            compression_level: 1,
            close_timeout_secs: 10,
            break_glass_group: "shelltrail-breakglass".into(),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            spool_max_bytes: 10 << 30,
            min_free_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            max_sessions_per_uid: 64,
            max_frame_bytes: 4 << 20,
            signing_key: None,
            max_connections: 4096,
            max_connections_per_uid: 64,
            buffer_bytes: 64 << 20,
            spool_max_bytes_per_uid: 2 << 30,
            spool_max_bytes_per_session: 1 << 30,
            quota_wait_secs: 30,
            admin_group: "shelltrail-admin".into(),
            notify_on_tail: false,
        }
    }
}

impl Config {
    /// Loads `path`, or the default file if `path` is None, as the agent,
    /// the collector and the CLI do ([`Trust::Caller`]).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_trusted(path, Trust::Caller)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The one loader: `path`, or the default file if `path` is None (all
    /// defaults when that file does not exist; a file named explicitly must
    /// exist). The file is opened once, checked on the open descriptor as
    /// `trust` demands, and read from that descriptor.
    pub fn load_trusted(path: Option<&Path>, trust: Trust) -> Result<Config, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let file = match open(&path, trust) {
            Ok(f) => f,
            Err(ConfigError::Read { error, .. }) if !explicit && error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default());
            }
            Err(e) => return Err(e),
        };
        let mut text = String::new();
        let read_err = |error| ConfigError::Read {
            path: path.clone(),
            error,
        };
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::Parse {
                path,
                message: format!("larger than {} KiB", MAX_CONFIG_BYTES >> 10),
            });
        }
        Self::parse(&text).map_err(|message| ConfigError::Parse { path, message })
    }

    /// Where the host's signing key is: `[agent] signing_key`, or
    /// `signing.key` beside the spool directory (in the agent's state
    /// directory, which it can write, unlike /etc).
    pub fn signing_key(&self) -> PathBuf {
        self.agent
            .signing_key
            .clone()
            .unwrap_or_else(|| self.spool_dir.parent().unwrap_or(Path::new("/")).join("signing.key"))
    }

    /// Where break-glass sessions go while the agent is away.
    pub fn fallback_dir(&self) -> PathBuf {
        self.fallback_dir.clone()
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.shell;
        if s.chunk_bytes == 0 || s.chunk_bytes > shelltrail_cast::chunk::MAX_RAW_LEN as u64 / 2 {
            return Err(format!(
                "shell.chunk_bytes must be between 1 and {}",
                shelltrail_cast::chunk::MAX_RAW_LEN / 2
            ));
        }
        if !(1..=60_000).contains(&s.chunk_interval_ms) {
            return Err("shell.chunk_interval_ms must be between 1 and 60000".into());
        }
        if !(-7..=19).contains(&s.compression_level) {
            return Err("shell.compression_level must be between -7 and 19".into());
        }
        if s.buffer_bytes < 2 * s.chunk_bytes {
            return Err("shell.buffer_bytes must hold at least two chunks (2 x shell.chunk_bytes)".into());
        }
        // A compressed chunk can be slightly larger than its input.
        if self.agent.max_frame_bytes < s.chunk_bytes + s.chunk_bytes / 8 + 4096 {
            return Err("agent.max_frame_bytes must exceed shell.chunk_bytes by at least 1/8 + 4 KiB".into());
        }
        // Only closed segments are deleted after shipping: with a cap below two
        // segments, a spool full inside its active segment could never drain.
        if self.agent.spool_max_bytes < 2 * self.agent.segment_bytes {
            return Err("agent.spool_max_bytes must be at least twice agent.segment_bytes".into());
        }
        if self.agent.segment_bytes < 1 << 20 {
            return Err("agent.segment_bytes must be at least 1 MiB".into());
        }
        let a = &self.agent;
        if a.max_connections == 0 || a.max_connections_per_uid == 0 {
            return Err("agent.max_connections and agent.max_connections_per_uid must be at least 1".into());
        }
        if a.buffer_bytes < a.max_frame_bytes {
            return Err("agent.buffer_bytes must hold at least one frame (agent.max_frame_bytes)".into());
        }
        if a.quota_wait_secs == 0 || a.quota_wait_secs > 24 * 3600 {
            return Err("agent.quota_wait_secs must be between 1 and 86400".into());
        }
        Ok(())
    }
}

/// Opens the configuration file as `trust` demands.
fn open(path: &Path, trust: Trust) -> Result<std::fs::File, ConfigError> {
    let rules = match trust {
        Trust::Caller => {
            return std::fs::File::open(path).map_err(|error| ConfigError::Read {
                path: path.into(),
                error,
            });
        }
        Trust::Sshd => {
            if !path.starts_with(TRUSTED_DIR) || path == Path::new(TRUSTED_DIR) {
                return Err(ConfigError::OutsideTrustedDir { path: path.into() });
            }
            Rules {
                owners: Vec::new(),
                sticky_dirs: false,
            }
        }
        // The real uid is the person running it; the effective one differs
        // only when the recorder is installed set-uid (its own identity).
        Trust::Local => Rules {
            owners: vec![nix::unistd::getuid().as_raw(), nix::unistd::geteuid().as_raw()],
            sticky_dirs: true,
        },
    };
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        let cwd = std::env::current_dir().map_err(|error| ConfigError::Read {
            path: path.into(),
            error,
        })?;
        cwd.join(path)
    };
    open_trusted(&absolute, &rules).map_err(|e| match e {
        OpenError::NotFound(_) => ConfigError::Read {
            path: path.into(),
            error: nix::errno::Errno::ENOENT.into(),
        },
        OpenError::Io { error, .. } => ConfigError::Read {
            path: path.into(),
            error,
        },
        other => ConfigError::Untrusted {
            path: path.into(),
            why: other.to_string(),
        },
    })
}

/// Accepts a byte count as an integer or a string with a unit: "64MiB", "10 GiB", "512k".
fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses "64MiB", "1 GiB", "512k", "100" into bytes (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 64MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!("invalid size unit in {s:?}: use B, KiB, MiB, GiB or TiB"));
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/shelltrail/agent.sock"));
        assert_eq!(c.shell.on_agent_unavailable, Unavailable::Deny);
        assert!(!c.shell.record_input);
    }

    #[test]
    fn sizes_with_units() {
        let c = Config::parse(
            "[shell]\nbuffer_bytes = \"8MiB\"\n[agent]\nspool_max_bytes = 2097152\nsegment_bytes = \"1 MiB\"\n",
        )
        .unwrap();
        assert_eq!(c.shell.buffer_bytes, 8 << 20);
        assert_eq!(c.agent.spool_max_bytes, 2 << 20);
        assert_eq!(c.agent.segment_bytes, 1 << 20);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn shipped_example_documents_the_defaults() {
        let example = Config::parse(include_str!("../../packaging/shelltrail.toml")).unwrap();
        assert_eq!(format!("{example:?}"), format!("{:?}", Config::default()));
    }

    /// The commented `[collector]` tables of the shipped file, uncommented,
    /// are a collector's valid configuration with every key.
    #[test]
    fn shipped_example_collector_table_parses() {
        let text = include_str!("../../packaging/shelltrail.toml");
        let from = text.find("# [collector]").expect("the collector's example");
        let uncommented: String = text[from..]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.starts_with("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        let col = c.collector.expect("a [collector] table");
        assert_eq!(col.listen.port(), 7443);
        assert_eq!(col.roles["bob"], vec![shelltrail_collector::RoleName::Respond]);
        assert!(col.tls.is_some());
    }

    #[test]
    fn the_signing_key_sits_beside_the_spool_unless_set() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.signing_key(), PathBuf::from("/var/lib/shelltrail/signing.key"));
        let c = Config::parse("spool_dir = \"/srv/st/spool\"\n").unwrap();
        assert_eq!(c.signing_key(), PathBuf::from("/srv/st/signing.key"));
        let c = Config::parse("[agent]\nsigning_key = \"/etc/shelltrail/signing.key\"\n").unwrap();
        assert_eq!(c.signing_key(), PathBuf::from("/etc/shelltrail/signing.key"));
    }

    #[test]
    fn typos_are_errors() {
        let e = Config::parse("[shell]\nrecord_imput = true\n").unwrap_err();
        assert!(e.contains("record_imput"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        assert!(
            Config::parse("[shell]\nchunk_interval_ms = 0\n")
                .unwrap_err()
                .contains("chunk_interval_ms")
        );
        assert!(Config::parse("[shell]\non_agent_unavailable = \"maybe\"\n").is_err());
    }

    #[test]
    fn world_writable_config_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = Config::load_trusted(Some(&p), Trust::Local).unwrap_err();
        assert!(e.to_string().contains("others may write it"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        Config::load_trusted(Some(&p), Trust::Local).unwrap();
    }

    #[test]
    fn under_sshd_only_files_under_etc_shelltrail_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "").unwrap();
        for path in [
            p.as_path(),
            Path::new("/etc/shelltrail/../passwd"),
            Path::new("etc/shelltrail/x.toml"),
            Path::new("/etc/shelltrailx/x.toml"),
        ] {
            let e = Config::load_trusted(Some(path), Trust::Sshd).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("only from /etc/shelltrail/") || text.contains("without `..`"),
                "{path:?}: {text}"
            );
        }
    }

    #[test]
    fn the_recorder_never_follows_a_link_to_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "").unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = Config::load_trusted(Some(&link), Trust::Local).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        // The agent and the CLI read what they are told.
        Config::load_trusted(Some(&link), Trust::Caller).unwrap();
    }

    #[test]
    fn a_missing_file_is_defaults_only_when_not_named() {
        let e = Config::load_trusted(Some(Path::new("/nonexistent/c.toml")), Trust::Local).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}
