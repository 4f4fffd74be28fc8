//! Durable signed checkpoints per second with group commit, against raw heed puts of the
//! same data with the same durability, in the same run.
//!
//! Workload per transaction: 4 reads and 2 writes of 100-byte values over 100,000 seeded
//! keys. Each writer thread keeps `BENCH_WINDOW` (default 256) transactions in flight (as the agent does with
//! many domains) and counts a transaction when its commit is durable.
//!
//! * `ledger`   — `Tx` get ×4, put ×2, `submit`, `wait`: OCC validation, checkpoint with
//!   before-images, hash chain, indexes, Ed25519-signed head per group, one fsync per group.
//! * `raw-puts` — the same 2 puts per transaction straight into a heed database, `BENCH_WINDOW`
//!   transactions per LMDB write transaction (one fsync each): the baseline.
//! * `raw-rw`   — as `raw-puts` plus the same 4 reads through a heed read transaction.
//! * `untracked` — the ledger with `track_dependencies` off (no read sets in checkpoints, no
//!   `deps` records): what dependency tracking costs.
//! * `nostate` — the ledger with `state_digest` off (version-1 heads, no live-state LtHash):
//!   what committing to the live state costs.
//!
//! `BENCH_ONLY=state` runs only `ledger` and `nostate`, interleaved.
//!
//! Run: `cargo bench -p mayfly-ledger --bench checkpoints` (env `BENCH_SECS`, `BENCH_REPS`).
#![allow(unsafe_code, missing_docs, clippy::cast_possible_truncation)]

use std::path::Path;
use std::time::{Duration, Instant};

use heed::types::Bytes;
use heed::{Database, EnvOpenOptions};
use mayfly_ledger::{Ledger, Options, TxContext, TxId};
use slog::{o, Discard, Logger};

const KEYS: u32 = 100_000;
/// Transactions each writer keeps in flight (env `BENCH_WINDOW`).
fn window() -> usize {
    std::env::var("BENCH_WINDOW")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}
const VALUE: [u8; 100] = [0xAB; 100];

fn key(i: u32) -> [u8; 12] {
    let mut k = *b"acct/0000000";
    let digits = format!("{i:07}");
    k[5..].copy_from_slice(digits.as_bytes());
    k
}

fn seed_ledger(dir: &Path, track: bool, state: bool) -> Ledger {
    let opts = Options {
        track_dependencies: track,
        state_digest: state,
        ..Options::default()
    };
    let ledger = Ledger::open(dir, &opts, &Logger::root(Discard, o!())).unwrap();
    for chunk in 0..(KEYS / 1000) {
        let mut tx = ledger.begin(ctx()).unwrap();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            tx.put(&key(i), &VALUE).unwrap();
        }
        tx.commit(Vec::new()).unwrap();
    }
    ledger
}

fn ctx() -> TxContext {
    TxContext {
        tx_id: TxId::generate(),
        handler: "transfer".into(),
        request: vec![0x42; 64],
        domain_id: 1,
        policy_hash: [0; 32],
    }
}

struct Run {
    committed: u64,
    conflicts: u64,
    elapsed: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.committed as f64 / self.elapsed.as_secs_f64()
    }
}

fn run_ledger(dir: &Path, threads: usize, secs: f64, track: bool, state: bool) -> Run {
    let ledger = seed_ledger(dir, track, state);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t as u64 + 1);
                let mut inflight = std::collections::VecDeque::with_capacity(window());
                let (mut ok, mut conflicts) = (0u64, 0u64);
                let settle =
                    |t: mayfly_ledger::CommitTicket, ok: &mut u64, conflicts: &mut u64| match t
                        .wait()
                    {
                        Ok(_) => *ok += 1,
                        Err(e) if e.is_conflict() => *conflicts += 1,
                        Err(e) => panic!("{e}"),
                    };
                while Instant::now() < deadline {
                    let mut tx = ledger.begin(ctx()).unwrap();
                    for _ in 0..4 {
                        tx.get(&key(rng.u32(..KEYS))).unwrap();
                    }
                    tx.put(&key(rng.u32(..KEYS)), &VALUE).unwrap();
                    tx.put(&key(rng.u32(..KEYS)), &VALUE).unwrap();
                    inflight.push_back(tx.submit(b"ok".to_vec(), Vec::new()).unwrap());
                    if inflight.len() >= window() {
                        settle(inflight.pop_front().unwrap(), &mut ok, &mut conflicts);
                    }
                }
                for t in inflight {
                    settle(t, &mut ok, &mut conflicts);
                }
                (ok, conflicts)
            })
        })
        .collect();
    let (mut committed, mut conflicts) = (0, 0);
    for h in handles {
        let (a, b) = h.join().unwrap();
        committed += a;
        conflicts += b;
    }
    Run {
        committed,
        conflicts,
        elapsed: start.elapsed(),
    }
}

