//! `shelltrail`: the host agent daemon (`shelltrail agent`) and the operator CLI.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shelltrail::cli::{self, CollectorArgs, Source, export::Format};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "shelltrail",
    version,
    about = "Record, list and replay every SSH session on a host"
)]
struct Args {
    /// Configuration file [default: /etc/shelltrail/shelltrail.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where `sessions`, `export`, `play` and `verify` read from. Accepted before
/// the subcommand (`shelltrail --collector URL sessions`) and after it; the
/// other subcommands do not take them, so their help does not show them.
#[derive(clap::Args, Clone, Default)]
#[command(next_help_heading = "Reading from a collector (sessions, export, play, verify)")]
struct Remote {
    /// Read from this collector (https://HOST:PORT) instead of this host's spool
    #[arg(long, value_name = "URL")]
    collector: Option<String>,
    /// CA certificate of the collector [default: [ship] ca]
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Your operator certificate [default: [ship] cert]
    #[arg(long, value_name = "PEM")]
    cert: Option<PathBuf>,
    /// Its private key [default: [ship] key]
    #[arg(long, value_name = "PEM")]
    key: Option<PathBuf>,
    /// Plaintext, to a collector in its insecure development mode (http://)
    #[arg(long)]
    insecure: bool,
}

impl Remote {
    /// These options, each completed from `outer` (those before the subcommand).
    fn or(self, outer: &Remote) -> Remote {
        Remote {
            collector: self.collector.or_else(|| outer.collector.clone()),
            ca: self.ca.or_else(|| outer.ca.clone()),
            cert: self.cert.or_else(|| outer.cert.clone()),
            key: self.key.or_else(|| outer.key.clone()),
            insecure: self.insecure || outer.insecure,
        }
    }

