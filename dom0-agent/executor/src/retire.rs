//! Retirement: the end of a domain whose transaction is over. It is destroyed (or kept,
//! quarantined), its exit settles what a failure really was, and its audit records are
//! appended — attack signals durably before the caller hears back, routine ones with the
//! next group commit.

use mayfly_domain::{Domain, DomainError, DomainExit};
use mayfly_ledger::{AuditEvent, Ledger, Severity, TxId};
use mayfly_policy::DomainEventKind;
use slog::{warn, Logger};

use crate::text::truncate;
use crate::types::{Failure, Served};

/// The failure as it really was: asks the backend how the domain ended (a dead sandbox
/// clone's exit is known within the report wait; a live domain is `None`) and turns a
/// timeout or a peer-gone into the death that caused it; with the death of the domain's own
/// making, if there was one.
///
/// A protocol violation is never turned into a death: the guest chooses how it dies (write
/// garbage, then abort), so a violation seen on the ring stays the failure the policy
/// decides on, and the death is recorded beside it ([`record_end`]).
pub(crate) fn reclassify(
    failure: Failure,
    domain: &mut dyn Domain,
    log: &Logger,
) -> (Failure, Option<DomainExit>) {
    match domain.try_exit() {
        Ok(Some(exit)) if died(exit) => match failure {
            f @ Failure::ProtocolViolation(_) => (f, Some(exit)),
            _ => (Failure::DomainDied(exit), Some(exit)),
        },
        // It ended in a way that is no death of its own (it exited, or was destroyed): a
        // peer-gone says how; a timeout or a violation stays what it was.
        Ok(Some(exit)) => match failure {
            Failure::DomainDied(_) => (Failure::DomainDied(exit), None),
            other => (other, None),
        },
        Ok(None) => (failure, None),
        Err(e) => {
            warn!(log, "could not learn how the domain ended"; "error" => %e);
            (failure, None)
        }
    }
}

/// A death of the domain's own making (as opposed to an exit or the agent's destroy).
pub(crate) fn died(exit: DomainExit) -> bool {
    matches!(
        exit,
        DomainExit::ForbiddenSyscall
            | DomainExit::Crashed { .. }
            | DomainExit::ResourceLimit { .. }
    )
}

/// The domain event a failure is, for the policy engine; `None` for failures that are no
/// domain event (conflicts, storage, a policy refusal already decided).
pub(crate) fn domain_event_kind(f: &Failure) -> Option<DomainEventKind> {
    Some(match f {
        Failure::Timeout => DomainEventKind::Timeout,
        Failure::ProtocolViolation(_) => DomainEventKind::ProtocolViolation,
        Failure::DomainDied(DomainExit::ForbiddenSyscall) => DomainEventKind::ForbiddenSyscall,
        Failure::DomainDied(DomainExit::ResourceLimit { .. })
        | Failure::OperationLimit
        | Failure::WriteLimit { .. } => DomainEventKind::Limit,
        Failure::DomainDied(_) => DomainEventKind::Crash,
        Failure::Conflicts | Failure::Storage(_) | Failure::Policy { .. } => return None,
    })
}

/// A domain whose transaction is over, with the audit records still to append.
pub(crate) struct Retirement {
    pub(crate) domain: Box<dyn Domain>,
    pub(crate) ended: Ended,
}

/// Destroys the domain, works out from its exit what the failure really was, and appends
/// the audit records (attack signals durably before returning).
pub(crate) fn retire(ledger: &Ledger, r: Retirement, served: Served) -> (Served, DomainExit) {
    let Retirement { domain, mut ended } = r;
    let disposed = if ended.quarantine {
        domain.quarantine().map(|q| {
            ended.events.push(
                AuditEvent::new("domain.quarantined", Severity::Notice)
                    .field("domain", ended.domain_id)
                    .field("backend_id", q.id)
                    .field("tx_id", ended.tx_id)
                    .field("handle", truncate(&q.handle, 64)),
            );
            DomainExit::Quarantined
        })
    } else {
        domain.destroy()
    };
    record_end(ledger, ended, served, disposed)
}

/// A retirement once its domain is disposed of: what remains to audit.
pub(crate) struct Ended {
    pub(crate) events: Vec<AuditEvent>,
    pub(crate) tx_id: TxId,
    pub(crate) domain_id: u64,
    pub(crate) handler: String,
    pub(crate) log: Logger,
    /// Keep the domain stopped for forensics instead of destroying it.
    pub(crate) quarantine: bool,
}

