//! What the kernel primitives a sandbox transaction is built from cost on this machine, so
//! that the `transactions` and `clones` figures can be read against a floor:
//!
//! * **wake-up round trip** — two threads ping-pong through a pair of eventfds (`write`,
//!   `poll`, `read`), as the ring's notifier does: one round trip is two cross-thread
//!   wake-ups;
//! * **fork + exit + wait** — this process forks a child that `_exit`s at once; the parent
//!   reaps it;
//! * **… + seccomp install** — the same, with the child installing the sandbox's filter
//!   ([`mayfly_sandbox_zygote::seccomp::compile`]) before it exits: the cost a clone would pay if it
//!   installed its own filter instead of inheriting the zygote's;
//! * **… + new namespaces** — the child `unshare`s a network, mount, IPC and UTS namespace
//!   before it exits: what a process per transaction would pay to be isolated like the
//!   zygote (whose namespaces every clone shares) — root only, skipped otherwise.
//!
//! Each figure is wall time and CPU time (this process and its reaped children) per
//! operation, median of `BENCH_REPS` runs (default 5) of `BENCH_ITERS` operations (default
//! 2,000; a tenth of that for the namespace row). Run: `cargo bench -p mayfly-sandbox --bench
//! primitives`.
#![allow(
    missing_docs,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

use std::time::{Duration, Instant};

use mayfly_ring::{EventFdNotifier, Notifier};
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};

fn cpu_now() -> Duration {
    let used = |who| {
        let u = getrusage(who).unwrap();
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
        };
        tv(u.user_time()) + tv(u.system_time())
    };
    used(UsageWho::RUSAGE_SELF) + used(UsageWho::RUSAGE_CHILDREN)
}

/// Runs `op` `iters` times; wall and CPU per operation.
fn measure(iters: u32, mut op: impl FnMut()) -> (Duration, Duration) {
    let (wall, cpu) = (Instant::now(), cpu_now());
    for _ in 0..iters {
        op();
    }
    (wall.elapsed() / iters, (cpu_now() - cpu) / iters)
}

fn wakeup_round_trips(iters: u32) -> (Duration, Duration) {
    let (ours, theirs) = EventFdNotifier::pair().unwrap();
    let peer = std::thread::spawn(move || {
        for _ in 0..iters {
            theirs.wait(None).unwrap();
            theirs.notify().unwrap();
        }
    });
    let r = measure(iters, || {
        ours.notify().unwrap();
        ours.wait(None).unwrap();
    });
    peer.join().unwrap();
    r
}

/// What the forked child does before `_exit`.
#[derive(Clone, Copy)]
enum InChild<'a> {
    Nothing,
    Seccomp(&'a mayfly_sandbox_zygote::seccomp::BpfProgram),
    Namespaces,
}

fn fork_exit_wait(iters: u32, in_child: InChild<'_>) -> (Duration, Duration) {
    measure(iters, || {
        // SAFETY: the child makes only async-signal-safe calls (prctl and seccomp through
        // `install`, which does not allocate for an already built program, then `_exit`)
        // before it exits; nothing of the parent's state is used.
        #[allow(unsafe_code)]
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = match in_child {
                    InChild::Nothing => 0,
                    InChild::Seccomp(f) => {
                        i32::from(mayfly_sandbox_zygote::seccomp::install(f).is_err())
                    }
                    InChild::Namespaces => {
                        let flags = libc::CLONE_NEWNET
                            | libc::CLONE_NEWNS
                            | libc::CLONE_NEWIPC
                            | libc::CLONE_NEWUTS;
                        // SAFETY: unshare(2) takes plain flags.
                        #[allow(unsafe_code)]
                        let rc = unsafe { libc::unshare(flags) };
                        i32::from(rc != 0)
                    }
                };
                // SAFETY: ends the child at once, running nothing of the parent's.
                #[allow(unsafe_code)]
                unsafe {
                    libc::_exit(code)
                }
            }
            ForkResult::Parent { child } => {
                let status = waitpid(child, None).unwrap();
                assert!(
                    matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
                    "{status:?}"
                );
            }
        }
    })
}

/// One measurement: wall and CPU time per operation.
type Measure = dyn Fn() -> (Duration, Duration);

fn median(mut v: Vec<(Duration, Duration)>) -> (Duration, Duration) {
    let m = v.len() / 2;
    v.sort_by_key(|r| r.0);
    let wall = v[m].0;
    v.sort_by_key(|r| r.1);
    (wall, v[m].1)
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let env_or = |name: &str, d: f64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let iters = if measuring {
        env_or("BENCH_ITERS", 2000.0)
    } else {
        20.0
    } as u32;
    let reps = if measuring {
        env_or("BENCH_REPS", 5.0)
    } else {
        1.0
    } as usize;
    let filter = mayfly_sandbox_zygote::seccomp::compile().unwrap();
    println!("primitives bench: {iters} operations per run, {reps} runs, medians");
    let root = nix::unistd::geteuid().is_root();
    let mut rows: Vec<(&str, Box<Measure>)> = vec![
        (
            "eventfd wake-up round trip",
            Box::new(move || wakeup_round_trips(iters)),
        ),
        (
            "fork + exit + wait",
            Box::new(move || fork_exit_wait(iters, InChild::Nothing)),
        ),
        (
            "fork + seccomp install + exit + wait",
            Box::new(move || fork_exit_wait(iters, InChild::Seccomp(&filter))),
        ),
    ];
    if root {
        rows.push((
            "fork + new namespaces + exit + wait",
            Box::new(move || fork_exit_wait(iters.div_ceil(10), InChild::Namespaces)),
        ));
    } else {
        println!("  (not root: the namespace row is skipped)");
    }
    let mut results = vec![Vec::new(); rows.len()];
    for _ in 0..reps {
        for (i, (_, f)) in rows.iter().enumerate() {
            results[i].push(f());
        }
    }
    for ((name, _), r) in rows.iter().zip(results) {
        let (wall, cpu) = median(r);
        println!(
            "  {name:<38} wall {:>6.1} µs  cpu {:>6.1} µs",
            wall.as_nanos() as f64 / 1000.0,
            cpu.as_nanos() as f64 / 1000.0
        );
    }
}
