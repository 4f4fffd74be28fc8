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

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mayfly_domain::{
    Backoff, Destroyed, Domain, DomainBackend, DomainError, DomainExit, DomainId, ErrorChain,
    PoolStats, Quarantine, Quarantined, Refused, Ring, MAX_QUARANTINED,
};
use mayfly_ring::wire::PROTOCOL_VERSION;
use mayfly_ring::{Backend, EventFdNotifier, MmapMem, Notifier, Request, RingError, SharedMem};
use mayfly_sync::{lock, wait_timeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use slog::{debug, error, info, warn, Logger};

use crate::clone::{
    CloneCell, CloneError, CloneHandle, CloneNotifier, Ctx, ExitRecord, SpareRing, Status,
};
use crate::config::{ConfigError, SandboxConfig};
use crate::proto::{self, Msg, ProtoError, Settings, Stage, MAX_ROOT_PATH, SETUP_EXIT_BASE};
use crate::reconcile::{self, ReconcileError};
use crate::spawn::{self, SpawnError};
use crate::sys;

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

/// The sandbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The configuration was refused.
    #[error("sandbox configuration")]
    Config(#[from] ConfigError),
    /// No uids of the configured range are free on this host.
    #[error("claiming the clones' uids")]
    Uids(#[from] crate::uids::ClaimError),
    /// `run_dir` or the root directory could not be prepared.
    #[error("preparing {path:?} failed")]
    RunDir {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The reconciler failed.
    #[error("reconciling leftovers of a previous run failed")]
    Reconcile(#[from] ReconcileError),
    /// The control socketpair could not be created.
    #[error("socketpair(AF_UNIX, SOCK_SEQPACKET) failed")]
    Socket(#[source] nix::errno::Errno),
    /// A thread could not be started.
    #[error("starting the {role} thread failed")]
    Thread {
        /// Which thread.
        role: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The zygote could not be spawned.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// The clones' cgroup limits could not be applied. Without cgroups a host can only run
    /// the sandbox with the limits switched off (`cgroups: None`, `serve --no-cgroups`).
    #[error(
        "applying the clones' cgroup limits failed (a host without usable cgroups needs \
         --no-cgroups, which leaves clones' CPU and memory unbounded as a group)"
    )]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// Talking to the zygote failed during start-up.
    #[error("zygote (pid {pid}) control protocol")]
    Control {
        /// Zygote pid.
        pid: u32,
        /// The failure.
        #[source]
        source: ProtoError,
    },
    /// The zygote reported a failed start-up step.
    #[error("zygote (pid {pid}): {} failed (errno {errno}: {})", stage_name(*stage), std::io::Error::from_raw_os_error(*errno))]
    ZygoteInit {
        /// Zygote pid.
        pid: u32,
        /// The stage number (see [`Stage`]).
        stage: u32,
        /// The errno.
        errno: i32,
    },
    /// The zygote exited or went silent before reporting ready.
    #[error("zygote (pid {pid}) did not become ready within {waited:?} (exit status: {status})")]
    ZygoteNotReady {
        /// Zygote pid.
        pid: u32,
        /// The wait.
        waited: Duration,
        /// Its exit status, if it exited.
        status: String,
    },
    /// Opening the zygote's pidfd failed.
    #[error("pidfd_open of the zygote (pid {pid}) failed")]
    ZygotePidfd {
        /// Zygote pid.
        pid: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn stage_name(stage: u32) -> &'static str {
    Stage::from_u32(stage).map_or("unknown stage", Stage::name)
}

/// A clone could not be created or did not reach its ready point.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The ring's memfd could not be created or mapped.
    #[error("clone {clone_id}: creating the ring memfd failed")]
    Memfd {
        /// Clone id.
        clone_id: u32,
        /// The failure.
        #[source]
        source: mayfly_ring::mem::MapError,
    },
    /// Initialising the ring or its eventfds failed.
    #[error("clone {clone_id}: initialising the ring failed")]
    Ring {
        /// Clone id.
        clone_id: u32,
        /// The failure.
        #[source]
        source: RingError,
    },
    /// Creating the eventfds failed.
    #[error("clone {clone_id}: creating the eventfds failed")]
    Eventfd {
        /// Clone id.
        clone_id: u32,
        /// The failure.
        #[source]
        source: mayfly_ring::notify::NotifyError,
    },
    /// Sending the Clone request failed.
    #[error("clone {clone_id}: sending the Clone request failed")]
    Send {
        /// Clone id.
        clone_id: u32,
        /// The failure.
        #[source]
        source: ProtoError,
    },
    /// The zygote could not fork it.
    #[error("clone {clone_id}: the zygote's {} failed (errno {errno})", stage_name(*stage))]
    Spawn {
        /// Clone id.
        clone_id: u32,
        /// Stage number.
        stage: u32,
        /// The errno.
        errno: i32,
    },
    /// The zygote did not answer the Clone request in time.
    #[error("clone {clone_id}: no answer from the zygote within {waited:?}")]
    SpawnTimeout {
        /// Clone id.
        clone_id: u32,
        /// The wait.
        waited: Duration,
    },
    /// The zygote is gone.
    #[error("clone {clone_id}: the zygote is gone")]
    ZygoteGone {
        /// Clone id.
        clone_id: u32,
    },
    /// The guest did not send `Ready` in time.
    #[error("clone {clone_id} (pid {pid}): no Ready within {waited:?}")]
    ReadyTimeout {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// The wait.
        waited: Duration,
    },
    /// The guest sent something other than a valid `Ready`, or broke the ring protocol.
    #[error("clone {clone_id} (pid {pid}): bad first request: {what}")]
    NotReady {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// What arrived.
        what: String,
    },
    /// The ring failed while waiting for `Ready`.
    #[error("clone {clone_id} (pid {pid}): waiting for Ready failed")]
    ReadyRing {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// The failure.
        #[source]
        source: RingError,
    },
    /// The clone died before `Ready`.
    #[error("clone {clone_id} (pid {pid}) ended before Ready: {exit}{}", setup_hint(*exit))]
    Died {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// How it ended.
        exit: DomainExit,
    },
    /// Killing or reaping it failed.
    #[error(transparent)]
    Clone(#[from] CloneError),
}

fn setup_hint(exit: DomainExit) -> String {
    match exit {
        DomainExit::Exited { code } if code > SETUP_EXIT_BASE => {
            let stage = u32::try_from(code.saturating_sub(SETUP_EXIT_BASE)).unwrap_or(0);
            format!(" (confinement step {} failed)", stage_name(stage))
        }
        _ => String::new(),
    }
}

/// A clone requested from the zygote and not yet reported forked: the agent's end of its
/// ring, kept until the zygote's `Spawned` names it.
struct PendingClone {
    ring: Ring,
    bell: Arc<EventFdNotifier>,
    /// The ring's parts, for reuse after the clone (see [`SpareRing`]).
    spare: SpareRing,
    requested: Instant,
}

struct PoolState {
    /// Forked clones, oldest first. Their `Ready` is read when one is taken (it is normally
    /// long there by then), so no thread waits for it.
    ready: VecDeque<CloneHandle>,
    /// Clones requested from the zygote and not yet reported forked.
    creating: usize,
    /// Failures in a row (a fork refused, a clone dead or silent before `Ready`); the refill
    /// threads back off while there are any.
    backoff: Backoff,
    /// No new request before this instant (back-off after failures).
    backoff_until: Option<Instant>,
    in_use: usize,
    quarantined: Quarantine<CloneHandle>,
    shut_down: bool,
    zygote_gone: bool,
}

/// What every thread of one sandbox shares.
struct Shared {
    config: SandboxConfig,
    logger: Logger,
    ctx: Arc<Ctx>,
    control: OwnedFd,
    state: Mutex<PoolState>,
    /// The pool changed for takers: a clone pooled, a slot released, shut down.
    changed: Condvar,
    /// The refill threads have something to do: the pool more than one clone short, a
    /// back-off started or over, shut down. (They also wake every `ready_timeout` to expire
    /// unanswered requests.)
    refill_wanted: Condvar,
    /// Clones forked and not yet reported ended, by id.
    registry: Mutex<HashMap<u32, Arc<CloneCell>>>,
    /// Clone requests awaiting the zygote's answer, by id.
    pending: Mutex<HashMap<u32, PendingClone>>,
    /// The uids this sandbox's clones run as (its claim on them lasts as long as this).
    uids: crate::uids::UidClaim,
    next_id: AtomicU32,
    created: AtomicU64,
    failed: AtomicU64,
    /// Clones given a reaped clone's ring (wiped) instead of a new one.
    rings_reused: AtomicU64,
    /// The control group of the zygote and its clones, if limits are on.
    cgroup: Option<crate::cgroup::ClonesGroup>,
}

impl Shared {
    fn pool(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    /// A clone could not be made ready: count it, log it, and make the refill threads back
    /// off (doubling with each failure in a row).
    fn creation_failed(&self, error: &CreateError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut state = self.pool();
        if state.shut_down {
            return;
        }
        let backoff = state.backoff.failed();
        state.backoff_until = Instant::now().checked_add(backoff);
        drop(state);
        error!(self.logger, "creating a clone failed"; "error" => %ErrorChain(error),
            "retry_in_ms" => backoff.as_millis());
        self.changed.notify_all();
        self.refill_wanted.notify_all();
    }

    /// A taker got its clone: if the pool is short of one and not backing off, the taker
    /// asks the zygote for the replacement itself, on its own thread (which runs anyway),
    /// instead of waking a refill thread for it — a wake-up costs a cross-CPU interrupt and
    /// two context switches (several µs on a VM), once per transaction. Anything more (a
    /// back-off, several clones short, expiring requests) is left to the refill threads.
    /// The request's send blocks the taker only while the control socket's buffer is full,
    /// i.e. while the zygote is far behind on reading requests.
    fn top_up(&self) {
        let mut state = self.pool();
        let short = |s: &PoolState| s.ready.len() + s.creating < self.config.pool_size;
        if !short(&state) {
            return;
        }
        if state.shut_down || state.zygote_gone || state.backoff_until.is_some() {
            drop(state);
            self.refill_wanted.notify_all();
            return;
        }
        state.creating += 1;
        let still_short = short(&state);
        drop(state);
        if still_short {
            self.refill_wanted.notify_all();
        }
        if let Err(e) = request(self) {
            self.pool().creating -= 1;
            self.creation_failed(&e);
        }
    }

    /// A clone reached its ready point: failures in a row end.
    fn creation_succeeded(&self) {
        let mut state = self.pool();
        if state.backoff.succeeded() {
            state.backoff_until = None;
            drop(state);
            self.refill_wanted.notify_all();
        }
    }

    fn domain_error(
        &self,
        id: DomainId,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> DomainError {
        DomainError::Control {
            backend: BACKEND,
            id,
            source: Box::new(e),
        }
    }
}

struct Threads {
    supervisor: JoinHandle<()>,
    refill: Vec<JoinHandle<()>>,
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
}

impl Sandbox {
    /// Removes leftovers of a previous run, spawns the zygote, waits until it is ready and
    /// starts filling the pool (in the background: use [`Sandbox::wait_ready`] to wait).
    pub fn start(config: SandboxConfig, logger: Logger) -> Result<Sandbox, SandboxError> {
        config.validate()?;
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
        reconcile::reconcile(&config, &logger)?;
        let cgroup = match config.cgroups {
            Some(limits) => {
                let layout = crate::cgroup::detect()?;
                let stale = crate::cgroup::remove_stale(&layout);
                let group =
                    crate::cgroup::ClonesGroup::create(&layout, limits, config.uids_needed())?;
                let status = group.status();
                info!(logger, "sandbox clones run under cgroup limits";
                    "cgroup_version" => status.version.as_str(),
                    "paths" => ?status.paths,
                    "cpu_weight" => limits.cpu_weight,
                    "cpu_max_percent" => ?limits.cpu_max_percent,
                    "memory_max" => limits.memory_max,
                    "pids_max" => ?status.limits.pids_max,
                    "stale_groups_removed" => stale);
                Some(group)
            }
            None => {
                warn!(
                    logger,
                    "sandbox clones run WITHOUT cgroup limits: spinning or \
                    allocating guests can starve the agent and honest clones (cgroups off)"
                );
                None
            }
        };
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
        let ctx = Arc::new(Ctx {
            logger: logger.clone(),
            cpu_limit: config.limits.cpu_seconds,
            destroyed: AtomicU64::new(0),
            spares: Mutex::new(Vec::new()),
            spare_limit: config.pool_size.max(1),
        });
        let settings = Settings {
            limits: config.limits,
            first_uid: uids.first(),
            uid_count: uids.count(),
            gid: config.gid,
            guest_stderr: config.guest_stderr,
            root,
        };
        let shared = Arc::new(Shared {
            config,
            logger,
            ctx,
            control: agent_end,
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
        });

        let (started_tx, started_rx) = mpsc::channel();
        let sup_shared = Arc::clone(&shared);
        let supervisor = std::thread::Builder::new()
            .name("sandbox-zygote".into())
            .spawn(move || supervise(sup_shared, zygote_end, settings, started_tx))
            .map_err(|source| SandboxError::Thread {
                role: "supervisor",
                source,
            })?;
        let started = match started_rx.recv() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = supervisor.join();
                return Err(e);
            }
            Err(_) => {
                let _ = supervisor.join();
                return Err(SandboxError::ZygoteNotReady {
                    pid: 0,
                    waited: shared.config.ready_timeout,
                    status: "supervisor thread ended".into(),
                });
            }
        };
        let pid = i32::try_from(started.pid).unwrap_or(i32::MAX);
        if let Err(e) = reconcile::record(&shared.config.run_dir, pid) {
            let _ = sys::pidfd_send_signal(started.pidfd.as_fd(), libc::SIGKILL);
            let _ = supervisor.join();
            return Err(e.into());
        }
        // Refill threads only send requests (one is enough; more are allowed).
        let mut refills = Vec::new();
        for i in 0..shared.config.refill_threads.max(1) {
            let refill_shared = Arc::clone(&shared);
            match std::thread::Builder::new()
                .name(format!("sandbox-refill-{i}"))
                .spawn(move || refill(refill_shared))
            {
                Ok(r) => refills.push(r),
                Err(source) => {
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
            }
        }
        let refill = refills;
        info!(shared.logger, "sandbox started";
            "zygote_pid" => started.pid, "pool_size" => shared.config.pool_size,
            "isolation" => "process (namespaces, chroot, uid, rlimits, seccomp); not a VM");
        Ok(Sandbox {
            shared,
            threads: Mutex::new(Some(Threads { supervisor, refill })),
            zygote_pid: started.pid,
            zygote_pidfd: started.pidfd,
        })
    }

    /// The zygote's host pid (also its process group).
    pub fn zygote_pid(&self) -> u32 {
        self.zygote_pid
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
                if let Some(mut handle) = state.ready.pop_front() {
                    state.in_use = state.in_use.saturating_add(1);
                    drop(state);
                    let left =
                        deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
                    match confirm_ready(&self.shared, &mut handle, left) {
                        Ok(Readiness::NotYet) => {
                            // The caller's time ran out first: the clone goes back to the
                            // pool, intact, and the caller gets its timeout.
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
                            return Err(DomainError::Exhausted {
                                backend: BACKEND,
                                waited: timeout,
                            });
                        }
                        Ok(Readiness::Ready) => {
                            self.shared.creation_succeeded();
                            self.shared.top_up();
                            debug!(self.shared.logger, "clone taken";
                                "clone_id" => handle.cell.id, "pid" => handle.cell.pid);
                            return Ok(SandboxDomain {
                                handle: Some(handle),
                                shared: Arc::clone(&self.shared),
                            });
                        }
                        Err(e) => {
                            // Not handed out: destroyed (dropping the handle), counted,
                            // and the refill threads back off.
                            drop(handle);
                            self.shared.creation_failed(&e);
                            state = self.shared.pool();
                            state.in_use = state.in_use.saturating_sub(1);
                            self.shared.changed.notify_all();
                            continue;
                        }
                    }
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

/// The supervisor thread: spawns the zygote, reports start-up, then dispatches its reports.
fn supervise(
    shared: Arc<Shared>,
    zygote_end: OwnedFd,
    settings: Settings,
    started: mpsc::Sender<Result<Started, SandboxError>>,
) {
    let mut child = match spawn::spawn_zygote(&shared.config, &zygote_end) {
        Ok(c) => c,
        Err(e) => {
            let _ = started.send(Err(e.into()));
            return;
        }
    };
    drop(zygote_end);
    let pid = child.id();
    // The zygote forks every clone: at nice -10 it is not starved by spinning clones in
    // their shared cgroup (each clone resets itself to nice 0 before the guest runs).
    if let Err(e) = sys::set_nice(pid, ZYGOTE_NICE) {
        warn!(shared.logger, "raising the zygote's priority failed"; "error" => %e);
    }
    // Into the clones' group before it forks anything: every clone inherits it.
    if let Some(group) = &shared.cgroup {
        if let Err(e) = group.enter(pid) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = started.send(Err(e.into()));
            return;
        }
    }
    match handshake(&shared, &mut child, settings) {
        Ok(pidfd) => {
            if started.send(Ok(Started { pid, pidfd })).is_err() {
                let _ = child.kill();
            }
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = started.send(Err(e));
            return;
        }
    }
    drop(started);
    loop {
        match proto::recv(shared.control.as_fd()) {
            Ok(Some((msg, fds))) => dispatch(&shared, msg, fds),
            Ok(None) => break,
            Err(e @ (ProtoError::Malformed { .. } | ProtoError::FdCount { .. })) => {
                error!(shared.logger, "refused a message from the zygote"; "error" => %e);
            }
            Err(e) => {
                error!(shared.logger, "reading the zygote's control socket failed"; "error" => %e);
                let _ = child.kill();
                break;
            }
        }
    }
    zygote_gone(&shared);
    let status = child.wait();
    let level_shutdown = shared.pool().shut_down;
    if level_shutdown {
        debug!(shared.logger, "zygote exited"; "zygote_pid" => pid, "status" => ?status);
    } else {
        error!(shared.logger, "zygote exited unexpectedly; the sandbox can create no more clones";
            "zygote_pid" => pid, "status" => ?status);
    }
}

/// Sends Configure and waits for Ready; returns the zygote's pidfd.
fn handshake(
    shared: &Shared,
    child: &mut Child,
    settings: Settings,
) -> Result<OwnedFd, SandboxError> {
    let pid = child.id();
    // Opened before anything could reap the zygote, so it names this process.
    let pidfd = sys::pidfd_open(i32::try_from(pid).unwrap_or(i32::MAX))
        .map_err(|source| SandboxError::ZygotePidfd { pid, source })?;
    let control = |source| SandboxError::Control { pid, source };
    proto::send(shared.control.as_fd(), &Msg::Configure(settings), &[]).map_err(control)?;
    let waited = shared.config.ready_timeout;
    let [readable] = sys::wait_readable([shared.control.as_fd()], Some(waited)).map_err(|e| {
        control(ProtoError::Recv(nix::errno::Errno::from_raw(
            e.raw_os_error().unwrap_or(0),
        )))
    })?;
    let not_ready = |child: &mut Child| SandboxError::ZygoteNotReady {
        pid,
        waited,
        status: match child.try_wait() {
            Ok(Some(s)) => s.to_string(),
            _ => "still running".into(),
        },
    };
    if !readable {
        return Err(not_ready(child));
    }
    match proto::recv(shared.control.as_fd()).map_err(control)? {
        Some((Msg::Ready { .. }, _)) => Ok(pidfd),
        Some((Msg::InitFailed { stage, errno }, _)) => {
            Err(SandboxError::ZygoteInit { pid, stage, errno })
        }
        Some(_) => Err(control(ProtoError::Malformed {
            what: "expected Ready",
            len: 0,
        })),
        None => {
            let _ = sys::pidfd_exited(pidfd.as_fd(), waited);
            Err(not_ready(child))
        }
    }
}

fn dispatch(shared: &Shared, msg: Msg, fds: crate::sys::ScmFds) {
    match msg {
        Msg::Spawned { clone_id, pid } => {
            let Some(pidfd) = fds.into_iter().next() else {
                return; // unreachable: `proto::recv` checked the count
            };
            let cell = Arc::new(CloneCell::new(clone_id, pid, pidfd));
            lock(&shared.registry).insert(clone_id, Arc::clone(&cell));
            let Some(pending) = lock(&shared.pending).remove(&clone_id) else {
                // Its request expired: nobody will use it.
                let _ = cell.kill();
                return;
            };
            let notifier = CloneNotifier::new(pending.bell, Arc::clone(&cell));
            let mut handle =
                CloneHandle::new(cell, pending.ring, notifier, Arc::clone(&shared.ctx));
            handle.spare = Some(pending.spare);
            handle.ready = true; // counted as created (and so as destroyed, later)
            handle.requested = pending.requested;
            shared.created.fetch_add(1, Ordering::Relaxed);
            debug!(shared.logger, "clone forked";
                "clone_id" => clone_id, "pid" => pid,
                "micros" => pending.requested.elapsed().as_micros());
            let mut state = shared.pool();
            state.creating = state.creating.saturating_sub(1);
            if state.shut_down {
                drop(state);
                // Killed without waiting here: this thread delivers the exit report.
                handle.terminate_in_background(Box::new(|_| {}));
                return;
            }
            state.ready.push_back(handle);
            drop(state);
            shared.changed.notify_all();
        }
        Msg::SpawnFailed {
            clone_id,
            stage,
            errno,
        } => {
            if lock(&shared.pending).remove(&clone_id).is_some() {
                shared.pool().creating -= 1;
                shared.creation_failed(&CreateError::Spawn {
                    clone_id,
                    stage,
                    errno,
                });
            }
        }
        Msg::Exited {
            clone_id,
            code,
            cpu_ms,
            ..
        } => finished(shared, clone_id, Status::Exited(code), cpu_ms),
        Msg::Killed {
            clone_id,
            signal,
            cpu_ms,
            ..
        } => finished(shared, clone_id, Status::Signaled(signal), cpu_ms),
        Msg::Stopped { clone_id, .. } => {
            if let Some(cell) = lock(&shared.registry).get(&clone_id) {
                cell.record_stop();
            }
        }
        other => {
            warn!(shared.logger, "unexpected message from the zygote"; "message" => ?other);
        }
    }
}

fn finished(shared: &Shared, clone_id: u32, status: Status, cpu_ms: u32) {
    let record = ExitRecord {
        status,
        cpu: Duration::from_millis(cpu_ms.into()),
    };
    let cell = lock(&shared.registry).remove(&clone_id);
    if let Some(cell) = cell {
        cell.record_exit(record);
    }
    // A pooled clone that ended before anyone took it: its start-up failed (or something
    // killed it). Out of the pool, counted, and the refill backs off.
    let dead = {
        let mut state = shared.pool();
        let at = state.ready.iter().position(|h| h.cell.id == clone_id);
        at.and_then(|i| state.ready.remove(i))
    };
    if let Some(handle) = dead {
        let (pid, exit) = (
            handle.cell.pid,
            handle.cell.domain_exit(Some(record), shared.ctx.cpu_limit),
        );
        handle.terminate_in_background(Box::new(|_| {})); // already ended: no wait
        shared.creation_failed(&CreateError::Died {
            clone_id,
            pid,
            exit,
        });
    }
}

/// The zygote is gone: no clone will be reported any more, none can be created.
fn zygote_gone(shared: &Shared) {
    shared.pool().zygote_gone = true;
    // Drained first: recording an exit may run a background destroy's callback.
    let cells: Vec<_> = lock(&shared.registry).drain().collect();
    for (_, cell) in cells {
        // They die with the zygote (PR_SET_PDEATHSIG); killed anyway, in case one did not.
        if let Err(e) = cell.kill() {
            warn!(shared.logger, "killing a clone of the dead zygote failed"; "error" => %e);
        }
        cell.record_exit(ExitRecord {
            status: Status::Lost,
            cpu: Duration::ZERO,
        });
    }
    lock(&shared.pending).clear();
    // No clone can be created any more: drop the kept rings (nothing may pop one now).
    lock(&shared.ctx.spares).clear();
    shared.changed.notify_all();
    shared.refill_wanted.notify_all();
}

/// The refill thread: keeps `pool_size` clones forked or on their way (with the takers'
/// `top_up`), without waiting for any of them, and gives up on requests the zygote does not
/// answer in time. It sends the zygote a request and goes on; the supervisor thread, which
/// reads the zygote's answer anyway, puts the clone in the pool; `take` reads its `Ready`.
fn refill(shared: Arc<Shared>) {
    loop {
        {
            let mut state = shared.pool();
            loop {
                if state.shut_down || state.zygote_gone {
                    return;
                }
                let now = Instant::now();
                let backing_off = state.backoff_until.filter(|&t| t > now);
                if let Some(until) = backing_off {
                    // A retry delay, woken early by shutdown.
                    state = wait_timeout(
                        &shared.refill_wanted,
                        state,
                        until.saturating_duration_since(now),
                    )
                    .0;
                    continue;
                }
                if state.ready.len() + state.creating < shared.config.pool_size {
                    break;
                }
                // Always a timed wait, even with no request out now: a taker may send one
                // (`top_up`) without waking this thread, and a request the zygote never
                // answers must still be given up on — within twice `ready_timeout`.
                state = wait_timeout(&shared.refill_wanted, state, shared.config.ready_timeout).0;
                drop(state);
                expire_requests(&shared);
                state = shared.pool();
            }
            state.creating += 1;
        }
        if let Err(e) = request(&shared) {
            shared.pool().creating -= 1;
            shared.creation_failed(&e);
        }
    }
}

/// Forgets requests the zygote did not answer within `ready_timeout`.
fn expire_requests(shared: &Shared) {
    let waited = shared.config.ready_timeout;
    let stale: Vec<u32> = lock(&shared.pending)
        .iter()
        .filter(|(_, p)| p.requested.elapsed() >= waited)
        .map(|(&id, _)| id)
        .collect();
    for clone_id in stale {
        if lock(&shared.pending).remove(&clone_id).is_some() {
            shared.pool().creating -= 1;
            shared.creation_failed(&CreateError::SpawnTimeout { clone_id, waited });
        }
    }
}

/// Most bytes of a reaped clone's ring that may hold data for the ring to be reused (wiped):
/// a normal transaction leaves a few pages; a ring a guest scribbled over is dropped instead.
const MAX_RECYCLED_DATA: usize = 64 * 1024;

/// A ring for a new clone: a reaped clone's, wiped, if one is kept; else a new one.
fn ring_parts(shared: &Shared, clone_id: u32) -> Result<SpareRing, CreateError> {
    let spare = lock(&shared.ctx.spares).pop();
    if let Some(spare) = spare {
        // Its clone is reaped: nothing else maps the memfd or holds the eventfds. The memory
        // must read as zero again (it held another transaction's payload and reads), and
        // wake-ups the old clone left in the eventfds must not reach the new one: a wait
        // that does not sleep empties each eventfd (a broken one drops the ring).
        let wiped = matches!(spare.mem.zero_data(MAX_RECYCLED_DATA), Ok(Some(_)));
        if wiped
            && spare.agent.wait(Some(Duration::ZERO)).is_ok()
            && spare.guest.wait(Some(Duration::ZERO)).is_ok()
        {
            shared.rings_reused.fetch_add(1, Ordering::Relaxed);
            return Ok(spare);
        }
    }
    let len = shared.config.geometry.total_len();
    let mem = Arc::new(
        MmapMem::memfd(c"mayfly-sandbox-ring", len)
            .map_err(|source| CreateError::Memfd { clone_id, source })?,
    );
    let (agent, guest) =
        EventFdNotifier::pair().map_err(|source| CreateError::Eventfd { clone_id, source })?;
    Ok(SpareRing {
        mem,
        agent: Arc::new(agent),
        guest: Arc::new(guest),
    })
}

/// Asks the zygote for one clone: its ring and eventfds are made (or reused) here, the
/// agent's end kept in `pending` until the zygote reports the fork.
fn request(shared: &Shared) -> Result<(), CreateError> {
    let clone_id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let geometry = shared.config.geometry;
    let len = geometry.total_len();
    let parts = ring_parts(shared, clone_id)?;
    // All zero (new, or wiped): only the header is written, so the pages a clone never
    // touches are never allocated.
    let ring: Ring =
        Backend::new_on_fresh_memory(Arc::clone(&parts.mem) as Arc<dyn SharedMem>, geometry)
            .map_err(|source| CreateError::Ring { clone_id, source })?;
    let ring_len = u32::try_from(len).map_err(|_| CreateError::Memfd {
        clone_id,
        source: mayfly_ring::mem::MapError::BadLength { len },
    })?;
    let (mem, guest) = (Arc::clone(&parts.mem), Arc::clone(&parts.guest));
    // `mem` and `guest` keep the fds open while they are sent, whatever happens to the
    // pending entry meanwhile. Fetched before the entry exists: every error return below
    // this point leaves nothing pending (the caller counts the failure once).
    let memfd = mem.fd().ok_or(CreateError::Memfd {
        clone_id,
        source: mayfly_ring::mem::MapError::BadLength { len },
    })?;
    // Pending before the request goes out: the zygote's `Spawned` may come back at once.
    lock(&shared.pending).insert(
        clone_id,
        PendingClone {
            ring,
            bell: Arc::clone(&parts.agent),
            spare: parts,
            requested: Instant::now(),
        },
    );
    let request = Msg::Clone { clone_id, ring_len };
    let sent = proto::send(
        shared.control.as_fd(),
        &request,
        &[memfd, guest.signal_fd(), guest.wait_fd()],
    );
    if let Err(source) = sent {
        // Counted as failed here only if the request was still pending (an expiry may have
        // taken it, and counted it, while the send blocked).
        if lock(&shared.pending).remove(&clone_id).is_some() {
            return Err(CreateError::Send { clone_id, source });
        }
    }
    Ok(())
}

/// Whether a pooled clone could be handed out.
enum Readiness {
    /// Its `Ready` was read.
    Ready,
    /// Not yet, and the caller's time is up; the clone is younger than `ready_timeout`, so
    /// it goes back to the pool, not counted as a failure.
    NotYet,
}

/// Reads a pooled clone's `Ready` (normally already there: no wait), waiting at most
/// `timeout`; a clone without `Ready` `ready_timeout` after it was requested has failed.
fn confirm_ready(
    shared: &Shared,
    handle: &mut CloneHandle,
    timeout: Duration,
) -> Result<Readiness, CreateError> {
    if handle.confirmed {
        return Ok(Readiness::Ready);
    }
    let (clone_id, pid) = (handle.cell.id, handle.cell.pid);
    let limit = shared.config.ready_timeout;
    let left_to_become_ready = limit.saturating_sub(handle.requested.elapsed());
    let wait = timeout.min(left_to_become_ready);
    match handle.ring.recv_request(&handle.notifier, Some(wait)) {
        Ok(envelope) => match envelope.body {
            Request::Ready { protocol_version } if protocol_version == PROTOCOL_VERSION => {
                handle.ready_id = envelope.id;
                handle.confirmed = true;
                Ok(Readiness::Ready)
            }
            other => Err(CreateError::NotReady {
                clone_id,
                pid,
                what: format!("{other:?}").chars().take(200).collect(),
            }),
        },
        Err(RingError::PeerGone) => {
            let exit = handle.terminate()?;
            Err(CreateError::Died {
                clone_id,
                pid,
                exit,
            })
        }
        Err(RingError::Timeout { .. }) if handle.requested.elapsed() < limit => {
            Ok(Readiness::NotYet)
        }
        Err(RingError::Timeout { .. }) => Err(CreateError::ReadyTimeout {
            clone_id,
            pid,
            waited: limit,
        }),
        Err(source) => Err(CreateError::ReadyRing {
            clone_id,
            pid,
            source,
        }),
    }
}

/// One clone handed out for one transaction.
///
/// Dropping it without [`Domain::destroy`] (a panic, an early return) destroys it too.
pub struct SandboxDomain {
    handle: Option<CloneHandle>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SandboxDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxDomain")
            .field("id", &self.id())
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl SandboxDomain {
    fn clone_handle(&self) -> Option<&CloneHandle> {
        self.handle.as_ref()
    }

    /// The clone's host pid.
    pub fn pid(&self) -> u32 {
        self.clone_handle()
            .map_or(0, |h| u32::try_from(h.cell.pid).unwrap_or(0))
    }

    /// Gives up the in-use slot (once).
    fn release_slot(&mut self) -> Option<CloneHandle> {
        let handle = self.handle.take()?;
        let mut state = self.shared.pool();
        state.in_use = state.in_use.saturating_sub(1);
        drop(state);
        self.shared.changed.notify_all();
        Some(handle)
    }
}

impl Domain for SandboxDomain {
    /// Sets the clone to nice 19: among the clones of its cgroup, a spinning guest then
    /// gets a small fraction of what a clone at nice 0 gets.
    fn demote(&mut self) -> Result<(), DomainError> {
        let Some(handle) = self.clone_handle() else {
            return Ok(());
        };
        let (id, pid) = (handle.cell.id, handle.cell.pid);
        // A clone that already ended may have been reaped: its pid could name another
        // process by now.
        if handle.cell.exited_within(Duration::ZERO).unwrap_or(true) {
            return Ok(());
        }
        sys::set_nice(u32::try_from(pid).unwrap_or(0), DEMOTED_NICE)
            .map_err(|e| self.shared.domain_error(id, e))
    }

    fn id(&self) -> DomainId {
        self.clone_handle().map_or(0, |h| h.cell.id)
    }

    /// The clone's host pid.
    fn handle(&self) -> String {
        self.pid().to_string()
    }

    fn ready_id(&self) -> u32 {
        self.clone_handle().map_or(0, |h| h.ready_id)
    }

    fn ring(&mut self) -> (&mut Ring, &dyn Notifier) {
        let handle = self
            .handle
            .as_mut()
            .unwrap_or_else(|| unreachable!("a SandboxDomain holds its clone until consumed"));
        (&mut handle.ring, &handle.notifier)
    }

    fn try_exit(&mut self) -> Result<Option<DomainExit>, DomainError> {
        let id = self.id();
        let Some(handle) = self.handle.as_mut() else {
            return Ok(None);
        };
        handle
            .try_exit()
            .map_err(|e| self.shared.domain_error(id, e))
    }

    fn destroy(mut self: Box<Self>) -> Result<DomainExit, DomainError> {
        let id = self.id();
        let Some(mut handle) = self.release_slot() else {
            return Ok(DomainExit::Destroyed);
        };
        handle
            .terminate()
            .map_err(|e| self.shared.domain_error(id, e))
    }

    /// Kills the clone and returns at once; `done` runs when the zygote has reaped it (on
    /// the supervisor thread, which reads the zygote's report anyway): no thread waits.
    fn destroys_in_background(&self) -> bool {
        true
    }

    fn destroy_in_background(mut self: Box<Self>, done: Destroyed) {
        let id = self.id();
        let shared = Arc::clone(&self.shared);
        let Some(handle) = self.release_slot() else {
            return done(Ok(DomainExit::Destroyed));
        };
        handle.terminate_in_background(Box::new(move |ended| {
            done(ended.map_err(|e| shared.domain_error(id, e)));
        }));
    }

    fn quarantine(mut self: Box<Self>) -> Result<Quarantined, DomainError> {
        let id = self.id();
        let pid = self.pid();
        let Some(handle) = self.release_slot() else {
            return Err(self
                .shared
                .domain_error(id, CreateError::ZygoteGone { clone_id: id }));
        };
        if let Err(e) = handle.stop(STOP_WAIT) {
            // Not stopped: destroy it rather than keep something running (Drop does).
            return Err(self.shared.domain_error(id, e));
        }
        let quarantined = Quarantined {
            backend: BACKEND,
            id,
            handle: pid.to_string(),
        };
        warn!(self.shared.logger, "clone quarantined (stopped, kept for forensics)";
            "clone_id" => id, "pid" => pid);
        let admitted = self
            .shared
            .pool()
            .quarantined
            .admit(quarantined.clone(), handle);
        match admitted {
            Ok(()) => Ok(quarantined),
            // Shutdown already swept the list: destroyed now.
            Err(Refused::Closed(handle)) => {
                drop(handle);
                Ok(quarantined)
            }
            Err(Refused::Full(handle, full)) => {
                drop(handle); // the quarantine is full: killed, not kept
                warn!(self.shared.logger, "quarantine full: clone killed instead";
                    "clone_id" => id, "pid" => pid, "max" => full.max);
                Err(self.shared.domain_error(id, full))
            }
        }
    }
}

impl Drop for SandboxDomain {
    fn drop(&mut self) {
        // Dropping the handle kills the clone and waits until it has exited.
        drop(self.release_slot());
    }
}
