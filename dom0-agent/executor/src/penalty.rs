//! The per-client penalty (`[engine] penalty_after` of the policy bundle): a client whose
//! transactions keep ending in hostile domain events (protocol violation, forbidden system
//! call, crash, timeout, limit) has its concurrency share cut for a while.
//!
//! [`Penalties`] counts each client's hostile endings in a fixed window that opens with the
//! first one; the `after`-th within the window starts a penalty of `duration_ms` from that
//! moment, and the count starts again: `after` more within a window during the penalty
//! renew it from the last of them (a client that keeps attacking stays penalised; one
//! that stops gets its share back `duration_ms` after its penalty began or was renewed). The client API asks
//! [`Penalties::share`] at admission. State lives with the bundle that set it (a policy
//! reload starts afresh, like the rate counters), so an operator lifts every penalty by
//! loading a bundle without one. At most [`MAX_TRACKED`] clients are tracked: beyond, the
//! one whose last hostile ending is oldest is forgotten (an attacker with many identities
//! gains nothing the per-client and in-flight limits do not already bound).

use std::collections::HashMap;

use mayfly_policy::Penalty;

/// Clients tracked at once.
pub const MAX_TRACKED: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Track {
    window_start_ms: u64,
    events: u32,
    last_ms: u64,
    until_ms: Option<u64>,
}

/// Hostile endings per client and the penalties they started (times: ms on the executor's
/// clock).
#[derive(Debug, Default)]
pub(crate) struct Penalties {
    clients: HashMap<Box<str>, Track>,
}

impl Penalties {
    /// Records a hostile ending of `client` at `now_ms`; `true` when it starts a penalty
    /// (not when it renews one still running).
    pub(crate) fn hostile_end(&mut self, p: &Penalty, client: &str, now_ms: u64) -> bool {
        if !self.clients.contains_key(client) && self.clients.len() >= MAX_TRACKED {
            self.make_room(now_ms);
        }
        let t = self.clients.entry(Box::from(client)).or_insert(Track {
            window_start_ms: now_ms,
            events: 0,
            last_ms: now_ms,
            until_ms: None,
        });
        if now_ms.saturating_sub(t.window_start_ms) >= p.window_ms {
            t.window_start_ms = now_ms;
            t.events = 0;
        }
        t.events = t.events.saturating_add(1);
        t.last_ms = now_ms;
        if t.events < p.after {
            return false;
        }
        let running = t.until_ms.is_some_and(|u| u > now_ms);
        t.until_ms = Some(now_ms.saturating_add(p.duration_ms));
        t.window_start_ms = now_ms;
        t.events = 0;
        !running
    }

    /// `Some((share, ms left))` while `client` is penalised.
    pub(crate) fn share(&self, p: &Penalty, client: &str, now_ms: u64) -> Option<(u32, u64)> {
        let until = self.clients.get(client)?.until_ms?;
        (until > now_ms).then(|| (p.share, until - now_ms))
    }

    /// Forgets clients with nothing running and an old window; if none, the one whose last
    /// hostile ending is oldest.
    fn make_room(&mut self, now_ms: u64) {
        self.clients
            .retain(|_, t| t.until_ms.is_some_and(|u| u > now_ms));
        if self.clients.len() >= MAX_TRACKED {
            if let Some(oldest) = self
                .clients
                .iter()
                .min_by_key(|(_, t)| t.last_ms)
                .map(|(c, _)| c.clone())
            {
                self.clients.remove(&oldest);
            }
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Penalty = Penalty {
        after: 3,
        window_ms: 1_000,
        duration_ms: 5_000,
        share: 1,
    };

    #[test]
    fn the_after_th_hostile_ending_in_the_window_starts_a_penalty_that_ends() {
        let mut p = Penalties::default();
        assert!(!p.hostile_end(&P, "evil", 0));
        assert!(!p.hostile_end(&P, "evil", 100));
        assert_eq!(p.share(&P, "evil", 100), None);
        assert!(p.hostile_end(&P, "evil", 200));
        assert_eq!(p.share(&P, "evil", 200), Some((1, 5_000)));
        assert_eq!(p.share(&P, "evil", 5_199), Some((1, 1)));
        // Another client is not touched.
        assert_eq!(p.share(&P, "honest", 300), None);
        // `after` more during the penalty renew it (and start no second one); fewer do not.
        assert!(!p.hostile_end(&P, "evil", 3_000));
        assert!(!p.hostile_end(&P, "evil", 3_100));
        assert_eq!(p.share(&P, "evil", 5_199), Some((1, 1)));
        assert!(!p.hostile_end(&P, "evil", 3_200));
        assert_eq!(p.share(&P, "evil", 8_199), Some((1, 1)));
        // Over: the full share again.
        assert_eq!(p.share(&P, "evil", 8_200), None);
        // And a new one after that.
        for t in [9_000, 9_100] {
            assert!(!p.hostile_end(&P, "evil", t));
        }
        assert!(p.hostile_end(&P, "evil", 9_200));
    }

    #[test]
    fn endings_spread_wider_than_the_window_start_no_penalty() {
        let mut p = Penalties::default();
        for i in 0..20u64 {
            // Two per window, never three.
            assert!(!p.hostile_end(&P, "flaky", i * 600));
        }
        assert_eq!(p.share(&P, "flaky", 12_000), None);
    }

    #[test]
    fn the_table_is_bounded_and_keeps_running_penalties() {
        let mut p = Penalties::default();
        for _ in 0..3 {
            p.hostile_end(&P, "evil", 10);
        }
        for i in 0..(MAX_TRACKED as u64 + 100) {
            p.hostile_end(&P, &format!("c{i}"), 20 + i);
            assert!(p.tracked() <= MAX_TRACKED);
        }
        assert_eq!(p.share(&P, "evil", 30), Some((1, 4_980)));
    }
}
