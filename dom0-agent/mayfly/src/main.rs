//! `mayfly`: the operator's command-line tool.
//!
//! - `mayfly admin …` — signed admin console commands sent to a running agent.
//! - `mayfly hw-check` — checks this host against a supported server profile.
//!
//! Exit codes: 0 success; 1 the command ran and its answer is negative (a check failed, a
//! command was rejected); 2 usage error; 3 the command could not be carried out (I/O, no
//! agent reachable).

#![forbid(unsafe_code)]

mod admin;
mod admin_table;
mod attest;
mod hw_check;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code: the command could not be carried out.
pub const EXIT_ERROR: u8 = 3;

#[derive(Parser)]
#[command(name = "mayfly", version, about = "Mayfly operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Signed admin console: key generation and commands sent to a running agent.
    Admin(admin::AdminArgs),
    /// Check this host against a supported server profile (hw/profiles); exits 0 only if
    /// every required requirement passes.
    HwCheck(hw_check::HwCheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Admin(args) => admin::run(&args),
        Command::HwCheck(args) => hw_check::run(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("mayfly: error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
