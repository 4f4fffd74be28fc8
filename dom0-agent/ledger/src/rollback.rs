//! Rollback: undoing attack transactions and everything that depended on them, recorded as
//! a new link of the checkpoint chain (history is never rewritten).
//!
//! # What is undone
//! The **affected set** of attack transactions `R` is `R` plus every later commit that read
//! a version written by a member (transitively), from the `deps` index. For every key any
//! affected transaction wrote, the restored value is the after-image of the **latest writer
//! of that key that is not affected** (a blind write by an unaffected transaction, or an
//! earlier rollback, stands), or, if every writer is affected, the before-image of the
//! earliest one. Keys whose current writer is unaffected are left alone. All restored
//! values are written in one LMDB write transaction together with the rollback record:
//! concurrent transactions either commit before it (and are planned for) or see the
//! repaired state; one that read a key the rollback changes fails validation and retries.
//!
//! Without cascade, only `R` is undone, and the rollback is **refused** if any later commit
//! read what `R` wrote: undoing `R` alone would leave those commits' effects built on data
//! that no longer exists.
//!
//! # Record (checkpoint kind 0x02)
//! ```text
//! offset size  field
//!      0    4  magic "MFCP"
//!      4    1  format version = 1
//!      5    1  kind = 0x02 rollback
//!      6    8  seq           u64 BE, its place in the checkpoint chain
//!     14   32  prev_hash     hash of checkpoint seq-1
//!     46   16  rollback_id
//!     62  2+n  reason        u16 length, <= 1024 bytes of UTF-8
//!      .   32  policy_hash   SHA-256 of the policy bundle that decided it (zeros: manual)
//!      .    8  time_ns       u64 BE, Unix time in ns of its commit
//!      .    4  root count    u32 BE, 1..=1024, then u64 BE seqs, strictly increasing
//!      .    4  affected count u32 BE, <= 1,000,000, then u64 BE seqs, strictly increasing,
//!                            a superset of the roots
//!      .    4  write count   u32 BE, <= 1,000,000, then write entries exactly as in a
//!                            transaction checkpoint (key, before_version, before, after),
//!                            strictly increasing by key
//! ```
//! A whole record is at most [`MAX_ROLLBACK_BYTES`].

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use crate::checkpoint::{
    self, decode_writes, encode_writes, Checkpoint, WriteEntry, KIND_TRANSACTION,
};
use crate::codec::{DecodeError, Reader, Writer};
use crate::read::ReadError;
use crate::store::{read_u64, u64_key, Store};
use crate::txn::decode_value;
use crate::{Hash, TxId};

/// Kind byte of a rollback record.
pub const KIND_ROLLBACK: u8 = 0x02;
/// Most attack transactions named by one rollback.
pub const MAX_ROOTS: usize = 1024;
/// Most affected transactions or restored keys in one rollback.
pub const MAX_AFFECTED: usize = 1_000_000;
/// Longest reason.
pub const MAX_REASON: usize = 1024;
/// Cap on one encoded rollback record.
pub const MAX_ROLLBACK_BYTES: usize = 256 << 20;

/// A committed rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackRecord {
    /// Its sequence in the checkpoint chain.
    pub seq: u64,
    /// Hash of checkpoint `seq - 1`.
    pub prev_hash: Hash,
    /// Id of the rollback operation.
    pub rollback_id: TxId,
    /// Why (the rule or the operator's words).
    pub reason: String,
    /// Policy bundle that decided it (zeros: a manual rollback).
    pub policy_hash: Hash,
    /// Unix time in ns of its commit.
    pub time_ns: u64,
    /// The attack transactions.
    pub roots: Vec<u64>,
    /// Everything undone (roots included).
    pub affected: Vec<u64>,
    /// What it wrote: before = value at the rollback, after = restored value.
    pub writes: Vec<WriteEntry>,
}

fn encode_seqs(w: &mut Writer, seqs: &[u64]) {
    w.u32(u32::try_from(seqs.len()).unwrap_or(u32::MAX));
    for s in seqs {
        w.u64(*s);
    }
}

