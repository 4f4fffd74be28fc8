//! The exporter's ceiling on a replication primary: no audit record goes to a collector
//! before the standby holds it, unless it has waited too long.
//!
//! A record the primary exported and never replicated is the one thing a failover can make
//! inconsistent at the collector: the promoted standby writes *another* record under the
//! same sequence. So on a primary (a `[replication]` section) each exporter reads the audit
//! sequence the standby has acknowledged as durable ([`ReplicatedTip`], given by the agent;
//! this crate knows nothing of the replication protocol) and sends nothing past it:
//!
//! ```text
//!   audit chain   1 ......... replicated ......... sent ........ tip
//!                 └── may go out ──┘└─ waits for the standby, at most `unreplicated_hold_ms`
//! ```
//!
//! A record that has waited `unreplicated_hold_ms` (measured from the first time the
//! exporter saw it in the chain) is not held any longer: an **episode** begins. The
//! exporter first records `siem.export_unreplicated` (warning) in the chain and waits for it
//! to be durable, then sends everything up to the tip without waiting, each record past the
//! standby's tip marked `unreplicated="true"` in its chain element. The episode ends once
//! the standby holds the first record sent ahead (it is back, or caught up):
//! `siem.unreplicated_ended` (notice) with the range that went out ahead, and records wait
//! for the standby again. Both records are per collector.
//!
//! Held records are watched with a short queue of (tip, first seen) sightings, at most
//! [`SIGHTINGS`] of them at least `hold / 32` apart: a record's waiting time is counted
//! from the first sighting that covers it, which is never earlier than the record's real
//! arrival, so a record is held at least `hold` (and at most about `hold + hold / 32` plus
//! the exporter's poll interval) before it can go out ahead of the standby.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most tip sightings kept (a backlog older than the oldest counts from a later one).
pub const SIGHTINGS: usize = 64;

/// What the standby holds, as the exporter needs it. The agent implements it over the
/// replication primary's status.
pub trait ReplicatedTip: Send + Sync {
    /// The last audit sequence the standby has acknowledged as durable (0: none known).
    fn replicated_audit_seq(&self) -> u64;
    /// Where the standby is, in one line (for the audit records of an episode; cut to an
    /// audit field's 1,024 bytes by [`standby_field`]).
    fn describe(&self) -> String;
}

/// `tip.describe()` cut at a character boundary to what an audit field holds: a longer
/// value would make the ledger refuse the record, and an episode that cannot be recorded
/// never begins.
pub(crate) fn standby_field(tip: &dyn ReplicatedTip) -> String {
    let mut s = tip.describe();
    let max = mayfly_ledger::audit::MAX_FIELD_VALUE;
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end = end.saturating_sub(1);
        }
        s.truncate(end);
    }
    s
}

/// An episode: records going out ahead of the standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Episode {
    /// The first record that could go out ahead (the one that waited too long).
    pub from: u64,
    /// The last record sent ahead so far (`< from`: none yet).
    pub to: u64,
    /// When it began.
    pub since: Instant,
}

/// One collector's hold state.
pub(crate) struct Hold {
    pub tip: Arc<dyn ReplicatedTip>,
    pub hold: Duration,
    seen: VecDeque<(u64, Instant)>,
    pub episode: Option<Episode>,
    /// After a failed attempt to record the start of an episode: not before this.
    pub retry_at: Option<Instant>,
}

impl Hold {
    pub fn new(tip: Arc<dyn ReplicatedTip>, hold: Duration) -> Self {
        Self {
            tip,
            hold,
            seen: VecDeque::new(),
            episode: None,
            retry_at: None,
        }
    }

    /// Notes that the chain's tip is `tip` at `now`; forgets sightings of records up to
    /// `sent`.
    pub fn observe(&mut self, tip: u64, sent: u64, now: Instant) {
        while self.seen.front().is_some_and(|&(s, _)| s <= sent) {
            self.seen.pop_front();
        }
        if tip <= sent {
            return;
        }
        let fresh = match self.seen.back() {
            Some(&(s, _)) if s >= tip => false,
            Some(&(_, t)) => now.saturating_duration_since(t) >= self.hold / 32,
            None => true,
        };
        if fresh && self.seen.len() < SIGHTINGS {
            self.seen.push_back((tip, now));
        }
    }

    /// How long record `sent + 1` has waited (zero when it has not been seen).
    pub fn waited(&self, sent: u64, now: Instant) -> Duration {
        self.seen
            .iter()
            .find(|&&(s, _)| s > sent)
            .map_or(Duration::ZERO, |&(_, t)| now.saturating_duration_since(t))
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    struct Fixed;
    impl ReplicatedTip for Fixed {
        fn replicated_audit_seq(&self) -> u64 {
            0
        }
        fn describe(&self) -> String {
            String::new()
        }
    }

    #[test]
    fn a_record_waits_from_its_first_sighting() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut h = Hold::new(Arc::new(Fixed), ms(3200));
        h.observe(10, 5, t0);
        assert_eq!(h.waited(5, t0 + ms(1000)), ms(1000));
        // Records 11..=20 appear 50 ms later: within hold / 32 (100 ms) of the last
        // sighting, so they count from a later one.
        h.observe(20, 5, t0 + ms(50));
        h.observe(20, 5, t0 + ms(150));
        assert_eq!(h.waited(10, t0 + ms(1000)), ms(850));
        // Sent up to 10: the first sighting is forgotten.
        h.observe(20, 10, t0 + ms(200));
        assert_eq!(h.waited(10, t0 + ms(1000)), ms(850));
        // Nothing unsent: nothing waits.
        h.observe(20, 20, t0 + ms(300));
        assert_eq!(h.waited(20, t0 + ms(5000)), Duration::ZERO);
    }

    #[test]
    fn sightings_are_bounded_and_never_make_a_record_older() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut h = Hold::new(Arc::new(Fixed), ms(320));
        for k in 0..10_000u64 {
            h.observe(k + 1, 0, t0 + ms(10 * k));
        }
        assert!(h.seen.len() <= SIGHTINGS);
        // Every record's waiting time is at most its real age.
        for sent in [0u64, 100, 5_000, 9_999] {
            let now = t0 + ms(100_000);
            let real = now - (t0 + ms(10 * sent));
            assert!(h.waited(sent, now) <= real, "{sent}");
        }
    }
}
