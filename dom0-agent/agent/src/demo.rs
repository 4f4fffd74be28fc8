//! `dom0-agent demo`: bank transfers over the ledger, in-process (no domains yet).
//!
//! Each transfer is one ledger transaction: read two balances, move money unless that
//! would overdraw, commit (retrying on a serialization conflict). The total across all
//! accounts never changes; the demo checks that, and verifies the chains, at the end.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use mayfly_ledger::{codec, verify, Ledger, Options, Tx, TxContext, TxId};
use slog::Logger;

/// Arguments of `demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Data directory (created on first use).
    #[arg(long, default_value = "./mayfly-data")]
    data_dir: PathBuf,
    /// Number of accounts (created with a balance of 1000 on first use).
    #[arg(long, default_value_t = 100)]
    accounts: u32,
    /// Transfers to commit; 0 runs until the process is stopped.
    #[arg(long, default_value_t = 20_000)]
    transfers: u64,
    /// Client threads submitting transfers concurrently.
    #[arg(long, default_value_t = 8)]
    threads: u32,
    /// Print `ack <seq> <tx_id>` on stdout as each commit becomes durable.
    #[arg(long)]
    print_acks: bool,
}

const START_BALANCE: u64 = 1000;

fn account(i: u32) -> Vec<u8> {
    format!("acct/{i:06}").into_bytes()
}

fn balance(tx: &mut Tx, key: &[u8]) -> anyhow::Result<u64> {
    let Some(v) = tx.get(key)? else {
        bail!("account {} does not exist", String::from_utf8_lossy(key))
    };
    std::str::from_utf8(&v)
        .ok()
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "account {} holds a non-numeric balance",
                String::from_utf8_lossy(key)
            )
        })
}

fn context(handler: &str, request: Vec<u8>) -> TxContext {
    TxContext {
        tx_id: TxId::generate(),
        handler: handler.into(),
        request,
        domain_id: 0,
        policy_hash: [0; 32],
    }
}

fn seed(ledger: &Ledger, accounts: u32) -> anyhow::Result<()> {
    let mut tx = ledger.begin(context("seed", format!("accounts={accounts}").into_bytes()))?;
    if tx.get(&account(0))?.is_some() {
        return Ok(());
    }
    for i in 0..accounts {
        tx.put(&account(i), START_BALANCE.to_string().as_bytes())?;
    }
    tx.commit(b"seeded".to_vec())?;
    Ok(())
}

/// Runs the demo; returns the exit code.
pub fn run(args: &DemoArgs, log: &Logger) -> anyhow::Result<u8> {
    if args.accounts < 2 || args.accounts > 1000 {
        bail!("--accounts must be 2..=1000 (one seed transaction writes them all)");
    }
    let ledger = Ledger::open(&args.data_dir, &Options::default(), log)
        .with_context(|| format!("cannot open the ledger in {}", args.data_dir.display()))?;
    seed(&ledger, args.accounts)?;
    let done = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for t in 0..args.threads.max(1) {
        let (ledger, done, conflicts) = (ledger.clone(), done.clone(), conflicts.clone());
        let (accounts, total, acks) = (args.accounts, args.transfers, args.print_acks);
        workers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut rng = fastrand::Rng::with_seed(
                u64::from(t) ^ mayfly_ledger::TxId::generate().0[0] as u64,
            );
            loop {
                if total != 0 && done.fetch_add(1, Ordering::Relaxed) >= total {
                    return Ok(());
                }
                let from = rng.u32(..accounts);
                let to = (from + rng.u32(1..accounts)) % accounts;
                let amount = rng.u64(1..=100);
                let request =
                    format!("{{\"from\":{from},\"to\":{to},\"amount\":{amount}}}").into_bytes();
                loop {
                    let mut tx = ledger.begin(context("transfer", request.clone()))?;
                    let id = tx.id();
                    let (a, b) = (
                        balance(&mut tx, &account(from))?,
                        balance(&mut tx, &account(to))?,
                    );
                    let result = if a < amount {
                        b"rejected: insufficient funds".to_vec()
                    } else {
                        tx.put(&account(from), (a - amount).to_string().as_bytes())?;
                        tx.put(&account(to), (b + amount).to_string().as_bytes())?;
                        b"ok".to_vec()
                    };
                    match tx.commit(result) {
                        Ok(r) => {
                            if acks {
                                let mut out = std::io::stdout().lock();
                                writeln!(out, "ack {} {}", r.seq, id)?;
                                out.flush()?;
                            }
                            break;
                        }
                        Err(e) if e.is_conflict() => {
                            conflicts.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }));
    }
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a transfer thread panicked"))??;
    }
    let elapsed = started.elapsed();
    let committed = args.transfers;
    let snapshot = ledger.store().data_snapshot()?;
    let total: u64 = snapshot
        .iter()
        .filter(|(k, _)| k.starts_with(b"acct/"))
        .map(|(_, v)| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    let expected = u64::from(args.accounts) * START_BALANCE;
    println!(
        "committed {committed} transfers in {elapsed:.2?} ({:.0} tx/s, {} conflicts retried), {} threads",
        committed as f64 / elapsed.as_secs_f64(),
        conflicts.load(Ordering::Relaxed),
        args.threads
    );
    println!(
        "total balance {total} (expected {expected}); chain tip {}",
        ledger.tips().checkpoints.seq
    );
    let report = verify(ledger.store(), &[ledger.public_key()], &mut |_| {})?;
    if report.ok() {
        println!(
            "verify: OK ({} checkpoints, {} audit records, {} signed heads, key {})",
            report.checkpoints,
            report.audit,
            report.heads,
            codec::hex(&ledger.public_key())
        );
    } else {
        println!("verify: FAILED: {}", report.failures[0]);
        return Ok(crate::exit::VERIFY_FAILED);
    }
    if total != expected {
        bail!("total balance changed: {total} != {expected}");
    }
    Ok(0)
}