fn decode_seqs(
    r: &mut Reader<'_>,
    max: usize,
    field: &'static str,
) -> Result<Vec<u64>, DecodeError> {
    let n = r.count32(max, 8, field)?;
    let mut out: Vec<u64> = Vec::with_capacity(n);
    for _ in 0..n {
        let s = r.u64(field)?;
        if s == 0 || out.last().is_some_and(|p| *p >= s) {
            return Err(DecodeError::NotCanonical {
                field,
                reason: "sequences not strictly increasing from 1",
            });
        }
        out.push(s);
    }
    Ok(out)
}

impl RollbackRecord {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(256);
        w.raw(checkpoint::MAGIC.as_bytes());
        w.u8(checkpoint::VERSION);
        w.u8(KIND_ROLLBACK);
        w.u64(self.seq);
        w.raw(&self.prev_hash);
        w.raw(&self.rollback_id.0);
        w.bytes16(self.reason.as_bytes());
        w.raw(&self.policy_hash);
        w.u64(self.time_ns);
        encode_seqs(&mut w, &self.roots);
        encode_seqs(&mut w, &self.affected);
        encode_writes(&mut w, &self.writes);
        w.finish()
    }

    /// Decodes and validates one stored rollback record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_ROLLBACK_BYTES {
            return Err(DecodeError::TooLarge {
                field: "rollback record",
                len: bytes.len(),
                max: MAX_ROLLBACK_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        r.header(
            checkpoint::MAGIC,
            "rollback",
            checkpoint::VERSION,
            KIND_ROLLBACK,
        )?;
        let seq = r.seq()?;
        let prev_hash = r.array("prev_hash")?;
        let rollback_id = TxId(r.array("rollback_id")?);
        let reason = r.str16(MAX_REASON, "reason")?.to_owned();
        let policy_hash = r.array("policy_hash")?;
        let time_ns = r.u64("time_ns")?;
        let roots = decode_seqs(&mut r, MAX_ROOTS, "roots")?;
        if roots.is_empty() {
            return Err(DecodeError::NotCanonical {
                field: "roots",
                reason: "a rollback names at least one transaction",
            });
        }
        let affected = decode_seqs(&mut r, MAX_AFFECTED, "affected")?;
        if roots.iter().any(|s| affected.binary_search(s).is_err()) {
            return Err(DecodeError::NotCanonical {
                field: "affected",
                reason: "does not contain every root",
            });
        }
        if affected.iter().any(|a| *a >= seq) {
            return Err(DecodeError::NotCanonical {
                field: "affected",
                reason: "names a commit not before the rollback",
            });
        }
        let writes = decode_writes(&mut r, MAX_AFFECTED)?;
        r.finish()?;
        Ok(Self {
            seq,
            prev_hash,
            rollback_id,
            reason,
            policy_hash,
            time_ns,
            roots,
            affected,
            writes,
        })
    }
}

/// Any record of the checkpoint chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A committed transaction.
    Transaction(Checkpoint),
    /// A rollback.
    Rollback(RollbackRecord),
}

impl Record {
    /// Decodes a record of either kind (the kind byte is at offset 5).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match bytes.get(5) {
            Some(&KIND_ROLLBACK) => RollbackRecord::decode(bytes).map(Self::Rollback),
            _ => Checkpoint::decode(bytes).map(Self::Transaction),
        }
    }
    /// Its sequence.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Transaction(c) => c.seq,
            Self::Rollback(r) => r.seq,
        }
    }
    /// The link it stores.
    pub fn prev_hash(&self) -> Hash {
        match self {
            Self::Transaction(c) => c.prev_hash,
            Self::Rollback(r) => r.prev_hash,
        }
    }
    /// What it wrote.
    pub fn writes(&self) -> &[WriteEntry] {
        match self {
            Self::Transaction(c) => &c.writes,
            Self::Rollback(r) => &r.writes,
        }
    }
}

