//! The signed chain as a replication stream: what a primary exports of one durable group,
//! and how a standby applies it to its own copy of the ledger after checking every hash
//! link, the signature, the epoch and the live-state digest.
//!
//! A **group** is everything one group commit appended: the checkpoint records (commits and
//! rollbacks) after the previous head's checkpoint tip, the audit records after its audit
//! tip, and the group's signed head. [`Store::export_group`] reads them back from the
//! primary's ledger, so catching up from any group is the same call as following live.
//!
//! [`Replica::apply`] makes a group durable in the standby's LMDB in **one** write
//! transaction, and only after it has checked, in this order:
//!
//! 1. the head decodes and is signed by the key in force (the pinned primary identity
//!    for group 1, then the key each rotation head names);
//! 2. the group is the next one (`held + 1`); an older group is compared with the head the
//!    standby holds for it: the same bytes are a replay ([`ApplyError::Replayed`]), other
//!    bytes a **fork** ([`ApplyError::Fork`]);
//! 3. the epoch is the standby's (a promotion, not a stream, changes it), and the head
//!    version does not go back (a version-2 head after a version-3 one);
//! 4. every record decodes, has the next sequence, links to the hash before it, and the
//!    last one's hash is the tip the head signs; a first record that links to something
//!    other than the standby's tip is a fork;
//! 5. every write's before-version is the version the standby holds (its data agrees with
//!    the chain), and after the writes, the live-state digest hashes to the head's.
//!
//! Everything else the standby stores is derived from the records, exactly as the
//! committer derives it: `data`, `deps`, `tx_index`, `undone`, and the meta tips. The
//! admin nonces are derived from the `admin.accepted` audit records (kept for
//! [`REPLICATED_NONCE_TTL_NS`]). Exporter cursors are not part of the chain: the
//! primary ships them in frames of their own, and the standby writes them with
//! [`crate::Store::set_cursors`] (`mayfly-replica`, docs/failover.md).
//!
//! The engine layer: uses the store, the queries, the idempotency table, the record
//! formats and the keys; nothing in the crate uses it.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::path::Path;

use heed::RwTxn;

use crate::audit::AuditRecord;
use crate::checkpoint::chain_hash;
use crate::codec::hex;
use crate::head::{SignedHead, Tip};
use crate::keys::PublicKey;
use crate::read::ReadError;
use crate::record::Record;
use crate::state::StateDigest;
use crate::store::{
    encode_tip, meta_keys, read_u64, u64_key, OpenError, Opened, Store, StoreOptions,
    FORMAT_MARKER, FORMAT_VERSION,
};
use crate::value::encode_deps;
use crate::value::{decode_value, encode_value};
use crate::Hash;

mod staging;
pub use staging::Staging;

/// One durable group as its records are stored: what a replication frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecords {
    /// The group's signed head, as stored in `heads`.
    pub head: Vec<u8>,
    /// The checkpoint records it appended (commits and rollbacks), in sequence order.
    pub checkpoints: Vec<Vec<u8>>,
    /// The audit records it appended, in sequence order.
    pub audit: Vec<Vec<u8>>,
}

/// Why a group could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The ledger holds no such group (yet).
    #[error("group {group} is not in the ledger (its last group is {last})")]
    NoSuchGroup {
        /// Group asked for.
        group: u64,
        /// Last group held.
        last: u64,
    },
    /// A stored head does not decode.
    #[error("the stored head of group {group} does not decode: {reason}")]
    BadHead {
        /// Group.
        group: u64,
        /// Decoder's error.
        reason: String,
    },
    /// A record the head covers is missing.
    #[error("{chain} record {seq}, covered by the head of group {group}, is missing")]
    Missing {
        /// `checkpoints` or `audit`.
        chain: &'static str,
        /// Its sequence.
        seq: u64,
        /// Group.
        group: u64,
    },
    /// The group's records are more bytes than one frame may carry.
    #[error("group {group} is {bytes} bytes, above the {max}-byte limit of one replication frame")]
    TooLarge {
        /// Group.
        group: u64,
        /// Its size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// LMDB failed.
    #[error("reading group {group}: {source}")]
    Storage {
        /// Group.
        group: u64,
        /// LMDB's error.
        source: heed::Error,
    },
}

