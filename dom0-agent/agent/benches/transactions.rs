//! Throughput and latency of the `transfer` handler with a fresh domain per transaction,
//! against two baselines measured in the same run:
//!
//! * `in-process` — the same handler function called directly in the agent against the same
//!   ledger: no isolation, no ring, no process.
//! * `fork+exec`  — the same executor and ring, but each domain is a new `domu-shim` process
//!   started with fork+exec (no zygote, no pool): what "a fresh process per transaction"
//!   costs when done naively.
//! * `sandbox`    — the product's embedded backend: copy-on-write clones of a paused zygote,
//!   confined by namespaces, seccomp and rlimits, kept ready by a background pool.
//!
//! Each configuration runs `CLIENTS` client threads for `BENCH_SECS` seconds; every client
//! runs transfers between random accounts among 1,000 (no overdrafts, few conflicts). The
//! run is repeated `BENCH_REPS` times, interleaved; medians are reported.
//!
//! Run: `cargo build --release -p domu-shim && scripts/build-zygote.sh target/zygote-static &&
//! BENCH_ZYGOTE=$PWD/target/zygote-static/mayfly-zygote cargo bench -p dom0-agent --bench
//! transactions` — the sandbox measured with the statically linked template `scripts/run.sh`
//! uses; without `BENCH_ZYGOTE`, with the dynamically linked one cargo builds (the header
//! line says which). The sandbox runs with its clones' cgroup limits, as shipped;
//! `BENCH_NO_CGROUPS=1` runs it without them; `BENCH_STATE_DIGEST=off` runs the ledger without
//! its live-state digest (what the digest costs per transaction).
//!
//! `BENCH_ONLY=replication` (issue 18) measures, interleaved in one run, the sandbox path
//! standalone, with a **synchronous** standby (a `Shipper` and a standby following it over
//! loopback mutual TLS in this process, each commit acknowledged only once the standby has
//! it durable) and with an **asynchronous** one, whose lag (groups durable on the primary
//! and not yet on the standby) is sampled every 5 ms under load, with the time it takes to
//! catch up once the load stops. Each configuration also prints its mean jobs per group
//! commit (`jobs/group`): how far group commit amortised the per-group cost.
#![allow(
    missing_docs,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

mod common;
use common::{log, payload, seed, LedgerDb};

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mayfly_domain::{
    Domain, DomainBackend, DomainError, DomainExit, DomainId, PoolStats, Quarantined, Ring,
};
use mayfly_executor::{Executor, ExecutorConfig, TxRequest, TxStatus};
use mayfly_ledger::{Ledger, Options, TxContext, TxId};
use mayfly_ring::{EventFdNotifier, Geometry, MmapMem, Notifier, SharedMem};
use mayfly_sandbox::{Sandbox, SandboxConfig};
use mayfly_sdk::Ctx;

const CLIENTS: usize = 8;

// --- fork+exec backend ---------------------------------------------------------------------

struct ExecDomain {
    id: DomainId,
    ready_id: u32,
    ring: Ring,
    notifier: EventFdNotifier,
    child: Option<Child>,
}

impl Domain for ExecDomain {
    fn id(&self) -> DomainId {
        self.id
    }
    fn ready_id(&self) -> u32 {
        self.ready_id
    }
    fn ring(&mut self) -> (&mut Ring, &dyn Notifier) {
        (&mut self.ring, &self.notifier)
    }
    fn try_exit(&mut self) -> Result<Option<DomainExit>, DomainError> {
        Ok(None)
    }
    fn destroy(mut self: Box<Self>) -> Result<DomainExit, DomainError> {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let status = child.wait().unwrap();
        Ok(DomainExit::Exited {
            code: status.code().unwrap_or(-1),
        })
    }
    fn quarantine(self: Box<Self>) -> Result<Quarantined, DomainError> {
        Err(DomainError::Control {
            backend: "fork+exec",
            id: self.id,
            source: "not supported".into(),
        })
    }
}

struct ExecBackend {
    shim: PathBuf,
    next: AtomicU32,
    spawn_lock: Mutex<()>,
}

