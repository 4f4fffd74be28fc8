//! One clone, seen from the agent: its pidfd, its exit as the zygote reports it, its ring
//! and the notifier that also watches its liveness.
//!
//! Three things tell the agent about a clone, and they agree in this order:
//! 1. the **pidfd** (from the zygote, `SCM_RIGHTS`) becomes readable the moment the process
//!    exits — that is what the notifier and `destroy` wait on: once it is readable, the clone
//!    can no longer run;
//! 2. the zygote reaps it and reports how it ended (code or signal, and its CPU time);
//! 3. the handle maps that to a [`DomainExit`].

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mayfly_domain::{DomainExit, Ring};
use mayfly_ring::notify::NotifyError;
use mayfly_ring::{EventFdNotifier, MmapMem, Notifier, Wake};
use slog::{debug, Logger};

use crate::sys;

/// How long `destroy` waits for a killed clone to exit.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long to wait for the zygote's report once the pidfd says the clone exited.
pub(crate) const REPORT_WAIT: Duration = Duration::from_secs(5);

/// Managing one clone failed.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// `pidfd_send_signal` failed.
    #[error("clone {clone_id} (pid {pid}): sending signal {signal} failed")]
    Signal {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// The signal.
        signal: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Polling the pidfd failed.
    #[error("clone {clone_id} (pid {pid}): polling its pidfd failed")]
    Poll {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The clone did not exit within the wait after `SIGKILL`.
    #[error("clone {clone_id} (pid {pid}) still runs {waited:?} after SIGKILL")]
    KillTimeout {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// The wait.
        waited: Duration,
    },
    /// The clone did not stop within the wait after `SIGSTOP`.
    #[error("clone {clone_id} (pid {pid}) did not stop within {waited:?}")]
    StopTimeout {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// The wait.
        waited: Duration,
    },
}

/// How a clone ended, as the zygote reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
    /// The zygote died before reporting (the clone died with it: `PR_SET_PDEATHSIG`).
    Lost,
}

/// A reported exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitRecord {
    pub status: Status,
    pub cpu: Duration,
}

/// Called once with a clone's exit record (see [`CloneHandle::terminate_in_background`]).
pub(crate) type OnExit = Box<dyn FnOnce(ExitRecord) + Send>;

/// Runs a callback, containing a panic: it usually runs on the supervisor thread, which
/// must go on reading the zygote's reports (the panic hook has already printed it).
fn run_on_exit(f: OnExit, record: ExitRecord) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(record)));
}

#[derive(Default)]
struct CellState {
    exit: Option<ExitRecord>,
    stopped: bool,
    /// Called (outside the lock) when the exit is recorded.
    on_exit: Option<OnExit>,
}

impl std::fmt::Debug for CellState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellState")
            .field("exit", &self.exit)
            .field("stopped", &self.stopped)
            .field("on_exit", &self.on_exit.is_some())
            .finish()
    }
}

/// What the supervisor thread and the clone's handle share.
#[derive(Debug)]
pub(crate) struct CloneCell {
    pub id: u32,
    pub pid: i32,
    pidfd: OwnedFd,
    /// Set when the agent sends `SIGKILL` to a clone that was still running.
    killed: AtomicBool,
    state: Mutex<CellState>,
    changed: Condvar,
}

