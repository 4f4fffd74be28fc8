//! `dom0-agent`: the Mayfly control-domain agent.
//!
//! Exit codes: 0 success; 1 verification found a bad record; 2 usage error; 3 the data
//! directory could not be opened or used (I/O, corruption, missing key); 4 `serve` refused
//! to start because the live data does not match the state digest of the last signed head
//! (the data was altered outside the ledger; `verify` names the keys); 5 the signing key
//! exists but its source will not release it (a TPM-sealed key on a changed boot chain or
//! another TPM): nothing is signed, the refusal is audited at the next start that can sign.

#![forbid(unsafe_code)]

mod breakglass;
mod config;
mod demo;
mod exit;
mod keysource;
mod policy;
mod promote;
mod replication;
mod report;
mod serve;
mod update;
mod verify_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slog::{o, Drain, Logger};

#[derive(Parser)]
#[command(
    name = "dom0-agent",
    version,
    about = "Mayfly control-domain agent: runs each transaction in a fresh domain over a verifiable, signed ledger"
)]
struct Cli {
    /// Level of the agent's own log on stderr: critical, error, warning, info, debug, trace
    /// (an unknown level is refused).
    #[arg(long, global = true, default_value = "warning")]
    log_level: String,
    /// Format of the agent's own log on stderr: "term" (human-readable lines) or "json" (one
    /// JSON object per line, for journald and SIEM collectors).
    #[arg(long, global = true, default_value = "term")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a ledger (and its signing key) in DIR if none exists; print its public key.
    /// With --key-source tpm the key is sealed to the TPM's current PCR values.
    Init {
        /// Data directory (created with mode 0700 if missing).
        #[arg(long)]
        data_dir: PathBuf,
        /// Configuration file: its [key] section is read (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        key: config::SigningKeyFlags,
    },
    /// Seal the TPM-sealed signing key also to the PCR values in an expected-PCR file (an
    /// update's image, docs/formats.md §4.2), on the current good boot. Writes the sealed
    /// file not in use now (signing.sealed or signing.sealed.alt) and prints its path.
    Reseal {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The expected-PCR file of the image to boot next.
        #[arg(long)]
        expected_pcrs: PathBuf,
        /// With the image build's file (one line per A/B boot state): the state to seal to,
        /// as its label, e.g. "slot=b try=- tries=0 entry=production-b".
        #[arg(long)]
        state: Option<String>,
        /// Configuration file: its [key] section is read (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        key: config::SigningKeyFlags,
    },
    /// Before an A/B update switches from slot FROM to slot TO: seal the TPM-sealed signing
    /// key to every boot the switch can lead to, in one blob (TPM2_PolicyOR): the trial
    /// boots of TO (TRIES of them), TO once committed (both from NEXT_PCRS, the update's
    /// expected-PCR file), and the fallback to FROM (from CURRENT_PCRS, the running image's).
    /// Run by `mayfly-update install` on the current good boot before it arms the trial;
    /// writes the sealed file not in use now and prints its path. With the file key source
    /// there is nothing to seal: it says so and exits 0.
    ResealSwitch {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The running (committed) slot: a or b.
        #[arg(long, value_parser = ["a", "b"])]
        from: String,
        /// The slot the update is installed to: a or b, not FROM.
        #[arg(long, value_parser = ["a", "b"])]
        to: String,
        /// Trial boots the install arms (grubenv's mayfly_tries, 1..=3).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
        tries: u8,
        /// Expected-PCR file of the running image (docs/formats.md §4.2; the image build's, with a
        /// state per A/B boot state).
        #[arg(long)]
        current_pcrs: PathBuf,
        /// Expected-PCR file of the update's image (as --current-pcrs).
        #[arg(long)]
        next_pcrs: PathBuf,
        /// Configuration file: its [key] section is read (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        key: config::SigningKeyFlags,
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
    /// Run the appliance: client API (loopback, or TLS/mutual TLS elsewhere), one fresh domain
    /// per transaction, every commit checkpointed in the ledger. SIGHUP reloads the policy
    /// bundle and the TLS certificates; SIGINT/SIGTERM stop.
    Serve(Box<serve::ServeArgs>),
    /// Follow a primary as its standby (`[replication]` role "standby", docs/failover.md):
    /// every group it ships is checked (links, signatures, epoch, live state) before it is
    /// journaled (`DATA_DIR/replication.journal`, one flush), acknowledged and applied to
    /// the copy. SIGINT/SIGTERM stop; exit 6 on a fork, 7 when refused.
    Standby(replication::StandbyArgs),
    /// Promote a stopped standby to primary with a co-signed `promote` command (`mayfly
    /// admin prepare … promote --epoch N`): the standby's replication journal is applied
    /// first (its tentative last group included), then the copy gets the promotion group
    /// of the next epoch, signed by the standby's own key; then `serve` opens it. Exit 8
    /// when the command is refused (docs/failover.md).
    Promote(promote::PromoteArgs),
    /// List, as JSON lines, the checkpoint records a fenced former primary holds that its
    /// promoted standby never received (after the last one the promotion kept; read from
    /// DATA_DIR/fenced). Reads only.
    Unreplicated(promote::UnreplicatedArgs),
    /// Report a transaction, key, handler or client as part of an attack to a running agent
    /// (authenticated with its detector token); its policy decides, e.g. roll back and replay.
    Report(report::ReportArgs),
    /// Ledger demo: bank transfers between accounts from several threads, each a signed,
    /// checkpointed transaction, in-process (no domains); prints throughput and verifies.
    Demo(demo::DemoArgs),
}

/// Parses `--log-level`; an unknown level is an error, never a silent fallback.
fn parse_level(level: &str) -> Result<slog::Level, String> {
    match level {
        "critical" => Ok(slog::Level::Critical),
        "error" => Ok(slog::Level::Error),
        "warning" | "warn" => Ok(slog::Level::Warning),
        "info" => Ok(slog::Level::Info),
        "debug" => Ok(slog::Level::Debug),
        "trace" => Ok(slog::Level::Trace),
        other => Err(format!(
            "unknown --log-level {other:?}; use critical, error, warning, info, debug or trace"
        )),
    }
}

fn logger(level: &str, format: &str) -> Result<Logger, String> {
    let level = parse_level(level)?;
    Ok(match format {
        "term" => {
            let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
            // A failed write to stderr (EPIPE once the reader is gone, a full disk behind
            // a redirect) loses that line, never the agent: `Fuse` would panic on it, and
            // a panic is an abort in release builds.
            let drain = slog_term::FullFormat::new(decorator)
                .build()
                .ignore_res()
                .filter_level(level)
                .fuse();
            Logger::root(drain, o!())
        }
        "json" => {
            let drain = slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build();
            // One line per record from any thread: the mutex serializes the writer. Write
            // errors are dropped with their line, as above.
            let drain = std::sync::Mutex::new(drain)
                .ignore_res()
                .filter_level(level)
                .fuse();
            Logger::root(drain, o!())
        }
        other => return Err(format!("unknown --log-format {other:?}; use term or json")),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = match logger(&cli.log_level, &cli.log_format) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("dom0-agent: error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Init {
            data_dir,
            config,
            key,
        } => key_settings(config.as_deref(), &key).and_then(|k| init(&data_dir, &k, &log)),
        Command::Reseal {
            data_dir,
            expected_pcrs,
            state,
            config,
            key,
        } => key_settings(config.as_deref(), &key)
            .and_then(|k| keysource::reseal(&data_dir, &k, &expected_pcrs, state.as_deref())),
        Command::ResealSwitch {
            data_dir,
            from,
            to,
            tries,
            current_pcrs,
            next_pcrs,
            config,
            key,
        } => key_settings(config.as_deref(), &key).and_then(|k| {
            keysource::reseal_switch(
                &data_dir,
                &k,
                &keysource::Switch {
                    from: &from,
                    to: &to,
                    tries,
                    current: &current_pcrs,
                    next: &next_pcrs,
                },
            )
        }),
        Command::Verify(args) => verify_cmd::run(&args),
        Command::ExportKey { data_dir } => export_key(&data_dir),
        Command::Serve(args) => serve::run(&args, &log),
        Command::Standby(args) => replication::run_standby(&args, &log),
        Command::Promote(args) => promote::run(&args, &log),
        Command::Unreplicated(args) => promote::run_unreplicated(&args),
        Command::Report(args) => report::run(&args),
        Command::Demo(args) => demo::run(&args, &log),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("dom0-agent: error: {e:#}");
            ExitCode::from(exit::STORAGE)
        }
    }
}

/// The `[key]` section of `config` (if given; the whole file is checked as `serve` checks
/// it) under the flags.
fn key_settings(
    config: Option<&std::path::Path>,
    flags: &config::SigningKeyFlags,
) -> anyhow::Result<keysource::KeySettings> {
    keysource::KeySettings::from_config(&config::load_key(flags, config)?)
}

fn init(dir: &std::path::Path, key: &keysource::KeySettings, log: &Logger) -> anyhow::Result<u8> {
    let options = mayfly_ledger::Options {
        keys: key.store()?,
        ..mayfly_ledger::Options::default()
    };
    let ledger = mayfly_ledger::Ledger::open(dir, &options, log)?;
    // With the TPM: the attestation key enters the signed chain at provisioning (the
    // `tpm.quote` record's `ak`), where the operator pins it from.
    key.boot_quote(&ledger, log);
    println!("{}", mayfly_ledger::codec::hex(&ledger.public_key()));
    Ok(0)
}

fn export_key(dir: &std::path::Path) -> anyhow::Result<u8> {
    let store = mayfly_ledger::store::open_read_only(dir, &mayfly_ledger::StoreOptions::default())?;
    println!("{}", mayfly_ledger::codec::hex(&store.public_key()?));
    Ok(0)
}