/// Largest group, in bytes of records and head, that one frame carries.
pub const MAX_GROUP_BYTES: u64 = 320 << 20;

impl Store {
    /// Reads back the records of durable group `group` and its signed head, for a standby.
    /// Refuses a group above [`MAX_GROUP_BYTES`].
    pub fn export_group(&self, group: u64) -> Result<GroupRecords, ExportError> {
        let rtxn = self
            .read_txn()
            .map_err(|source| ExportError::Storage { group, source })?;
        self.export_group_in(&rtxn, group)
    }

    /// [`Store::export_group`] inside a transaction the caller holds: the committer's
    /// write transaction, to hand a synchronous standby a group whose bytes are final
    /// before it is committed (a *tentative* group, docs/failover.md).
    pub fn export_group_in(
        &self,
        rtxn: &heed::RoTxn,
        group: u64,
    ) -> Result<GroupRecords, ExportError> {
        let storage = |source| ExportError::Storage { group, source };
        let dbs = self.dbs;
        let last = dbs
            .heads
            .last(rtxn)
            .map_err(storage)?
            .and_then(|(k, _)| read_u64(k))
            .unwrap_or(0);
        let head_at = |g: u64| -> Result<Option<(Vec<u8>, SignedHead)>, ExportError> {
            let Some(bytes) = dbs.heads.get(rtxn, &u64_key(g)).map_err(storage)? else {
                return Ok(None);
            };
            let head = SignedHead::decode(bytes).map_err(|e| ExportError::BadHead {
                group: g,
                reason: e.to_string(),
            })?;
            Ok(Some((bytes.to_vec(), head)))
        };
        let Some((head_bytes, head)) = (if group == 0 { None } else { head_at(group)? }) else {
            return Err(ExportError::NoSuchGroup { group, last });
        };
        let (from_cp, from_au) = match group.checked_sub(1).filter(|g| *g > 0) {
            None => (0, 0),
            Some(prev) => match head_at(prev)? {
                Some((_, p)) => (p.checkpoints.seq, p.audit.seq),
                None => return Err(ExportError::NoSuchGroup { group: prev, last }),
            },
        };
        let mut bytes = u64::try_from(head_bytes.len()).unwrap_or(u64::MAX);
        let mut read = |db: heed::Database<heed::types::Bytes, heed::types::Bytes>,
                        chain: &'static str,
                        from: u64,
                        to: u64|
         -> Result<Vec<Vec<u8>>, ExportError> {
            let mut out = Vec::new();
            let mut seq = from;
            while seq < to {
                seq = seq.saturating_add(1);
                let rec = db
                    .get(rtxn, &u64_key(seq))
                    .map_err(storage)?
                    .ok_or(ExportError::Missing { chain, seq, group })?;
                bytes = bytes.saturating_add(u64::try_from(rec.len()).unwrap_or(u64::MAX));
                if bytes > MAX_GROUP_BYTES {
                    return Err(ExportError::TooLarge {
                        group,
                        bytes,
                        max: MAX_GROUP_BYTES,
                    });
                }
                out.push(rec.to_vec());
            }
            Ok(out)
        };
        let checkpoints = read(
            dbs.checkpoints,
            "checkpoints",
            from_cp,
            head.checkpoints.seq,
        )?;
        let audit = read(dbs.audit, "audit", from_au, head.audit.seq)?;
        Ok(GroupRecords {
            head: head_bytes,
            checkpoints,
            audit,
        })
    }

    /// The last durable group (0: none).
    pub fn last_group(&self) -> Result<u64, ReadError> {
        let rtxn = self.read_txn()?;
        Ok(self
            .dbs
            .meta
            .get(&rtxn, meta_keys::GROUP)?
            .and_then(read_u64)
            .unwrap_or(0))
    }
}

