//! Mayfly's verifiable ledger: the shared database, its checkpoints and its audit log, in
//! one LMDB environment (via `heed`).
//!
//! Every committed transaction leaves a [`Checkpoint`] (request, read set, write set with
//! before- and after-images) that commits in the same LMDB transaction as its data. The
//! checkpoints and the audit log are two hash chains; every group commit signs both tips
//! with the appliance's Ed25519 key. [`verify()`] walks everything and names the first bad
//! record.
//!
//! # On-disk layout
//!
//! One LMDB environment in the data directory (`data.mdb`, `lock.mdb`), plus the signing
//! key `signing.key` (PKCS#8, mode 0600). Named databases, all created in one write
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

#![deny(missing_docs)]

pub mod audit;
pub mod checkpoint;
pub mod codec;
pub mod commit;
pub mod cursor;
pub mod domains;
pub mod head;
pub mod keys;
pub mod read;
pub mod rollback;
pub mod store;
#[cfg(feature = "test-tamper")]
pub mod tamper;
mod txn;
pub mod verify;

use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use slog::{info, o, warn, Logger};

pub use audit::{AuditEvent, AuditRecord, Severity};
pub use checkpoint::{Checkpoint, ReadEntry, WriteEntry};
pub use commit::{encode_deps, CommitError, CommitTicket};
pub use cursor::CursorError;
pub use domains::DomainNumberError;
pub use head::{SignedHead, Tip};
pub use keys::{KeyError, PublicKey, SigningKey};
pub use read::ReadError;
pub use rollback::{Record, RollbackError, RollbackPlan, RollbackRecord};
pub use store::{OpenError, Store, StoreOptions};
pub use txn::{ScanResult, Tx, TxContext, TxError};
pub use verify::{verify, Failure, Progress, VerifyReport};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Size caps, enforced when a transaction is built and again when a record is decoded.
pub mod limits {
    /// Longest key.
    pub const MAX_KEY: usize = 256;
    /// Longest value.
    pub const MAX_VALUE: usize = 64 << 10;
    /// Longest handler name.
    pub const MAX_HANDLER: usize = 64;
    /// Longest request.
    pub const MAX_REQUEST: usize = 64 << 10;
    /// Longest result.
    pub const MAX_RESULT: usize = 64 << 10;
    /// Most keys in a read set (scanned keys included).
    pub const MAX_READS: usize = 4096;
    /// Most keys in a write set.
    pub const MAX_WRITES: usize = 1024;
    /// Largest scan limit.
    pub const MAX_SCAN: usize = 1024;
    /// Most scans per transaction.
    pub const MAX_SCANS: usize = 64;
}

/// A transaction id: 16 bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId(pub [u8; 16]);

impl TxId {
    /// A new, time-ordered id: 8 bytes of Unix time in ns, then 8 random bytes from the
    /// system RNG. Ordered ids make the `tx_index` an append, not a random insert.
    pub fn generate() -> Self {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&now_ns().to_be_bytes());
        // The system RNG only fails when the OS has no entropy source at all; a repeated
        // id would then be refused as a duplicate at commit rather than go unnoticed.
        let _ = ring::rand::SystemRandom::new().fill(&mut b[8..]);
        Self(b)
    }

    /// Parses 32 hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        codec::unhex(s)?.try_into().ok().map(Self)
    }
}

impl std::fmt::Display for TxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&codec::hex(&self.0))
    }
}

impl std::fmt::Debug for TxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TxId({self})")
    }
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
}

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
}

impl Default for Options {
    fn default() -> Self {
        Self {
            store: StoreOptions::default(),
            max_group: 1024,
            queue_depth: 16 * 1024,
            create: true,
            track_dependencies: true,
        }
    }
}

pub(crate) struct Inner {
    pub store: Store,
    pub sender: Option<SyncSender<commit::Envelope>>,
    committer: Option<JoinHandle<()>>,
    tips: Arc<Mutex<Tips>>,
    public_key: PublicKey,
    signing_key: Arc<Mutex<PublicKey>>,
    domains: domains::DomainNumbers,
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
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("dir", &self.inner.store.dir)
            .finish()
    }
}

/// Up to `max` sequences as a comma-separated list, for an audit field.
fn join_seqs(seqs: &[u64], max: usize) -> String {
    let mut s: Vec<String> = seqs.iter().take(max).map(ToString::to_string).collect();
    if seqs.len() > max {
        s.push(format!("... ({} in all)", seqs.len()));
    }
    s.join(",")
}

pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Ledger {
    /// Opens the ledger in `dir`, creating it and its signing key on first start when
    /// `opts.create` is set. Appends a durable `ledger.opened` (or `ledger.created`) audit
    /// event before returning.
    pub fn open(dir: &Path, opts: &Options, log: &Logger) -> Result<Self, OpenError> {
        let log = log.new(o!("component" => "ledger"));
        let (mut store, fresh) = match store::Store::open(dir, &opts.store, opts.create)? {
            store::Opened::Created(s) => (s, true),
            store::Opened::Existing(s) => {
                let fresh = opts.create && s.meta_is_empty()?;
                (s, fresh)
            }
        };
        // The rolled-back index is unsigned: it is rebuilt from the signed rollback records
        // at every read-write open (a new ledger has it from its creation, and is marked
        // complete after its first commit below).
        let undone_built = if fresh {
            None
        } else {
            Some(store.ensure_undone_index()?)
        };
        let (key, state) = if fresh {
            let key = match SigningKey::load(dir) {
                Ok(k) => k,
                Err(KeyError::Missing { .. }) => SigningKey::generate(dir)?,
                Err(e) => return Err(e.into()),
            };
            (key, None)
        } else {
            let state = store.load_meta(true)?;
            let key = Self::current_key(dir, &state.signing_key)?;
            (key, Some(state))
        };
        let public_key = state.map_or_else(|| key.public_key(), |s| s.public_key);
        let shared_signing_key = Arc::new(Mutex::new(key.public_key()));
        let tips = state.map_or_else(Tips::default, |s| Tips {
            checkpoints: s.checkpoints,
            audit: s.audit,
            group: s.group,
        });
        let shared_tips = Arc::new(Mutex::new(tips));
        let mut committer = commit::Committer {
            store: store.clone(),
            key,
            checkpoints: tips.checkpoints,
            audit: tips.audit,
            group: tips.group,
            max_group: opts.max_group.max(1),
            track_dependencies: opts.track_dependencies,
            shared_tips: shared_tips.clone(),
            shared_signing_key: shared_signing_key.clone(),
            log: log.clone(),
        };
        let event = if fresh {
            AuditEvent::new("ledger.created", Severity::Notice)
        } else {
            AuditEvent::new("ledger.opened", Severity::Info)
        }
        .field("public_key", codec::hex(&public_key))
        .field("checkpoint_seq", tips.checkpoints.seq);
        let mut events = Vec::new();
        let event = match &undone_built {
            Some(built) if built.unreadable > 0 => event
                .field("undone_index_built_from", built.rollbacks)
                .field("undone_index_unreadable", built.unreadable),
            Some(built) => event.field("undone_index_built_from", built.rollbacks),
            None => event,
        };
        events.push(event);
        if let Some(built) = &undone_built {
            if let Some(first) = &built.first_repaired {
                warn!(log, "the stored undone index differed from the rollback records; rebuilt";
                      "entries" => built.repaired, "first" => %first);
                events.push(
                    AuditEvent::new("ledger.undone_index_repaired", Severity::Warning)
                        .field("entries", built.repaired)
                        .field("first_seq", first.seq)
                        .field("first", first.to_string()),
                );
            }
        }
        let first = committer
            .write_group(vec![commit::Job::Audit(events)], fresh)
            .and_then(|mut results| results.pop().unwrap_or(Err(CommitError::Closed)));
        if let Err(source) = first {
            return Err(OpenError::FirstCommit {
                path: dir.to_path_buf(),
                source,
            });
        }
        if fresh {
            // After the first commit: a start that stops before it leaves no meta behind.
            store.mark_undone_index()?;
        }
        info!(log, "ledger open"; "dir" => %dir.display(), "created" => fresh,
              "checkpoint_seq" => tips.checkpoints.seq, "public_key" => codec::hex(&public_key));

        let (sender, rx) = std::sync::mpsc::sync_channel(opts.queue_depth.max(1));
        let handle = std::thread::Builder::new()
            .name("ledger-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(OpenError::Thread)?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                sender: Some(sender),
                committer: Some(handle),
                tips: shared_tips,
                public_key,
                signing_key: shared_signing_key,
                domains: domains::DomainNumbers::new(),
            }),
        })
    }

    /// The key in `signing.key` if it is the one the ledger says signs (`expected`). A key
    /// rotation that committed but stopped before installing the new key file is finished
    /// here; a `signing.key.next` left by one that never committed is discarded.
    fn current_key(dir: &Path, expected: &PublicKey) -> Result<SigningKey, OpenError> {
        let key = SigningKey::load(dir)?;
        if key.public_key() == *expected {
            SigningKey::discard_next(dir)?;
            return Ok(key);
        }
        if let Ok(next) = SigningKey::load_next(dir) {
            if next.public_key() == *expected {
                SigningKey::install_next(dir)?;
                return Ok(next);
            }
        }
        Err(OpenError::KeyMismatch {
            path: dir.to_path_buf(),
            found: codec::hex(&key.public_key()),
            expected: codec::hex(expected),
        })
    }

    /// Begins a transaction reading from the current committed state.
    pub fn begin(&self, ctx: TxContext) -> Result<Tx, TxError> {
        if !checkpoint::valid_handler(&ctx.handler) {
            return Err(TxError::BadHandler(ctx.handler));
        }
        if ctx.request.len() > limits::MAX_REQUEST {
            return Err(TxError::RequestTooLarge {
                len: ctx.request.len(),
                max: limits::MAX_REQUEST,
            });
        }
        let snapshot = self.inner.store.env.clone().static_read_txn()?;
        Ok(Tx {
            inner: self.inner.clone(),
            snapshot,
            ctx,
            begin_ns: now_ns(),
            entropy_seed: [0; 32],
            client: None,
            reads: Default::default(),
            writes: Default::default(),
            scans: Vec::new(),
        })
    }

    /// Appends audit events and waits until they are durable.
    pub fn audit(&self, events: Vec<AuditEvent>) -> Result<Receipt, CommitError> {
        self.submit_audit(events)?.wait()
    }

    /// Queues audit events; the ticket resolves when they are durable.
    pub fn submit_audit(&self, events: Vec<AuditEvent>) -> Result<CommitTicket, CommitError> {
        for ev in &events {
            ev.validate()?;
        }
        commit::submit(&self.inner, commit::Job::Audit(events))
    }

    /// Appends audit events without waiting and without forcing a commit of their own: they
    /// join the next group commit, or are committed alone after at most
    /// [`commit::LAZY_AUDIT_DELAY`] (50 ms). For routine lifecycle records; anything an
    /// operator must be able to rely on after a crash goes through [`Ledger::audit`].
    pub fn audit_lazily(&self, events: Vec<AuditEvent>) -> Result<(), CommitError> {
        for ev in &events {
            ev.validate()?;
        }
        commit::submit(&self.inner, commit::Job::LazyAudit(events)).map(drop)
    }

    /// Rolls back the commits `roots` (and, with `cascade`, every later commit that read what
    /// they wrote, transitively) in one atomic, signed record appended to the checkpoint
    /// chain, with a `rollback.applied` audit record. Re-plans when concurrent commits
    /// change what the plan covers. Returns the plan applied and its receipt.
    /// `policy_hash` is the bundle whose decision the rollback carries out; 32 zero bytes
    /// for a manual (admin console) rollback (formats.md §1.6).
    pub fn rollback(
        &self,
        roots: &[u64],
        cascade: bool,
        reason: &str,
        policy_hash: Hash,
    ) -> Result<(RollbackPlan, Receipt), RollbackError> {
        const ATTEMPTS: u32 = 16;
        let reason: String = reason.chars().take(rollback::MAX_REASON / 4).collect();
        for _ in 0..ATTEMPTS {
            let plan = self.store().plan_rollback(roots, cascade)?;
            let rollback_id = TxId::generate();
            let event = AuditEvent::new("rollback.applied", Severity::Notice)
                .field("rollback_id", rollback_id)
                .field("roots", join_seqs(&plan.roots, 64))
                .field("affected", plan.affected.len())
                .field("restored_keys", plan.writes.len())
                .field("cascade", cascade)
                .field("reason", &reason);
            let job = commit::RollbackJob {
                plan: plan.clone(),
                rollback_id,
                reason: reason.clone(),
                policy_hash,
                audit: vec![event],
            };
            match commit::submit(&self.inner, commit::Job::Rollback(Box::new(job)))?.wait() {
                Ok(receipt) => return Ok((plan, receipt)),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RollbackError::Contended { attempts: ATTEMPTS })
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
        let job = commit::NonceJob {
            nonce,
            expires_ns,
            body_hash,
            prune_before_ns,
            audit: events,
        };
        commit::submit(&self.inner, commit::Job::AdminNonce(Box::new(job)))?.wait()
    }

    /// Rotates the appliance signing key: generates a new key, and commits a key-rotation
    /// head signed by the current key that names the new one, with a `key.rotated` audit
    /// record and `events`. Every later head is signed by the new key; the old private key
    /// is deleted. Returns the new public key and the receipt.
    pub fn rotate_key(&self, events: Vec<AuditEvent>) -> Result<(PublicKey, Receipt), CommitError> {
        for ev in &events {
            ev.validate()?;
        }
        let receipt = commit::submit(&self.inner, commit::Job::RotateKey(events))?.wait()?;
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
