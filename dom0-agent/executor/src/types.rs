//! The executor's vocabulary: its limits, a transaction's request and outcome, and why a
//! transaction could not run. Every other module of the crate uses these; this one uses
//! none of them (but the refusal table's configuration, which is part of the limits).

use std::time::Duration;

use mayfly_domain::{DomainError, DomainExit};
use mayfly_ledger::{TxError, TxId};

use crate::refusals::RefusalConfig;

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

/// The outcome of `Executor::execute`.
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

/// What serving one domain came to (inside the crate: the session's result, the
/// retirement's input).
#[derive(Clone)]
pub(crate) enum Served {
    Committed { seq: u64, result: Vec<u8> },
    Aborted { reason: String },
    Conflict,
    Failed(Failure),
}