/// Why a standby refused a group. Nothing of a refused group is stored.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The head does not decode.
    #[error("group head does not decode: {reason}")]
    BadHead {
        /// Decoder's error.
        reason: String,
    },
    /// The head is signed by a key that is not the one in force.
    #[error("head of group {group} is signed by {found}, but the key in force is {expected}")]
    UntrustedSigner {
        /// Group.
        group: u64,
        /// Signer named in the head.
        found: String,
        /// Key the standby expects.
        expected: String,
    },
    /// The signature does not verify: a forged or damaged head.
    #[error("the signature of the head of group {group} does not verify (forged or damaged)")]
    BadSignature {
        /// Group.
        group: u64,
    },
    /// The group is not the next one: a gap (a frame lost or sent out of order).
    #[error("group {found} arrived, but the next group is {expected} (out of order or a gap)")]
    OutOfOrder {
        /// Next group the standby needs.
        expected: u64,
        /// Group received.
        found: u64,
    },
    /// A group the standby already holds, byte for byte: a replay, harmless.
    #[error("group {group} is already held (replayed)")]
    Replayed {
        /// Group.
        group: u64,
    },
    /// The primary's history differs from the standby's: a different record (or head) at a
    /// sequence both hold. The standby must stop.
    #[error("FORK at {chain} {seq}: {detail}")]
    Fork {
        /// `group`, `checkpoints` or `audit`.
        chain: &'static str,
        /// Sequence where the histories differ.
        seq: u64,
        /// What differs.
        detail: String,
    },
    /// The head's epoch is not the standby's.
    #[error("head of group {group} is of epoch {found}, the standby is at epoch {expected}")]
    WrongEpoch {
        /// Group.
        group: u64,
        /// Epoch of the head.
        found: u64,
        /// The standby's epoch.
        expected: u64,
    },
    /// A promotion head that does not follow from the head held, or is signed by a key
    /// not pinned as a promotion key.
    #[error("promotion head of group {group} refused: {reason}")]
    BadPromotion {
        /// Group.
        group: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A group head of a version older than the one held.
    #[error("head of group {group} is of version {found} after a version-{held} head")]
    VersionDowngrade {
        /// Group.
        group: u64,
        /// Its version.
        found: u8,
        /// Version of the last head held.
        held: u8,
    },
    /// A record does not decode, is out of sequence, or does not link.
    #[error("{chain} record {seq}: {reason}")]
    BadRecord {
        /// `checkpoints` or `audit`.
        chain: &'static str,
        /// Sequence it should have.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// The records do not reach the tip the head signs.
    #[error("the {chain} records end at {found}, but the head of group {group} signs {expected}")]
    TipMismatch {
        /// `checkpoints` or `audit`.
        chain: &'static str,
        /// Group.
        group: u64,
        /// Tip reached.
        found: String,
        /// Tip signed.
        expected: String,
    },
    /// A write's before-version is not what the standby holds.
    #[error("checkpoint {seq} writes key {key} over version {claimed}, but the standby holds version {held}")]
    StateDiverged {
        /// Checkpoint.
        seq: u64,
        /// Hex of the key.
        key: String,
        /// Version the record says it replaced.
        claimed: u64,
        /// Version held.
        held: u64,
    },
    /// The data after the group does not hash to the state the head signs.
    #[error("after group {group} the live state hashes to {found}, but the head signs {expected}")]
    StateMismatch {
        /// Group.
        group: u64,
        /// Hash computed.
        found: String,
        /// Hash signed.
        expected: String,
    },
    /// A stored value of the standby is malformed.
    #[error("the standby's stored value of key {key} is malformed")]
    Corrupt {
        /// Hex of the key.
        key: String,
    },
    /// LMDB failed (disk full, I/O): nothing of the group was stored.
    #[error("storing group {group}: {source}")]
    Storage {
        /// Group.
        group: u64,
        /// LMDB's error.
        source: heed::Error,
    },
}

impl ApplyError {
    /// Whether the standby must stop following (its history and the primary's differ, or
    /// its own data no longer matches its chain), rather than refuse one frame and go on.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Fork { .. } | Self::StateDiverged { .. } | Self::Corrupt { .. }
        )
    }
}

/// What a standby holds: the tips, epoch and key in force after the last applied group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Last group applied (0: none).
    pub group: u64,
    /// Checkpoint tip.
    pub checkpoints: Tip,
    /// Audit tip.
    pub audit: Tip,
    /// Epoch of the last head.
    pub epoch: u64,
    /// Version of the last head (0: none).
    pub head_version: u8,
    /// Key that must sign the next head.
    pub signer: PublicKey,
}

