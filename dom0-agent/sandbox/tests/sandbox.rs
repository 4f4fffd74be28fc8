//! The sandbox backend against real processes: the test zygote (`src/bin/test_zygote.rs`,
//! built with the `test-zygote` feature) and its clones. Needs root (namespaces, setuid).
//!
//! Every wait is bounded and event-driven (ring notifications, pidfds, the pool's condition
//! variable); no test sleeps in place of synchronisation.

#![cfg(feature = "test-zygote")]
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mayfly_domain::{Domain, DomainBackend, DomainError, DomainExit, MAX_QUARANTINED};
use mayfly_ring::wire::Start;
use mayfly_ring::{Request, Response, RingError};
use mayfly_sandbox::config::{DEFAULT_FIRST_UID, DEFAULT_UID_COUNT};
use mayfly_sandbox::{reconcile, Sandbox, SandboxConfig, SandboxDomain};
use slog::{o, Drain, Logger};

const ZYGOTE: &str = env!("CARGO_BIN_EXE_mayfly-sandbox-test-zygote");
const WAIT: Duration = Duration::from_secs(20);

/// Debug logs on stderr when `MAYFLY_TEST_LOG` is set (shown for failing tests).
struct StderrDrain;

struct Kv(String);

impl slog::Serializer for Kv {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        self.0.push_str(&format!(" {key}={val}"));
        Ok(())
    }
}

impl Drain for StderrDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        static ON: AtomicBool = AtomicBool::new(false);
        if std::env::var_os("MAYFLY_TEST_LOG").is_some() {
            ON.store(true, Ordering::Relaxed);
        }
        if !ON.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut kv = Kv(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        eprintln!("{} {}{}", record.level().as_short_str(), record.msg(), kv.0);
        Ok(())
    }
}

fn logger() -> Logger {
    Logger::root(StderrDrain.fuse(), o!())
}

fn config(dir: &Path) -> SandboxConfig {
    let mut config = SandboxConfig::new(ZYGOTE, Vec::<String>::new(), dir);
    config.pool_size = 2;
    config
}

fn start(dir: &Path) -> Sandbox {
    Sandbox::start(config(dir), logger()).unwrap()
}

/// Answers the clone's `Ready` with a `Start` for `handler`.
fn begin(domain: &mut dyn Domain, handler: &str, payload: &[u8]) {
    let ready_id = domain.ready_id();
    let (ring, notifier) = domain.ring();
    let start = Start {
        tx_id: [1; 16],
        handler: handler.into(),
        payload: payload.to_vec(),
        entropy_seed: [7; 32],
    };
    ring.send_response(ready_id, &Response::Start(start), &notifier)
        .unwrap();
}

/// Serves the clone until it commits; returns the result.
fn commit(domain: &mut dyn Domain, timeout: Duration) -> Result<Vec<u8>, RingError> {
    let (ring, notifier) = domain.ring();
    let request = ring.recv_request(&notifier, Some(timeout))?;
    match request.body {
        Request::Commit { result } => {
            ring.send_response(request.id, &Response::Committed, &notifier)?;
            Ok(result)
        }
        other => panic!("expected Commit, got {other:?}"),
    }
}

fn run(
    sandbox: &Sandbox,
    handler: &str,
    payload: &[u8],
) -> (SandboxDomain, Result<Vec<u8>, RingError>) {
    let mut domain = sandbox.take_clone(WAIT).unwrap();
    begin(&mut domain, handler, payload);
    let result = commit(&mut domain, WAIT);
    (domain, result)
}

fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Processes (other than zombies) whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split(' ').collect();
        if fields.get(2) == Some(&pgid.to_string().as_str()) && fields.first() != Some(&"Z") {
            out.push(pid);
        }
    }
    out
}

fn pidfd(pid: u32) -> OwnedFd {
    // SAFETY: plain syscall; the returned fd is new and owned here.
    #[allow(unsafe_code)]
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        assert!(fd >= 0, "pidfd_open({pid}) failed");
        OwnedFd::from_raw_fd(i32::try_from(fd).unwrap())
    }
}

/// Whether `pid` is gone or exits within `timeout`.
fn gone_within(pid: u32, timeout: Duration) -> bool {
    // SAFETY: plain syscall; the returned fd is new and owned here.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return true; // no such process any more
    }
    // SAFETY: `fd` is a new pidfd nothing else owns.
    #[allow(unsafe_code)]
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) };
    exited(&fd, timeout)
}

/// Waits (poll on the pidfd, bounded) until the process has exited.
fn exited(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap();
    // SAFETY: one valid pollfd.
    #[allow(unsafe_code)]
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1
}

/// `destroy_in_background` returns at once; its callback runs once the zygote has reaped
/// the clone, with the same exit `destroy` would have returned, and the process is gone.
#[test]
fn a_background_destroy_reports_the_end_once_the_clone_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    let destroy = |domain: SandboxDomain| {
        let pid = domain.pid();
        assert!(domain.destroys_in_background());
        let (tx, rx) = std::sync::mpsc::channel();
        Box::new(domain).destroy_in_background(Box::new(move |ended| {
            // Called only once the clone can no longer run.
            let gone = !exists(pid);
            tx.send((ended.map_err(|e| e.to_string()), gone)).unwrap();
        }));
        rx.recv_timeout(WAIT).unwrap()
    };
    // Still running (spinning) when destroyed: killed by the agent.
    let mut spinning = sandbox.take_clone(WAIT).unwrap();
    begin(&mut spinning, "loop", b"");
    assert_eq!(destroy(spinning), (Ok(DomainExit::Destroyed), true));
    // Committed and exiting by itself: exited, or killed on its way out.
    let (done, result) = run(&sandbox, "echo", b"x");
    assert_eq!(result.unwrap(), b"x");
    let (ended, gone) = destroy(done);
    assert!(gone);
    assert!(
        matches!(
            ended,
            Ok(DomainExit::Exited { code: 0 } | DomainExit::Destroyed)
        ),
        "{ended:?}"
    );
    // A crash is still told apart from a kill.
    let (crashed, outcome) = run(&sandbox, "segv", b"");
    assert!(matches!(outcome, Err(RingError::PeerGone)), "{outcome:?}");
    assert_eq!(
        destroy(crashed),
        (
            Ok(DomainExit::Crashed {
                signal: libc::SIGSEGV
            }),
            true
        )
    );
    assert_eq!(sandbox.stats().in_use, 0);
    assert_eq!(sandbox.stats().destroyed, 3);
}

