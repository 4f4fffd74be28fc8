//! `serve`'s configuration: one declaration per key, from which the TOML file reader, the
//! command-line flags, `serve --help` and `serve --print-config` are all generated.
//!
//! A section is declared once with [`section!`] (see `sections.rs`): per key its type, its
//! default, its bound, its flag and its documentation. Each setting is
//! then taken, in this order of precedence, from
//!
//! 1. its flag on the command line,
//! 2. its key in the file given with `--config`,
//! 3. its default,
//!
//! and checked against its bound, the error naming where the value came from
//! (`FILE:LINE` or the flag). Keys the declarations do not know are refused with the
//! file, the line, the section and, when one is close, the key that was probably meant.
//!
//! Adding a section: declare it with [`section!`] in `sections.rs` and name it in the
//! [`config!`] list below (a section another crate reads with serde: in its `foreign`
//! part). The file reader, the flags, `--help` and `--print-config` follow.

mod sections;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

pub use sections::{Console, Service, Tls, Xen};

/// Largest configuration file read (a hostile or mistaken path, `/dev/zero`, must not
/// exhaust memory).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// A configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading the configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("the configuration {path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML.
    #[error("{at}: not valid TOML: {message}")]
    Syntax {
        /// `FILE:LINE`.
        at: String,
        /// The parser's message.
        message: String,
    },
    /// A key no declaration knows.
    #[error("{at}: unknown key `{key}` in {section}{}", hint(.suggestion))]
    UnknownKey {
        /// `FILE:LINE`.
        at: String,
        /// `the top level` or `[xen]`.
        section: String,
        /// The key as written (at most 64 characters of it).
        key: String,
        /// The nearest known key, if one is close.
        suggestion: Option<&'static str>,
    },
    /// A section name holding something other than a table.
    #[error("{at}: `{key}` must be a table ([{key}])")]
    NotATable {
        /// `FILE:LINE`.
        at: String,
        /// The section name.
        key: String,
    },
    /// A value of the wrong type or form.
    #[error("{at}: {key}: expected {expected}: {message}")]
    BadValue {
        /// `FILE:LINE`.
        at: String,
        /// The key, with its section (`[xen] memory_mib`).
        key: String,
        /// What the key takes.
        expected: &'static str,
        /// The parser's message.
        message: String,
    },
    /// A word that is not one of the accepted ones.
    #[error("{at}: unknown {key} {value:?}; use one of {words} (flag --{flag}, configuration key {key})")]
    NotOneOf {
        /// `FILE:LINE`, or `flag --NAME`.
        at: String,
        /// The key, with its section.
        key: String,
        /// The value given (at most 64 characters of it).
        value: String,
        /// The accepted words.
        words: String,
        /// The flag.
        flag: &'static str,
    },
    /// A value outside its bound.
    #[error("{at}: {key} = {value} is {why} ({flag}configuration key {key})")]
    OutOfRange {
        /// `FILE:LINE`, or `flag --NAME`.
        at: String,
        /// The key, with its section.
        key: String,
        /// The value given.
        value: String,
        /// `above its limit of N`, `below its minimum of N`, `not one of a, b`.
        why: String,
        /// `flag --NAME, `.
        flag: String,
    },
    /// A section owned by another crate (`[siem]`) was refused by that crate's reader.
    #[error("{at}: in the [{section}] section: {message}")]
    Foreign {
        /// `FILE:LINE`.
        at: String,
        /// The section.
        section: String,
        /// The reader's message.
        message: String,
    },
    /// A value cannot be written as TOML (`--print-config`).
    #[error("{key} cannot be printed as TOML: {why}")]
    Unprintable {
        /// The key.
        key: String,
        /// Why.
        why: &'static str,
    },
}

fn hint(suggestion: &Option<&'static str>) -> String {
    suggestion.map_or_else(String::new, |s| format!("; did you mean `{s}`?"))
}

