//! Reading the facts of a host from its `/proc`, `/sys` and `/dev`, under an injectable root.
//!
//! [`HostFs`] resolves every path below a root (`/` on a real host, a fixture directory in
//! tests) and [`HostFacts::gather`] reads:
//!
//! | fact | files |
//! |---|---|
//! | CPU vendor, model, flags, logical CPUs | `proc/cpuinfo` (`flags` and `vmx flags` of the first CPU; `processor` entries) |
//! | memory | `proc/meminfo` (`MemTotal`) |
//! | IOMMU | `sys/class/iommu/*` (`dmar*` = VT-d, `ivhd*` = AMD-Vi); `sys/firmware/acpi/tables/{DMAR,IVRS,XMAR}` |
//! | TPM | `sys/class/tpm/tpm*/tpm_version_major`, `dev/tpmrm0` |
//! | Xen | `sys/hypervisor/{type,version/*,properties/capabilities,guest_type}`, `proc/xen/capabilities` |
//! | kernel command line | `proc/cmdline` |
//!
//! A file that does not exist is a fact ("no TPM"); any other read error is a [`HostError`].

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

/// The host's files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Reading a file or listing a directory failed for a reason other than absence.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path under the host root.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// The host's file system, seen from a root.
#[derive(Debug, Clone)]
pub struct HostFs {
    root: PathBuf,
}

impl HostFs {
    /// The files under `root` (`/` for the running host).
    pub fn new(root: impl Into<PathBuf>) -> HostFs {
        HostFs { root: root.into() }
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// A file's text, `None` if it does not exist.
    pub fn read(&self, relative: &str) -> Result<Option<String>, HostError> {
        let path = self.path(relative);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HostError::Read { path, source }),
        }
    }

    /// Whether a path exists (file, directory or device node).
    pub fn exists(&self, relative: &str) -> bool {
        self.path(relative).exists()
    }

    /// The sorted entry names of a directory; empty if it does not exist.
    pub fn list(&self, relative: &str) -> Result<Vec<String>, HostError> {
        let path = self.path(relative);
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(HostError::Read { path, source }),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| HostError::Read {
                path: path.clone(),
                source,
            })?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }
}

/// What `/proc/cpuinfo` says.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CpuFacts {
    /// `vendor_id` (`GenuineIntel`, `AuthenticAMD`).
    pub vendor: Option<String>,
    /// `model name`.
    pub model: Option<String>,
    /// The first CPU's `flags` plus its `vmx flags` (where newer kernels list `ept`).
    pub flags: BTreeSet<String>,
    /// Number of `processor` entries: the logical CPUs this kernel sees.
    pub logical_cpus: u32,
}

impl CpuFacts {
    /// Parses `/proc/cpuinfo` text.
    pub fn parse(text: &str) -> CpuFacts {
        let mut facts = CpuFacts::default();
        let mut first_block = true;
        for line in text.lines() {
            if line.trim().is_empty() {
                if facts.logical_cpus > 0 {
                    first_block = false;
                }
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            if key == "processor" {
                facts.logical_cpus = facts.logical_cpus.saturating_add(1);
            }
            if !first_block {
                continue;
            }
            match key {
                "vendor_id" => facts.vendor = Some(value.to_owned()),
                "model name" => facts.model = Some(value.to_owned()),
                "flags" | "vmx flags" => {
                    facts
                        .flags
                        .extend(value.split_whitespace().map(str::to_owned));
                }
                _ => {}
            }
        }
        facts
    }

    /// Whether a flag is listed.
    pub fn has(&self, flag: &str) -> bool {
        self.flags.contains(flag)
    }

    /// The kernel runs in a virtual machine (the `hypervisor` flag).
    pub fn in_virtual_machine(&self) -> bool {
        self.has("hypervisor")
    }
}

/// IOMMU evidence.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct IommuFacts {
    /// Entries of `/sys/class/iommu` (IOMMUs the kernel enabled).
    pub sysfs_units: Vec<String>,
    /// ACPI tables present among DMAR (VT-d), IVRS (AMD-Vi) and XMAR (a DMAR that Xen renamed
    /// to hide it from dom0).
    pub acpi_tables: Vec<String>,
}

/// One TPM the kernel registered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TpmDevice {
    /// `tpm0`, …
    pub name: String,
    /// `tpm_version_major`, if the kernel exposes it (1 or 2).
    pub version_major: Option<u32>,
}

/// TPM evidence.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TpmFacts {
    /// `/sys/class/tpm/*`.
    pub devices: Vec<TpmDevice>,
    /// `/dev/tpmrm0` exists (the kernel's TPM 2.0 resource manager).
    pub resource_manager: bool,
}

/// What Xen's sysfs and procfs nodes say (present only when running under Xen).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct XenFacts {
    /// `/proc/xen/capabilities` contains `control_d`: this is dom0.
    pub dom0: bool,
    /// `version/major`.`version/minor` and `version/extra`, e.g. `4.17.7`.
    pub version: Option<String>,
    /// `major.minor` parsed.
    pub version_major_minor: Option<(u32, u32)>,
    /// `properties/capabilities`, e.g. `xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_64`.
    pub capabilities: Option<String>,
    /// `guest_type`: `PV`, `PVH` or `HVM`.
    pub guest_type: Option<String>,
}

