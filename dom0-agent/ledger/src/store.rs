//! The LMDB environment and every named database, opened or created together.
//!
//! See the crate docs for the layout of each database. This module holds the one `unsafe`
//! block of the crate: opening the memory-mapped environment.
//!
//! The LMDB layer, below every table, query and the committer: it uses only the record
//! formats it checks at open (checkpoint links, heads, the live-state digest), the keys,
//! and [`crate::CommitError`] (for [`OpenError::FirstCommit`]). The map-resize gate is in
//! `store/gate.rs`.

mod gate;

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use heed::types::Bytes;
use heed::{Database, Env, EnvOpenOptions, RoTxn, WithoutTls};

pub(crate) use gate::{Gate, Ticket};

use crate::checkpoint::chain_hash;
use crate::codec::{hex, Reader};
use crate::head::{SignedHead, Tip};
use crate::keys::PublicKey;
use crate::state::StateDigest;

/// Names of the databases, in one place.
pub mod names {
    /// Format marker, identity and chain tips.
    pub const META: &str = "meta";
    /// Application data.
    pub const DATA: &str = "data";
    /// Checkpoint chain.
    pub const CHECKPOINTS: &str = "checkpoints";
    /// Audit chain.
    pub const AUDIT: &str = "audit";
    /// Signed group heads.
    pub const HEADS: &str = "heads";
    /// Transaction id to commit sequence.
    pub const TX_INDEX: &str = "tx_index";
    /// Read-from dependencies: commit seq to the seqs whose writes it read.
    pub const DEPS: &str = "deps";
    /// Admin command nonces (console).
    pub const NONCES: &str = "nonces";
    /// Exporter cursors (SIEM).
    pub const CURSORS: &str = "cursors";
    /// Rolled-back commits: commit seq to the seq of the first rollback record that undid
    /// it. Added after the first release: a ledger without it gets it built at its first
    /// read-write open (`Store::ensure_undone_index`).
    pub const UNDONE: &str = "undone";
    /// Durable idempotency keys (idempotency.rs): derived from the `tx.idempotency_key`
    /// audit records. Added with issue 18: an older ledger gets it, empty, at its first
    /// read-write open.
    pub const IDEMPOTENCY: &str = "idempotency";
    /// All of them, in creation order.
    pub const ALL: [&str; 11] = [
        META,
        DATA,
        CHECKPOINTS,
        AUDIT,
        HEADS,
        TX_INDEX,
        DEPS,
        NONCES,
        CURSORS,
        UNDONE,
        IDEMPOTENCY,
    ];
}

/// Keys inside the `meta` database.
pub(crate) mod meta_keys {
    pub const FORMAT: &[u8] = b"format";
    pub const PUBLIC_KEY: &[u8] = b"public_key";
    pub const CKPT_TIP: &[u8] = b"checkpoint_tip";
    pub const AUDIT_TIP: &[u8] = b"audit_tip";
    pub const GROUP: &[u8] = b"group";
    /// The key that signs new heads, when it is no longer the first one (key rotation).
    pub const SIGNING_KEY: &[u8] = b"signing_key";
    /// Present (one byte, 1) once the `undone` index covers every rollback record.
    pub const UNDONE_INDEX: &[u8] = b"undone_index";
    /// The live-state digest after the last group (state.rs); absent in ledgers written
    /// before it existed, until their first start by a build that has it.
    pub const STATE: &[u8] = b"state";
}

/// Value of `meta/format`: a marker and the layout version this build writes.
pub const FORMAT_MARKER: &[u8] = b"MAYFLY-LEDGER";
/// Layout version of the databases.
pub const FORMAT_VERSION: u32 = 1;
/// File LMDB keeps the data in.
pub const DATA_FILE: &str = "data.mdb";