/// A standby's copy of a primary's ledger: it only ever holds groups the chain proves.
pub struct Replica {
    pub(crate) store: Store,
    pub(crate) held: Held,
    pub(crate) state: StateDigest,
    retention: crate::idempotency::Retention,
    identity: PublicKey,
    /// Keys a promotion head may hand signing to ([`Replica::trust_promotion_keys`]).
    pub(crate) promotion_keys: Vec<PublicKey>,
    /// Groups checked but not yet in LMDB, in order ([`Replica::stage`]).
    pub(crate) staged: Vec<staging::Staged>,
    /// What the staged groups wrote.
    pub(crate) overlay: Overlay,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("dir", &self.store.dir)
            .field("held", &self.held)
            .finish()
    }
}

/// What a group is checked and applied on: the tips and live state before it, and what
/// staged groups wrote that LMDB does not hold yet.
pub(crate) struct Base<'a> {
    pub held: &'a Held,
    pub state: &'a StateDigest,
    pub overlay: Option<&'a Overlay>,
    /// The head of `held.group` when it is staged (not in LMDB yet).
    pub prev_head: Option<&'a [u8]>,
    /// The group's signature was verified already, on these very bytes (a staged group
    /// being committed): the most expensive check is not repeated.
    pub signature_verified: bool,
}

/// The writes of staged groups, newest value per key, and the transaction ids they hold.
#[derive(Debug, Default, Clone)]
pub(crate) struct Overlay {
    pub data: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    pub tx_ids: std::collections::HashSet<[u8; 16]>,
}

/// What one group writes to `data` (the stored values) and `tx_index`.
pub(crate) type Writes = Overlay;

/// A group checked and written into a write transaction, not yet committed.
pub(crate) struct Outcome {
    pub held: Held,
    pub state: StateDigest,
    pub applied: Applied,
    pub writes: Writes,
}

/// What applying a group did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The group.
    pub group: u64,
    /// Checkpoint records stored.
    pub checkpoints: u64,
    /// Audit records stored.
    pub audit: u64,
}

impl Replica {
    /// Opens (or creates, empty) the standby's copy in `dir`. `primary` is the primary
    /// ledger's identity key, pinned by the operator: group 1 must be signed by it, and an
    /// existing copy must have been made from it. The copy's tips and its live state are
    /// checked against its last head (a full scan of `data`).
    pub fn open(dir: &Path, opts: &StoreOptions, primary: PublicKey) -> Result<Self, OpenError> {
        let mut store = match Store::open(dir, opts, true)? {
            Opened::Created(s) | Opened::Existing(s) => s,
        };
        store.ensure_idempotency_db()?;
        if store.meta_is_empty()? {
            return Ok(Self {
                store,
                held: Held {
                    group: 0,
                    checkpoints: Tip::default(),
                    audit: Tip::default(),
                    epoch: 0,
                    head_version: 0,
                    signer: primary,
                },
                state: StateDigest::default(),
                retention: crate::idempotency::Retention::default(),
                identity: primary,
                promotion_keys: Vec::new(),
                staged: Vec::new(),
                overlay: Overlay::default(),
            });
        }
        let meta = store.load_meta(true)?;
        if meta.public_key != primary {
            return Err(OpenError::KeyMismatch {
                path: dir.to_path_buf(),
                found: hex(&primary),
                expected: hex(&meta.public_key),
            });
        }
        let rtxn = store.read_txn().map_err(|e| store.storage_err(e))?;
        let found =
            StateDigest::compute(&rtxn, store.dbs.data).map_err(|e| store.storage_err(e))?;
        let head_version = store
            .dbs
            .heads
            .last(&rtxn)
            .map_err(|e| store.storage_err(e))?
            .and_then(|(_, v)| SignedHead::decode(v).ok())
            .map_or(0, |h| h.version());
        drop(rtxn);
        match &meta.state {
            Some(d) if *d == found => {}
            None if head_version < crate::head::VERSION => {}
            _ => {
                return Err(OpenError::Corrupt {
                    path: dir.to_path_buf(),
                    reason: "the standby's data does not match the state digest of its last head"
                        .into(),
                })
            }
        }
        Ok(Self {
            store,
            held: Held {
                group: meta.group,
                checkpoints: meta.checkpoints,
                audit: meta.audit,
                epoch: meta.epoch,
                head_version,
                signer: meta.signing_key,
            },
            state: found,
            retention: crate::idempotency::Retention::default(),
            identity: primary,
            promotion_keys: Vec::new(),
            staged: Vec::new(),
            overlay: Overlay::default(),
        })
    }

