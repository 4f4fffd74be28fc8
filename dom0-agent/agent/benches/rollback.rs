//! Rollback time against the number of dependents (10, 100, 1,000), without and with replay.
//!
//! Each run builds a fresh ledger: accounts are seeded, an attack mints money into
//! `acct/hot`, then N transfers each move 1 from `acct/hot` to another account — each reads
//! what the previous one wrote, so all N depend on the attack. The dependents are committed
//! in-process (the transfer handler over the ledger: same checkpoints as through a domain, so
//! setting up 1,000 of them is quick). Then the attack is reported and timed:
//!
//! * `rollback`          — plan (affected set, restored values) and apply, one atomic record;
//! * `rollback + replay` — the same, then every dependent re-run in commit order, each in a
//!   fresh sandbox domain (permissive policy), against the repaired state; each replay
//!   commits (the account held enough legitimate money), as a real replay mostly would.
//!
//! Run: `cargo bench -p dom0-agent --bench rollback` (`BENCH_REPS`, default 3; medians).
#![allow(
    missing_docs,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

mod common;
use common::{log, LedgerDb};

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_executor::{Executor, ExecutorConfig};
use mayfly_ledger::{Ledger, Options, TxContext, TxId};
use mayfly_sandbox::{Sandbox, SandboxConfig};
use mayfly_sdk::Ctx;

/// Runs `handler` in-process as one committed ledger transaction; returns its sequence.
fn commit(ledger: &Ledger, handler: &str, payload: &str) -> u64 {
    let f = mayfly_handlers::registry().get(handler).unwrap();
    let mut tx = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: handler.into(),
            request: payload.as_bytes().to_vec(),
            domain_id: 0,
            policy_hash: [0; 32],
        })
        .unwrap();
    let result = {
        let mut db = LedgerDb(&mut tx);
        let mut ctx = Ctx::new(&mut db, [0; 16], [0; 32]);
        f(&mut ctx, payload.as_bytes()).unwrap()
    };
    tx.commit(result).unwrap().seq
}

/// A ledger with an attack and `n` dependents; returns the ledger and the attack's sequence.
fn scenario(dir: &Path, n: usize) -> (Ledger, u64) {
    let ledger = Ledger::open(dir, &Options::default(), &log()).unwrap();
    // `hot` holds exactly enough legitimate money for the n transfers, so every replay
    // commits again (with different balances in its result than the original).
    commit(
        &ledger,
        "open_account",
        &format!("{{\"name\":\"hot\",\"balance\":{n}}}"),
    );
    for name in ["u0", "u1", "u2", "u3"] {
        commit(
            &ledger,
            "open_account",
            &format!("{{\"name\":\"{name}\",\"balance\":0}}"),
        );
    }
    // The attack: writes a balance out of thin air (what the notes exploit does).
    let attack = {
        let mut tx = ledger
            .begin(TxContext {
                tx_id: TxId::generate(),
                handler: "notes".into(),
                request: br#"{"user":"m","note_id":"../../acct/hot","text":"1000000"}"#.to_vec(),
                domain_id: 0,
                policy_hash: [0; 32],
            })
            .unwrap();
        tx.put(b"acct/hot", b"1000000").unwrap();
        tx.commit(Vec::new()).unwrap().seq
    };
    for i in 0..n {
        commit(
            &ledger,
            "transfer",
            &format!("{{\"from\":\"hot\",\"to\":\"u{}\",\"amount\":1}}", i % 4),
        );
    }
    (ledger, attack)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let reps: usize = if measuring {
        std::env::var("BENCH_REPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3)
    } else {
        1
    };
    let sizes: &[usize] = if measuring { &[10, 100, 1000] } else { &[10] };
    // The template: as in the transactions bench, BENCH_ZYGOTE may name the static build.
    let zygote = std::env::var_os("BENCH_ZYGOTE")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_mayfly-zygote").into());
    let root = tempfile::Builder::new()
        .prefix("mayfly-rollbackbench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    println!("rollback bench: {reps} repetitions, medians");
    let permissive = || {
        mayfly_policy::Bundle::load(&[("allow.toml", "[engine]\nunlisted_handler = \"allow\"\n")])
            .unwrap()
    };
    for &n in sizes {
        let (mut plain, mut replayed) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            let d = root.path().join(format!("plain-{n}-{rep}"));
            let (ledger, attack) = scenario(&d, n);
            let t = Instant::now();
            let (plan, _) = ledger.rollback(&[attack], true, "bench", [0; 32]).unwrap();
            plain.push(t.elapsed());
            assert_eq!(plan.affected.len(), n + 1);

            let d = root.path().join(format!("replay-{n}-{rep}"));
            let (ledger, attack) = scenario(&d.join("data"), n);
            let mut config = SandboxConfig::new(&zygote, Vec::<String>::new(), d.join("run"));
            config.pool_size = 16;
            let backend = Arc::new(Sandbox::start(config, log()).unwrap());
            let names = mayfly_handlers::registry()
                .names()
                .map(str::to_owned)
                .collect::<Vec<_>>();
            let ex = Arc::new(Executor::new(
                ledger.clone(),
                backend.clone(),
                names,
                ExecutorConfig::default(),
                permissive(),
                &log(),
            ));
            let incidents = mayfly_incident::Incidents::new(ex.clone(), &log());
            let t = Instant::now();
            let (plan, _) = ledger.rollback(&[attack], true, "bench", [0; 32]).unwrap();
            let results = incidents.replay(&plan.replay).unwrap();
            replayed.push(t.elapsed());
            assert_eq!(results.len(), n);
            // Every dependent commits again, with results that reflect the repaired balance.
            assert!(results.iter().all(|r| r
                .outcome
                .as_ref()
                .is_ok_and(|o| o.status == mayfly_executor::TxStatus::Committed)));
            assert!(results.iter().all(|r| !r.same_result));
            ex.wait_for_reapers();
            mayfly_domain::DomainBackend::shutdown(&*backend);
        }
        println!(
            "1 + {n:>4} dependents: rollback {:>10.2?} | rollback + replay {:>10.2?}",
            median(&mut plain),
            median(&mut replayed)
        );
    }
}
