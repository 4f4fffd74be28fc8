//! The rollback record (checkpoint kind 0x02), [`Record`] (either kind of checkpoint-chain
//! record) and [`RollbackPlan`]: what the committer writes and what readers, the planner
//! and `verify` decode. Re-exported by [`crate::rollback`].
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
//!
//! A record format: uses [`crate::checkpoint`], [`crate::codec`] and [`crate::types`].

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::checkpoint::{self, decode_writes, encode_writes, Checkpoint, WriteEntry};
use crate::codec::{DecodeError, Reader, Writer};
use crate::types::{Hash, TxId};

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