/// Why a data directory could not be opened as a ledger.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory does not exist or is not a directory.
    #[error("data directory {path}: {source}")]
    Directory {
        /// Path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// No ledger exists here and creation was not asked for.
    #[error("no ledger in {path} (no {DATA_FILE})")]
    NoLedger {
        /// Path.
        path: PathBuf,
    },
    /// LMDB refused the file: not an LMDB environment, or damaged beyond LMDB's checks.
    #[error("{path}/{DATA_FILE} is not a readable LMDB environment ({source}); the file is corrupted or is not a Mayfly ledger")]
    NotLmdb {
        /// Path.
        path: PathBuf,
        /// LMDB's error.
        source: heed::Error,
    },
    /// A valid LMDB environment that some other program created.
    #[error("{path} holds an LMDB environment that is not a Mayfly ledger: {reason}")]
    Foreign {
        /// Path.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A Mayfly ledger in a layout this build does not read.
    #[error("{path} holds a Mayfly ledger of layout version {found}; this build reads version {FORMAT_VERSION}")]
    UnsupportedFormat {
        /// Path.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// The ledger's own bookkeeping contradicts its records.
    #[error("ledger in {path} is corrupted: {reason}")]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// What contradicts what.
        reason: String,
    },
    /// The signing key is missing, unreadable or not the ledger's.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// The key file holds a different key than the one the ledger was created with.
    #[error("signing key in {path} is {found}, but this ledger was created with key {expected}")]
    KeyMismatch {
        /// Data directory.
        path: PathBuf,
        /// Public key of the key file.
        found: String,
        /// Public key recorded in the ledger.
        expected: String,
    },
    /// An LMDB operation failed while opening (I/O, disk full, ...).
    #[error("opening the ledger in {path}: {source}")]
    Storage {
        /// Path.
        path: PathBuf,
        /// LMDB's error.
        source: heed::Error,
    },
    /// The audit record written at every start could not be committed (disk full, ...).
    #[error("ledger in {path} could not record its start: {source}")]
    FirstCommit {
        /// Data directory.
        path: PathBuf,
        /// The commit failure.
        source: crate::commit_error::CommitError,
    },
    /// The committer thread could not be started.
    #[error("could not start the commit thread: {0}")]
    Thread(io::Error),
    /// A ledger with a live-state digest opened with [`crate::Options::state_digest`] off.
    #[error("ledger in {path} commits to its live state; it cannot be opened with the state digest turned off")]
    DigestRequired {
        /// Data directory.
        path: PathBuf,
    },
    /// The `data` database does not hold the state the signed heads commit to: someone
    /// or something changed the live data outside the ledger.
    #[error("ledger in {path}: the live data does not match the state digest signed in the last head ({found} entries found, {expected} committed); {detail}. Refusing to serve it: run `dom0-agent verify` for the full report, restore the data directory from a backup, or start with --skip-state-check to serve it anyway")]
    StateMismatch {
        /// Data directory.
        path: PathBuf,
        /// Entries in `data` now.
        found: u64,
        /// Entries the digest counts.
        expected: u64,
        /// The keys that differ from the checkpoint chain.
        detail: String,
    },
}

/// Every database of the ledger.
#[derive(Clone, Copy)]
pub(crate) struct Dbs {
    pub meta: Database<Bytes, Bytes>,
    pub data: Database<Bytes, Bytes>,
    pub checkpoints: Database<Bytes, Bytes>,
    pub audit: Database<Bytes, Bytes>,
    pub heads: Database<Bytes, Bytes>,
    pub tx_index: Database<Bytes, Bytes>,
    pub deps: Database<Bytes, Bytes>,
    pub nonces: Database<Bytes, Bytes>,
    pub cursors: Database<Bytes, Bytes>,
    /// `None` only in a ledger written before the index existed, opened read-only.
    pub undone: Option<Database<Bytes, Bytes>>,
    /// `None` only in a ledger written before durable idempotency keys, opened read-only.
    pub idempotency: Option<Database<Bytes, Bytes>>,
}

/// How to open the environment.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Initial LMDB map size, bytes: the data file may grow to it before the map must be
    /// enlarged.
    pub map_size: usize,
    /// Largest map size the committer grows the map to, on demand, bytes (at least
    /// `map_size`): the bound on the ledger's size.
    pub max_map_size: usize,
    /// Maximum concurrent read transactions (open ledger transactions plus readers).
    pub max_readers: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            map_size: 4 << 30,
            max_map_size: 64 << 30,
            max_readers: 1022,
        }
    }
}

/// The open environment and its databases.
#[derive(Clone)]
pub struct Store {
    pub(crate) env: Env<WithoutTls>,
    pub(crate) dbs: Dbs,
    pub(crate) dir: PathBuf,
    /// Held by every transaction of this process except the committer's, so that the map
    /// can be resized when none is active.
    pub(crate) gate: Arc<Gate>,
}

