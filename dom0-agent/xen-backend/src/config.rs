//! The Xen backend's settings, their defaults and checks, and the `xl` domain
//! configuration rendered from them.
//!
//! In the agent's TOML file they live in a `[xen]` table ([`XenSection`]):
//!
//! ```toml
//! [xen]
//! guest = "mayfly"                              # or "linux" (default: mayfly)
//! mayfly_kernel = "/usr/share/mayfly/template/mayfly-pv-guest"   # the Mayfly PV guest
//! mayfly_memory_mib = 4                         # 4..=64
//! kernel = "/usr/lib/mayfly/domu/vmlinux"      # linux: uncompressed ELF vmlinux
//! ramdisk = "/usr/lib/mayfly/domu/initramfs.cpio.gz"  # /init is domu-shim
//! cmdline = "console=hvc0 quiet"
//! memory_mib = 128                              # at least 96
//! xl = "xl"                                     # builds domains (xl create -p -e)
//! ready_timeout_ms = 60000                      # build to the shim's Ready
//! build_threads = 1
//! guest_weight = 128                            # credit/credit2 weight, below dom0's
//! guest_cap_percent = 50                        # CPU cap of each guest, % of one CPU (0: none;
//!                                               # a cap needs sched=credit: refused under credit2)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use mayfly_ring::Geometry;
use serde::Deserialize;

/// The backend's name (in audit records and errors).
pub const BACKEND: &str = "xen";

/// Smallest domU memory that boots Debian's kernel (smaller: "segment kernel too large").
pub const MIN_MEMORY_MIB: u32 = 96;
/// Where the appliance installs the Mayfly PV guest kernel.
pub const DEFAULT_MAYFLY_KERNEL: &str = "/usr/share/mayfly/template/mayfly-pv-guest";
/// The Mayfly PV guest's default memory (the generic loader's floor).
pub const DEFAULT_MAYFLY_MEMORY_MIB: u32 = 4;
/// Each guest domain's default credit-scheduler weight: half of Xen's default (256), which
/// dom0 has unless the host changed it, so the agent wins a contended CPU 2:1 against any
/// one guest.
pub const DEFAULT_GUEST_WEIGHT: u16 = 128;
/// Each guest domain's default CPU cap, in % of one physical CPU (a guest has one vCPU):
/// half a CPU, so a guest that spins uses at most that even on an idle host. Chosen from
/// the Xen-in-QEMU suite's measurement (BENCHMARKS.md, "credit caps"): a Linux guest's
/// boot costs about as much at 50 % as uncapped, twice as long at 25 %. Caps need Xen's
/// credit scheduler (`sched=credit`, as the appliance boots): under credit2, whose cap code
/// crashes Xen 4.17 as guests come and go, the agent refuses to start with a cap
/// ([`crate::backend::StartError::Credit2Cap`]; set 0 there).
pub const DEFAULT_GUEST_CAP_PERCENT: u16 = 50;
/// Most a cap may be: a guest has one vCPU, which can use at most one CPU.
pub const MAX_GUEST_CAP_PERCENT: u16 = 100;

/// Which guest the backend's domains run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// Mayfly's own PV guest kernel (`domu-shim/pv-guest`), built in-process through
    /// libxenguest: no `xl`, no xenstore; a few MiB.
    #[default]
    Mayfly,
    /// The Linux PV guest (kernel + initramfs whose `/init` is domu-shim), built by `xl`, for
    /// handlers that need a Linux userland.
    Linux,
}

impl std::str::FromStr for GuestKind {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mayfly" => Ok(Self::Mayfly),
            "linux" => Ok(Self::Linux),
            _ => Err(ConfigError::Guest {
                found: s.chars().take(32).collect(),
            }),
        }
    }
}

impl std::fmt::Display for GuestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Mayfly => "mayfly",
            Self::Linux => "linux",
        })
    }
}
/// Prefix of every domain this backend creates; the reconciler destroys all of them.
pub const NAME_PREFIX: &str = "mayfly-";
/// Linux gntalloc's default limit of pages shared at once.
pub const GNTALLOC_DEFAULT_LIMIT: usize = 1024;
/// gntalloc's limit as the running kernel exposes it (a module parameter, writable at run
/// time; the appliance's `S20xen` raises it).
pub const GNTALLOC_LIMIT_PATH: &str = "/sys/module/xen_gntalloc/parameters/limit";

