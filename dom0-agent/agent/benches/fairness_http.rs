//! Fair shares under attack **through the real agent** (issue 15's must-show): `dom0-agent
//! serve` on loopback (sandbox backend, the shipped policy with the `test.*` handlers let
//! run), 8 honest `transfer` clients over keep-alive HTTP as one client identity
//! (127.0.0.1) beside 20 hostile clients as another (127.0.0.2, .3, … — a new one per mix,
//! so that no penalty carries over from one mix to the next: the per-client admission keys
//! on the source address without mutual TLS), each hostile mix separately, the unloaded
//! figure (`none`) in the same run and agent.
//!
//! Per mix: honest commits/s, p50/p99 and their ratios to `none` (targets: ≥ 0.5× and
//! ≤ 5×), honest answers other than 200, the hostile answers by status (503: refused at
//! admission) and requests that hung (no answer within the deadline + 30 s), the
//! agent's anonymous RSS after the mix (all its transactions ended; polled for up to 30 s
//! until within the issue's 20 %, with no 2 MiB floor, unlike the test's
//! `fair::settle_rss`) against before the mix (`RssAnon`, with the agent's thread count),
//! its whole RSS (`VmRSS`, what an operator sees: it also counts the ledger's mapped file
//! pages) after against before, the same without the resident pages of the ledger's
//! `data.mdb` mapping (`outside ledger`: the agent's own memory — the ledger's history
//! that every honest commit adds to the map grows `VmRSS` with or without an attack), and
//! the ledger's data file (`data.mdb`) size before and after the mix.
//! The load generator runs on the same cores as the agent.
//!
//! Run (one command; the knobs are environment variables):
//!
//! ```sh
//! scripts/build-zygote.sh target/zygote-static-fair --features test-handlers   # optional
//! BENCH_ZYGOTE=$PWD/target/zygote-static-fair/mayfly-zygote \
//!     cargo bench -p dom0-agent --features test-handlers --bench fairness_http
//! ```
//!
//! `BENCH_SECS` (5) per mix, `BENCH_REPS` (3; one fresh agent per repetition, mixes in
//! order), `BENCH_MIXES` (all; comma-separated), `BENCH_CGROUPS` (`on`, `off` or `both`;
//! default `on`), `BENCH_ZYGOTE` (the template; default `mayfly-zygote` beside the agent),
//! `BENCH_POOL` (16), `BENCH_AGENT_ARGS` (more `serve` flags, space-separated, e.g.
//! `--max-per-client 4` or `--demoted-cpu-max-percent 0`), `BENCH_PENALTY` (`shipped`,
//! `off`, or `[engine]` lines replacing the shipped `penalty_*` ones, e.g.
//! `penalty_after = 4`), `BENCH_RATES` (default: the shipped per-client `[[rate]]` rules
//! raised to 1,000,000 a window, as the shipped 1,000 transfers/s per client would cap the
//! honest identity's unloaded figure; `shipped`: as shipped), `BENCH_SMAPS` (set: print
//! where the anonymous memory is before and after each mix, from `/proc/<pid>/smaps`).
//! Without `--bench` (`cargo test --benches`) one short smoke
//! repetition of `none` and `sleep` runs.
#![allow(
    missing_docs,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/fair.rs"]
mod fair;

use std::collections::BTreeMap;
use std::time::Duration;

use fair::{Load, MIXES};

/// One mix of one repetition, as reported.
struct Row {
    load: Load,
    /// Anonymous RSS after the mix and before it (`fair::rss_kib`).
    rss_after_kib: u64,
    rss_before_kib: u64,
    /// The whole RSS (`VmRSS`) after the mix and before it.
    vm_after_kib: u64,
    vm_before_kib: u64,
    /// `VmRSS` less the resident pages of the `data.mdb` mapping, after and before.
    own_after_kib: u64,
    own_before_kib: u64,
    /// Size of the ledger's `data.mdb` after the mix and before it, bytes.
    file_after: u64,
    file_before: u64,
}