    fn collector(self) -> Option<CollectorArgs> {
        let Remote {
            collector,
            ca,
            cert,
            key,
            insecure,
        } = self;
        collector.map(|url| CollectorArgs {
            url,
            ca,
            cert,
            key,
            insecure,
        })
    }
}

/// Where sshd is (`enable`, `disable`).
#[derive(clap::Args)]
struct SshdArgs {
    /// sshd's drop-in directory
    #[arg(long, value_name = "DIR", default_value = "/etc/ssh/sshd_config.d")]
    sshd_config_dir: PathBuf,
    /// sshd's main configuration, which must Include the drop-in directory
    #[arg(long, value_name = "FILE", default_value = "/etc/ssh/sshd_config")]
    sshd_config: PathBuf,
    /// The sshd binary, to check the configuration with
    #[arg(long, value_name = "PATH", default_value = "/usr/sbin/sshd")]
    sshd: PathBuf,
    /// What sshd runs for every session: the recorder and its options
    #[arg(long, value_name = "COMMAND", default_value = "/usr/bin/shelltrail-shell")]
    recorder: String,
    /// Do not reload sshd afterwards
    #[arg(long)]
    no_reload: bool,
}

impl SshdArgs {
    fn sshd(self) -> cli::sshd::Sshd {
        cli::sshd::Sshd {
            binary: self.sshd,
            config: self.sshd_config,
            dropin_dir: self.sshd_config_dir,
            recorder: self.recorder,
            reload: !self.no_reload,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the host agent (what the systemd unit starts).
    Agent {
        /// Check the configuration, print the effective settings and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// List recorded sessions.
    Sessions {
        /// One JSON array of every field, for scripts
        #[arg(long)]
        json: bool,
        /// Only the sessions being recorded right now, with how long each has
        /// been idle and how much it recorded (asks this host's agent; with
        /// --collector, the sessions not ended there)
        #[arg(long)]
        live: bool,
        /// Only this user's sessions: the user the agent verified (a login
        /// name, or uid:N), never the name the recorder claims
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// With --collector: only this host's sessions
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
        /// With --collector: only sessions started in this last while (90s, 15m, 2h, 1d)
        #[arg(long, value_name = "DURATION", value_parser = cli::live::duration)]
        since: Option<std::time::Duration>,
        #[command(flatten)]
        remote: Remote,
    },
    /// End a live session on this host (root or [agent] admin_group), or
    /// anywhere through a collector (--collector, the respond role): the
    /// user sees the reason, the recording says who ended it and why.
    Kill {
        /// Session id, or a fragment naming exactly one live session
        id: String,
        /// Why: shown to the user, recorded, logged
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// Also refuse the user's new sessions on this host until `unlock`
        #[arg(long)]
        lock: bool,
        /// Lock for this long only (90s, 15m, 2h, 1d); implies --lock
        #[arg(long = "for", value_name = "DURATION", value_parser = cli::live::duration)]
        lock_for: Option<std::time::Duration>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Follow a live session on this host (root or [agent] admin_group), or
    /// anywhere through a collector (--collector, the view role): its
    /// current screen, then its output as it comes, until it ends.
    Tail {
        /// Session id, or a fragment naming exactly one live session
        id: String,
        /// Only the output bytes as they come (no screen), e.g. for grep
        #[arg(long)]
        raw: bool,
        /// Replay the session so far at full speed, then follow (with
        /// --collector; on a host, from what the agent still holds)
        #[arg(long)]
        from_start: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Let a user locked out by `kill --lock` log in again.
    Unlock {
        /// Login name, or uid:N
        user: String,
        /// With --collector: the host to unlock them on
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show the collector's audit log: who listed, read, tailed, ended or
    /// locked what, and when (the view role). On a host, the agent's audit
    /// trail is in its journal: `journalctl -u shelltrail-agent | grep audit`.
    Audit {
        /// Only entries about this session
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        /// The latest N entries
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// One JSON array, for scripts
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Switch recording on: write sshd's drop-in (every session through the
    /// recorder, bypasses closed, break-glass for [shell] break_glass_group),
    /// check it with `sshd -t`, reload sshd. Root only.
    Enable {
        #[command(flatten)]
        sshd: SshdArgs,
    },
    /// Switch recording off: remove the drop-in, check, reload sshd. Root only.
    Disable {
        #[command(flatten)]
        sshd: SshdArgs,
        /// What the packages run before removing the recorder: also refuse
        /// (non-zero) while sshd_config or a login shell still runs it
        #[arg(long)]
        package_removal: bool,
        /// The passwd database to look for the recorder as login shell in
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/etc/passwd",
            requires = "package_removal"
        )]
        passwd: PathBuf,
    },
    /// Check that this host records every session: sshd's effective
    /// configuration, login shells, the agent. Each finding with its fix;
    /// exit status 2 if recording can be bypassed or is not working, 1 for
    /// warnings.
    Doctor {
        /// One JSON array of findings, for fleet tooling
        #[arg(long)]
        json: bool,
        /// sshd's main configuration
        #[arg(long, value_name = "FILE", default_value = "/etc/ssh/sshd_config")]
        sshd_config: PathBuf,
        /// The sshd binary
        #[arg(long, value_name = "PATH", default_value = "/usr/sbin/sshd")]
        sshd: PathBuf,
    },
    /// Write the man pages and shell completions into DIR (`man/`,
    /// `completions/`): how packaging/man and packaging/completions are made.
    #[command(hide = true)]
    Docs { dir: PathBuf },
    /// Write a session's recording out.
    Export {
        /// Session id (or four or more characters of it naming one session)
        id: String,
        /// Output file [default: stdout]
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// asciicast version: v2 for asciinema 2.x and older players
        #[arg(long, value_enum, default_value = "v3")]
        format: Format,
        /// Exactly the bytes the program wrote, nothing else.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Replay a session in this terminal.
    Play {
        /// Session id (or four or more characters of it naming one session)
        id: String,
        /// Playback speed: 2 plays twice as fast
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Cap pauses at this many seconds.
        #[arg(long)]
        idle_limit: Option<f64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run the collector (the `[collector]` table of the config file).
    Collector,
    /// A small certificate authority for the fleet's mutual TLS.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// Check a stored session: every chunk present, in order, unaltered, and
    /// sealed as a whole by its host's key when it ended.
    Verify {
        /// Session id (or four or more characters of it naming one session)
        id: String,
        /// The host's signing key to check the seal with (ed25519:BASE64, or a
        /// file holding it such as the host's signing.pub) [default: the key
        /// the collector pinned for the host; on a spool, this host's signing.pub]
        #[arg(long, value_name = "KEY")]
        host_key: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Try shelltrail here: a temporary agent and a recorded shell, no root or sshd needed.
    Demo,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA (ca.pem, ca.key) in DIR.
    Init {
        /// Directory for ca.pem and ca.key (created; must not hold a CA already)
        dir: PathBuf,
        /// The CA certificate's common name
        #[arg(long, default_value = "shelltrail CA")]
        name: String,
    },
    /// Issue a certificate (NAME.pem, NAME.key) from the CA in DIR: for a
    /// host, its name is the host's identity at the collector; for the
    /// collector, list every name and address agents use to reach it.
    Issue {
        /// The CA's directory (from `pki init`)
        dir: PathBuf,
        /// File name of the certificate and key.
        name: String,
        /// What it is for: host (an agent ships its sessions), operator (a
        /// person reads sessions), collector (the collector's server
        /// certificate). The collector refuses a client certificate used for
        /// the other role, or without one.
        #[arg(long, value_enum)]
        role: shelltrail::pki::CertRole,
        /// DNS names or IP addresses [default: NAME]
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Valid for this many days from now, 1 to 36500 [default: no expiry]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: Option<u32>,
    },
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        // `shelltrail export ID | head` is not an error worth a message.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::exit(141);
        }
        Err(e) => {
            eprintln!("shelltrail: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> Result<i32> {
    let config = args.config.as_deref();
    let outer = args.remote.clone();
    let source = |remote: Remote| -> Result<Source> {
        Source::open(&cli::load_config(config)?, remote.or(&outer).collector().as_ref())
    };
    match args.cmd {
        Cmd::Agent { check_config } => {
            let cfg = cli::load_config(config)?;
            if check_config {
                // Shipping problems are warnings, not failures: this check is
                // the unit's ExecStartPre, and an agent that does not start
                // refuses every login; one that starts records into its spool
                // and ships once the problem is fixed.
                if let Err(e) = shelltrail::agent::check_ship(&cfg.ship) {
                    eprintln!(
                        "warning: [ship]: {e}. The agent records into its spool but cannot ship until this is fixed."
                    );
                }
                // The agent does not start with an unusable key: neither does this check.
                let signing = shelltrail::agent::signer::describe(&cfg.signing_key())?;
                let effective = toml::to_string(&cfg).context("printing the configuration")?;
                println!("# configuration OK; {signing}\n# in effect, defaults included:\n{effective}");
                return Ok(0);
            }
            init_logging();
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async {
                tokio::select! {
                    r = shelltrail::agent::run(cfg) => r,
                    _ = shutdown() => {
                        tracing::info!("stopping");
                        Ok(())
                    }
                }
            })?;
            Ok(0)
        }
        Cmd::Sessions {
            json,
            live,
            user,
            host,
            since,
            remote,
        } => {
            let remote = remote.or(&outer);
            if live && remote.collector.is_some() {
                let filter = cli::fleet::Filter {
                    host,
                    user,
                    since_unix_ms: since.map(|d| shelltrail::cli::now_ms() - d.as_millis() as i64),
                };
                let mut src = source(remote)?;
                cli::fleet::list(&mut src, &filter, json, &mut std::io::stdout().lock())?;
                return Ok(0);
            }
            if host.is_some() || since.is_some() {
                anyhow::bail!("--host and --since filter a collector's live sessions: add --collector URL and --live");
            }
            if live && remote.collector.is_none() {
                let cfg = cli::load_config(config)?;
                cli::live::list(&cfg, user.as_deref(), json, &mut std::io::stdout().lock())?;
                return Ok(0);
            }
            let mut src = source(remote)?;
            let mut rows = src.list()?;
            if let Some(user) = &user {
                rows.retain(|r| &r.user == user);
            }
            if live {
                rows.retain(|r| r.live);
            }
            cli::sessions::run(&rows, json, &mut std::io::stdout().lock())?;
            if let Some(url) = src.ships_to()
                && !json
            {
                eprintln!(
                    "(this host ships to {url}: sessions already shipped may be kept there only; \
                     list them with `shelltrail --collector {url} sessions`)"
                );
            }
            Ok(0)
        }
        Cmd::Kill {
            id,
            reason,
            lock,
            lock_for,
            remote,
        } => {
            let remote = remote.or(&outer);
            if remote.collector.is_some() {
                return cli::fleet::kill(&mut source(remote)?, &id, &reason, lock, lock_for);
            }
            cli::live::kill(&cli::load_config(config)?, &id, &reason, lock, lock_for)?;
            Ok(0)
        }
        Cmd::Tail {
            id,
            raw,
            from_start,
            remote,
        } => {
            let remote = remote.or(&outer);
            if remote.collector.is_some() {
                return cli::fleet::tail(&mut source(remote)?, &id, raw, from_start);
            }
            cli::live::tail(&cli::load_config(config)?, &id, raw, from_start)
        }
        Cmd::Unlock { user, host, remote } => {
            let remote = remote.or(&outer);
            if remote.collector.is_some() {
                let host = host.context("with --collector, say on which host: --host HOST")?;
                return cli::fleet::unlock(&mut source(remote)?, &host, &user);
            }
            if host.is_some() {
                anyhow::bail!("--host names a host at a collector: add --collector URL (on a host, run unlock there)");
            }
            cli::live::unlock(&cli::load_config(config)?, &user)?;
            Ok(0)
        }
        Cmd::Audit {
            session,
            limit,
            json,
            remote,
        } => {
            let remote = remote.or(&outer);
            if remote.collector.is_none() {
                anyhow::bail!(
                    "the audit log is the collector's: add --collector URL. On this host, the agent's audit \
                     trail is in its journal: journalctl -u shelltrail-agent | grep shelltrail::audit"
                );
            }
            cli::fleet::audit(
                &mut source(remote)?,
                session.as_deref(),
                limit,
                json,
                &mut std::io::stdout().lock(),
            )?;
            Ok(0)
        }
        Cmd::Export {
            id,
            output,
            format,
            raw,
            remote,
        } => {
            let mut src = source(remote)?;
            src.read_for("export");
            match output {
                // A device, a pipe or a link (-o /dev/null, -o /dev/stdout):
                // written to as it is, never replaced.
                Some(p) if std::fs::symlink_metadata(&p).is_ok_and(|m| !m.file_type().is_file()) => {
                    let mut f = std::io::BufWriter::new(
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&p)
                            .with_context(|| format!("opening {}", p.display()))?,
                    );
                    cli::export::run(&mut src, &id, format, raw, &mut f)?;
                    f.flush()?;
                }
                Some(p) => {
                    // A file: written beside it and renamed into place once
                    // whole, so a failed export leaves no empty or partial file.
                    let mut name = p.file_name().unwrap_or_default().to_os_string();
                    name.push(format!(".{}.partial", std::process::id()));
                    let tmp = p.with_file_name(name);
                    let written = (|| -> Result<()> {
                        let mut f = std::io::BufWriter::new(
                            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
                        );
                        cli::export::run(&mut src, &id, format, raw, &mut f)?;
                        f.flush()?;
                        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
                    })();
                    if written.is_err() {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    written?;
                }
                // On a terminal, the recording's JSON lines with control
                // characters escaped (the same JSON); --raw is the program's
                // own bytes, as asked.
                None if !raw && std::io::stdout().is_terminal() => {
                    let mut out = cli::shown::SafeLines::new(std::io::stdout().lock());
                    cli::export::run(&mut src, &id, format, raw, &mut out)?;
                }
                None => cli::export::run(&mut src, &id, format, raw, &mut std::io::stdout().lock())?,
            }
            Ok(0)
        }
        Cmd::Play {
            id,
            speed,
            idle_limit,
            remote,
        } => {
            let mut src = source(remote)?;
            src.read_for("play");
            cli::play::run(&mut src, &id, speed, idle_limit, &mut std::io::stdout().lock())?;
            Ok(0)
        }
        Cmd::Verify { id, host_key, remote } => {
            let key = host_key.as_deref().map(cli::verify::parse_key).transpose()?;
            let mut src = source(remote)?;
            src.read_for("verify");
            let ok = cli::verify::run(&mut src, &id, key.as_ref(), &mut std::io::stdout().lock())?;
            Ok(if ok { 0 } else { 1 })
        }
        Cmd::Enable { sshd } => {
            cli::sshd::enable(&cli::load_config(config)?, &sshd.sshd())?;
            Ok(0)
        }
        Cmd::Disable {
            sshd,
            package_removal: true,
            passwd,
        } => {
            cli::sshd::release(&cli::load_config(config)?, &sshd.sshd(), &passwd)?;
            Ok(0)
        }
        Cmd::Disable { sshd, .. } => {
            cli::sshd::disable(&sshd.sshd())?;
            Ok(0)
        }
        Cmd::Doctor {
            json,
            sshd_config,
            sshd,
        } => cli::doctor::run(
            &cli::load_config(config)?,
            &cli::doctor::Options { sshd, sshd_config },
            json,
        ),
        Cmd::Docs { dir } => {
            write_docs(&dir)?;
            Ok(0)
        }
        Cmd::Demo => cli::demo::run(None),
        Cmd::Collector => {
            let cfg = cli::load_config(config)?;
            let c = cfg.collector.context(
                "no [collector] table in the configuration: uncomment the one at the end of /etc/shelltrail/shelltrail.toml and set listen, data_dir and tls (docs/deployment.md, The collector)",
            )?;
            init_logging();
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(shelltrail_collector::serve(c, shutdown()))?;
            Ok(0)
        }
        Cmd::Pki { cmd } => {
            match cmd {
                PkiCmd::Init { dir, name } => {
                    let ca = shelltrail::pki::Ca::create(&dir, &name)?;
                    println!(
                        "created {} (give it to every host, the collector and operators) and {} (the CA's \
                         private key: whoever holds it can issue certificates for any host or operator; \
                         keep it off the collector and the hosts)",
                        ca.cert_path().display(),
                        dir.join("ca.key").display()
                    );
                }
                PkiCmd::Issue {
                    dir,
                    name,
                    role,
                    sans,
                    days,
                } => {
                    let sans = if sans.is_empty() { vec![name.clone()] } else { sans };
                    let (c, k) = shelltrail::pki::Ca::open(&dir)?.issue_for(&name, &sans, role, days)?;
                    println!("issued {} and {}", c.display(), k.display());
                }
            }
            Ok(0)
        }
    }
}

/// The man pages of `shelltrail`, each of its subcommands and
/// `shelltrail-shell`, and the bash and zsh completions.
fn write_docs(dir: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(Args::command(), &man)?;
    clap_mangen::Man::new(recorder_command()).generate_to(&man)?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
        clap_complete::generate_to(shell, &mut Args::command(), "shelltrail", &completions)?;
    }
    Ok(())
}

/// `shelltrail-shell`'s command line, for its man page (it parses its own,
/// strictly: shell/command.rs).
fn recorder_command() -> clap::Command {
    use clap::{Arg, ArgAction, Command};
    Command::new("shelltrail-shell")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Record an SSH session: the ForceCommand or login shell sshd runs")
        .long_about(
            "Records every shell, exec and subsystem session sshd starts through it, as asciicast v3 \
             chunks sent to the shelltrail agent. Installed set-uid to the recorder's system user \
             (recorder_user) with the capabilities cap_chown and cap_sys_tty_config; `shelltrail enable` \
             makes sshd run it. See /usr/share/doc/shelltrail/docs/deployment.md.",
        )
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("PATH")
                .help("Configuration file, root's only, under /etc/shelltrail in an SSH session [default: /etc/shelltrail/shelltrail.toml]"),
        )
        .arg(Arg::new("break-glass").long("break-glass").action(ArgAction::SetTrue).help(
            "For members of [shell] break_glass_group: never refused because the agent is away; recorded to \
             fallback_dir meanwhile, logged loudly",
        ))
        .arg(
            Arg::new("command")
                .short('c')
                .value_name("COMMAND")
                .help("Run COMMAND (as sshd does for an exec request) instead of the login shell"),
        )
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // journald (or a file) gets plain text; colours only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
