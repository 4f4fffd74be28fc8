//! Exponential back-off of a backend's refill after failed domain creations.
//!
//! The delay after the n-th failure in a row is `min · 2^(n-1)`, capped at `max`; a success
//! ends the run of failures. Each backend states its own bounds: a clone that fails to fork
//! is cheap to retry (the sandbox: 50 ms to 5 s), a Xen build is not (100 ms to 10 s). The
//! bounds are what an operator can rely on: after a failure the backend tries again within
//! `max`, and never sooner than `min`.

use std::time::Duration;

/// Doublings past which the delay stops growing (2^16 · `min` is past any sane `max`); keeps
/// the arithmetic bounded however long failures go on.
const MAX_DOUBLINGS: u32 = 16;

/// A run of failures and the delay it earns. `Copy`: a backend keeps it in its pool state
/// (shared) or in a refill thread (per thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Delays from `min`, doubling per failure in a row, never over `max` (a `max` below
    /// `min` is taken as `min`).
    pub const fn new(min: Duration, max: Duration) -> Self {
        let max = if max.as_nanos() < min.as_nanos() {
            min
        } else {
            max
        };
        Self {
            min,
            max,
            failures: 0,
        }
    }

    /// Records one more failure and returns how long to wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.delay()
    }

    /// Records a success: the next failure waits `min` again. Returns whether failures had
    /// been running (so a caller can wake whoever waits out the delay).
    pub fn succeeded(&mut self) -> bool {
        std::mem::replace(&mut self.failures, 0) != 0
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The delay the current run of failures earns (zero when there is none).
    pub fn delay(&self) -> Duration {
        let Some(doublings) = self.failures.checked_sub(1) else {
            return Duration::ZERO;
        };
        self.min
            .saturating_mul(1u32 << doublings.min(MAX_DOUBLINGS))
            .min(self.max)
    }

    /// The bounds `(min, max)`.
    pub fn bounds(&self) -> (Duration, Duration) {
        (self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_min_per_failure_and_stops_at_max() {
        let mut b = Backoff::new(MS * 50, Duration::from_secs(5));
        assert_eq!(b.delay(), Duration::ZERO);
        let delays: Vec<Duration> = (0..9).map(|_| b.failed()).collect();
        assert_eq!(
            delays,
            [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000].map(|m| MS * m)
        );
        assert_eq!(b.failures(), 9);
    }

    #[test]
    fn a_success_starts_over_and_says_whether_failures_ran() {
        let mut b = Backoff::new(MS * 100, Duration::from_secs(10));
        assert!(!b.succeeded());
        b.failed();
        b.failed();
        assert!(b.succeeded());
        assert_eq!(b.failures(), 0);
        assert_eq!(b.failed(), MS * 100);
    }

    #[test]
    fn endless_failures_stay_bounded_and_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..100_000 {
            b.failed();
        }
        assert_eq!(b.delay(), Duration::from_secs(1 << MAX_DOUBLINGS));
        let mut capped = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(capped.failed(), Duration::MAX);
        assert_eq!(capped.failed(), Duration::MAX);
    }

    #[test]
    fn a_max_below_min_is_min() {
        let mut b = Backoff::new(MS * 200, MS * 10);
        assert_eq!(b.bounds(), (MS * 200, MS * 200));
        assert_eq!(b.failed(), MS * 200);
        assert_eq!(b.failed(), MS * 200);
    }
}
