//! Exporter cursors: how far along the audit chain each exporter (a SIEM collector) has
//! delivered, kept in the `cursors` database so that a restart resumes where delivery
//! stopped instead of losing or re-reading everything.
//!
//! ```text
//! key    exporter name, 1..=64 bytes of [a-z0-9_.-]
//! value  offset size  field
//!             0    4  magic "MFCU"
//!             4    1  version = 1
//!             5    8  seq   u64 BE, last audit sequence delivered (0: nothing yet)
//! ```
//!
//! A cursor is written in a small LMDB write transaction of its own, outside the group
//! committer: it is bookkeeping of the exporter, not part of either chain, is not signed,
//! and `verify` does not read it. Writers serialise on LMDB's writer lock, so an exporter
//! should write its cursor rarely (the SIEM exporter does it at most once a second per
//! collector); the value is only ever a lower bound of what was delivered, so a cursor
//! that lags after a crash means duplicates, never a gap.
//!
//! A table above the store: uses only [`crate::store`] and [`crate::codec`].

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::codec::Reader;
use crate::store::Store;

/// Magic of a cursor value.
pub const MAGIC: &str = "MFCU";
/// Version of a cursor value.
pub const VERSION: u8 = 1;
/// Longest exporter name.
pub const MAX_NAME: usize = 64;

/// Why a cursor could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    /// The name is empty, too long or outside `[a-z0-9_.-]`.
    #[error("invalid cursor name {0:?}: 1..=64 bytes of [a-z0-9_.-]")]
    BadName(String),
    /// LMDB failed.
    #[error("cursor {name}: storage: {source}")]
    Storage {
        /// Cursor.
        name: String,
        /// LMDB's error.
        source: heed::Error,
    },
    /// The stored value is not a cursor.
    #[error("cursor {name} is corrupt ({len} bytes, not MFCU v1)")]
    Corrupt {
        /// Cursor.
        name: String,
        /// Length of the stored value.
        len: usize,
    },
}

/// Whether `name` can name a cursor.
pub fn valid_name(name: &str) -> bool {
    mayfly_names::is_name(name, MAX_NAME)
}