fn run_raw(dir: &Path, threads: usize, secs: f64, with_reads: bool) -> Run {
    let mut opts = EnvOpenOptions::new().read_txn_without_tls();
    opts.map_size(4 << 30).max_dbs(4);
    // SAFETY: a fresh directory opened once, default (fully durable) flags.
    let env = unsafe { opts.open(dir) }.unwrap();
    let mut wtxn = env.write_txn().unwrap();
    let db: Database<Bytes, Bytes> = env.create_database(&mut wtxn, Some("data")).unwrap();
    for i in 0..KEYS {
        db.put(&mut wtxn, &key(i), &VALUE).unwrap();
    }
    wtxn.commit().unwrap();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let env = env.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t as u64 + 1);
                let mut ok = 0u64;
                let mut batch: Vec<([u8; 12], [u8; 12])> = Vec::with_capacity(window());
                while Instant::now() < deadline {
                    batch.clear();
                    for _ in 0..window() {
                        if with_reads {
                            let rtxn = env.read_txn().unwrap();
                            for _ in 0..4 {
                                std::hint::black_box(db.get(&rtxn, &key(rng.u32(..KEYS))).unwrap());
                            }
                        }
                        batch.push((key(rng.u32(..KEYS)), key(rng.u32(..KEYS))));
                    }
                    let mut wtxn = env.write_txn().unwrap();
                    for (a, b) in &batch {
                        db.put(&mut wtxn, a, &VALUE).unwrap();
                        db.put(&mut wtxn, b, &VALUE).unwrap();
                    }
                    wtxn.commit().unwrap();
                    ok += batch.len() as u64;
                }
                ok
            })
        })
        .collect();
    let committed = handles.into_iter().map(|h| h.join().unwrap()).sum();
    Run {
        committed,
        conflicts: 0,
        elapsed: start.elapsed(),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not, and then one short
    // run of every configuration proves the bench still works without measuring anything.
    let measuring = std::env::args().any(|a| a == "--bench");
    let env_or = |name: &str, default: f64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let secs = if measuring {
        env_or("BENCH_SECS", 3.0)
    } else {
        0.2
    };
    let reps = if measuring {
        env_or("BENCH_REPS", 5.0) as usize
    } else {
        1
    };
    let root = tempfile::Builder::new()
        .prefix("mayfly-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    println!("checkpoints bench: {secs} s per run, {reps} interleaved repetitions, window {}/thread, dir {}", window(), root.path().display());
    for threads in [1usize, 2] {
        let (mut ledger, mut raw, mut raw_rw) = (Vec::new(), Vec::new(), Vec::new());
        let mut untracked = Vec::new();
        let mut conflicts = Vec::new();
        let only_ledger = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "ledger");
        let only_state = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "state");
        let mut nostate = Vec::new();
        for rep in 0..reps {
            if only_ledger {
                let r = run_ledger(
                    &root.path().join(format!("ledger-{threads}-{rep}")),
                    threads,
                    secs,
                    true,
                    true,
                );
                println!("threads={threads}: ledger {:.0} checkpoints/s", r.rate());
                continue;
            }
            if only_state {
                let d = root.path().join(format!("nostate-{threads}-{rep}"));
                nostate.push(run_ledger(&d, threads, secs, true, false).rate());
                let d = root.path().join(format!("ledger-{threads}-{rep}"));
                ledger.push(run_ledger(&d, threads, secs, true, true).rate());
                for d in ["nostate", "ledger"] {
                    let _ =
                        std::fs::remove_dir_all(root.path().join(format!("{d}-{threads}-{rep}")));
                }
                continue;
            }
            let d = root.path().join(format!("raw-{threads}-{rep}"));
            std::fs::create_dir_all(&d).unwrap();
            raw.push(run_raw(&d, threads, secs, false).rate());
            let d = root.path().join(format!("rawrw-{threads}-{rep}"));
            std::fs::create_dir_all(&d).unwrap();
            raw_rw.push(run_raw(&d, threads, secs, true).rate());
            let d = root.path().join(format!("ledger-{threads}-{rep}"));
            let r = run_ledger(&d, threads, secs, true, true);
            conflicts.push(r.conflicts as f64 / (r.committed + r.conflicts).max(1) as f64 * 100.0);
            ledger.push(r.rate());
            let d = root.path().join(format!("untracked-{threads}-{rep}"));
            untracked.push(run_ledger(&d, threads, secs, false, true).rate());
            let d = root.path().join(format!("nostate-{threads}-{rep}"));
            nostate.push(run_ledger(&d, threads, secs, true, false).rate());
            for d in ["raw", "rawrw", "ledger", "untracked", "nostate"] {
                let _ = std::fs::remove_dir_all(root.path().join(format!("{d}-{threads}-{rep}")));
            }
        }
        if only_ledger {
            continue;
        }
        let l = median(&mut ledger);
        let n = median(&mut nostate);
        println!(
            "threads={threads}: live-state digest off {n:>8.0} checkpoints/s | on {l:>8.0} | the digest costs {:.1}% of throughput (median of {reps})",
            (1.0 - l / n) * 100.0
        );
        if only_state {
            continue;
        }
        let (r, rr) = (median(&mut raw), median(&mut raw_rw));
        let u = median(&mut untracked);
        println!(
            "threads={threads}: dependency tracking off {u:>8.0} checkpoints/s | on {l:>8.0} | tracking costs {:.1}% of throughput",
            (1.0 - l / u) * 100.0
        );
        println!(
            "threads={threads}: ledger {l:>8.0} checkpoints/s | raw-puts {r:>8.0} tx/s | raw-rw {rr:>8.0} tx/s | cost ratio ledger/raw-puts {:.2}x, ledger/raw-rw {:.2}x | conflicts {:.2}% (median of {reps})",
            r / l,
            rr / l,
            median(&mut conflicts)
        );
    }
}