/// gntalloc's limit from the text of [`GNTALLOC_LIMIT_PATH`]; `None` if it is not a
/// non-negative decimal.
pub fn parse_gntalloc_limit(text: &str) -> Option<usize> {
    let t = text.trim();
    if t.is_empty() || t.len() > 10 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// The running kernel's gntalloc limit; the default if it cannot be read.
pub fn gntalloc_limit() -> usize {
    std::fs::read_to_string(GNTALLOC_LIMIT_PATH)
        .ok()
        .and_then(|t| parse_gntalloc_limit(&t))
        .unwrap_or(GNTALLOC_DEFAULT_LIMIT)
}

/// The `[xen]` table of the agent's configuration file (every key optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XenSection {
    /// The guest kind (default: mayfly).
    pub guest: Option<GuestKind>,
    /// The Mayfly PV guest kernel.
    pub mayfly_kernel: Option<PathBuf>,
    /// Memory of each Mayfly guest, MiB.
    pub mayfly_memory_mib: Option<u32>,
    /// The template's kernel (uncompressed vmlinux).
    pub kernel: Option<PathBuf>,
    /// The template's initramfs (its `/init` is domu-shim).
    pub ramdisk: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: Option<String>,
    /// Memory of each domain, MiB.
    pub memory_mib: Option<u32>,
    /// The `xl` binary.
    pub xl: Option<PathBuf>,
    /// Longest a build may take until the shim's Ready, ms.
    pub ready_timeout_ms: Option<u64>,
    /// Domains built in parallel.
    pub build_threads: Option<usize>,
    /// Credit-scheduler weight of each guest domain (below dom0's).
    pub guest_weight: Option<u32>,
    /// CPU cap of each guest domain, in % of one CPU.
    pub guest_cap_percent: Option<u32>,
}

/// The backend's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenConfig {
    /// The guest kind.
    pub guest: GuestKind,
    /// The Mayfly PV guest kernel (guest `mayfly`).
    pub mayfly_kernel: PathBuf,
    /// Memory per Mayfly guest, MiB.
    pub mayfly_memory_mib: u32,
    /// The template's kernel.
    pub kernel: PathBuf,
    /// The template's initramfs.
    pub ramdisk: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Memory per domain, MiB.
    pub memory_mib: u32,
    /// The `xl` binary (found in `PATH` if not absolute).
    pub xl: PathBuf,
    /// Where the `xl` configuration files go.
    pub run_dir: PathBuf,
    /// Ready domains kept ahead of demand.
    pub pool_size: usize,
    /// Domains handed out at once.
    pub max_in_use: usize,
    /// Longest a build may take until the shim's Ready.
    pub ready_timeout: Duration,
    /// Domains built in parallel.
    pub build_threads: usize,
    /// The ring's geometry.
    pub geometry: Geometry,
    /// Every guest domain's credit-scheduler weight and cap, set before its first unpause.
    pub sched: mayfly_xen::CreditParams,
}

/// A setting was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required setting is missing.
    #[error("the xen backend needs {what} (flag --{flag}, or `{what}` in the [xen] table)")]
    Missing {
        /// The key.
        what: &'static str,
        /// The flag.
        flag: &'static str,
    },
    /// A template file is not a readable regular file.
    #[error("xen template {what} {path:?} is not a file")]
    NotAFile {
        /// kernel or ramdisk.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Not a guest kind.
    #[error("guest {found:?} is neither \"mayfly\" nor \"linux\"")]
    Guest {
        /// What was given.
        found: String,
    },
    /// The Mayfly guest's memory is out of range.
    #[error(
        "mayfly_memory_mib {found} is not in {}..={}",
        mayfly_xen::pvbuild::MIN_MEMORY_MIB,
        mayfly_xen::pvbuild::MAX_MEMORY_MIB
    )]
    MayflyMemory {
        /// Configured.
        found: u32,
    },
    /// Memory below the minimum.
    #[error("memory_mib {found} is below {MIN_MEMORY_MIB}")]
    Memory {
        /// Configured.
        found: u32,
    },
    /// The guest weight is out of range.
    #[error("guest_weight {found} is not in 1..=65535")]
    Weight {
        /// Configured.
        found: u32,
    },
    /// The guest cap is out of range.
    #[error("guest_cap_percent {found} is not in 0..={MAX_GUEST_CAP_PERCENT} (0: no cap; a guest has one vCPU)")]
    Cap {
        /// Configured.
        found: u32,
    },
    /// A count or time that must be positive is zero.
    #[error("{field} must not be zero")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// A value cannot be written into an xl configuration string.
    #[error("{field} holds a character xl's configuration cannot carry (quote, backslash, control, non-UTF-8)")]
    Unquotable {
        /// The field.
        field: &'static str,
    },
}