    /// Keys a promotion head in the stream may hand signing to: the promoted nodes'
    /// keys, pinned by the operator like the identity (a standby that follows a primary
    /// which was itself promoted, e.g. a former primary that rejoined). Without them a
    /// promotion head is refused as signed by an untrusted key.
    pub fn trust_promotion_keys(&mut self, keys: Vec<PublicKey>) {
        self.promotion_keys = keys;
    }

    /// Sets the retention of durable idempotency keys (the primary's, so that both prune
    /// alike; the default is the ledger's default).
    pub fn set_idempotency_retention(&mut self, retention: crate::idempotency::Retention) {
        self.retention = retention;
    }

    /// The identity key of the primary ledger this is a copy of.
    pub fn identity(&self) -> PublicKey {
        self.identity
    }

    /// What the copy holds.
    pub fn held(&self) -> &Held {
        &self.held
    }

    /// The copy's store, for reads, `verify` and exporting onwards.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Checks `group` against the chain and, only if every check holds, makes it durable
    /// (one LMDB commit, one fsync). A refused group leaves nothing behind. With groups
    /// staged ([`Replica::stage`]), the group is staged behind them and every staged
    /// group is committed with it.
    pub fn apply(&mut self, group: &GroupRecords) -> Result<Applied, ApplyError> {
        if !self.staged.is_empty() {
            let applied = match self.stage(group, true)? {
                staging::Staging::Staged(a) => a,
                staging::Staging::Replayed { group } | staging::Staging::Confirmed { group } => {
                    return Err(ApplyError::Replayed { group })
                }
                staging::Staging::Replaced { applied, .. } => applied,
            };
            self.commit_staged(true)?;
            return Ok(applied);
        }
        let g = SignedHead::decode(&group.head)
            .map(|h| h.group)
            .unwrap_or(0);
        let storage = |source| ApplyError::Storage { group: g, source };
        let env = self.store.env.clone();
        let mut wtxn = env.write_txn().map_err(storage)?;
        let out = self.apply_in(
            &mut wtxn,
            group,
            &Base {
                held: &self.held,
                state: &self.state,
                overlay: None,
                prev_head: None,
                signature_verified: false,
            },
        )?;
        wtxn.commit().map_err(storage)?;
        self.state = out.state;
        self.held = out.held;
        Ok(out.applied)
    }

