//! Domain numbers: one per domain the agent runs a transaction in, unique for the life of
//! the ledger, across agent restarts and whatever the backend's own ids do (sandbox clone
//! numbers restart at 1 with every agent, Xen reuses domids).
//!
//! The numbers are handed out from blocks of [`BLOCK`] reserved durably in the `meta`
//! database before any number of the block is used: `meta/"domain_next"` (`u64` BE) is the
//! first number no block has reserved yet (absent: 1). A restart starts a new block at
//! that value, so the numbers a run did not use are skipped, never reused. One small write
//! transaction (one fsync) per [`BLOCK`] domains.
//!
//! A table above the store: uses only [`crate::store`].

use std::path::PathBuf;
use std::sync::Mutex;

use crate::store::{read_u64, u64_key, Store};

/// Numbers reserved per durable write.
pub const BLOCK: u64 = 65_536;

/// Key of the next unreserved number in `meta`.
pub(crate) const META_KEY: &[u8] = b"domain_next";

/// Why no domain number could be had.
#[derive(Debug, thiserror::Error)]
pub enum DomainNumberError {
    /// Writing the reservation failed (disk full, ...).
    #[error("reserving domain numbers in {path}: {source}")]
    Storage {
        /// Data directory.
        path: PathBuf,
        /// The failure.
        source: heed::Error,
    },
    /// The stored value is not a `u64`.
    #[error("meta/domain_next in {path} is {len} bytes, not a u64: the ledger is damaged")]
    Corrupt {
        /// Data directory.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Every `u64` has been used (not reachable in practice).
    #[error("domain numbers are exhausted")]
    Exhausted,
}

/// The block being handed out: `next..end`.
#[derive(Default)]
struct Block {
    next: u64,
    end: u64,
}

/// The ledger's domain numbering.
pub(crate) struct DomainNumbers {
    block: Mutex<Block>,
}

impl DomainNumbers {
    pub(crate) fn new() -> Self {
        Self {
            block: Mutex::new(Block::default()),
        }
    }

    /// The next number; reserves a block first when the current one is used up.
    pub(crate) fn next(&self, store: &Store) -> Result<u64, DomainNumberError> {
        let mut block = match self.block.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        if block.next >= block.end {
            let (start, end) = reserve(store)?;
            *block = Block { next: start, end };
        }
        let n = block.next;
        block.next = n.checked_add(1).ok_or(DomainNumberError::Exhausted)?;
        Ok(n)
    }
}

/// Reserves the next block durably; returns it as `start..end`.
fn reserve(store: &Store) -> Result<(u64, u64), DomainNumberError> {
    let storage = |source| DomainNumberError::Storage {
        path: store.dir().to_path_buf(),
        source,
    };
    let mut wtxn = store.env.write_txn().map_err(storage)?;
    let start = match store.dbs.meta.get(&wtxn, META_KEY).map_err(storage)? {
        None => 1,
        Some(v) => read_u64(v).ok_or(DomainNumberError::Corrupt {
            path: store.dir().to_path_buf(),
            len: v.len(),
        })?,
    };
    let end = start
        .checked_add(BLOCK)
        .ok_or(DomainNumberError::Exhausted)?;
    store
        .dbs
        .meta
        .put(&mut wtxn, META_KEY, &u64_key(end))
        .map_err(storage)?;
    wtxn.commit().map_err(storage)?;
    Ok((start, end))
}

#[cfg(test)]
mod tests {
    use crate::{Ledger, Options};
    use slog::{o, Discard, Logger};

    #[test]
    fn numbers_never_repeat_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let log = Logger::root(Discard, o!());
        let mut seen = std::collections::BTreeSet::new();
        for run in 0..3 {
            let ledger = Ledger::open(dir.path(), &Options::default(), &log).unwrap();
            for _ in 0..5 {
                let n = ledger.next_domain_number().unwrap();
                assert!(seen.insert(n), "run {run}: number {n} handed out twice");
            }
        }
        // Each run started a block of its own.
        let first: Vec<u64> = seen.iter().copied().step_by(5).collect();
        assert_eq!(first, [1, 1 + super::BLOCK, 1 + 2 * super::BLOCK]);
    }
}