/// Why a rollback cannot be planned or applied.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// No roots, or too many.
    #[error("a rollback names 1..={MAX_ROOTS} transactions, not {0}")]
    BadRoots(usize),
    /// A root is not a committed transaction.
    #[error("commit {seq} is not a committed transaction ({what})")]
    NotATransaction {
        /// The sequence given.
        seq: u64,
        /// What it is instead.
        what: &'static str,
    },
    /// Without cascade, later commits read what the roots wrote.
    #[error("{count} later commits read what the rolled-back transactions wrote (first: {first:?}); roll back with cascade, or not at all")]
    DependentsExist {
        /// How many.
        count: usize,
        /// The first few.
        first: Vec<u64>,
    },
    /// Everything the roots wrote is already superseded or restored.
    #[error("nothing to undo: every key the transactions wrote has already been restored or overwritten")]
    NothingToUndo,
    /// A key's last writer is a rollback record: what was there is already restored.
    #[error("nothing to undo: the key was last written by rollback record {by}")]
    KeyRestored {
        /// The rollback record.
        by: u64,
    },
    /// Every root was already undone by an earlier rollback.
    #[error("nothing to undo: commit {seq} was already rolled back by record {by}")]
    AlreadyRolledBack {
        /// The (first) root.
        seq: u64,
        /// The rollback record that undid it.
        by: u64,
    },
    /// The rollback is too large for one record.
    #[error("rollback of {affected} commits over {keys} keys exceeds the limits of one record")]
    TooLarge {
        /// Affected commits.
        affected: usize,
        /// Keys to restore.
        keys: usize,
    },
    /// Commits kept changing what the plan covers; gave up after several tries.
    #[error("the ledger kept changing under the rollback; tried {attempts} times")]
    Contended {
        /// Attempts made.
        attempts: u32,
    },
    /// Reading the ledger failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Committing the rollback failed.
    #[error("committing the rollback: {0}")]
    Commit(#[from] crate::CommitError),
}

impl From<heed::Error> for RollbackError {
    fn from(e: heed::Error) -> Self {
        Self::Read(ReadError::Storage(e))
    }
}

/// What a rollback will do (a dry run returns it without changing anything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPlan {
    /// The attack transactions.
    pub roots: Vec<u64>,
    /// Everything undone (roots included), ascending.
    pub affected: Vec<u64>,
    /// The legitimate affected transactions, in commit order: candidates for replay.
    pub replay: Vec<u64>,
    /// Restored values: before = value now, after = restored value.
    pub writes: Vec<WriteEntry>,
    /// The checkpoint tip the plan was computed at.
    pub tip: u64,
}

fn corrupt(seq: u64, source: DecodeError) -> RollbackError {
    RollbackError::Read(ReadError::Corrupt {
        what: "checkpoint",
        at: seq.to_string(),
        source,
    })
}

impl Store {
    /// Any record of the checkpoint chain.
    pub fn record(&self, seq: u64) -> Result<Option<Record>, ReadError> {
        let rtxn = self.read_txn()?;
        let Some(bytes) = self.dbs.checkpoints.get(&rtxn, &u64_key(seq))? else {
            return Ok(None);
        };
        Record::decode(bytes)
            .map(Some)
            .map_err(|source| ReadError::Corrupt {
                what: "checkpoint",
                at: seq.to_string(),
                source,
            })
    }