impl CloneCell {
    pub(crate) fn new(id: u32, pid: i32, pidfd: OwnedFd) -> Self {
        Self {
            id,
            pid,
            pidfd,
            killed: AtomicBool::new(false),
            state: Mutex::new(CellState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CellState> {
        mayfly_sync::lock(&self.state)
    }

    /// Whether the process has exited (now, or within `wait`).
    pub(crate) fn exited_within(&self, wait: Duration) -> Result<bool, CloneError> {
        sys::pidfd_exited(self.pidfd.as_fd(), wait).map_err(|source| CloneError::Poll {
            clone_id: self.id,
            pid: self.pid,
            source,
        })
    }

    /// Sends `signal` through the pidfd (a clone that already exited is not an error).
    pub(crate) fn signal(&self, signal: i32) -> Result<(), CloneError> {
        sys::pidfd_send_signal(self.pidfd.as_fd(), signal).map_err(|source| CloneError::Signal {
            clone_id: self.id,
            pid: self.pid,
            signal,
            source,
        })
    }

    /// `SIGKILL`, remembering that the agent (not the guest's fault) ended it if it still ran.
    pub(crate) fn kill(&self) -> Result<(), CloneError> {
        if !self.exited_within(Duration::ZERO)? {
            self.killed.store(true, Ordering::SeqCst);
        }
        self.signal(libc::SIGKILL)
    }

    pub(crate) fn record_exit(&self, record: ExitRecord) {
        let mut state = self.lock();
        let first = *state.exit.get_or_insert(record);
        let on_exit = state.on_exit.take();
        drop(state);
        self.changed.notify_all();
        if let Some(f) = on_exit {
            run_on_exit(f, first);
        }
    }

    /// Calls `f` with the exit record: now if it is known, else when it is recorded.
    fn on_exit(&self, f: OnExit) {
        let mut state = self.lock();
        match state.exit {
            Some(record) => {
                drop(state);
                run_on_exit(f, record);
            }
            None => state.on_exit = Some(f),
        }
    }

    pub(crate) fn record_stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    pub(crate) fn exit(&self) -> Option<ExitRecord> {
        self.lock().exit
    }

    /// Waits up to `timeout` for the zygote's report.
    pub(crate) fn wait_exit(&self, timeout: Duration) -> Option<ExitRecord> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        loop {
            if let Some(e) = state.exit {
                return Some(e);
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return None;
            }
            state = mayfly_sync::wait_timeout(&self.changed, state, left).0;
        }
    }

    /// Waits up to `timeout` for the zygote to report the clone stopped (or exited).
    pub(crate) fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        loop {
            if state.stopped || state.exit.is_some() {
                return true;
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return false;
            }
            state = mayfly_sync::wait_timeout(&self.changed, state, left).0;
        }
    }

    /// The [`DomainExit`] for a reported (or missing) record.
    pub(crate) fn domain_exit(&self, record: Option<ExitRecord>, cpu_limit: u64) -> DomainExit {
        exit_of(record, self.killed.load(Ordering::SeqCst), cpu_limit)
    }
}

/// Maps a reported exit to a [`DomainExit`].
///
/// - normal exit → `Exited`;
/// - `SIGKILL` the agent sent to a running clone → `Destroyed`;
/// - `SIGSYS` (seccomp `KILL_PROCESS`) → `ForbiddenSyscall`;
/// - `SIGXCPU`, or a `SIGKILL` nobody here sent after the clone used its CPU allowance (the
///   hard `RLIMIT_CPU`) → `ResourceLimit { "cpu time" }`; `SIGXFSZ` → `"file size"`;
/// - any other signal → `Crashed`. (An allocation over `RLIMIT_AS` makes Rust code abort:
///   `Crashed { SIGABRT }`.)
/// - no report (the zygote died) → `Destroyed` if the agent killed it, else `Crashed { 0 }`.
pub(crate) fn exit_of(
    record: Option<ExitRecord>,
    killed_by_agent: bool,
    cpu_limit: u64,
) -> DomainExit {
    let Some(record) = record else {
        return if killed_by_agent {
            DomainExit::Destroyed
        } else {
            DomainExit::Crashed { signal: 0 }
        };
    };
    match record.status {
        Status::Exited(code) => DomainExit::Exited { code },
        Status::Signaled(libc::SIGKILL) if killed_by_agent => DomainExit::Destroyed,
        Status::Signaled(libc::SIGSYS) => DomainExit::ForbiddenSyscall,
        Status::Signaled(libc::SIGXCPU) => DomainExit::ResourceLimit { limit: "cpu time" },
        Status::Signaled(libc::SIGKILL) if record.cpu >= Duration::from_secs(cpu_limit) => {
            DomainExit::ResourceLimit { limit: "cpu time" }
        }
        Status::Signaled(libc::SIGXFSZ) => DomainExit::ResourceLimit { limit: "file size" },
        Status::Signaled(signal) => DomainExit::Crashed { signal },
        Status::Lost if killed_by_agent => DomainExit::Destroyed,
        Status::Lost => DomainExit::Crashed { signal: 0 },
    }
}

/// The agent's notifier for one clone: the clone's eventfds, plus its pidfd so that a wait
/// returns [`Wake::PeerGone`] as soon as the clone has exited.
#[derive(Debug)]
pub(crate) struct CloneNotifier {
    bell: Arc<EventFdNotifier>,
    cell: Arc<CloneCell>,
}

impl CloneNotifier {
    pub(crate) fn new(bell: Arc<EventFdNotifier>, cell: Arc<CloneCell>) -> Self {
        Self { bell, cell }
    }
}

impl Notifier for CloneNotifier {
    fn notify(&self) -> Result<(), NotifyError> {
        self.bell.notify()
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        let bell = self.bell.wait_fd();
        let [rung, gone] =
            sys::wait_readable([bell, self.cell.pidfd.as_fd()], timeout).map_err(|source| {
                NotifyError::Wait {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&bell),
                    source,
                }
            })?;
        if rung {
            // Drain the eventfd (it is readable, so this does not wait).
            return match self.bell.wait(Some(Duration::ZERO))? {
                Wake::TimedOut => Ok(Wake::Notified), // drained by a racing reader
                other => Ok(other),
            };
        }
        if gone {
            return Ok(Wake::PeerGone);
        }
        Ok(Wake::TimedOut)
    }
}