    /// Checks `group` on top of `base` and writes it into `wtxn` (nothing is committed):
    /// the whole of [`Replica::apply`] but the commit. Reads of `data` and `tx_index` see
    /// the writes of this group first, then `base.overlay` (staged groups LMDB does not
    /// hold yet), then the transaction.
    pub(crate) fn apply_in(
        &self,
        wtxn: &mut RwTxn<'_>,
        group: &GroupRecords,
        base: &Base<'_>,
    ) -> Result<Outcome, ApplyError> {
        let head = SignedHead::decode(&group.head).map_err(|e| ApplyError::BadHead {
            reason: e.to_string(),
        })?;
        let g = head.group;
        let next = base.held.group.saturating_add(1);
        if g < next {
            return Err(self.older_group(g, &group.head));
        }
        if head.promotion.is_some() && g == next {
            self.check_promotion_head(&head, base.held, base.prev_head)?;
        } else if head.public_key != base.held.signer {
            return Err(ApplyError::UntrustedSigner {
                group: g,
                found: hex(&head.public_key),
                expected: hex(&base.held.signer),
            });
        }
        if !base.signature_verified && !head.signature_valid() {
            return Err(ApplyError::BadSignature { group: g });
        }
        if g != next {
            return Err(ApplyError::OutOfOrder {
                expected: next,
                found: g,
            });
        }
        if head.epoch() != base.held.epoch && head.promotion.is_none() {
            return Err(ApplyError::WrongEpoch {
                group: g,
                found: head.epoch(),
                expected: base.held.epoch,
            });
        }
        if head.version() < base.held.head_version {
            return Err(ApplyError::VersionDowngrade {
                group: g,
                found: head.version(),
                held: base.held.head_version,
            });
        }
        let storage = |source| ApplyError::Storage { group: g, source };
        let mut state = base.state.clone();
        let mut writes = Writes::default();
        let cp_tip =
            self.apply_checkpoints(wtxn, &mut state, &mut writes, base, &group.checkpoints, g)?;
        if cp_tip != head.checkpoints {
            return Err(tip_mismatch("checkpoints", g, cp_tip, head.checkpoints));
        }
        let au_tip = self.apply_audit(wtxn, base.held.audit, &group.audit, g)?;
        if let Some(db) = self.store.dbs.idempotency {
            crate::idempotency::prune(db, wtxn, head.time_ns, self.retention).map_err(storage)?;
        }
        if au_tip != head.audit {
            return Err(tip_mismatch("audit", g, au_tip, head.audit));
        }
        let dbs = self.store.dbs;
        let put =
            |wtxn: &mut RwTxn<'_>, k: &[u8], v: &[u8]| dbs.meta.put(wtxn, k, v).map_err(storage);
        if let Some(signed) = head.state {
            let encoded = state.encode();
            let found = crate::state::hash_encoding(&encoded);
            if found != signed {
                return Err(ApplyError::StateMismatch {
                    group: g,
                    found: hex(&found),
                    expected: hex(&signed),
                });
            }
            put(wtxn, meta_keys::STATE, &encoded)?;
        }
        if g == 1 {
            let mut format = FORMAT_MARKER.to_vec();
            format.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
            put(wtxn, meta_keys::FORMAT, &format)?;
            put(wtxn, meta_keys::PUBLIC_KEY, &head.public_key)?;
        }
        if let Some(next_key) = &head.next_key {
            put(wtxn, meta_keys::SIGNING_KEY, next_key)?;
        }
        if head.promotion.is_some() {
            put(wtxn, meta_keys::SIGNING_KEY, &head.public_key)?;
        }
        dbs.heads
            .put(wtxn, &u64_key(g), &group.head)
            .map_err(storage)?;
        put(wtxn, meta_keys::CKPT_TIP, &encode_tip(&cp_tip))?;
        put(wtxn, meta_keys::AUDIT_TIP, &encode_tip(&au_tip))?;
        put(wtxn, meta_keys::GROUP, &u64_key(g))?;
        if g == 1 {
            put(wtxn, meta_keys::UNDONE_INDEX, &[1])?;
        }
        Ok(Outcome {
            held: Held {
                group: g,
                checkpoints: cp_tip,
                audit: au_tip,
                epoch: head.epoch(),
                head_version: head.version(),
                signer: head.next_key.unwrap_or(head.public_key),
            },
            state,
            applied: Applied {
                group: g,
                checkpoints: u64::try_from(group.checkpoints.len()).unwrap_or(u64::MAX),
                audit: u64::try_from(group.audit.len()).unwrap_or(u64::MAX),
            },
            writes,
        })
    }

    /// A group at or below the one held: a replay when the head is the one held, else a
    /// fork.
    fn older_group(&self, g: u64, head: &[u8]) -> ApplyError {
        let held = self
            .store
            .read_txn()
            .and_then(|rtxn| {
                Ok(self
                    .store
                    .dbs
                    .heads
                    .get(&rtxn, &u64_key(g))?
                    .map(<[u8]>::to_vec))
            })
            .ok()
            .flatten();
        match held {
            Some(h) if h == head => ApplyError::Replayed { group: g },
            Some(h) => ApplyError::Fork {
                chain: "group",
                seq: g,
                detail: format!(
                    "the primary's head of group {g} differs from the one this standby holds ({} vs {})",
                    hex(&crate::checkpoint::sha256(head)),
                    hex(&crate::checkpoint::sha256(&h))
                ),
            },
            None => ApplyError::OutOfOrder {
                expected: self.held.group.saturating_add(1),
                found: g,
            },
        }
    }

