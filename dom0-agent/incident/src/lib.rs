//! The incident service: what happens after a transaction is suspected — an external
//! detector's report, the rollback it or an operator orders (planned or applied), the replay
//! of the legitimate transactions it undid — and the one JSON view of the checkpoint chain
//! ([`view`]). The client API (`POST /v1/reports`, `GET /v1/transactions/{id}`) and the
//! admin console (`rollback`, `tx.show`, `checkpoint.list`) both call it, so each of these
//! is written once.
//!
//! ```text
//!  report(target, reason) ─▶ policy decides (audited) ─▶ rollback? ─┐
//!  console `rollback` (quorum-signed) ──────────────────────────────┤
//!                                                                   ▼
//!                         rollback(order): plan (dry run) │ Ledger::rollback ─▶ replay?
//!                                                                                  │
//!  replay(seqs): each undone transaction again in a fresh domain, seeded as the   ◀┘
//!  original (Executor::execute_seeded), `rollback.replayed` audited per transaction
//! ```
//!
//! It sits above the executor: a replay runs transactions through it, and the policy that
//! decides on a report is the executor's bundle in force. The executor knows nothing of
//! incidents, so the dependencies point one way (docs/design.md, "The incident service").

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod view;

use std::sync::Arc;

use mayfly_executor::{decision_event, truncate, Executor, TxOutcome, TxRequest, TxStatus};
use mayfly_ledger::{AuditEvent, Hash, Ledger, Record, RollbackPlan, Severity, TxId};
use mayfly_policy::{Action, Event as PolicyEvent, Target};
use slog::{o, warn, Logger};

/// The replay of one undone transaction.
#[derive(Debug)]
pub struct Replayed {
    /// Commit sequence of the original.
    pub original_seq: u64,
    /// Transaction id of the original.
    pub original_tx: TxId,
    /// How the replay ended (or why it could not run).
    pub outcome: Result<TxOutcome, String>,
    /// Committed with exactly the original result.
    pub same_result: bool,
}

/// Why a replay could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The checkpoint could not be read.
    #[error("reading commit {seq}: {source}")]
    Read {
        /// Commit.
        seq: u64,
        /// Failure.
        source: mayfly_ledger::ReadError,
    },
    /// The sequence is not a transaction checkpoint.
    #[error("commit {seq} is not a transaction")]
    NotATransaction {
        /// Commit.
        seq: u64,
    },
    /// Recording the replay failed.
    #[error("auditing the replay of commit {seq}: {source}")]
    Audit {
        /// Commit.
        seq: u64,
        /// Failure.
        source: mayfly_ledger::CommitError,
    },
}

/// What an external detector names as an attack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportTarget {
    /// A committed transaction.
    Tx(TxId),
    /// A key: the transaction that last wrote it is the suspect.
    Key(Vec<u8>),
    /// A handler (alert only: no single transaction to roll back).
    Handler(String),
    /// A client (alert only: checkpoints name their client since format version 2, but a
    /// rollback by client is not implemented).
    Client(String),
}

impl ReportTarget {
    /// How the audit trail and the answers name the target.
    fn described(&self) -> String {
        match self {
            Self::Tx(id) => format!("tx {id}"),
            Self::Key(k) => format!("key {}", String::from_utf8_lossy(k)),
            Self::Handler(h) => format!("handler {h}"),
            Self::Client(c) => format!("client {c}"),
        }
    }
}

/// What a report came to.
#[derive(Debug)]
pub struct ReportOutcome {
    /// The policy's decision.
    pub action: &'static str,
    /// The rule that decided.
    pub rule: Option<String>,
    /// The rollback planned (dry run) or applied, if the decision was a rollback.
    pub plan: Option<RollbackPlan>,
    /// Sequence of the rollback record, if one was applied.
    pub rollback_seq: Option<u64>,
    /// Replays, if the decision asked for them.
    pub replayed: Vec<Replayed>,
    /// Something went wrong after the work was done (the `report.completed` record of an
    /// applied rollback could not be written): the work stands, this says what failed.
    pub warning: Option<String>,
}

