//! The configuration file: read (bounded), parsed with the span of every key and value,
//! so that each refusal names its line; unknown keys refused with the nearest known one.

use std::path::Path;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};

use super::{value::deserialize, ConfigError, Key, Value};

/// Largest configuration file read (a hostile or mistaken path, `/dev/zero`, must not
/// exhaust memory).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// The configuration file, parsed, with what is needed to name a line.
pub struct File<'a> {
    path: &'a Path,
    text: &'a str,
    root: DeTable<'a>,
}

impl<'a> File<'a> {
    /// Reads `path` into `text` (at most [`MAX_FILE_BYTES`]).
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        use std::io::Read as _;
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_FILE_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        Ok(text)
    }

    /// Parses `text`, the contents of `path`.
    pub fn parse(path: &'a Path, text: &'a str) -> Result<Self, ConfigError> {
        match DeTable::parse(text) {
            Ok(root) => Ok(Self {
                path,
                text,
                root: root.into_inner(),
            }),
            Err(e) => Err(ConfigError::Syntax {
                at: at(path, text, e.span()),
                message: e.message().trim().to_owned(),
            }),
        }
    }

    fn at(&self, span: Option<std::ops::Range<usize>>) -> String {
        at(self.path, self.text, span)
    }

    /// The table of section `name` (`""`: the top level); `None` if the file has none.
    pub fn table(&self, name: &str) -> Result<Option<&DeTable<'a>>, ConfigError> {
        if name.is_empty() {
            return Ok(Some(&self.root));
        }
        match self.root.iter().find(|(k, _)| k.get_ref() == name) {
            None => Ok(None),
            Some((k, v)) => match v.get_ref() {
                DeValue::Table(t) => Ok(Some(t)),
                _ => Err(ConfigError::NotATable {
                    at: self.at(Some(k.span())),
                    key: name.to_owned(),
                }),
            },
        }
    }

    /// Refuses every key of `table` (section `name`) that is neither in `keys` nor, at the
    /// top level, one of the `sections`.
    pub fn refuse_unknown(
        &self,
        name: &str,
        table: &DeTable<'a>,
        keys: &[Key],
        sections: &[&'static str],
    ) -> Result<(), ConfigError> {
        let known = || {
            keys.iter()
                .map(|k| k.name)
                .chain(sections.iter().copied().filter(|_| name.is_empty()))
        };
        for (k, _) in table.iter() {
            let key = k.get_ref();
            if known().any(|n| n == key.as_ref()) {
                continue;
            }
            return Err(ConfigError::UnknownKey {
                at: self.at(Some(k.span())),
                section: if name.is_empty() {
                    "the top level".to_owned()
                } else {
                    format!("[{name}]")
                },
                key: key.chars().take(64).collect(),
                suggestion: nearest(key, known()),
            });
        }
        Ok(())
    }

    /// The value of `key` in `table`, with the line it is on; `None` if absent.
    pub fn get<V: Value>(
        &self,
        table: Option<&DeTable<'a>>,
        key: &Key,
    ) -> Result<Option<(V, String)>, ConfigError> {
        let Some((k, v)) = table.and_then(|t| t.iter().find(|(k, _)| k.get_ref() == key.name))
        else {
            return Ok(None);
        };
        let at = self.at(Some(k.span()));
        match V::from_file(v.clone()) {
            Ok(value) => Ok(Some((value, at))),
            Err(e) => Err(ConfigError::BadValue {
                at: self.at(e.span().or(Some(v.span()))),
                key: key.qualified(),
                expected: V::KIND,
                message: e.message().trim().to_owned(),
            }),
        }
    }

    /// Section `name` read by its own serde reader (a section owned by another crate,
    /// file-only), and the table as written, for `--print-config`.
    pub fn foreign<T: Deserialize<'a>>(
        &self,
        name: &str,
    ) -> Result<Option<(T, toml::Table)>, ConfigError> {
        let Some((_, v)) = self.root.iter().find(|(k, _)| k.get_ref() == name) else {
            return Ok(None);
        };
        let refuse = |e: toml::de::Error| ConfigError::Foreign {
            at: self.at(e.span().or(Some(v.span()))),
            section: name.to_owned(),
            message: e.message().trim().to_owned(),
        };
        let table: toml::Table = deserialize(v.clone()).map_err(refuse)?;
        let value: T = deserialize(v.clone()).map_err(refuse)?;
        Ok(Some((value, table)))
    }
}

/// `FILE:LINE` of byte `span.start` of `text`.
fn at(path: &Path, text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.bytes().filter(|b| *b == b'\n').count() + 1;
            format!("{}:{line}", path.display())
        }
        None => path.display().to_string(),
    }
}

/// The known name closest to `key`: at most two edits away (and fewer than half its
/// letters), or the known name `key` is the start of (`clock_skew` for
/// `clock_skew_secs`); `None` if none is.
fn nearest(key: &str, known: impl Iterator<Item = &'static str>) -> Option<&'static str> {
    if key.len() > 64 {
        return None;
    }
    known
        .map(|k| {
            let prefix = key.len() >= 4 && (k.starts_with(key) || key.starts_with(k));
            (if prefix { 0 } else { edit_distance(key, k) }, k)
        })
        .filter(|(d, k)| *d <= 2 && d * 2 < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance over bytes (insertions, deletions, substitutions, and transpositions of
/// neighbours: `xne` is one from `xen`). Both strings are short: keys, and at most 64 bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let width = b.len() + 1;
    // d[i * width + j]: distance between a[..i] and b[..j].
    let mut d = vec![0usize; (a.len() + 1) * width];
    let cell = |d: &[usize], i: usize, j: usize| d.get(i * width + j).copied().unwrap_or(0);
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            let value = match (i, j) {
                (0, j) => j,
                (i, 0) => i,
                (i, j) => {
                    let (ca, cb) = (a.get(i - 1), b.get(j - 1));
                    let mut best = (cell(&d, i - 1, j) + 1)
                        .min(cell(&d, i, j - 1) + 1)
                        .min(cell(&d, i - 1, j - 1) + usize::from(ca != cb));
                    if i > 1 && j > 1 && ca == b.get(j - 2) && a.get(i - 2) == cb {
                        best = best.min(cell(&d, i - 2, j - 2) + 1);
                    }
                    best
                }
            };
            if let Some(c) = d.get_mut(i * width + j) {
                *c = value;
            }
        }
    }
    cell(&d, a.len(), b.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Section as _;

    #[test]
    fn a_misspelt_key_suggests_the_nearest() {
        let keys = crate::config::Service::keys();
        let names = || keys.iter().map(|k| k.name);
        assert_eq!(nearest("pool_sise", names()), Some("pool_size"));
        assert_eq!(nearest("max_in_fligt", names()), Some("max_in_flight"));
        assert_eq!(nearest("completely_else", names()), None);
        assert_eq!(
            nearest("refusal_interval", names()),
            Some("refusal_interval_ms")
        );
        assert_eq!(nearest(&"x".repeat(1000), names()), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("xne", "xen"), 1);
        assert_eq!(
            nearest("xne", ["tls", "xen", "siem"].into_iter()),
            Some("xen")
        );
    }
}
