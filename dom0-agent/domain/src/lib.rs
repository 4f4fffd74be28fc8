//! The contract between the transaction executor and the domain backends.
//!
//! A **domain** is a fresh, single-use execution environment cloned from a clean template:
//! a PV domU on Xen, a confined forked process in the sandbox. A backend keeps a pool of
//! domains that have booted to the guest runtime's ready point — the guest has sent its
//! `Ready` request on the ring and waits for the answer — and hands one out per
//! transaction. The executor answers `Ready` with `Start`, serves the guest's requests,
//! and destroys the domain on every path.
//!
//! ```text
//!   backend pool ──take()──▶ Box<dyn Domain> ──ring()──▶ executor ──destroy()──▶ gone
//!   (refilled in background)      │ ready_id()             serves requests
//!                                 └ try_exit(): crashed? forbidden syscall?
//! ```
//!
//! Every implementation must guarantee: a domain is used for exactly one transaction;
//! `destroy` returns only once the domain can no longer run; a domain dropped without
//! `destroy` (panic, early return) is destroyed by its `Drop`; and the notifier returned by
//! `ring` reports [`mayfly_ring::Wake::PeerGone`] when the domain dies, so the executor
//! notices a crash at once instead of at its timeout.
//!
//! The scaffolding both backends share lives here too: the bounded [`quarantine`], the
//! refill [`backoff`], and [`ErrorChain`] for logging an error with its sources. (The pool
//! itself is not shared: the Xen backend's refill threads build a domain synchronously, while
//! the sandbox's send the zygote a request and a supervisor thread pools the answer, so the
//! two refill loops wait on different things.)

#![forbid(unsafe_code)]

pub mod backoff;
pub mod handlers;
pub mod quarantine;

pub use backoff::Backoff;
pub use handlers::{LearnedHandlers, Violation, ViolationSink};
pub use quarantine::{Quarantine, QuarantineFull, Refused, MAX_QUARANTINED};

use std::sync::Arc;
use std::time::Duration;

use mayfly_ring::{Notifier, SharedMem};

/// A domain's id: the Xen domid, or the sandbox's clone number.
pub type DomainId = u32;

/// The agent's end of a domain's ring.
pub type Ring = mayfly_ring::Backend<Arc<dyn SharedMem>>;

/// How a domain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainExit {
    /// The guest runtime exited by itself with this status (0: a transaction's normal end).
    Exited {
        /// Exit status.
        code: i32,
    },
    /// The agent destroyed it.
    Destroyed,
    /// It died on a fault it did not ask for (SIGSEGV, SIGABRT, a Xen domain crash).
    Crashed {
        /// The signal (sandbox) or 0 (Xen crash).
        signal: i32,
    },
    /// It was killed for a forbidden system call (sandbox seccomp filter).
    ForbiddenSyscall,
    /// It was killed for exceeding a resource limit.
    ResourceLimit {
        /// Which limit, e.g. "cpu time".
        limit: &'static str,
    },
    /// It was stopped and kept for forensics instead of being destroyed.
    Quarantined,
}

impl std::fmt::Display for DomainExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited { code } => write!(f, "exited with status {code}"),
            Self::Destroyed => f.write_str("destroyed"),
            Self::Crashed { signal } => write!(f, "crashed (signal {signal})"),
            Self::ForbiddenSyscall => f.write_str("killed for a forbidden system call"),
            Self::ResourceLimit { limit } => write!(f, "killed for exceeding its {limit} limit"),
            Self::Quarantined => f.write_str("quarantined (stopped, kept for forensics)"),
        }
    }
}

