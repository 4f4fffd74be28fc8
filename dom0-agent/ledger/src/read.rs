//! Read-only queries over committed state: checkpoints, audit records, data and the
//! dependency indexes. They work on any [`Store`], including one opened read-only.
//!
//! Queries, just above the store: they use [`crate::store`] and the record formats
//! (checkpoint, audit, head, rollback record, data values) only, so that every table and
//! the engine above can use them. [`ReadError`] is their error.

use std::collections::BTreeMap;

use crate::audit::AuditRecord;
use crate::checkpoint::Checkpoint;
use crate::codec::{hex, DecodeError};
use crate::store::{read_u64, u64_key, Store};
use crate::value::decode_value;
use crate::TxId;

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// LMDB failed.
    #[error("storage: {0}")]
    Storage(#[from] heed::Error),
    /// A stored record does not decode.
    #[error("{what} {at} does not decode: {source}")]
    Corrupt {
        /// Which record type.
        what: &'static str,
        /// Which key.
        at: String,
        /// Decoder's error.
        source: DecodeError,
    },
}

impl Store {
    /// The transaction checkpoint with commit sequence `seq` (`None` if there is none, or
    /// if `seq` is a rollback record: see [`Store::record`]).
    pub fn checkpoint(&self, seq: u64) -> Result<Option<Checkpoint>, ReadError> {
        let rtxn = self.read_txn()?;
        let Some(bytes) = self.dbs.checkpoints.get(&rtxn, &u64_key(seq))? else {
            return Ok(None);
        };
        if bytes.get(5) == Some(&crate::record::KIND_ROLLBACK) {
            return Ok(None);
        }
        Checkpoint::decode(bytes)
            .map(Some)
            .map_err(|source| ReadError::Corrupt {
                what: "checkpoint",
                at: seq.to_string(),
                source,
            })
    }