    fn apply_checkpoints(
        &self,
        wtxn: &mut RwTxn<'_>,
        state: &mut StateDigest,
        writes: &mut Writes,
        base: &Base<'_>,
        records: &[Vec<u8>],
        group: u64,
    ) -> Result<Tip, ApplyError> {
        let dbs = self.store.dbs;
        let storage = |source| ApplyError::Storage { group, source };
        let mut tip = base.held.checkpoints;
        for (i, bytes) in records.iter().enumerate() {
            let seq = tip.seq.saturating_add(1);
            let bad = |reason: String| ApplyError::BadRecord {
                chain: "checkpoints",
                seq,
                reason,
            };
            let record = Record::decode(bytes).map_err(|e| bad(format!("does not decode: {e}")))?;
            if record.seq() != seq {
                return Err(bad(format!("carries sequence {}", record.seq())));
            }
            if record.prev_hash() != tip.hash {
                return Err(broken_link("checkpoints", i, tip, &record.prev_hash()));
            }
            let hash: Hash = chain_hash(&tip.hash, bytes);
            let seq_key = u64_key(seq);
            for w in record.writes() {
                let old = match writes
                    .data
                    .get(&w.key)
                    .or_else(|| base.overlay.and_then(|o| o.data.get(&w.key)))
                {
                    Some(v) => Some(v.clone()),
                    None => dbs
                        .data
                        .get(wtxn, &w.key)
                        .map_err(storage)?
                        .map(<[u8]>::to_vec),
                };
                let held = match &old {
                    None => 0,
                    Some(v) => {
                        decode_value(v)
                            .ok_or_else(|| ApplyError::Corrupt { key: hex(&w.key) })?
                            .version
                    }
                };
                // A rollback record's before_version is the version it restores over.
                if held != w.before_version {
                    return Err(ApplyError::StateDiverged {
                        seq,
                        key: hex(&w.key),
                        claimed: w.before_version,
                        held,
                    });
                }
                let new = encode_value(seq, w.after.as_deref());
                state.replace(&w.key, old.as_deref(), &new);
                dbs.data.put(wtxn, &w.key, &new).map_err(storage)?;
                writes.data.insert(w.key.clone(), new);
            }
            match &record {
                Record::Transaction(cp) => {
                    let seen = writes.tx_ids.contains(&cp.tx_id.0)
                        || base.overlay.is_some_and(|o| o.tx_ids.contains(&cp.tx_id.0));
                    if seen
                        || dbs
                            .tx_index
                            .get(wtxn, &cp.tx_id.0)
                            .map_err(storage)?
                            .is_some()
                    {
                        return Err(bad(format!("repeats transaction id {}", cp.tx_id)));
                    }
                    let deps = encode_deps(&cp.reads);
                    if !deps.is_empty() {
                        dbs.deps.put(wtxn, &seq_key, &deps).map_err(storage)?;
                    }
                    dbs.tx_index
                        .put(wtxn, &cp.tx_id.0, &seq_key)
                        .map_err(storage)?;
                    writes.tx_ids.insert(cp.tx_id.0);
                }
                Record::Rollback(rb) => {
                    if let Some(undone) = dbs.undone {
                        for a in &rb.affected {
                            let key = u64_key(*a);
                            if undone.get(wtxn, &key).map_err(storage)?.is_none() {
                                undone.put(wtxn, &key, &seq_key).map_err(storage)?;
                            }
                        }
                    }
                }
            }
            dbs.checkpoints
                .put(wtxn, &seq_key, bytes)
                .map_err(storage)?;
            tip = Tip { seq, hash };
        }
        Ok(tip)
    }