#[test]
fn clones_echo_with_distinct_ids_and_pids_that_are_gone_after_destroy() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    // A clone that commits and exits by itself (no forbidden call on its way out).
    let (mut domain, result) = run(&sandbox, "echo", b"bye");
    assert_eq!(result.unwrap(), b"bye");
    let (ring, notifier) = domain.ring();
    assert!(matches!(
        ring.recv_request(&notifier, Some(WAIT)),
        Err(RingError::PeerGone)
    ));
    assert_eq!(
        domain.try_exit().unwrap(),
        Some(DomainExit::Exited { code: 0 })
    );
    assert_eq!(
        Box::new(domain).destroy().unwrap(),
        DomainExit::Exited { code: 0 }
    );

    let mut seen = Vec::new();
    for i in 0..3u8 {
        let (domain, result) = run(&sandbox, "echo", &[i; 100]);
        assert_eq!(result.unwrap(), vec![i; 100]);
        let (id, pid) = (domain.id(), domain.pid());
        assert_eq!(domain.handle(), pid.to_string());
        assert_ne!(pid, sandbox.zygote_pid());
        let exit = Box::new(domain).destroy().unwrap();
        // It may have exited by itself after Committed, or been killed first.
        assert!(
            matches!(exit, DomainExit::Exited { code: 0 } | DomainExit::Destroyed),
            "{exit:?}"
        );
        assert!(!exists(pid), "clone pid {pid} still exists after destroy");
        seen.push((id, pid));
    }
    let mut ids: Vec<_> = seen.iter().map(|s| s.0).collect();
    let mut pids: Vec<_> = seen.iter().map(|s| s.1).collect();
    ids.sort_unstable();
    ids.dedup();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!((ids.len(), pids.len()), (3, 3), "{seen:?}");
    let stats = sandbox.stats();
    assert_eq!(stats.destroyed, 4);
    assert_eq!(stats.failed, 0);
}

#[test]
fn a_clones_writes_are_not_seen_by_the_next_clone() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    let expected = "marker=12648430 pattern_intact=true global=0";
    for _ in 0..2 {
        let (domain, result) = run(&sandbox, "cow", b"");
        assert_eq!(String::from_utf8(result.unwrap()).unwrap(), expected);
        Box::new(domain).destroy().unwrap();
    }
}

#[test]
fn a_crash_is_reported_at_once_through_peer_gone() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    let mut domain = sandbox.take_clone(WAIT).unwrap();
    begin(&mut domain, "crash", b"");
    let began = Instant::now();
    // A generous executor timeout: the crash must be noticed long before it.
    let outcome = commit(&mut domain, Duration::from_secs(60));
    let noticed = began.elapsed();
    assert!(matches!(outcome, Err(RingError::PeerGone)), "{outcome:?}");
    assert!(
        noticed < Duration::from_secs(5),
        "crash noticed after {noticed:?}"
    );
    let crashed = DomainExit::Crashed {
        signal: libc::SIGABRT,
    };
    assert_eq!(domain.try_exit().unwrap(), Some(crashed));
    assert_eq!(Box::new(domain).destroy().unwrap(), crashed);
}

#[test]
fn faults_are_reported_as_crashes_not_as_forbidden_calls() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    for (handler, expected) in [
        (
            "segv",
            DomainExit::Crashed {
                signal: libc::SIGSEGV,
            },
        ),
        // Rust's guard-page handler reports the overflow and aborts.
        (
            "overflow",
            DomainExit::Crashed {
                signal: libc::SIGABRT,
            },
        ),
        ("panic", DomainExit::Exited { code: 101 }),
    ] {
        let (domain, outcome) = run(&sandbox, handler, b"");
        assert!(
            matches!(outcome, Err(RingError::PeerGone)),
            "{handler}: {outcome:?}"
        );
        let exit = Box::new(domain).destroy().unwrap();
        // A zygote built with `panic = "abort"` (the release profile) aborts on a panic.
        let aborted = DomainExit::Crashed {
            signal: libc::SIGABRT,
        };
        let panic_abort = handler == "panic" && exit == aborted;
        assert!(exit == expected || panic_abort, "{handler}: {exit:?}");
    }
}