impl XenConfig {
    /// Settings from the `[xen]` table (flags already merged in), pool sizes and run_dir.
    pub fn from_section(
        section: &XenSection,
        run_dir: PathBuf,
        pool_size: usize,
        max_in_use: usize,
    ) -> Result<Self, ConfigError> {
        let guest = section.guest.unwrap_or_default();
        // The Linux template is required only when it is the guest.
        let (kernel, ramdisk) = match guest {
            GuestKind::Linux => (
                section.kernel.clone().ok_or(ConfigError::Missing {
                    what: "kernel",
                    flag: "xen-kernel",
                })?,
                section.ramdisk.clone().ok_or(ConfigError::Missing {
                    what: "ramdisk",
                    flag: "xen-ramdisk",
                })?,
            ),
            GuestKind::Mayfly => (
                section.kernel.clone().unwrap_or_default(),
                section.ramdisk.clone().unwrap_or_default(),
            ),
        };
        Ok(Self {
            guest,
            mayfly_kernel: section
                .mayfly_kernel
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MAYFLY_KERNEL)),
            mayfly_memory_mib: section
                .mayfly_memory_mib
                .unwrap_or(DEFAULT_MAYFLY_MEMORY_MIB),
            kernel,
            ramdisk,
            cmdline: section
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=hvc0 quiet".to_owned()),
            memory_mib: section.memory_mib.unwrap_or(128),
            xl: section.xl.clone().unwrap_or_else(|| PathBuf::from("xl")),
            run_dir,
            pool_size,
            max_in_use,
            ready_timeout: Duration::from_millis(section.ready_timeout_ms.unwrap_or(60_000)),
            build_threads: section.build_threads.unwrap_or(1),
            geometry: Geometry::DEFAULT,
            sched: sched_params(section)?,
        })
    }

    /// Checks the settings (the template files must exist).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest == GuestKind::Mayfly {
            if !self.mayfly_kernel.is_file() {
                return Err(ConfigError::NotAFile {
                    what: "mayfly_kernel",
                    path: self.mayfly_kernel.clone(),
                });
            }
            if !(mayfly_xen::pvbuild::MIN_MEMORY_MIB..=mayfly_xen::pvbuild::MAX_MEMORY_MIB)
                .contains(&self.mayfly_memory_mib)
            {
                return Err(ConfigError::MayflyMemory {
                    found: self.mayfly_memory_mib,
                });
            }
            return self.validate_counts();
        }
        for (what, path) in [("kernel", &self.kernel), ("ramdisk", &self.ramdisk)] {
            if !path.is_file() {
                return Err(ConfigError::NotAFile {
                    what,
                    path: path.clone(),
                });
            }
            quotable(path_str(path), what)?;
        }
        quotable(Some(&self.cmdline), "cmdline")?;
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::Memory {
                found: self.memory_mib,
            });
        }
        self.validate_counts()
    }

    /// The pool sizes and the timeout (every guest kind).
    fn validate_counts(&self) -> Result<(), ConfigError> {
        for (field, n) in [
            ("pool_size", self.pool_size),
            ("max_in_use", self.max_in_use),
            ("build_threads", self.build_threads),
        ] {
            if n == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.ready_timeout.is_zero() {
            return Err(ConfigError::Zero {
                field: "ready_timeout_ms",
            });
        }
        Ok(())
    }

    /// Grant pages the backend may share at once (ready, being built, in use, quarantined).
    pub fn pages_at_most(&self) -> usize {
        self.pool_size
            .saturating_add(self.build_threads)
            .saturating_add(self.max_in_use)
            .saturating_add(mayfly_domain::MAX_QUARANTINED)
            .saturating_mul(self.geometry.total_pages())
    }

    /// The `xl` configuration of domain `name` (see [`xl_config`]).
    pub fn xl_config(&self, name: &str) -> Result<String, ConfigError> {
        xl_config(self, name)
    }
}

/// The guests' weight and cap from the section (defaults filled in), range-checked.
fn sched_params(section: &XenSection) -> Result<mayfly_xen::CreditParams, ConfigError> {
    let weight = match section.guest_weight {
        None => DEFAULT_GUEST_WEIGHT,
        Some(found) => u16::try_from(found)
            .ok()
            .filter(|w| *w != 0)
            .ok_or(ConfigError::Weight { found })?,
    };
    let cap_percent = match section.guest_cap_percent {
        None => DEFAULT_GUEST_CAP_PERCENT,
        Some(found) => u16::try_from(found)
            .ok()
            .filter(|c| *c <= MAX_GUEST_CAP_PERCENT)
            .ok_or(ConfigError::Cap { found })?,
    };
    Ok(mayfly_xen::CreditParams {
        weight,
        cap_percent,
    })
}