/// How a key is reachable from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `--NAME VALUE`.
    Value(&'static str),
    /// `--NAME` sets a boolean key to true.
    Set(&'static str),
    /// `--NAME` sets a boolean key to false (`--no-cgroups`).
    Clear(&'static str),
    /// `--NAME VALUE`, repeated: all occurrences together replace the file's list.
    Many(&'static str),
}

impl Flag {
    /// The flag's name without dashes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Value(n) | Self::Set(n) | Self::Clear(n) | Self::Many(n) => n,
        }
    }
}

/// What values a key accepts, besides its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Any value of the type.
    Any,
    /// An integer in `min..=max`.
    Range {
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// One of these words.
    OneOf(&'static [&'static str]),
}

impl Bound {
    /// `min..=max`.
    pub const fn range(min: u64, max: u64) -> Self {
        Self::Range { min, max }
    }

    /// At least `min`.
    pub const fn at_least(min: u64) -> Self {
        Self::Range { min, max: u64::MAX }
    }

    /// Why `value` is refused, if it is.
    fn refuses<V: Value>(self, value: &V) -> Option<String> {
        match self {
            Self::Any => None,
            Self::Range { min, max } => match value.magnitude() {
                Some(v) if v > max => Some(format!("above its limit of {max}")),
                Some(v) if v < min => Some(format!("below its minimum of {min}")),
                _ => None,
            },
            // Refused by `Key::check`, which names the words.
            Self::OneOf(_) => None,
        }
    }

    /// The bound as `--help` shows it; `None` for [`Bound::Any`].
    fn describe(self) -> Option<String> {
        match self {
            Self::Any => None,
            Self::Range { min, max: u64::MAX } => Some(format!("at least {min}")),
            Self::Range { min, max } => Some(format!("{min}..={max}")),
            Self::OneOf(words) => Some(format!("one of {}", words.join(", "))),
        }
    }
}

/// One key of a section, as declared.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The section's table (`""` for the top level).
    pub table: &'static str,
    /// The key in the file (the field's name).
    pub name: &'static str,
    /// Its flag.
    pub flag: Flag,
    /// Its bound.
    pub bound: Bound,
    /// Its documentation (the declaration's doc comment).
    pub doc: &'static str,
    /// What it takes ([`Value::KIND`]).
    pub kind: &'static str,
}

impl Key {
    /// The key with its section: `max_in_flight`, `[xen] memory_mib`.
    pub fn qualified(&self) -> String {
        if self.table.is_empty() {
            self.name.to_owned()
        } else {
            format!("[{}] {}", self.table, self.name)
        }
    }

    /// The doc comment on one line.
    pub fn doc_line(&self) -> String {
        self.doc.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// The flag's help: the doc, the default, the bound and the file key.
    fn help(&self, default: Option<String>) -> String {
        let mut help = self.doc_line();
        if let Some(d) = default {
            help.push_str(&format!(" [default: {d}]"));
        }
        if let Some(b) = self.bound.describe() {
            help.push_str(&format!(" [{b}]"));
        }
        help.push_str(&format!(" (file: {})", self.qualified()));
        help
    }

    fn check<V: Value>(&self, value: &V, at: impl FnOnce() -> String) -> Result<(), ConfigError> {
        if let (Bound::OneOf(words), Some(word)) = (self.bound, value.word()) {
            if words.contains(&word) {
                return Ok(());
            }
            return Err(ConfigError::NotOneOf {
                at: at(),
                key: self.qualified(),
                value: word.chars().take(64).collect(),
                words: words.join(", "),
                flag: self.flag.name(),
            });
        }
        match self.bound.refuses(value) {
            None => Ok(()),
            Some(why) => Err(ConfigError::OutOfRange {
                at: at(),
                key: self.qualified(),
                value: value.show().unwrap_or_default(),
                why,
                flag: format!("flag --{}, ", self.flag.name()),
            }),
        }
    }
}

/// A type a key can have: read from a flag and from the file, printed back as TOML.
pub trait Value: Clone + Send + Sync + for<'de> Deserialize<'de> + 'static {
    /// What it is, for `--help` and errors.
    const KIND: &'static str;

