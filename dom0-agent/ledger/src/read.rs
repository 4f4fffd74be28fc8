//! Read-only queries over committed state: checkpoints, audit records, data and the
//! dependency indexes. They work on any [`Store`], including one opened read-only.

use std::collections::BTreeMap;

use crate::audit::AuditRecord;
use crate::checkpoint::Checkpoint;
use crate::codec::{hex, DecodeError};
use crate::commit::history_key;
use crate::store::{read_u64, u64_key, Store};
use crate::txn::decode_value;
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

/// A dependency edge from the `read_from` index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFrom {
    /// The transaction that read.
    pub reader: u64,
    /// The key it read.
    pub key: Vec<u8>,
}

impl Store {
    /// The checkpoint with commit sequence `seq`.
    pub fn checkpoint(&self, seq: u64) -> Result<Option<Checkpoint>, ReadError> {
        let rtxn = self.read_txn()?;
        let Some(bytes) = self.dbs.checkpoints.get(&rtxn, &u64_key(seq))? else {
            return Ok(None);
        };
        Checkpoint::decode(bytes).map(Some).map_err(|source| ReadError::Corrupt {
            what: "checkpoint",
            at: seq.to_string(),
            source,
        })
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
        let range = (std::ops::Bound::Included(&start[..]), std::ops::Bound::Unbounded);
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

    /// Commit sequences that wrote `key`, oldest first.
    pub fn writers_of(&self, key: &[u8]) -> Result<Vec<u64>, ReadError> {
        let rtxn = self.read_txn()?;
        let prefix = history_key(key, 0);
        let prefix = prefix.get(..prefix.len().saturating_sub(8)).unwrap_or(&[]);
        let mut out = Vec::new();
        for item in self.dbs.history.prefix_iter(&rtxn, prefix)? {
            let (k, _) = item?;
            if let Some(seq) = k.get(prefix.len()..).and_then(read_u64) {
                out.push(seq);
            }
        }
        Ok(out)
    }

    /// Transactions that read a version written by commit `writer`.
    pub fn readers_of(&self, writer: u64) -> Result<Vec<ReadFrom>, ReadError> {
        let rtxn = self.read_txn()?;
        let prefix = u64_key(writer);
        let mut out = Vec::new();
        for item in self.dbs.read_from.prefix_iter(&rtxn, &prefix)? {
            let (k, _) = item?;
            let reader = k.get(8..16).and_then(read_u64);
            let key = k.get(16..);
            if let (Some(reader), Some(key)) = (reader, key) {
                out.push(ReadFrom {
                    reader,
                    key: key.to_vec(),
                });
            }
        }
        Ok(out)
    }
}
