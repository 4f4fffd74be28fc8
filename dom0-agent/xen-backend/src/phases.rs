//! Where a fresh-domain transaction's time goes, counted by the backend itself: the time
//! of each phase of a domain's life summed over all domains, with the number of times it
//! was measured. The agent shows the totals in `GET /metrics`
//! (`mayfly_xen_phase_seconds_{sum,count}{phase=...}`), so a load run reads the breakdown
//! as the difference of two scrapes (tests/xen-qemu/agent-mayfly.sh does).
//!
//! ```text
//!  refill thread:  build ──▶ boot (unpause → Ready) ──▶ pooled, paused
//!  transaction:    wait (take(): until a ready domain is handed out, unpause included)
//!                  ──▶ in_use (handed out → destroy(): Start, the handler's ring round
//!                  trips, the commit, the answer) ──▶ destroy (xc_domain_destroy, grants
//!                  and the port released)
//! ```
//!
//! The in-process builds of the Mayfly guest also count their steps
//! (`mayfly_xen::pvbuild::BUILD_STEPS`: `mayfly_xen_build_step_seconds_sum{step=...}`).
//!
//! Each record is two relaxed atomic additions: cheap enough to stay on in production.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mayfly_xen::pvbuild::BUILD_STEPS;

/// A phase of a domain's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Building the domain: `xl create -p` for the Linux guest, the in-process builder
    /// (`PvBuilder`, the ring's grants, the port, the boot info) for the Mayfly guest.
    Build,
    /// From the first unpause to the guest's `Ready` on the ring, and the pause after it.
    Boot,
    /// A caller's wait in `take()` until a ready domain is handed out (its unpause
    /// included): zero-ish while the pool keeps up, the refill rate's shortfall when not.
    Wait,
    /// From the hand-out to `destroy()`: the transaction on the ring and what the agent
    /// does before it ends the domain.
    InUse,
    /// Destroying a handed-out domain and releasing its ring's grants and port.
    Destroy,
}

impl Phase {
    /// Every phase, in the order above.
    pub const ALL: [Phase; 5] = [
        Phase::Build,
        Phase::Boot,
        Phase::Wait,
        Phase::InUse,
        Phase::Destroy,
    ];

    /// The `phase` label.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Build => "build",
            Phase::Boot => "boot",
            Phase::Wait => "wait",
            Phase::InUse => "in_use",
            Phase::Destroy => "destroy",
        }
    }

    fn index(self) -> usize {
        match self {
            Phase::Build => 0,
            Phase::Boot => 1,
            Phase::Wait => 2,
            Phase::InUse => 3,
            Phase::Destroy => 4,
        }
    }
}

/// A phase's totals since the backend started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseTotal {
    /// The phase.
    pub phase: Phase,
    /// Times it was measured.
    pub count: u64,
    /// Their sum, in microseconds.
    pub sum_us: u64,
}

/// The counters (one pair per phase), and the in-process builds' steps.
#[derive(Debug, Default)]
pub struct Phases {
    count: [AtomicU64; 5],
    sum_us: [AtomicU64; 5],
    builds: AtomicU64,
    step_us: [AtomicU64; BUILD_STEPS.len()],
}

impl Phases {
    /// Adds one measurement of `phase`.
    pub fn record(&self, phase: Phase, took: Duration) {
        let i = phase.index();
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.count[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us[i].fetch_add(us, Ordering::Relaxed);
    }

    /// Adds the steps of one in-process build (`mayfly_xen::BuiltDomain::steps`).
    pub fn record_steps(&self, steps: &[Duration; BUILD_STEPS.len()]) {
        self.builds.fetch_add(1, Ordering::Relaxed);
        for (sum, took) in self.step_us.iter().zip(steps) {
            let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            sum.fetch_add(us, Ordering::Relaxed);
        }
    }

    /// The in-process builds counted, and the sum of each step in microseconds, in
    /// [`BUILD_STEPS`]' order.
    pub fn steps(&self) -> (u64, [(&'static str, u64); BUILD_STEPS.len()]) {
        let mut sums = BUILD_STEPS.map(|name| (name, 0));
        for (out, sum) in sums.iter_mut().zip(&self.step_us) {
            out.1 = sum.load(Ordering::Relaxed);
        }
        (self.builds.load(Ordering::Relaxed), sums)
    }

    /// The totals of every phase, in [`Phase::ALL`]'s order.
    pub fn totals(&self) -> Vec<PhaseTotal> {
        Phase::ALL
            .iter()
            .map(|&phase| PhaseTotal {
                phase,
                count: self.count[phase.index()].load(Ordering::Relaxed),
                sum_us: self.sum_us[phase.index()].load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_sums_its_own_measurements() {
        let p = Phases::default();
        p.record(Phase::Build, Duration::from_millis(80));
        p.record(Phase::Build, Duration::from_millis(20));
        p.record(Phase::Wait, Duration::from_micros(7));
        let t = p.totals();
        let names: Vec<_> = t.iter().map(|x| x.phase.name()).collect();
        assert_eq!(names, ["build", "boot", "wait", "in_use", "destroy"]);
        assert_eq!((t[0].count, t[0].sum_us), (2, 100_000));
        assert_eq!((t[1].count, t[1].sum_us), (0, 0));
        assert_eq!((t[2].count, t[2].sum_us), (1, 7));
        assert_eq!((t[3].count, t[4].count), (0, 0));
    }

    #[test]
    fn build_steps_add_up_by_name() {
        let p = Phases::default();
        let mut steps = [Duration::ZERO; BUILD_STEPS.len()];
        steps[0] = Duration::from_micros(5);
        steps[4] = Duration::from_millis(3);
        p.record_steps(&steps);
        p.record_steps(&steps);
        let (builds, sums) = p.steps();
        assert_eq!(builds, 2);
        assert_eq!(sums[0], ("create", 10));
        assert_eq!(sums[4], ("load", 6_000));
        assert_eq!(sums[1], ("boot_info", 0));
    }
}