fn inheritable(fd: &OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
}

impl DomainBackend for ExecBackend {
    fn name(&self) -> &'static str {
        "fork+exec"
    }
    fn take(&self, timeout: Duration) -> Result<Box<dyn Domain>, DomainError> {
        let geometry = Geometry::DEFAULT;
        let mem = MmapMem::memfd(c"mayfly-bench-ring", geometry.total_len()).unwrap();
        let ring_fd = mem.fd().unwrap().try_clone_to_owned().unwrap();
        let shared: Arc<dyn SharedMem> = Arc::new(mem);
        let mut ring = Ring::new(shared, geometry).unwrap();
        let (agent, guest) = EventFdNotifier::pair().unwrap();
        let signal = guest.signal_fd().try_clone_to_owned().unwrap();
        let wait = guest.wait_fd().try_clone_to_owned().unwrap();
        drop(guest);
        let child = {
            // Inherited fds are made inheritable only under this lock, and closed right
            // after the spawn, so no other child picks them up.
            let _g = self.spawn_lock.lock().unwrap();
            for fd in [&ring_fd, &signal, &wait] {
                inheritable(fd);
            }
            let child = Command::new(&self.shim)
                .arg("--ring-fd")
                .arg(ring_fd.as_raw_fd().to_string())
                .arg("--ring-len")
                .arg(geometry.total_len().to_string())
                .arg("--signal-fd")
                .arg(signal.as_raw_fd().to_string())
                .arg("--wait-fd")
                .arg(wait.as_raw_fd().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            drop((ring_fd, signal, wait));
            child
        };
        let env = ring.recv_request(&agent, Some(timeout)).unwrap();
        Ok(Box::new(ExecDomain {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            ready_id: env.id,
            ring,
            notifier: agent,
            child: Some(child),
        }))
    }
    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }
    fn quarantined(&self) -> Vec<mayfly_domain::Quarantined> {
        Vec::new() // this double keeps no quarantined domains: it refuses to quarantine
    }
    fn release_quarantined(
        &self,
        _id: mayfly_domain::DomainId,
    ) -> Result<Option<mayfly_domain::DomainExit>, DomainError> {
        Ok(None)
    }
    fn shutdown(&self) {}
}

// --- runs ----------------------------------------------------------------------------------

struct Run {
    rate: f64,
    p50: Duration,
    p99: Duration,
    /// CPU time (all threads of this process, and every process it reaped, directly or
    /// through the zygote) per transaction, from before the backend started to after it
    /// shut down.
    cpu_per_tx: Duration,
    /// Transactions completed.
    count: usize,
    /// CPU time of the client threads (each its own, `RUSAGE_THREAD`) over the measured
    /// window, in all.
    client_cpu: Duration,
    /// CPU per transaction over the measured window only, split by where it was spent
    /// (zero where not measured).
    split: CpuSplit,
}

/// CPU per transaction over the measured window (clients started to clients joined),
/// split: the client threads (each calls the executor, so this is the executor's calling
/// path plus the loop's own cost), the process's other threads (the ledger's commit
/// thread, the sandbox's threads), and the zygote tree (the zygote and the clones it has
/// reaped). scripts/bench-http.py sets the agent's figures beside these.
#[derive(Default, Clone, Copy)]
struct CpuSplit {
    clients: Duration,
    other_threads: Duration,
    zygote_tree: Duration,
    /// Context switches (voluntary and not) of this process's threads per transaction.
    switches: f64,
}

/// User + system CPU time of `who` (getrusage).
fn rusage_cpu(who: nix::sys::resource::UsageWho) -> Duration {
    let u = nix::sys::resource::getrusage(who).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}

/// Context switches (voluntary and involuntary) of this process's threads so far.
fn switches_now() -> i64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    u.voluntary_context_switches() + u.involuntary_context_switches()
}