fn path_str(path: &Path) -> Option<&str> {
    path.to_str()
}

/// Refuses what cannot sit between double quotes in xl's configuration syntax.
fn quotable<'a>(value: Option<&'a str>, field: &'static str) -> Result<&'a str, ConfigError> {
    let value = value.ok_or(ConfigError::Unquotable { field })?;
    if value
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(ConfigError::Unquotable { field });
    }
    Ok(value)
}

/// Renders the `xl` configuration of one pool domain: a PV domU of the template with one
/// vCPU, no disk and no network; a shut-down domain is left for the agent to inspect and
/// destroy (`preserve`; nothing acts on it anyway, as `xl create -e` does not monitor).
pub fn xl_config(config: &XenConfig, name: &str) -> Result<String, ConfigError> {
    let name = quotable(Some(name), "name")?;
    let kernel = quotable(path_str(&config.kernel), "kernel")?;
    let ramdisk = quotable(path_str(&config.ramdisk), "ramdisk")?;
    let cmdline = quotable(Some(&config.cmdline), "cmdline")?;
    let memory = config.memory_mib;
    Ok(format!(
        "# Written by the Mayfly agent for one transaction domain; built with `xl create -p -e`,\n\
         # run, paused and destroyed by the agent through libxenctrl.\n\
         name = \"{name}\"\n\
         type = \"pv\"\n\
         kernel = \"{kernel}\"\n\
         ramdisk = \"{ramdisk}\"\n\
         extra = \"{cmdline}\"\n\
         memory = {memory}\n\
         maxmem = {memory}\n\
         vcpus = 1\n\
         on_poweroff = \"preserve\"\n\
         on_reboot = \"preserve\"\n\
         on_crash = \"preserve\"\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> XenConfig {
        let kernel = dir.join("vmlinux");
        let ramdisk = dir.join("initramfs.cpio.gz");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&ramdisk, b"r").unwrap();
        let section = XenSection {
            guest: Some(GuestKind::Linux),
            kernel: Some(kernel),
            ramdisk: Some(ramdisk),
            ..XenSection::default()
        };
        XenConfig::from_section(&section, dir.join("run"), 4, 8).unwrap()
    }

    #[test]
    fn mayfly_is_the_default_guest_and_needs_no_linux_template() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("mayfly-pv-guest");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let s: XenSection = toml::from_str(&format!("mayfly_kernel = {kernel:?}\n")).unwrap();
        let c = XenConfig::from_section(&s, dir.path().join("run"), 2, 2).unwrap();
        assert_eq!(c.guest, GuestKind::Mayfly);
        assert_eq!(c.mayfly_memory_mib, DEFAULT_MAYFLY_MEMORY_MIB);
        c.validate().unwrap();
        let none = XenConfig::from_section(&XenSection::default(), "/run".into(), 1, 1).unwrap();
        assert_eq!(none.mayfly_kernel, PathBuf::from(DEFAULT_MAYFLY_KERNEL));
        let mut big = c.clone();
        big.mayfly_memory_mib = 65;
        assert!(matches!(
            big.validate(),
            Err(ConfigError::MayflyMemory { found: 65 })
        ));
        let mut tiny = c.clone();
        tiny.mayfly_memory_mib = 3;
        assert!(matches!(
            tiny.validate(),
            Err(ConfigError::MayflyMemory { found: 3 })
        ));
        let mut gone = c;
        gone.mayfly_kernel = dir.path().join("missing");
        assert!(matches!(
            gone.validate(),
            Err(ConfigError::NotAFile {
                what: "mayfly_kernel",
                ..
            })
        ));
        let linux: XenSection = toml::from_str("guest = \"linux\"\n").unwrap();
        assert!(matches!(
            XenConfig::from_section(&linux, "/run".into(), 1, 1),
            Err(ConfigError::Missing { what: "kernel", .. })
        ));
        assert!(toml::from_str::<XenSection>("guest = \"bsd\"\n").is_err());
        assert_eq!("linux".parse::<GuestKind>().unwrap(), GuestKind::Linux);
        assert_eq!("mayfly".parse::<GuestKind>().unwrap(), GuestKind::Mayfly);
        assert!(matches!(
            "Linux".parse::<GuestKind>(),
            Err(ConfigError::Guest { .. })
        ));
    }

    #[test]
    fn the_toml_table_parses_and_refuses_unknown_keys() {
        let s: XenSection = toml::from_str(
            "kernel = \"/k\"\nramdisk = \"/r\"\nmemory_mib = 160\nready_timeout_ms = 5\n",
        )
        .unwrap();
        assert_eq!(s.kernel, Some(PathBuf::from("/k")));
        assert_eq!(s.memory_mib, Some(160));
        assert!(toml::from_str::<XenSection>("kernal = \"/k\"\n").is_err());
        let linux = XenSection {
            guest: Some(GuestKind::Linux),
            ..XenSection::default()
        };
        let missing = XenConfig::from_section(&linux, "/run".into(), 1, 1);
        assert!(matches!(
            missing,
            Err(ConfigError::Missing { what: "kernel", .. })
        ));
    }

    #[test]
    fn defaults_validate_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        c.validate().unwrap();
        assert_eq!(c.memory_mib, 128);
        assert_eq!(
            c.pages_at_most(),
            (4 + 1 + 8 + mayfly_domain::MAX_QUARANTINED) * 69
        );
        let mut small = c.clone();
        small.memory_mib = 64;
        assert!(matches!(
            small.validate(),
            Err(ConfigError::Memory { found: 64 })
        ));
        let mut gone = c.clone();
        gone.kernel = dir.path().join("missing");
        assert!(matches!(gone.validate(), Err(ConfigError::NotAFile { .. })));
        let mut quote = c.clone();
        quote.cmdline = "console=hvc0\" vcpus=8 \"".into();
        assert!(matches!(
            quote.validate(),
            Err(ConfigError::Unquotable { .. })
        ));
        let mut zero = c;
        zero.pool_size = 0;
        assert!(matches!(zero.validate(), Err(ConfigError::Zero { .. })));
    }

    #[test]
    fn xl_config_describes_a_paused_pv_domain_without_devices() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let text = c.xl_config("mayfly-7").unwrap();
        assert!(text.contains("name = \"mayfly-7\"\n"));
        assert!(text.contains("type = \"pv\"\n"));
        assert!(text.contains("memory = 128\n"));
        assert!(text.contains("vcpus = 1\n"));
        assert!(text.contains("extra = \"console=hvc0 quiet\"\n"));
        // No devices: no `disk`, `vif` or other device lines.
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(" = ").next())
            .collect();
        assert_eq!(
            keys,
            [
                "name",
                "type",
                "kernel",
                "ramdisk",
                "extra",
                "memory",
                "maxmem",
                "vcpus",
                "on_poweroff",
                "on_reboot",
                "on_crash"
            ]
        );
        assert!(c.xl_config("bad\"name").is_err());
        assert!(c.xl_config("new\nline").is_err());
    }

    #[test]
    fn guest_weight_and_cap_have_defaults_and_bounds() {
        let c = XenConfig::from_section(&XenSection::default(), "/run".into(), 1, 1).unwrap();
        assert_eq!(
            c.sched,
            mayfly_xen::CreditParams {
                weight: DEFAULT_GUEST_WEIGHT,
                cap_percent: DEFAULT_GUEST_CAP_PERCENT
            }
        );
        // Capped by default: a guest that spins gets at most half a CPU.
        assert_eq!(c.sched.cap_percent, 50);
        let s: XenSection = toml::from_str("guest_weight = 64\nguest_cap_percent = 100\n").unwrap();
        let c = XenConfig::from_section(&s, "/run".into(), 1, 1).unwrap();
        assert_eq!((c.sched.weight, c.sched.cap_percent), (64, 100));
        for (weight, cap, bad) in [
            (Some(0), None, "guest_weight 0"),
            (Some(65_536), None, "guest_weight 65536"),
            (None, Some(101), "guest_cap_percent 101"),
        ] {
            let s = XenSection {
                guest_weight: weight,
                guest_cap_percent: cap,
                ..XenSection::default()
            };
            let err = XenConfig::from_section(&s, "/run".into(), 1, 1).unwrap_err();
            assert!(err.to_string().starts_with(bad), "{err}");
        }
    }

    #[test]
    fn the_gntalloc_limit_is_read_from_its_parameter() {
        assert_eq!(parse_gntalloc_limit("8192\n"), Some(8192));
        assert_eq!(parse_gntalloc_limit("1024"), Some(1024));
        for bad in ["", "\n", "-1", "0x10", "12 34", "99999999999"] {
            assert_eq!(parse_gntalloc_limit(bad), None, "{bad:?}");
        }
    }
}
