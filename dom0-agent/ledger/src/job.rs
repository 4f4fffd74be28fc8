//! The committer's queue, as its callers see it: the jobs they submit (a prepared
//! transaction with its [`TxContext`], audit events, a rollback plan, an admin nonce, a key
//! rotation), the ticket they wait on, and what a commit produces ([`Receipt`], [`Tips`]).
//!
//! Below the committer ([`crate::commit`]) and every module that submits to it (`txn`,
//! [`crate::rollback`], the [`crate::Ledger`] methods): uses only the record formats
//! ([`crate::audit`], [`crate::head`], `record`), [`crate::CommitError`] and the vocabulary.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::mpsc::{Receiver, SyncSender};

use crate::audit::AuditEvent;
use crate::commit_error::CommitError;
use crate::head::Tip;
use crate::record::RollbackPlan;
use crate::types::{Hash, TxId};

/// Who runs the transaction and why; recorded in its checkpoint.
#[derive(Debug, Clone)]
pub struct TxContext {
    /// Transaction id (unique; a second commit under the same id is refused).
    pub tx_id: TxId,
    /// Handler name, `[a-z0-9_.-]{1,64}`.
    pub handler: String,
    /// The client's request bytes.
    pub request: Vec<u8>,
    /// Domain the transaction runs in.
    pub domain_id: u64,
    /// Hash of the active policy bundle.
    pub policy_hash: Hash,
}

/// A scanned range and what it contained, for validation at commit.
#[derive(Debug, Clone)]
pub(crate) struct ScanRecord {
    pub start: Vec<u8>,
    pub end: Bound<Vec<u8>>,
    pub seen: Vec<(Vec<u8>, u64)>,
}

/// What a successful commit or audit append produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Commit sequence of the checkpoint (0 for an audit-only append).
    pub seq: u64,
    /// Chain hash of that checkpoint (of the audit tip for an audit-only append).
    pub hash: Hash,
    /// Audit sequence after this job.
    pub audit_seq: u64,
    /// Group commit that made it durable.
    pub group: u64,
}

/// Durable tips of both chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tips {
    /// Checkpoint chain.
    pub checkpoints: Tip,
    /// Audit chain.
    pub audit: Tip,
    /// Last group commit.
    pub group: u64,
    /// Epoch of the last signed head (raised by each promotion of a standby; 0 before).
    pub epoch: u64,
}

/// A transaction ready for validation.
#[derive(Debug)]
pub(crate) struct PreparedTx {
    pub ctx: TxContext,
    pub begin_ns: u64,
    pub entropy_seed: Hash,
    pub client: Option<String>,
    pub idempotency_key: Option<String>,
    pub reads: BTreeMap<Vec<u8>, u64>,
    pub writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub scans: Vec<ScanRecord>,
    pub result: Vec<u8>,
    pub audit: Vec<AuditEvent>,
}

/// Work for the committer.
#[derive(Debug)]
pub(crate) enum Job {
    Commit(Box<PreparedTx>),
    Audit(Vec<AuditEvent>),
    /// Audit events that need not force a commit of their own: they join the next group,
    /// or are committed alone after [`LAZY_AUDIT_DELAY`] if nothing else comes.
    LazyAudit(Vec<AuditEvent>),
    /// Apply a planned rollback.
    Rollback(Box<RollbackJob>),
    /// Record an admin command's nonce (refused if already there), with its audit events.
    AdminNonce(Box<NonceJob>),
    /// Hand signing over to a new key, with the audit events that go with it.
    RotateKey(Vec<AuditEvent>),
    /// Audit events to write as soon as storage allows: kept (and retried) while the disk
    /// or the map is full. Answered at once.
    Deferred(Vec<AuditEvent>),
}

/// An admin command nonce to record.
#[derive(Debug)]
pub(crate) struct NonceJob {
    pub nonce: [u8; 16],
    pub expires_ns: u64,
    pub body_hash: Hash,
    pub prune_before_ns: u64,
    pub audit: Vec<AuditEvent>,
}

/// A planned rollback, with what its record needs besides the plan.
#[derive(Debug)]
pub(crate) struct RollbackJob {
    pub plan: RollbackPlan,
    pub rollback_id: TxId,
    pub reason: String,
    pub policy_hash: Hash,
    pub audit: Vec<AuditEvent>,
}

pub(crate) struct Envelope {
    pub job: Job,
    pub reply: SyncSender<Result<Receipt, CommitError>>,
}

/// Told by the committer about every durable group, in order, from the committer's thread
/// (see [`crate::Ledger::set_group_observer`]).
pub trait GroupObserver: Send + Sync {
    /// Group `group` is durable. With `acknowledging`, commits of it are about to be
    /// acknowledged to their callers, who wait until this returns: a synchronous standby
    /// is waited for here. Must never submit to the ledger and wait (the committer is
    /// this thread).
    fn durable(&self, group: u64, acknowledging: bool);

    /// Whether the observer takes groups before they are committed ([`Self::tentative`]):
    /// asked once per group, only when an observer is set.
    fn wants_tentative(&self) -> bool {
        false
    }

    /// Group `group` is written and signed in the committer's write transaction, which is
    /// about to be committed: its bytes are final, but it is not durable yet. Either
    /// [`Self::durable`] (its commit succeeded) or [`Self::abandoned`] (it failed) follows.
    /// Must not block.
    fn tentative(&self, group: u64, records: crate::replication::GroupRecords) {
        let _ = (group, records);
    }

    /// The commit of the tentative group `group` failed: it does not exist. Called before
    /// any caller of the group is answered.
    fn abandoned(&self, group: u64) {
        let _ = group;
    }
}

/// A queued commit; [`CommitTicket::wait`] blocks until its group is durable.
#[derive(Debug)]
#[must_use = "a commit is only known durable once wait() returns Ok"]
pub struct CommitTicket {
    pub(crate) rx: Receiver<Result<Receipt, CommitError>>,
}

impl CommitTicket {
    /// Waits for the outcome.
    pub fn wait(self) -> Result<Receipt, CommitError> {
        self.rx.recv().unwrap_or(Err(CommitError::Closed))
    }
}
