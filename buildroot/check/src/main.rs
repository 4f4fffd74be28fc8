//! `br-check`: checks Mayfly's BR2_EXTERNAL tree for broken references (see the
//! `mayfly_br_check` crate docs for the list).
//!
//! Usage: `br-check [--shellcheck] [TREE]` (TREE defaults to `buildroot`; the workspace is
//! its parent). Prints one line per finding; exits 0 if there is no error, 1 if there is one,
//! 2 for a usage error, 3 if the check could not run.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use mayfly_br_check::{check_tree, Options, Severity};

const USAGE: &str = "usage: br-check [--shellcheck] [TREE]
Checks the BR2_EXTERNAL tree TREE (default: buildroot) and the workspace around it for broken
references; --shellcheck also runs shellcheck on every shell script.
Exit status: 0 no error, 1 errors found, 2 usage error, 3 the check could not run.";

fn main() -> ExitCode {
    let mut shellcheck = false;
    let mut tree: Option<PathBuf> = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--shellcheck" => shellcheck = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            a if a.starts_with('-') || tree.is_some() => {
                eprintln!("br-check: unexpected argument {a:?}\n{USAGE}");
                return ExitCode::from(2);
            }
            a => tree = Some(PathBuf::from(a)),
        }
    }
    let tree = tree.unwrap_or_else(|| PathBuf::from("buildroot"));
    let workspace = tree
        .canonicalize()
        .ok()
        .and_then(|t| t.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    let opts = Options {
        tree: tree.clone(),
        workspace,
        shellcheck,
    };
    match check_tree(&opts) {
        Ok(findings) => {
            for finding in &findings {
                println!("{finding}");
            }
            let errors = findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count();
            let warnings = findings.len() - errors;
            println!(
                "br-check: {}: {errors} error(s), {warnings} warning(s)",
                tree.display()
            );
            if errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("br-check: {e}");
            ExitCode::from(3)
        }
    }
}
