//! Runs one transaction in one fresh domain.
//!
//! ```text
//!  take a ready domain ─▶ answer its Ready with Start{tx id, handler, payload, seed}
//!        │
//!        ▼   serve requests until Commit / Abort / deadline / death / violation
//!  Get, Put, Delete, Scan ─▶ mayfly-ledger Tx (snapshot reads, buffered writes)
//!  Log ─▶ debug log, at most LOG_LINES_PER_TX lines
//!  Commit{result} ─▶ ledger commit (group commit, checkpoint, audit) ─▶ Committed
//!  Abort{reason}  ─▶ Aborted
//!        │
//!        ▼
//!  destroy the domain (every path), audit its end, answer the caller
//! ```
//!
//! The guest is hostile: anything it sends is decoded by the ring crate (bounded, copied
//! out first); a protocol violation, a forbidden system call, a crash or a timeout ends the
//! transaction, destroys the domain and is audited with the reason. A serialization
//! conflict at commit re-runs the transaction from the start in a fresh domain, at most
//! `max_attempts` times.

#![forbid(unsafe_code)]

mod refusals;

pub use refusals::RefusalConfig;

use std::collections::BTreeSet;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mayfly_domain::{Domain, DomainBackend, DomainError, DomainExit};
use mayfly_ledger::{
    AuditEvent, CommitError, Hash, Ledger, Severity, Tx, TxContext, TxError, TxId,
};
use mayfly_policy::{
    Bundle, Decision, DomainEventKind, Event as PolicyEvent, Op as PolicyOp, PolicyError,
    State as PolicyState, Write as PolicyWrite,
};
use mayfly_ring::wire::{error_code, Request, Response, ScanResultBuilder, Start};
use mayfly_ring::RingError;
use slog::{debug, o, warn, Logger};

/// Most guest log lines forwarded to the debug log per transaction.
pub const LOG_LINES_PER_TX: u32 = 32;
/// Largest payload accepted from a client (the ring's cap).
pub const MAX_PAYLOAD: usize = mayfly_ring::wire::MAX_PAYLOAD_LEN;

/// Default of [`ExecutorConfig::max_write_bytes`]: 4 MiB. A checkpoint holds the write set's
/// after-images and before-images and is at most 8 MiB (`MAX_CHECKPOINT_BYTES`), so a larger
/// write set could not commit anyway; until the bound, the buffered writes are what a
/// transaction can make the agent hold (16 transactions at once: 64 MiB).
pub const DEFAULT_MAX_WRITE_BYTES: u64 = 4 << 20;

/// Bytes written by one transaction after which [`ExecutorConfig::release_memory`] is called
/// (1 MiB: far above what the shipped handlers write, so honest traffic does not pay for it).
pub const RELEASE_AFTER_BYTES: u64 = 1 << 20;

/// Default of [`ExecutorConfig::demote_after`]: 100 ms (a `transfer` takes a few ms).
pub const DEFAULT_DEMOTE_AFTER: Duration = Duration::from_millis(100);

/// Limits applied to every transaction.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Wall-clock limit from Start to Commit/Abort.
    pub tx_timeout: Duration,
    /// How long to wait for a ready domain before refusing (overload).
    pub take_timeout: Duration,
    /// Most ring operations per transaction.
    pub max_ops: u32,
    /// Most bytes a transaction may write: the keys and values of its puts and the keys of
    /// its deletes, counted as they arrive (a key written twice counts twice), so it also
    /// bounds what the agent buffers for it. The write that would cross it is refused and
    /// ends the transaction as [`Failure::WriteLimit`] (audited `tx.write_limit`, Warning).
    pub max_write_bytes: u64,
    /// Called after a transaction that wrote at least [`RELEASE_AFTER_BYTES`], once its
    /// buffered writes are freed: gives the allocator's free memory back to the system (the
    /// agent passes `mayfly_sandbox::release_free_heap`), so that an attack with large write
    /// sets does not leave the agent's memory at its peak. `None`: nothing is called.
    pub release_memory: Option<fn() -> bool>,
    /// A transaction still running after this long has its domain demoted
    /// ([`Domain::demote`]: the sandbox sets the clone to nice 19), so that guests that
    /// spin until the deadline do not take CPU from short transactions; `None`: never.
    pub demote_after: Option<Duration>,
    /// Runs of a transaction that hit serialization conflicts, in fresh domains.
    pub max_attempts: u32,
    /// How repeated identical refusals are aggregated in the audit log.
    pub refusals: RefusalConfig,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            tx_timeout: Duration::from_secs(5),
            take_timeout: Duration::from_secs(2),
            max_ops: 10_000,
            max_write_bytes: DEFAULT_MAX_WRITE_BYTES,
            release_memory: None,
            demote_after: Some(DEFAULT_DEMOTE_AFTER),
            max_attempts: 16,
            refusals: RefusalConfig::default(),
        }
    }
}

/// A transaction to run.
#[derive(Debug, Clone)]
pub struct TxRequest {
    /// Handler name.
    pub handler: String,
    /// Payload handed to the handler.
    pub payload: Vec<u8>,
    /// Who asked (for audit), e.g. the client's address.
    pub client: String,
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// Durable, with a checkpoint.
    Committed,
    /// The handler gave up (its reason is the error); nothing was written.
    Aborted,
    /// The domain misbehaved, died, timed out, or storage failed; nothing was written.
    Failed,
}

impl TxStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::Aborted => "aborted",
            Self::Failed => "failed",
        }
    }
}