/// CPU time used so far by this process and its reaped descendants.
fn cpu_now() -> Duration {
    rusage_cpu(nix::sys::resource::UsageWho::RUSAGE_SELF)
        + rusage_cpu(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
}

/// CPU time so far of this process's live children and everything they have reaped (the
/// zygote and its clones), from /proc: utime + stime + cutime + cstime, in USER_HZ ticks
/// (100 a second in Linux's ABI).
fn children_tree_cpu() -> Duration {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in children.split_whitespace() {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue; // ended meanwhile
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            // Fields 14..=17 (1-based) of the line; `rest` starts at field 3.
            ticks += rest
                .split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|f| f.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Duration::from_millis(ticks * 10)
}

fn summarize(mut lat: Vec<Duration>, elapsed: Duration) -> Run {
    lat.sort_unstable();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    Run {
        rate: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
        cpu_per_tx: Duration::ZERO,
        count: lat.len(),
        client_cpu: Duration::ZERO,
        split: CpuSplit::default(),
    }
}

fn clients<F>(n: usize, secs: f64, f: F) -> Run
where
    F: Fn(&mut fastrand::Rng, usize) + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || {
                let cpu = rusage_cpu(nix::sys::resource::UsageWho::RUSAGE_THREAD);
                let mut rng = fastrand::Rng::with_seed(c as u64 + 7);
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    f(&mut rng, c);
                    lat.push(t.elapsed());
                }
                let cpu = rusage_cpu(nix::sys::resource::UsageWho::RUSAGE_THREAD) - cpu;
                (lat, cpu)
            })
        })
        .collect();
    let mut lat: Vec<Duration> = Vec::new();
    let mut client_cpu = Duration::ZERO;
    for t in threads {
        let (l, cpu) = t.join().unwrap();
        lat.extend(l);
        client_cpu += cpu;
    }
    let mut run = summarize(lat, start.elapsed());
    run.client_cpu = client_cpu;
    run
}

/// `run`, with the CPU time used since `cpu_before` divided among its transactions.
fn with_cpu(mut run: Run, cpu_before: Duration) -> Run {
    let txs = u32::try_from(run.count.max(1)).unwrap_or(u32::MAX);
    run.cpu_per_tx = (cpu_now() - cpu_before) / txs;
    run
}

/// The ledger's options: as shipped, or with `BENCH_STATE_DIGEST=off` without the live-state
/// digest (version-1 heads), to measure what the digest costs on the transaction path.
fn ledger_options() -> Options {
    Options {
        state_digest: std::env::var("BENCH_STATE_DIGEST").as_deref() != Ok("off"),
        ..Options::default()
    }
}

fn in_process(dir: &Path, n: usize, secs: f64) -> Run {
    let cpu_before = cpu_now();
    let ledger = Ledger::open(dir, &ledger_options(), &log()).unwrap();
    seed(&ledger);
    let transfer = mayfly_handlers::registry().get("transfer").unwrap();
    let run = clients(n, secs, move |rng, _client| {
        let p = payload(rng);
        loop {
            let mut tx = ledger
                .begin(TxContext {
                    tx_id: TxId::generate(),
                    handler: "transfer".into(),
                    request: p.clone(),
                    domain_id: 0,
                    policy_hash: [0; 32],
                })
                .unwrap();
            let mut seed = [0u8; 32];
            rng.fill(&mut seed);
            let result = {
                let mut db = LedgerDb(&mut tx);
                let mut ctx = Ctx::new(&mut db, [0; 16], seed);
                transfer(&mut ctx, &p).unwrap()
            };
            match tx.commit(result) {
                Ok(_) => return,
                Err(e) if e.is_conflict() => continue,
                Err(e) => panic!("{e}"),
            }
        }
    });
    with_cpu(run, cpu_before)
}

/// A standby following the bench's ledger over loopback mutual TLS, in this process.
struct Replicated {
    shipper: mayfly_replica::Shipper,
    stop: Arc<std::sync::atomic::AtomicBool>,
    follower: std::thread::JoinHandle<()>,
}

