//! `verify` and the start-up live-state check per million live keys.
//!
//! Seeds a ledger with `BENCH_KEYS` (default 1,000,000) keys of 100-byte values, 1,000 per
//! transaction, closes it, then times, `BENCH_REPS` times (default 3) each, interleaved:
//! * `verify`      — the whole verification (both chains, every head, the live state);
//! * `state check` — what the start-up check adds: `Ledger::open` with the check minus
//!   `Ledger::open` with `check_state` off (the scan of `data` that `serve` does at every
//!   start unless `--skip-state-check`);
//! * `open`        — `Ledger::open` with the check (scan + the first commit);
//! * `upgrade`     — once: the same keys seeded with `state_digest` off (what the release
//!   before the digest wrote: version-1 heads, no `meta/state`), then the first open by
//!   this build, which computes the first digest.
//!
//! Run: `cargo bench -p mayfly-ledger --bench verify`.
#![allow(missing_docs, clippy::cast_precision_loss)]

use std::time::Instant;

use mayfly_ledger::store::open_read_only;
use mayfly_ledger::{verify, Ledger, Options, StoreOptions, TxContext, TxId};
use slog::{o, Discard, Logger};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn seed(dir: &std::path::Path, keys: u64, opts: &Options, log: &Logger) {
    let ledger = Ledger::open(dir, opts, log).unwrap();
    let mut i = 0u64;
    while i < keys {
        let mut tx = ledger
            .begin(TxContext {
                tx_id: TxId::generate(),
                handler: "seed".into(),
                request: Vec::new(),
                domain_id: 1,
                policy_hash: [0; 32],
            })
            .unwrap();
        for _ in 0..1000.min(keys - i) {
            tx.put(format!("acct/{i:010}").as_bytes(), &[0xAB; 100])
                .unwrap();
            i += 1;
        }
        tx.commit(Vec::new()).unwrap();
    }
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let env_or = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let keys = if measuring {
        env_or("BENCH_KEYS", 1_000_000)
    } else {
        10_000
    };
    let reps = if measuring {
        env_or("BENCH_REPS", 3)
    } else {
        1
    };
    let root = tempfile::Builder::new()
        .prefix("mayfly-bench-verify")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let dir = root.path().join("ledger");
    let log = Logger::root(Discard, o!());
    let seeding = Instant::now();
    seed(&dir, keys, &Options::default(), &log);
    let legacy = root.path().join("legacy");
    let without = Options {
        state_digest: false,
        ..Options::default()
    };
    seed(&legacy, keys, &without, &log);
    let t = Instant::now();
    drop(Ledger::open(&legacy, &Options::default(), &log).unwrap());
    let upgrade = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&legacy);

    let size = std::fs::metadata(dir.join("data.mdb")).unwrap().len();
    println!(
        "upgrade: first open of a ledger without a digest ({keys} keys) {upgrade:.3} s = {:.3} s per million (one sample)",
        upgrade * 1e6 / keys as f64
    );
    println!(
        "verify bench: {keys} live keys, {} checkpoints, data.mdb {} MiB, seeded in {:.1?}",
        keys.div_ceil(1000),
        size >> 20,
        seeding.elapsed()
    );
    let per_million = |secs: f64| secs * 1e6 / keys as f64;
    let (mut v, mut s, mut o) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let store = open_read_only(&dir, &StoreOptions::default()).unwrap();
        let key = store.public_key().unwrap();
        let t = Instant::now();
        let report = verify(&store, &[key], &mut |_| {}).unwrap();
        v.push(t.elapsed().as_secs_f64());
        assert!(report.ok(), "{:?}", report.failures);
        assert_eq!(report.state_entries, Some(keys));
        drop(store);

        let t = Instant::now();
        let ledger = Ledger::open(&dir, &Options::default(), &log).unwrap();
        o.push(t.elapsed().as_secs_f64());
        drop(ledger);
        let skip = Options {
            check_state: false,
            ..Options::default()
        };
        let t = Instant::now();
        let ledger = Ledger::open(&dir, &skip, &log).unwrap();
        s.push(o.last().unwrap() - t.elapsed().as_secs_f64());
        drop(ledger);
    }
    let (v, s, o) = (median(&mut v), median(&mut s), median(&mut o));
    println!(
        "verify (everything) {v:.3} s = {:.3} s per million live keys | start-up state check (open with check minus open without) {s:.3} s = {:.3} s per million | open with check {o:.3} s (median of {reps})",
        per_million(v),
        per_million(s),
    );
}
