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

mod error;
mod file;
mod key;
mod sections;
mod value;

use std::path::Path;

pub use error::ConfigError;
pub use file::File;
pub(crate) use key::section;
pub use key::{merge_key, toml_line, Bound, Flag, Key, Section};
pub use sections::{BreakGlass, Console, Service, SigningKey, SigningKeyFlags, Tls, Update, Xen};
pub use value::{flag_arg, flag_value, Value};

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
        /// `[key]`.
        key: SigningKey,
        /// `[update]`.
        update: Update,
        /// `[breakglass]`.
        breakglass: BreakGlass,
    foreign:
        /// `[siem]`: `mayfly-siem`'s `SiemConfig` (docs/siem.md).
        siem: mayfly_siem::SiemConfig => "file only: a list of collectors, [[siem.collector]] (docs/siem.md)",
        /// `[replication]`: `mayfly-replica`'s `ReplicationSection` (docs/failover.md).
        replication: Option<mayfly_replica::ReplicationSection> => "file only: the replication peer, its TLS keys and pins (docs/failover.md)",
}

/// The `[key]` section alone, for `init` and `reseal` (which take only its flags): the
/// file, if given, is checked whole, as `serve` would check it.
pub fn load_key(flags: &SigningKeyFlags, path: Option<&Path>) -> Result<SigningKey, ConfigError> {
    let all = Flags {
        key: flags.clone(),
        ..Flags::default()
    };
    Ok(Config::load(&all, path)?.key)
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
    use std::net::SocketAddr;
    use std::path::PathBuf;

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
            k if k == String::KIND && key.name == "source" => "tpm".to_owned(),
            k if k == <Vec<u8>>::KIND => "7,8".to_owned(),
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