#[test]
fn forbidden_system_calls_kill_the_clone() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    for handler in ["open", "socket", "spawn"] {
        let (domain, outcome) = run(&sandbox, handler, b"");
        assert!(
            matches!(outcome, Err(RingError::PeerGone)),
            "{handler}: {:?}",
            outcome.map(String::from_utf8)
        );
        let exit = Box::new(domain).destroy().unwrap();
        assert_eq!(exit, DomainExit::ForbiddenSyscall, "{handler}");
    }
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn clones_run_unprivileged_and_confined() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    let mut domain = sandbox.take_clone(WAIT).unwrap();
    begin(&mut domain, "uid", b"");
    // Hold the clone at its Commit (it waits for the answer) while looking at it.
    let (ring, notifier) = domain.ring();
    let request = ring.recv_request(&notifier, Some(WAIT)).unwrap();
    // What the guest sees...
    let Request::Commit { result } = request.body else {
        panic!("expected Commit, got {:?}", request.body);
    };
    // Its own uid, from the configured range, and the configured gid.
    let seen = String::from_utf8(result).unwrap();
    let (uid, gid) = seen.split_once(' ').unwrap();
    let uid: u32 = uid.parse().unwrap();
    assert!(
        (DEFAULT_FIRST_UID..DEFAULT_FIRST_UID + DEFAULT_UID_COUNT).contains(&uid),
        "{seen}"
    );
    assert_eq!(gid, "65534");
    // ...and what the kernel says, from outside.
    let pid = domain.pid();
    assert_eq!(status_field(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(status_field(pid, "Gid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    // Only /dev/null and the ring: fds 0-5.
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    fds.sort_unstable();
    assert_eq!(fds, [0, 1, 2, 3, 4, 5]);
    // New namespaces (the zygote's), an empty root.
    for ns in ["net", "mnt", "ipc", "uts"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let zygote = std::fs::read_link(format!("/proc/{}/ns/{ns}", sandbox.zygote_pid())).unwrap();
        let clone = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, clone, "{ns} namespace shared with the agent");
        assert_eq!(zygote, clone, "{ns}");
    }
    let root = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .count();
    assert_eq!(root, 0, "the clone's root is not empty");
    Box::new(domain).destroy().unwrap();
}

/// The seccomp filter is the zygote's, shared by every clone; what keeps clones apart where
/// it lets a call through (`kill`, `fork`) is that each live clone has its own uid.
#[test]
fn clones_cannot_signal_each_other_or_fork() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    // A bystander: taken, never started, so it waits on its ring.
    let mut bystander = sandbox.take_clone(WAIT).unwrap();
    let victim = bystander.pid();
    let uid_of = |pid| status_field(pid, "Uid");
    let mut a = sandbox.take_clone(WAIT).unwrap();
    // Read while both wait on their rings (a clone that committed may be gone already).
    assert_ne!(uid_of(a.pid()), uid_of(victim));
    begin(&mut a, "kill", format!("{victim} 9").as_bytes());
    assert_eq!(
        commit(&mut a, WAIT).unwrap(),
        b"EPERM",
        "a clone killed another clone"
    );
    assert!(
        bystander.try_exit().unwrap().is_none(),
        "the bystander died"
    );
    Box::new(a).destroy().unwrap();
    // The zygote and the agent are root: out of reach too.
    for target in [sandbox.zygote_pid(), std::process::id()] {
        let (d, sent) = run(&sandbox, "kill", format!("{target} 9").as_bytes());
        assert_eq!(sent.unwrap(), b"EPERM", "pid {target}");
        Box::new(d).destroy().unwrap();
    }
    // SIGCONT (which the kernel would let through within a session, whatever the uids:
    // it would resume a quarantined clone) cannot be sent at all.
    let (d, outcome) = run(&sandbox, "kill", format!("{victim} 18").as_bytes());
    assert!(matches!(outcome, Err(RingError::PeerGone)), "{outcome:?}");
    assert_eq!(Box::new(d).destroy().unwrap(), DomainExit::ForbiddenSyscall);
    // Clearing its parent-death signal (to outlive the zygote) is a forbidden call.
    let (d, outcome) = run(&sandbox, "pdeathsig", b"");
    assert!(matches!(outcome, Err(RingError::PeerGone)), "{outcome:?}");
    assert_eq!(Box::new(d).destroy().unwrap(), DomainExit::ForbiddenSyscall);
    // The zygote's fork is allowed by the filter; RLIMIT_NPROC 0 under its own uid refuses
    // it to a clone.
    let (d, forked) = run(&sandbox, "fork", b"");
    assert_eq!(forked.unwrap(), b"EAGAIN");
    Box::new(d).destroy().unwrap();
    // A handler's abort() (tgkill SIGABRT at itself) still ends it with SIGABRT.
    let (d, outcome) = run(&sandbox, "crash", b"");
    assert!(matches!(outcome, Err(RingError::PeerGone)), "{outcome:?}");
    assert_eq!(
        Box::new(d).destroy().unwrap(),
        DomainExit::Crashed {
            signal: libc::SIGABRT
        }
    );
    assert!(
        bystander.try_exit().unwrap().is_none(),
        "the bystander died"
    );
    begin(&mut bystander, "echo", b"still here");
    assert_eq!(commit(&mut bystander, WAIT).unwrap(), b"still here");
    Box::new(bystander).destroy().unwrap();
}

/// Two sandboxes on one host (here, one process) claim disjoint uid blocks, so a clone of
/// one cannot signal a clone of the other; when the range has no free block left, start
/// fails with a clear error.
#[test]
fn sandboxes_on_one_host_never_share_uids() {
    let (one, two, three) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let locks = tempfile::tempdir().unwrap();
    let narrow = |dir: &Path| {
        let mut c = config(dir);
        c.uid_lock_dir = locks.path().to_path_buf();
        c.first_uid = 1_900_000_256; // aligned: room for exactly two sandboxes' blocks
        c.uid_count = 2 * c.uid_blocks_needed() * mayfly_sandbox::uids::BLOCK;
        c
    };
    let a = Sandbox::start(narrow(one.path()), logger()).unwrap();
    let b = Sandbox::start(narrow(two.path()), logger()).unwrap();
    let ((a_first, a_count), (b_first, b_count)) = (a.uids(), b.uids());
    assert!(
        a_first + a_count <= b_first || b_first + b_count <= a_first,
        "overlapping uid claims: {:?} {:?}",
        a.uids(),
        b.uids()
    );
    let victim = b.take_clone(WAIT).unwrap();
    let victim_uid: u32 = status_field(victim.pid(), "Uid")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((b_first..b_first + b_count).contains(&victim_uid));
    let (d, sent) = run(&a, "kill", format!("{} 9", victim.pid()).as_bytes());
    assert_eq!(
        sent.unwrap(),
        b"EPERM",
        "a clone killed another sandbox's clone"
    );
    Box::new(d).destroy().unwrap();
    assert_eq!(Box::new(victim).destroy().unwrap(), DomainExit::Destroyed);
    // The range is fully claimed: a third sandbox is refused, naming the problem.
    let refused = Sandbox::start(narrow(three.path()), logger()).unwrap_err();
    let chain = format!(
        "{refused}: {}",
        std::error::Error::source(&refused).unwrap()
    );
    assert!(chain.contains("free block"), "{chain}");
    // Shut down, the first one's blocks are free again.
    a.shutdown();
    drop(a);
    let again = Sandbox::start(narrow(three.path()), logger()).unwrap();
    assert_eq!(again.uids(), (a_first, a_count));
}

#[test]
fn memory_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    let (domain, result) = run(&sandbox, "alloc", b"");
    assert_eq!(result.unwrap(), b"refused");
    Box::new(domain).destroy().unwrap();
}

#[test]
fn a_runaway_clone_is_destroyed_after_the_executor_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    let (domain, outcome) = {
        let mut domain = sandbox.take_clone(WAIT).unwrap();
        begin(&mut domain, "loop", b"");
        let outcome = commit(&mut domain, Duration::from_millis(200));
        (domain, outcome)
    };
    assert!(
        matches!(outcome, Err(RingError::Timeout { .. })),
        "{outcome:?}"
    );
    let pid = domain.pid();
    let began = Instant::now();
    assert_eq!(Box::new(domain).destroy().unwrap(), DomainExit::Destroyed);
    assert!(began.elapsed() < Duration::from_secs(5));
    assert!(!exists(pid));
}