/// A read transaction that keeps the resize gate open while it lives.
pub struct ReadTxn<'a> {
    // Declared first: dropped (the LMDB transaction ended) before the ticket is returned.
    txn: RoTxn<'a, WithoutTls>,
    _ticket: Ticket,
}

impl<'a> std::ops::Deref for ReadTxn<'a> {
    type Target = RoTxn<'a, WithoutTls>;
    fn deref(&self) -> &Self::Target {
        &self.txn
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

/// One entry where the stored `undone` index and the rollback records disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoneMismatch {
    /// The commit seq the entry is keyed on (`u64::MAX`: a key that is no u64).
    pub seq: u64,
    /// The rollback record the stored index names (`None`: no entry, or no u64).
    pub stored: Option<u64>,
    /// The rollback record that really undid it (`None`: none did).
    pub expected: Option<u64>,
}

impl std::fmt::Display for UndoneMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.stored, self.expected) {
            (Some(s), None) => write!(
                f,
                "says commit {} was undone by rollback record {s}, but no rollback record undid it",
                self.seq
            ),
            (None, Some(e)) => write!(
                f,
                "is missing commit {}, undone by rollback record {e}",
                self.seq
            ),
            (Some(s), Some(e)) => write!(
                f,
                "says commit {} was undone by record {s}, but the first rollback record that undid it is {e}",
                self.seq
            ),
            (None, None) => write!(f, "holds a malformed entry for commit {}", self.seq),
        }
    }
}

/// What [`Store::open`] found.
pub(crate) enum Opened {
    /// An existing ledger.
    Existing(Store),
    /// A new, empty environment with all databases created but no meta written yet.
    Created(Store),
}

pub(crate) fn u64_key(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub(crate) fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

pub(crate) fn encode_tip(tip: &Tip) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&tip.seq.to_be_bytes());
    out[8..].copy_from_slice(&tip.hash);
    out
}

pub(crate) fn decode_tip(bytes: &[u8]) -> Option<Tip> {
    let mut r = Reader::new(bytes);
    let seq = r.u64("seq").ok()?;
    let hash = r.array("hash").ok()?;
    r.finish().ok()?;
    Some(Tip { seq, hash })
}