/// Where the agent's anonymous memory is (`/proc/<pid>/smaps`), KiB: the main heap, the
/// 64 MiB reservations of glibc's per-thread arenas, 2 MiB-class thread stacks, and the
/// rest, each with its count of mappings (`BENCH_SMAPS=1`).
fn anon_by_mapping(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    // (name, mappings, anonymous KiB)
    let mut classes: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    let mut class = "other";
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let (start, end) = first.split_once('-').unwrap_or(("0", "0"));
            let size = u64::from_str_radix(end, 16).unwrap_or(0)
                - u64::from_str_radix(start, 16).unwrap_or(0);
            let path = fields.nth(4).unwrap_or("");
            class = match path {
                "[heap]" => "heap",
                "" if size == 64 << 20 || size == 128 << 20 => "arena 64 MiB",
                "" if (1 << 20..=(8 << 20) + 4096).contains(&size) => "stack-sized",
                "" => "other anon",
                _ => "file-backed",
            };
            classes.entry(class).or_default().0 += 1;
        } else if first == "Anonymous:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            classes.entry(class).or_default().1 += kib;
        }
    }
    classes
        .iter()
        .map(|(name, (n, kib))| format!("{name} {kib} KiB/{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resident KiB of the agent's mappings of the ledger's `data.mdb` (`/proc/<pid>/smaps`).
fn ledger_map_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut in_ledger = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_ledger = fields.nth(4).is_some_and(|p| p.ends_with("/data.mdb"));
        } else if in_ledger && first == "Rss:" {
            kib += fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib
}

/// The agent's thread count (`/proc/<pid>/status`).
fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls the anonymous RSS (every 250 ms, up to `limit`) until it is within 20 % of
/// `before_kib`; the last value read and how long it took.
fn settle_within_ratio(pid: u32, before_kib: u64, limit: Duration) -> (u64, Duration) {
    let start = std::time::Instant::now();
    loop {
        let (_, anon) = fair::rss_kib(pid);
        if anon * 100 <= before_kib * 120 || start.elapsed() >= limit {
            return (anon, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Size of the ledger's data file in `data` (0 if it cannot be read).
fn data_file_size(data: &std::path::Path) -> u64 {
    std::fs::metadata(data.join("data.mdb")).map_or(0, |m| m.len())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn counts(m: &BTreeMap<u16, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(c, n)| format!("{c}:{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let env_num = |name: &str, d: f64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let secs = if measuring {
        env_num("BENCH_SECS", 5.0)
    } else {
        0.5
    };
    let reps = if measuring {
        env_num("BENCH_REPS", 3.0) as usize
    } else {
        1
    };
    let pool = env_num("BENCH_POOL", 16.0) as usize;
    let wanted: Option<Vec<String>> = std::env::var("BENCH_MIXES")
        .ok()
        .map(|m| m.split(',').map(str::to_owned).collect());
    let mixes: Vec<_> = MIXES
        .iter()
        .filter(|(name, ..)| {
            *name == "none" || wanted.as_ref().is_none_or(|w| w.iter().any(|x| x == name))
        })
        .take(if measuring { MIXES.len() } else { 2 })
        .collect();
    let settings: &[bool] = match std::env::var("BENCH_CGROUPS").as_deref() {
        Ok("off") => &[false],
        Ok("both") => &[true, false],
        _ => &[true],
    };
    let extra_args: Vec<String> = std::env::var("BENCH_AGENT_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let zygote = std::env::var("BENCH_ZYGOTE").ok();
    let root = tempfile::Builder::new()
        .prefix("mayfly-fairhttp")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let penalty = std::env::var("BENCH_PENALTY").ok();
    let policy = fair::shipped_policy_with_test_handlers(
        root.path(),
        match penalty.as_deref() {
            None | Some("shipped") => None,
            Some("off") => Some(""),
            Some(other) => Some(other),
        },
        std::env::var("BENCH_RATES").as_deref() == Ok("shipped"),
    );
    println!(
        "fairness through the agent: {} honest transfer clients (127.0.0.1) beside {} hostile \
         (127.0.0.2 and up, one per mix), {secs} s per mix, {reps} repetitions, pool {pool}, template {}, extra \
         flags {extra_args:?}, penalty {}, rates {}",
        fair::HONEST,
        fair::HOSTILE,
        zygote.as_deref().unwrap_or("beside the agent"),
        penalty.as_deref().unwrap_or("shipped"),
        std::env::var("BENCH_RATES").unwrap_or_else(|_| "raised".into()),
    );
    let timeout = Duration::from_secs(40);
    for &cgroups in settings {
        let mut rows: Vec<Vec<Row>> = (0..mixes.len()).map(|_| Vec::new()).collect();
        for rep in 0..reps {
            let data = root.path().join(format!("{cgroups}-{rep}"));
            let pool_text = pool.to_string();
            let mut args: Vec<&str> = vec![
                "--policy",
                policy.to_str().unwrap(),
                "--pool-size",
                &pool_text,
            ];
            if !cgroups {
                args.push("--no-cgroups");
            }
            if let Some(z) = &zygote {
                args.extend(["--zygote", z.as_str()]);
            }
            args.extend(extra_args.iter().map(String::as_str));
            // Warnings only (quarantine full, …) would drown the figures: errors only.
            args.extend(["--log-level", "error"]);
            let agent = common::Agent::start(&data, &args);
            let pid = agent.child.as_ref().unwrap().id();
            fair::seed(agent.addr);
            // Warm-up (not recorded): the level before any attack is taken after honest
            // traffic of the same kind.
            let _ = fair::run(
                agent.addr,
                ("", ""),
                fair::HOSTILE_IP,
                Duration::from_secs(1),
                timeout,
                0,
            );
            for (i, (name, handler, payload)) in mixes.iter().enumerate() {
                let (total_before, rss_before_kib) = fair::rss_kib(pid);
                let own_before = total_before.saturating_sub(ledger_map_rss_kib(pid));
                let file_before = data_file_size(&data);
                let threads_before = threads(pid);
                if std::env::var_os("BENCH_SMAPS").is_some() {
                    println!(
                        "  rep {rep} {name:>8}: anonymous memory before: {}",
                        anon_by_mapping(pid)
                    );
                }
                let load = fair::run(
                    agent.addr,
                    (handler, payload),
                    fair::hostile_ip(i),
                    Duration::from_secs_f64(secs),
                    timeout,
                    (rep * 10 + i) as u64,
                );
                let idle = fair::wait_idle(agent.addr, Duration::from_secs(60));
                // Memory back within 20 % (the issue's target: no 2 MiB floor here, unlike
                // the test's `fair::settle_rss`), or what it is after 30 s (idle pool
                // threads end 10 s after their last transaction).
                let (rss_after_kib, settled) =
                    settle_within_ratio(pid, rss_before_kib, Duration::from_secs(30));
                let threads_after = threads(pid);
                if std::env::var_os("BENCH_TRIM_PROBE").is_some() {
                    let _ = std::process::Command::new("gdb")
                        .args([
                            "-p",
                            &pid.to_string(),
                            "-batch",
                            "-ex",
                            "call (int)malloc_trim(0)",
                        ])
                        .output();
                    println!(
                        "  PROBE after malloc_trim: anon {} KiB (was {rss_after_kib})",
                        fair::rss_kib(pid).1
                    );
                }
                let (total_after, _) = fair::rss_kib(pid);
                let own_after = total_after.saturating_sub(ledger_map_rss_kib(pid));
                let file_after = data_file_size(&data);
                if std::env::var_os("BENCH_SMAPS").is_some() {
                    println!(
                        "  rep {rep} {name:>8}: anonymous memory after: {}",
                        anon_by_mapping(pid)
                    );
                }
                println!(
                    "  rep {rep} {name:>8}: {:>6.0} tx/s p50 {:>8.2?} p99 {:>8.2?}  honest non-200 \
                     {} hung {}  hostile {} hung {} broken {}  RSS anon {} → {} KiB (after {:.1} s; \
                     threads {} → {}) (VmRSS {} → {} MiB, outside the ledger map {} → {} MiB) \
                     data.mdb {} → {} MiB{}",
                    load.rate(),
                    load.quantile(0.5),
                    load.quantile(0.99),
                    counts(&load.honest_other),
                    load.honest_hung,
                    counts(&load.hostile),
                    load.hostile_hung,
                    load.hostile_broken,
                    rss_before_kib,
                    rss_after_kib,
                    settled.as_secs_f64(),
                    threads_before,
                    threads_after,
                    total_before >> 10,
                    total_after >> 10,
                    own_before >> 10,
                    own_after >> 10,
                    file_before >> 20,
                    file_after >> 20,
                    if idle { "" } else { " (still busy after 60 s)" }
                );
                rows[i].push(Row {
                    load,
                    rss_after_kib,
                    rss_before_kib,
                    vm_after_kib: total_after,
                    vm_before_kib: total_before,
                    own_after_kib: own_after,
                    own_before_kib: own_before,
                    file_after,
                    file_before,
                });
            }
            drop(agent);
            let _ = std::fs::remove_dir_all(&data);
        }
        println!(
            "cgroup limits {} (medians of {reps}):",
            if cgroups { "on" } else { "off (--no-cgroups)" }
        );
        let base_rate = median(rows[0].iter().map(|r| r.load.rate()).collect());
        let base_p99 = median(
            rows[0]
                .iter()
                .map(|r| r.load.quantile(0.99).as_secs_f64())
                .collect(),
        );
        for (i, (name, ..)) in mixes.iter().enumerate() {
            let r = &rows[i];
            let rate = median(r.iter().map(|x| x.load.rate()).collect());
            let p50 = median(
                r.iter()
                    .map(|x| x.load.quantile(0.5).as_secs_f64())
                    .collect(),
            );
            let p99 = median(
                r.iter()
                    .map(|x| x.load.quantile(0.99).as_secs_f64())
                    .collect(),
            );
            let refused = median(
                r.iter()
                    .map(|x| x.load.hostile.get(&503).copied().unwrap_or(0) as f64)
                    .collect(),
            );
            let ended = median(
                r.iter()
                    .map(|x| {
                        x.load
                            .hostile
                            .iter()
                            .filter(|(c, _)| **c != 503)
                            .map(|(_, n)| *n as f64)
                            .sum()
                    })
                    .collect(),
            );
            let hung: u64 = r
                .iter()
                .map(|x| x.load.hostile_hung + x.load.honest_hung)
                .sum();
            let rss = median(
                r.iter()
                    .map(|x| x.rss_after_kib as f64 / x.rss_before_kib.max(1) as f64)
                    .collect(),
            );
            let vm = median(
                r.iter()
                    .map(|x| x.vm_after_kib as f64 / x.vm_before_kib.max(1) as f64)
                    .collect(),
            );
            let own = median(
                r.iter()
                    .map(|x| x.own_after_kib as f64 / x.own_before_kib.max(1) as f64)
                    .collect(),
            );
            let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
            let file_before = median(r.iter().map(|x| mib(x.file_before)).collect());
            let file_after = median(r.iter().map(|x| mib(x.file_after)).collect());
            println!(
                "  {name:>8}: {rate:>7.0} tx/s ({:.2}x)  p50 {:>7.2} ms  p99 {:>7.2} ms ({:.1}x)  \
                 hostile 503 {refused:>6.0} ended {ended:>5.0}  hung {hung}  anon RSS after/before {rss:.2}  \
                 VmRSS after/before {vm:.2} (outside the ledger map {own:.2})  data.mdb {file_before:.1} -> {file_after:.1} MiB",
                rate / base_rate,
                p50 * 1e3,
                p99 * 1e3,
                p99 / base_p99
            );
        }
    }
}