#[test]
fn the_cpu_limit_ends_a_runaway_clone() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.pool_size = 1;
    config.limits.cpu_seconds = 1;
    let sandbox = Sandbox::start(config, logger()).unwrap();
    let mut domain = sandbox.take_clone(WAIT).unwrap();
    begin(&mut domain, "loop", b"");
    let outcome = commit(&mut domain, Duration::from_secs(30));
    assert!(matches!(outcome, Err(RingError::PeerGone)), "{outcome:?}");
    assert_eq!(
        Box::new(domain).destroy().unwrap(),
        DomainExit::ResourceLimit { limit: "cpu time" }
    );
}

/// Clones that die before `Ready` are never handed out: `take` reads each pooled clone's
/// `Ready` first, discards the dead, counts them as failed, and times out; the refill
/// backs off instead of forking as fast as it can.
#[test]
fn clones_that_die_before_ready_are_never_handed_out_and_refill_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SandboxConfig::new(ZYGOTE, ["--die-before-ready"], dir.path());
    config.pool_size = 2;
    let sandbox = Sandbox::start(config, logger()).unwrap();
    let wait = Duration::from_millis(600);
    let began = Instant::now();
    let taken = sandbox.take(wait);
    assert!(
        matches!(taken, Err(DomainError::Exhausted { .. })),
        "{:?}",
        taken.map(|d| d.id())
    );
    assert!(began.elapsed() >= wait);
    let stats = sandbox.stats();
    assert_eq!(stats.in_use, 0);
    assert!(stats.failed >= 1, "{stats:?}");
    // Back-off: 50 ms, doubling with each failure in a row, so a few clones in 600 ms, not
    // hundreds.
    assert!(stats.created <= 10, "{stats:?}");
    sandbox.shutdown();
}

/// A caller whose time runs out before a fresh clone's `Ready` arrives gets its timeout;
/// the clone goes back to the pool, not counted as a failure or destroyed.
#[test]
fn an_impatient_take_does_not_destroy_healthy_clones() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.pool_size = 1;
    let sandbox = Sandbox::start(config, logger()).unwrap();
    let mut handed_out = 0;
    for _ in 0..300 {
        match sandbox.take_clone(Duration::from_micros(1)) {
            Ok(domain) => {
                handed_out += 1;
                Box::new(domain).destroy().unwrap();
            }
            Err(DomainError::Exhausted { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let stats = sandbox.stats();
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(stats.destroyed, handed_out, "{stats:?}");
    sandbox.shutdown();
}

/// A request the zygote never answers is given up on (counted as failed) within twice
/// `ready_timeout`, also when a taker sent it into a pool that had been idle (full, no
/// request out) and no refill thread was woken for it; once the zygote answers again, the
/// late clone is killed and the pool fills again. (Also: a zygote stopped in a `poll` and
/// continued survives its filter: `restart_syscall`.)
#[test]
fn a_request_the_zygote_never_answers_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.pool_size = 1;
    let ready_timeout = Duration::from_millis(200);
    config.ready_timeout = ready_timeout;
    let sandbox = Sandbox::start(config, logger()).unwrap();
    assert!(sandbox.wait_ready(1, WAIT));
    // The scenario, not a synchronisation: a pool idle for longer than `ready_timeout`
    // (its refill thread has nothing to expire and nothing to fork).
    std::thread::sleep(ready_timeout * 5 / 2);
    let zygote = i32::try_from(sandbox.zygote_pid()).unwrap();
    let signal = |sig| {
        // SAFETY: plain kill(2) of our own zygote.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(zygote, sig) };
        assert_eq!(rc, 0);
    };
    signal(libc::SIGSTOP);
    // Taking the pooled clone sends the zygote a request for its replacement.
    let held = sandbox.take_clone(WAIT).unwrap();
    let began = Instant::now();
    let deadline = began + Duration::from_secs(5);
    while sandbox.stats().failed == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let waited = began.elapsed();
    signal(libc::SIGCONT);
    assert_eq!(sandbox.stats().failed, 1, "expired after {waited:?}");
    assert!(
        waited < ready_timeout * 2 + Duration::from_millis(300),
        "expired after {waited:?}"
    );
    // The late answer's clone is killed; after the back-off the pool fills again.
    assert!(sandbox.wait_ready(1, WAIT));
    drop(held);
    assert!(sandbox.wait_ready(1, WAIT));
    sandbox.shutdown();
}

#[test]
fn the_pool_refills_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    assert!(sandbox.wait_ready(2, WAIT));
    let a = sandbox.take(WAIT).unwrap();
    let b = sandbox.take(WAIT).unwrap();
    assert_eq!(sandbox.stats().in_use, 2);
    // Refilled while both are still in use.
    assert!(sandbox.wait_ready(2, WAIT));
    let stats = sandbox.stats();
    assert_eq!((stats.ready, stats.in_use), (2, 2));
    assert!(stats.created >= 4);
    drop(a); // Drop destroys.
    b.destroy().unwrap();
    let stats = sandbox.stats();
    assert_eq!((stats.in_use, stats.destroyed), (0, 2));
}

#[test]
fn take_waits_at_most_its_timeout_when_at_the_in_use_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_in_use = 1;
    let sandbox = Sandbox::start(config, logger()).unwrap();
    let first = sandbox.take(WAIT).unwrap();
    let began = Instant::now();
    let second = sandbox.take_clone(Duration::from_millis(100));
    assert!(
        matches!(second, Err(DomainError::Exhausted { .. })),
        "{second:?}"
    );
    assert!(began.elapsed() >= Duration::from_millis(100));
    first.destroy().unwrap();
    sandbox.take(WAIT).unwrap().destroy().unwrap();
}

#[test]
fn the_backend_reports_the_handlers_its_template_announced() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    // The test zygote's handlers, as it announced them in its Ready: sorted, once each.
    let handlers = sandbox.handlers();
    assert!(handlers.windows(2).all(|w| w[0] < w[1]), "{handlers:?}");
    for name in ["crash", "echo", "loop", "peek", "uid"] {
        assert!(handlers.iter().any(|h| h == name), "{name} in {handlers:?}");
    }
    assert_eq!(handlers.len(), 18, "{handlers:?}");
    sandbox.shutdown();
}

