//! Cost of [`Bundle::evaluate`] per event: the shipped default bundle against a realistic mix
//! of ring operations (mostly allowed, some violations), commits, admissions and alerts, with
//! an allow-everything empty bundle as the baseline in the same run.
//!
//! `cargo bench -p mayfly-policy --bench evaluate` measures (median of 11 runs); without
//! `--bench` (as `cargo test --benches` runs it) it does a short smoke run.

use std::hint::black_box;
use std::time::Instant;

use mayfly_policy::{Bundle, DomainEventKind, Event, Op, State, Target, Write};

const DEFAULT: [(&str, &str); 3] = [
    (
        "engine.toml",
        include_str!("../../../policies/default/engine.toml"),
    ),
    (
        "handlers.toml",
        include_str!("../../../policies/default/handlers.toml"),
    ),
    (
        "detection.toml",
        include_str!("../../../policies/default/detection.toml"),
    ),
];

const TX: [u8; 16] = [7; 16];

fn op<'a>(handler: &'a str, op: Op<'a>, n: u64) -> Event<'a> {
    Event::Op {
        tx: TX,
        handler,
        client: "client-42",
        op,
        ops_so_far: n,
        bytes_written_so_far: 64 * n,
        elapsed_ms: 3,
    }
}

const WRITES: [Write<'static>; 2] = [
    Write {
        key: b"acct/alice",
        value: Some(b"70"),
    },
    Write {
        key: b"acct/bob",
        value: Some(b"35"),
    },
];

/// The mix: 16 ring operations (2 of them violations), one commit, one admission, one
/// domain event, one external alert.
fn events() -> Vec<Event<'static>> {
    vec![
        op("transfer", Op::Get { key: b"acct/alice" }, 0),
        op("transfer", Op::Get { key: b"acct/bob" }, 1),
        op(
            "transfer",
            Op::Put {
                key: b"acct/alice",
                value: b"70",
            },
            2,
        ),
        op(
            "transfer",
            Op::Put {
                key: b"acct/bob",
                value: b"35",
            },
            3,
        ),
        op("balance", Op::Get { key: b"acct/carol" }, 0),
        op("open_account", Op::Get { key: b"acct/dave" }, 0),
        op(
            "open_account",
            Op::Put {
                key: b"acct/dave",
                value: b"0",
            },
            1,
        ),
        op(
            "notes",
            Op::Put {
                key: b"notes/alice/n1",
                value: b"remember the milk",
            },
            0,
        ),
        op(
            "notes",
            Op::Get {
                key: b"notes/alice/n1",
            },
            1,
        ),
        op(
            "kv",
            Op::Put {
                key: b"kv/session/4711",
                value: &[b'x'; 512],
            },
            0,
        ),
        op(
            "kv",
            Op::Get {
                key: b"kv/session/4711",
            },
            1,
        ),
        op(
            "kv",
            Op::Delete {
                key: b"kv/session/4711",
            },
            2,
        ),
        op(
            "kv",
            Op::Scan {
                start: b"kv/session/",
                end: Some(b"kv/session0"),
            },
            3,
        ),
        op(
            "notes",
            Op::Get {
                key: b"notes/bob/n9",
            },
            2,
        ),
        // The notes exploit and a honeytoken probe.
        op(
            "notes",
            Op::Put {
                key: b"acct/mallory",
                value: b"1000000",
            },
            0,
        ),
        op(
            "kv",
            Op::Get {
                key: b"secret/root",
            },
            0,
        ),
        Event::Commit {
            tx: TX,
            handler: "transfer",
            client: "client-42",
            ops: 4,
            bytes_written: 22,
            elapsed_ms: 4,
            writes: &WRITES,
        },
        Event::Admit {
            client: "client-42",
            handler: "transfer",
            now_ms: 0,
        },
        Event::Domain {
            tx: TX,
            handler: "kv",
            kind: DomainEventKind::Timeout,
        },
        Event::External {
            target: Target::Tx(TX),
            reason: "ids",
        },
    ]
}

/// Median ns per event over `runs` runs of `rounds` passes over `events`.
fn measure(bundle: &Bundle, events: &mut [Event<'static>], rounds: u64, runs: usize) -> f64 {
    let mut state = State::new();
    let per_run = rounds * events.len() as u64;
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            for r in 0..rounds {
                for e in events.iter_mut() {
                    // Admissions advance time so the rate limit stays on its allow path.
                    if let Event::Admit { now_ms, .. } = e {
                        *now_ms = r * 1_000;
                    }
                    black_box(bundle.evaluate(black_box(e), &mut state));
                }
            }
            start.elapsed().as_nanos() as f64 / per_run as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (rounds, runs) = if bench { (20_000, 11) } else { (500, 3) };
    let default = Bundle::load(&DEFAULT).expect("default bundle");
    let empty = Bundle::load(&[("empty.toml", "[engine]\nunlisted_handler = \"allow\"\n")])
        .expect("empty bundle");
    let mut mix = events();
    let mut ops: Vec<Event<'static>> = mix
        .iter()
        .filter(|e| matches!(e, Event::Op { .. }))
        .copied()
        .collect();
    let mut allowed: Vec<Event<'static>> = ops.iter().take(14).copied().collect();
    let t0 = Instant::now();
    let base = measure(&empty, &mut mix, rounds, runs);
    let base_ops = measure(&empty, &mut ops, rounds, runs);
    let full = measure(&default, &mut mix, rounds, runs);
    let ops_ns = measure(&default, &mut ops, rounds, runs);
    let allowed_ns = measure(&default, &mut allowed, rounds, runs);
    let load = {
        let start = Instant::now();
        let n = if bench { 200 } else { 5 };
        for _ in 0..n {
            black_box(Bundle::load(black_box(&DEFAULT)).expect("loads"));
        }
        start.elapsed().as_nanos() as f64 / f64::from(n) / 1_000.0
    };
    println!(
        "policy evaluate ({} mode, median of {runs} runs x {rounds} rounds):",
        if bench { "bench" } else { "smoke" }
    );
    println!("  baseline (empty bundle), full mix : {base:8.1} ns/event");
    println!("  baseline (empty bundle), ring ops : {base_ops:8.1} ns/op");
    println!("  default bundle, full mix          : {full:8.1} ns/event");
    println!("  default bundle, ring ops only     : {ops_ns:8.1} ns/op (2 of 16 violations)");
    println!("  default bundle, allowed ops only  : {allowed_ns:8.1} ns/op");
    println!("  Bundle::load(default)             : {load:8.1} us");
    println!("  total {:.2} s", t0.elapsed().as_secs_f64());
}