fn encode(seq: u64) -> [u8; 13] {
    let mut out = [0u8; 13];
    let (head, tail) = out.split_at_mut(5);
    head.copy_from_slice(b"MFCU\x01");
    tail.copy_from_slice(&seq.to_be_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<u64> {
    let mut r = Reader::new(bytes);
    r.magic(MAGIC).ok()?;
    if r.u8("version").ok()? != VERSION {
        return None;
    }
    let seq = r.u64("seq").ok()?;
    r.finish().ok()?;
    Some(seq)
}

impl Store {
    /// The last audit sequence exporter `name` recorded as delivered; `None` if it never
    /// recorded one.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>, CursorError> {
        if !valid_name(name) {
            return Err(CursorError::BadName(name.to_owned()));
        }
        let storage = |source| CursorError::Storage {
            name: name.to_owned(),
            source,
        };
        let rtxn = self.read_txn().map_err(storage)?;
        match self
            .dbs
            .cursors
            .get(&rtxn, name.as_bytes())
            .map_err(storage)?
        {
            None => Ok(None),
            Some(bytes) => decode(bytes).map(Some).ok_or(CursorError::Corrupt {
                name: name.to_owned(),
                len: bytes.len(),
            }),
        }
    }

    /// Records (durably) that exporter `name` has delivered the audit chain up to `seq`.
    pub fn set_cursor(&self, name: &str, seq: u64) -> Result<(), CursorError> {
        if !valid_name(name) {
            return Err(CursorError::BadName(name.to_owned()));
        }
        let storage = |source| CursorError::Storage {
            name: name.to_owned(),
            source,
        };
        let _ticket = self.gate.enter();
        let mut wtxn = self.env.write_txn().map_err(storage)?;
        self.dbs
            .cursors
            .put(&mut wtxn, name.as_bytes(), &encode(seq))
            .map_err(storage)?;
        wtxn.commit().map_err(storage)
    }

    /// Every cursor held, in name order (the primary ships them to its standby, so that a
    /// promoted standby's exporters resume where the primary's had delivered;
    /// docs/failover.md). At most `max` are read; a stored name or value that is not a
    /// cursor's is [`CursorError::Corrupt`].
    pub fn cursors(&self, max: usize) -> Result<Vec<(String, u64)>, CursorError> {
        let storage = |source| CursorError::Storage {
            name: "(all)".to_owned(),
            source,
        };
        let rtxn = self.read_txn().map_err(storage)?;
        let mut out = Vec::new();
        for item in self.dbs.cursors.iter(&rtxn).map_err(storage)?.take(max) {
            let (name, bytes) = item.map_err(storage)?;
            let corrupt = || CursorError::Corrupt {
                name: String::from_utf8_lossy(name).into_owned(),
                len: bytes.len(),
            };
            let name = std::str::from_utf8(name)
                .ok()
                .filter(|n| valid_name(n))
                .ok_or_else(corrupt)?;
            out.push((name.to_owned(), decode(bytes).ok_or_else(corrupt)?));
        }
        Ok(out)
    }

    /// Records (durably, in one write transaction) several cursors at once: all or none.
    pub fn set_cursors(&self, cursors: &[(String, u64)]) -> Result<(), CursorError> {
        if let Some((bad, _)) = cursors.iter().find(|(n, _)| !valid_name(n)) {
            return Err(CursorError::BadName(bad.clone()));
        }
        let storage = |source| CursorError::Storage {
            name: "(several)".to_owned(),
            source,
        };
        let _ticket = self.gate.enter();
        let mut wtxn = self.env.write_txn().map_err(storage)?;
        for (name, seq) in cursors {
            self.dbs
                .cursors
                .put(&mut wtxn, name.as_bytes(), &encode(*seq))
                .map_err(storage)?;
        }
        wtxn.commit().map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_round_trip_and_rejects() {
        assert_eq!(decode(&encode(0)), Some(0));
        assert_eq!(decode(&encode(u64::MAX)), Some(u64::MAX));
        let good = encode(7);
        for cut in 0..good.len() {
            assert_eq!(decode(good.get(..cut).unwrap_or_default()), None);
        }
        let mut bad = good;
        bad[4] = 2;
        assert_eq!(decode(&bad), None);
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(decode(&long), None);
    }

    #[test]
    fn names() {
        assert!(valid_name("siem-primary.tls_1"));
        assert!(!valid_name(""));
        assert!(!valid_name("Upper"));
        assert!(!valid_name(&"a".repeat(MAX_NAME + 1)));
    }

    #[test]
    fn persisted_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let opts = crate::Options::default();
        {
            let ledger = crate::Ledger::open(dir.path(), &opts, &log).unwrap();
            assert_eq!(ledger.store().cursor("siem.a").unwrap(), None);
            ledger.store().set_cursor("siem.a", 3).unwrap();
            ledger.store().set_cursor("siem.a", 5).unwrap();
            ledger.store().set_cursor("siem.b", 1).unwrap();
            assert!(matches!(
                ledger.store().set_cursor("Bad", 1),
                Err(CursorError::BadName(_))
            ));
        }
        let ledger = crate::Ledger::open(dir.path(), &opts, &log).unwrap();
        assert_eq!(ledger.store().cursor("siem.a").unwrap(), Some(5));
        assert_eq!(ledger.store().cursor("siem.b").unwrap(), Some(1));
        // All of them, in name order, and several written at once (all or none).
        assert_eq!(
            ledger.store().cursors(64).unwrap(),
            [("siem.a".to_string(), 5), ("siem.b".to_string(), 1)]
        );
        assert_eq!(ledger.store().cursors(1).unwrap().len(), 1);
        ledger
            .store()
            .set_cursors(&[("siem.b".into(), 4), ("siem.c".into(), 2)])
            .unwrap();
        assert!(matches!(
            ledger
                .store()
                .set_cursors(&[("siem.a".into(), 9), ("No".into(), 1)]),
            Err(CursorError::BadName(_))
        ));
        assert_eq!(
            ledger.store().cursors(64).unwrap(),
            [
                ("siem.a".to_string(), 5),
                ("siem.b".to_string(), 4),
                ("siem.c".to_string(), 2)
            ]
        );
        // Cursors are outside both chains: the ledger still verifies.
        let keys = [ledger.public_key()];
        drop(ledger);
        let store =
            crate::store::open_read_only(dir.path(), &crate::StoreOptions::default()).unwrap();
        assert!(crate::verify(&store, &keys, &mut |_| {}).unwrap().ok());
    }
}