/// Why a report could not be acted on.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The named transaction or key is not in the ledger.
    #[error("{0}")]
    NotFound(String),
    /// Reading the ledger failed.
    #[error("reading the ledger: {0}")]
    Read(#[from] mayfly_ledger::ReadError),
    /// The rollback failed or was refused.
    #[error("rollback: {0}")]
    Rollback(#[from] mayfly_ledger::RollbackError),
    /// The replay failed.
    #[error("replay: {0}")]
    Replay(#[from] ReplayError),
    /// Auditing the report failed.
    #[error("audit: {0}")]
    Audit(#[from] mayfly_ledger::CommitError),
    /// The decision asks for something not supported for this kind of target (a rollback
    /// of a handler or a client).
    #[error("{action} is not supported for this target ({target}): name the transactions or keys to roll back")]
    Unsupported {
        /// The decision.
        action: &'static str,
        /// The target, described.
        target: String,
    },
}

/// A rollback to plan or apply: the one orchestration of reports and the console.
#[derive(Debug, Clone, Copy)]
pub struct RollbackOrder<'a> {
    /// The suspect's commit sequence.
    pub root: u64,
    /// Also undo every transaction that read its writes (transitively).
    pub cascade: bool,
    /// Re-run the undone legitimate transactions afterwards (not on a dry run).
    pub replay: bool,
    /// Plan only: nothing is written.
    pub dry_run: bool,
    /// Recorded in the rollback record.
    pub why: &'a str,
    /// Policy hash recorded in the rollback record: the deciding bundle's, or zeros for a
    /// rollback admins decided (formats.md §1.6).
    pub policy_hash: Hash,
}

/// What a rollback came to.
#[derive(Debug)]
pub struct RollbackDone {
    /// The plan (applied unless a dry run).
    pub plan: RollbackPlan,
    /// Sequence of the rollback record, if one was applied.
    pub rollback_seq: Option<u64>,
    /// The replays, when asked for: a failure here leaves the rollback applied.
    pub replayed: Result<Vec<Replayed>, ReplayError>,
}

/// The incident service over one executor (whose ledger and policy it uses).
pub struct Incidents {
    executor: Arc<Executor>,
    log: Logger,
}

impl Incidents {
    /// The service over `executor`.
    pub fn new(executor: Arc<Executor>, log: &Logger) -> Self {
        Self {
            executor,
            log: log.new(o!("component" => "incidents")),
        }
    }

    /// The ledger the service reads and repairs.
    pub fn ledger(&self) -> &Ledger {
        self.executor.ledger()
    }

    /// Plans a rollback of `order.root` (a dry run), or applies it in the committer and,
    /// if asked, replays what it undid.
    pub fn rollback(
        &self,
        order: &RollbackOrder<'_>,
    ) -> Result<RollbackDone, mayfly_ledger::RollbackError> {
        let ledger = self.ledger();
        if order.dry_run {
            return Ok(RollbackDone {
                plan: ledger.store().plan_rollback(&[order.root], order.cascade)?,
                rollback_seq: None,
                replayed: Ok(Vec::new()),
            });
        }
        let (plan, receipt) =
            ledger.rollback(&[order.root], order.cascade, order.why, order.policy_hash)?;
        let replayed = if order.replay {
            self.replay(&plan.replay)
        } else {
            Ok(Vec::new())
        };
        Ok(RollbackDone {
            plan,
            rollback_seq: Some(receipt.seq),
            replayed,
        })
    }

    /// Re-runs, in commit order, the legitimate transactions a rollback undid (`seqs`, from
    /// [`RollbackPlan::replay`]), each in a fresh domain from the current template against
    /// the repaired state, and records for each whether it now commits with the same
    /// result, a different one, or fails (`rollback.replayed` audit records). Replays are
    /// new transactions with new checkpoints; the originals stay in the chain. Each
    /// replay's domain is seeded with the original's entropy (kept in its checkpoint), so a
    /// handler that draws random numbers draws the same ones.
    pub fn replay(&self, seqs: &[u64]) -> Result<Vec<Replayed>, ReplayError> {
        let mut out = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            let cp = self
                .ledger()
                .store()
                .checkpoint(seq)
                .map_err(|e| ReplayError::Read { seq, source: e })?
                .ok_or(ReplayError::NotATransaction { seq })?;
            let request = TxRequest {
                handler: cp.handler.clone(),
                payload: cp.request.clone(),
                client: replay_client(cp.client.as_deref(), seq),
            };
            let outcome = self
                .executor
                .execute_seeded(&request, cp.entropy_seed)
                .map_err(|e| e.to_string());
            let replayed = Replayed {
                original_seq: seq,
                original_tx: cp.tx_id,
                same_result: outcome
                    .as_ref()
                    .is_ok_and(|o| o.status == TxStatus::Committed && o.result == cp.result),
                outcome,
            };
            self.ledger()
                .audit(vec![replayed_event(&replayed)])
                .map_err(|e| ReplayError::Audit { seq, source: e })?;
            out.push(replayed);
        }
        Ok(out)
    }

    /// Acts on an external detector's report: the policy decides (the decision is audited
    /// durably, whatever it is); a rollback decision on a transaction or key rolls back the
    /// suspect (and, if the rule says so, its dependents, and replays them). `dry_run`
    /// returns the plan without changing anything. What came of a rollback decision is
    /// audited too (`report.completed`).
    pub fn report(
        &self,
        target: &ReportTarget,
        reason: &str,
        dry_run: bool,
    ) -> Result<ReportOutcome, ReportError> {
        let policy = self.executor.policy();
        let ptarget = match target {
            ReportTarget::Tx(id) => Target::Tx(id.0),
            ReportTarget::Key(k) => Target::Key(k),
            ReportTarget::Handler(h) => Target::Handler(h),
            ReportTarget::Client(c) => Target::Client(c),
        };
        let d = policy.decide(&PolicyEvent::External {
            target: ptarget,
            reason,
        });
        let described = target.described();
        let tx_for_audit = match target {
            ReportTarget::Tx(id) => Some(*id),
            _ => None,
        };
        let ev = decision_event(&d, tx_for_audit, "(external)")
            .field("target", truncate(&described, 300))
            .field("reason", truncate(reason, 1000))
            .field("dry_run", dry_run);
        self.ledger().audit(vec![ev])?;
        let mut outcome = ReportOutcome {
            action: d.action.as_str(),
            rule: d.rule.as_deref().map(str::to_owned),
            plan: None,
            rollback_seq: None,
            replayed: Vec::new(),
            warning: None,
        };
        let Action::Rollback { cascade, replay } = d.action else {
            return Ok(outcome);
        };
        let decided = Decided {
            rule: d.rule.as_deref().unwrap_or("(none)"),
            action: d.action.as_str(),
            described: &described,
            dry_run,
            replay,
        };
        let result = self.carry_out(
            target,
            &decided,
            reason,
            cascade,
            policy.hash(),
            &mut outcome,
        );
        self.complete(&decided, result, outcome)
    }

    /// The rollback (or its plan) a report's decision asks for; fills `outcome`.
    fn carry_out(
        &self,
        target: &ReportTarget,
        decided: &Decided<'_>,
        reason: &str,
        cascade: bool,
        policy_hash: Hash,
        outcome: &mut ReportOutcome,
    ) -> Result<(), ReportError> {
        let root = self.suspect(target, decided)?;
        let why = format!("{} ({}): {reason}", decided.rule, decided.described);
        let done = self.rollback(&RollbackOrder {
            root,
            cascade,
            replay: decided.replay,
            dry_run: decided.dry_run,
            why: &why,
            policy_hash,
        })?;
        outcome.plan = Some(done.plan);
        outcome.rollback_seq = done.rollback_seq;
        outcome.replayed = done.replayed?;
        Ok(())
    }

    /// The commit a report's rollback starts from: the named transaction, or the last
    /// writer of the named key. A handler or a client names no commits to undo: the decision
    /// is not carried out, and the trail and the answer say so.
    fn suspect(&self, target: &ReportTarget, decided: &Decided<'_>) -> Result<u64, ReportError> {
        let store = self.ledger().store();
        match target {
            ReportTarget::Tx(id) => store
                .seq_of(id)?
                .ok_or_else(|| ReportError::NotFound(format!("no committed transaction {id}"))),
            ReportTarget::Key(k) => {
                let last = store.writers_of(k)?.last().copied().ok_or_else(|| {
                    ReportError::NotFound(format!("no transaction wrote {}", decided.described))
                })?;
                // A rollback restored the key last: there is no suspect left to undo.
                if let Some(Record::Rollback(_)) = store.record(last)? {
                    return Err(mayfly_ledger::RollbackError::KeyRestored { by: last }.into());
                }
                Ok(last)
            }
            ReportTarget::Handler(_) | ReportTarget::Client(_) => Err(ReportError::Unsupported {
                action: decided.action,
                target: truncate(decided.described, 300),
            }),
        }
    }

    /// Records what came of a report's rollback decision, whatever it was: a rollback
    /// refused (dependents, a target not in the ledger) is not done.
    fn complete(
        &self,
        decided: &Decided<'_>,
        result: Result<(), ReportError>,
        mut outcome: ReportOutcome,
    ) -> Result<ReportOutcome, ReportError> {
        let ev = decided.completed(&result, &outcome);
        if let Err(e) = self.ledger().audit(vec![ev]) {
            // A rollback that was applied is done: its record is in the signed chain. The
            // caller hears that, with what failed after it, not an error.
            if result.is_ok() && outcome.rollback_seq.is_some() {
                warn!(self.log, "writing report.completed failed after the rollback was applied";
                      "error" => %e, "rollback_seq" => outcome.rollback_seq);
                outcome.warning = Some(format!(
                    "the rollback was applied, but its report.completed record could not be written: {e}"
                ));
                return Ok(outcome);
            }
            return Err(result.err().unwrap_or(ReportError::Audit(e)));
        }
        result.map(|()| outcome)
    }
}

/// A report's rollback decision, as its records name it.
struct Decided<'a> {
    rule: &'a str,
    action: &'static str,
    described: &'a str,
    dry_run: bool,
    replay: bool,
}