impl Replicated {
    fn start(ledger: &Ledger, dir: &Path, mode: mayfly_replica::Mode) -> Self {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let ident = || {
            let c = rcgen::generate_simple_self_signed(vec!["bench".into()]).unwrap();
            let der = c.cert.der().clone();
            let pin = mayfly_replica::pin_of(&der).unwrap();
            (der, c.signing_key.serialize_der(), pin)
        };
        let (pc, pk, ppin) = ident();
        let (sc, sk, spin) = ident();
        let tls = |c: &rustls::pki_types::CertificateDer<'static>, k: &[u8], peer: &str| {
            mayfly_replica::PinnedTls::from_parts(
                vec![c.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.to_vec())),
                peer,
            )
            .unwrap()
        };
        let shipper = mayfly_replica::Shipper::start(
            ledger,
            mayfly_replica::PrimaryConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                mode,
                sync_timeout: Duration::from_secs(5),
                tls: tls(&pc, &pk, &spin),
                peer: None,
                heartbeat: Default::default(),
            },
            &log(),
        )
        .unwrap();
        let config = mayfly_replica::StandbyConfig {
            primary: shipper.local_addr(),
            tls: tls(&sc, &sk, &ppin),
            heartbeat: Default::default(),
        };
        let mut replica = mayfly_ledger::Replica::open(
            &dir.join("standby"),
            &mayfly_ledger::StoreOptions::default(),
            ledger.public_key(),
        )
        .unwrap();
        let local = Ledger::open(&dir.join("standby-audit"), &Options::default(), &log()).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let follower = std::thread::spawn(move || {
            mayfly_replica::follow(&mut replica, &config, &local, &s, &log()).unwrap();
        });
        // Measured from a synchronous state: the standby has caught up with the seeding.
        let deadline = Instant::now() + Duration::from_secs(60);
        while shipper.status().lag_groups() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if mode == mayfly_replica::Mode::Sync {
            while shipper.status().state() != "synchronous" && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(shipper.status().state(), "synchronous");
        }
        Self {
            shipper,
            stop,
            follower,
        }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.follower.join().unwrap();
        self.shipper.stop();
    }
}

/// Async lag under load: the median and largest number of groups the standby was behind
/// (sampled every 5 ms), and how long it took to catch up after the load stopped; and, for
/// every configuration, the mean jobs per group commit (group commit amortises the fsync,
/// the signature and, replicated, the standby's work over the jobs of a group).
#[derive(Default, Clone, Copy)]
struct Lag {
    median_groups: u64,
    max_groups: u64,
    catch_up: Duration,
    jobs_per_group: f64,
}

fn through_executor(
    dir: &Path,
    backend: impl FnOnce() -> Arc<dyn DomainBackend>,
    n: usize,
    secs: f64,
) -> Run {
    through_executor_replicated(dir, backend, n, secs, None).0
}

