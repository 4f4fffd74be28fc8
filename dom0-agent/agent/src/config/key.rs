//! A key as declared (its flag, bound and doc), a section of keys ([`section!`]), and the
//! merge of one key from its flag, the file and its default.

use super::{ConfigError, File, Value};

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
    pub(super) fn help(&self, default: Option<String>) -> String {
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