/// Why a backend could not provide or manage a domain.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// No ready domain within the wait allowed.
    #[error("{backend}: no ready domain within {waited:?}")]
    Exhausted {
        /// Backend name.
        backend: &'static str,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The backend has been shut down.
    #[error("{backend}: shut down")]
    ShutDown {
        /// Backend name.
        backend: &'static str,
    },
    /// A new domain could not be created or did not reach its ready point.
    #[error("{backend}: creating a domain failed: {source}")]
    Create {
        /// Backend name.
        backend: &'static str,
        /// The underlying failure.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A domain could not be destroyed or inspected.
    #[error("{backend}: domain {id}: {source}")]
    Control {
        /// Backend name.
        backend: &'static str,
        /// Domain.
        id: DomainId,
        /// The underlying failure.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl DomainError {
    /// [`DomainError::Control`]: domain `id` of `backend` could not be destroyed or
    /// inspected because of `source`.
    pub fn control(
        backend: &'static str,
        id: DomainId,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Control {
            backend,
            id,
            source: Box::new(source),
        }
    }
}

/// One fresh domain, ready to run one transaction.
pub trait Domain: Send {
    /// Its id.
    fn id(&self) -> DomainId;
    /// How operators and tests find the domain outside the agent: the sandbox clone's host
    /// pid, the Xen domid. Recorded in the audit log.
    fn handle(&self) -> String {
        self.id().to_string()
    }
    /// The request id of the guest's `Ready`, to be answered with `Start`.
    fn ready_id(&self) -> u32;
    /// The agent's ring endpoint and the notifier shared with the guest.
    fn ring(&mut self) -> (&mut Ring, &dyn Notifier);
    /// The exit, if the domain has already ended; never blocks.
    fn try_exit(&mut self) -> Result<Option<DomainExit>, DomainError>;
    /// Destroys the domain and waits until it can no longer run. If it had already ended,
    /// returns how.
    fn destroy(self: Box<Self>) -> Result<DomainExit, DomainError>;
    /// Stops the domain and keeps it for forensics instead of destroying it.
    fn quarantine(self: Box<Self>) -> Result<Quarantined, DomainError>;
    /// Lowers the domain's CPU priority: its transaction has run long (a spinning guest),
    /// so domains whose transactions are short go first. Backends without priorities do
    /// nothing (the default).
    fn demote(&mut self) -> Result<(), DomainError> {
        Ok(())
    }
    /// Whether [`Domain::destroy_in_background`] returns without waiting for the domain to
    /// end (so a caller need not hand the destruction to a thread of its own).
    fn destroys_in_background(&self) -> bool {
        false
    }
    /// Destroys the domain; `done` receives what [`Domain::destroy`] would have returned,
    /// once the domain can no longer run — on a thread of the backend, or on this one before
    /// returning. The default destroys here, waiting.
    fn destroy_in_background(self: Box<Self>, done: Destroyed) {
        done(self.destroy());
    }
}

/// What [`Domain::destroy_in_background`] calls when the domain is gone. It may run on a
/// backend's internal thread: it must not wait for anything the backend does.
pub type Destroyed = Box<dyn FnOnce(Result<DomainExit, DomainError>) + Send>;

/// A domain kept stopped for forensics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Backend name.
    pub backend: &'static str,
    /// Domain id.
    pub id: DomainId,
    /// Backend-specific handle (the sandbox's host pid, the Xen domid), for operators.
    pub handle: String,
}

/// Counters of a backend's pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Domains waiting in the pool to be handed out (the sandbox reads a clone's `Ready` as it
    /// hands it out).
    pub ready: usize,
    /// Domains handed out and not yet destroyed.
    pub in_use: usize,
    /// Domains created since start.
    pub created: u64,
    /// Domains destroyed since start.
    pub destroyed: u64,
    /// Domains that failed to reach their ready point.
    pub failed: u64,
}

/// A source of fresh domains.
pub trait DomainBackend: Send + Sync {
    /// Short name: "sandbox", "xen".
    fn name(&self) -> &'static str;
    /// The names of the handlers its guests answer to, sorted, as the guest side announced
    /// them (the sandbox's template; the Xen pool's first ready guest, in its ring `Ready`,
    /// every later guest held to the same list): the executor refuses a
    /// transaction for any other handler, and the agent refuses to start with a policy that
    /// grants capabilities to a handler not among them. The default, none, suits test
    /// doubles that run no guest; a backend that runs guests reports its own.
    fn handlers(&self) -> Vec<String> {
        Vec::new()
    }
    /// A fresh domain at its ready point, waiting at most `timeout` for one.
    fn take(&self, timeout: Duration) -> Result<Box<dyn Domain>, DomainError>;
    /// Pool counters.
    fn stats(&self) -> PoolStats;
    /// The domains kept stopped for forensics by [`Domain::quarantine`], still held by the
    /// backend until an operator releases them.
    fn quarantined(&self) -> Vec<Quarantined>;
    /// Destroys a quarantined domain (after forensics); `Ok(None)` if there is no such
    /// quarantined domain.
    fn release_quarantined(&self, id: DomainId) -> Result<Option<DomainExit>, DomainError>;
    /// Destroys every domain, ready or in use, and stops refilling.
    fn shutdown(&self);
}

/// Displays an error followed by its sources, `: `-separated (for log lines, which show
/// one string).
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn error_chain_shows_every_source_in_order() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(ErrorChain(&e).to_string(), "outer: middle: inner");
        assert_eq!(
            ErrorChain(&Middle(std::io::Error::other("x"))).to_string(),
            "middle: x"
        );
    }
}