/// Works out from how the domain ended what the failure really was, and appends the audit
/// records (attack signals durably before returning).
pub(crate) fn record_end(
    ledger: &Ledger,
    mut r: Ended,
    served: Served,
    disposed: Result<DomainExit, DomainError>,
) -> (Served, DomainExit) {
    let exit = match disposed {
        Ok(exit) => exit,
        Err(e) => {
            r.events.push(disposal_failed(&r, &e));
            DomainExit::Destroyed
        }
    };
    let served = settle(served, exit);
    let (severity, event, reason) = end_event(&served);
    if event != "domain.destroyed" {
        let mut ev = AuditEvent::new(event, severity)
            .field("domain", r.domain_id)
            .field("tx_id", r.tx_id)
            .field("handler", &r.handler);
        if let Some(reason) = reason {
            ev = ev.field("reason", truncate(&reason, 1000));
        }
        // A violation whose domain then died of its own making: both are on the record.
        if matches!(served, Served::Failed(Failure::ProtocolViolation(_))) && died(exit) {
            ev = ev.field("then", format!("the domain {exit}"));
        }
        r.events.push(ev);
    }
    // A quarantined domain is not destroyed: `domain.quarantined` already says where it is
    // kept (its release by an operator is audited then).
    if exit != DomainExit::Quarantined {
        r.events.push(
            AuditEvent::new("domain.destroyed", Severity::Info)
                .field("domain", r.domain_id)
                .field("tx_id", r.tx_id)
                .field("exit", exit),
        );
    }
    // Routine lifecycle records ride with the next group commit (at most 50 ms later);
    // attack signals are made durable before the caller hears about the transaction.
    let urgent = severity <= Severity::Warning;
    let appended = if urgent {
        ledger.audit(r.events).map(drop)
    } else {
        ledger.audit_lazily(r.events)
    };
    if let Err(e) = appended {
        warn!(r.log, "audit append failed"; "error" => %e);
    }
    (served, exit)
}

/// The record of a failed destroy or quarantine. A failed quarantine (stop failed, or the
/// quarantine is full) has destroyed the domain: it is audited as what it was.
fn disposal_failed(r: &Ended, e: &DomainError) -> AuditEvent {
    let (what, event) = if r.quarantine {
        ("quarantining", "domain.quarantine_failed")
    } else {
        ("destroying", "domain.destroy_failed")
    };
    warn!(r.log, "{} the domain failed", what; "error" => %e);
    AuditEvent::new(event, Severity::Error)
        .field("domain", r.domain_id)
        .field("tx_id", r.tx_id)
        .field("error", truncate(&e.to_string(), 1000))
}

/// A failure was classified by the domain's exit before the policy decided (the session);
/// a domain that died only while being destroyed still tells here.
fn settle(served: Served, exit: DomainExit) -> Served {
    match served {
        Served::Failed(Failure::DomainDied(before))
            if exit != DomainExit::Quarantined && (died(exit) || !died(before)) =>
        {
            Served::Failed(Failure::DomainDied(exit))
        }
        // A silence until the deadline explained by a death; a violation stays one (the
        // death is recorded on its event).
        Served::Failed(Failure::Timeout) if died(exit) => Served::Failed(Failure::DomainDied(exit)),
        other => other,
    }
}

/// The severity, name and reason of the record that says how the transaction ended
/// (`domain.destroyed` alone for a commit).
fn end_event(served: &Served) -> (Severity, &'static str, Option<String>) {
    match served {
        Served::Committed { .. } => (Severity::Info, "domain.destroyed", None),
        Served::Aborted { reason } => (Severity::Info, "tx.aborted", Some(reason.clone())),
        Served::Conflict => (Severity::Info, "tx.conflict", None),
        Served::Failed(f) => {
            let (sev, name) = match f {
                Failure::Timeout => (Severity::Warning, "domain.timeout"),
                Failure::DomainDied(DomainExit::ForbiddenSyscall) => {
                    (Severity::Alert, "domain.forbidden_syscall")
                }
                Failure::DomainDied(DomainExit::ResourceLimit { .. }) => {
                    (Severity::Warning, "domain.resource_limit")
                }
                Failure::DomainDied(_) => (Severity::Warning, "domain.crashed"),
                Failure::ProtocolViolation(_) => (Severity::Alert, "domain.protocol_violation"),
                Failure::OperationLimit => (Severity::Warning, "tx.operation_limit"),
                Failure::WriteLimit { .. } => (Severity::Warning, "tx.write_limit"),
                Failure::Conflicts => (Severity::Notice, "tx.conflicts"),
                Failure::Storage(_) => (Severity::Error, "tx.storage_failed"),
                Failure::Policy { .. } => (Severity::Alert, "tx.denied_by_policy"),
            };
            (sev, name, Some(f.to_string()))
        }
    }
}
