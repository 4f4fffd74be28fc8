//! The `undone` index: commit seq -> the first rollback record that undid it. Derived
//! from the signed rollback records of the checkpoint chain and unsigned, so it is rebuilt
//! (and any difference audited) at every read-write open, and `verify` compares it with
//! the records.
//!
//! A table: uses the store, the rollback record format and [`crate::read::ReadError`].

use std::collections::BTreeMap;

use heed::types::Bytes;
use heed::{Database, RoTxn, WithoutTls};

use crate::read::ReadError;
use crate::record::{RollbackRecord, KIND_ROLLBACK};
use crate::store::{meta_keys, names, read_u64, u64_key, OpenError, Store, UndoneMismatch};

/// What building the `undone` index read.
#[derive(Debug, Clone, Default)]
pub(crate) struct UndoneBuilt {
    /// Rollback records indexed.
    pub rollbacks: u64,
    /// Rollback records that did not decode (left to `verify`).
    pub unreadable: u64,
    /// Stored index entries that differed from the rebuilt index (0: it matched).
    pub repaired: u64,
    /// The first of them.
    pub first_repaired: Option<UndoneMismatch>,
}

/// The stored `undone` index: (key as u64 or `u64::MAX`, value as u64 if it is one).
pub(crate) fn read_undone(
    db: Database<Bytes, Bytes>,
    txn: &RoTxn<'_, WithoutTls>,
) -> heed::Result<Vec<(u64, Option<u64>)>> {
    let mut out = Vec::new();
    for item in db.iter(txn)? {
        let (k, v) = item?;
        let key = if k.len() == 8 { read_u64(k) } else { None };
        let value = if v.len() == 8 { read_u64(v) } else { None };
        out.push((key.unwrap_or(u64::MAX), key.and(value)));
    }
    Ok(out)
}

/// The first entry (in seq order) where `stored` and `expected` disagree, and how many do.
pub(crate) fn first_difference(
    stored: &[(u64, Option<u64>)],
    expected: &BTreeMap<u64, u64>,
) -> Option<(UndoneMismatch, u64)> {
    let mut diffs: BTreeMap<u64, UndoneMismatch> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for (seq, value) in stored {
        seen.insert(*seq);
        let want = expected.get(seq).copied();
        if *value != want || value.is_none() {
            diffs.entry(*seq).or_insert(UndoneMismatch {
                seq: *seq,
                stored: *value,
                expected: want,
            });
        }
    }
    for (seq, by) in expected {
        if !seen.contains(seq) {
            diffs.entry(*seq).or_insert(UndoneMismatch {
                seq: *seq,
                stored: None,
                expected: Some(*by),
            });
        }
    }
    let count = u64::try_from(diffs.len()).unwrap_or(u64::MAX);
    diffs.into_values().next().map(|first| (first, count))
}

impl Store {
    /// The `undone` index as the signed rollback records of the checkpoint chain say it
    /// must be (commit seq -> the first rollback record that undid it), with how many
    /// rollback records were read and how many did not decode (left to `verify`).
    pub(crate) fn undone_expected_in(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
    ) -> heed::Result<(BTreeMap<u64, u64>, UndoneBuilt)> {
        let mut built = UndoneBuilt::default();
        let mut expected = BTreeMap::new();
        for item in self.dbs.checkpoints.iter(txn)? {
            let (_, v) = item?;
            if v.get(5) != Some(&KIND_ROLLBACK) {
                continue;
            }
            match RollbackRecord::decode(v) {
                Ok(record) => {
                    built.rollbacks = built.rollbacks.saturating_add(1);
                    for undone in &record.affected {
                        // Ascending seq order: the first record that undid it stays.
                        expected.entry(*undone).or_insert(record.seq);
                    }
                }
                Err(_) => built.unreadable = built.unreadable.saturating_add(1),
            }
        }
        Ok((expected, built))
    }

    /// Rebuilds the `undone` index at a read-write open, in one write transaction, from the
    /// signed rollback records of the checkpoint chain, and marks it complete. The stored
    /// copy is unsigned and steers rollbacks, so it is never trusted across a restart: in
    /// an index marked complete, entries that differed from the rebuilt index (added,
    /// missing or changed: tampering, or a damaged file) are counted in `repaired`, the
    /// first named.
    pub(crate) fn ensure_undone_index(&mut self) -> Result<UndoneBuilt, OpenError> {
        let storage = |e| self.storage_err(e);
        let mut wtxn = self.env.write_txn().map_err(storage)?;
        let db = self
            .env
            .create_database::<Bytes, Bytes>(&mut wtxn, Some(names::UNDONE))
            .map_err(storage)?;
        // Unmarked: an older ledger, or a first start that stopped before its mark; its
        // index is built, not repaired.
        let marked = self
            .dbs
            .meta
            .get(&wtxn, meta_keys::UNDONE_INDEX)
            .map_err(storage)?
            .is_some();
        let (expected, mut built) = self.undone_expected_in(&wtxn).map_err(storage)?;
        let stored = read_undone(db, &wtxn).map_err(storage)?;
        if let Some((first, count)) = first_difference(&stored, &expected) {
            if marked {
                built.repaired = count;
                built.first_repaired = Some(first);
            }
            db.clear(&mut wtxn).map_err(storage)?;
            for (undone, by) in &expected {
                db.put(&mut wtxn, &u64_key(*undone), &u64_key(*by))
                    .map_err(storage)?;
            }
        }
        self.dbs
            .meta
            .put(&mut wtxn, meta_keys::UNDONE_INDEX, &[1])
            .map_err(storage)?;
        wtxn.commit().map_err(storage)?;
        self.dbs.undone = Some(db);
        Ok(built)
    }

    /// Marks the `undone` index complete (a new ledger's, which has had it from its
    /// creation).
    pub(crate) fn mark_undone_index(&self) -> Result<(), OpenError> {
        let storage = |e| self.storage_err(e);
        let mut wtxn = self.env.write_txn().map_err(storage)?;
        self.dbs
            .meta
            .put(&mut wtxn, meta_keys::UNDONE_INDEX, &[1])
            .map_err(storage)?;
        wtxn.commit().map_err(storage)
    }

    /// The rollback record that undid commit `seq`, if one did (the first, if several).
    pub fn undone_by(&self, seq: u64) -> Result<Option<u64>, ReadError> {
        let rtxn = self.read_txn()?;
        self.undone_by_in(&rtxn, seq)
    }

    /// [`Store::undone_by`] within a read transaction. Without the index (a ledger of an
    /// earlier release opened read-only), the rollback records after `seq` are read.
    pub(crate) fn undone_by_in(
        &self,
        rtxn: &RoTxn<'_, WithoutTls>,
        seq: u64,
    ) -> Result<Option<u64>, ReadError> {
        if let Some(db) = self.dbs.undone {
            return Ok(db.get(rtxn, &u64_key(seq))?.and_then(read_u64));
        }
        let start = u64_key(seq.saturating_add(1));
        let range = (
            std::ops::Bound::Included(&start[..]),
            std::ops::Bound::Unbounded,
        );
        for item in self.dbs.checkpoints.range(rtxn, &range)? {
            let (k, v) = item?;
            if v.get(5) != Some(&KIND_ROLLBACK) {
                continue;
            }
            let at = read_u64(k).unwrap_or(0);
            let record = RollbackRecord::decode(v).map_err(|source| ReadError::Corrupt {
                what: "checkpoint",
                at: at.to_string(),
                source,
            })?;
            if record.affected.binary_search(&seq).is_ok() {
                return Ok(Some(record.seq));
            }
        }
        Ok(None)
    }
}
