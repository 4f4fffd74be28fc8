//! What the TPM key source costs, against the file key in the same run (swtpm on loopback):
//!
//! * `open`   — `Ledger::open` of an existing ledger (1,000 keys, live-state check on): the
//!   key-dependent part of the agent's start, unseal included for `tpm` (PCR read, primary
//!   key derivation, load, policy session, unseal). swtpm is already running.
//! * `commit` — durable signed checkpoints per second with the key in memory: the ledger's
//!   checkpoints-bench workload (4 reads, 2 writes of 100-byte values over 100,000 keys,
//!   256 transactions in flight per thread, one thread). Signing is `ring` either way; the
//!   TPM is not on this path, so the ratio should be 1 within noise.
//!
//! Run: `cargo bench -p mayfly-tpm --bench sealed` (env `BENCH_SECS` per commit run,
//! default 3; `BENCH_REPS`, default 5; `BENCH_OPENS` per rep, default 10). Interleaved:
//! both sources in every repetition, alternating which goes first. Medians.

#![allow(missing_docs, clippy::cast_possible_truncation)]

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_ledger::{FileKeys, KeyStore, Ledger, Options, TxContext, TxId};
use mayfly_tpm::keystore::SealedKeys;
use mayfly_tpm::swtpm::{measure_boot, Swtpm, GOOD_CMDLINE};
use mayfly_tpm::{Tpm, DEFAULT_PCRS};
use slog::{o, Discard, Logger};

const VALUE: [u8; 100] = [0xAB; 100];
const WINDOW: usize = 256;

fn ctx() -> TxContext {
    TxContext {
        tx_id: TxId::generate(),
        handler: "transfer".into(),
        request: vec![0x42; 64],
        domain_id: 1,
        policy_hash: [0; 32],
    }
}

fn account(i: u32) -> Vec<u8> {
    format!("acct/{i:07}").into_bytes()
}

fn open(dir: &Path, keys: &Arc<dyn KeyStore>) -> Ledger {
    let opts = Options {
        keys: keys.clone(),
        ..Options::default()
    };
    Ledger::open(dir, &opts, &Logger::root(Discard, o!())).unwrap()
}

fn seeded(dir: &Path, keys: &Arc<dyn KeyStore>, n: u32) -> Ledger {
    std::fs::create_dir_all(dir).unwrap();
    let ledger = open(dir, keys);
    for chunk in (0..n).step_by(1000) {
        let mut tx = ledger.begin(ctx()).unwrap();
        for i in chunk..(chunk + 1000).min(n) {
            tx.put(&account(i), &VALUE).unwrap();
        }
        tx.commit(Vec::new()).unwrap();
    }
    ledger
}

/// Median time of `opens` opens of the ledger in `dir`.
fn time_open(dir: &Path, keys: &Arc<dyn KeyStore>, opens: usize) -> Vec<f64> {
    (0..opens)
        .map(|_| {
            let t = Instant::now();
            let l = open(dir, keys);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            drop(l);
            ms
        })
        .collect()
}

/// Checkpoints per second over `secs`, one thread, `WINDOW` in flight.
fn commit_rate(ledger: &Ledger, keys: u32, secs: f64) -> f64 {
    let mut rng = fastrand::Rng::with_seed(1);
    let mut inflight = VecDeque::with_capacity(WINDOW);
    let mut done = 0u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut settle = |t: mayfly_ledger::CommitTicket| match t.wait() {
        Ok(_) => done += 1,
        Err(e) if e.is_conflict() => {}
        Err(e) => panic!("{e}"),
    };
    while Instant::now() < deadline {
        let mut tx = ledger.begin(ctx()).unwrap();
        for _ in 0..4 {
            tx.get(&account(rng.u32(..keys))).unwrap();
        }
        for _ in 0..2 {
            tx.put(&account(rng.u32(..keys)), &VALUE).unwrap();
        }
        inflight.push_back(tx.submit(b"ok".to_vec(), Vec::new()).unwrap());
        if inflight.len() >= WINDOW {
            settle(inflight.pop_front().unwrap());
        }
    }
    inflight.into_iter().for_each(&mut settle);
    done as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: f64| -> f64 {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (secs, reps, opens, keys) = if measuring {
        (
            env("BENCH_SECS", 3.0),
            env("BENCH_REPS", 5.0) as usize,
            env("BENCH_OPENS", 10.0) as usize,
            100_000,
        )
    } else {
        (0.2, 1, 1, 2_000)
    };
    let root = tempfile::Builder::new()
        .prefix("mayfly-tpm-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let sw = Swtpm::start(&root.path().join("tpm")).expect("swtpm (apt-get install swtpm)");
    measure_boot(&mut Tpm::open(&sw.tcti()).unwrap(), GOOD_CMDLINE).unwrap();
    let sources: [(&str, Arc<dyn KeyStore>); 2] = [
        ("file", Arc::new(FileKeys)),
        (
            "tpm",
            Arc::new(SealedKeys::new(&sw.tcti(), DEFAULT_PCRS).unwrap()),
        ),
    ];
    println!(
        "sealed bench: {reps} interleaved reps, {opens} opens each, {secs} s commit runs over {keys} keys, swtpm {}",
        sw.tcti()
    );
    let mut open_ms: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..reps {
        // Alternate which source goes first, so that neither always runs on a warmer
        // page cache or a quieter neighbour.
        let order: [usize; 2] = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (name, store) = &sources[i];
            let dir = root.path().join(format!("{name}-{rep}"));
            drop(seeded(&dir, store, 1000));
            open_ms[i].extend(time_open(&dir, store, opens));
            let _ = std::fs::remove_dir_all(&dir);
            let dir = root.path().join(format!("{name}-commit-{rep}"));
            let ledger = seeded(&dir, store, keys);
            rates[i].push(commit_rate(&ledger, keys, secs));
            drop(ledger);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "commit samples: file [{}] | tpm [{}]",
        show(&rates[0]),
        show(&rates[1])
    );
    let [of, ot] = open_ms.map(median);
    let [rf, rt] = rates.map(median);
    println!("open (start-up, unseal included): file {of:.1} ms | tpm {ot:.1} ms | tpm/file {:.2}x (median)", ot / of);
    println!("commit: file {rf:.0} checkpoints/s | tpm {rt:.0} checkpoints/s | tpm/file {:.3} (median of {reps})", rt / rf);
}
