//! Fair shares under attack: what 8 honest `transfer` clients get while 20 hostile
//! transactions run beside them, executor-direct on the real sandbox backend, with the
//! clones' cgroup limits on and off.
//!
//! Hostile mixes (each separately; every hostile thread starts its next transaction as soon
//! as the last one ends):
//!
//! * `none`     — the unloaded baseline of the same run and cgroup setting;
//! * `sleep`    — `test.sleep`: holds its clone, sends nothing, until the deadline;
//! * `spin`     — `test.loop_forever`: spins until the deadline;
//! * `flood`    — `test.doorbell_flood`: rings the agent's doorbell in a loop;
//! * `bigwrite` — `test.big_writes 1024`: tries to buffer a 64 MiB write set.
//!
//! Reported per mix: honest transactions/s, p50 and p99, and their ratios to `none` of the
//! same cgroup setting (the targets: throughput ≥ 0.5×, p99 ≤ 5×), hostile transactions that
//! ended, and the agent's RSS after the mix. The transaction deadline is the shipped 5 s.
//! The HTTP front door is not in the path (the client API's admission is measured with it).
//!
//! Run: `cargo build --release -p domu-shim && scripts/build-zygote.sh target/zygote-static
//! --all-features && BENCH_ZYGOTE=$PWD/target/zygote-static/mayfly-zygote cargo bench -p
//! dom0-agent --features test-handlers --bench fairness` (`BENCH_SECS`, default 5, per mix;
//! `BENCH_REPS`, default 3, interleaved; `BENCH_MIXES`, default all, comma-separated;
//! `BENCH_CGROUPS=on|off`, default both; `BENCH_CLONES_WEIGHT`, the clones' cgroup weight).
#![allow(
    missing_docs,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

mod common;
use common::{log, payload, seed};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_domain::DomainBackend;
use mayfly_executor::{Executor, ExecutorConfig, TxRequest, TxStatus};
use mayfly_ledger::{Ledger, Options};
use mayfly_sandbox::{Sandbox, SandboxConfig};

const HONEST: usize = 8;
const HOSTILE: usize = 20;
const MIXES: [(&str, &str, &str); 5] = [
    ("none", "", ""),
    ("sleep", "test.sleep", ""),
    ("spin", "test.loop_forever", ""),
    ("flood", "test.doorbell_flood", ""),
    ("bigwrite", "test.big_writes", "1024"),
];

/// Every handler allowed (the hostile ones are not in the shipped bundle); domain
/// misbehaviour aborts the transaction.
fn permissive_policy() -> mayfly_policy::Bundle {
    mayfly_policy::Bundle::load(&[(
        "allow.toml".to_owned(),
        "[engine]\nunlisted_handler = \"allow\"\ndomain_default = \"abort\"\n".to_owned(),
    )])
    .unwrap()
}

