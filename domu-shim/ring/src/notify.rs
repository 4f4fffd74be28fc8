//! Notifications between the two ends of a ring.
//!
//! A [`Notifier`] is one end's view of a bidirectional doorbell: [`notify`](Notifier::notify)
//! rings the peer, [`wait`](Notifier::wait) sleeps until the peer rings (or a timeout).
//! Notifications coalesce and may be spurious: after waking, a side always re-checks the
//! ring, and before sleeping it does the ring's "final check" (see [`crate::ring`]).
//!
//! [`EventFdNotifier`] implements it with two eventfds, one per direction, for the sandbox
//! backend; [`crate::xen::EvtchnNotifier`] implements it over a Xen interdomain event channel.
//!
//! A hostile peer that holds the same eventfds can write to or read from either of them.
//! That only causes spurious wake-ups or lost wake-ups on *its own* side, or spurious
//! wake-ups on ours, which the ring's re-checks and the caller's timeout absorb: `notify`
//! treats a saturated counter as "already signalled" and never blocks, and `wait` returns
//! when its timeout expires.

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]

use core::time::Duration;
#[cfg(feature = "std")]
use std::io;

#[cfg(feature = "std")]
mod eventfd;

#[cfg(feature = "std")]
pub(crate) use eventfd::poll_readable;
#[cfg(feature = "std")]
pub use eventfd::EventFdNotifier;

/// Why [`Notifier::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The peer notified (or the wake-up was spurious): re-check the ring.
    Notified,
    /// The timeout expired without a notification.
    TimedOut,
    /// The peer is gone (its process exited or its domain was destroyed): nothing more
    /// will arrive. Only notifiers that can watch the peer's liveness return this.
    PeerGone,
}

/// A notification could not be sent or waited for.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `eventfd` failed.
    #[cfg(feature = "std")]
    #[error("eventfd creation failed")]
    Create(#[source] io::Error),
    /// Duplicating an eventfd failed.
    #[cfg(feature = "std")]
    #[error("duplicating an eventfd failed")]
    Dup(#[source] io::Error),
    /// Writing the peer's eventfd failed.
    #[cfg(feature = "std")]
    #[error("signalling eventfd {fd} failed")]
    Signal {
        /// The fd.
        fd: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Polling or reading our eventfd failed.
    #[cfg(feature = "std")]
    #[error("waiting on eventfd {fd} failed")]
    Wait {
        /// The fd.
        fd: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `poll` reported the fd invalid or in error.
    #[cfg(feature = "std")]
    #[error("eventfd {fd} reported poll events {revents:#x}")]
    BadFd {
        /// The fd.
        fd: i32,
        /// The `revents` reported.
        revents: i16,
    },
    /// A hypercall of a freestanding guest's notifier failed (`op` names it, `rc` is Xen's
    /// negative errno).
    #[error("hypercall {op} failed with {rc}")]
    Hypercall {
        /// The operation, e.g. `"EVTCHNOP_send"`.
        op: &'static str,
        /// Xen's return code.
        rc: i64,
    },
}

/// One end of a ring's doorbell.
pub trait Notifier {
    /// Signals the peer. Never blocks.
    fn notify(&self) -> Result<(), NotifyError>;

    /// Waits until the peer signals or `timeout` expires (`None`: wait forever). May return
    /// [`Wake::Notified`] spuriously.
    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, NotifyError>;
}

impl<N: Notifier + ?Sized> Notifier for &N {
    fn notify(&self) -> Result<(), NotifyError> {
        (**self).notify()
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        (**self).wait(timeout)
    }
}
