//! Why a commit (or an audit append) did not happen: [`CommitError`], shared by the
//! committer, the transactions and rollbacks that submit to it, and the open that makes
//! the first commit.
//!
//! Vocabulary: uses [`crate::audit`] (an invalid event) and [`crate::types`].

use std::path::Path;
use std::sync::Arc;

use crate::audit::AuditError;
use crate::types::TxId;

/// Why a commit (or an audit append) did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// A key the transaction read has changed since: retry the transaction.
    #[error("conflict on key {key}: read version {read}, now {current}")]
    Conflict {
        /// Hex of the key.
        key: String,
        /// Version the transaction saw.
        read: u64,
        /// Version now committed.
        current: u64,
    },
    /// A range the transaction scanned has changed since: retry the transaction.
    #[error("conflict in scanned range starting at {start}: {reason}")]
    ScanConflict {
        /// Hex of the range start.
        start: String,
        /// First difference found.
        reason: String,
    },
    /// What a rollback planned has changed before it could commit: plan again.
    #[error("rollback plan is stale: {reason}")]
    StaleRollback {
        /// What changed.
        reason: String,
    },
    /// A transaction with this id has already committed.
    #[error("transaction {0} has already committed")]
    DuplicateTxId(TxId),
    /// The handler's result is above the cap.
    #[error("result of {len} bytes is above the limit of {max}")]
    ResultTooLarge {
        /// Length.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// The checkpoint would be above the cap.
    #[error("checkpoint of {len} bytes would be above the limit of {max}")]
    CheckpointTooLarge {
        /// Length.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// An attached audit event is invalid.
    #[error("invalid audit event: {0}")]
    Audit(#[from] AuditError),
    /// A stored data value is malformed.
    #[error("stored value of key {key} is malformed")]
    Corrupt {
        /// Hex of the key.
        key: String,
    },
    /// The filesystem is full; nothing of this group was committed.
    #[error("disk full ({free} bytes free) while committing a group of {group_size}; nothing of it was committed")]
    DiskFull {
        /// Jobs in the failed group.
        group_size: usize,
        /// Bytes available on the ledger's filesystem after the failure.
        free: u64,
    },
    /// The LMDB map is full; nothing of this group was committed.
    #[error(
        "ledger map full at its bound (raise --max-map-size-mib, or free space); nothing of a group of {group_size} was committed"
    )]
    MapFull {
        /// Jobs in the failed group.
        group_size: usize,
    },
    /// Another storage failure; nothing of this group was committed.
    #[error("storage failure, nothing of a group of {group_size} was committed: {source}")]
    Storage {
        /// Jobs in the failed group.
        group_size: usize,
        /// LMDB's error.
        source: Arc<heed::Error>,
    },
    /// An admin command nonce has been used before (a replay).
    #[error("nonce {nonce} was already used by a command accepted earlier (replay)")]
    NonceReused {
        /// Hex of the nonce.
        nonce: String,
    },
    /// The `nonces` database holds as many live nonces as it may.
    #[error(
        "{live} unexpired admin nonces are recorded, the most allowed; wait for some to expire"
    )]
    TooManyNonces {
        /// Live nonces.
        live: u64,
    },
    /// A key rotation could not be started (the incoming key file).
    #[error("key rotation: {reason}")]
    KeyRotation {
        /// What failed, with the path.
        reason: String,
    },
    /// The client's idempotency key is already recorded with another commit (a resend
    /// that raced the original, or one that arrived after a failover).
    #[error("idempotency key already recorded with commit {seq}")]
    IdempotencyKeyUsed {
        /// The commit that recorded it.
        seq: u64,
    },
    /// The ledger is shut down.
    #[error("ledger is closed")]
    Closed,
}

impl CommitError {
    /// Whether retrying the same transaction from the start may succeed.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Self::Conflict { .. } | Self::ScanConflict { .. } | Self::StaleRollback { .. }
        )
    }

    /// Classifies an LMDB failure. LMDB reports a short write as EIO, which on a full
    /// filesystem is what ENOSPC looks like, so an I/O error with (almost) no free space
    /// left is reported as a full disk.
    pub(crate) fn from_storage(e: heed::Error, group_size: usize, dir: &Path) -> Self {
        const NEARLY_FULL: u64 = 1 << 20;
        // fsblkcnt_t and c_ulong are narrower than u64 on 32-bit targets.
        #[allow(clippy::useless_conversion)]
        let free = || {
            nix::sys::statvfs::statvfs(dir)
                .map(|s| {
                    u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size()))
                })
                .ok()
        };
        let io_like = match &e {
            heed::Error::Io(_) => true,
            heed::Error::Mdb(heed::MdbError::Other(code)) => *code == 28 || *code == 5,
            _ => false,
        };
        match &e {
            heed::Error::Mdb(heed::MdbError::MapFull) => Self::MapFull { group_size },
            _ if io_like => match free() {
                Some(free) if free < NEARLY_FULL => Self::DiskFull { group_size, free },
                _ => Self::Storage {
                    group_size,
                    source: Arc::new(e),
                },
            },
            _ => Self::Storage {
                group_size,
                source: Arc::new(e),
            },
        }
    }
}