    /// The flag's value in `--help` (`--pool-size <N>`).
    const PLACEHOLDER: &'static str;

    /// How clap reads the flag's value.
    fn value_parser() -> clap::builder::ValueParser;

    /// The value from the file (serde's reading of the TOML value).
    fn from_file(value: Spanned<DeValue<'_>>) -> Result<Self, toml::de::Error> {
        deserialize(value)
    }

    /// The value as TOML; `None`: unset.
    fn to_toml(&self) -> Result<Option<toml::Value>, &'static str>;

    /// The value as `--help` and errors show it; `None`: unset.
    fn show(&self) -> Option<String> {
        match self.to_toml() {
            Ok(Some(toml::Value::String(s))) => Some(s),
            Ok(Some(v)) => Some(v.to_string()),
            _ => None,
        }
    }

    /// An integer's value, for [`Bound::Range`].
    fn magnitude(&self) -> Option<u64> {
        None
    }

    /// A word's value, for [`Bound::OneOf`].
    fn word(&self) -> Option<&str> {
        None
    }

    /// The flag's value as clap parsed it with [`Value::value_parser`].
    fn from_matches(
        m: &clap::ArgMatches,
        id: &str,
    ) -> Result<Option<Self>, clap::parser::MatchesError> {
        m.try_get_one::<Self>(id).map(Option::<&Self>::cloned)
    }

    /// The value a switch flag (`--NAME` without a value) sets: only booleans have one.
    fn from_switch(_on: bool) -> Option<Self> {
        None
    }

    /// Repeated flags (`Flag::Many`) joined into one value.
    fn join(parts: Vec<Self>) -> Option<Self> {
        parts.into_iter().last()
    }
}

fn deserialize<'a, T: Deserialize<'a>>(value: Spanned<DeValue<'a>>) -> Result<T, toml::de::Error> {
    T::deserialize(ValueDeserializer::from(value))
}

macro_rules! integer_value {
    ($($ty:ty),*) => {$(
        impl Value for $ty {
            const KIND: &'static str = "a non-negative integer";
            const PLACEHOLDER: &'static str = "N";
            fn value_parser() -> clap::builder::ValueParser {
                clap::value_parser!($ty).into()
            }
            fn to_toml(&self) -> Result<Option<toml::Value>, &'static str> {
                i64::try_from(*self)
                    .map(|v| Some(toml::Value::Integer(v)))
                    .map_err(|_| "larger than a TOML integer")
            }
            fn magnitude(&self) -> Option<u64> {
                u64::try_from(*self).ok()
            }
            fn show(&self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}
integer_value!(u32, u64, usize);

impl Value for bool {
    const KIND: &'static str = "true or false";
    const PLACEHOLDER: &'static str = "BOOL";
    fn value_parser() -> clap::builder::ValueParser {
        clap::builder::ValueParser::bool()
    }
    fn to_toml(&self) -> Result<Option<toml::Value>, &'static str> {
        Ok(Some(toml::Value::Boolean(*self)))
    }
    fn from_switch(on: bool) -> Option<Self> {
        Some(on)
    }
}

impl Value for String {
    const KIND: &'static str = "a string";
    const PLACEHOLDER: &'static str = "TEXT";
    fn value_parser() -> clap::builder::ValueParser {
        clap::builder::ValueParser::string()
    }
    fn to_toml(&self) -> Result<Option<toml::Value>, &'static str> {
        Ok(Some(toml::Value::String(self.clone())))
    }
    fn word(&self) -> Option<&str> {
        Some(self)
    }
}

impl Value for PathBuf {
    const KIND: &'static str = "a path (a string)";
    const PLACEHOLDER: &'static str = "PATH";
    fn value_parser() -> clap::builder::ValueParser {
        clap::builder::ValueParser::path_buf()
    }
    fn to_toml(&self) -> Result<Option<toml::Value>, &'static str> {
        match self.to_str() {
            Some(s) => Ok(Some(toml::Value::String(s.to_owned()))),
            None => Err("the path is not UTF-8"),
        }
    }
    fn show(&self) -> Option<String> {
        Some(self.display().to_string())
    }
}