impl Store {
    /// Opens the ledger in `dir`; with `create`, makes a new one if there is none.
    pub(crate) fn open(dir: &Path, opts: &StoreOptions, create: bool) -> Result<Opened, OpenError> {
        let dir = dir.to_path_buf();
        if create {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| OpenError::Directory {
                    path: dir.clone(),
                    source,
                })?;
        }
        let md = fs::metadata(&dir).map_err(|source| OpenError::Directory {
            path: dir.clone(),
            source,
        })?;
        if !md.is_dir() {
            return Err(OpenError::Directory {
                path: dir,
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let exists = dir.join(DATA_FILE).exists();
        if !exists && !create {
            return Err(OpenError::NoLedger { path: dir });
        }
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options
            .map_size(opts.map_size)
            .max_dbs(16)
            .max_readers(opts.max_readers);
        #[allow(unsafe_code)]
        // SAFETY: the environment is opened without NO_LOCK/NO_SYNC flags, so LMDB's own
        // lock file serialises writers and protects readers across processes; the ledger
        // never truncates or rewrites data.mdb outside LMDB, and heed makes a second open of
        // the same path in this process share the first environment.
        let env = unsafe { options.open(&dir) }.map_err(|source| match source {
            heed::Error::Mdb(_) => OpenError::NotLmdb {
                path: dir.clone(),
                source,
            },
            source => OpenError::Storage {
                path: dir.clone(),
                source,
            },
        })?;
        let storage = |source| OpenError::Storage {
            path: dir.clone(),
            source,
        };

        let rtxn = env.read_txn().map_err(storage)?;
        let meta = env
            .open_database::<Bytes, Bytes>(&rtxn, Some(names::META))
            .map_err(|source| OpenError::NotLmdb {
                path: dir.clone(),
                source,
            })?;
        let has_any = env
            .open_database::<Bytes, Bytes>(&rtxn, None)
            .ok()
            .flatten()
            .map(|db| db.len(&rtxn).unwrap_or(0) > 0)
            .unwrap_or(false);
        rtxn.commit().map_err(storage)?;

        match meta {
            None if has_any || exists && !create => Err(OpenError::Foreign {
                path: dir,
                reason: format!("no '{}' database", names::META),
            }),
            None => {
                let mut wtxn = env.write_txn().map_err(storage)?;
                let mut dbs = Vec::with_capacity(names::ALL.len());
                for name in names::ALL {
                    dbs.push(
                        env.create_database::<Bytes, Bytes>(&mut wtxn, Some(name))
                            .map_err(storage)?,
                    );
                }
                wtxn.commit().map_err(storage)?;
                let store = Self::with_dbs(env, dir.clone())?;
                Ok(Opened::Created(store))
            }
            Some(_) => Ok(Opened::Existing(Self::with_dbs(env, dir)?)),
        }
    }

    fn with_dbs(env: Env<WithoutTls>, dir: PathBuf) -> Result<Self, OpenError> {
        let rtxn = env.read_txn().map_err(|source| OpenError::Storage {
            path: dir.clone(),
            source,
        })?;
        let open = |name: &str| -> Result<Database<Bytes, Bytes>, OpenError> {
            match env.open_database::<Bytes, Bytes>(&rtxn, Some(name)) {
                Ok(Some(db)) => Ok(db),
                Ok(None) => Err(OpenError::Foreign {
                    path: dir.clone(),
                    reason: format!("database '{name}' is missing"),
                }),
                Err(source) => Err(OpenError::NotLmdb {
                    path: dir.clone(),
                    source,
                }),
            }
        };
        let dbs = Dbs {
            meta: open(names::META)?,
            data: open(names::DATA)?,
            checkpoints: open(names::CHECKPOINTS)?,
            audit: open(names::AUDIT)?,
            heads: open(names::HEADS)?,
            tx_index: open(names::TX_INDEX)?,
            deps: open(names::DEPS)?,
            nonces: open(names::NONCES)?,
            cursors: open(names::CURSORS)?,
            undone: match env.open_database::<Bytes, Bytes>(&rtxn, Some(names::UNDONE)) {
                Ok(db) => db,
                Err(source) => {
                    return Err(OpenError::NotLmdb {
                        path: dir.clone(),
                        source,
                    })
                }
            },
            idempotency: match env.open_database::<Bytes, Bytes>(&rtxn, Some(names::IDEMPOTENCY)) {
                Ok(db) => db,
                Err(source) => {
                    return Err(OpenError::NotLmdb {
                        path: dir.clone(),
                        source,
                    })
                }
            },
        };
        // Committing the read transaction makes the opened handles valid for the whole
        // environment (LMDB: handles opened in an aborted transaction are discarded).
        rtxn.commit().map_err(|source| OpenError::Storage {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            env,
            dbs,
            dir,
            gate: Arc::default(),
        })
    }

    /// The public key the ledger was created with, as recorded in `meta`: the root of
    /// trust, unchanged by key rotations.
    pub fn public_key(&self) -> Result<PublicKey, OpenError> {
        Ok(self.load_meta(false)?.public_key)
    }

    /// The key that signs new heads, as recorded in `meta` (the first key until a
    /// rotation).
    pub fn signing_key(&self) -> Result<PublicKey, OpenError> {
        Ok(self.load_meta(false)?.signing_key)
    }

    /// Data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn storage_err(&self, source: heed::Error) -> OpenError {
        OpenError::Storage {
            path: self.dir.clone(),
            source,
        }
    }

    fn corrupt(&self, reason: String) -> OpenError {
        OpenError::Corrupt {
            path: self.dir.clone(),
            reason,
        }
    }

    /// Whether the `meta` database is still empty (a first start that stopped before its
    /// genesis commit).
    pub(crate) fn meta_is_empty(&self) -> Result<bool, OpenError> {
        let rtxn = self.env.read_txn().map_err(|e| self.storage_err(e))?;
        Ok(
            self.dbs.meta.len(&rtxn).map_err(|e| self.storage_err(e))? == 0
                && self
                    .dbs
                    .checkpoints
                    .len(&rtxn)
                    .map_err(|e| self.storage_err(e))?
                    == 0
                && self.dbs.audit.len(&rtxn).map_err(|e| self.storage_err(e))? == 0,
        )
    }

    /// Checks the format marker and returns the identity and chain tips recorded in `meta`.
    pub(crate) fn load_meta(&self, check_tips: bool) -> Result<MetaState, OpenError> {
        let rtxn = self.env.read_txn().map_err(|e| self.storage_err(e))?;
        self.meta_in(&rtxn, check_tips)
    }

    /// [`Store::load_meta`] within an existing read transaction.
    pub(crate) fn meta_in(
        &self,
        rtxn: &RoTxn<'_, WithoutTls>,
        check_tips: bool,
    ) -> Result<MetaState, OpenError> {
        let get = |k: &[u8]| self.dbs.meta.get(rtxn, k).map_err(|e| self.storage_err(e));
        let format = get(meta_keys::FORMAT)?.ok_or_else(|| OpenError::Foreign {
            path: self.dir.clone(),
            reason: "no format marker".into(),
        })?;
        let version = format
            .strip_prefix(FORMAT_MARKER)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| OpenError::Foreign {
                path: self.dir.clone(),
                reason: "format marker is not MAYFLY-LEDGER".into(),
            })?;
        if version != FORMAT_VERSION {
            return Err(OpenError::UnsupportedFormat {
                path: self.dir.clone(),
                found: version,
            });
        }
        let public_key: PublicKey = get(meta_keys::PUBLIC_KEY)?
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| self.corrupt("meta/public_key missing or malformed".into()))?;
        let tip = |k: &[u8], what: &str| -> Result<Tip, OpenError> {
            get(k)?
                .and_then(decode_tip)
                .ok_or_else(|| self.corrupt(format!("meta/{what} missing or malformed")))
        };
        let signing_key: PublicKey = match get(meta_keys::SIGNING_KEY)? {
            None => public_key,
            Some(v) => v
                .try_into()
                .map_err(|_| self.corrupt("meta/signing_key malformed".into()))?,
        };
        let checkpoints = tip(meta_keys::CKPT_TIP, "checkpoint_tip")?;
        let audit = tip(meta_keys::AUDIT_TIP, "audit_tip")?;
        let group = get(meta_keys::GROUP)?
            .and_then(read_u64)
            .ok_or_else(|| self.corrupt("meta/group missing or malformed".into()))?;
        let live = match get(meta_keys::STATE)? {
            None => None,
            Some(v) => Some(
                StateDigest::decode(v)
                    .map_err(|e| self.corrupt(format!("meta/state does not decode: {e}")))?,
            ),
        };
        let epoch = self
            .dbs
            .heads
            .last(rtxn)
            .map_err(|e| self.storage_err(e))?
            .and_then(|(_, v)| SignedHead::decode(v).ok())
            .map_or(0, |h| h.epoch());
        let state = MetaState {
            public_key,
            signing_key,
            checkpoints,
            audit,
            group,
            state: live,
            epoch,
        };
        if check_tips {
            self.check_tips(rtxn, &state)?;
        }
        Ok(state)
    }

    /// Cross-checks the recorded tips against the last stored records and the last head:
    /// a cheap start-up test that catches truncated or swapped files. `verify` does the
    /// full walk.
    fn check_tips(&self, rtxn: &RoTxn<'_, WithoutTls>, state: &MetaState) -> Result<(), OpenError> {
        for (name, db, tip) in [
            ("checkpoint", self.dbs.checkpoints, state.checkpoints),
            ("audit", self.dbs.audit, state.audit),
        ] {
            let last = db.last(rtxn).map_err(|e| self.storage_err(e))?;
            let found = match last {
                None => Tip::default(),
                Some((k, v)) => {
                    let seq = read_u64(k)
                        .ok_or_else(|| self.corrupt(format!("{name} key of {} bytes", k.len())))?;
                    let (_, prev) = crate::checkpoint::link_fields(v)
                        .ok_or_else(|| self.corrupt(format!("{name} {seq} is truncated")))?;
                    Tip {
                        seq,
                        hash: chain_hash(&prev, v),
                    }
                }
            };
            if found != tip {
                return Err(self.corrupt(format!(
                    "the {name} chain ends at {} ({}), but the ledger recorded its tip as {} ({}); run `dom0-agent verify` to locate the damage",
                    found.seq,
                    hex(&found.hash),
                    tip.seq,
                    hex(&tip.hash)
                )));
            }
        }
        let head = self.dbs.heads.last(rtxn).map_err(|e| self.storage_err(e))?;
        let head = head
            .and_then(|(_, v)| SignedHead::decode(v).ok())
            .ok_or_else(|| self.corrupt("no readable signed head".into()))?;
        if head.group != state.group
            || head.checkpoints != state.checkpoints
            || head.audit != state.audit
        {
            return Err(self.corrupt(format!(
                "the last signed head (group {}) does not match the recorded tips (group {})",
                head.group, state.group
            )));
        }
        match (&head.state, &state.state) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(self.corrupt(format!(
                    "the last signed head (group {}) commits to a live-state digest, but meta/state is gone",
                    head.group
                )))
            }
            (None, Some(_)) => {
                return Err(self.corrupt(format!(
                    "meta/state is present but the last signed head (group {}) is of version 1",
                    head.group
                )))
            }
            (Some(signed), Some(d)) => {
                if *signed != d.hash() {
                    return Err(self.corrupt(format!(
                        "meta/state ({}) is not the live-state digest signed in the last head (group {}, {})",
                        hex(&d.hash()),
                        head.group,
                        hex(signed)
                    )));
                }
            }
        }
        Ok(())
    }

    /// A read transaction, holding the map-resize gate open while it lives.
    pub(crate) fn read_txn(&self) -> heed::Result<ReadTxn<'_>> {
        let ticket = self.gate.enter();
        Ok(ReadTxn {
            txn: self.env.read_txn()?,
            _ticket: ticket,
        })
    }

    /// Current map size and bytes in use (last page + 1, times the page size).
    pub fn map_usage(&self) -> Result<(u64, u64), OpenError> {
        let info = self.env.info();
        let page = u64::from(self.env.stat().page_size);
        let used = u64::try_from(info.last_page_number)
            .unwrap_or(u64::MAX)
            .saturating_add(1)
            .saturating_mul(page);
        Ok((u64::try_from(info.map_size).unwrap_or(u64::MAX), used))
    }

    /// Grows the map to `new_size` bytes once no transaction of this process is active,
    /// waiting at most `wait` for the open ones to end (new ones wait meanwhile). Returns
    /// whether it was resized. Only the committer calls this, between groups.
    pub(crate) fn grow_map(
        &self,
        new_size: usize,
        wait: std::time::Duration,
    ) -> heed::Result<bool> {
        let Some(_closed) = self.gate.close_within(wait) else {
            return Ok(false);
        };
        #[allow(unsafe_code)]
        // SAFETY: LMDB may change the map size of an open environment when no transaction
        // of this process is active. Every read transaction of this crate (Store::read_txn,
        // a Tx's snapshot) and every write transaction other than the committer's holds a
        // gate ticket, the gate is closed (no ticket is out, new ones wait), and the
        // committer, the only caller, has no write transaction open between groups.
        unsafe { self.env.resize(new_size) }?;
        Ok(true)
    }
}

/// Identity and tips as recorded in `meta`.
#[derive(Debug, Clone)]
pub(crate) struct MetaState {
    /// The ledger's first key: the root of trust `verify` starts from.
    pub public_key: PublicKey,
    /// The key that signs new heads (the first key until a rotation).
    pub signing_key: PublicKey,
    pub checkpoints: Tip,
    pub audit: Tip,
    pub group: u64,
    /// The live-state digest (`None`: a ledger from before it existed).
    pub state: Option<StateDigest>,
    /// The epoch of the last signed head (0 before version-3 heads, and with no head).
    pub epoch: u64,
}

/// Opens a ledger's databases for reading only: no key is loaded, nothing is written, and
/// the tips are not cross-checked (that is `verify`'s job, which must run on a damaged
/// ledger too). Safe to use while an agent is running.
pub fn open_read_only(dir: &Path, opts: &StoreOptions) -> Result<Store, OpenError> {
    match Store::open(dir, opts, false)? {
        Opened::Existing(s) => {
            s.load_meta(false)?;
            Ok(s)
        }
        Opened::Created(s) => Err(OpenError::NoLedger { path: s.dir }),
    }
}
