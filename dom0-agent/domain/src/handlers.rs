//! The handler list a guest announces in its ring `Ready` (protocol version 2): how a backend
//! records the first one and holds every later guest to it, and how it reports a guest that
//! announces another list.
//!
//! The Xen backend learns its guests' handlers this way (the first ready domain's `Ready`);
//! the sandbox learns them from its template's control `Ready` and holds every clone's ring
//! `Ready` to that. A guest that announces a different list is broken or hostile: the backend
//! destroys it and reports a [`Violation`] to the agent, which audits it as
//! `domain.protocol_violation`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::DomainId;

/// Most names of a list shown in an error or audit record.
const SHOWN: usize = 8;

/// A guest broke the protocol at its ready point, outside any transaction; the backend has
/// destroyed it (or is destroying it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The backend's short name ("sandbox", "xen").
    pub backend: &'static str,
    /// The domain (Xen domid, sandbox clone id).
    pub domain: DomainId,
    /// What it did, for the audit record (bounded).
    pub what: String,
}

/// Where a backend reports a [`Violation`]: the agent audits it.
pub type ViolationSink = Arc<dyn Fn(Violation) + Send + Sync>;

/// A sink that drops every report (tests, tools without a ledger); the backend still logs.
pub fn ignore_violations() -> ViolationSink {
    Arc::new(|_| {})
}

/// A handler list in one bounded line: its length and its first names.
pub fn summary(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(SHOWN).map(String::as_str).collect();
    let more = names.len().saturating_sub(SHOWN);
    if more == 0 {
        format!("[{}]", shown.join(", "))
    } else {
        format!(
            "[{}, … {more} more] ({} names)",
            shown.join(", "),
            names.len()
        )
    }
}

/// Another list than the expected one: what it has more and what it lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("announces handlers the others lack: {extra}; lacks: {missing}")]
pub struct ListDiffers {
    /// Names announced and not expected ([`summary`]).
    pub extra: String,
    /// Names expected and not announced ([`summary`]).
    pub missing: String,
}

impl ListDiffers {
    /// How `announced` differs from `expected` (both sorted, as the wire guarantees).
    pub fn between(announced: &[String], expected: &[String]) -> Self {
        let only_in = |a: &[String], b: &[String]| -> Vec<String> {
            a.iter()
                .filter(|n| b.binary_search(n).is_err())
                .cloned()
                .collect()
        };
        Self {
            extra: summary(&only_in(announced, expected)),
            missing: summary(&only_in(expected, announced)),
        }
    }
}

/// The handler list of a backend's guests, learned from the first guest's `Ready`.
#[derive(Debug, Default)]
pub struct LearnedHandlers {
    list: Mutex<Option<Vec<String>>>,
    known: Condvar,
}

impl LearnedHandlers {
    /// None learned yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Option<Vec<String>>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `announced` if it is the first list, else checks it is the same list.
    /// (The wire already guarantees a list is sorted and without duplicates.)
    pub fn admit(&self, announced: &[String]) -> Result<(), ListDiffers> {
        let mut list = self.lock();
        match list.as_deref() {
            None => {
                *list = Some(announced.to_vec());
                self.known.notify_all();
                Ok(())
            }
            Some(recorded) if recorded == announced => Ok(()),
            Some(recorded) => Err(ListDiffers::between(announced, recorded)),
        }
    }

    /// The list, if a guest has announced one.
    pub fn get(&self) -> Option<Vec<String>> {
        self.lock().clone()
    }

    /// Waits up to `timeout` for the first list.
    pub fn wait(&self, timeout: Duration) -> Option<Vec<String>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut list = self.lock();
        loop {
            if let Some(names) = list.as_ref() {
                return Some(names.clone());
            }
            let left = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return None;
            }
            list = self
                .known
                .wait_timeout(list, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_first_list_is_recorded_and_later_ones_must_match() {
        let learned = LearnedHandlers::new();
        assert_eq!(learned.get(), None);
        learned.admit(&names(&["kv", "transfer"])).unwrap();
        learned.admit(&names(&["kv", "transfer"])).unwrap();
        let err = learned
            .admit(&names(&["kv", "transfer", "zz"]))
            .unwrap_err();
        assert_eq!(err.extra, "[zz]");
        assert_eq!(err.missing, "[]");
        let err = learned.admit(&names(&["a", "kv"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "announces handlers the others lack: [a]; lacks: [transfer]"
        );
        assert!(learned.admit(&names(&["kv"])).is_err());
        assert!(learned.admit(&[]).is_err());
        assert_eq!(learned.get(), Some(names(&["kv", "transfer"])));
    }

    #[test]
    fn wait_returns_the_list_once_announced_or_none_at_the_deadline() {
        let learned = Arc::new(LearnedHandlers::new());
        assert_eq!(learned.wait(Duration::from_millis(20)), None);
        let other = Arc::clone(&learned);
        let t = std::thread::spawn(move || other.admit(&names(&["a"])));
        assert_eq!(learned.wait(Duration::from_secs(30)), Some(names(&["a"])));
        t.join().unwrap().unwrap();
    }

    #[test]
    fn summaries_are_bounded() {
        let many: Vec<String> = (0..1000).map(|i| format!("h{i:04}")).collect();
        let s = summary(&many);
        assert!(s.len() < 120, "{s}");
        assert!(s.contains("992 more") && s.contains("1000 names"), "{s}");
    }
}
