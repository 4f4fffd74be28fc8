//! What one clone's life costs the sandbox alone — no executor, no ledger, no policy: take
//! from the pool, Start, the clone commits the payload back, destroy. Each client thread
//! does that in a loop; the run reports clone lives per second, their p50, and the CPU time
//! per clone of the whole process tree (this process's threads, the zygote, and every
//! clone, which the zygote reaps and the bench reaps the zygote).
//!
//! It separates the backend's share of a transaction's cost from the rest (compare with
//! the `transactions` bench of `dom0-agent`).
//!
//! Run (as root): `cargo bench -p mayfly-sandbox --features test-zygote --bench clones`
//! (`BENCH_SECS` per run, default 4; `BENCH_REPS` interleaved runs, default 3; medians).
#![allow(
    missing_docs,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_domain::DomainBackend;
use mayfly_ring::wire::Start;
use mayfly_ring::{Request, Response};
use mayfly_sandbox::{Sandbox, SandboxConfig};
use nix::sys::resource::{getrusage, UsageWho};

const ZYGOTE: &str = env!("CARGO_BIN_EXE_mayfly-sandbox-test-zygote");
const WAIT: Duration = Duration::from_secs(20);

fn cpu_now() -> Duration {
    let used = |who| {
        let u = getrusage(who).unwrap();
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(u64::try_from(t.tv_sec()).unwrap())
                + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap())
        };
        tv(u.user_time()) + tv(u.system_time())
    };
    used(UsageWho::RUSAGE_SELF) + used(UsageWho::RUSAGE_CHILDREN)
}

/// One clone's life: Start with `echo`, serve its Commit, destroy.
fn one_life(sandbox: &Sandbox) {
    let mut domain = sandbox.take(WAIT).unwrap();
    let ready_id = domain.ready_id();
    let (ring, notifier) = domain.ring();
    let start = Start {
        tx_id: [1; 16],
        handler: "echo".into(),
        payload: b"x".to_vec(),
        entropy_seed: [7; 32],
    };
    ring.send_response(ready_id, &Response::Start(start), &notifier)
        .unwrap();
    let request = ring.recv_request(&notifier, Some(WAIT)).unwrap();
    assert!(matches!(request.body, Request::Commit { .. }));
    ring.send_response(request.id, &Response::Committed, &notifier)
        .unwrap();
    domain.destroy().unwrap();
}

struct Run {
    rate: f64,
    p50: Duration,
    cpu_per_clone: Duration,
}

fn run(dir: &Path, clients: usize, secs: f64) -> Run {
    let cpu_before = cpu_now();
    let mut config = SandboxConfig::new(ZYGOTE, Vec::<String>::new(), dir);
    config.pool_size = 16;
    let sandbox =
        Arc::new(Sandbox::start(config, slog::Logger::root(slog::Discard, slog::o!())).unwrap());
    assert!(sandbox.wait_ready(16, WAIT));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let sandbox = Arc::clone(&sandbox);
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    one_life(&sandbox);
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = started.elapsed();
    sandbox.shutdown();
    drop(sandbox);
    lat.sort_unstable();
    let n = u32::try_from(lat.len().max(1)).unwrap();
    Run {
        rate: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: lat.get(lat.len() / 2).copied().unwrap_or_default(),
        cpu_per_clone: (cpu_now() - cpu_before) / n,
    }
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let env_or = |name: &str, d: f64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let secs = if measuring {
        env_or("BENCH_SECS", 4.0)
    } else {
        0.2
    };
    let reps = if measuring {
        env_or("BENCH_REPS", 3.0) as usize
    } else {
        1
    };
    let root = tempfile::tempdir().unwrap();
    println!("clones bench: {secs} s per run, {reps} repetitions, medians");
    for clients in [1, 8] {
        let mut runs: Vec<Run> = (0..reps)
            .map(|rep| run(&root.path().join(format!("{clients}-{rep}")), clients, secs))
            .collect();
        let m = runs.len() / 2;
        runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let rate = runs[m].rate;
        runs.sort_by_key(|r| r.p50);
        let p50 = runs[m].p50;
        runs.sort_by_key(|r| r.cpu_per_clone);
        let cpu = runs[m].cpu_per_clone;
        println!(
            "  {clients} client(s): {rate:>7.0} clones/s  p50 {p50:>9.2?}  cpu/clone {:>5} µs",
            cpu.as_micros()
        );
    }
}
