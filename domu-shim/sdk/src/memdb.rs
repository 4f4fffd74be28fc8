//! [`MemDb`]: an in-memory [`Db`] for unit-testing handlers without a ring or an agent.
//!
//! It applies the same size checks as the agent ([`crate::limits`]), applies writes at once
//! (there is no commit: a test inspects the map afterwards), records log lines, and can be
//! told to fail its next operation so that a test can check how a handler reacts to a
//! policy denial or a transport failure.

use alloc::string::String;
use alloc::vec::Vec;

use alloc::collections::BTreeMap;
use core::ops::Bound;

use crate::db::{Db, DbError, LogLevel, Scan};
use crate::limits::{self, MAX_LOG_LINE_LEN};

/// An in-memory key-value store implementing [`Db`].
#[derive(Debug, Clone, Default)]
pub struct MemDb {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    logs: Vec<(LogLevel, String)>,
    fail_next: Option<DbError>,
    operations: u64,
}

impl MemDb {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `entries`.
    pub fn from_entries<K, V>(entries: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<Vec<u8>>,
        V: Into<Vec<u8>>,
    {
        Self {
            data: entries
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            ..Self::default()
        }
    }

    /// Sets `key` directly (test set-up; not counted, not checked).
    pub fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.data.insert(key.into(), value.into());
    }

    /// The value of `key`.
    pub fn value(&self, key: &[u8]) -> Option<&[u8]> {
        self.data.get(key).map(Vec::as_slice)
    }

    /// All data.
    pub fn data(&self) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        &self.data
    }

    /// The log lines received, sanitized as the ring would carry them.
    pub fn logs(&self) -> &[(LogLevel, String)] {
        &self.logs
    }

    /// Operations served (or failed) through [`Db`].
    pub fn operations(&self) -> u64 {
        self.operations
    }

    /// Makes the next [`Db`] operation fail with `error` (and have no effect).
    pub fn fail_next(&mut self, error: DbError) {
        self.fail_next = Some(error);
    }

    fn begin(&mut self) -> Result<(), DbError> {
        self.operations = self.operations.saturating_add(1);
        match self.fail_next.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Db for MemDb {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.begin()?;
        limits::check_key(key)?;
        Ok(self.data.get(key).cloned())
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        self.begin()?;
        limits::check_key(key)?;
        limits::check_value(value)?;
        self.data.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), DbError> {
        self.begin()?;
        limits::check_key(key)?;
        self.data.remove(key);
        Ok(())
    }

    fn scan(&mut self, start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<Scan, DbError> {
        self.begin()?;
        limits::check_scan(start, end, limit)?;
        if end.is_some_and(|end| end <= start) {
            return Ok(Scan::default());
        }
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        let mut range = self
            .data
            .range::<[u8], _>((Bound::Included(start), upper))
            .map(|(k, v)| (k.clone(), v.clone()));
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let entries: Vec<_> = range.by_ref().take(limit).collect();
        let more = range.next().is_some();
        Ok(Scan { entries, more })
    }

    fn log(&mut self, level: LogLevel, line: &str) -> Result<(), DbError> {
        self.begin()?;
        self.logs
            .push((level, limits::sanitize_text(line, MAX_LOG_LINE_LEN)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(scan: &Scan) -> Vec<(&str, &str)> {
        scan.entries
            .iter()
            .map(|(k, v)| {
                (
                    core::str::from_utf8(k).unwrap(),
                    core::str::from_utf8(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn get_put_delete() {
        let mut db = MemDb::from_entries([("a", "1")]);
        assert_eq!(db.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(db.get(b"b").unwrap(), None);
        db.put(b"b", b"2").unwrap();
        db.put(b"a", b"").unwrap();
        assert_eq!(db.value(b"a"), Some(&b""[..]));
        db.delete(b"b").unwrap();
        db.delete(b"never").unwrap();
        assert_eq!(db.value(b"b"), None);
        assert_eq!(db.operations(), 6);
        assert!(matches!(db.get(b""), Err(DbError::BadRequest { .. })));
        assert!(matches!(
            db.put(b"k", &vec![0; limits::MAX_VALUE_LEN + 1]),
            Err(DbError::BadRequest { .. })
        ));
        assert_eq!(db.value(b"k"), None);
    }

    #[test]
    fn scan_is_ordered_bounded_and_reports_more() {
        let mut db = MemDb::from_entries([("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]);
        let all = db.scan(b"", None, 10).unwrap();
        assert_eq!(
            entries(&all),
            [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]
        );
        assert!(!all.more);
        let page = db.scan(b"b", None, 2).unwrap();
        assert_eq!(entries(&page), [("b", "2"), ("c", "3")]);
        assert!(page.more);
        let ranged = db.scan(b"a", Some(b"c"), 10).unwrap();
        assert_eq!(entries(&ranged), [("a", "1"), ("b", "2")]);
        assert!(!ranged.more);
        // Exactly `limit` entries in range: no more.
        let exact = db.scan(b"a", Some(b"c"), 2).unwrap();
        assert!(!exact.more);
        // Empty and inverted ranges are empty, not a panic.
        assert_eq!(db.scan(b"c", Some(b"c"), 5).unwrap(), Scan::default());
        assert_eq!(db.scan(b"d", Some(b"a"), 5).unwrap(), Scan::default());
        assert!(matches!(
            db.scan(b"", None, 0),
            Err(DbError::BadRequest { .. })
        ));
    }

    #[test]
    fn injected_failures_hit_the_next_operation_only() {
        let mut db = MemDb::new();
        let denied = DbError::Denied {
            message: "no".into(),
        };
        db.fail_next(denied.clone());
        assert_eq!(db.put(b"k", b"v"), Err(denied));
        assert_eq!(db.value(b"k"), None);
        db.put(b"k", b"v").unwrap();
        assert_eq!(db.value(b"k"), Some(&b"v"[..]));
    }

    #[test]
    fn log_lines_are_sanitized() {
        let mut db = MemDb::new();
        db.log(LogLevel::Warn, "two\nlines").unwrap();
        assert_eq!(
            db.logs(),
            &[(LogLevel::Warn, "two\u{fffd}lines".to_string())]
        );
    }
}