impl Decided<'_> {
    /// The `report.completed` record of `result`.
    fn completed(&self, result: &Result<(), ReportError>, outcome: &ReportOutcome) -> AuditEvent {
        let affected = outcome.plan.as_ref().map_or(0, |p| p.affected.len());
        let record = |name: &str, severity: Severity| {
            AuditEvent::new("report.completed", severity)
                .field("rule", self.rule)
                .field("action", self.action)
                .field("target", truncate(self.described, 300))
                .field("dry_run", self.dry_run)
                .field("outcome", name)
        };
        let mut ev = match result {
            Ok(()) if self.dry_run => {
                return record("planned", Severity::Info).field("affected", affected)
            }
            Ok(()) => {
                let ev = record("done", Severity::Notice).field("affected", affected);
                if self.replay {
                    ev.field("replayed", outcome.replayed.len())
                } else {
                    ev
                }
            }
            Err(e) => {
                record("failed", Severity::Warning).field("error", truncate(&e.to_string(), 1000))
            }
        };
        // A rollback applied before its replays failed is done, the replays not.
        if let Some(seq) = outcome.rollback_seq {
            ev = ev.field("rollback_seq", seq);
        }
        ev
    }
}

/// The `rollback.replayed` record of one replay.
fn replayed_event(r: &Replayed) -> AuditEvent {
    let severity = if r.same_result {
        Severity::Info
    } else {
        Severity::Notice
    };
    let mut ev = AuditEvent::new("rollback.replayed", severity)
        .field("original_seq", r.original_seq)
        .field("original_tx", r.original_tx)
        .field("same_result", r.same_result);
    match &r.outcome {
        Ok(o) => {
            ev = ev
                .field("tx_id", o.tx_id)
                .field("status", o.status.as_str());
            if let Some(new_seq) = o.seq {
                ev = ev.field("seq", new_seq);
            }
            if let Some(err) = &o.error {
                ev = ev.field("error", truncate(err, 1000));
            }
        }
        Err(e) => ev = ev.field("error", truncate(e, 1000)),
    }
    ev
}

/// The client a replay is recorded for (its checkpoint, its audit records, its rate
/// limits): `replay:` + the original's client, cut to the checkpoint's 128 bytes by the
/// ledger; `replay:commit-N` for an original that names no client (a version 1 record).
/// Which commit it replays is in its `rollback.replayed` record (`original_seq`).
fn replay_client(original: Option<&str>, seq: u64) -> String {
    match original {
        Some(client) if !client.is_empty() => format!("replay:{client}"),
        _ => format!("replay:commit-{seq}"),
    }
}
