//! `shelltrail`: the host agent daemon (`shelltrail agent`) and the operator CLI.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shelltrail::cli::{self, Store, export::Format};
use std::io::Write;
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
    #[command(subcommand)]
    cmd: Cmd,
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
        #[arg(long)]
        json: bool,
    },
    /// Write a session's recording out.
    Export {
        /// Session id (or a unique prefix)
        id: String,
        /// Output file [default: stdout]
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "v3")]
        format: Format,
        /// Exactly the bytes the program wrote, nothing else.
        #[arg(long)]
        raw: bool,
    },
    /// Replay a session in this terminal.
    Play {
        id: String,
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Cap pauses at this many seconds.
        #[arg(long)]
        idle_limit: Option<f64>,
    },
    /// Try shelltrail here: a temporary agent and a recorded shell, no root or sshd needed.
    Demo,
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("shelltrail: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> Result<i32> {
    let config = args.config.as_deref();
    match args.cmd {
        Cmd::Agent { check_config } => {
            let cfg = cli::load_config(config)?;
            if check_config {
                println!("configuration OK");
                println!("{cfg:#?}");
                return Ok(0);
            }
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
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
        Cmd::Sessions { json } => {
            let store = Store::open(&cli::load_config(config)?)?;
            cli::sessions::run(&store, json, &mut std::io::stdout().lock())?;
            Ok(0)
        }
        Cmd::Export {
            id,
            output,
            format,
            raw,
        } => {
            let store = Store::open(&cli::load_config(config)?)?;
            match output {
                Some(p) => {
                    let mut f = std::io::BufWriter::new(
                        std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?,
                    );
                    cli::export::run(&store, &id, format, raw, &mut f)?;
                    f.flush()?;
                }
                None => cli::export::run(&store, &id, format, raw, &mut std::io::stdout().lock())?,
            }
            Ok(0)
        }
        Cmd::Play { id, speed, idle_limit } => {
            let store = Store::open(&cli::load_config(config)?)?;
            cli::play::run(&store, &id, speed, idle_limit, &mut std::io::stdout().lock())?;
            Ok(0)
        }
        Cmd::Demo => cli::demo::run(None),
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