    /// Plans the rollback of `roots` (commit sequences) without changing anything.
    pub fn plan_rollback(
        &self,
        roots: &[u64],
        cascade: bool,
    ) -> Result<RollbackPlan, RollbackError> {
        let roots: Vec<u64> = roots
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if roots.is_empty() || roots.len() > MAX_ROOTS {
            return Err(RollbackError::BadRoots(roots.len()));
        }
        let rtxn = self.read_txn()?;
        let tip = self
            .dbs
            .checkpoints
            .last(&rtxn)?
            .and_then(|(k, _)| read_u64(k))
            .unwrap_or(0);
        // Roots an earlier rollback undid have nothing left to undo; if that is all of
        // them, say so (whatever read them since, they are no dependents any more).
        let mut live_roots = Vec::with_capacity(roots.len());
        let mut first_undone = None;
        for &seq in &roots {
            match self.undone_by_in(&rtxn, seq)? {
                Some(by) => {
                    first_undone.get_or_insert((seq, by));
                }
                None => live_roots.push(seq),
            }
        }
        if let (true, Some((seq, by))) = (live_roots.is_empty(), first_undone) {
            return Err(RollbackError::AlreadyRolledBack { seq, by });
        }
        let roots = live_roots;
        let mut records: BTreeMap<u64, Record> = BTreeMap::new();
        for &seq in &roots {
            let bytes = self.dbs.checkpoints.get(&rtxn, &u64_key(seq))?.ok_or(
                RollbackError::NotATransaction {
                    seq,
                    what: "no such commit",
                },
            )?;
            match bytes.get(5) {
                Some(&KIND_TRANSACTION) => {}
                _ => {
                    return Err(RollbackError::NotATransaction {
                        seq,
                        what: "a rollback record",
                    })
                }
            }
            records.insert(seq, Record::decode(bytes).map_err(|e| corrupt(seq, e))?);
        }

        // The affected set: one forward pass over `deps` from the first root.
        let mut affected: BTreeSet<u64> = roots.iter().copied().collect();
        let first = roots.first().copied().unwrap_or(0);
        let start = u64_key(first.saturating_add(1));
        let range = (Bound::Included(&start[..]), Bound::Unbounded);
        let mut dependents = Vec::new();
        for item in self.dbs.deps.range(&rtxn, &range)? {
            let (k, v) = item?;
            let Some(reader) = read_u64(k) else { continue };
            if affected.contains(&reader) {
                continue;
            }
            if v.chunks_exact(8)
                .filter_map(read_u64)
                .any(|w| affected.contains(&w))
            {
                // A reader an earlier rollback undid is no dependent: its effects are gone.
                if self.undone_by_in(&rtxn, reader)?.is_some() {
                    continue;
                }
                dependents.push(reader);
                if cascade {
                    affected.insert(reader);
                }
            }
        }
        if !cascade && !dependents.is_empty() {
            return Err(RollbackError::DependentsExist {
                count: dependents.len(),
                first: dependents.iter().copied().take(10).collect(),
            });
        }
        if affected.len() > MAX_AFFECTED {
            return Err(RollbackError::TooLarge {
                affected: affected.len(),
                keys: 0,
            });
        }

        // Every key an affected transaction wrote.
        let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
        for &seq in &affected {
            if let std::collections::btree_map::Entry::Vacant(slot) = records.entry(seq) {
                let bytes = self.dbs.checkpoints.get(&rtxn, &u64_key(seq))?.ok_or(
                    RollbackError::NotATransaction {
                        seq,
                        what: "missing from the chain",
                    },
                )?;
                slot.insert(Record::decode(bytes).map_err(|e| corrupt(seq, e))?);
            }
            if let Some(rec) = records.get(&seq) {
                keys.extend(rec.writes().iter().map(|w| w.key.clone()));
            }
        }
        if keys.len() > MAX_AFFECTED {
            return Err(RollbackError::TooLarge {
                affected: affected.len(),
                keys: keys.len(),
            });
        }

        // For each key: walk its writers back from the current version to the latest
        // unaffected one.
        let mut writes = Vec::new();
        for key in keys {
            let (current_version, current) = match self.dbs.data.get(&rtxn, &key)? {
                None => (0, None),
                Some(bytes) => {
                    let s = decode_value(bytes).ok_or_else(|| {
                        RollbackError::Read(ReadError::Corrupt {
                            what: "data value",
                            at: crate::codec::hex(&key),
                            source: DecodeError::NotCanonical {
                                field: "data value",
                                reason: "bad tag or length",
                            },
                        })
                    })?;
                    (s.version, s.value.map(<[u8]>::to_vec))
                }
            };
            if !affected.contains(&current_version) {
                continue; // its current writer stands
            }
            let mut version = current_version;
            let restored = loop {
                if version == 0 {
                    break None;
                }
                if !affected.contains(&version) {
                    // The latest unaffected writer: its after-image stands.
                    let bytes = self.dbs.checkpoints.get(&rtxn, &u64_key(version))?.ok_or(
                        RollbackError::NotATransaction {
                            seq: version,
                            what: "missing from the chain",
                        },
                    )?;
                    let rec = Record::decode(bytes).map_err(|e| corrupt(version, e))?;
                    break rec
                        .writes()
                        .iter()
                        .find(|w| w.key == key)
                        .and_then(|w| w.after.clone());
                }
                let rec = match records.get(&version) {
                    Some(r) => r.clone(),
                    None => {
                        let bytes = self.dbs.checkpoints.get(&rtxn, &u64_key(version))?.ok_or(
                            RollbackError::NotATransaction {
                                seq: version,
                                what: "missing from the chain",
                            },
                        )?;
                        Record::decode(bytes).map_err(|e| corrupt(version, e))?
                    }
                };
                let entry = rec.writes().iter().find(|w| w.key == key).cloned();
                match entry {
                    Some(w) if w.before_version < version => {
                        if w.before_version == 0 {
                            break w.before;
                        }
                        version = w.before_version;
                    }
                    // A writer that does not list the key, or a link that does not point
                    // back in time: the chain is damaged.
                    _ => {
                        return Err(corrupt(
                            version,
                            DecodeError::NotCanonical {
                                field: "write set",
                                reason: "broken writer chain",
                            },
                        ))
                    }
                }
            };
            writes.push(WriteEntry {
                key,
                before_version: current_version,
                before: current,
                after: restored,
            });
        }
        if writes.is_empty() {
            return Err(RollbackError::NothingToUndo);
        }
        let replay = affected
            .iter()
            .copied()
            .filter(|s| roots.binary_search(s).is_err())
            .collect();
        Ok(RollbackPlan {
            roots,
            affected: affected.into_iter().collect(),
            replay,
            writes,
            tip,
        })
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn sample() -> RollbackRecord {
        RollbackRecord {
            seq: 9,
            prev_hash: [1; 32],
            rollback_id: TxId([2; 16]),
            reason: "test".into(),
            policy_hash: [3; 32],
            time_ns: 4,
            roots: vec![2],
            affected: vec![2, 5, 7],
            writes: vec![WriteEntry {
                key: b"k".to_vec(),
                before_version: 7,
                before: Some(b"bad".to_vec()),
                after: Some(b"good".to_vec()),
            }],
        }
    }

    #[test]
    fn round_trip_and_rules() {
        let r = sample();
        assert_eq!(RollbackRecord::decode(&r.encode()).unwrap(), r);
        assert!(matches!(
            Record::decode(&r.encode()),
            Ok(Record::Rollback(_))
        ));
        let mut bad = sample();
        bad.affected = vec![5, 7]; // misses the root
        assert!(RollbackRecord::decode(&bad.encode()).is_err());
        let mut bad = sample();
        bad.affected = vec![2, 9]; // names the rollback itself
        assert!(RollbackRecord::decode(&bad.encode()).is_err());
        let mut bad = sample();
        bad.roots = vec![];
        bad.affected = vec![];
        assert!(RollbackRecord::decode(&bad.encode()).is_err());
    }

    #[test]
    fn truncations_and_mutations_never_panic() {
        let base = sample().encode();
        for cut in 0..base.len() {
            assert!(RollbackRecord::decode(&base[..cut]).is_err());
        }
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let mut b = base.clone();
            let i = rng.usize(..b.len());
            b[i] = rng.u8(..);
            let _ = Record::decode(&b);
        }
    }
}