/// Counters and settings a handle needs after it left the pool.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub logger: Logger,
    pub cpu_limit: u64,
    pub destroyed: AtomicU64,
    /// Rings (memfd and eventfds) of reaped clones, for the next clones (see [`SpareRing`]).
    pub spares: Mutex<Vec<SpareRing>>,
    /// Most rings kept in `spares`.
    pub spare_limit: usize,
}

impl Ctx {
    /// Keeps a reaped clone's ring for reuse, if there is room.
    fn keep_spare(&self, spare: SpareRing) {
        let mut spares = self
            .spares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if spares.len() < self.spare_limit {
            spares.push(spare);
        }
    }
}

/// What the agent made for one clone's ring and keeps for the next clone once this one has
/// been reaped: the memfd (mapped here) and both ends of its two eventfds. Creating them
/// costs `memfd_create`, `ftruncate`, seals, `mmap` and two `eventfd`s, and throwing them
/// away an `munmap` (a TLB shootdown in this multi-threaded process) and the memfd's
/// teardown. Reuse is only ever offered after the zygote reported the clone reaped (no
/// process maps the memfd or holds the eventfds any more); the taker wipes the memory
/// ([`MmapMem::zero_data`]) and drains the eventfds first.
///
/// "Reaped, so nothing maps it" rests on the clone having been unable to pass the memfd on
/// or to leave a process behind: it has no socket (closed before the guest runs; `socket`
/// is not in the seccomp allowlist), and `fork`, `vfork`, `clone3` and threads are not
/// allowed while `clone` with `fork`'s flags (which the zygote needs) is refused by the
/// kernel under `RLIMIT_NPROC` 0 and a uid of its own — both covered by the sandbox tests. A clone whose end was not reported by the zygote (`Lost`:
/// the zygote died) never gives its ring back.
#[derive(Debug)]
pub(crate) struct SpareRing {
    pub mem: Arc<MmapMem>,
    pub agent: Arc<EventFdNotifier>,
    pub guest: Arc<EventFdNotifier>,
}

/// The agent's side of one live clone. Dropping it kills the clone and waits (bounded)
/// until it has exited.
pub(crate) struct CloneHandle {
    pub cell: Arc<CloneCell>,
    pub ring: Ring,
    pub notifier: CloneNotifier,
    pub ready_id: u32,
    /// Whether it was counted as created (and so is counted as destroyed when it ends).
    pub ready: bool,
    /// Whether its `Ready` was read (`ready_id` is then valid).
    pub confirmed: bool,
    /// When it was requested from the zygote (its `Ready` is due `ready_timeout` later).
    pub requested: Instant,
    pub ctx: Arc<Ctx>,
    /// Its ring's parts, offered for reuse once it is reaped after a background destroy.
    pub spare: Option<SpareRing>,
    ended: Option<DomainExit>,
}