impl XenFacts {
    /// Xen's capabilities name an `hvm-*` guest type, which it offers only when VT-x/AMD-V
    /// is present and enabled.
    pub fn offers_hvm(&self) -> Option<bool> {
        self.capabilities
            .as_ref()
            .map(|caps| caps.split_whitespace().any(|c| c.starts_with("hvm-")))
    }
}

/// Everything the checks need to know about a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostFacts {
    /// `None` if `/proc/cpuinfo` is missing.
    pub cpu: Option<CpuFacts>,
    /// `MemTotal`, KiB; `None` if `/proc/meminfo` is missing or has none.
    pub mem_total_kib: Option<u64>,
    /// IOMMU evidence.
    pub iommu: IommuFacts,
    /// TPM evidence.
    pub tpm: TpmFacts,
    /// `Some` when `/sys/hypervisor/type` says `xen`.
    pub xen: Option<XenFacts>,
    /// `/proc/cmdline`, trimmed.
    pub kernel_cmdline: Option<String>,
}

fn trimmed(text: Option<String>) -> Option<String> {
    text.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

impl HostFacts {
    /// Reads every fact from `fs`.
    pub fn gather(fs: &HostFs) -> Result<HostFacts, HostError> {
        let cpu = fs.read("proc/cpuinfo")?.map(|t| CpuFacts::parse(&t));
        let mem_total_kib = fs.read("proc/meminfo")?.as_deref().and_then(mem_total_kib);

        let mut acpi_tables = Vec::new();
        for table in ["DMAR", "IVRS", "XMAR"] {
            if fs.exists(&format!("sys/firmware/acpi/tables/{table}")) {
                acpi_tables.push(table.to_owned());
            }
        }
        let iommu = IommuFacts {
            sysfs_units: fs.list("sys/class/iommu")?,
            acpi_tables,
        };

        let mut devices = Vec::new();
        for name in fs.list("sys/class/tpm")? {
            let version_major =
                trimmed(fs.read(&format!("sys/class/tpm/{name}/tpm_version_major"))?)
                    .and_then(|v| v.parse().ok());
            devices.push(TpmDevice {
                name,
                version_major,
            });
        }
        let tpm = TpmFacts {
            devices,
            resource_manager: fs.exists("dev/tpmrm0"),
        };

        let xen = if trimmed(fs.read("sys/hypervisor/type")?).as_deref() == Some("xen") {
            let major = trimmed(fs.read("sys/hypervisor/version/major")?);
            let minor = trimmed(fs.read("sys/hypervisor/version/minor")?);
            let extra = trimmed(fs.read("sys/hypervisor/version/extra")?).unwrap_or_default();
            let version_major_minor = match (&major, &minor) {
                (Some(a), Some(b)) => a.parse().ok().zip(b.parse().ok()),
                _ => None,
            };
            let version = match (&major, &minor) {
                (Some(a), Some(b)) => Some(format!("{a}.{b}{extra}")),
                _ => None,
            };
            let dom0 = fs
                .read("proc/xen/capabilities")?
                .is_some_and(|caps| caps.split_whitespace().any(|c| c == "control_d"));
            Some(XenFacts {
                dom0,
                version,
                version_major_minor,
                capabilities: trimmed(fs.read("sys/hypervisor/properties/capabilities")?),
                guest_type: trimmed(fs.read("sys/hypervisor/guest_type")?),
            })
        } else {
            None
        };

        Ok(HostFacts {
            cpu,
            mem_total_kib,
            iommu,
            tpm,
            xen,
            kernel_cmdline: trimmed(fs.read("proc/cmdline")?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_INTEL_CPUS: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
model name\t: Intel(R) Xeon(R) Gold 6338\nflags\t\t: fpu vmx sse2\n\
vmx flags\t: vnmi ept vpid unrestricted_guest\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\n\
flags\t\t: fpu vmx sse2 extra_only_on_cpu1\n\n";

    #[test]
    fn cpuinfo_takes_first_cpu_flags_and_counts_processors() {
        let cpu = CpuFacts::parse(TWO_INTEL_CPUS);
        assert_eq!(cpu.logical_cpus, 2);
        assert_eq!(cpu.vendor.as_deref(), Some("GenuineIntel"));
        assert!(cpu.has("vmx") && cpu.has("ept") && cpu.has("vpid"));
        assert!(!cpu.has("extra_only_on_cpu1"));
        assert!(!cpu.in_virtual_machine());
    }

    #[test]
    fn meminfo_total() {
        assert_eq!(
            mem_total_kib("MemTotal:       24684092 kB\nMemFree: 1 kB\n"),
            Some(24_684_092)
        );
        assert_eq!(mem_total_kib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn an_empty_root_has_no_facts_but_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let facts = HostFacts::gather(&HostFs::new(dir.path())).unwrap();
        assert_eq!(facts, HostFacts::default());
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_an_absence() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where a file is expected: reading it fails with something other
        // than NotFound.
        std::fs::create_dir_all(dir.path().join("proc/cpuinfo")).unwrap();
        let err = HostFacts::gather(&HostFs::new(dir.path())).unwrap_err();
        assert!(err.to_string().contains("proc/cpuinfo"), "{err}");
    }
}