fn through_executor_replicated(
    dir: &Path,
    backend: impl FnOnce() -> Arc<dyn DomainBackend>,
    n: usize,
    secs: f64,
    replicate: Option<mayfly_replica::Mode>,
) -> (Run, Lag) {
    let cpu_before = cpu_now();
    let backend = backend();
    let ledger = Ledger::open(dir, &ledger_options(), &log()).unwrap();
    seed(&ledger);
    let replicated = replicate.map(|mode| Replicated::start(&ledger, dir, mode));
    let stats = ledger.clone();
    let seeded = stats.group_stats().jobs;
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = replicated.as_ref().map(|r| {
        let (handle, on) = (r.shipper.status_handle(), sampling.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while on.load(std::sync::atomic::Ordering::SeqCst) {
                samples.push(handle.status().lag_groups());
                std::thread::sleep(Duration::from_millis(5));
            }
            samples
        })
    });
    // BENCH_WARM_POOL=N: wait (up to 60 s) for N ready domains before measuring, as a
    // long-running agent has them (scripts/bench-http.py compares against a warm agent).
    if let Some(want) = std::env::var("BENCH_WARM_POOL")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        while backend.stats().ready < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let cpu_before = if std::env::var_os("BENCH_WARM_POOL").is_some() {
        cpu_now()
    } else {
        cpu_before
    };
    let names = vec!["transfer".to_owned()];
    let config = ExecutorConfig {
        max_attempts: 100,
        take_timeout: Duration::from_secs(30),
        ..ExecutorConfig::default()
    };
    let ex = Arc::new(Executor::new(
        ledger,
        backend.clone(),
        names,
        config,
        shipped_policy(),
        &log(),
    ));
    // One client identity per thread, as separate hosts would be (policy rates are per
    // client).
    let (self_before, tree_before, switches_before) = (
        rusage_cpu(nix::sys::resource::UsageWho::RUSAGE_SELF),
        children_tree_cpu(),
        switches_now(),
    );
    let mut run = clients(n, secs, move |rng, client| {
        let o = ex
            .execute(&TxRequest {
                handler: "transfer".into(),
                payload: payload(rng),
                client: format!("bench-{client}"),
            })
            .unwrap();
        assert_eq!(o.status, TxStatus::Committed, "{:?}", o.error);
    });
    let txs = u32::try_from(run.count.max(1)).unwrap_or(u32::MAX);
    let own = rusage_cpu(nix::sys::resource::UsageWho::RUSAGE_SELF) - self_before;
    run.split = CpuSplit {
        clients: run.client_cpu / txs,
        other_threads: own.saturating_sub(run.client_cpu) / txs,
        zygote_tree: children_tree_cpu().saturating_sub(tree_before) / txs,
        switches: (switches_now() - switches_before) as f64 / f64::from(txs),
    };
    let load_end = Instant::now();
    let jobs = stats.group_stats().jobs;
    let mut lag = Lag {
        jobs_per_group: jobs.sum.saturating_sub(seeded.sum) as f64
            / jobs.count.saturating_sub(seeded.count).max(1) as f64,
        ..Lag::default()
    };
    if let (Some(r), Some(sampler)) = (&replicated, sampler) {
        while r.shipper.status().lag_groups() > 0 && load_end.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(1));
        }
        lag.catch_up = load_end.elapsed();
        sampling.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut samples = sampler.join().unwrap();
        samples.sort_unstable();
        lag.median_groups = samples.get(samples.len() / 2).copied().unwrap_or(0);
        lag.max_groups = samples.last().copied().unwrap_or(0);
    }
    if let Some(r) = replicated {
        r.stop();
    }
    backend.shutdown();
    drop(backend);
    (with_cpu(run, cpu_before), lag)
}

/// `BENCH_ONLY=replication`: standalone, sync and async, interleaved, medians.
fn replication_bench(root: &Path, zygote: &Path, secs: f64, reps: usize) {
    use mayfly_replica::Mode;
    println!("replication bench: sandbox path, {secs} s per run, {reps} interleaved repetitions");
    for n in [1, CLIENTS] {
        let (mut alone, mut sync, mut asynch, mut lags) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut per_group: [Vec<f64>; 3] = Default::default();
        for rep in 0..reps {
            for (name, mode) in [
                ("alone", None),
                ("sync", Some(Mode::Sync)),
                ("async", Some(Mode::Async)),
            ] {
                let d = root.join(format!("repl-{name}-{n}-{rep}"));
                let (run, lag) =
                    through_executor_replicated(&d, || sandbox_backend(zygote, &d), n, secs, mode);
                per_group[match mode {
                    None => 0,
                    Some(Mode::Sync) => 1,
                    Some(Mode::Async) => 2,
                }]
                .push(lag.jobs_per_group);
                match mode {
                    None => alone.push(run),
                    Some(Mode::Sync) => sync.push(run),
                    Some(Mode::Async) => {
                        asynch.push(run);
                        lags.push(lag);
                    }
                }
            }
        }
        let rows = [
            ("standalone", median(&mut alone)),
            ("sync", median(&mut sync)),
            ("async", median(&mut asynch)),
        ];
        println!("{n} client(s):");
        for ((name, (rate, p50, p99, cpu)), jobs) in rows.into_iter().zip(&mut per_group) {
            jobs.sort_by(|a, b| a.total_cmp(b));
            println!(
                "  {name:>10}: {rate:>8.0} tx/s  p50 {p50:>10.2?}  p99 {p99:>10.2?}  cpu/tx {:>6} µs  jobs/group {:>5.2}",
                cpu.as_micros(),
                jobs[jobs.len() / 2]
            );
        }
        let ((ar, ap, aq, _), (sr, sp, sq, _)) = (rows[0].1, rows[1].1);
        println!(
            "  sync vs standalone: p50 {:.2}x, p99 {:.2}x, throughput {:.2}x",
            sp.as_secs_f64() / ap.as_secs_f64(),
            sq.as_secs_f64() / aq.as_secs_f64(),
            sr / ar
        );
        lags.sort_by_key(|l| l.max_groups);
        let mid = lags[lags.len() / 2];
        println!(
            "  async lag under load (median run): median {} groups, max {} groups, caught up {:.2?} after the load stopped",
            mid.median_groups, mid.max_groups, mid.catch_up
        );
    }
}

