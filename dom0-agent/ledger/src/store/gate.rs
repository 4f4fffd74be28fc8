//! The map-resize gate: LMDB may change the map size only while no transaction of this
//! process is active, so every read transaction (and the SIEM cursor write) holds a
//! [`Ticket`], and the committer closes the gate around a resize ([`Gate::close_within`]).

use std::sync::{Arc, Condvar, Mutex};

/// Counts the transactions of this process; [`Gate::close_within`] waits until there are
/// none and keeps new ones waiting while the map is resized.
#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    active: usize,
    closed: bool,
}

/// One active transaction; returned to the gate on drop.
pub(crate) struct Ticket(Arc<Gate>);

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self
            .0
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.active = s.active.saturating_sub(1);
        self.0.changed.notify_all();
    }
}

/// The gate closed: no transaction active; reopened on drop.
pub(crate) struct Closed<'a>(&'a Gate);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let mut s = self
            .0
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.closed = false;
        self.0.changed.notify_all();
    }
}

impl Gate {
    /// Waits while the gate is closed, then counts one more active transaction.
    pub(crate) fn enter(self: &Arc<Self>) -> Ticket {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while s.closed {
            s = self
                .changed
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        s.active = s.active.saturating_add(1);
        Ticket(self.clone())
    }

    /// Closes the gate and waits up to `wait` for the active transactions to end. `None`
    /// (and the gate open again) if some are still active then.
    pub(crate) fn close_within(&self, wait: std::time::Duration) -> Option<Closed<'_>> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.closed {
            return None;
        }
        s.closed = true;
        let deadline = std::time::Instant::now() + wait;
        while s.active > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.closed = false;
                self.changed.notify_all();
                return None;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        Some(Closed(self))
    }
}
