//! `dom0-agent`: the Mayfly control-domain agent.
//!
//! Exit codes: 0 success; 1 verification found a bad record; 2 usage error; 3 the data
//! directory could not be opened or used (I/O, corruption, missing key); 4 `serve` refused
//! to start because the live data does not match the state digest of the last signed head
//! (the data was altered outside the ledger; `verify` names the keys).

#![forbid(unsafe_code)]

mod demo;
mod policy;
mod report;
mod serve;
mod verify_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slog::{o, Drain, Logger};

/// Exit code: verification failed.
pub const EXIT_VERIFY_FAILED: u8 = 1;
/// Exit code: the data directory could not be opened or used.
pub const EXIT_STORAGE: u8 = 3;
/// Exit code: `serve` refused altered live data (issue 16).
pub const EXIT_STATE_MISMATCH: u8 = 4;

#[derive(Parser)]
#[command(
    name = "dom0-agent",
    version,
    about = "Mayfly control-domain agent: runs each transaction in a fresh domain over a verifiable, signed ledger"
)]
struct Cli {
    /// Debug log level on stderr: error, warning, info, debug.
    #[arg(long, global = true, default_value = "warning")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a ledger (and its signing key) in DIR if none exists; print its public key.
    Init {
        /// Data directory (created with mode 0700 if missing).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Walk both hash chains, check every link and signature, name the first bad record.
    /// Exits 0 only if everything holds.
    Verify(verify_cmd::VerifyArgs),
    /// Print the ledger's Ed25519 public key (hex), to pin it with `verify --public-key`.
    ExportKey {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Run the appliance: client API on loopback, one fresh domain per transaction, every
    /// commit checkpointed in the ledger. SIGHUP reloads the policy bundle; SIGINT/SIGTERM stop.
    Serve(Box<serve::ServeArgs>),
    /// Report a transaction, key, handler or client as part of an attack to a running agent
    /// (authenticated with its detector token); its policy decides, e.g. roll back and replay.
    Report(report::ReportArgs),
    /// Ledger demo: bank transfers between accounts from several threads, each a signed,
    /// checkpointed transaction, in-process (no domains); prints throughput and verifies.
    Demo(demo::DemoArgs),
}

fn logger(level: &str) -> Logger {
    let level = match level {
        "error" => slog::Level::Error,
        "info" => slog::Level::Info,
        "debug" => slog::Level::Debug,
        _ => slog::Level::Warning,
    };
    let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let drain = slog_term::FullFormat::new(decorator)
        .build()
        .filter_level(level)
        .fuse();
    Logger::root(drain, o!())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = logger(&cli.log_level);
    let result = match cli.command {
        Command::Init { data_dir } => init(&data_dir, &log),
        Command::Verify(args) => verify_cmd::run(&args),
        Command::ExportKey { data_dir } => export_key(&data_dir),
        Command::Serve(args) => serve::run(&args, &log),
        Command::Report(args) => report::run(&args),
        Command::Demo(args) => demo::run(&args, &log),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("dom0-agent: error: {e:#}");
            ExitCode::from(EXIT_STORAGE)
        }
    }
}

fn init(dir: &std::path::Path, log: &Logger) -> anyhow::Result<u8> {
    let ledger = mayfly_ledger::Ledger::open(dir, &mayfly_ledger::Options::default(), log)?;
    println!("{}", mayfly_ledger::codec::hex(&ledger.public_key()));
    Ok(0)
}

fn export_key(dir: &std::path::Path) -> anyhow::Result<u8> {
    let store = mayfly_ledger::store::open_read_only(dir, &mayfly_ledger::StoreOptions::default())?;
    println!("{}", mayfly_ledger::codec::hex(&store.public_key()?));
    Ok(0)
}