#[derive(Clone, Copy)]
struct Result1 {
    rate: f64,
    p50: Duration,
    p99: Duration,
    hostile_done: usize,
    rss_kib: u64,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn run_mix(dir: &Path, zygote: &Path, cgroups: bool, hostile: (&str, &str), secs: f64) -> Result1 {
    let mut config = SandboxConfig::new(zygote, Vec::<String>::new(), dir.join("run"));
    config.pool_size = 16;
    config.max_in_use = 64;
    if !cgroups {
        config.cgroups = None;
    }
    if let (Some(limits), Some(weight)) = (
        config.cgroups.as_mut(),
        std::env::var("BENCH_CLONES_WEIGHT")
            .ok()
            .and_then(|w| w.parse().ok()),
    ) {
        limits.cpu_weight = weight;
    }
    let sandbox = Arc::new(Sandbox::start(config, log()).unwrap());
    sandbox.wait_ready(16, Duration::from_secs(30));
    let backend: Arc<dyn DomainBackend> = sandbox;
    let ledger = Ledger::open(dir, &Options::default(), &log()).unwrap();
    seed(&ledger);
    let names = vec![
        "transfer".to_owned(),
        "test.sleep".to_owned(),
        "test.loop_forever".to_owned(),
        "test.doorbell_flood".to_owned(),
        "test.big_writes".to_owned(),
    ];
    let ex = Arc::new(Executor::new(
        ledger,
        backend.clone(),
        names,
        ExecutorConfig {
            max_attempts: 100,
            take_timeout: Duration::from_secs(30),
            release_memory: Some(mayfly_sandbox::release_free_heap),
            ..ExecutorConfig::default()
        },
        permissive_policy(),
        &log(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let hostile_done = Arc::new(AtomicUsize::new(0));
    let hostiles: Vec<_> = if hostile.0.is_empty() {
        Vec::new()
    } else {
        (0..HOSTILE)
            .map(|h| {
                let (ex, stop, done) = (ex.clone(), stop.clone(), hostile_done.clone());
                let (handler, payload) = (hostile.0.to_owned(), hostile.1.as_bytes().to_vec());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let o = ex.execute(&TxRequest {
                            handler: handler.clone(),
                            payload: payload.clone(),
                            client: format!("hostile-{h}"),
                        });
                        if o.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect()
    };
    // Let the hostile transactions take hold before measuring: until half of them hold a
    // domain or have ended one (bounded).
    if !hostiles.is_empty() {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline
            && backend.stats().in_use < HOSTILE / 2
            && hostile_done.load(Ordering::Relaxed) < HOSTILE / 2
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let honest: Vec<_> = (0..HONEST)
        .map(|c| {
            let ex = ex.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(c as u64 + 11);
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let o = ex
                        .execute(&TxRequest {
                            handler: "transfer".into(),
                            payload: payload(&mut rng),
                            client: format!("honest-{c}"),
                        })
                        .unwrap();
                    assert_eq!(o.status, TxStatus::Committed, "{:?}", o.error);
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = honest.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    backend.shutdown();
    for h in hostiles {
        let _ = h.join();
    }
    drop(ex);
    lat.sort_unstable();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    Result1 {
        rate: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
        hostile_done: hostile_done.load(Ordering::Relaxed),
        rss_kib: rss_kib(),
    }
}

fn median<T: Copy, K: PartialOrd>(v: &[T], key: impl Fn(&T) -> K) -> T {
    let mut s: Vec<T> = v.to_vec();
    s.sort_by(|a, b| key(a).partial_cmp(&key(b)).unwrap());
    s[s.len() / 2]
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
        env_or("BENCH_SECS", 5.0)
    } else {
        0.3
    };
    let reps = if measuring {
        env_or("BENCH_REPS", 3.0) as usize
    } else {
        1
    };
    let wanted: Option<Vec<String>> = std::env::var("BENCH_MIXES")
        .ok()
        .map(|m| m.split(',').map(str::to_owned).collect());
    let mixes: Vec<_> = MIXES
        .iter()
        .filter(|(name, ..)| {
            *name == "none" || wanted.as_ref().is_none_or(|w| w.iter().any(|x| x == name))
        })
        .collect();
    // The smoke run (`cargo test --benches`) checks that the bench works: one short run
    // of the baseline and of the cheapest hostile mix.
    let mixes: Vec<_> = if measuring {
        mixes
    } else {
        mixes.into_iter().take(2).collect()
    };
    let built = PathBuf::from(env!("CARGO_BIN_EXE_mayfly-zygote"));
    let zygote = std::env::var_os("BENCH_ZYGOTE").map_or(built, PathBuf::from);
    let root = tempfile::Builder::new()
        .prefix("mayfly-fairbench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    println!(
        "fairness bench: {HONEST} honest transfer clients beside {HOSTILE} hostile transactions, \
         {secs} s per mix, {reps} interleaved repetitions, template {}",
        zygote.display()
    );
    let settings: &[bool] = match std::env::var("BENCH_CGROUPS").as_deref() {
        Ok("on") => &[true],
        Ok("off") => &[false],
        _ => &[true, false],
    };
    for &cgroups in settings {
        let mut results: Vec<Vec<Result1>> = vec![Vec::new(); mixes.len()];
        for rep in 0..reps {
            for (i, (name, handler, payload)) in mixes.iter().enumerate() {
                let d = root.path().join(format!("{cgroups}-{name}-{rep}"));
                let r = run_mix(&d, &zygote, cgroups, (handler, payload), secs);
                results[i].push(r);
                let _ = std::fs::remove_dir_all(&d);
            }
        }
        println!(
            "cgroup limits {}:",
            if cgroups { "on" } else { "off (--no-cgroups)" }
        );
        let base = &results[0];
        let (base_rate, base_p99) = (median(base, |r| r.rate).rate, median(base, |r| r.p99).p99);
        for (i, (name, ..)) in mixes.iter().enumerate() {
            let r = &results[i];
            let rate = median(r, |x| x.rate).rate;
            let p50 = median(r, |x| x.p50).p50;
            let p99 = median(r, |x| x.p99).p99;
            let done = median(r, |x| x.hostile_done).hostile_done;
            let rss = median(r, |x| x.rss_kib).rss_kib;
            println!(
                "  {name:>8}: {rate:>7.0} tx/s ({:.2}x)  p50 {p50:>9.2?}  p99 {p99:>9.2?} ({:.1}x)  hostile ended {done:>5}  RSS {} MiB",
                rate / base_rate,
                p99.as_secs_f64() / base_p99.as_secs_f64(),
                rss >> 10
            );
        }
    }
}
