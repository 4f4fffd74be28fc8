//! The [`Ledger`] handle: its definition and fields ([`Options`], the shared `Inner`), the
//! queue submission every job goes through, and the methods that only read its fields or
//! submit a job (audit appends, admin nonces, key rotation, tips, keys, capacity, domain
//! numbers).
//!
//! Above the tables it holds (store, domains, capacity, idempotency retention) and the
//! committer's queue ([`crate::job`]); below the modules that add the rest of its methods:
//! `txn` ([`Ledger::begin`]), [`crate::rollback`] ([`Ledger::rollback`]) and `open`
//! ([`Ledger::open`]).

use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::audit::AuditEvent;
use crate::capacity;
use crate::commit_error::CommitError;
use crate::domains::{self, DomainNumberError};
use crate::group_stats::{self, GroupStats};
use crate::idempotency;
use crate::job::{CommitTicket, Envelope, GroupObserver, Job, NonceJob, Receipt, Tips};
use crate::keys::{FileKeys, KeyStore, PublicKey};
use crate::store::{Store, StoreOptions};
use crate::types::Hash;

/// How to open a ledger.
#[derive(Debug, Clone)]
pub struct Options {
    /// LMDB settings.
    pub store: StoreOptions,
    /// Most jobs per group commit.
    pub max_group: usize,
    /// Most jobs waiting for the committer; submitters block beyond it.
    pub queue_depth: usize,
    /// Create the ledger (and its key) if the directory holds none.
    pub create: bool,
    /// Record read sets in checkpoints and `deps` (what rollback needs to find dependents).
    /// Off only to measure what tracking costs: without it a rollback cannot cascade.
    pub track_dependencies: bool,
    /// At open, recompute the live-state digest from the `data` database (a full scan) and
    /// refuse ([`crate::OpenError::StateMismatch`]) a state that differs from the one the last
    /// signed head commits to. Off only for ledgers too large to scan at every start: the
    /// skip is logged as a warning and audited.
    pub check_state: bool,
    /// Maintain the live-state digest and sign it in version-2 heads. Off only to measure
    /// what the digest costs (benchmarks): the committer then writes version-1 heads and no
    /// `meta/state`, as the release before it did. A ledger that already has a digest is
    /// refused with it off ([`crate::OpenError::DigestRequired`]).
    pub state_digest: bool,
    /// Where the signing key is kept ([`FileKeys`] by default; the agent's `[key]` section
    /// can name the TPM).
    pub keys: Arc<dyn KeyStore>,
    /// How many durable idempotency keys are kept, and for how long ([`idempotency`]).
    pub idempotency: idempotency::Retention,
    /// How long a transaction keeps its first read snapshot; past it the snapshot is given
    /// up after each operation and re-taken (with a re-check of the reads) at the next, so
    /// a long transaction cannot keep LMDB from reusing pages ([`crate::Tx`]).
    pub snapshot_hold: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            store: StoreOptions::default(),
            max_group: 1024,
            queue_depth: 16 * 1024,
            create: true,
            track_dependencies: true,
            check_state: true,
            state_digest: true,
            keys: Arc::new(FileKeys),
            idempotency: idempotency::Retention::default(),
            snapshot_hold: crate::limits::DEFAULT_SNAPSHOT_HOLD,
        }
    }
}

pub(crate) struct Inner {
    pub store: Store,
    pub sender: Option<SyncSender<Envelope>>,
    pub committer: Option<JoinHandle<()>>,
    pub tips: Arc<Mutex<Tips>>,
    pub public_key: PublicKey,
    pub signing_key: Arc<Mutex<PublicKey>>,
    pub domains: domains::DomainNumbers,
    pub capacity: Arc<Mutex<capacity::Shared>>,
    pub max_map: u64,
    pub group_stats: Arc<group_stats::GroupCounters>,
    pub keys: Arc<dyn KeyStore>,
    pub observer: Arc<std::sync::OnceLock<Arc<dyn GroupObserver>>>,
    /// [`Options::snapshot_hold`].
    pub snapshot_hold: std::time::Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.sender = None;
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
    }
}

/// An open ledger. Cheap to clone; the committer thread stops when the last clone (and the
/// last open transaction) is dropped.
#[derive(Clone)]
pub struct Ledger {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("dir", &self.inner.store.dir)
            .finish()
    }
}

/// Queues `job` for the committer; the ticket resolves when its group is durable.
pub(crate) fn submit(inner: &Inner, job: Job) -> Result<CommitTicket, CommitError> {
    let (reply, rx) = std::sync::mpsc::sync_channel(1);
    let sender = inner.sender.as_ref().ok_or(CommitError::Closed)?;
    sender
        .send(Envelope { job, reply })
        .map_err(|_| CommitError::Closed)?;
    Ok(CommitTicket { rx })
}

impl Ledger {
    /// Appends audit events and waits until they are durable.
    pub fn audit(&self, events: Vec<AuditEvent>) -> Result<Receipt, CommitError> {
        self.submit_audit(events)?.wait()
    }