impl std::fmt::Debug for CloneHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneHandle")
            .field("id", &self.cell.id)
            .field("pid", &self.cell.pid)
            .field("ready_id", &self.ready_id)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl CloneHandle {
    pub(crate) fn new(
        cell: Arc<CloneCell>,
        ring: Ring,
        notifier: CloneNotifier,
        ctx: Arc<Ctx>,
    ) -> Self {
        Self {
            cell,
            ring,
            notifier,
            ready_id: 0,
            ready: false,
            confirmed: false,
            requested: Instant::now(),
            ctx,
            spare: None,
            ended: None,
        }
    }

    /// The exit if the clone has ended; never waits for a running clone. If the process has
    /// exited but the zygote's report is still on its way, waits for it (bounded).
    pub(crate) fn try_exit(&mut self) -> Result<Option<DomainExit>, CloneError> {
        if let Some(e) = self.ended {
            return Ok(Some(e));
        }
        let record = match self.cell.exit() {
            Some(r) => Some(r),
            None if self.cell.exited_within(Duration::ZERO)? => self.cell.wait_exit(REPORT_WAIT),
            None => return Ok(None),
        };
        Ok(Some(self.cell.domain_exit(record, self.ctx.cpu_limit)))
    }

    /// Kills the clone (if it still runs) and waits until it has exited; returns how it
    /// ended.
    pub(crate) fn terminate(&mut self) -> Result<DomainExit, CloneError> {
        if let Some(e) = self.ended {
            return Ok(e);
        }
        self.cell.kill()?;
        if !self.cell.exited_within(KILL_WAIT)? {
            return Err(CloneError::KillTimeout {
                clone_id: self.cell.id,
                pid: self.cell.pid,
                waited: KILL_WAIT,
            });
        }
        let record = self.cell.wait_exit(REPORT_WAIT);
        let exit = self.cell.domain_exit(record, self.ctx.cpu_limit);
        self.ended = Some(exit);
        if self.ready {
            self.ctx.destroyed.fetch_add(1, Ordering::Relaxed);
        }
        debug!(self.ctx.logger, "clone ended";
            "clone_id" => self.cell.id, "pid" => self.cell.pid, "exit" => %exit,
            "cpu_ms" => record.map_or(0, |r| r.cpu.as_millis()));
        Ok(exit)
    }

    /// Kills the clone (if it still runs) without waiting: `done` gets how it ended once
    /// the zygote has reaped it (on the supervisor thread, or on this one if that already
    /// happened). A failed kill is handed to `done` and the clone is destroyed, waiting, as a
    /// dropped handle is.
    pub(crate) fn terminate_in_background(
        mut self,
        done: Box<dyn FnOnce(Result<DomainExit, CloneError>) + Send>,
    ) {
        if let Some(e) = self.ended {
            return done(Ok(e));
        }
        if let Err(e) = self.cell.kill() {
            return done(Err(e)); // `Drop` tries again, and waits
        }
        // Killed: its end arrives through `done`, not through `Drop`.
        self.ended = Some(DomainExit::Destroyed);
        let (cell, ctx, ready) = (Arc::clone(&self.cell), Arc::clone(&self.ctx), self.ready);
        let spare = self.spare.take();
        drop(self); // our ring and notifier; `spare` keeps what can be reused
        let report = Arc::clone(&cell);
        cell.on_exit(Box::new(move |record| {
            // Only a reap the zygote reported proves that nothing maps the memfd or holds the
            // eventfds but us. `Lost` (zygote gone) is recorded right after a SIGKILL was
            // sent: the clone may still run, so its ring is never reused.
            if let (Some(spare), false) = (spare, record.status == Status::Lost) {
                ctx.keep_spare(spare);
            }
            let exit = report.domain_exit(Some(record), ctx.cpu_limit);
            if ready {
                ctx.destroyed.fetch_add(1, Ordering::Relaxed);
            }
            debug!(ctx.logger, "clone ended";
                "clone_id" => report.id, "pid" => report.pid, "exit" => %exit,
                "cpu_ms" => record.cpu.as_millis());
            done(Ok(exit));
        }));
    }

    /// `SIGSTOP`s the clone and waits until the zygote sees it stopped (or exited).
    pub(crate) fn stop(&self, wait: Duration) -> Result<(), CloneError> {
        self.cell.signal(libc::SIGSTOP)?;
        if !self.cell.wait_stopped(wait) {
            return Err(CloneError::StopTimeout {
                clone_id: self.cell.id,
                pid: self.cell.pid,
                waited: wait,
            });
        }
        Ok(())
    }
}

impl Drop for CloneHandle {
    fn drop(&mut self) {
        if self.ended.is_none() {
            if let Err(e) = self.terminate() {
                slog::error!(self.ctx.logger, "could not destroy a dropped clone";
                    "clone_id" => self.cell.id, "pid" => self.cell.pid, "error" => %e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(status: Status, cpu_s: u64) -> Option<ExitRecord> {
        Some(ExitRecord {
            status,
            cpu: Duration::from_secs(cpu_s),
        })
    }

    #[test]
    fn exits_map_to_domain_exits() {
        use DomainExit::*;
        assert_eq!(
            exit_of(rec(Status::Exited(3), 0), false, 10),
            Exited { code: 3 }
        );
        assert_eq!(
            exit_of(rec(Status::Exited(0), 0), true, 10),
            Exited { code: 0 }
        );
        assert_eq!(
            exit_of(rec(Status::Signaled(libc::SIGKILL), 0), true, 10),
            Destroyed
        );
        assert_eq!(
            exit_of(rec(Status::Signaled(libc::SIGSYS), 0), true, 10),
            ForbiddenSyscall
        );
        assert_eq!(
            exit_of(rec(Status::Signaled(libc::SIGXCPU), 10), false, 10),
            ResourceLimit { limit: "cpu time" }
        );
        assert_eq!(
            exit_of(rec(Status::Signaled(libc::SIGKILL), 11), false, 10),
            ResourceLimit { limit: "cpu time" }
        );
        assert_eq!(
            exit_of(rec(Status::Signaled(libc::SIGKILL), 1), false, 10),
            Crashed {
                signal: libc::SIGKILL
            }
        );
        assert_eq!(
            exit_of(rec(Status::Signaled(libc::SIGABRT), 0), false, 10),
            Crashed {
                signal: libc::SIGABRT
            }
        );
        assert_eq!(exit_of(rec(Status::Lost, 0), true, 10), Destroyed);
        assert_eq!(exit_of(None, false, 10), Crashed { signal: 0 });
    }
}
