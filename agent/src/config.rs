//! The one configuration loader, shared by the recorder, the agent and the CLI.
//!
//! Configuration comes from a TOML file (default `/etc/shelltrail/shelltrail.toml`)
//! and the command line, never from environment variables: the recorder runs
//! as the user being recorded, and a user can set variables. Every path is a
//! key, so tests and `shelltrail demo` run unprivileged in a temporary
//! directory. A missing default file means "all defaults" (production paths).

use serde::{Deserialize, Deserializer, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where the production configuration lives.
pub const DEFAULT_PATH: &str = "/etc/shelltrail/shelltrail.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is in the message, so it is not also the `source`: printed
    // with its chain (`{:#}`), it would appear twice.
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "refusing config file {path}: {why}. It must be owned by root and writable only by its owner \
         (chown root:root {path}; chmod 644 {path})"
    )]
    Untrusted { path: PathBuf, why: String },
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
    /// What `internal-sftp` (which lives inside sshd) maps to.
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
            recorder_user: "shelltrail-rec".into(),
            shell: ShellConfig::default(),
            agent: AgentConfig::default(),
            ship: ShipConfig::default(),
            collector: None,
        }
    }
}

impl Default for ShellConfig {
    fn default() -> Self {
        ShellConfig {
            real_shell: "/bin/bash".into(),
            sftp_server: "/usr/lib/openssh/sftp-server".into(),
            record_input: false,
            record_transfer_payloads: false,
            require_reason: false,
            on_agent_unavailable: Unavailable::Deny,
            buffer_bytes: 64 << 20,
            chunk_bytes: 512 << 10,
            chunk_interval_ms: 100,
            compression_level: 1,
            close_timeout_secs: 10,
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
        }
    }
}

impl Config {
    /// Loads `path`, or the default file if `path` is None (all defaults when
    /// that file does not exist). A file named explicitly must exist.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default());
            }
            Err(error) => return Err(ConfigError::Read { path, error }),
        };
        Self::parse(&text).map_err(|message| ConfigError::Parse { path, message })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads the file as the recorder must: only a file that the user being
    /// recorded cannot have written. Root-owned and not writable by group or
    /// others; outside an SSH session (`local_use`: demo, tests) a file owned
    /// by the running user is accepted as well, since then nobody else is
    /// being recorded.
    pub fn load_trusted(path: Option<&Path>, local_use: bool) -> Result<Config, ConfigError> {
        let p = path.unwrap_or(Path::new(DEFAULT_PATH));
        match std::fs::metadata(p) {
            Ok(md) => {
                let me = nix::unistd::geteuid().as_raw();
                let owner_ok = md.uid() == 0 || (local_use && md.uid() == me);
                if !owner_ok {
                    return Err(ConfigError::Untrusted {
                        path: p.into(),
                        why: format!("it is owned by uid {}", md.uid()),
                    });
                }
                if md.mode() & 0o022 != 0 {
                    return Err(ConfigError::Untrusted {
                        path: p.into(),
                        why: format!("its mode {:o} lets others write it", md.mode() & 0o777),
                    });
                }
            }
            Err(e) if path.is_none() && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ConfigError::Read {
                    path: p.into(),
                    error: source,
                });
            }
        }
        Self::load(path)
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
        Ok(())
    }
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
        let e = Config::load_trusted(Some(&p), true).unwrap_err();
        assert!(e.to_string().contains("lets others write"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        Config::load_trusted(Some(&p), true).unwrap();
    }
}