impl Value for SocketAddr {
    const KIND: &'static str = "an address (\"IP:PORT\")";
    const PLACEHOLDER: &'static str = "ADDR";
    fn value_parser() -> clap::builder::ValueParser {
        clap::value_parser!(SocketAddr).into()
    }
    fn to_toml(&self) -> Result<Option<toml::Value>, &'static str> {
        Ok(Some(toml::Value::String(self.to_string())))
    }
}

impl Value for Vec<String> {
    const KIND: &'static str = "a list of strings";
    const PLACEHOLDER: &'static str = "TEXT";
    fn value_parser() -> clap::builder::ValueParser {
        clap::builder::ValueParser::new(|s: &str| {
            Ok::<_, std::convert::Infallible>(vec![s.to_owned()])
        })
    }
    fn to_toml(&self) -> Result<Option<toml::Value>, &'static str> {
        Ok(Some(toml::Value::Array(
            self.iter().cloned().map(toml::Value::String).collect(),
        )))
    }
    fn join(parts: Vec<Self>) -> Option<Self> {
        Some(parts.into_iter().flatten().collect())
    }
}

impl<T: Value> Value for Option<T> {
    const KIND: &'static str = T::KIND;
    const PLACEHOLDER: &'static str = T::PLACEHOLDER;
    fn value_parser() -> clap::builder::ValueParser {
        T::value_parser()
    }
    fn to_toml(&self) -> Result<Option<toml::Value>, &'static str> {
        match self {
            Some(v) => v.to_toml(),
            None => Ok(None),
        }
    }
    fn from_matches(
        m: &clap::ArgMatches,
        id: &str,
    ) -> Result<Option<Self>, clap::parser::MatchesError> {
        T::from_matches(m, id).map(|v| v.map(Some))
    }
    fn show(&self) -> Option<String> {
        self.as_ref().and_then(T::show)
    }
    fn magnitude(&self) -> Option<u64> {
        self.as_ref().and_then(T::magnitude)
    }
    fn word(&self) -> Option<&str> {
        self.as_ref().and_then(T::word)
    }
}

/// The flag of `key`, for clap.
pub fn flag_arg<V: Value>(key: &Key, default: Option<String>) -> clap::Arg {
    use clap::{Arg, ArgAction};
    let help = key.help(default);
    match key.flag {
        Flag::Value(f) => Arg::new(f)
            .long(f)
            .value_name(V::PLACEHOLDER)
            .value_parser(V::value_parser())
            .action(ArgAction::Set)
            .help(help),
        Flag::Set(f) | Flag::Clear(f) => Arg::new(f).long(f).action(ArgAction::SetTrue).help(help),
        Flag::Many(f) => Arg::new(f)
            .long(f)
            .value_name(V::PLACEHOLDER)
            .value_parser(V::value_parser())
            .action(ArgAction::Append)
            .help(help),
    }
}

/// The value `key`'s flag gave; `None` if it was not given. `V` is the key's declared type,
/// as [`flag_arg`] registered it.
pub fn flag_value<V: Value>(m: &clap::ArgMatches, key: &Key) -> Result<Option<V>, clap::Error> {
    let id = key.flag.name();
    let got = match key.flag {
        Flag::Value(_) => V::from_matches(m, id),
        Flag::Set(_) | Flag::Clear(_) => m.try_get_one::<bool>(id).map(|set| {
            set.copied()
                .filter(|set| *set)
                .and_then(|_| V::from_switch(key.flag == Flag::Set(id)))
        }),
        Flag::Many(_) => m
            .try_get_many::<V>(id)
            .map(|parts| parts.and_then(|p| V::join(p.cloned().collect()))),
    };
    got.map_err(|e| {
        clap::Error::raw(
            clap::error::ErrorKind::InvalidValue,
            format!("--{id}: {e}\n"),
        )
    })
}

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