#[test]
fn the_quarantine_is_bounded_and_a_clone_past_it_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    for _ in 0..MAX_QUARANTINED {
        let clone = sandbox.take_clone(WAIT).unwrap();
        Box::new(clone).quarantine().unwrap();
    }
    assert_eq!(sandbox.quarantined().len(), MAX_QUARANTINED);
    let extra = sandbox.take_clone(WAIT).unwrap();
    let extra_fd = pidfd(extra.pid());
    let err = Box::new(extra).quarantine().unwrap_err();
    assert!(err.to_string().contains("killed instead"), "{err}");
    assert!(exited(&extra_fd, WAIT), "the refused clone still runs");
    assert_eq!(sandbox.quarantined().len(), MAX_QUARANTINED);
    // Releasing one makes room again.
    let first = sandbox.quarantined()[0].id;
    assert!(sandbox.release_quarantined(first).unwrap().is_some());
    let clone = sandbox.take_clone(WAIT).unwrap();
    Box::new(clone).quarantine().unwrap();
    assert_eq!(sandbox.quarantined().len(), MAX_QUARANTINED);
    sandbox.shutdown();
}

#[test]
fn quarantine_stops_the_clone_and_shutdown_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    assert!(sandbox.wait_ready(2, WAIT));
    let zygote = sandbox.zygote_pid();
    let zygote_fd = pidfd(zygote);

    let suspect = sandbox.take_clone(WAIT).unwrap();
    let suspect_pid = suspect.pid();
    let q = Box::new(suspect).quarantine().unwrap();
    assert_eq!(q.handle, suspect_pid.to_string());
    let state = std::fs::read_to_string(format!("/proc/{suspect_pid}/stat")).unwrap();
    let state = state.rsplit_once(") ").unwrap().1.chars().next().unwrap();
    assert_eq!(state, 'T', "quarantined clone is not stopped");
    assert_eq!(sandbox.quarantined(), vec![q]);

    // One clone still held by the "executor" while the sandbox shuts down.
    let mut held = sandbox.take_clone(WAIT).unwrap();
    let held_pid = held.pid();
    let mut members = group_members(zygote);
    members.sort_unstable();
    assert!(
        members.contains(&zygote) && members.contains(&held_pid) && members.contains(&suspect_pid)
    );

    sandbox.shutdown();
    assert!(exited(&zygote_fd, WAIT));
    assert!(!exists(zygote), "zygote not reaped");
    for pid in members {
        assert!(!exists(pid), "pid {pid} survived shutdown");
    }
    assert!(!dir.path().join(reconcile::PGID_FILE).exists());
    // The held domain learns its clone is gone, and destroy still works.
    let (ring, notifier) = held.ring();
    assert!(matches!(
        ring.recv_request(&notifier, Some(WAIT)),
        Err(RingError::PeerGone)
    ));
    assert_eq!(Box::new(held).destroy().unwrap(), DomainExit::Destroyed);
    assert!(matches!(
        sandbox.take(WAIT),
        Err(DomainError::ShutDown { .. })
    ));
}

#[test]
fn a_restart_removes_the_leftovers_of_a_run_that_did_not_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let old = start(dir.path());
    assert!(old.wait_ready(2, WAIT));
    let held = old.take_clone(WAIT).unwrap();
    assert!(old.wait_ready(2, WAIT)); // no clone being forked while we list them
    let old_zygote = old.zygote_pid();
    let leftovers = group_members(old_zygote);
    assert!(leftovers.len() >= 3, "{leftovers:?}"); // zygote, held clone, pool
    let fds: Vec<(u32, OwnedFd)> = leftovers.iter().map(|&p| (p, pidfd(p))).collect();
    // "Crash" without shutdown: nothing of the old sandbox runs its cleanup.
    std::mem::forget(held);
    std::mem::forget(old);
    assert!(dir.path().join(reconcile::PGID_FILE).exists());

    let new = start(dir.path());
    for (pid, fd) in &fds {
        assert!(exited(fd, WAIT), "leftover pid {pid} still runs");
    }
    for pid in group_members(old_zygote) {
        assert!(gone_within(pid, WAIT), "leftover pid {pid} still runs");
    }
    assert_ne!(new.zygote_pid(), old_zygote);
    let (domain, result) = run(&new, "echo", b"after restart");
    assert_eq!(result.unwrap(), b"after restart");
    Box::new(domain).destroy().unwrap();
}

#[test]
fn the_reconciler_never_kills_a_process_group_that_is_not_ours() {
    let dir = tempfile::tempdir().unwrap();
    let mut stranger = std::process::Command::new("/bin/sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = i32::try_from(stranger.id()).unwrap();
    std::fs::write(dir.path().join(reconcile::PGID_FILE), format!("{pgid}\n")).unwrap();
    let report = reconcile::reconcile(&config(dir.path()), &logger()).unwrap();
    assert_eq!(report.pgid, Some(pgid));
    assert!(report.removed.is_empty());
    assert_eq!(report.spared, vec![pgid]);
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "the stranger was killed"
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

#[test]
fn a_missing_zygote_executable_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig::new("/nonexistent/zygote", ["sandbox-zygote"], dir.path());
    let err = Sandbox::start(config, logger()).unwrap_err();
    assert!(err.to_string().contains("not an executable file"), "{err}");
}

/// Latency of one clone's life as the executor sees it: take (from a warm pool), Start,
/// echo, Commit, destroy. Printed, with a loose bound.
#[test]
fn clone_latency() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.pool_size = 4;
    let sandbox = Sandbox::start(config, logger()).unwrap();
    const N: u32 = 30;
    let mut total = Duration::ZERO;
    let mut worst = Duration::ZERO;
    for _ in 0..N {
        assert!(sandbox.wait_ready(1, WAIT));
        let began = Instant::now();
        let (domain, result) = run(&sandbox, "echo", b"x");
        result.unwrap();
        Box::new(domain).destroy().unwrap();
        let took = began.elapsed();
        total += took;
        worst = worst.max(took);
    }
    // Cold: create a clone and wait for its Ready, with nothing in the pool.
    let mut cold = Duration::ZERO;
    for _ in 0..5 {
        assert!(sandbox.wait_ready(4, WAIT));
        let held: Vec<_> = (0..4).map(|_| sandbox.take(WAIT).unwrap()).collect();
        let began = Instant::now();
        let one = sandbox.take(WAIT).unwrap();
        cold += began.elapsed();
        one.destroy().unwrap();
        for d in held {
            d.destroy().unwrap();
        }
    }
    eprintln!(
        "sandbox latency: take+start+echo+commit+destroy mean {:?} (worst {:?}) over {N}; \
         clone+ready with an empty pool mean {:?}",
        total / N,
        worst,
        cold / 5
    );
    assert!(worst < Duration::from_secs(2));
}

