//! Whether what a transaction has read is still current in a given LMDB transaction: every
//! key's version and every scanned range's contents.
//!
//! One check, two callers: the committer validates a transaction with it inside the group's
//! write transaction (`group.rs`: serializability), and a long transaction that gave up its
//! snapshot re-validates against its fresh one before its next operation (`txn.rs`: the
//! handler never sees a mix of states). The work is bounded by the transaction's read and
//! scan limits ([`crate::limits`]).
//!
//! Below the committer (`group.rs`) and `txn`: uses only the data-value encoding, the
//! queue's [`ScanRecord`] and [`CommitError`].

use std::collections::BTreeMap;
use std::ops::Bound;

use heed::types::Bytes;
use heed::{Database, RoTxn};

use crate::codec::hex;
use crate::commit_error::CommitError;
use crate::job::ScanRecord;
use crate::value::decode_value;

/// Why a read set is not current.
#[derive(Debug)]
pub(crate) enum Stale {
    /// A key's version changed or a scanned range changed ([`CommitError::Conflict`],
    /// [`CommitError::ScanConflict`]), or a stored value is malformed
    /// ([`CommitError::Corrupt`]).
    Changed(CommitError),
    /// LMDB failed.
    Storage(heed::Error),
}

impl From<heed::Error> for Stale {
    fn from(e: heed::Error) -> Self {
        Stale::Storage(e)
    }
}

/// The version stored under `key` in `txn` (0: absent).
pub(crate) fn version(data: Database<Bytes, Bytes>, txn: &RoTxn, key: &[u8]) -> Result<u64, Stale> {
    match data.get(txn, key)? {
        None => Ok(0),
        Some(bytes) => decode_value(bytes)
            .map(|s| s.version)
            .ok_or_else(|| Stale::Changed(CommitError::Corrupt { key: hex(key) })),
    }
}

/// Whether every `(key, version)` of `reads` and every range of `scans` is as the
/// transaction saw it, in `txn`.
pub(crate) fn reads_current(
    data: Database<Bytes, Bytes>,
    txn: &RoTxn,
    reads: &BTreeMap<Vec<u8>, u64>,
    scans: &[ScanRecord],
) -> Result<(), Stale> {
    for (key, &read) in reads {
        let current = version(data, txn, key)?;
        if current != read {
            return Err(Stale::Changed(CommitError::Conflict {
                key: hex(key),
                read,
                current,
            }));
        }
    }
    for scan in scans {
        scan_current(data, txn, scan)?;
    }
    Ok(())
}

/// Whether a scanned range holds exactly the keys, at the versions, the scan saw.
fn scan_current(data: Database<Bytes, Bytes>, txn: &RoTxn, scan: &ScanRecord) -> Result<(), Stale> {
    let end = match &scan.end {
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    };
    let range = (Bound::Included(scan.start.as_slice()), end);
    let mut expected = scan.seen.iter();
    let conflict = |reason: String| {
        Stale::Changed(CommitError::ScanConflict {
            start: hex(&scan.start),
            reason,
        })
    };
    for item in data.range(txn, &range)? {
        let (k, v) = item?;
        let version = decode_value(v)
            .ok_or_else(|| Stale::Changed(CommitError::Corrupt { key: hex(k) }))?
            .version;
        match expected.next() {
            Some((ek, ev)) if ek.as_slice() == k && *ev == version => {}
            Some((ek, ev)) => {
                return Err(conflict(format!(
                    "saw {} at version {ev}, now {} at version {version}",
                    hex(ek),
                    hex(k)
                )))
            }
            None => return Err(conflict(format!("{} was added", hex(k)))),
        }
    }
    if let Some((ek, _)) = expected.next() {
        return Err(conflict(format!("{} is gone", hex(ek))));
    }
    Ok(())
}
