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

#![deny(missing_docs)]

pub mod audit;
pub mod capacity;
pub mod checkpoint;
pub mod codec;
pub mod commit;
pub mod cursor;
pub mod domains;
pub mod group_stats;
pub mod head;
pub mod idempotency;
pub mod keys;
pub mod promotion;
pub mod read;
pub mod replication;
pub mod rollback;
pub mod state;
pub mod store;
#[cfg(feature = "test-tamper")]
pub mod tamper;
mod txn;
pub mod verify;

use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use slog::{error, info, o, warn, Logger};

pub use audit::{AuditEvent, AuditRecord, Severity};
pub use checkpoint::{Checkpoint, ReadEntry, WriteEntry};
pub use commit::{encode_deps, CommitError, CommitTicket, GroupObserver};
pub use cursor::CursorError;
pub use domains::DomainNumberError;
pub use group_stats::{GroupStats, Histogram};
pub use head::{Promotion, SignedHead, Tip};
pub use keys::{FileKeys, KeyError, KeyStore, PublicKey, SigningKey};
pub use promotion::{EpochStart, PromoteError, Promoted, PromotionRequest};
pub use read::ReadError;
pub use replication::{Applied, ApplyError, ExportError, GroupRecords, Held, Replica};
pub use rollback::{Record, RollbackError, RollbackPlan, RollbackRecord};
pub use state::{StateDiff, StateDigest};
pub use store::{OpenError, Store, StoreOptions};
pub use txn::{ScanResult, Tx, TxContext, TxError};
pub use verify::{promotion_keys, verify, Failure, Progress, VerifyReport};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Size caps, enforced when a transaction is built and again when a record is decoded.
pub mod limits {
    /// Longest key.
    pub const MAX_KEY: usize = 256;
    /// Longest value.
    pub const MAX_VALUE: usize = 64 << 10;
    /// Longest handler name.
    pub const MAX_HANDLER: usize = mayfly_names::MAX_HANDLER_NAME;
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
    /// Epoch of the last signed head (raised by each promotion of a standby; 0 before).
    pub epoch: u64,
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
    /// At open, recompute the live-state digest from the `data` database (a full scan) and
    /// refuse ([`OpenError::StateMismatch`]) a state that differs from the one the last
    /// signed head commits to. Off only for ledgers too large to scan at every start: the
    /// skip is logged as a warning and audited.
    pub check_state: bool,
    /// Maintain the live-state digest and sign it in version-2 heads. Off only to measure
    /// what the digest costs (benchmarks): the committer then writes version-1 heads and no
    /// `meta/state`, as the release before it did. A ledger that already has a digest is
    /// refused with it off ([`OpenError::DigestRequired`]).
    pub state_digest: bool,
    /// Where the signing key is kept ([`FileKeys`] by default; the agent's `[key]` section
    /// can name the TPM).
    pub keys: Arc<dyn KeyStore>,
    /// How many durable idempotency keys are kept, and for how long ([`idempotency`]).
    pub idempotency: idempotency::Retention,
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
    capacity: Arc<Mutex<capacity::Shared>>,
    max_map: u64,
    group_stats: Arc<group_stats::GroupCounters>,
    keys: Arc<dyn KeyStore>,
    observer: Arc<std::sync::OnceLock<Arc<dyn commit::GroupObserver>>>,
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
        let keys = opts.keys.clone();
        // The key first: a start that cannot sign writes nothing to the ledger. A key its
        // source will not release (a sealed key on another boot chain or TPM) leaves a
        // marker that the next start which can sign audits.
        let loaded = if fresh {
            match keys.load(dir) {
                Ok(k) => Ok((k, None)),
                Err(KeyError::Missing { .. }) => keys
                    .generate(dir)
                    .map(|k| (k, None))
                    .map_err(OpenError::from),
                Err(e) => Err(e.into()),
            }
        } else {
            store.load_meta(true).and_then(|state| {
                Self::current_key(&*keys, dir, &state.signing_key).map(|k| (k, Some(state)))
            })
        };
        let (key, state) = match loaded {
            Ok(loaded) => loaded,
            Err(OpenError::Key(e)) if e.is_unavailable() => {
                error!(log, "the signing key cannot be used: refusing to sign"; "error" => %e);
                key_marker::put(dir, &e.to_string());
                return Err(OpenError::Key(e));
            }
            Err(e) => return Err(e),
        };
        // The rolled-back index is unsigned: it is rebuilt from the signed rollback records
        // at every read-write open (a new ledger has it from its creation, and is marked
        // complete after its first commit below).
        let undone_built = if fresh {
            None
        } else {
            Some(store.ensure_undone_index()?)
        };
        store.ensure_idempotency_db()?;
        let public_key = state
            .as_ref()
            .map_or_else(|| key.public_key(), |s| s.public_key);
        let shared_signing_key = Arc::new(Mutex::new(key.public_key()));
        let tips = state.as_ref().map_or_else(Tips::default, |s| Tips {
            checkpoints: s.checkpoints,
            audit: s.audit,
            group: s.group,
            epoch: s.epoch,
        });
        let shared_tips = Arc::new(Mutex::new(tips));
        let (digest, check, mut events) = Self::open_state(
            &store,
            state.and_then(|s| s.state),
            fresh,
            opts.check_state,
            &log,
        )?;
        if !opts.state_digest && check.outcome != "new" && check.outcome != "created" {
            return Err(OpenError::DigestRequired {
                path: dir.to_path_buf(),
            });
        }
        let (state_entries, state_hash) = (digest.entries(), digest.hash());
        let shared_capacity = Arc::new(Mutex::new(capacity::Shared::default()));
        let observer = Arc::new(std::sync::OnceLock::new());
        let group_stats = Arc::new(group_stats::GroupCounters::default());
        let mut committer = commit::Committer {
            store: store.clone(),
            key,
            keys: keys.clone(),
            checkpoints: tips.checkpoints,
            audit: tips.audit,
            group: tips.group,
            epoch: tips.epoch,
            idempotency: opts.idempotency,
            observer: observer.clone(),
            observed: tips.group,
            state: digest,
            maintain_state: opts.state_digest,
            max_map_size: opts.store.max_map_size.max(opts.store.map_size),
            capacity: shared_capacity.clone(),
            pending: Vec::new(),
            max_group: opts.max_group.max(1),
            track_dependencies: opts.track_dependencies,
            shared_tips: shared_tips.clone(),
            shared_signing_key: shared_signing_key.clone(),
            group_stats: group_stats.clone(),
            log: log.clone(),
        };
        let event = if fresh {
            AuditEvent::new("ledger.created", Severity::Notice)
        } else {
            AuditEvent::new("ledger.opened", Severity::Info)
        }
        .field("public_key", codec::hex(&public_key))
        .field("key_source", keys.source())
        .field("checkpoint_seq", tips.checkpoints.seq)
        .field("state_check", check.outcome)
        .field("state_entries", state_entries)
        .field("state_check_ms", check.ms)
        .field("state_hash", codec::hex(&state_hash));
        let event = match &undone_built {
            Some(built) if built.unreadable > 0 => event
                .field("undone_index_built_from", built.rollbacks)
                .field("undone_index_unreadable", built.unreadable),
            Some(built) => event.field("undone_index_built_from", built.rollbacks),
            None => event,
        };
        events.insert(0, event);
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
        let key_refused_before = key_marker::take(dir);
        if let Some(detail) = &key_refused_before {
            warn!(log, "an earlier start could not use the signing key"; "detail" => detail);
            events.push(
                AuditEvent::new("key.unavailable_earlier", Severity::Critical)
                    .field("key_source", keys.source())
                    .field("detail", detail),
            );
        }
        let refused_before = state_marker::take(dir);
        if let Some(detail) = &refused_before {
            events.push(
                AuditEvent::new("ledger.state_refused_earlier", Severity::Critical)
                    .field("detail", detail),
            );
        }
        let first = committer
            .write_group(vec![commit::Job::Audit(events.clone())], fresh)
            .and_then(|mut results| results.pop().unwrap_or(Err(CommitError::Closed)));
        match first {
            Ok(_) => {}
            // A full disk (or a map at its bound) must not keep the agent from starting:
            // it serves reads and refuses transactions until space returns; the start is
            // recorded then.
            Err(source @ (CommitError::DiskFull { .. } | CommitError::MapFull { .. }))
                if !fresh =>
            {
                warn!(log, "ledger opened on full storage: read-only until space returns"; "error" => %source);
                // A refusal noted by an earlier start stays in its marker until a start
                // can record it (this process may not live until space returns).
                if let Some(detail) = &refused_before {
                    state_marker::put_back(dir, detail);
                }
                if let Some(detail) = &key_refused_before {
                    key_marker::put(dir, detail);
                }
                events.retain(|e| {
                    e.event != "ledger.state_refused_earlier"
                        && e.event != "key.unavailable_earlier"
                });
                committer.pending = events;
                committer.after_open_failure(&source);
            }
            Err(source) => {
                if let Some(detail) = refused_before {
                    state_marker::put_back(dir, &detail);
                }
                if let Some(detail) = key_refused_before {
                    key_marker::put(dir, &detail);
                }
                return Err(OpenError::FirstCommit {
                    path: dir.to_path_buf(),
                    source,
                });
            }
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
                capacity: shared_capacity,
                max_map: u64::try_from(opts.store.max_map_size.max(opts.store.map_size))
                    .unwrap_or(u64::MAX),
                group_stats,
                keys,
                observer,
            }),
        })
    }

    /// The live-state digest the committer starts from, and the audit events that say how
    /// it was obtained. A ledger from before the digest existed gets it computed once; an
    /// existing one is recomputed from `data` and compared (unless `check` is off), and a
    /// mismatch is refused with the keys that differ from the checkpoint chain (and a marker
    /// file, audited at the next start that succeeds).
    fn open_state(
        store: &Store,
        recorded: Option<StateDigest>,
        fresh: bool,
        check: bool,
        log: &Logger,
    ) -> Result<(StateDigest, StateCheck, Vec<AuditEvent>), OpenError> {
        let scan = || -> Result<(StateDigest, u64), OpenError> {
            let started = std::time::Instant::now();
            let rtxn = store.read_txn().map_err(|e| store.storage_err(e))?;
            let d =
                StateDigest::compute(&rtxn, store.dbs.data).map_err(|e| store.storage_err(e))?;
            Ok((
                d,
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ))
        };
        match recorded {
            _ if fresh => {
                let (d, ms) = scan()?;
                Ok((d, StateCheck { outcome: "new", ms }, Vec::new()))
            }
            None => {
                let (d, ms) = scan()?;
                info!(log, "ledger from before the live-state digest: computed its first digest";
                      "entries" => d.entries(), "ms" => ms);
                Ok((
                    d,
                    StateCheck {
                        outcome: "created",
                        ms,
                    },
                    Vec::new(),
                ))
            }
            Some(recorded) if !check => {
                warn!(log, "LIVE-STATE CHECK SKIPPED (--skip-state-check): the data served has not been checked against the signed state digest";
                      "entries" => recorded.entries());
                let ev = AuditEvent::new("ledger.state_check_skipped", Severity::Warning)
                    .field("entries", recorded.entries());
                Ok((
                    recorded,
                    StateCheck {
                        outcome: "skipped",
                        ms: 0,
                    },
                    vec![ev],
                ))
            }
            Some(recorded) => {
                let (found, ms) = scan()?;
                if found == recorded {
                    info!(log, "live state matches the signed digest"; "entries" => found.entries(), "ms" => ms);
                    return Ok((recorded, StateCheck { outcome: "ok", ms }, Vec::new()));
                }
                let rtxn = store.read_txn().map_err(|e| store.storage_err(e))?;
                let diff = state::diff_against_chain(&rtxn, store.dbs.checkpoints, store.dbs.data)
                    .map_err(|e| store.storage_err(e))?;
                let detail = diff.describe();
                error!(log, "the live data does not match the signed state digest: refusing to serve it";
                       "detail" => &detail, "found_entries" => found.entries(), "expected_entries" => recorded.entries());
                state_marker::put(store.dir(), &detail);
                Err(OpenError::StateMismatch {
                    path: store.dir().to_path_buf(),
                    found: found.entries(),
                    expected: recorded.entries(),
                    detail,
                })
            }
        }
    }

    /// The key in `signing.key` if it is the one the ledger says signs (`expected`). A key
    /// rotation that committed but stopped before installing the new key file is finished
    /// here; a `signing.key.next` left by one that never committed is discarded.
    fn current_key(
        keys: &dyn KeyStore,
        dir: &Path,
        expected: &PublicKey,
    ) -> Result<SigningKey, OpenError> {
        let key = keys.load(dir)?;
        if key.public_key() == *expected {
            keys.discard_next(dir)?;
            return Ok(key);
        }
        if let Ok(next) = keys.load_next(dir) {
            if next.public_key() == *expected {
                keys.install_next(dir)?;
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
        if !mayfly_names::is_handler_name(&ctx.handler) {
            return Err(TxError::BadHandler(ctx.handler));
        }
        if ctx.request.len() > limits::MAX_REQUEST {
            return Err(TxError::RequestTooLarge {
                len: ctx.request.len(),
                max: limits::MAX_REQUEST,
            });
        }
        if let Some((_, reason)) = &self.capacity_shared().full {
            return Err(TxError::StorageFull {
                reason: reason.clone(),
            });
        }
        let ticket = self.inner.store.gate.enter();
        let snapshot = self.inner.store.env.clone().static_read_txn()?;
        Ok(Tx {
            inner: self.inner.clone(),
            snapshot,
            ticket,
            ctx,
            begin_ns: now_ns(),
            entropy_seed: [0; 32],
            client: None,
            idempotency_key: None,
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

    fn capacity_shared(&self) -> std::sync::MutexGuard<'_, capacity::Shared> {
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
        commit::submit(&self.inner, commit::Job::Deferred(events))?
            .wait()
            .map(drop)
    }

    /// Sets the observer the committer tells about every durable group from now on (the
    /// replication of a primary, issue 18), before the group's commits are acknowledged.
    /// Once per ledger: returns `false` (and changes nothing) if one is set already.
    pub fn set_group_observer(&self, observer: Arc<dyn GroupObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
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

/// How the live state was checked at open (fields of `ledger.opened`).
struct StateCheck {
    /// `new`, `created` (first digest of an older ledger), `ok` or `skipped`.
    outcome: &'static str,
    /// Time the scan took.
    ms: u64,
}

/// The marker a refused start leaves, so that the next start that succeeds audits it.
/// The marker of a start refused because the key source would not release the key (a
/// sealed key on another boot chain): audited as `key.unavailable_earlier` by the next start
/// that can sign.
mod key_marker {
    use std::path::Path;

    /// File name in the data directory.
    pub const FILE: &str = "key-unavailable.refused";

    /// Adds a refusal to the marker (best effort: the refusal itself is the error
    /// returned). Several refused starts before a good one are all kept (newest last), up
    /// to the marker's bound.
    pub fn put(dir: &Path, detail: &str) {
        let detail = match take(dir) {
            Some(earlier) if !earlier.is_empty() => {
                // The marker is bounded from the front: keep the newest refusals whole.
                let n = earlier.chars().count();
                let kept: String = earlier.chars().skip(n.saturating_sub(500)).collect();
                format!("{kept} | {detail}")
            }
            _ => detail.to_owned(),
        };
        super::state_marker::put_named(dir, FILE, &detail);
    }

    /// Takes the marker if there is one.
    pub fn take(dir: &Path) -> Option<String> {
        super::state_marker::take_named(dir, FILE)
    }
}

mod state_marker {
    use std::path::Path;

    /// File name in the data directory.
    pub const FILE: &str = "state-mismatch.refused";
    /// Most bytes kept (an audit field value).
    const MAX: usize = 4000;

    fn bounded(detail: &str) -> String {
        detail.chars().take(MAX / 4).collect()
    }

    /// Leaves the marker (best effort: the refusal itself is the error returned).
    pub fn put(dir: &Path, detail: &str) {
        put_named(dir, FILE, detail);
    }

    /// Leaves the marker `name`.
    pub fn put_named(dir: &Path, name: &str, detail: &str) {
        let _ = std::fs::write(dir.join(name), bounded(detail));
    }

    /// Restores a marker taken by a start that then failed.
    pub fn put_back(dir: &Path, detail: &str) {
        put(dir, detail);
    }

    /// Takes the marker if there is one: its text, bounded (the file is as hostile as
    /// anything else in the data directory).
    pub fn take(dir: &Path) -> Option<String> {
        take_named(dir, FILE)
    }

    /// Takes the marker `name` if there is one, bounded.
    pub fn take_named(dir: &Path, name: &str) -> Option<String> {
        use std::io::Read;
        let path = dir.join(name);
        let mut buf = Vec::new();
        std::fs::File::open(&path)
            .ok()?
            .take(MAX as u64)
            .read_to_end(&mut buf)
            .ok()?;
        let _ = std::fs::remove_file(&path);
        let text: String = String::from_utf8_lossy(&buf)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        Some(bounded(&text))
    }
}