    fn apply_audit(
        &self,
        wtxn: &mut RwTxn<'_>,
        from: Tip,
        records: &[Vec<u8>],
        group: u64,
    ) -> Result<Tip, ApplyError> {
        let storage = |source| ApplyError::Storage { group, source };
        let db = self.store.dbs.audit;
        let mut tip = from;
        for (i, bytes) in records.iter().enumerate() {
            let seq = tip.seq.saturating_add(1);
            let bad = |reason: String| ApplyError::BadRecord {
                chain: "audit",
                seq,
                reason,
            };
            let rec =
                AuditRecord::decode(bytes).map_err(|e| bad(format!("does not decode: {e}")))?;
            if rec.seq != seq {
                return Err(bad(format!("carries sequence {}", rec.seq)));
            }
            if rec.prev_hash != tip.hash {
                return Err(broken_link("audit", i, tip, &rec.prev_hash));
            }
            db.put(wtxn, &u64_key(seq), bytes).map_err(storage)?;
            // A durable idempotency key: indexed here exactly as the primary's committer
            // indexed it in the same group.
            if let (true, Some(index)) = (
                rec.event.event == crate::idempotency::EVENT,
                self.store.dbs.idempotency,
            ) {
                let f = &rec.event.fields;
                if let (Some(client), Some(key), Some(Ok(cseq))) = (
                    f.get("client"),
                    f.get("key"),
                    f.get("seq").map(|s| s.parse::<u64>()),
                ) {
                    let hash = crate::idempotency::key_hash(client, key);
                    crate::idempotency::insert(index, wtxn, &hash, cseq, rec.time_ns)
                        .map_err(storage)?;
                }
            }
            // An admin command the primary accepted: its nonce is recorded here too, so
            // that the same command replayed to this node once promoted is refused.
            if rec.event.event == "admin.accepted" {
                if let Some(nonce) = rec
                    .event
                    .fields
                    .get("nonce")
                    .and_then(|n| crate::codec::unhex(n))
                    .and_then(|n| <[u8; 16]>::try_from(n).ok())
                {
                    let nonces = self.store.dbs.nonces;
                    if nonces.get(wtxn, &nonce).map_err(storage)?.is_none() {
                        let body: Hash = rec
                            .event
                            .fields
                            .get("body_sha256")
                            .and_then(|h| crate::codec::unhex(h))
                            .and_then(|h| <[u8; 32]>::try_from(h).ok())
                            .unwrap_or([0; 32]);
                        let mut value = Vec::with_capacity(40);
                        value.extend_from_slice(
                            &rec.time_ns
                                .saturating_add(REPLICATED_NONCE_TTL_NS)
                                .to_be_bytes(),
                        );
                        value.extend_from_slice(&body);
                        nonces.put(wtxn, &nonce, &value).map_err(storage)?;
                    }
                }
            }
            tip = Tip {
                seq,
                hash: chain_hash(&tip.hash, bytes),
            };
        }
        Ok(tip)
    }
}

/// How long a replicated admin nonce is kept: the longest validity window a console
/// accepts (a week) plus the largest clock-skew allowance (an hour), counted from the
/// `admin.accepted` record's time. The console prunes it like its own after that.
pub const REPLICATED_NONCE_TTL_NS: u64 = (7 * 24 + 1) * 3600 * 1_000_000_000;

/// A record (the `index`-th of its chain in the group) whose link is not the hash of the
/// record before it: for the first, the primary's history differs from the standby's at
/// `tip` (a fork); later, the group itself is inconsistent.
fn broken_link(chain: &'static str, index: usize, tip: Tip, link: &Hash) -> ApplyError {
    let seq = tip.seq.saturating_add(1);
    if index == 0 {
        return ApplyError::Fork {
            chain,
            seq: tip.seq,
            detail: format!(
                "the primary's record {seq} links to {} as record {}, but this standby holds {}",
                hex(link),
                tip.seq,
                hex(&tip.hash)
            ),
        };
    }
    ApplyError::BadRecord {
        chain,
        seq,
        reason: "does not link to the record before it".into(),
    }
}

fn tip_mismatch(chain: &'static str, group: u64, found: Tip, expected: Tip) -> ApplyError {
    ApplyError::TipMismatch {
        chain,
        group,
        found: format!("{} ({})", found.seq, hex(&found.hash)),
        expected: format!("{} ({})", expected.seq, hex(&expected.hash)),
    }
}