/// Why a transaction failed, when it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No Commit or Abort within the timeout.
    Timeout,
    /// The domain died (crash, forbidden system call, resource limit).
    DomainDied(DomainExit),
    /// The guest broke the ring protocol.
    ProtocolViolation(String),
    /// The guest exceeded the operation limit.
    OperationLimit,
    /// The guest wrote more than the write-set byte bound allows (or a write set whose
    /// checkpoint would exceed the ledger's size cap).
    WriteLimit {
        /// Bytes the transaction would have written with the refused write, or the size of
        /// the checkpoint that was refused.
        bytes: u64,
        /// The bound it crossed.
        limit: u64,
    },
    /// Still conflicting after every attempt.
    Conflicts,
    /// The ledger could not commit (disk full, ...).
    Storage(String),
    /// A policy rule refused an operation or the commit.
    Policy {
        /// The rule.
        rule: String,
        /// What it decided (`abort`, `quarantine`, `rollback...`).
        action: &'static str,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => f.write_str("transaction timed out"),
            Self::DomainDied(exit) => write!(f, "domain {exit}"),
            Self::ProtocolViolation(what) => write!(f, "protocol violation: {what}"),
            Self::OperationLimit => f.write_str("operation limit exceeded"),
            Self::WriteLimit { bytes, limit } => {
                write!(f, "write limit exceeded: {bytes} bytes, limit {limit}")
            }
            Self::Conflicts => f.write_str("serialization conflicts on every attempt"),
            Self::Storage(what) => write!(f, "storage: {what}"),
            Self::Policy { rule, action } => write!(f, "denied by policy rule {rule} ({action})"),
        }
    }
}

/// The outcome of [`Executor::execute`].
#[derive(Debug, Clone)]
pub struct TxOutcome {
    /// Transaction id (of the last attempt).
    pub tx_id: TxId,
    /// How it ended.
    pub status: TxStatus,
    /// The handler's result (committed only).
    pub result: Vec<u8>,
    /// The abort reason or failure, if not committed.
    pub error: Option<String>,
    /// What failed, when the status is `Failed`.
    pub failure: Option<Failure>,
    /// Commit sequence (committed only).
    pub seq: Option<u64>,
    /// The ledger's number of the domain of the last attempt (unique for the life of the
    /// ledger; [`mayfly_ledger::Ledger::next_domain_number`]).
    pub domain_id: u64,
    /// Attempts made (more than one after conflicts).
    pub attempts: u32,
    /// How the last domain ended, if it was destroyed before the answer (failures are);
    /// `None` when it is destroyed after the answer (normal ends: by the backend in the
    /// background, or by a reaper thread).
    pub domain_exit: Option<DomainExit>,
}