/// A section declared with [`section!`].
pub trait Section: Sized {
    /// Its flags.
    type Flags;
    /// Its table in the file (`""`: the top level).
    const TABLE: &'static str;
    /// Its keys.
    fn keys() -> Vec<Key>;
    /// The section from its flags, the file, and its defaults, in that order; each value
    /// checked against its bound.
    fn merge(flags: &Self::Flags, file: Option<&File<'_>>) -> Result<Self, ConfigError>;
    /// The section's keys as TOML lines (`key = value`; an unset key as a comment).
    fn to_toml(&self) -> Result<String, ConfigError>;
}

/// One key of a section: flag, else file, else default; checked against its bound. The
/// file's value is read and checked even where a flag overrides it: a file is valid or
/// refused as a whole, whatever the command line.
pub fn merge_key<V: Value>(
    key: &Key,
    flag: Option<&V>,
    file: Option<&File<'_>>,
    default: V,
) -> Result<V, ConfigError> {
    let mut from_file = None;
    if let Some(file) = file {
        let table = file.table(key.table)?;
        if let Some((v, at)) = file.get::<V>(table, key)? {
            key.check(&v, || at)?;
            from_file = Some(v);
        }
    }
    if let Some(v) = flag {
        key.check(v, || format!("flag --{}", key.flag.name()))?;
        return Ok(v.clone());
    }
    Ok(from_file.unwrap_or(default))
}

/// `key = value` as TOML, or `# key: unset` for an unset key.
pub fn toml_line<V: Value>(out: &mut String, key: &Key, value: &V) -> Result<(), ConfigError> {
    use std::fmt::Write as _;
    match value.to_toml() {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{} = {v}", key.name);
        }
        Ok(None) => {
            let _ = writeln!(out, "# {} is unset: {}", key.name, key.doc_line());
        }
        Err(why) => {
            return Err(ConfigError::Unprintable {
                key: key.qualified(),
                why,
            })
        }
    }
    Ok(())
}

/// Declares a configuration section: its struct of settings (`$name`), its flags
/// (`$flags`, a `clap::Args`), and per key the type, default, flag, bound and doc.
macro_rules! section {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident / $flags:ident, table $table:literal, heading $heading:literal {
            $(
                $(#[doc = $doc:literal])+
                $field:ident : $ty:ty = $default:expr, $flag:expr, $bound:expr;
            )+
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[doc = $doc])+ pub $field: $ty, )+
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )+ }
            }
        }

        #[doc = concat!("The flags of [`", stringify!($name), "`]: `Some` where given.")]
        #[derive(Debug, Clone, Default)]
        pub struct $flags {
            $( $field: Option<$ty>, )+
        }

        impl $name {
            $(
                #[allow(non_upper_case_globals, dead_code)]
                const $field: $crate::config::Key = $crate::config::Key {
                    table: $table,
                    name: stringify!($field),
                    flag: $flag,
                    bound: $bound,
                    doc: concat!($($doc, "\n"),+),
                    kind: <$ty as $crate::config::Value>::KIND,
                };
            )+
        }

        impl $crate::config::Section for $name {
            type Flags = $flags;
            const TABLE: &'static str = $table;

            fn keys() -> Vec<$crate::config::Key> {
                vec![$( Self::$field, )+]
            }

            fn merge(
                flags: &$flags,
                file: Option<&$crate::config::File<'_>>,
            ) -> Result<Self, $crate::config::ConfigError> {
                let defaults = Self::default();
                Ok(Self {
                    $( $field: $crate::config::merge_key(
                        &Self::$field,
                        flags.$field.as_ref(),
                        file,
                        defaults.$field,
                    )?, )+
                })
            }

            fn to_toml(&self) -> Result<String, $crate::config::ConfigError> {
                let mut out = String::new();
                $( $crate::config::toml_line(&mut out, &Self::$field, &self.$field)?; )+
                Ok(out)
            }
        }

        impl clap::FromArgMatches for $flags {
            fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
                Ok(Self {
                    $( $field: $crate::config::flag_value::<$ty>(m, &$name::$field)?, )+
                })
            }

            fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
                *self = Self::from_arg_matches(m)?;
                Ok(())
            }
        }

        impl clap::Args for $flags {
            fn augment_args(cmd: clap::Command) -> clap::Command {
                let defaults = $name::default();
                let mut cmd = cmd.next_help_heading($heading);
                $(
                    cmd = cmd.arg($crate::config::flag_arg::<$ty>(
                        &$name::$field,
                        <$ty as $crate::config::Value>::show(&defaults.$field),
                    ));
                )+
                cmd
            }

            fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
                Self::augment_args(cmd)
            }
        }
    };
}
pub(crate) use section;