    /// Records of the checkpoint chain (transactions and rollbacks) with `seq >= from`, at
    /// most `limit`, in order.
    pub fn records(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<crate::record::Record>, ReadError> {
        let rtxn = self.read_txn()?;
        let start = u64_key(from);
        let range = (
            std::ops::Bound::Included(&start[..]),
            std::ops::Bound::Unbounded,
        );
        let mut out = Vec::new();
        for item in self.dbs.checkpoints.range(&rtxn, &range)?.take(limit) {
            let (k, v) = item?;
            out.push(
                crate::record::Record::decode(v).map_err(|source| ReadError::Corrupt {
                    what: "checkpoint",
                    at: read_u64(k).map_or_else(|| hex(k), |s| s.to_string()),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// The newest `limit` signed heads, newest first.
    pub fn last_heads(&self, limit: usize) -> Result<Vec<crate::head::SignedHead>, ReadError> {
        let rtxn = self.read_txn()?;
        let mut out = Vec::new();
        for item in self.dbs.heads.rev_iter(&rtxn)?.take(limit) {
            let (k, v) = item?;
            out.push(
                crate::head::SignedHead::decode(v).map_err(|source| ReadError::Corrupt {
                    what: "signed head",
                    at: read_u64(k).map_or_else(|| hex(k), |s| s.to_string()),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Admin nonces recorded (unexpired, or expired but not yet pruned).
    pub fn admin_nonces(&self) -> Result<u64, ReadError> {
        let rtxn = self.read_txn()?;
        Ok(self.dbs.nonces.len(&rtxn)?)
    }

    /// Whether `nonce` is recorded as used by an admin command (and not pruned yet).
    pub fn admin_nonce_known(&self, nonce: &[u8; 16]) -> Result<bool, ReadError> {
        let rtxn = self.read_txn()?;
        Ok(self.dbs.nonces.get(&rtxn, nonce)?.is_some())
    }

    /// The commit sequence of transaction `id`, if it committed.
    pub fn seq_of(&self, id: &TxId) -> Result<Option<u64>, ReadError> {
        let rtxn = self.read_txn()?;
        Ok(self.dbs.tx_index.get(&rtxn, &id.0)?.and_then(read_u64))
    }

    /// Audit records with `seq >= from`, at most `limit`.
    pub fn audit_records(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, ReadError> {
        let rtxn = self.read_txn()?;
        let start = u64_key(from);
        let range = (
            std::ops::Bound::Included(&start[..]),
            std::ops::Bound::Unbounded,
        );
        let mut out = Vec::new();
        for item in self.dbs.audit.range(&rtxn, &range)?.take(limit) {
            let (k, v) = item?;
            out.push(AuditRecord::decode(v).map_err(|source| ReadError::Corrupt {
                what: "audit record",
                at: read_u64(k).map_or_else(|| hex(k), |s| s.to_string()),
                source,
            })?);
        }
        Ok(out)
    }

    /// Like [`Store::audit_records`], each with its chain hash
    /// (`SHA-256(prev_hash || stored bytes)`), computed from the stored encoding without
    /// encoding the record again: what an exporter sends.
    pub fn audit_records_with_hash(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(AuditRecord, crate::Hash)>, ReadError> {
        let rtxn = self.read_txn()?;
        let start = u64_key(from);
        let range = (
            std::ops::Bound::Included(&start[..]),
            std::ops::Bound::Unbounded,
        );
        let mut out = Vec::new();
        for item in self.dbs.audit.range(&rtxn, &range)?.take(limit) {
            let (k, v) = item?;
            let record = AuditRecord::decode(v).map_err(|source| ReadError::Corrupt {
                what: "audit record",
                at: read_u64(k).map_or_else(|| hex(k), |s| s.to_string()),
                source,
            })?;
            let hash = crate::checkpoint::chain_hash(&record.prev_hash, v);
            out.push((record, hash));
        }
        Ok(out)
    }

    /// The committed value of `key` with its version (`None`: absent or deleted).
    pub fn committed(&self, key: &[u8]) -> Result<Option<(u64, Vec<u8>)>, ReadError> {
        let rtxn = self.read_txn()?;
        let Some(bytes) = self.dbs.data.get(&rtxn, key)? else {
            return Ok(None);
        };
        let s = decode_value(bytes).ok_or_else(|| ReadError::Corrupt {
            what: "data value",
            at: hex(key),
            source: DecodeError::NotCanonical {
                field: "data value",
                reason: "bad tag or length",
            },
        })?;
        Ok(s.value.map(|v| (s.version, v.to_vec())))
    }

    /// Every live key and value, in key order.
    pub fn data_snapshot(&self) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, ReadError> {
        let rtxn = self.read_txn()?;
        let mut out = BTreeMap::new();
        for item in self.dbs.data.iter(&rtxn)? {
            let (k, v) = item?;
            let s = decode_value(v).ok_or_else(|| ReadError::Corrupt {
                what: "data value",
                at: hex(k),
                source: DecodeError::NotCanonical {
                    field: "data value",
                    reason: "bad tag or length",
                },
            })?;
            if let Some(v) = s.value {
                out.insert(k.to_vec(), v.to_vec());
            }
        }
        Ok(out)
    }

    /// Commit sequences that wrote `key` (deletes included), oldest first, following the
    /// `before_version` links of the checkpoints back from the current version.
    pub fn writers_of(&self, key: &[u8]) -> Result<Vec<u64>, ReadError> {
        let rtxn = self.read_txn()?;
        let mut version = match self.dbs.data.get(&rtxn, key)? {
            None => 0,
            Some(bytes) => decode_value(bytes).map_or(0, |s| s.version),
        };
        let mut out = Vec::new();
        while version != 0 {
            let bytes = self
                .dbs
                .checkpoints
                .get(&rtxn, &u64_key(version))?
                .ok_or_else(|| ReadError::Corrupt {
                    what: "checkpoint",
                    at: version.to_string(),
                    source: DecodeError::NotCanonical {
                        field: "seq",
                        reason: "a data version names a missing checkpoint",
                    },
                })?;
            let cp = crate::record::Record::decode(bytes).map_err(|source| ReadError::Corrupt {
                what: "checkpoint",
                at: version.to_string(),
                source,
            })?;
            out.push(version);
            let prev = cp
                .writes()
                .iter()
                .find(|w| w.key == key)
                .map_or(0, |w| w.before_version);
            if prev >= version {
                break; // links only point back in time; refuse to loop on damage
            }
            version = prev;
        }
        out.reverse();
        Ok(out)
    }

    /// The commits whose writes commit `seq` read.
    pub fn depends_on(&self, seq: u64) -> Result<Vec<u64>, ReadError> {
        let rtxn = self.read_txn()?;
        Ok(self
            .dbs
            .deps
            .get(&rtxn, &u64_key(seq))?
            .map(|v| v.chunks_exact(8).filter_map(read_u64).collect())
            .unwrap_or_default())
    }

    /// `seq` and every later commit that read, directly or transitively, a version written
    /// by one of them; ascending. One forward pass over `deps`.
    pub fn affected_by(&self, seq: u64) -> Result<Vec<u64>, ReadError> {
        let rtxn = self.read_txn()?;
        let mut affected = std::collections::BTreeSet::from([seq]);
        let start = u64_key(seq.saturating_add(1));
        let range = (
            std::ops::Bound::Included(&start[..]),
            std::ops::Bound::Unbounded,
        );
        for item in self.dbs.deps.range(&rtxn, &range)? {
            let (k, v) = item?;
            let Some(reader) = read_u64(k) else { continue };
            if v.chunks_exact(8)
                .filter_map(read_u64)
                .any(|w| affected.contains(&w))
            {
                affected.insert(reader);
            }
        }
        Ok(affected.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::{AuditEvent, Ledger, Options, Severity};

    #[test]
    fn audit_hashes_are_the_chain_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let ledger = Ledger::open(dir.path(), &Options::default(), &log).unwrap();
        let events = (0..5)
            .map(|i| AuditEvent::new("test.event", Severity::Info).field("i", i))
            .collect();
        ledger.audit(events).unwrap();
        let with_hash = ledger.store().audit_records_with_hash(1, 100).unwrap();
        assert_eq!(with_hash.len(), 6);
        let mut prev = [0u8; 32];
        for (r, hash) in &with_hash {
            assert_eq!(r.prev_hash, prev);
            assert_eq!(*hash, crate::checkpoint::chain_hash(&prev, &r.encode()));
            prev = *hash;
        }
        assert_eq!(prev, ledger.tips().audit.hash);
        let tail = ledger.store().audit_records_with_hash(5, 1).unwrap();
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0], with_hash[4]);
    }
}
