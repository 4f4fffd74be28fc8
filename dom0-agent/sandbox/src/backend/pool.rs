//! What the sandbox's threads share: the pool of forked clones, the requests out to the
//! zygote, the counters, and the accounting of failures (back-off) and top-ups.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use mayfly_domain::{Backoff, DomainError, DomainId, ErrorChain, Quarantine, Ring};
use mayfly_ring::EventFdNotifier;
use mayfly_sync::lock;
use slog::{error, Logger};

use crate::clone::{CloneCell, CloneHandle, Ctx, SpareRing};
use crate::config::SandboxConfig;

use super::error::CreateError;
use super::refill::request;
use super::BACKEND;

/// A clone requested from the zygote and not yet reported forked: the agent's end of its
/// ring, kept until the zygote's `Spawned` names it.
pub(super) struct PendingClone {
    pub(super) ring: Ring,
    pub(super) bell: Arc<EventFdNotifier>,
    /// The ring's parts, for reuse after the clone (see [`SpareRing`]).
    pub(super) spare: SpareRing,
    pub(super) requested: Instant,
}

pub(super) struct PoolState {
    /// Forked clones, oldest first. Their `Ready` is read when one is taken (it is normally
    /// long there by then), so no thread waits for it.
    pub(super) ready: VecDeque<CloneHandle>,
    /// Clones requested from the zygote and not yet reported forked.
    pub(super) creating: usize,
    /// Failures in a row (a fork refused, a clone dead or silent before `Ready`); the refill
    /// threads back off while there are any.
    pub(super) backoff: Backoff,
    /// No new request before this instant (back-off after failures).
    pub(super) backoff_until: Option<Instant>,
    pub(super) in_use: usize,
    pub(super) quarantined: Quarantine<CloneHandle>,
    pub(super) shut_down: bool,
    pub(super) zygote_gone: bool,
}

/// What every thread of one sandbox shares.
pub(super) struct Shared {
    pub(super) config: SandboxConfig,
    pub(super) logger: Logger,
    pub(super) ctx: Arc<Ctx>,
    pub(super) control: OwnedFd,
    pub(super) state: Mutex<PoolState>,
    /// The pool changed for takers: a clone pooled, a slot released, shut down.
    pub(super) changed: Condvar,
    /// The refill threads have something to do: the pool more than one clone short, a
    /// back-off started or over, shut down. (They also wake every `ready_timeout` to expire
    /// unanswered requests.)
    pub(super) refill_wanted: Condvar,
    /// Clones forked and not yet reported ended, by id.
    pub(super) registry: Mutex<HashMap<u32, Arc<CloneCell>>>,
    /// Clone requests awaiting the zygote's answer, by id.
    pub(super) pending: Mutex<HashMap<u32, PendingClone>>,
    /// The uids this sandbox's clones run as (its claim on them lasts as long as this).
    pub(super) uids: crate::uids::UidClaim,
    pub(super) next_id: AtomicU32,
    pub(super) created: AtomicU64,
    pub(super) failed: AtomicU64,
    /// Clones given a reaped clone's ring (wiped) instead of a new one.
    pub(super) rings_reused: AtomicU64,
    /// The control group of the zygote and its clones, if limits are on.
    pub(super) cgroup: Option<crate::cgroup::ClonesGroup>,
    /// The handlers the template announced on the control socket (sorted, no duplicates),
    /// set once before any clone is requested: every clone's ring `Ready` must announce
    /// exactly these.
    pub(super) template_handlers: std::sync::OnceLock<Vec<String>>,
    /// Where a clone announcing other handlers is reported (the agent audits it).
    pub(super) violations: mayfly_domain::ViolationSink,
}

impl Shared {
    pub(super) fn pool(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    /// A clone could not be made ready: count it, log it, and make the refill threads back
    /// off (doubling with each failure in a row).
    pub(super) fn creation_failed(&self, error: &CreateError) {
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
    pub(super) fn top_up(&self) {
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
    pub(super) fn creation_succeeded(&self) {
        let mut state = self.pool();
        if state.backoff.succeeded() {
            state.backoff_until = None;
            drop(state);
            self.refill_wanted.notify_all();
        }
    }

    pub(super) fn domain_error(
        &self,
        id: DomainId,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> DomainError {
        DomainError::control(BACKEND, id, e)
    }
}
