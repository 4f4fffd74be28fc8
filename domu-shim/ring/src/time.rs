//! The monotonic clock the ring's timeouts are measured with.
//!
//! With the `std` feature (the default) this is [`std::time::Instant`]. Without it (the
//! freestanding guest kernel, `#![no_std]`), there is no operating system to ask, so the
//! embedder registers its clock once with [`set_clock`] (the Mayfly PV guest reads Xen's
//! system time). Until a clock is registered, time stands still at zero: a finite timeout
//! then never expires on its own, which is safe for the guest (the agent's deadline
//! destroys a domain that waits too long) but never silently shorter than asked.

#[cfg(feature = "std")]
pub use std::time::Instant;

#[cfg(not(feature = "std"))]
pub use freestanding::{set_clock, Instant};

#[cfg(not(feature = "std"))]
mod freestanding {
    use core::sync::atomic::{AtomicUsize, Ordering};
    use core::time::Duration;

    /// The registered clock, a `fn() -> u64` stored as an address (0: none).
    static CLOCK: AtomicUsize = AtomicUsize::new(0);

    /// Registers the clock: a function returning monotonic nanoseconds since any fixed
    /// origin. Later calls replace it (the guest sets it once, before the first ring call).
    pub fn set_clock(clock: fn() -> u64) {
        CLOCK.store(clock as usize, Ordering::Release);
    }

    fn now_ns() -> u64 {
        let raw = CLOCK.load(Ordering::Acquire);
        if raw == 0 {
            return 0;
        }
        // SAFETY: the only non-zero value ever stored in CLOCK is a `fn() -> u64` cast to
        // `usize` by `set_clock`; function pointers and `usize` have the same size on every
        // target this crate builds for, so the cast back yields that same function.
        #[allow(unsafe_code)]
        let clock = unsafe { core::mem::transmute::<usize, fn() -> u64>(raw) };
        clock()
    }

    /// A point in monotonic time, in nanoseconds of the registered clock.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub struct Instant(u64);

    impl Instant {
        /// The current time (zero while no clock is registered).
        pub fn now() -> Self {
            Self(now_ns())
        }

        /// `self + d`, or `None` if it does not fit.
        pub fn checked_add(&self, d: Duration) -> Option<Self> {
            let ns = u64::try_from(d.as_nanos()).ok()?;
            self.0.checked_add(ns).map(Self)
        }

        /// How long after `earlier` this is (zero if it is not after it).
        pub fn saturating_duration_since(&self, earlier: Self) -> Duration {
            Duration::from_nanos(self.0.saturating_sub(earlier.0))
        }

        /// How long ago this was.
        pub fn elapsed(&self) -> Duration {
            Self::now().saturating_duration_since(*self)
        }
    }
}
