//! The types a key can have ([`Value`]): read from a flag and from the file, printed back
//! as TOML, measured against a bound.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::de::{DeValue, ValueDeserializer};
use toml::Spanned;

use super::{Flag, Key};

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

pub(super) fn deserialize<'a, T: Deserialize<'a>>(
    value: Spanned<DeValue<'a>>,
) -> Result<T, toml::de::Error> {
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

/// A list of small numbers (PCR indices): `[7, 8, 9]` in the file, `--FLAG 7,8,9` on the
/// command line.
impl Value for Vec<u8> {
    const KIND: &'static str = "a list of integers 0..=255";
    const PLACEHOLDER: &'static str = "N,N,...";
    fn value_parser() -> clap::builder::ValueParser {
        clap::builder::ValueParser::new(|s: &str| {
            s.split(',')
                .map(|n| n.trim().parse::<u8>())
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| format!("{s:?}: {e}"))
        })
    }
    fn to_toml(&self) -> Result<Option<toml::Value>, &'static str> {
        Ok(Some(toml::Value::Array(
            self.iter()
                .map(|n| toml::Value::Integer(i64::from(*n)))
                .collect(),
        )))
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