fn median(runs: &mut [Run]) -> (f64, Duration, Duration, Duration) {
    let mut rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
    let mut p50: Vec<Duration> = runs.iter().map(|r| r.p50).collect();
    let mut p99: Vec<Duration> = runs.iter().map(|r| r.p99).collect();
    let mut cpu: Vec<Duration> = runs.iter().map(|r| r.cpu_per_tx).collect();
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    p50.sort_unstable();
    p99.sort_unstable();
    cpu.sort_unstable();
    let m = runs.len() / 2;
    (rates[m], p50[m], p99[m], cpu[m])
}

/// The shipped default policy bundle: every ring operation is checked, as in production.
fn shipped_policy() -> mayfly_policy::Bundle {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/default");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    // Its per-client rate limits (2,000 transactions and 1,000 transfers per second) would
    // refuse a single fast client: raised here, so that they are evaluated on every
    // transaction, as shipped, without tripping. Fails loudly if the shipped values change.
    for (name, text) in &mut files {
        if name == "detection.toml" {
            for limit in ["max = 2_000\n", "max = 1_000\n"] {
                assert!(
                    text.contains(limit),
                    "{name}: no `{limit}` rate limit any more"
                );
                *text = text.replace(limit, "max = 1_000_000\n");
            }
        }
    }
    mayfly_policy::Bundle::load(&files).unwrap()
}

fn exec_backend(shim: &Path) -> Arc<dyn DomainBackend> {
    Arc::new(ExecBackend {
        shim: shim.to_path_buf(),
        next: AtomicU32::new(1),
        spawn_lock: Mutex::new(()),
    })
}

fn sandbox_backend(zygote: &Path, dir: &Path) -> Arc<dyn DomainBackend> {
    let mut config = SandboxConfig::new(zygote, Vec::<String>::new(), dir.join("run"));
    config.pool_size = 16;
    // The clones' cgroup limits are on by default, as shipped; BENCH_NO_CGROUPS=1 measures
    // without them (what they cost per transaction).
    if std::env::var_os("BENCH_NO_CGROUPS").is_some() {
        config.cgroups = None;
    }
    Arc::new(Sandbox::start(config, log()).unwrap())
}

