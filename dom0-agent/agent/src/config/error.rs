//! The one error of the configuration: what was refused, and where.

use std::path::PathBuf;

use super::file::MAX_FILE_BYTES;

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
