//! Counters of the group committer, for `GET /metrics`: how many jobs each durable group
//! carried, how long its LMDB commit (the fsync) took, and how many groups failed.
//!
//! The committer thread is the only writer; it records a group with a handful of relaxed
//! atomic increments (no lock, no allocation). Readers take a [`GroupStats`] snapshot.
//! Each histogram keeps one counter per bucket (not cumulative) plus an overflow counter,
//! so its count is the sum of its buckets by construction and a snapshot is always a valid
//! histogram, even when it races a group being recorded.
//!
//! Vocabulary: a leaf module (it uses no other module of the crate).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the jobs-per-group histogram (a group above the last is counted only in
/// `+Inf`).
pub const GROUP_JOB_BOUNDS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Upper bounds of the commit-time histogram, nanoseconds: 0.5 ms, 1 ms, 2.5 ms, 5 ms,
/// 10 ms, 25 ms, 50 ms, 100 ms, 250 ms, 500 ms, 1 s.
pub const COMMIT_NS_BOUNDS: [u64; 11] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// The live counters, shared between the committer (writer) and the ledger handle.
#[derive(Debug, Default)]
pub(crate) struct GroupCounters {
    /// Groups by jobs, one slot per bound of [`GROUP_JOB_BOUNDS`], then the overflow.
    jobs: [AtomicU64; GROUP_JOB_BOUNDS.len() + 1],
    jobs_sum: AtomicU64,
    /// Groups by commit time, one slot per bound of [`COMMIT_NS_BOUNDS`], then the overflow.
    commit: [AtomicU64; COMMIT_NS_BOUNDS.len() + 1],
    commit_sum_ns: AtomicU64,
    failed: AtomicU64,
}

/// Index of the first bound `v` is at or below; `bounds.len()` (the overflow slot) if none.
fn slot(bounds: &[u64], v: u64) -> usize {
    bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len())
}

fn bump(counters: &[AtomicU64], i: usize) {
    if let Some(c) = counters.get(i) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl GroupCounters {
    /// Records a group of `jobs` jobs whose LMDB commit took `commit`.
    pub(crate) fn committed(&self, jobs: usize, commit: Duration) {
        let jobs = u64::try_from(jobs).unwrap_or(u64::MAX);
        let ns = u64::try_from(commit.as_nanos()).unwrap_or(u64::MAX);
        bump(&self.jobs, slot(&GROUP_JOB_BOUNDS, jobs));
        self.jobs_sum.fetch_add(jobs, Ordering::Relaxed);
        bump(&self.commit, slot(&COMMIT_NS_BOUNDS, ns));
        self.commit_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Records a group abandoned for a storage failure.
    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as they are now.
    pub(crate) fn snapshot(&self) -> GroupStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GroupStats {
            jobs: Histogram::from_slots(&GROUP_JOB_BOUNDS, &self.jobs, get(&self.jobs_sum)),
            commit_ns: Histogram::from_slots(
                &COMMIT_NS_BOUNDS,
                &self.commit,
                get(&self.commit_sum_ns),
            ),
            failed: get(&self.failed),
        }
    }
}

/// A histogram read from the counters, in the cumulative form Prometheus exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram<const N: usize> {
    /// Upper bounds.
    pub bounds: [u64; N],
    /// Observations at or below each bound (cumulative, non-decreasing).
    pub cumulative: [u64; N],
    /// All observations (the `+Inf` bucket, at least the last cumulative count).
    pub count: u64,
    /// Sum of the observed values.
    pub sum: u64,
}

impl<const N: usize> Histogram<N> {
    fn from_slots(bounds: &[u64; N], slots: &[AtomicU64], sum: u64) -> Self {
        let mut cumulative = [0u64; N];
        let mut running = 0u64;
        let mut read = slots.iter().map(|a| a.load(Ordering::Relaxed));
        for c in &mut cumulative {
            running = running.saturating_add(read.next().unwrap_or(0));
            *c = running;
        }
        // What remains is the overflow slot.
        let count = read.fold(running, u64::saturating_add);
        Self {
            bounds: *bounds,
            cumulative,
            count,
            sum,
        }
    }
}

/// What the group committer has done since the ledger was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    /// Jobs (transactions, rollbacks, admin nonces, audit batches) per durable group; its
    /// `count` is the number of groups committed. A group whose every job was rejected
    /// (conflicts) writes nothing, has no commit and is not counted.
    pub jobs: Histogram<{ GROUP_JOB_BOUNDS.len() }>,
    /// Time of each durable group's LMDB commit (its fsync), nanoseconds.
    pub commit_ns: Histogram<{ COMMIT_NS_BOUNDS.len() }>,
    /// Groups abandoned for a storage failure (disk or map full, I/O error): every job in
    /// them got the error. A group retried while storage is full counts at every attempt.
    pub failed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let c = GroupCounters::default();
        for jobs in [1, 2, 3, 128, 129, 5000] {
            c.committed(jobs, Duration::from_micros(500));
        }
        c.committed(1, Duration::from_micros(501));
        c.committed(1, Duration::from_secs(2));
        c.failed();
        let s = c.snapshot();
        assert_eq!(s.jobs.cumulative, [3, 4, 5, 5, 5, 5, 5, 6]);
        assert_eq!(s.jobs.count, 8);
        assert_eq!(s.jobs.sum, 1 + 2 + 3 + 128 + 129 + 5000 + 2);
        assert_eq!(s.commit_ns.cumulative, [6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
        assert_eq!(s.commit_ns.count, 8);
        assert_eq!(s.commit_ns.sum, 6 * 500_000 + 501_000 + 2_000_000_000);
        assert_eq!(s.failed, 1);
    }
}
