//! [`SandboxDomain`]: one clone handed out for one transaction, from reading its `Ready`
//! to its destruction or quarantine.

use std::sync::Arc;
use std::time::Duration;

use mayfly_domain::{
    Destroyed, Domain, DomainError, DomainExit, DomainId, Quarantined, Refused, Ring,
};
use mayfly_ring::wire::PROTOCOL_VERSION;
use mayfly_ring::{Notifier, Request, RingError};
use slog::warn;

use crate::clone::CloneHandle;
use crate::sys;

use super::error::CreateError;
use super::pool::Shared;
use super::{BACKEND, DEMOTED_NICE, STOP_WAIT};

/// Whether a pooled clone could be handed out.
pub(super) enum Readiness {
    /// Its `Ready` was read.
    Ready,
    /// Not yet, and the caller's time is up; the clone is younger than `ready_timeout`, so
    /// it goes back to the pool, not counted as a failure.
    NotYet,
}

/// Reads a pooled clone's `Ready` (normally already there: no wait), waiting at most
/// `timeout`; a clone without `Ready` `ready_timeout` after it was requested has failed.
pub(super) fn confirm_ready(
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
            Request::Ready {
                protocol_version,
                handlers,
            } if protocol_version == PROTOCOL_VERSION => {
                let template = shared
                    .template_handlers
                    .get()
                    .map_or(&[][..], Vec::as_slice);
                if template != handlers.as_slice() {
                    return Err(CreateError::HandlersDiffer {
                        clone_id,
                        pid,
                        differs: mayfly_domain::handlers::ListDiffers::between(&handlers, template),
                    });
                }
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
    pub(super) handle: Option<CloneHandle>,
    pub(super) shared: Arc<Shared>,
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
    /// Sets the clone to nice 19 (among the clones of its cgroup, a spinning guest then
    /// gets a small fraction of what a clone at nice 0 gets) and moves it into the
    /// demoted clones' cgroup, whose CPU quota all demoted clones share
    /// (`cgroup::CgroupLimits::demoted_cpu_max_percent`). Called once per transaction.
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
        let pid = u32::try_from(pid).unwrap_or(0);
        sys::set_nice(pid, DEMOTED_NICE).map_err(|e| self.shared.domain_error(id, e))?;
        if let Some(group) = &self.shared.cgroup {
            group
                .demote(pid)
                .map_err(|e| self.shared.domain_error(id, e))?;
        }
        Ok(())
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
