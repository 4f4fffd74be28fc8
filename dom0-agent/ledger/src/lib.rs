//! Mayfly's verifiable ledger: the shared database, its checkpoints and its audit log, in
//! one LMDB environment (via `heed`).
//!
//! Every committed transaction leaves a [`Checkpoint`] (request, read set, write set with
//! before- and after-images) that commits in the same LMDB transaction as its data. The
//! checkpoints and the audit log are two hash chains; every group commit signs both tips
//! with the appliance's Ed25519 key, together with a digest of the live `data` database
//! ([`state`]). [`verify()`] walks everything, names the first bad record, and names the
//! live keys that differ from what the chain committed.
//!
//! # On-disk layout
//!
//! One LMDB environment in the data directory (`data.mdb`, `lock.mdb`), plus the signing
//! key: `signing.key` (PKCS#8, mode 0600) with the file key source, or the TPM-sealed
//! `signing.sealed` (and `signing.sealed.alt`) with the `tpm` source ([`keys::KeyStore`]). Named databases, all created in one write
//! transaction on first start (names in [`store::names`]); integers are big-endian so that
//! LMDB's byte order is numeric order:
//!
//! ```text
//! database     key                                   value
//! meta         b"format"                             b"MAYFLY-LEDGER" || u32 layout version (1)
//!              b"public_key"                         32-byte Ed25519 public key of the ledger
//!              b"checkpoint_tip", b"audit_tip"       u64 seq || 32-byte chain hash
//!              b"group"                              u64 last group-commit sequence
//!              b"signing_key"                        32-byte key signing new heads, once a
//!                                                    key rotation has happened (else absent)
//!              b"state"                              live-state digest after the last group
//!                                                    (state.rs; its hash is in every head)
//! data         application key (1..=256 bytes)       0x01 || u64 version || value   (live)
//!                                                    0x02 || u64 version            (tombstone)
//! checkpoints  u64 commit seq                        checkpoint encoding (checkpoint.rs)
//! audit        u64 audit seq                         audit record encoding (audit.rs)
//! heads        u64 group seq                         signed head (head.rs)
//! tx_index     16-byte transaction id                u64 commit seq
//! deps         u64 commit seq                        ascending u64 seqs whose versions it read
//! nonces       16-byte admin command nonce           u64 expires_ns || 32-byte SHA-256 of the
//!                                                    command body (pruned after expiry)
//! cursors      exporter name (1..=64 bytes)          b"MFCU" || u8 1 || u64 last delivered audit seq
//! idempotency  0x01 || SHA-256 of (client, key)      u64 commit seq || u64 commit_ns
//!              0x02 || u64 commit seq                32-byte hash || u64 commit_ns (idempotency.rs)
//! ```
//!
//! A data version is the commit sequence of the checkpoint that wrote it; 0 means "never
//! written". The bookkeeping rollback needs is kept where it costs least to write:
//!
//! * **per-key writer history** is a linked list through the checkpoints themselves: the
//!   data value names its last writer, and each write-set entry names the writer before
//!   (`before_version`). [`Store::writers_of`] walks it.
//! * **read-from dependencies** are the `deps` database, keyed by the reader's commit
//!   sequence, so every commit *appends* one small record. Dependencies only point back in
//!   time, so the transitive set of transactions affected by `T` is one forward pass over
//!   `deps` from `T` ([`Store::affected_by`]), with no decoding of checkpoints.
//!
//! A reverse index keyed by writer (or a history keyed by data key) would dirty one random
//! B-tree page per entry on every commit; measured, it made checkpoints cost 3-4x a raw
//! put. See `docs/decisions/0002-dependency-bookkeeping.md`.
//!
//! # Layers
//!
//! Every module uses only modules below it (`scripts/check-import-cycles.py` keeps the
//! crate free of import circles); this root only declares modules and re-exports.
//!
//! ```text
//! top         open          Ledger::open: store, key, indexes, state check, first commit
//! engine      replication   verify   rollback   txn   commit (the committer's thread)
//!                                                      └ group (one group, one write txn)
//! handle      ledger        Ledger, Options, Inner, submit; the methods that only submit
//! queue       job           jobs, CommitTicket, GroupObserver, Receipt, Tips, TxContext
//! tables      undone   idempotency   domains   capacity   cursor
//! queries     read          ReadError
//! LMDB        store         environment, databases, meta, resize gate; OpenError (tamper)
//! formats     state → record, value → checkpoint;  head;  audit ← commit_error
//! vocabulary  codec   limits   types (Hash, TxId)   keys   group_stats
//! ```
//!
//! `impl Ledger` and `impl Store` blocks are spread over the modules that need what they
//! use: `Ledger::begin` is in `txn`, `Ledger::rollback` and `Store::plan_rollback` in
//! [`rollback`], the queries in [`read`], `Store::undone_by` in `undone`,
//! `Store::idempotent_commit` in [`idempotency`].

#![deny(missing_docs)]

pub mod audit;
pub mod capacity;
pub mod checkpoint;
pub mod codec;
pub mod commit;
mod commit_error;
pub mod cursor;
pub mod domains;
mod group;
pub mod group_stats;
pub mod head;
pub mod idempotency;
mod job;
pub mod keys;
mod ledger;
pub mod limits;
mod open;
pub mod promotion;
pub mod read;
mod recheck;
mod record;
pub mod replication;
pub mod rollback;
pub mod state;
pub mod store;
#[cfg(feature = "test-tamper")]
pub mod tamper;
mod txn;
mod types;
mod undone;
mod value;
pub mod verify;

pub use audit::{AuditEvent, AuditRecord, Severity};
pub use checkpoint::{Checkpoint, ReadEntry, WriteEntry};
pub use commit_error::CommitError;
pub use cursor::CursorError;
pub use domains::DomainNumberError;
pub use group_stats::{GroupStats, Histogram};
pub use head::{Promotion, SignedHead, Tip};
pub use job::{CommitTicket, GroupObserver, Receipt, Tips, TxContext};
pub use keys::{FileKeys, KeyError, KeyStore, PublicKey, SigningKey};
pub use ledger::{Ledger, Options};
pub use limits::DEFAULT_SNAPSHOT_HOLD;
pub use promotion::{EpochStart, PromoteError, Promoted, PromotionRequest};
pub use read::ReadError;
pub use record::{Record, RollbackPlan, RollbackRecord};
pub use replication::Staging;
pub use replication::{Applied, ApplyError, ExportError, GroupRecords, Held, Replica};
pub use rollback::RollbackError;
pub use state::{StateDiff, StateDigest};
pub use store::{OpenError, Store, StoreOptions};
pub use txn::{ScanResult, Tx, TxError};
pub use types::{Hash, TxId};
pub use value::encode_deps;
pub use verify::{promotion_keys, verify, Failure, Progress, VerifyReport};