    /// Queues audit events; the ticket resolves when they are durable.
    pub fn submit_audit(&self, events: Vec<AuditEvent>) -> Result<CommitTicket, CommitError> {
        for ev in &events {
            ev.validate()?;
        }
        submit(&self.inner, Job::Audit(events))
    }

    /// Appends audit events without waiting and without forcing a commit of their own: they
    /// join the next group commit, or are committed alone after at most
    /// [`crate::commit::LAZY_AUDIT_DELAY`] (50 ms). For routine lifecycle records; anything an
    /// operator must be able to rely on after a crash goes through [`Ledger::audit`].
    pub fn audit_lazily(&self, events: Vec<AuditEvent>) -> Result<(), CommitError> {
        for ev in &events {
            ev.validate()?;
        }
        submit(&self.inner, Job::LazyAudit(events)).map(drop)
    }

    pub(crate) fn capacity_shared(&self) -> std::sync::MutexGuard<'_, capacity::Shared> {
        self.inner
            .capacity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Space used and left, the growth rate and projected time to full, and whether
    /// transactions are refused for lack of space.
    pub fn capacity(&self) -> Option<capacity::Capacity> {
        capacity::report(
            &self.inner.store,
            self.inner.max_map,
            &self.capacity_shared(),
        )
    }

    /// Appends audit events now if storage allows, else keeps them and writes them as soon
    /// as it does (retried every second); returns at once. For records that must not stop
    /// the agent when the disk is full (its start, its stop).
    pub fn audit_deferred(&self, events: Vec<AuditEvent>) -> Result<(), CommitError> {
        for ev in &events {
            ev.validate()?;
        }
        submit(&self.inner, Job::Deferred(events))?.wait().map(drop)
    }

    /// Sets the observer the committer tells about every durable group from now on (the
    /// replication of a primary, issue 18), before the group's commits are acknowledged.
    /// Once per ledger: returns `false` (and changes nothing) if one is set already.
    pub fn set_group_observer(&self, observer: Arc<dyn GroupObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// The observer set with [`Ledger::set_group_observer`], if any (for tests and
    /// tools that drive it as the committer does).
    pub fn group_observer(&self) -> Option<Arc<dyn GroupObserver>> {
        self.inner.observer.get().cloned()
    }

    /// What the group committer has done since this ledger was opened: jobs per durable
    /// group, the time of each group's LMDB commit (its fsync), and the groups that failed.
    /// Read from atomics; never waits for the committer.
    pub fn group_stats(&self) -> GroupStats {
        self.inner.group_stats.snapshot()
    }

    /// Durable tips of both chains.
    pub fn tips(&self) -> Tips {
        self.inner.tips.lock().map(|t| *t).unwrap_or_default()
    }

    /// The ledger's first public key: its identity and the root of trust `verify` starts
    /// from. Key rotations do not change it.
    pub fn public_key(&self) -> PublicKey {
        self.inner.public_key
    }

    /// Where the signing key is kept: `file` or `tpm`, with what the source reports about
    /// itself (never key material).
    pub fn key_source(&self) -> (&'static str, Vec<(&'static str, String)>) {
        (self.inner.keys.source(), self.inner.keys.describe())
    }

    /// The key that signs new heads (the first key until a rotation).
    pub fn signing_key(&self) -> PublicKey {
        self.inner
            .signing_key
            .lock()
            .map(|k| *k)
            .unwrap_or(self.inner.public_key)
    }

    /// Records an admin command's `nonce` (valid until `expires_ns`) together with
    /// `events`, durably, in one commit; refuses a nonce already recorded
    /// ([`CommitError::NonceReused`]: a replay), in which case nothing is written. Nonces
    /// that expired before `prune_before_ns` are pruned in the same commit.
    pub fn record_admin_nonce(
        &self,
        nonce: [u8; 16],
        expires_ns: u64,
        body_hash: Hash,
        prune_before_ns: u64,
        events: Vec<AuditEvent>,
    ) -> Result<Receipt, CommitError> {
        for ev in &events {
            ev.validate()?;
        }
        let job = NonceJob {
            nonce,
            expires_ns,
            body_hash,
            prune_before_ns,
            audit: events,
        };
        submit(&self.inner, Job::AdminNonce(Box::new(job)))?.wait()
    }

    /// Rotates the appliance signing key: generates a new key, and commits a key-rotation
    /// head signed by the current key that names the new one, with a `key.rotated` audit
    /// record and `events`. Every later head is signed by the new key; the old private key
    /// is deleted. Returns the new public key and the receipt.
    pub fn rotate_key(&self, events: Vec<AuditEvent>) -> Result<(PublicKey, Receipt), CommitError> {
        for ev in &events {
            ev.validate()?;
        }
        let receipt = submit(&self.inner, Job::RotateKey(events))?.wait()?;
        Ok((self.signing_key(), receipt))
    }

    /// The underlying store, for reads and verification.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A domain number never handed out before in this ledger, for the checkpoint and the
    /// audit records of one domain ([`domains`]).
    pub fn next_domain_number(&self) -> Result<u64, DomainNumberError> {
        self.inner.domains.next(&self.inner.store)
    }
}
