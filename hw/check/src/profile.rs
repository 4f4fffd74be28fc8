//! Server profiles: what a host must offer to run Mayfly, and the Xen and dom0 command lines
//! the appliance boots with on it.
//!
//! Profiles are TOML files in `hw/profiles/` (schema in `hw/README.md`); the shipped ones are
//! compiled into this crate ([`shipped`]), so the checker never depends on files beside it.
//! Parsing is strict: unknown keys, a missing key, a bad level or a malformed version are
//! errors that name the profile.

use serde::{Deserialize, Serialize};

/// How much a requirement matters in a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The host does not pass the profile without it.
    Required,
    /// Reported as a warning when missing; the host still passes.
    Recommended,
    /// Not checked.
    Ignored,
}

/// The hardware a profile asks for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// VT-x (Intel) or AMD-V (AMD).
    pub hardware_virtualization: Level,
    /// Hardware-assisted paging: EPT (Intel) or NPT (AMD); the VM-fork clone path needs it.
    pub hap: Level,
    /// An IOMMU: VT-d (Intel) or AMD-Vi (AMD).
    pub iommu: Level,
    /// A TPM 2.0 with the kernel's resource manager (`/dev/tpmrm0`).
    pub tpm2: Level,
    /// Physical memory, MiB.
    pub min_memory_mib: u64,
    /// Logical CPUs (hardware threads).
    pub min_logical_cpus: u32,
}

/// Xen settings of a profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct XenSettings {
    /// Lowest Xen version, `"MAJOR.MINOR"`.
    pub min_version: String,
    /// Xen's command line, space-separated settings.
    pub cmdline: String,
}

/// dom0 kernel settings of a profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dom0Settings {
    /// The dom0 kernel's command line, space-separated settings.
    pub cmdline: String,
}

/// One supported server profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short name (`--profile NAME`), the file's stem.
    pub name: String,
    /// One line saying what the profile is for.
    pub summary: String,
    /// Hardware requirements.
    pub requirements: Requirements,
    /// Xen version and command line.
    pub xen: XenSettings,
    /// dom0 kernel command line.
    pub dom0: Dom0Settings,
}

/// A profile could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The TOML is malformed or does not follow the schema.
    #[error("profile {name}: {source}")]
    Parse {
        /// The profile's file name or stem.
        name: String,
        /// What the parser said.
        source: Box<toml::de::Error>,
    },
    /// `xen.min_version` is not `MAJOR.MINOR`.
    #[error("profile {name}: xen.min_version {value:?} is not MAJOR.MINOR")]
    BadVersion {
        /// The profile.
        name: String,
        /// The offending value.
        value: String,
    },
    /// The `name` key differs from the file's stem.
    #[error("profile file {file}.toml names itself {name:?}")]
    NameMismatch {
        /// The file's stem.
        file: String,
        /// The `name` inside.
        name: String,
    },
    /// No profile of that name ships.
    #[error("unknown profile {wanted:?}; known profiles: {}", known.join(", "))]
    Unknown {
        /// The name asked for.
        wanted: String,
        /// The shipped names.
        known: Vec<String>,
    },
}

/// The profiles compiled in: `(file stem, TOML text)`.
const SHIPPED: &[(&str, &str)] = &[
    ("general", include_str!("../../profiles/general.toml")),
    ("production", include_str!("../../profiles/production.toml")),
];

/// A `MAJOR.MINOR` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Version {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl Version {
    /// Parses `"MAJOR.MINOR"`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Version> {
        let (major, minor) = text.trim().split_once('.')?;
        Some(Version {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl Profile {
    /// Parses one profile; `file_stem` must equal its `name`.
    pub fn parse(file_stem: &str, text: &str) -> Result<Profile, ProfileError> {
        let profile: Profile = toml::from_str(text).map_err(|e| ProfileError::Parse {
            name: file_stem.to_owned(),
            source: Box::new(e),
        })?;
        if profile.name != file_stem {
            return Err(ProfileError::NameMismatch {
                file: file_stem.to_owned(),
                name: profile.name,
            });
        }
        if Version::parse(&profile.xen.min_version).is_none() {
            return Err(ProfileError::BadVersion {
                name: profile.name,
                value: profile.xen.min_version,
            });
        }
        Ok(profile)
    }

    /// The lowest Xen version (validated when parsed).
    pub fn xen_min_version(&self) -> Version {
        Version::parse(&self.xen.min_version).unwrap_or(Version { major: 0, minor: 0 })
    }
}

/// The names of the shipped profiles, in order.
pub fn shipped_names() -> Vec<String> {
    SHIPPED.iter().map(|(name, _)| (*name).to_owned()).collect()
}

/// Every shipped profile, parsed.
pub fn shipped() -> Result<Vec<Profile>, ProfileError> {
    SHIPPED
        .iter()
        .map(|(stem, text)| Profile::parse(stem, text))
        .collect()
}

/// The shipped profile called `name`.
pub fn shipped_profile(name: &str) -> Result<Profile, ProfileError> {
    match SHIPPED.iter().find(|(stem, _)| *stem == name) {
        Some((stem, text)) => Profile::parse(stem, text),
        None => Err(ProfileError::Unknown {
            wanted: name.to_owned(),
            known: shipped_names(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_profiles_parse_and_production_is_stricter() {
        let general = shipped_profile("general").unwrap();
        let production = shipped_profile("production").unwrap();
        assert_eq!(
            general.requirements.hardware_virtualization,
            Level::Required
        );
        for level in [
            production.requirements.hap,
            production.requirements.iommu,
            production.requirements.tpm2,
        ] {
            assert_eq!(level, Level::Required);
        }
        assert!(production.requirements.min_memory_mib > general.requirements.min_memory_mib);
        assert!(production.requirements.min_logical_cpus > general.requirements.min_logical_cpus);
        assert!(production.xen.cmdline.contains("iommu=required"));
        assert_eq!(shipped().unwrap().len(), 2);
    }

    #[test]
    fn unknown_profile_lists_the_known_ones() {
        let err = shipped_profile("gaming").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown profile \"gaming\"; known profiles: general, production"
        );
    }

    #[test]
    fn schema_is_strict() {
        let good = SHIPPED[0].1;
        let extra = format!("{good}\nturbo = true\n");
        assert!(matches!(
            Profile::parse("general", &extra),
            Err(ProfileError::Parse { .. })
        ));
        let bad_level = good.replace("hap = \"recommended\"", "hap = \"nice-to-have\"");
        assert!(matches!(
            Profile::parse("general", &bad_level),
            Err(ProfileError::Parse { .. })
        ));
        let bad_version = good.replace("min_version = \"4.17\"", "min_version = \"four\"");
        assert!(matches!(
            Profile::parse("general", &bad_version),
            Err(ProfileError::BadVersion { .. })
        ));
        assert!(matches!(
            Profile::parse("other", good),
            Err(ProfileError::NameMismatch { .. })
        ));
    }

    #[test]
    fn versions_compare() {
        let v = |s| Version::parse(s).unwrap();
        assert!(v("4.17") < v("4.19"));
        assert!(v("4.9") < v("4.17"));
        assert!(Version::parse("4").is_none());
        assert!(Version::parse("4.x").is_none());
    }
}