/// A section owned by another crate and read by its serde reader (its defaults, and the
/// checks it does, are that crate's); file-only.
#[derive(Debug, Clone, Default)]
pub struct Foreign<T> {
    /// As the owning crate reads it (its defaults filled in).
    pub config: T,
    /// As written in the file; `None` without the section.
    pub table: Option<toml::Table>,
}

impl<T> PartialEq for Foreign<T> {
    fn eq(&self, other: &Self) -> bool {
        self.table == other.table
    }
}

impl<T: serde::de::DeserializeOwned + Default> Foreign<T> {
    /// Section `name` of the file; the default without one.
    fn read(file: Option<&File<'_>>, name: &str) -> Result<Self, ConfigError> {
        Ok(
            match file.map(|f| f.foreign::<T>(name)).transpose()?.flatten() {
                Some((config, table)) => Self {
                    config,
                    table: Some(table),
                },
                None => Self::default(),
            },
        )
    }

    /// The section as written, for `--print-config`.
    fn print(&self, name: &str, out: &mut String) {
        if let Some(table) = &self.table {
            let mut root = toml::Table::new();
            root.insert(name.to_owned(), toml::Value::Table(table.clone()));
            out.push('\n');
            out.push_str(&root.to_string());
        }
    }
}

/// Declares the whole configuration: the top-level section, the sections declared with
/// [`section!`], and the sections other crates own. Generates [`Flags`] (every section's
/// flags, for `serve`), [`Config`], and their loading, printing and key list.
macro_rules! config {
    (
        top: $top:ident : $topty:ty;
        sections: $( $(#[doc = $doc:literal])+ $field:ident : $ty:ty, )*
        foreign: $( $(#[doc = $fdoc:literal])+ $ffield:ident : $fty:ty => $note:literal, )*
    ) => {
        /// The flags of every section, flattened into `serve`'s.
        #[derive(clap::Args, Debug, Clone, Default)]
        pub struct Flags {
            #[command(flatten)]
            $top: <$topty as Section>::Flags,
            $(
                #[command(flatten)]
                $field: <$ty as Section>::Flags,
            )*
        }

        /// The whole configuration in force: every section, merged.
        #[derive(Debug, Clone, PartialEq, Default)]
        pub struct Config {
            /// The top-level keys.
            pub $top: $topty,
            $( $(#[doc = $doc])+ pub $field: $ty, )*
            $( $(#[doc = $fdoc])+ pub $ffield: Foreign<$fty>, )*
        }

        /// The tables the file may hold besides the top-level keys.
        const SECTIONS: &[&str] = &[$( <$ty as Section>::TABLE, )* $( stringify!($ffield), )*];

        /// The file-only sections other crates own, and what `--help` says of each.
        const FOREIGN: &[(&str, &str)] = &[$( (stringify!($ffield), $note), )*];

        impl Config {
            /// The configuration from the flags and, if given, the file at `path`.
            pub fn load(flags: &Flags, path: Option<&Path>) -> Result<Self, ConfigError> {
                let text = path.map(File::read).transpose()?;
                let file = match (path, &text) {
                    (Some(path), Some(text)) => Some(File::parse(path, text)?),
                    _ => None,
                };
                if let Some(file) = &file {
                    refuse_unknown::<$topty>(file, SECTIONS)?;
                    $( refuse_unknown::<$ty>(file, &[])?; )*
                }
                Ok(Self {
                    $top: <$topty>::merge(&flags.$top, file.as_ref())?,
                    $( $field: <$ty>::merge(&flags.$field, file.as_ref())?, )*
                    $( $ffield: Foreign::read(file.as_ref(), stringify!($ffield))?, )*
                })
            }

            /// The configuration as a TOML file that [`Config::load`] reads back to the
            /// same configuration (`serve --print-config`).
            pub fn to_toml(&self) -> Result<String, ConfigError> {
                let mut out = String::from(
                    "# dom0-agent serve: the configuration in force (flags over file over defaults)\n",
                );
                out.push_str(&self.$top.to_toml()?);
                $(
                    out.push_str(&format!(
                        "\n[{}]\n{}",
                        <$ty as Section>::TABLE,
                        self.$field.to_toml()?
                    ));
                )*
                $( self.$ffield.print(stringify!($ffield), &mut out); )*
                Ok(out)
            }

            /// Every key of every section declared here, for `serve --help`.
            pub fn keys() -> Vec<Key> {
                [<$topty>::keys(), $( <$ty>::keys(), )*].concat()
            }
        }
    };
}

config! {
    top: service: Service;
    sections:
        /// `[tls]`.
        tls: Tls,
        /// `[xen]`.
        xen: Xen,
        /// `[console]`.
        console: Console,
    foreign:
        /// `[siem]`: `mayfly-siem`'s `SiemConfig` (docs/siem.md).
        siem: mayfly_siem::SiemConfig => "file only: a list of collectors, [[siem.collector]] (docs/siem.md)",
}

/// Refuses the keys of section `S` the declarations do not know (`sections`: the tables
/// the top level may also hold).
fn refuse_unknown<S: Section>(
    file: &File<'_>,
    sections: &[&'static str],
) -> Result<(), ConfigError> {
    match file.table(S::TABLE)? {
        Some(table) => file.refuse_unknown(S::TABLE, table, &S::keys(), sections),
        None => Ok(()),
    }
}

/// The list of file keys and their flags, for `serve --help`.
pub fn file_keys_help() -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "Configuration file (--config FILE, TOML): a flag given on the command line wins over \
         the file, the file over the default. `--print-config` prints the configuration in \
         force. The file's keys and their flags:\n",
    );
    let mut table = None;
    for key in Config::keys() {
        if table != Some(key.table) {
            table = Some(key.table);
            let _ = writeln!(
                out,
                "\n  {}",
                if key.table.is_empty() {
                    "(top level)".to_owned()
                } else {
                    format!("[{}]", key.table)
                }
            );
        }
        let flag = match key.flag {
            Flag::Value(f) | Flag::Many(f) => format!("--{f}"),
            Flag::Set(f) => format!("--{f} sets true"),
            Flag::Clear(f) => format!("--{f} sets false"),
        };
        let _ = writeln!(out, "    {:<26} {:<36} {}", key.name, flag, key.kind);
    }
    for (name, note) in FOREIGN {
        let _ = writeln!(out, "\n  [{name}]\n    {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_xen_backend::GuestKind;

    #[test]
    fn every_default_is_within_its_bound() {
        let defaults = Config::default();
        let check = |keys: Vec<Key>, values: toml::Table| {
            for key in keys {
                let value = values.get(key.name).cloned();
                if let (Some(toml::Value::Integer(v)), Bound::Range { min, max }) =
                    (&value, key.bound)
                {
                    let v = u64::try_from(*v).unwrap();
                    assert!((min..=max).contains(&v), "{}: {v}", key.qualified());
                }
                if let (Some(toml::Value::String(v)), Bound::OneOf(words)) = (&value, key.bound) {
                    assert!(words.contains(&v.as_str()), "{}: {v}", key.qualified());
                }
            }
        };
        let parse = |s: String| toml::from_str::<toml::Table>(&s).unwrap();
        check(Service::keys(), parse(defaults.service.to_toml().unwrap()));
        check(Xen::keys(), parse(defaults.xen.to_toml().unwrap()));
        check(Console::keys(), parse(defaults.console.to_toml().unwrap()));
    }

    #[test]
    fn every_flag_is_unique_and_every_key_documented() {
        let keys = Config::keys();
        let mut flags: Vec<_> = keys.iter().map(|k| k.flag.name()).collect();
        let n = flags.len();
        flags.sort_unstable();
        flags.dedup();
        assert_eq!(flags.len(), n, "a flag is declared twice");
        for key in &keys {
            assert!(!key.doc_line().is_empty(), "{} has no doc", key.qualified());
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        flags: Flags,
    }

    /// A value of `key`'s type within its bound and unlike its default.
    fn sample(key: &Key) -> Option<String> {
        let min = match key.bound {
            Bound::Range { min, .. } => min,
            _ => 0,
        };
        Some(match key.kind {
            k if k == u64::KIND => (min + 3).to_string(),
            k if k == String::KIND && key.name == "backend" => "xen".to_owned(),
            k if k == String::KIND || k == <Vec<String>>::KIND => "text".to_owned(),
            k if k == PathBuf::KIND => "/elsewhere".to_owned(),
            k if k == SocketAddr::KIND => "127.0.0.2:1".to_owned(),
            k if k == GuestKind::KIND => "linux".to_owned(),
            k if k == bool::KIND => return None,
            other => panic!("{}: no sample of {other}", key.qualified()),
        })
    }

    #[test]
    fn every_flag_sets_its_key_and_wins_over_the_file() {
        use clap::Parser as _;
        let dir = tempfile::tempdir().unwrap();
        for key in Config::keys() {
            let mut argv = vec!["serve".to_owned(), format!("--{}", key.flag.name())];
            argv.extend(sample(&key));
            let cli = Cli::try_parse_from(&argv).unwrap();
            let flagged = Config::load(&cli.flags, None).unwrap();
            assert_ne!(
                flagged,
                Config::default(),
                "{argv:?} did not reach {}",
                key.qualified()
            );
            // The same value from a file gives the same configuration; the flag wins over
            // a file that says otherwise.
            let printed = flagged.to_toml().unwrap();
            let file = dir.path().join("agent.toml");
            std::fs::write(&file, &printed).unwrap();
            let from_file = Config::load(&Flags::default(), Some(&file)).unwrap();
            assert_eq!(from_file, flagged, "{}: {printed}", key.qualified());
            let defaults = Config::default().to_toml().unwrap();
            std::fs::write(&file, &defaults).unwrap();
            let both = Config::load(&cli.flags, Some(&file)).unwrap();
            assert_eq!(both, flagged, "{}: the flag must win", key.qualified());
        }
    }

    #[test]
    fn a_misspelt_key_suggests_the_nearest() {
        let keys = Service::keys();
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

    #[test]
    fn the_printed_configuration_reads_back_the_same() {
        let path = Path::new("agent.toml");
        let text = "pool_size = 3\nlisten = \"127.0.0.1:9000\"\npolicy = \"/etc/p\"\n\
                    [xen]\nguest = \"linux\"\nbuild_threads = 2\n\
                    [console]\nadmin_keys = [\"a\", \"b\"]\nclock_skew_secs = 5\n\
                    [[siem.collector]]\nname = \"soc\"\ntransport = \"udp\"\naddress = \"127.0.0.1:514\"\n";
        let config = Config::load_text(path, text).unwrap();
        assert_eq!(config.service.pool_size, 3);
        let printed = config.to_toml().unwrap();
        let again = Config::load_text(path, &printed).unwrap();
        assert_eq!(again, config, "{printed}");
        assert_eq!(again.to_toml().unwrap(), printed);
        let defaults = Config::default().to_toml().unwrap();
        assert_eq!(
            Config::load_text(path, &defaults).unwrap(),
            Config::default()
        );
    }

    impl Config {
        fn load_text(path: &Path, text: &str) -> Result<Self, ConfigError> {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join(path);
            std::fs::write(&file, text).unwrap();
            Self::load(&Flags::default(), Some(&file))
        }
    }
}
