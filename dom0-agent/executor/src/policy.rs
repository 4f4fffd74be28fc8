//! The policy in force: one loaded bundle with the rate state it owns, swapped atomically
//! by a reload. A transaction keeps the bundle it started with to its end; a reload (and its
//! refusal) is audited durably.

use std::sync::{Arc, Mutex, RwLock};

use mayfly_ledger::{AuditEvent, Hash, Ledger, Severity, TxId};
use mayfly_policy::{Bundle, Decision, Event, Penalty, PolicyError, State};
use slog::{warn, Logger};

use crate::penalty::Penalties;
use crate::text::truncate;

/// A loaded policy bundle and the rate and penalty state it owns.
pub struct ActivePolicy {
    bundle: Bundle,
    state: Mutex<State>,
    penalties: Mutex<Penalties>,
}

impl ActivePolicy {
    fn new(bundle: Bundle) -> Self {
        Self {
            bundle,
            state: Mutex::new(State::new()),
            penalties: Mutex::new(Penalties::default()),
        }
    }

    /// Records a hostile ending of `client`'s transaction at `now_ms`; the bundle's
    /// penalty setting when this one starts a penalty.
    pub(crate) fn hostile_end(&self, client: &str, now_ms: u64) -> Option<Penalty> {
        let p = self.bundle.penalty()?;
        let mut penalties = self
            .penalties
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        penalties.hostile_end(&p, client, now_ms).then_some(p)
    }

    /// `Some((share, ms left))` while `client` is penalised under this bundle.
    pub(crate) fn penalty_share(&self, client: &str, now_ms: u64) -> Option<(u32, u64)> {
        let p = self.bundle.penalty()?;
        let penalties = self
            .penalties
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        penalties.share(&p, client, now_ms)
    }

    /// The engine's decision on `event` (rates counted in this bundle's state).
    pub fn decide(&self, event: &Event<'_>) -> Decision {
        match self.state.lock() {
            Ok(mut state) => self.bundle.evaluate(event, &mut state),
            Err(poisoned) => self.bundle.evaluate(event, &mut poisoned.into_inner()),
        }
    }

    /// The bundle's hash (recorded in every checkpoint made under it).
    pub fn hash(&self) -> Hash {
        self.bundle.hash()
    }
}

/// Holds the active policy; readers take a snapshot ([`PolicyHolder::current`]).
pub(crate) struct PolicyHolder {
    current: RwLock<Arc<ActivePolicy>>,
    ledger: Ledger,
    log: Logger,
}

impl PolicyHolder {
    pub(crate) fn new(bundle: Bundle, ledger: Ledger, log: Logger) -> Self {
        Self {
            current: RwLock::new(Arc::new(ActivePolicy::new(bundle))),
            ledger,
            log,
        }
    }

    pub(crate) fn current(&self) -> Arc<ActivePolicy> {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads a new bundle atomically, or refuses a malformed one (the active one stays);
    /// both outcomes are audited.
    pub(crate) fn load(&self, files: &[(String, String)]) -> Result<Hash, PolicyError> {
        let old = self.current().hash();
        match Bundle::load(files) {
            Ok(bundle) => {
                let policy = Arc::new(ActivePolicy::new(bundle));
                let hash = policy.hash();
                match self.current.write() {
                    Ok(mut p) => *p = policy,
                    Err(poisoned) => *poisoned.into_inner() = policy,
                }
                let ev = AuditEvent::new("policy.loaded", Severity::Notice)
                    .field("policy_hash", mayfly_ledger::codec::hex(&hash))
                    .field("previous", mayfly_ledger::codec::hex(&old))
                    .field("files", files.len());
                if let Err(e) = self.ledger.audit(vec![ev]) {
                    warn!(self.log, "auditing a policy load failed"; "error" => %e);
                }
                Ok(hash)
            }
            Err(e) => {
                let ev = AuditEvent::new("policy.rejected", Severity::Warning)
                    .field("active", mayfly_ledger::codec::hex(&old))
                    .field("error", truncate(&e.to_string(), 1000));
                if let Err(a) = self.ledger.audit(vec![ev]) {
                    warn!(self.log, "auditing a policy rejection failed"; "error" => %a);
                }
                Err(e)
            }
        }
    }
}

/// The audit record of a decision that is not a plain allow.
pub fn decision_event(d: &Decision, tx_id: Option<TxId>, handler: &str) -> AuditEvent {
    // One `Severity` type (mayfly-severity) for decisions and records: recorded as is.
    let mut ev = AuditEvent::new("policy.decision", d.severity)
        .field("rule", d.rule.as_deref().unwrap_or("(none)"))
        .field("action", d.action.as_str())
        .field("handler", handler);
    if let Some(tx) = tx_id {
        ev = ev.field("tx_id", tx);
    }
    // Rules that fired too but lost by precedence (a capability over a pattern, ...).
    if !d.also.is_empty() {
        let also: Vec<&str> = d.also.iter().map(|r| &**r).collect();
        ev = ev.field("also", truncate(&also.join(","), 1000));
    }
    for m in &d.matched {
        if !ev.fields.contains_key(m.name) {
            ev = ev.field(m.name, truncate(&m.value, 1000));
        }
    }
    ev
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_policy::Action;

    /// A decision's severity reaches its audit record unchanged, for every severity (the
    /// policy engine and the ledger share one `Severity` type: no conversion can drop or
    /// shift one).
    #[test]
    fn a_decision_is_recorded_at_its_own_severity() {
        for severity in mayfly_ledger::Severity::ALL {
            let d = Decision {
                action: Action::Alert,
                rule: Some("r".into()),
                severity,
                matched: Vec::new(),
                also: Vec::new(),
            };
            let ev = decision_event(&d, None, "kv");
            assert_eq!(ev.severity, severity);
            assert_eq!(ev.severity.code(), d.severity.code());
        }
    }
}