#[test]
fn a_dead_zygote_takes_its_clones_with_it_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    assert!(sandbox.wait_ready(2, WAIT));
    let mut held = sandbox.take_clone(WAIT).unwrap();
    let zygote = sandbox.zygote_pid();
    let members: Vec<(u32, OwnedFd)> = group_members(zygote)
        .into_iter()
        .map(|p| (p, pidfd(p)))
        .collect();
    // SAFETY: plain kill(2) of our own zygote.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(i32::try_from(zygote).unwrap(), libc::SIGKILL) };
    assert_eq!(rc, 0);
    // The clone in use dies with it (PR_SET_PDEATHSIG) and the executor hears of it at once.
    let (ring, notifier) = held.ring();
    assert!(matches!(
        ring.recv_request(&notifier, Some(WAIT)),
        Err(RingError::PeerGone)
    ));
    let exit = Box::new(held).destroy().unwrap();
    assert!(
        matches!(exit, DomainExit::Crashed { .. } | DomainExit::Destroyed),
        "{exit:?}"
    );
    for (pid, fd) in &members {
        assert!(exited(fd, WAIT), "pid {pid} outlived its zygote");
    }
    // No more clones: take fails instead of waiting forever.
    let taken = sandbox.take_clone(WAIT);
    assert!(
        matches!(taken, Err(DomainError::Create { .. })),
        "{taken:?}"
    );
    sandbox.shutdown();
}

/// Not a test by itself: the "agent" process of
/// [`killing_the_agent_kills_the_zygote_and_a_restart_cleans_up`], run in a child process.
#[test]
#[ignore = "run as a separate agent process by another test"]
fn agent_helper() {
    use std::io::{BufRead, Write};
    let Some(dir) = std::env::var_os("MAYFLY_SANDBOX_HELPER_DIR") else {
        return;
    };
    let sandbox = start(Path::new(&dir));
    assert!(sandbox.wait_ready(2, WAIT));
    let held = sandbox.take_clone(WAIT).unwrap();
    // Pool full again: no clone is being forked while we list them.
    assert!(sandbox.wait_ready(2, WAIT));
    let members = group_members(sandbox.zygote_pid());
    assert!(members.contains(&held.pid()));
    let line: Vec<String> = members.iter().map(u32::to_string).collect();
    let mut out = std::io::stdout();
    writeln!(out, "READY {} {}", sandbox.zygote_pid(), line.join(" ")).unwrap();
    out.flush().unwrap();
    // Wait to be killed.
    let _ = std::io::stdin().lock().read_line(&mut String::new());
}

#[test]
fn killing_the_agent_kills_the_zygote_and_a_restart_cleans_up() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "agent_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MAYFLY_SANDBOX_HELPER_DIR", dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A watchdog bounds the wait for the helper's report: it kills the helper (ending the
    // read below with EOF) if no report came in time.
    let helper = agent.id();
    let (reported, watchdog) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watchdog.recv_timeout(Duration::from_secs(60)).is_err() {
            // SAFETY: plain kill(2) of our own (unreaped) child.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(i32::try_from(helper).unwrap(), libc::SIGKILL);
            }
        }
    });
    let mut lines = std::io::BufReader::new(agent.stdout.take().unwrap()).lines();
    // The harness may print "test agent_helper ... " on the same line first.
    let ready = lines
        .find_map(|l| {
            l.ok()
                .and_then(|l| l.find("READY ").map(|i| l[i..].to_owned()))
        })
        .expect("the helper agent did not report ready");
    reported.send(()).unwrap();
    watchdog.join().unwrap();
    let pids: Vec<u32> = ready
        .split_whitespace()
        .skip(1)
        .map(|p| p.parse().unwrap())
        .collect();
    let zygote = pids[0];
    assert!(pids.len() >= 4, "{pids:?}"); // zygote (twice: pid and member), clones
    let fds: Vec<(u32, OwnedFd)> = pids.iter().map(|&p| (p, pidfd(p))).collect();

    agent.kill().unwrap(); // SIGKILL: no cleanup runs in the agent
    agent.wait().unwrap();
    for (pid, fd) in &fds {
        assert!(exited(fd, WAIT), "pid {pid} outlived the agent");
    }
    for pid in group_members(zygote) {
        assert!(gone_within(pid, WAIT), "pid {pid} outlived the agent");
    }
    // The restart finds the stale record, nothing left to kill, and starts cleanly.
    assert!(dir.path().join(reconcile::PGID_FILE).exists());
    let report = reconcile::reconcile(&config(dir.path()), &logger()).unwrap();
    assert_eq!(report.pgid, Some(i32::try_from(zygote).unwrap()));
    assert!(
        report.removed.is_empty() && report.spared.is_empty(),
        "{report:?}"
    );
    let sandbox = start(dir.path());
    let (domain, result) = run(&sandbox, "echo", b"again");
    assert_eq!(result.unwrap(), b"again");
    Box::new(domain).destroy().unwrap();
}

/// Destroys `domain` in the background and waits (bounded) for its callback: once this
/// returns, the clone is reaped and its ring kept for reuse.
fn destroy_and_wait(domain: SandboxDomain) {
    let (tx, rx) = std::sync::mpsc::channel();
    Box::new(domain).destroy_in_background(Box::new(move |ended| {
        tx.send(ended.is_ok()).unwrap();
    }));
    assert!(rx.recv_timeout(WAIT).unwrap());
}

