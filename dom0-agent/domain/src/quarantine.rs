//! The quarantine: domains kept stopped for forensics, the same bookkeeping for every
//! backend.
//!
//! A quarantined domain keeps its memory (and, on Xen, its ring's grant pages) until an
//! operator releases it, so the list is bounded: without a cap a client or guest that gets
//! itself quarantined again and again would exhaust the host. Past the cap, and after the
//! backend's shutdown has swept the list, a domain is refused and handed back to the caller,
//! which destroys it.
//!
//! ```text
//!  Domain::quarantine ── stop it ── admit ──▶ kept ── release(id) ──▶ destroyed by the caller
//!                                     │ full: Refused::Full   (destroyed, QuarantineFull)
//!                                     └ closed: Refused::Closed (destroyed, shutdown)
//!  shutdown ── close() ──▶ every kept domain handed back, later admits refused
//! ```

use crate::{DomainId, Quarantined};

/// Most domains a backend keeps in quarantine at once.
pub const MAX_QUARANTINED: usize = 8;

/// A domain could not be kept: the quarantine was full, so it was destroyed instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the quarantine already keeps {max} domains (release some through the admin console); this one was {ended} instead")]
pub struct QuarantineFull {
    /// Backend name.
    pub backend: &'static str,
    /// The refused domain.
    pub id: DomainId,
    /// Its backend-specific handle (host pid, domid).
    pub handle: String,
    /// The cap.
    pub max: usize,
    /// What the backend did with it instead: "killed" (a sandbox clone), "destroyed" (a Xen
    /// domain).
    pub ended: &'static str,
}

/// Why [`Quarantine::admit`] handed a domain back.
#[derive(Debug)]
pub enum Refused<T> {
    /// The list holds its maximum already.
    Full(T, QuarantineFull),
    /// The backend is shutting down: the list has been swept.
    Closed(T),
}

/// The domains of one backend kept stopped for forensics (`T`: the backend's handle on
/// one, which destroys it when dropped or ended).
#[derive(Debug)]
pub struct Quarantine<T> {
    kept: Vec<(Quarantined, T)>,
    max: usize,
    ended: &'static str,
    closed: bool,
}

impl<T> Quarantine<T> {
    /// An empty quarantine keeping at most `max`; `ended` says in [`QuarantineFull`] what
    /// the backend does with a domain refused ("killed", "destroyed").
    pub fn new(max: usize, ended: &'static str) -> Self {
        Self {
            kept: Vec::new(),
            max,
            ended,
            closed: false,
        }
    }

    /// Keeps `item`, or hands it back: the list is full, or closed by shutdown.
    pub fn admit(&mut self, quarantined: Quarantined, item: T) -> Result<(), Refused<T>> {
        if self.closed {
            return Err(Refused::Closed(item));
        }
        if self.kept.len() >= self.max {
            let full = QuarantineFull {
                backend: quarantined.backend,
                id: quarantined.id,
                handle: quarantined.handle,
                max: self.max,
                ended: self.ended,
            };
            return Err(Refused::Full(item, full));
        }
        self.kept.push((quarantined, item));
        Ok(())
    }

    /// What is kept, oldest first (for [`crate::DomainBackend::quarantined`]).
    pub fn list(&self) -> Vec<Quarantined> {
        self.kept.iter().map(|(q, _)| q.clone()).collect()
    }

    /// Takes the domain kept under `id` out of the list (the caller destroys it); `None` if
    /// there is none.
    pub fn release(&mut self, id: DomainId) -> Option<T> {
        let index = self.kept.iter().position(|(q, _)| q.id == id)?;
        Some(self.kept.remove(index).1)
    }

    /// Closes the quarantine for shutdown: hands back every kept domain, and refuses every
    /// later admission. Idempotent.
    pub fn close(&mut self) -> Vec<T> {
        self.closed = true;
        std::mem::take(&mut self.kept)
            .into_iter()
            .map(|(_, item)| item)
            .collect()
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: DomainId) -> Quarantined {
        Quarantined {
            backend: "test",
            id,
            handle: format!("h{id}"),
        }
    }

    #[test]
    fn bounded_and_hands_back_what_it_cannot_keep() {
        let mut kept = Quarantine::new(2, "destroyed");
        assert!(kept.admit(q(1), "a").is_ok());
        assert!(kept.admit(q(2), "b").is_ok());
        match kept.admit(q(3), "c") {
            Err(Refused::Full(item, full)) => {
                assert_eq!(item, "c");
                assert_eq!(
                    full,
                    QuarantineFull {
                        backend: "test",
                        id: 3,
                        handle: "h3".into(),
                        max: 2,
                        ended: "destroyed",
                    }
                );
                assert!(full.to_string().contains("already keeps 2 domains"));
                assert!(full.to_string().ends_with("this one was destroyed instead"));
            }
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(kept.len(), 2);
        // Releasing one makes room again; order is kept.
        assert_eq!(kept.release(1), Some("a"));
        assert_eq!(kept.release(1), None);
        assert!(kept.admit(q(3), "c").is_ok());
        let ids: Vec<DomainId> = kept.list().iter().map(|q| q.id).collect();
        assert_eq!(ids, vec![2, 3]);
    }

    #[test]
    fn close_hands_everything_back_and_refuses_later_admissions() {
        let mut kept = Quarantine::new(MAX_QUARANTINED, "killed");
        kept.admit(q(1), 10).unwrap();
        kept.admit(q(2), 20).unwrap();
        assert_eq!(kept.close(), vec![10, 20]);
        assert!(kept.is_empty());
        assert!(matches!(kept.admit(q(3), 30), Err(Refused::Closed(30))));
        assert!(kept.close().is_empty());
        assert!(kept.list().is_empty());
    }
}
