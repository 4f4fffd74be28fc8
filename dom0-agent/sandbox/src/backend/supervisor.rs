//! The supervisor thread: spawns the zygote, runs the start-up handshake, then dispatches
//! the zygote's reports (clones forked, failed, ended, stopped) until the zygote is gone.

use std::os::fd::{AsFd, OwnedFd};
use std::process::Child;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use mayfly_sync::lock;
use slog::{debug, error, warn};

use crate::clone::{CloneCell, CloneHandle, CloneNotifier, ExitRecord, Status};
use crate::spawn::{self};
use crate::sys;
use mayfly_sandbox_proto::{self as proto, Msg, ProtoError, Settings};

use super::error::{CreateError, SandboxError};
use super::pool::Shared;
use super::{Started, ZYGOTE_NICE};

/// The supervisor thread: spawns the zygote, reports start-up, then dispatches its reports.
pub(super) fn supervise(
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
        Ok((pidfd, mut handlers)) => {
            handlers.sort_unstable();
            handlers.dedup();
            let _ = shared.template_handlers.set(handlers.clone());
            let up = Started {
                pid,
                pidfd,
                handlers,
            };
            if started.send(Ok(up)).is_err() {
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

/// Sends Configure and waits for Ready; returns the zygote's pidfd and the handlers the
/// template announced.
pub(super) fn handshake(
    shared: &Shared,
    child: &mut Child,
    settings: Settings,
) -> Result<(OwnedFd, Vec<String>), SandboxError> {
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
    // The one message larger than the usual receive buffer: into one of its own.
    let mut buf = vec![0u8; proto::READY_BUF_LEN];
    match proto::recv_in(shared.control.as_fd(), &mut buf).map_err(control)? {
        Some((Msg::Ready { handlers, .. }, _)) => Ok((pidfd, handlers)),
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

pub(super) fn dispatch(shared: &Shared, msg: Msg, fds: crate::sys::ScmFds) {
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

pub(super) fn finished(shared: &Shared, clone_id: u32, status: Status, cpu_ms: u32) {
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
pub(super) fn zygote_gone(shared: &Shared) {
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