/// The whole shared area of a clone's ring, as the agent sees it.
fn ring_bytes(domain: &mut SandboxDomain) -> Vec<u8> {
    let (ring, _) = domain.ring();
    let mem = ring.memory();
    let mut bytes = vec![0u8; mem.len()];
    mem.read_bytes(0, &mut bytes).unwrap();
    bytes
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A reaped clone's ring is reused for a later clone only wiped: no later clone can read a
/// byte of an earlier transaction (its payload, its result) or of what an earlier guest
/// scribbled over the whole area, and reuse does happen. (Reading a whole ring here touches
/// every page, so a ring inspected this way is dropped rather than reused later: the
/// rings checked are ones the echo transactions used.)
#[test]
fn a_reused_ring_holds_nothing_of_the_transactions_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.pool_size = 1;
    let sandbox = Sandbox::start(config, logger()).unwrap();
    let secret: &[u8] = b"SECRET-payload-and-result-of-an-earlier-transaction";
    let scribble: &[u8] = b"SCRIBBLE-a-guest-wrote-on-every-page";
    // Rounds until 6 rings were reused (whether a given request finds a kept ring depends on
    // whether the refill thread asked before or after the last reap; bounded).
    for _ in 0..30 {
        if sandbox.rings_reused() >= 6 {
            break;
        }
        let (domain, result) = run(&sandbox, "echo", secret);
        assert_eq!(result.unwrap(), secret);
        destroy_and_wait(domain);
        for _ in 0..2 {
            let mut next = sandbox.take_clone(WAIT).unwrap();
            let bytes = ring_bytes(&mut next);
            assert!(
                !holds(&bytes, secret),
                "an earlier transaction's bytes in a new ring"
            );
            assert!(
                !holds(&bytes, scribble),
                "an earlier guest's bytes in a new ring"
            );
            destroy_and_wait(next);
        }
        // A guest that writes over the whole area: too much to wipe, its ring is dropped.
        let (domain, result) = run(&sandbox, "fill", scribble);
        assert_eq!(result.unwrap(), b"filled");
        destroy_and_wait(domain);
    }
    assert!(
        sandbox.rings_reused() >= 6,
        "rings reused: {}",
        sandbox.rings_reused()
    );
}

/// A reused ring's eventfds are drained: counts an earlier guest left in them (after the
/// agent's last read) never reach the next clone, and reuse does happen.
#[test]
fn a_reused_rings_eventfds_hold_nothing_of_the_guest_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.pool_size = 1;
    let sandbox = Sandbox::start(config, logger()).unwrap();
    // Rounds until 6 rings were reused (see above; bounded).
    for _ in 0..30 {
        if sandbox.rings_reused() >= 6 {
            break;
        }
        let (domain, result) = run(&sandbox, "bells", b"");
        assert_eq!(result.unwrap(), b"rung after the commit");
        // Reaped once the callback ran: it wrote its counts before it exited.
        destroy_and_wait(domain);
        for _ in 0..2 {
            let (domain, result) = run(&sandbox, "peek", b"");
            assert_eq!(result.unwrap(), b"0 0", "an earlier guest's eventfd counts");
            destroy_and_wait(domain);
        }
    }
    assert!(
        sandbox.rings_reused() >= 6,
        "rings reused: {}",
        sandbox.rings_reused()
    );
}

/// Minor page faults of a process so far (`/proc/PID/stat` field 10).
fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces: count fields after its closing ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(7).unwrap().parse().unwrap()
}

#[test]
fn the_zygote_does_not_write_to_memory_its_clones_share() {
    // Every page the zygote shares with its live clones is copy-on-write: a write to one is a
    // fault and a copy, per clone. Its per-clone bookkeeping (uid and pid tables, the
    // receive buffer, the messages it sends) lives in memory no clone inherits, and it does
    // not allocate, so only the pages of its loop's own stack frames and of its thread-local
    // block (errno, the kernel's rseq updates) are left to fault: 5 per clone with this
    // unoptimised, dynamically linked test template (10 before the change), 2–3 with the
    // release build of the static `mayfly-zygote` (8–9 before).
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start(dir.path());
    assert!(sandbox.wait_ready(2, WAIT));
    let zygote = sandbox.zygote_pid();
    // Warm up: the first clones touch pages of the tables for the first time.
    for _ in 0..20 {
        let (domain, result) = run(&sandbox, "echo", b"warm");
        result.unwrap();
        Box::new(domain).destroy().unwrap();
    }
    let (before, created_before) = (minor_faults(zygote), sandbox.stats().created);
    for _ in 0..200 {
        let (domain, result) = run(&sandbox, "echo", b"x");
        result.unwrap();
        Box::new(domain).destroy().unwrap();
    }
    let forks = sandbox.stats().created - created_before;
    let per_fork = (minor_faults(zygote) - before) as f64 / forks as f64;
    assert!(forks >= 200, "{forks}");
    assert!(
        per_fork <= 7.0,
        "the zygote took {per_fork:.1} page faults per clone (copy-on-write writes)"
    );
    sandbox.shutdown();
}

