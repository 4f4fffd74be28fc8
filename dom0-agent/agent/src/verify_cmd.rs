//! `dom0-agent verify`: the full chain walk, with progress and a clear verdict.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use mayfly_ledger::{codec, keys, promotion_keys, store, verify, Failure, Progress, StoreOptions};

/// Arguments of `verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Data directory of the ledger.
    #[arg(long)]
    data_dir: PathBuf,
    /// Trust only this Ed25519 public key (64 hex digits, as printed by `export-key`: the
    /// ledger's first key; key rotations are followed from it). Repeat it for the key of
    /// each promoted standby (printed by `dom0-agent promote`): a promotion head signed by
    /// a key not given here is refused.
    /// Without it, the key recorded in the ledger itself and the keys of its own promotion
    /// heads are trusted, which proves integrity but not that the ledger is the
    /// appliance's own.
    #[arg(long)]
    public_key: Vec<String>,
    /// Print the verdict as JSON on stdout: `checkpoints` and `audit` are the records
    /// stored in each chain (counted alike whatever breaks it), `failures` where it broke.
    #[arg(long)]
    json: bool,
    /// No progress on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(serde::Serialize)]
struct JsonFailure {
    chain: &'static str,
    seq: Option<u64>,
    problem: String,
    message: String,
    /// For a live-state failure: the keys that differ (printable as text, else `0x` hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<serde_json::Value>,
}

fn to_json(f: &Failure) -> JsonFailure {
    let mut keys = None;
    let (chain, seq, problem) = match f {
        Failure::Checkpoint { seq, problem } => ("checkpoints", Some(*seq), problem.clone()),
        Failure::Audit { seq, problem } => ("audit", Some(*seq), problem.clone()),
        Failure::Head { group, problem } => ("heads", Some(*group), problem.clone()),
        Failure::Meta { problem } => ("meta", None, problem.clone()),
        Failure::State { problem, diff } => {
            let show = |ks: &[Vec<u8>]| -> Vec<String> {
                ks.iter()
                    .map(|k| mayfly_ledger::state::show_key(k))
                    .collect()
            };
            keys = Some(serde_json::json!({
                "altered": show(&diff.altered),
                "added": show(&diff.added),
                "missing": show(&diff.missing),
            }));
            ("state", None, problem.clone())
        }
        Failure::UndoneIndex { seq, problem } => ("undone_index", Some(*seq), problem.clone()),
    };
    JsonFailure {
        chain,
        seq,
        problem,
        message: f.to_string(),
        keys,
    }
}

/// Runs `verify`; returns the process exit code.
pub fn run(args: &VerifyArgs) -> anyhow::Result<u8> {
    let store = store::open_read_only(&args.data_dir, &StoreOptions::default())
        .with_context(|| format!("cannot open the ledger in {}", args.data_dir.display()))?;
    let recorded = store.public_key()?;
    let trusted: Vec<keys::PublicKey> = if args.public_key.is_empty() {
        let mut trusted = vec![recorded];
        trusted.extend(promotion_keys(&store).context("reading the ledger's heads")?);
        if !args.quiet && !args.json {
            eprintln!(
                "verify: trusting the key recorded in the ledger ({}){}; pin it with --public-key for an independent check",
                codec::hex(&recorded),
                match trusted.len() {
                    1 => String::new(),
                    n => format!(" and the {} key(s) its promotion heads name", n - 1),
                }
            );
        }
        trusted
    } else {
        args.public_key
            .iter()
            .map(|text| {
                keys::parse_public_key(text)
                    .with_context(|| format!("--public-key {text:?} is not 64 hex digits"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let tty = std::io::stderr().is_terminal();
    let quiet = args.quiet;
    let mut last = Instant::now();
    let started = Instant::now();
    let mut progress = |p: Progress| {
        if quiet || (p.done < p.total && last.elapsed() < Duration::from_millis(500)) {
            return;
        }
        last = Instant::now();
        let pct = p
            .done
            .saturating_mul(100)
            .checked_div(p.total)
            .unwrap_or(100);
        let mut err = std::io::stderr().lock();
        let end = if tty && p.done < p.total { "\r" } else { "\n" };
        let _ = write!(
            err,
            "verify: {:<11} {:>10}/{:<10} ({pct:>3}%){end}",
            p.chain, p.done, p.total
        );
    };
    let report = verify(&store, &trusted, &mut progress).context("reading the ledger")?;
    let elapsed = started.elapsed();

    if args.json {
        let out = serde_json::json!({
            "ok": report.ok(),
            "checkpoints": report.checkpoints,
            "audit": report.audit,
            "heads": report.heads,
            "key_rotations": report.rotations,
            "promotions": report.promotions,
            "state_entries": report.state_entries,
            "public_key": trusted.first().map(|k| codec::hex(k)),
            "trusted_keys": trusted.iter().map(|k| codec::hex(k)).collect::<Vec<_>>(),
            "failures": report.failures.iter().map(to_json).collect::<Vec<_>>(),
        });
        println!("{out}");
    } else if report.ok() {
        let rotations = match (report.rotations, report.promotions) {
            (0, 0) => String::new(),
            (r, 0) => format!(", across {r} key rotation(s)"),
            (0, p) => format!(", across {p} promotion(s)"),
            (r, p) => format!(", across {r} key rotation(s) and {p} promotion(s)"),
        };
        let state = match report.state_entries {
            Some(n) => format!(", live state of {n} keys"),
            None => ", live state not committed by this ledger's heads (written before the state digest; the next start adds it)".into(),
        };
        println!(
            "OK: {} checkpoints, {} audit records, {} signed heads{state} verified in {:.2?} (key {}{rotations})",
            report.checkpoints,
            report.audit,
            report.heads,
            elapsed,
            trusted
                .iter()
                .map(|k| codec::hex(k))
                .collect::<Vec<_>>()
                .join(", ")
        );
    } else {
        println!(
            "FAILED: {}",
            report
                .failures
                .first()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        for f in report.failures.iter().skip(1) {
            println!("  also: {f}");
        }
    }
    Ok(if report.ok() {
        0
    } else {
        crate::exit::VERIFY_FAILED
    })
}
