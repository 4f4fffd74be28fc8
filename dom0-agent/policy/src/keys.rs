//! Key ranges (half-open, bytewise order, as LMDB sorts keys) and the rendering of keys and
//! other guest-chosen bytes into short, printable audit values.

/// Keys `start <= k < end` (`end = None`: no upper bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

/// The smallest byte string greater than every string starting with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl KeyRange {
    /// Every key starting with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        Self {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    /// Exactly `key`.
    pub fn exact(mut key: Vec<u8>) -> Self {
        let start = key.clone();
        key.push(0);
        Self {
            start,
            end: Some(key),
        }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && self.end.as_deref().is_none_or(|e| key < e)
    }

    /// Whether every key of `start..end` is in the range.
    pub fn covers(&self, start: &[u8], end: Option<&[u8]>) -> bool {
        self.start.as_slice() <= start
            && match (self.end.as_deref(), end) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(mine), Some(theirs)) => theirs <= mine,
            }
    }

    /// Whether `start..end` and the range share a key (conservatively: empty scans with an
    /// inverted range are judged by their bounds alone).
    pub fn intersects(&self, start: &[u8], end: Option<&[u8]>) -> bool {
        let below_my_end = self.end.as_deref().is_none_or(|e| start < e);
        let above_my_start = end.is_none_or(|e| self.start.as_slice() < e);
        below_my_end && above_my_start
    }

    /// A short audit rendering: the prefix for a prefix range, else `start..end`.
    pub fn show(&self) -> String {
        let exact = self.end.as_deref().and_then(|e| e.split_last()) == Some((&0, &self.start[..]));
        if exact {
            show_bytes(&self.start)
        } else if self.end == prefix_end(&self.start) {
            format!("{}*", show_bytes(&self.start))
        } else {
            match &self.end {
                Some(e) => format!("{}..{}", show_bytes(&self.start), show_bytes(e)),
                None => format!("{}..", show_bytes(&self.start)),
            }
        }
    }
}

/// Bytes shown in an audit value: at most [`SHOW_MAX`] input bytes, printable ASCII as is
/// (`\` doubled), anything else as `\xNN`, then `...` if cut. At most 4 * 200 + 3 bytes, so
/// it fits an audit field value (1024 bytes).
pub(crate) fn show_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len().min(SHOW_MAX) + 8);
    for &c in b.iter().take(SHOW_MAX) {
        match c {
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(char::from(c)),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    if b.len() > SHOW_MAX {
        s.push_str("...");
    }
    s
}

/// Input bytes shown at most by [`show_bytes`].
pub(crate) const SHOW_MAX: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        let r = KeyRange::prefix(b"notes/");
        assert!(r.contains(b"notes/"));
        assert!(r.contains(b"notes/alice/n1"));
        assert!(!r.contains(b"notes"));
        assert!(!r.contains(b"notes0"));
        assert!(!r.contains(b"acct/mallory"));
        assert_eq!(KeyRange::prefix(b"a\xff\xff").end, Some(b"b".to_vec()));
        assert_eq!(KeyRange::prefix(b"\xff").end, None);
        assert_eq!(r.show(), "notes/*");
        assert_eq!(KeyRange::exact(b"k".to_vec()).show(), "k");
        assert_eq!(
            KeyRange {
                start: b"a".to_vec(),
                end: None
            }
            .show(),
            "a.."
        );
    }

    #[test]
    fn exact_and_scans() {
        let r = KeyRange::exact(b"k".to_vec());
        assert!(r.contains(b"k") && !r.contains(b"k0") && !r.contains(b"j"));
        let p = KeyRange::prefix(b"kv/");
        assert!(p.covers(b"kv/a", Some(b"kv/b")));
        assert!(p.covers(b"kv/", Some(b"kv0")));
        assert!(!p.covers(b"kv/", None));
        assert!(!p.covers(b"ku", Some(b"kv/b")));
        assert!(p.intersects(b"", None));
        assert!(p.intersects(b"kv/zzz", Some(b"z")));
        assert!(!p.intersects(b"kv0", None));
        assert!(!p.intersects(b"a", Some(b"kv/")));
    }

    #[test]
    fn rendering_is_bounded_and_printable() {
        assert_eq!(show_bytes(b"a\\b\x00\xff"), "a\\\\b\\x00\\xff");
        let long = show_bytes(&[0u8; 5000]);
        assert!(long.len() <= 1024 && long.ends_with("..."));
    }
}