/// The zygote and every clone run in the sandbox's own control group, with the configured
/// limits written in whichever hierarchy the host has (v2, or v1 on a hybrid host), and the
/// group is gone after shutdown. A clone costs no cgroup work: it inherits the group at fork.
#[test]
fn clones_run_in_the_sandboxs_cgroup_with_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    let limits = mayfly_sandbox::cgroup::CgroupLimits {
        cpu_weight: 30,
        cpu_max_percent: Some(120),
        memory_max: 512 << 20,
        pids_max: Some(100),
        demoted_cpu_max_percent: Some(30),
    };
    config.cgroups = Some(limits);
    let sandbox = Sandbox::start(config, logger()).unwrap();
    let status = sandbox.cgroup_status().expect("cgroup limits are on");
    let read = |file: &str| {
        status
            .paths
            .iter()
            .map(|d| d.join(file))
            .find(|p| p.exists())
            .map(|p| std::fs::read_to_string(p).unwrap().trim().to_owned())
            .unwrap_or_else(|| panic!("no {file} in {:?}", status.paths))
    };
    match status.version {
        mayfly_sandbox::cgroup::Version::V2 => {
            assert_eq!(read("cpu.weight"), "30");
            assert_eq!(read("cpu.max"), "12000 10000");
            assert_eq!(read("memory.max"), (512u64 << 20).to_string());
        }
        mayfly_sandbox::cgroup::Version::V1 => {
            assert_eq!(read("cpu.shares"), "1228");
            assert_eq!(read("cpu.cfs_period_us"), "10000");
            assert_eq!(read("cpu.cfs_quota_us"), "12000");
            assert_eq!(read("memory.limit_in_bytes"), (512u64 << 20).to_string());
        }
    }
    assert_eq!(read("pids.max"), "100");
    let name = status.paths[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let in_group = |pid: u32| {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        // v2: one line; v1: the cpu, memory and pids lines all name the group.
        let lines: Vec<&str> = cgroups
            .lines()
            .filter(|l| {
                let list = l.split(':').nth(1).unwrap_or("");
                match status.version {
                    mayfly_sandbox::cgroup::Version::V2 => list.is_empty(),
                    mayfly_sandbox::cgroup::Version::V1 => list
                        .split(',')
                        .any(|c| c == "cpu" || c == "memory" || c == "pids"),
                }
            })
            .collect();
        // v2: the zygote and its clones are in the group's `clones` leaf.
        !lines.is_empty()
            && lines.iter().all(|l| {
                l.ends_with(&format!("/{name}")) || l.ends_with(&format!("/{name}/clones"))
            })
    };
    // Where a demoted clone is: v2, the group's `demoted` child; v1, that child in the
    // cpu hierarchy (memory and pids stay the group's).
    let demoted_group = status_demoted(&sandbox);
    let in_demoted = |pid: u32| {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        cgroups.lines().any(|l| {
            let list = l.split(':').nth(1).unwrap_or("");
            let cpu = match status.version {
                mayfly_sandbox::cgroup::Version::V2 => list.is_empty(),
                mayfly_sandbox::cgroup::Version::V1 => list.split(',').any(|c| c == "cpu"),
            };
            cpu && l.ends_with(&format!("/{name}/demoted"))
        })
    };
    assert!(in_group(sandbox.zygote_pid()), "zygote not in {name}");
    let mut domain = sandbox.take_clone(WAIT).unwrap();
    assert!(in_group(domain.pid()), "clone not in {name}");
    // The zygote, which forks for every transaction, runs at nice -10 so that spinning
    // clones in the same group do not starve it; a clone runs at nice 0.
    let nice = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = stat.rsplit(')').next().unwrap();
        // Field 19 of the line; 17th after the command.
        rest.split_whitespace()
            .nth(16)
            .unwrap()
            .parse::<i32>()
            .unwrap()
    };
    assert_eq!(nice(sandbox.zygote_pid()), -10);
    assert_eq!(nice(domain.pid()), 0);
    // Demoted (a transaction that runs long): nice 19, and moved into the demoted
    // clones' group, whose quota all of them share.
    assert!(!in_demoted(domain.pid()));
    domain.demote().unwrap();
    assert_eq!(nice(domain.pid()), 19);
    assert!(
        in_demoted(domain.pid()),
        "demoted clone not in {name}/demoted"
    );
    let quota = std::fs::read_to_string(demoted_group.join(match status.version {
        mayfly_sandbox::cgroup::Version::V2 => "cpu.max",
        mayfly_sandbox::cgroup::Version::V1 => "cpu.cfs_quota_us",
    }))
    .unwrap();
    assert!(quota.starts_with("3000"), "{quota}");
    // The zygote and the clones not demoted stay where they were.
    assert!(in_group(sandbox.zygote_pid()));
    assert!(!in_demoted(sandbox.zygote_pid()));
    assert!(
        !in_group(std::process::id()),
        "the agent itself is in {name}"
    );
    begin(&mut domain, "echo", b"in a group");
    assert_eq!(commit(&mut domain, WAIT).unwrap(), b"in a group");
    Box::new(domain).destroy().unwrap();
    let usage = sandbox.cgroup_status().unwrap();
    assert!(usage.pids.unwrap() >= 1, "{usage:?}");
    assert!(usage.memory_bytes.unwrap() > 0, "{usage:?}");
    let paths = status.paths.clone();
    sandbox.shutdown();
    for p in paths {
        assert!(!p.exists(), "{} left after shutdown", p.display());
    }
    assert!(!demoted_group.exists(), "{} left", demoted_group.display());
}

/// The demoted clones' group of a running sandbox.
fn status_demoted(sandbox: &Sandbox) -> std::path::PathBuf {
    sandbox.demoted_cgroup().expect("a demoted clones' group")
}

/// Limits that cannot be applied stop the start with a clear error (here: a weight out of
/// range); switching cgroups off starts without them.
#[test]
fn limits_that_cannot_be_applied_refuse_the_start_unless_cgroups_are_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    let mut limits = config.cgroups.unwrap();
    limits.cpu_weight = 0;
    config.cgroups = Some(limits);
    let err = Sandbox::start(config.clone(), logger()).unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        text.contains("--no-cgroups") && text.contains("cpu_weight"),
        "{text}"
    );
    config.cgroups = None;
    let sandbox = Sandbox::start(config, logger()).unwrap();
    assert!(sandbox.cgroup_status().is_none());
    let mut domain = sandbox.take_clone(WAIT).unwrap();
    begin(&mut domain, "echo", b"no group");
    assert_eq!(commit(&mut domain, WAIT).unwrap(), b"no group");
}

/// A clone whose ring `Ready` announces other handlers than the template announced on the
/// control socket is never handed out: destroyed, counted as failed, and reported as a
/// violation (the agent audits it as `domain.protocol_violation`).
#[test]
fn clones_announcing_other_handlers_than_the_template_are_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SandboxConfig::new(ZYGOTE, ["--ready-extra-handler"], dir.path());
    config.pool_size = 1;
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&reports);
    let sandbox = Sandbox::start_reporting(
        config,
        logger(),
        std::sync::Arc::new(move |v: mayfly_domain::Violation| sink.lock().unwrap().push(v)),
    )
    .unwrap();
    // The template's own list is what the backend reports, not the clone's.
    assert!(!sandbox.handlers().iter().any(|h| h.starts_with("zzz")));
    let taken = sandbox.take(Duration::from_millis(1500));
    assert!(
        matches!(taken, Err(DomainError::Exhausted { .. })),
        "{:?}",
        taken.map(|d| d.id())
    );
    let stats = sandbox.stats();
    assert_eq!(stats.in_use, 0);
    assert!(stats.failed >= 1, "{stats:?}");
    let reports = reports.lock().unwrap().clone();
    assert!(!reports.is_empty());
    for v in &reports {
        assert_eq!(v.backend, "sandbox");
        assert!(v.what.contains("zzz.not_in_the_template"), "{}", v.what);
    }
    sandbox.shutdown();
}
