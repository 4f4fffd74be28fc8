//! The agent side: [`Sandbox`] (a [`DomainBackend`]) and [`SandboxDomain`] (a [`Domain`]).
//!
//! Threads, one per role, blocking I/O:
//!
//! ```text
//!  supervisor ── spawns the zygote (PR_SET_PDEATHSIG follows this thread), then reads the
//!                control socket: Spawned → registers the clone, builds its handle from the
//!                pending request and pools it; Exited/Killed/Stopped → records it in the
//!                clone's cell (running a background destroy's callback; a pooled clone
//!                that died is removed and counted as failed); on EOF kills and marks every
//!                clone lost and reaps the zygote.
//!  refill     ── keeps `pool_size` clones pooled or requested: memfd ring + eventfds →
//!                Clone request, and on to the next (it never waits for a clone); backs off
//!                after failures; expires requests the zygote does not answer.
//!  callers    ── take() reads a pooled clone's `Ready` and hands it out, and requests its
//!                replacement itself (no refill thread woken) when that is all the pool
//!                needs; destroy()/Drop kill it through its pidfd and wait;
//!                destroy_in_background() kills it and returns.
//! ```
//!
//! By module, one job each: this one starts and stops the [`Sandbox`] and hands clones out;
//! `pool` is the state the threads share (pool, pending requests, failure accounting);
//! `supervisor` and `refill` are those threads; `domain` is [`SandboxDomain`], one clone in
//! use; `error` the error types.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mayfly_domain::{
    Backoff, Domain, DomainBackend, DomainError, DomainExit, DomainId, PoolStats, Quarantine,
    Quarantined, MAX_QUARANTINED,
};
use mayfly_sync::{lock, wait_timeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use slog::{debug, error, info, warn, Logger};

use crate::clone::{CloneHandle, Ctx};
use crate::config::SandboxConfig;
use crate::reconcile;
use crate::sys;
use mayfly_sandbox_proto::{self as proto, Msg, Settings, MAX_ROOT_PATH};

/// The backend's name.
pub const BACKEND: &str = "sandbox";
/// Name of the zygote's (empty) root directory in `run_dir`.
pub const ROOT_DIR: &str = "sandbox-root";
/// The zygote's nice value (its clones reset theirs to 0).
const ZYGOTE_NICE: i32 = -10;
/// A demoted clone's nice value ([`Domain::demote`]).
const DEMOTED_NICE: i32 = 19;
/// How long shutdown waits for the zygote to exit before killing it.
const ZYGOTE_EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long quarantine waits for the zygote to see the clone stopped.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// Back-off of the refill after failed clones (shared by the refill threads and the
/// takers' top-ups): a fork is cheap to retry, so retries start at 50 ms and slow to one
/// every 5 s while clones keep failing (a zygote refusing forks, clones dying before `Ready`).
pub const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

mod domain;
mod error;
mod pool;
mod refill;
mod supervisor;

pub use domain::SandboxDomain;
use domain::{confirm_ready, Readiness};
pub use error::{CreateError, SandboxError};
use pool::{PoolState, Shared};
use refill::refill;
use supervisor::supervise;

struct Threads {
    supervisor: JoinHandle<()>,
    refill: Refills,
}

/// The sandbox domain backend: a zygote and its pool of ready clones.
///
/// Process isolation, **not** hardware virtualization: see the crate docs for what is
/// isolated by what.
pub struct Sandbox {
    shared: Arc<Shared>,
    threads: Mutex<Option<Threads>>,
    zygote_pid: u32,
    zygote_pidfd: OwnedFd,
    /// The handlers the template announced in its `Ready`.
    handlers: Vec<String>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("zygote_pid", &self.zygote_pid)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Started {
    pid: u32,
    pidfd: OwnedFd,
    handlers: Vec<String>,
}

/// Creates the run directory and, in it, the zygote's root directory (mode 0555, its path
/// short enough for the control protocol); returns the root's path.
fn prepare_run_dir(config: &SandboxConfig) -> Result<PathBuf, SandboxError> {
    let root = config.run_dir.join(ROOT_DIR);
    if root.as_os_str().len() > MAX_ROOT_PATH {
        return Err(SandboxError::RunDir {
            path: root,
            source: std::io::Error::from_raw_os_error(libc::ENAMETOOLONG),
        });
    }
    for dir in [&config.run_dir, &root] {
        fs::create_dir_all(dir).map_err(|source| SandboxError::RunDir {
            path: dir.clone(),
            source,
        })?;
    }
    fs::set_permissions(&root, fs::Permissions::from_mode(0o555)).map_err(|source| {
        SandboxError::RunDir {
            path: root.clone(),
            source,
        }
    })?;
    Ok(root)
}

/// The clones' control group, with the configured limits (stale groups of earlier runs
/// removed first), or `None` with a warning when cgroup limits are off.
fn clones_group(
    config: &SandboxConfig,
    logger: &Logger,
) -> Result<Option<crate::cgroup::ClonesGroup>, SandboxError> {
    let Some(limits) = config.cgroups else {
        warn!(
            logger,
            "sandbox clones run WITHOUT cgroup limits: spinning or \
            allocating guests can starve the agent and honest clones (cgroups off)"
        );
        return Ok(None);
    };
    let layout = crate::cgroup::detect()?;
    let stale = crate::cgroup::remove_stale(&layout);
    let group = crate::cgroup::ClonesGroup::create(&layout, limits, config.uids_needed())?;
    let status = group.status();
    info!(logger, "sandbox clones run under cgroup limits";
        "cgroup_version" => status.version.as_str(),
        "paths" => ?status.paths,
        "cpu_weight" => limits.cpu_weight,
        "cpu_max_percent" => ?limits.cpu_max_percent,
        "memory_max" => limits.memory_max,
        "pids_max" => ?status.limits.pids_max,
        "stale_groups_removed" => stale);
    Ok(Some(group))
}

/// The state the backend's threads share, for a pool that is empty and not backing off.
fn new_shared(
    config: SandboxConfig,
    logger: Logger,
    control: OwnedFd,
    uids: crate::uids::UidClaim,
    cgroup: Option<crate::cgroup::ClonesGroup>,
    violations: mayfly_domain::ViolationSink,
) -> Arc<Shared> {
    let ctx = Arc::new(Ctx {
        logger: logger.clone(),
        cpu_limit: config.limits.cpu_seconds,
        destroyed: AtomicU64::new(0),
        spares: Mutex::new(Vec::new()),
        spare_limit: config.pool_size.max(1),
    });
    Arc::new(Shared {
        config,
        logger,
        ctx,
        control,
        state: Mutex::new(PoolState {
            ready: VecDeque::new(),
            creating: 0,
            backoff: BACKOFF,
            backoff_until: None,
            in_use: 0,
            quarantined: Quarantine::new(MAX_QUARANTINED, "killed"),
            shut_down: false,
            zygote_gone: false,
        }),
        changed: Condvar::new(),
        refill_wanted: Condvar::new(),
        registry: Mutex::new(HashMap::new()),
        pending: Mutex::new(HashMap::new()),
        uids,
        next_id: AtomicU32::new(1),
        rings_reused: AtomicU64::new(0),
        created: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        cgroup,
        template_handlers: std::sync::OnceLock::new(),
        violations,
    })
}

/// Starts the supervisor thread, which spawns the zygote on `zygote_end` and configures it
/// with `settings`, and waits for the zygote's `Ready` (or its failure, or the thread's
/// end, after which the thread is joined).
fn start_supervisor(
    shared: &Arc<Shared>,
    zygote_end: OwnedFd,
    settings: Settings,
) -> Result<(JoinHandle<()>, Started), SandboxError> {
    let (started_tx, started_rx) = mpsc::channel();
    let sup_shared = Arc::clone(shared);
    let supervisor = std::thread::Builder::new()
        .name("sandbox-zygote".into())
        .spawn(move || supervise(sup_shared, zygote_end, settings, started_tx))
        .map_err(|source| SandboxError::Thread {
            role: "supervisor",
            source,
        })?;
    match started_rx.recv() {
        Ok(Ok(started)) => Ok((supervisor, started)),
        Ok(Err(e)) => {
            let _ = supervisor.join();
            Err(e)
        }
        Err(_) => {
            let _ = supervisor.join();
            Err(SandboxError::ZygoteNotReady {
                pid: 0,
                waited: shared.config.ready_timeout,
                status: "supervisor thread ended".into(),
            })
        }
    }
}

/// The refill threads' handles.
type Refills = Vec<JoinHandle<()>>;

/// Starts the refill threads (they only send requests: one is enough; more are allowed).
/// `Err`: a thread could not be started, with those that were, for the caller to stop.
fn spawn_refills(shared: &Arc<Shared>) -> Result<Refills, (std::io::Error, Refills)> {
    let mut refills = Vec::new();
    for i in 0..shared.config.refill_threads.max(1) {
        let refill_shared = Arc::clone(shared);
        match std::thread::Builder::new()
            .name(format!("sandbox-refill-{i}"))
            .spawn(move || refill(refill_shared))
        {
            Ok(r) => refills.push(r),
            Err(source) => return Err((source, refills)),
        }
    }
    Ok(refills)
}

impl Sandbox {
    /// Removes leftovers of a previous run, spawns the zygote, waits until it is ready and
    /// starts filling the pool (in the background: use [`Sandbox::wait_ready`] to wait).
    pub fn start(config: SandboxConfig, logger: Logger) -> Result<Sandbox, SandboxError> {
        Self::start_reporting(config, logger, mayfly_domain::handlers::ignore_violations())
    }

    /// [`Sandbox::start`], reporting to `violations` every clone whose ring `Ready`
    /// announces other handlers than the template did on the control socket (it is
    /// destroyed, never handed out; the agent audits the report as a protocol violation).
    pub fn start_reporting(
        config: SandboxConfig,
        logger: Logger,
        violations: mayfly_domain::ViolationSink,
    ) -> Result<Sandbox, SandboxError> {
        config.validate()?;
        let root = prepare_run_dir(&config)?;
        reconcile::reconcile(&config, &logger)?;
        let cgroup = clones_group(&config, &logger)?;
        // This sandbox's own uids, exclusive on the host for as long as it runs.
        let uids = crate::uids::claim(
            &config.uid_lock_dir,
            config.first_uid,
            config.uid_count,
            config.uid_blocks_needed(),
        )?;
        let (agent_end, zygote_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(SandboxError::Socket)?;
        let settings = Settings {
            limits: config.limits,
            first_uid: uids.first(),
            uid_count: uids.count(),
            gid: config.gid,
            guest_stderr: config.guest_stderr,
            root,
        };
        let shared = new_shared(config, logger, agent_end, uids, cgroup, violations);
        let (supervisor, started) = start_supervisor(&shared, zygote_end, settings)?;
        let pid = i32::try_from(started.pid).unwrap_or(i32::MAX);
        if let Err(e) = reconcile::record(&shared.config.run_dir, pid) {
            let _ = sys::pidfd_send_signal(started.pidfd.as_fd(), libc::SIGKILL);
            let _ = supervisor.join();
            return Err(e.into());
        }
        let refill = match spawn_refills(&shared) {
            Ok(refills) => refills,
            Err((source, refills)) => {
                shared.pool().shut_down = true;
                shared.changed.notify_all();
                shared.refill_wanted.notify_all();
                let _ = sys::pidfd_send_signal(started.pidfd.as_fd(), libc::SIGKILL);
                let _ = supervisor.join();
                for r in refills {
                    let _ = r.join();
                }
                let _ = reconcile::clear(&shared.config.run_dir);
                return Err(SandboxError::Thread {
                    role: "refill",
                    source,
                });
            }
        };
        info!(shared.logger, "sandbox started";
            "zygote_pid" => started.pid, "pool_size" => shared.config.pool_size,
            "isolation" => "process (namespaces, chroot, uid, rlimits, seccomp); not a VM");
        Ok(Sandbox {
            shared,
            threads: Mutex::new(Some(Threads { supervisor, refill })),
            zygote_pid: started.pid,
            zygote_pidfd: started.pidfd,
            handlers: started.handlers,
        })
    }

    /// The zygote's host pid (also its process group).
    pub fn zygote_pid(&self) -> u32 {
        self.zygote_pid
    }

    /// The demoted clones' control group (`cgroup::DEMOTED_LEAF`): `None` when cgroup
    /// limits are off or have no demoted quota.
    pub fn demoted_cgroup(&self) -> Option<std::path::PathBuf> {
        self.shared
            .cgroup
            .as_ref()
            .and_then(|g| g.demoted_path().map(std::path::Path::to_path_buf))
    }

    /// The clones' control group: its hierarchy version, paths, limits and usage; `None`
    /// when cgroup limits are off.
    pub fn cgroup_status(&self) -> Option<crate::cgroup::GroupStatus> {
        self.shared
            .cgroup
            .as_ref()
            .map(crate::cgroup::ClonesGroup::status)
    }

    /// How many clones were given a reaped clone's ring (wiped) instead of a new one.
    pub fn rings_reused(&self) -> u64 {
        self.shared.rings_reused.load(Ordering::Relaxed)
    }

    /// The uids this sandbox's clones run as: `(first, count)`, claimed for it alone.
    pub fn uids(&self) -> (u32, u32) {
        (self.shared.uids.first(), self.shared.uids.count())
    }

    /// Waits up to `timeout` until at least `count` clones are pooled (forked and confined or
    /// confining; their `Ready` is read when one is taken, and a clone that dies in the pool
    /// leaves it). Returns whether they are.
    pub fn wait_ready(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.shared.pool();
        loop {
            if state.ready.len() >= count {
                return true;
            }
            if state.shut_down || state.zygote_gone {
                return false;
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return false;
            }
            state = wait_timeout(&self.shared.changed, state, left).0;
        }
    }

    /// Like [`DomainBackend::take`], returning the concrete type (which tells its host pid).
    pub fn take_clone(&self, timeout: Duration) -> Result<SandboxDomain, DomainError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.shared.pool();
        loop {
            if state.shut_down {
                return Err(DomainError::ShutDown { backend: BACKEND });
            }
            // Once the zygote has died, its pooled clones are dying too (PR_SET_PDEATHSIG),
            // even if the supervisor has not seen the socket close yet.
            let zygote_dead =
                sys::pidfd_exited(self.zygote_pidfd.as_fd(), Duration::ZERO).unwrap_or(true);
            if state.zygote_gone || zygote_dead {
                return Err(DomainError::Create {
                    backend: BACKEND,
                    source: Box::new(CreateError::ZygoteGone { clone_id: 0 }),
                });
            }
            if state.in_use < self.shared.config.max_in_use {
                if let Some(handle) = state.ready.pop_front() {
                    state.in_use = state.in_use.saturating_add(1);
                    drop(state);
                    let left =
                        deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
                    if let Some(taken) = self.hand_out(handle, left, timeout) {
                        return taken;
                    }
                    state = self.shared.pool();
                    state.in_use = state.in_use.saturating_sub(1);
                    self.shared.changed.notify_all();
                    continue;
                }
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Err(DomainError::Exhausted {
                    backend: BACKEND,
                    waited: timeout,
                });
            }
            state = wait_timeout(&self.shared.changed, state, left).0;
        }
    }

    /// Hands out a clone just taken from the pool (and counted in use) once its `Ready` is
    /// confirmed within `left`. `Some`: the clone, or the caller's timeout (`timeout`) after
    /// the clone went back to the pool intact. `None`: the clone was not ready and has been
    /// destroyed and counted as failed; the caller uncounts it and takes the next.
    fn hand_out(
        &self,
        mut handle: CloneHandle,
        left: Duration,
        timeout: Duration,
    ) -> Option<Result<SandboxDomain, DomainError>> {
        match confirm_ready(&self.shared, &mut handle, left) {
            Ok(Readiness::NotYet) => {
                self.put_back(handle);
                Some(Err(DomainError::Exhausted {
                    backend: BACKEND,
                    waited: timeout,
                }))
            }
            Ok(Readiness::Ready) => {
                self.shared.creation_succeeded();
                self.shared.top_up();
                debug!(self.shared.logger, "clone taken";
                    "clone_id" => handle.cell.id, "pid" => handle.cell.pid);
                Some(Ok(SandboxDomain {
                    handle: Some(handle),
                    shared: Arc::clone(&self.shared),
                }))
            }
            Err(e) => {
                // Not handed out: destroyed (dropping the handle), counted, and the refill
                // threads back off; a clone announcing other handlers is reported.
                drop(handle);
                if let CreateError::HandlersDiffer { clone_id, .. } = &e {
                    (self.shared.violations)(mayfly_domain::Violation {
                        backend: BACKEND,
                        domain: *clone_id,
                        what: e.to_string(),
                    });
                }
                self.shared.creation_failed(&e);
                None
            }
        }
    }

    /// Returns a clone whose `Ready` the caller's time ran out waiting for to the front of
    /// the pool, intact and uncounted (or destroys it if the backend has shut down).
    fn put_back(&self, handle: CloneHandle) {
        let mut state = self.shared.pool();
        state.in_use = state.in_use.saturating_sub(1);
        if state.shut_down {
            drop(state);
            drop(handle);
        } else {
            state.ready.push_front(handle);
            drop(state);
        }
        self.shared.changed.notify_all();
    }
}

impl DomainBackend for Sandbox {
    /// The quarantined clones, kept stopped for forensics.
    fn quarantined(&self) -> Vec<Quarantined> {
        self.shared.pool().quarantined.list()
    }

    /// Destroys a quarantined clone (after forensics). `Ok(None)`: no such clone.
    fn release_quarantined(&self, id: DomainId) -> Result<Option<DomainExit>, DomainError> {
        let entry = self.shared.pool().quarantined.release(id);
        let Some(mut handle) = entry else {
            return Ok(None);
        };
        handle
            .terminate()
            .map(Some)
            .map_err(|e| self.shared.domain_error(id, e))
    }

    fn name(&self) -> &'static str {
        BACKEND
    }

    /// The handlers the zygote announced at start-up: those built into the template.
    fn handlers(&self) -> Vec<String> {
        self.handlers.clone()
    }

    fn take(&self, timeout: Duration) -> Result<Box<dyn Domain>, DomainError> {
        self.take_clone(timeout)
            .map(|d| Box::new(d) as Box<dyn Domain>)
    }

    fn stats(&self) -> PoolStats {
        let state = self.shared.pool();
        PoolStats {
            ready: state.ready.len(),
            in_use: state.in_use,
            created: self.shared.created.load(Ordering::Relaxed),
            destroyed: self.shared.ctx.destroyed.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
        }
    }

    /// Kills every clone (ready, in use, quarantined, being created) and the zygote, and
    /// waits until they are gone. Domains still held by callers report
    /// [`mayfly_ring::Wake::PeerGone`] and then `Destroyed`.
    fn shutdown(&self) {
        let Some(threads) = lock(&self.threads).take() else {
            return;
        };
        let shared = &self.shared;
        info!(shared.logger, "sandbox shutting down"; "zygote_pid" => self.zygote_pid);
        let (ready, quarantined) = {
            let mut state = shared.pool();
            state.shut_down = true;
            (std::mem::take(&mut state.ready), state.quarantined.close())
        };
        shared.changed.notify_all();
        shared.refill_wanted.notify_all();
        for cell in lock(&shared.registry).values() {
            if let Err(e) = cell.kill() {
                error!(shared.logger, "killing a clone at shutdown failed"; "error" => %e);
            }
        }
        // The zygote kills and reaps whatever is left (clones forked meanwhile) and exits. A
        // zygote that does not read its socket any more is killed below instead.
        let _ = proto::send_nowait(shared.control.as_fd(), &Msg::Shutdown);
        if !sys::pidfd_exited(self.zygote_pidfd.as_fd(), ZYGOTE_EXIT_WAIT).unwrap_or(false) {
            warn!(shared.logger, "zygote did not exit; killing it"; "zygote_pid" => self.zygote_pid);
            let _ = sys::pidfd_send_signal(self.zygote_pidfd.as_fd(), libc::SIGKILL);
        }
        let _ = threads.supervisor.join();
        for r in threads.refill {
            let _ = r.join();
        }
        drop(ready);
        drop(quarantined);
        if let Some(group) = &shared.cgroup {
            let left = group.remove(Duration::from_secs(2));
            if !left.is_empty() {
                warn!(shared.logger, "the clones' cgroup could not be removed"; "paths" => ?left);
            }
        }
        if let Err(e) = reconcile::clear(&shared.config.run_dir) {
            warn!(shared.logger, "removing the pgid file failed"; "error" => %e);
        }
        info!(shared.logger, "sandbox shut down"; "stats" => ?self.stats());
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.shutdown();
    }
}