/// "statically linked" or "dynamically linked", from the ELF program headers (a `PT_INTERP`
/// entry names the dynamic loader): `scripts/build-zygote.sh` makes the static template
/// that `scripts/run.sh` uses; cargo builds a dynamic one.
fn linkage(exe: &Path) -> &'static str {
    const PT_INTERP: u32 = 3;
    let Ok(elf) = std::fs::read(exe) else {
        return "unreadable";
    };
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        elf.get(0x20..0x28)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap())),
        u16_at(0x36),
        u16_at(0x38),
    ) else {
        return "not ELF";
    };
    let interp = (0..usize::from(phnum)).any(|i| {
        let at = usize::try_from(phoff).unwrap() + i * usize::from(phentsize);
        elf.get(at..at + 4)
            .is_some_and(|b| u32::from_le_bytes(b.try_into().unwrap()) == PT_INTERP)
    });
    if interp {
        "dynamically linked"
    } else {
        "statically linked"
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
        env_or("BENCH_SECS", 5.0)
    } else {
        0.3
    };
    let reps = if measuring {
        env_or("BENCH_REPS", 3.0) as usize
    } else {
        1
    };
    let built = PathBuf::from(env!("CARGO_BIN_EXE_mayfly-zygote"));
    let shim = built.with_file_name("domu-shim");
    let zygote = std::env::var_os("BENCH_ZYGOTE").map_or(built, PathBuf::from);
    let only = std::env::var("BENCH_ONLY").ok();
    if !shim.exists() && only.as_deref().is_none_or(|o| o == "fork+exec") {
        eprintln!(
            "{} is missing: build it first with `cargo build {}-p domu-shim`",
            shim.display(),
            if measuring { "--release " } else { "" }
        );
        std::process::exit(2);
    }
    let root = tempfile::Builder::new()
        .prefix("mayfly-txbench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    if only.as_deref() == Some("replication") {
        replication_bench(root.path(), &zygote, secs, reps);
        return;
    }
    if let Some(only) = only {
        // Profiling aid: one configuration, one run, BENCH_CLIENTS clients.
        let d = root.path().join("only");
        let n = env_or("BENCH_CLIENTS", CLIENTS as f64) as usize;
        let run = match only.as_str() {
            "in-process" => in_process(&d, n, secs),
            "fork+exec" => through_executor(&d, || exec_backend(&shim), n, secs),
            _ => through_executor(&d, || sandbox_backend(&zygote, &d), n, secs),
        };
        println!(
            "{only}: {:.0} tx/s p50 {:.2?} p99 {:.2?} cpu/tx {} µs \
             (measured window: clients {} µs, other threads {} µs, zygote tree {} µs, \
             {:.1} context switches/tx)",
            run.rate,
            run.p50,
            run.p99,
            run.cpu_per_tx.as_micros(),
            run.split.clients.as_micros(),
            run.split.other_threads.as_micros(),
            run.split.zygote_tree.as_micros(),
            run.split.switches,
        );
        return;
    }
    println!("transactions bench: {secs} s per run, {reps} interleaved repetitions");
    println!(
        "sandbox template: {} ({})",
        zygote.display(),
        linkage(&zygote)
    );
    for n in [1, CLIENTS] {
        let (mut inproc, mut exec, mut sandbox) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps {
            let d = root.path().join(format!("inproc-{n}-{rep}"));
            inproc.push(in_process(&d, n, secs));
            let d = root.path().join(format!("exec-{n}-{rep}"));
            exec.push(through_executor(&d, || exec_backend(&shim), n, secs));
            let d = root.path().join(format!("sandbox-{n}-{rep}"));
            sandbox.push(through_executor(
                &d,
                || sandbox_backend(&zygote, &d),
                n,
                secs,
            ));
        }
        let rows = [
            ("in-process", median(&mut inproc)),
            ("fork+exec", median(&mut exec)),
            ("sandbox", median(&mut sandbox)),
        ];
        println!("{n} client(s):");
        for (name, (rate, p50, p99, cpu)) in rows {
            println!(
                "  {name:>10}: {rate:>8.0} tx/s  p50 {p50:>10.2?}  p99 {p99:>10.2?}  cpu/tx {:>6} µs", cpu.as_micros()
            );
        }
        let ((ir, ip, _, ic), (er, ep, _, ec), (sr, sp, _, sc)) = (rows[0].1, rows[1].1, rows[2].1);
        println!(
            "  sandbox vs in-process: p50 {:.1}x, throughput {:.2}x, cpu/tx {:.1}x | sandbox vs fork+exec: throughput {:.1}x, p50 {:.2}x, cpu/tx {:.2}x",
            sp.as_secs_f64() / ip.as_secs_f64(),
            sr / ir,
            sc.as_secs_f64() / ic.as_secs_f64(),
            sr / er,
            sp.as_secs_f64() / ep.as_secs_f64(),
            sc.as_secs_f64() / ec.as_secs_f64(),
        );
    }
}