/// Why a transaction could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No handler of that name in the template.
    #[error("unknown handler {0:?}")]
    UnknownHandler(String),
    /// Payload above the cap.
    #[error("payload of {len} bytes is above the limit of {max}")]
    PayloadTooLarge {
        /// Length.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// No domain could be had in time (overload) or the backend is down.
    #[error("no domain available: {0}")]
    Unavailable(#[from] DomainError),
    /// The policy refused to admit the transaction (rates, unlisted handler).
    #[error("refused by policy rule {rule} ({action})")]
    Denied {
        /// The rule.
        rule: String,
        /// What it decided.
        action: &'static str,
    },
    /// The ledger refused to begin a transaction.
    #[error("ledger: {0}")]
    Ledger(#[from] TxError),
    /// No domain number could be reserved (the ledger cannot write).
    #[error("ledger: {0}")]
    DomainNumber(#[from] mayfly_ledger::DomainNumberError),
}

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

/// What a report came to.
#[derive(Debug)]
pub struct ReportOutcome {
    /// The policy's decision.
    pub action: &'static str,
    /// The rule that decided.
    pub rule: Option<String>,
    /// The rollback planned (dry run) or applied, if the decision was a rollback.
    pub plan: Option<mayfly_ledger::RollbackPlan>,
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

/// Runs transactions in fresh domains from one backend against one ledger.
pub struct Executor {
    ledger: Ledger,
    backend: Arc<dyn DomainBackend>,
    handlers: BTreeSet<String>,
    config: ExecutorConfig,
    log: Logger,
    reaper: Reaper,
    refusals: refusals::Refusals,
    policy: std::sync::RwLock<Arc<Policy>>,
    started: Instant,
}

/// A loaded policy bundle and the rate state it owns.
struct Policy {
    bundle: Bundle,
    state: Mutex<PolicyState>,
}

impl Policy {
    fn decide(&self, event: &PolicyEvent<'_>) -> Decision {
        match self.state.lock() {
            Ok(mut state) => self.bundle.evaluate(event, &mut state),
            Err(poisoned) => self.bundle.evaluate(event, &mut poisoned.into_inner()),
        }
    }
}

/// The audit record of a decision that is not a plain allow.
fn decision_event(d: &Decision, tx_id: Option<TxId>, handler: &str) -> AuditEvent {
    let severity = Severity::from_u8(d.severity.code()).unwrap_or(Severity::Debug);
    let mut ev = AuditEvent::new("policy.decision", severity)
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

/// What serving one domain came to.
#[derive(Clone)]
enum Served {
    Committed { seq: u64, result: Vec<u8> },
    Aborted { reason: String },
    Conflict,
    Failed(Failure),
}

fn random_seed() -> [u8; 32] {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    // The system RNG fails only without any entropy source; the transaction then still
    // runs, with a seed that is unique per transaction through the id mixed in below.
    let _ = ring::rand::SystemRandom::new().fill(&mut seed);
    seed
}

fn tx_error_code(e: &TxError) -> u16 {
    match e {
        TxError::BadKey { .. } | TxError::BadScanLimit { .. } | TxError::BadHandler(_) => {
            error_code::BAD_REQUEST
        }
        TxError::ValueTooLarge { .. }
        | TxError::TooManyReads { .. }
        | TxError::TooManyWrites { .. }
        | TxError::TooManyScans { .. }
        | TxError::RequestTooLarge { .. } => error_code::LIMIT_EXCEEDED,
        _ => error_code::INTERNAL,
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl Executor {
    /// An executor over `ledger` and `backend`; `handlers` are the handler names the
    /// template knows.
    pub fn new(
        ledger: Ledger,
        backend: Arc<dyn DomainBackend>,
        handlers: impl IntoIterator<Item = String>,
        config: ExecutorConfig,
        policy: Bundle,
        log: &Logger,
    ) -> Self {
        let reaper = Reaper::start(&ledger);
        let log = log.new(o!("component" => "executor"));
        let refusals = refusals::Refusals::start(&ledger, config.refusals, &log);
        Self {
            ledger,
            backend,
            handlers: handlers.into_iter().collect(),
            config,
            log,
            reaper,
            refusals,
            policy: std::sync::RwLock::new(Arc::new(Policy {
                bundle: policy,
                state: Mutex::new(PolicyState::new()),
            })),
            started: Instant::now(),
        }
    }

    fn current_policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Hash of the active policy bundle (recorded in every checkpoint).
    pub fn policy_hash(&self) -> Hash {
        self.current_policy().bundle.hash()
    }

    /// Loads a new policy bundle, atomically: transactions already running finish under
    /// the bundle they started with, new ones use the new one. A malformed bundle is
    /// refused (with file, line and reason) and the active one stays. Both outcomes are
    /// audited durably.
    pub fn load_policy(&self, files: &[(String, String)]) -> Result<Hash, PolicyError> {
        let old = self.policy_hash();
        match Bundle::load(files) {
            Ok(bundle) => {
                let hash = bundle.hash();
                let policy = Arc::new(Policy {
                    bundle,
                    state: Mutex::new(PolicyState::new()),
                });
                match self.policy.write() {
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

    /// Blocks until every domain of an answered transaction has been destroyed and its
    /// audit records queued (used by tests).
    pub fn wait_for_reapers(&self) {
        self.reaper.wait_idle(None);
    }

    /// [`Executor::wait_for_reapers`], for at most `limit`; the number of domains still
    /// being destroyed when it returns (at shutdown: a backend that never reports a killed
    /// domain gone must not hang the agent).
    pub fn wait_for_reapers_within(&self, limit: Duration) -> usize {
        self.reaper.wait_idle(Some(limit))
    }

    /// Re-runs, in commit order, the legitimate transactions a rollback undid (`seqs`, from
    /// [`mayfly_ledger::RollbackPlan::replay`]), each in a fresh domain from the current
    /// template against the repaired state, and records for each whether it now commits
    /// with the same result, a different one, or fails (`rollback.replayed` audit records).
    /// Replays are new transactions with new checkpoints; the originals stay in the chain.
    /// Each replay's domain is seeded with the original's entropy (kept in its
    /// checkpoint), so a handler that draws random numbers draws the same ones.
    pub fn replay(&self, seqs: &[u64]) -> Result<Vec<Replayed>, ReplayError> {
        let mut out = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            let cp = self
                .ledger
                .store()
                .checkpoint(seq)
                .map_err(|e| ReplayError::Read { seq, source: e })?
                .ok_or(ReplayError::NotATransaction { seq })?;
            let outcome = self.execute_seeded(
                &TxRequest {
                    handler: cp.handler.clone(),
                    payload: cp.request.clone(),
                    client: replay_client(cp.client.as_deref(), seq),
                },
                Some(cp.entropy_seed),
                None,
            );
            let replayed = match outcome {
                Ok(o) => Replayed {
                    original_seq: seq,
                    original_tx: cp.tx_id,
                    same_result: o.status == TxStatus::Committed && o.result == cp.result,
                    outcome: Ok(o),
                },
                Err(e) => Replayed {
                    original_seq: seq,
                    original_tx: cp.tx_id,
                    same_result: false,
                    outcome: Err(e.to_string()),
                },
            };
            let mut ev = AuditEvent::new(
                "rollback.replayed",
                if replayed.same_result {
                    Severity::Info
                } else {
                    Severity::Notice
                },
            )
            .field("original_seq", seq)
            .field("original_tx", cp.tx_id)
            .field("same_result", replayed.same_result);
            match &replayed.outcome {
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
            self.ledger
                .audit(vec![ev])
                .map_err(|e| ReplayError::Audit { seq, source: e })?;
            out.push(replayed);
        }
        Ok(out)
    }

    /// Acts on an external detector's report: the policy decides (the decision is audited
    /// durably, whatever it is); a rollback decision on a transaction or key rolls back the
    /// suspect (and, if the rule says so, its dependents, and replays them). `dry_run`
    /// returns the plan without changing anything.
    pub fn report(
        &self,
        target: &ReportTarget,
        reason: &str,
        dry_run: bool,
    ) -> Result<ReportOutcome, ReportError> {
        let policy = self.current_policy();
        let ptarget = match target {
            ReportTarget::Tx(id) => mayfly_policy::Target::Tx(id.0),
            ReportTarget::Key(k) => mayfly_policy::Target::Key(k),
            ReportTarget::Handler(h) => mayfly_policy::Target::Handler(h),
            ReportTarget::Client(c) => mayfly_policy::Target::Client(c),
        };
        let d = policy.decide(&PolicyEvent::External {
            target: ptarget,
            reason,
        });
        let described = match target {
            ReportTarget::Tx(id) => format!("tx {id}"),
            ReportTarget::Key(k) => format!("key {}", String::from_utf8_lossy(k)),
            ReportTarget::Handler(h) => format!("handler {h}"),
            ReportTarget::Client(c) => format!("client {c}"),
        };
        let tx_for_audit = match target {
            ReportTarget::Tx(id) => Some(*id),
            _ => None,
        };
        let ev = decision_event(&d, tx_for_audit, "(external)")
            .field("target", truncate(&described, 300))
            .field("reason", truncate(reason, 1000))
            .field("dry_run", dry_run);
        self.ledger.audit(vec![ev])?;
        let mut outcome = ReportOutcome {
            action: d.action.as_str(),
            rule: d.rule.as_deref().map(str::to_owned),
            plan: None,
            rollback_seq: None,
            replayed: Vec::new(),
            warning: None,
        };
        let mayfly_policy::Action::Rollback { cascade, replay } = d.action else {
            return Ok(outcome);
        };
        // The decision is recorded above; what came of it is recorded here, whatever it
        // was: a rollback refused (dependents, a target not in the ledger) is not done.
        let rule = d.rule.as_deref().unwrap_or("(none)");
        let completed = |outcome_name: &str, severity: Severity| {
            AuditEvent::new("report.completed", severity)
                .field("rule", rule)
                .field("action", d.action.as_str())
                .field("target", truncate(&described, 300))
                .field("dry_run", dry_run)
                .field("outcome", outcome_name)
        };
        let result = if matches!(target, ReportTarget::Handler(_) | ReportTarget::Client(_)) {
            // A handler or a client names no commits to undo: the decision is not carried
            // out, and the trail and the answer say so.
            Err(ReportError::Unsupported {
                action: d.action.as_str(),
                target: truncate(&described, 300),
            })
        } else {
            self.carry_out_report(
                target,
                &described,
                reason,
                rule,
                dry_run,
                cascade,
                replay,
                policy.bundle.hash(),
                &mut outcome,
            )
        };
        let ev = match &result {
            Ok(()) if dry_run => {
                let planned = outcome.plan.as_ref().map_or(0, |p| p.affected.len());
                completed("planned", Severity::Info).field("affected", planned)
            }
            Ok(()) => {
                let mut ev = completed("done", Severity::Notice).field(
                    "affected",
                    outcome.plan.as_ref().map_or(0, |p| p.affected.len()),
                );
                if let Some(seq) = outcome.rollback_seq {
                    ev = ev.field("rollback_seq", seq);
                }
                if replay {
                    ev = ev.field("replayed", outcome.replayed.len());
                }
                ev
            }
            Err(e) => {
                let mut ev = completed("failed", Severity::Warning)
                    .field("error", truncate(&e.to_string(), 1000));
                // A rollback applied before its replays failed is done, the replays not.
                if let Some(seq) = outcome.rollback_seq {
                    ev = ev.field("rollback_seq", seq);
                }
                ev
            }
        };
        if let Err(e) = self.ledger.audit(vec![ev]) {
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

    /// The rollback (or its plan) a report's decision asks for; fills `outcome`.
    #[allow(clippy::too_many_arguments)]
    fn carry_out_report(
        &self,
        target: &ReportTarget,
        described: &str,
        reason: &str,
        rule: &str,
        dry_run: bool,
        cascade: bool,
        replay: bool,
        policy_hash: Hash,
        outcome: &mut ReportOutcome,
    ) -> Result<(), ReportError> {
        let store = self.ledger.store();
        let root = match target {
            ReportTarget::Tx(id) => store
                .seq_of(id)?
                .ok_or_else(|| ReportError::NotFound(format!("no committed transaction {id}")))?,
            ReportTarget::Key(k) => {
                let last = store.writers_of(k)?.last().copied().ok_or_else(|| {
                    ReportError::NotFound(format!("no transaction wrote {described}"))
                })?;
                // A rollback restored the key last: there is no suspect left to undo.
                if let Some(mayfly_ledger::Record::Rollback(_)) = store.record(last)? {
                    return Err(mayfly_ledger::RollbackError::KeyRestored { by: last }.into());
                }
                last
            }
            ReportTarget::Handler(_) | ReportTarget::Client(_) => {
                return Err(ReportError::Unsupported {
                    action: "rollback",
                    target: truncate(described, 300),
                })
            }
        };
        if dry_run {
            outcome.plan = Some(store.plan_rollback(&[root], cascade)?);
            return Ok(());
        }
        let why = format!("{rule} ({described}): {reason}");
        let (plan, receipt) = self.ledger.rollback(&[root], cascade, &why, policy_hash)?;
        outcome.rollback_seq = Some(receipt.seq);
        outcome.plan = Some(plan);
        if replay {
            let seqs = outcome
                .plan
                .as_ref()
                .map(|p| p.replay.clone())
                .unwrap_or_default();
            outcome.replayed = self.replay(&seqs)?;
        }
        Ok(())
    }

    /// Audits a refusal of `client` for `reason` (`record`, named `event`, is its full
    /// record): the first of a kind within the aggregation interval is written at once
    /// (durably), identical ones after it are counted into one `refusal.repeated` record
    /// per interval ([`RefusalConfig`]; the module docs of `refusals` say what is
    /// identical).
    pub fn audit_refusal(
        &self,
        client: &str,
        event: &'static str,
        reason: &str,
        record: AuditEvent,
    ) {
        self.refusals.refused(client, event, reason, record);
    }

    /// Counts a refusal of `client` for `reason` in the aggregation table without writing
    /// anything now (for callers that cannot wait for a durable write, e.g. when every
    /// audit writer is busy): it reaches the ledger in its window's `refusal.repeated`.
    pub fn count_refusal(
        &self,
        client: &str,
        event: &'static str,
        reason: &str,
        severity: Severity,
    ) {
        self.refusals.counted_only(client, event, reason, severity);
    }

    /// Writes the counts of every open aggregation window now (at shutdown, before the
    /// agent's stop is recorded); later refusals are still counted, and written when the
    /// executor is dropped.
    pub fn close_refusal_windows(&self) {
        self.refusals.stop();
    }

    /// Handler names known to the template.
    pub fn handlers(&self) -> impl Iterator<Item = &str> {
        self.handlers.iter().map(String::as_str)
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn DomainBackend> {
        &self.backend
    }

    /// Runs `req` to its end in fresh domains (more than one only after conflicts).
    pub fn execute(&self, req: &TxRequest) -> Result<TxOutcome, ExecError> {
        self.execute_seeded(req, None, None)
    }

    /// [`Executor::execute`] with the client's idempotency key, recorded durably in the
    /// same commit as the transaction ([`mayfly_ledger::Tx::set_idempotency_key`]); a key
    /// the client already committed with makes the commit fail (the caller answers with
    /// the original outcome, [`mayfly_ledger::Store::idempotent_commit`]).
    pub fn execute_with_idempotency_key(
        &self,
        req: &TxRequest,
        key: &str,
    ) -> Result<TxOutcome, ExecError> {
        self.execute_seeded(req, None, Some(key))
    }

    /// [`Executor::execute`], with the domain's RNG seeded from `seed` when given (a
    /// replay gives the handler the numbers the original drew).
    fn execute_seeded(
        &self,
        req: &TxRequest,
        seed: Option<Hash>,
        idempotency_key: Option<&str>,
    ) -> Result<TxOutcome, ExecError> {
        if !self.handlers.contains(&req.handler) {
            return Err(ExecError::UnknownHandler(req.handler.clone()));
        }
        if req.payload.len() > MAX_PAYLOAD {
            return Err(ExecError::PayloadTooLarge {
                len: req.payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let policy = self.current_policy();
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let admit = policy.decide(&PolicyEvent::Admit {
            client: &req.client,
            handler: &req.handler,
            now_ms,
        });
        if admit.audited() {
            let ev = decision_event(&admit, None, &req.handler)
                .field("client", truncate(&req.client, 256));
            if admit.action.permits() {
                if let Err(e) = self.ledger.audit_lazily(vec![ev]) {
                    warn!(self.log, "auditing an admission decision failed"; "error" => %e);
                }
            } else {
                // A refusal: the first of its kind is written at once, repeats are counted.
                let rule = admit.rule.as_deref().unwrap_or("(none)");
                self.refusals
                    .refused(&req.client, "policy.decision", rule, ev);
            }
        }
        if !admit.action.permits() {
            return Err(ExecError::Denied {
                rule: admit.rule.as_deref().unwrap_or("(none)").to_owned(),
                action: admit.action.as_str(),
            });
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The ledger's number for this domain: the backend's own id (a clone number,
            // a domid) repeats across restarts; this one never does. Reserved before the
            // domain is taken, so a failure to reserve leaves no domain untracked (a
            // number reserved for a take that then fails is a gap, never a repeat).
            let domain_id = self.ledger.next_domain_number()?;
            let domain = self.backend.take(self.config.take_timeout)?;
            let tx_id = TxId::generate();
            let mut ltx = self.ledger.begin(TxContext {
                tx_id,
                handler: req.handler.clone(),
                request: req.payload.clone(),
                domain_id,
                policy_hash: policy.bundle.hash(),
            })?;
            // The checkpoint names who asked (version 2 records).
            ltx.set_client(&req.client);
            if let Some(key) = idempotency_key {
                ltx.set_idempotency_key(key)?;
            }
            let started = self.started_events(req, tx_id, domain.as_ref(), domain_id, attempt);
            let (served, exit) = self.serve(domain, domain_id, ltx, req, &policy, seed, started);
            let outcome = |status, result, failure: Option<Failure>, seq| TxOutcome {
                tx_id,
                status,
                result,
                error: failure.as_ref().map(ToString::to_string),
                failure,
                seq,
                domain_id,
                attempts: attempt,
                domain_exit: exit,
            };
            return Ok(match served {
                Served::Committed { seq, result } => {
                    outcome(TxStatus::Committed, result, None, Some(seq))
                }
                Served::Aborted { reason } => TxOutcome {
                    error: Some(reason),
                    ..outcome(TxStatus::Aborted, Vec::new(), None, None)
                },
                Served::Conflict if attempt < self.config.max_attempts => continue,
                Served::Conflict => {
                    outcome(TxStatus::Failed, Vec::new(), Some(Failure::Conflicts), None)
                }
                Served::Failed(f) => outcome(TxStatus::Failed, Vec::new(), Some(f), None),
            });
        }
    }

    fn started_events(
        &self,
        req: &TxRequest,
        tx_id: TxId,
        domain: &dyn Domain,
        domain_id: u64,
        attempt: u32,
    ) -> Vec<AuditEvent> {
        let backend = self.backend.name();
        vec![
            AuditEvent::new("domain.cloned", Severity::Info)
                .field("backend", backend)
                .field("domain", domain_id)
                .field("backend_id", domain.id())
                .field("handle", truncate(&domain.handle(), 64)),
            AuditEvent::new("domain.started", Severity::Info)
                .field("backend", backend)
                .field("domain", domain_id)
                .field("tx_id", tx_id)
                .field("handler", &req.handler)
                .field("client", truncate(&req.client, 256))
                .field("attempt", attempt),
        ]
    }

    /// Serves one domain to the end of its transaction, then destroys it and audits. A
    /// transaction that ended normally (committed, aborted by its handler, or conflicting)
    /// is answered at once and its domain destroyed afterwards — by the backend, which calls
    /// back when it is gone ([`Domain::destroy_in_background`], the sandbox), or by a reaper
    /// thread that waits (Xen); a failed one is destroyed first, because how the domain died
    /// decides what the failure was.
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        mut domain: Box<dyn Domain>,
        domain_id: u64,
        ltx: Tx,
        req: &TxRequest,
        policy: &Policy,
        seed: Option<Hash>,
        mut events: Vec<AuditEvent>,
    ) -> (Served, Option<DomainExit>) {
        let tx_id = ltx.id();
        let log = self
            .log
            .new(o!("tx_id" => tx_id.to_string(), "domain" => domain_id));
        let mut quarantine = false;
        let mut written: u64 = 0;
        let served = self.drive(
            domain.as_mut(),
            ltx,
            req,
            policy,
            seed,
            &log,
            &mut events,
            &mut quarantine,
            &mut written,
        );
        // How the domain really ended decides what the failure was: a guest killed by the
        // seccomp filter or a resource limit makes the ring report its peer gone (or a
        // broken message, or silence until the deadline) before the exit is known.
        let (served, dead) = match served {
            Served::Failed(
                f @ (Failure::DomainDied(_) | Failure::Timeout | Failure::ProtocolViolation(_)),
            ) => {
                let (f, dead) = reclassify(f, domain.as_mut(), &log);
                (Served::Failed(f), dead)
            }
            other => (other, None),
        };
        // The transaction's buffered writes are freed by now (its ledger transaction ended
        // in `drive`); after a large write set, hand the memory back.
        if written >= RELEASE_AFTER_BYTES {
            if let Some(release) = self.config.release_memory {
                let released = release();
                debug!(log, "released free memory after a large write set";
                    "bytes_written" => written, "released" => released);
            }
        }
        let domain_event = match &served {
            Served::Failed(f) => domain_event_kind(f),
            _ => None,
        };
        // A domain that misbehaved may be kept for forensics, if the policy says so.
        if let Some(kind) = domain_event {
            let d = policy.decide(&PolicyEvent::Domain {
                tx: tx_id.0,
                handler: &req.handler,
                kind,
            });
            if d.audited() {
                events.push(decision_event(&d, Some(tx_id), &req.handler));
            }
            quarantine |= d.action == mayfly_policy::Action::Quarantine;
        }
        // A domain that is already dead (the kernel killed it) has nothing left to keep:
        // the audit trail says the quarantine the policy asked for was not possible.
        if let (true, Some(exit)) = (quarantine, dead) {
            events.push(
                AuditEvent::new("domain.quarantine_failed", Severity::Error)
                    .field("domain", domain_id)
                    .field("tx_id", tx_id)
                    .field(
                        "error",
                        format!("the domain had already ended ({exit}): nothing left to keep"),
                    ),
            );
            quarantine = false;
        }
        let retirement = Retirement {
            domain,
            ended: Ended {
                events,
                tx_id,
                domain_id,
                handler: req.handler.clone(),
                log,
                quarantine,
            },
        };
        let retirement = if matches!(served, Served::Failed(_)) {
            retirement
        } else if retirement.domain.destroys_in_background() && !retirement.ended.quarantine {
            // The backend tells when the domain is gone: no thread of ours waits for it.
            self.reaper
                .retire_in_background(&self.ledger, retirement, served.clone());
            return (served, None);
        } else {
            match self.reaper.send(retirement, served.clone()) {
                Ok(()) => return (served, None),
                Err(retirement) => *retirement,
            }
        };
        let (served, exit) = retire(&self.ledger, retirement, served);
        (served, Some(exit))
    }

    /// The request loop. Everything the guest sends is already decoded and bounded.
    #[allow(clippy::too_many_arguments)]
    fn drive(
        &self,
        domain: &mut dyn Domain,
        mut ltx: Tx,
        req: &TxRequest,
        policy: &Policy,
        seed: Option<Hash>,
        log: &Logger,
        events: &mut Vec<AuditEvent>,
        quarantine: &mut bool,
        written: &mut u64,
    ) -> Served {
        let ready_id = domain.ready_id();
        let tx_id = ltx.id();
        let seed = seed.unwrap_or_else(|| {
            let mut seed = random_seed();
            for (s, t) in seed.iter_mut().zip(tx_id.0.iter().cycle()) {
                *s ^= t;
            }
            seed
        });
        ltx.set_entropy_seed(seed);
        let start = Response::Start(Start {
            tx_id: tx_id.0,
            handler: req.handler.clone(),
            payload: req.payload.clone(),
            entropy_seed: seed,
        });
        let (ring, notifier) = domain.ring();
        if let Err(e) = ring.send_response(ready_id, &start, &notifier) {
            return Served::Failed(Failure::ProtocolViolation(format!("sending Start: {e}")));
        }
        let deadline = Instant::now() + self.config.tx_timeout;
        let mut demote_at = self.config.demote_after.map(|d| Instant::now() + d);
        let mut ops: u32 = 0;
        let mut log_lines: u32 = 0;
        let mut bytes_written: u64 = 0;
        // The first write this transaction had refused: its `Commit` is then refused too,
        // so a guest may send `Commit` right behind writes whose answers it has not read.
        let mut refused_write: Option<String> = None;
        let started = Instant::now();
        let elapsed_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Served::Failed(Failure::Timeout);
            }
            // Wait no longer than the demotion point; past it, demote once and wait on.
            let until_demote = demote_at.map(|at| at.saturating_duration_since(Instant::now()));
            if until_demote.is_some_and(|d| d.is_zero()) {
                demote_at = None;
                if let Err(e) = domain.demote() {
                    debug!(log, "demoting the domain failed"; "error" => %e);
                }
                continue;
            }
            let wait = until_demote.map_or(left, |d| d.min(left));
            let (ring, notifier) = domain.ring();
            let env = match ring.recv_request(&notifier, Some(wait)) {
                Ok(env) => env,
                Err(RingError::Timeout { .. }) if wait < left => continue,
                Err(RingError::Timeout { .. }) => return Served::Failed(Failure::Timeout),
                Err(RingError::PeerGone) => {
                    return Served::Failed(Failure::DomainDied(DomainExit::Crashed { signal: 0 }))
                }
                Err(e) => return Served::Failed(Failure::ProtocolViolation(e.to_string())),
            };
            ops += 1;
            if ops > self.config.max_ops {
                let _ = ring.send_response(
                    env.id,
                    &Response::Error {
                        code: error_code::LIMIT_EXCEEDED,
                        message: format!("more than {} operations", self.config.max_ops),
                    },
                    &notifier,
                );
                return Served::Failed(Failure::OperationLimit);
            }
            // Every data operation passes the policy first.
            let op = match &env.body {
                Request::Get { key } => Some(PolicyOp::Get { key }),
                Request::Put { key, value } => Some(PolicyOp::Put { key, value }),
                Request::Delete { key } => Some(PolicyOp::Delete { key }),
                Request::Scan { start, end, .. } => Some(PolicyOp::Scan {
                    start,
                    end: end.as_deref(),
                }),
                _ => None,
            };
            if let Some(op) = op {
                let d = policy.decide(&PolicyEvent::Op {
                    tx: tx_id.0,
                    handler: &req.handler,
                    client: &req.client,
                    op,
                    ops_so_far: u64::from(ops.saturating_sub(1)),
                    bytes_written_so_far: bytes_written,
                    elapsed_ms: elapsed_ms(),
                });
                if d.audited() {
                    events.push(decision_event(&d, Some(tx_id), &req.handler));
                }
                if !d.action.permits() {
                    let rule = d.rule.as_deref().unwrap_or("(none)").to_owned();
                    let _ = ring.send_response(
                        env.id,
                        &Response::Error {
                            code: error_code::DENIED,
                            message: format!("denied by policy rule {rule}"),
                        },
                        &notifier,
                    );
                    *quarantine = d.action == mayfly_policy::Action::Quarantine;
                    return Served::Failed(Failure::Policy {
                        rule,
                        action: d.action.as_str(),
                    });
                }
                let next = bytes_written.saturating_add(op.bytes_written());
                *written = next;
                if next > self.config.max_write_bytes {
                    let _ = ring.send_response(
                        env.id,
                        &Response::Error {
                            code: error_code::LIMIT_EXCEEDED,
                            message: format!(
                                "write set over {} bytes",
                                self.config.max_write_bytes
                            ),
                        },
                        &notifier,
                    );
                    return Served::Failed(Failure::WriteLimit {
                        bytes: next,
                        limit: self.config.max_write_bytes,
                    });
                }
                bytes_written = next;
            }
            let reply = match env.body {
                Request::Get { key } => match ltx.get(&key) {
                    Ok(v) => Response::Value(v),
                    Err(e) => error_response(&e),
                },
                Request::Put { key, value } => match ltx.put(&key, &value) {
                    Ok(()) => Response::Ok,
                    Err(e) => {
                        refused_write.get_or_insert_with(|| format!("put refused: {e}"));
                        error_response(&e)
                    }
                },
                Request::Delete { key } => match ltx.delete(&key) {
                    Ok(()) => Response::Ok,
                    Err(e) => {
                        refused_write.get_or_insert_with(|| format!("delete refused: {e}"));
                        error_response(&e)
                    }
                },
                Request::Scan { start, end, limit } => {
                    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
                    match ltx.scan(&start, end.as_deref(), limit_usize) {
                        Ok(scan) => {
                            let mut builder = ScanResultBuilder::new(limit);
                            let mut more = scan.more;
                            for (k, v) in scan.entries {
                                match builder.try_push(k, v) {
                                    Ok(true) => {}
                                    Ok(false) | Err(_) => {
                                        more = true;
                                        break;
                                    }
                                }
                            }
                            builder.finish(more)
                        }
                        Err(e) => error_response(&e),
                    }
                }
                Request::Log { level, line } => {
                    log_lines += 1;
                    if log_lines <= LOG_LINES_PER_TX {
                        debug!(log, "guest"; "level" => ?level, "line" => line);
                    } else if log_lines == LOG_LINES_PER_TX + 1 {
                        debug!(log, "guest log lines beyond the limit are dropped");
                    }
                    Response::Ok
                }
                Request::Commit { result } => {
                    if let Some(reason) = refused_write {
                        let _ = ring.send_response(env.id, &Response::Aborted, &notifier);
                        return Served::Aborted {
                            reason: format!("commit after a refused write ({reason})"),
                        };
                    }
                    let writes: Vec<PolicyWrite<'_>> = ltx
                        .writes()
                        .map(|(key, value)| PolicyWrite { key, value })
                        .collect();
                    let d = policy.decide(&PolicyEvent::Commit {
                        tx: tx_id.0,
                        handler: &req.handler,
                        client: &req.client,
                        ops: u64::from(ops),
                        bytes_written,
                        elapsed_ms: elapsed_ms(),
                        writes: &writes,
                    });
                    drop(writes);
                    if d.audited() {
                        events.push(decision_event(&d, Some(tx_id), &req.handler));
                    }
                    if !d.action.permits() {
                        let _ = ring.send_response(env.id, &Response::Aborted, &notifier);
                        *quarantine = d.action == mayfly_policy::Action::Quarantine;
                        return Served::Failed(Failure::Policy {
                            rule: d.rule.as_deref().unwrap_or("(none)").to_owned(),
                            action: d.action.as_str(),
                        });
                    }
                    let committed = AuditEvent::new("tx.committed", Severity::Info)
                        .field("tx_id", tx_id)
                        .field("handler", &req.handler);
                    // The lifecycle records so far (cloned, started, decisions) commit with
                    // the checkpoint; if the commit fails (a conflict, storage), they stay
                    // for the end record, so a lost attempt is audited like any other.
                    let mut audit = events.clone();
                    audit.push(committed);
                    return match ltx.commit_with_audit(result.clone(), audit) {
                        Ok(receipt) => {
                            events.clear();
                            let _ = ring.send_response(env.id, &Response::Committed, &notifier);
                            Served::Committed {
                                seq: receipt.seq,
                                result,
                            }
                        }
                        Err(e) => {
                            let _ = ring.send_response(env.id, &Response::Aborted, &notifier);
                            if e.is_conflict() {
                                debug!(log, "conflict at commit"; "error" => %e);
                                Served::Conflict
                            } else if let CommitError::CheckpointTooLarge { len, max } = e {
                                // The transaction's own size, not the storage's fault.
                                Served::Failed(Failure::WriteLimit {
                                    bytes: u64::try_from(len).unwrap_or(u64::MAX),
                                    limit: u64::try_from(max).unwrap_or(u64::MAX),
                                })
                            } else {
                                warn!(log, "commit failed"; "error" => %e);
                                Served::Failed(Failure::Storage(e.to_string()))
                            }
                        }
                    };
                }
                Request::Abort { reason } => {
                    let _ = ring.send_response(env.id, &Response::Aborted, &notifier);
                    return Served::Aborted { reason };
                }
                Request::Ready { .. } => {
                    return Served::Failed(Failure::ProtocolViolation(
                        "Ready sent again during a transaction".into(),
                    ))
                }
            };
            if let Err(e) = ring.send_response(env.id, &reply, &notifier) {
                return Served::Failed(Failure::ProtocolViolation(format!(
                    "sending a response: {e}"
                )));
            }
        }
    }
}

/// The failure as it really was: asks the backend how the domain ended (a dead sandbox
/// clone's exit is known within the report wait; a live domain is `None`) and turns a
/// timeout or a peer-gone into the death that caused it; with the death of the domain's own
/// making, if there was one.
///
/// A protocol violation is never turned into a death: the guest chooses how it dies (write
/// garbage, then abort), so a violation seen on the ring stays the failure the policy
/// decides on, and the death is recorded beside it ([`record_end`]).
fn reclassify(
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

/// A death of the domain's own making (as opposed to an exit or the agent's destroy).
fn died(exit: DomainExit) -> bool {
    matches!(
        exit,
        DomainExit::ForbiddenSyscall
            | DomainExit::Crashed { .. }
            | DomainExit::ResourceLimit { .. }
    )
}

/// The domain event a failure is, for the policy engine; `None` for failures that are no
/// domain event (conflicts, storage, a policy refusal already decided).
fn domain_event_kind(f: &Failure) -> Option<DomainEventKind> {
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

fn error_response(e: &TxError) -> Response {
    Response::Error {
        code: tx_error_code(e),
        message: truncate(&e.to_string(), 1000),
    }
}

/// A domain whose transaction is over, with the audit records still to append.
struct Retirement {
    domain: Box<dyn Domain>,
    ended: Ended,
}

/// Destroys the domain, works out from its exit what the failure really was, and appends
/// the audit records (attack signals durably before returning).
fn retire(ledger: &Ledger, r: Retirement, served: Served) -> (Served, DomainExit) {
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
struct Ended {
    events: Vec<AuditEvent>,
    tx_id: TxId,
    domain_id: u64,
    handler: String,
    log: Logger,
    /// Keep the domain stopped for forensics instead of destroying it.
    quarantine: bool,
}

/// Works out from how the domain ended what the failure really was, and appends the audit
/// records (attack signals durably before returning).
fn record_end(
    ledger: &Ledger,
    mut r: Ended,
    served: Served,
    disposed: Result<DomainExit, DomainError>,
) -> (Served, DomainExit) {
    let exit = match disposed {
        Ok(exit) => exit,
        Err(e) => {
            // A failed quarantine (stop failed, or the quarantine is full) has destroyed the
            // domain: it is audited as what it was.
            let (what, event) = if r.quarantine {
                ("quarantining", "domain.quarantine_failed")
            } else {
                ("destroying", "domain.destroy_failed")
            };
            warn!(r.log, "{} the domain failed", what; "error" => %e);
            r.events.push(
                AuditEvent::new(event, Severity::Error)
                    .field("domain", r.domain_id)
                    .field("tx_id", r.tx_id)
                    .field("error", truncate(&e.to_string(), 1000)),
            );
            DomainExit::Destroyed
        }
    };
    // A failure was classified by the domain's exit before the policy decided (`serve`);
    // a domain that died only while being destroyed still tells here.
    let served = match served {
        Served::Failed(Failure::DomainDied(before))
            if exit != DomainExit::Quarantined && (died(exit) || !died(before)) =>
        {
            Served::Failed(Failure::DomainDied(exit))
        }
        // A silence until the deadline explained by a death; a violation stays one (the
        // death is recorded on its event below).
        Served::Failed(Failure::Timeout) if died(exit) => Served::Failed(Failure::DomainDied(exit)),
        other => other,
    };
    let (severity, event, reason) = match &served {
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
    };
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

/// Reaper threads: destroy the domains of normally ended transactions after the caller
/// has its answer.
struct Reaper {
    sender: Mutex<Option<mpsc::Sender<(Retirement, Served)>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Retirements queued or running.
    pending: Arc<(Mutex<usize>, Condvar)>,
}

/// Reaper threads per executor: destroying waits for the domain to be gone, so several
/// run at once.
const REAPERS: usize = 4;

impl Reaper {
    fn start(ledger: &Ledger) -> Self {
        let (sender, receiver) = mpsc::channel::<(Retirement, Served)>();
        let receiver = Arc::new(Mutex::new(receiver));
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let mut threads = Vec::new();
        for i in 0..REAPERS {
            let (receiver, ledger, pending) = (receiver.clone(), ledger.clone(), pending.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("reaper-{i}"))
                .spawn(move || loop {
                    let job = match receiver.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok((retirement, served)) => {
                            retire(&ledger, retirement, served);
                            let (count, cv) = &*pending;
                            if let Ok(mut n) = count.lock() {
                                *n = n.saturating_sub(1);
                                cv.notify_all();
                            }
                        }
                        Err(_) => return,
                    }
                });
            if let Ok(handle) = spawned {
                threads.push(handle);
            }
        }
        // With no thread at all, `send` fails and domains are destroyed inline.
        let sender = (!threads.is_empty()).then_some(sender);
        Self {
            sender: Mutex::new(sender),
            threads: Mutex::new(threads),
            pending,
        }
    }

    /// Queues a retirement; gives it back if the reaper is stopped.
    fn send(&self, r: Retirement, served: Served) -> Result<(), Box<Retirement>> {
        let Ok(guard) = self.sender.lock() else {
            return Err(Box::new(r));
        };
        let Some(sender) = guard.as_ref() else {
            return Err(Box::new(r));
        };
        let (count, _) = &*self.pending;
        if let Ok(mut n) = count.lock() {
            *n += 1;
        }
        sender.send((r, served)).map_err(|mpsc::SendError((r, _))| {
            if let Ok(mut n) = count.lock() {
                *n = n.saturating_sub(1);
            }
            Box::new(r)
        })
    }

    /// Destroys the domain of a normally ended transaction without a thread of ours waiting:
    /// the backend calls back when it is gone, and the audit records are appended then.
    fn retire_in_background(&self, ledger: &Ledger, r: Retirement, served: Served) {
        if let Ok(mut n) = self.pending.0.lock() {
            *n += 1;
        }
        let Retirement { domain, ended } = r;
        let (ledger, pending) = (ledger.clone(), Arc::clone(&self.pending));
        domain.destroy_in_background(Box::new(move |disposed| {
            record_end(&ledger, ended, served, disposed);
            let (count, cv) = &*pending;
            if let Ok(mut n) = count.lock() {
                *n = n.saturating_sub(1);
                cv.notify_all();
            }
        }));
    }

    /// Blocks until every queued retirement is done.
    /// Waits until no retirement is pending, or `limit` passes; returns how many still are.
    fn wait_idle(&self, limit: Option<Duration>) -> usize {
        let deadline = limit.and_then(|l| Instant::now().checked_add(l));
        let (count, cv) = &*self.pending;
        let Ok(mut n) = count.lock() else {
            return 0;
        };
        while *n > 0 {
            let wait = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return *n,
                },
            };
            n = match wait {
                None => match cv.wait(n) {
                    Ok(n) => n,
                    Err(_) => return 0,
                },
                Some(left) => match cv.wait_timeout(n, left) {
                    Ok((n, _)) => n,
                    Err(_) => return 0,
                },
            };
        }
        0
    }

    /// Destroys everything queued, then stops the threads.
    fn stop(&self) {
        if let Ok(mut s) = self.sender.lock() {
            *s = None;
        }
        if let Ok(mut threads) = self.threads.lock() {
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.reaper.stop();
        self.refusals.stop();
    }
}
