//! Xen's view of the physical machine, for a checker running in dom0.
//!
//! In a PV dom0 the kernel's `/proc/cpuinfo` hides `vmx`/`svm`/`ept`/`npt`, `/proc/meminfo`
//! shows dom0's own allocation and `/sys/class/iommu` is empty (Xen owns the IOMMU). The
//! physical capabilities come from the hypervisor: `XEN_SYSCTL_physinfo` (libxenctrl's
//! `xc_physinfo`) reports the `hvm`, `hap` and `directio` (IOMMU) capability bits, the CPU
//! count and the page count, and `XENVER_commandline` (`xc_version`) the running Xen's
//! command line.
//!
//! This crate makes no hypercalls (it is `forbid(unsafe_code)` and links no Xen library). A
//! [`XenPhysInfoSource`] supplies those facts. `mayfly hw-check` asks a source calling
//! `xc_physinfo`/`xc_version` through the run-time-loaded libxenctrl bindings of `mayfly-xen`
//! first (no xenstored needed) and falls back to [`XlInfoSource`], which runs the toolstack's
//! `xl info` (it prints exactly those fields from `xc_physinfo` and `xc_version`, and needs
//! xenstored running); the checks do not depend on the source.
//!
//! `xl info` lines used (Xen 4.17; `key : value`, aligned with spaces):
//!
//! | key | meaning |
//! |---|---|
//! | `nr_cpus` | online logical CPUs |
//! | `total_memory` | MiB of machine memory |
//! | `virt_caps` | words: `hvm`, `hap`, `hvm_directio`/`pv_directio` (IOMMU), … |
//! | `xen_commandline` | the running Xen's command line (optional) |

/// Physical facts reported by Xen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct XenPhysInfo {
    /// `XEN_SYSCTL_PHYSCAP_hvm`: VT-x/AMD-V present and enabled.
    pub hvm: bool,
    /// `XEN_SYSCTL_PHYSCAP_hap`: EPT/NPT usable.
    pub hap: bool,
    /// `XEN_SYSCTL_PHYSCAP_directio`: an IOMMU is in use (device pass-through possible).
    pub iommu: bool,
    /// `nr_cpus`: online physical (logical) CPUs.
    pub nr_cpus: u32,
    /// `total_pages` × page size, MiB.
    pub total_memory_mib: u64,
    /// `XENVER_commandline`, when the source can read it.
    pub xen_cmdline: Option<String>,
}

/// Reading Xen's physical information failed.
#[derive(Debug, thiserror::Error)]
pub enum XenInfoError {
    /// The program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program (`xl`).
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The program failed.
    #[error("{program} info failed ({status}): {stderr}")]
    Command {
        /// The program (`xl`).
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The last line it wrote to stderr.
        stderr: String,
    },
    /// A field is missing or malformed in the output.
    #[error("`xl info` output has no valid {field}")]
    Parse {
        /// The `xl info` key.
        field: &'static str,
    },
    /// The Xen control library could not be loaded.
    #[error("cannot load {library}")]
    LibraryMissing {
        /// The shared object looked for (e.g. `libxenctrl.so.4.17`).
        library: String,
    },
    /// A Xen control call failed.
    #[error("{call} failed (errno {errno})")]
    Call {
        /// The failing call, e.g. `xc_physinfo`.
        call: &'static str,
        /// Its errno.
        errno: i32,
    },
    /// libxenctrl answered with an error (not dom0, wrong Xen release, a failed call).
    #[error("{0}")]
    Libxenctrl(String),
    /// Neither libxenctrl nor `xl info` answered.
    #[error("libxenctrl: {libxenctrl}; xl: {xl}")]
    Both {
        /// libxenctrl's failure.
        libxenctrl: Box<XenInfoError>,
        /// `xl info`'s failure.
        xl: Box<XenInfoError>,
    },
}

/// Something that can ask Xen for [`XenPhysInfo`].
pub trait XenPhysInfoSource {
    /// The facts, or `Ok(None)` when this source has no way to ask.
    fn phys_info(&self) -> Result<Option<XenPhysInfo>, XenInfoError>;
}

/// A fixed answer, for tests and for callers that already hold the facts.
#[derive(Debug, Clone)]
pub struct FixedXenPhysInfo(pub XenPhysInfo);

impl XenPhysInfoSource for FixedXenPhysInfo {
    fn phys_info(&self) -> Result<Option<XenPhysInfo>, XenInfoError> {
        Ok(Some(self.0.clone()))
    }
}

/// Parses the output of `xl info` (format in the module docs).
pub fn parse_xl_info(text: &str) -> Result<XenPhysInfo, XenInfoError> {
    let field = |key: &str| {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
    };
    let nr_cpus = field("nr_cpus")
        .and_then(|v| v.parse().ok())
        .ok_or(XenInfoError::Parse { field: "nr_cpus" })?;
    let total_memory_mib =
        field("total_memory")
            .and_then(|v| v.parse().ok())
            .ok_or(XenInfoError::Parse {
                field: "total_memory",
            })?;
    let caps = field("virt_caps").ok_or(XenInfoError::Parse { field: "virt_caps" })?;
    let has = |cap: &str| caps.split_whitespace().any(|c| c == cap);
    Ok(XenPhysInfo {
        hvm: has("hvm"),
        hap: has("hap"),
        iommu: caps.split_whitespace().any(|c| c.ends_with("_directio")),
        nr_cpus,
        total_memory_mib,
        xen_cmdline: field("xen_commandline").filter(|c| !c.is_empty()),
    })
}

/// Asks `xl info` (the Xen toolstack; xenstored must be running).
#[derive(Debug, Clone)]
pub struct XlInfoSource {
    program: std::path::PathBuf,
}

impl XlInfoSource {
    /// Runs `program info` (`xl` from `PATH`, or a path).
    pub fn new(program: impl Into<std::path::PathBuf>) -> XlInfoSource {
        XlInfoSource {
            program: program.into(),
        }
    }
}

impl XenPhysInfoSource for XlInfoSource {
    fn phys_info(&self) -> Result<Option<XenPhysInfo>, XenInfoError> {
        let program = self.program.display().to_string();
        let output = std::process::Command::new(&self.program)
            .arg("info")
            .output()
            .map_err(|source| XenInfoError::Spawn {
                program: program.clone(),
                source,
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(XenInfoError::Command {
                program,
                status: output.status,
                stderr: stderr.lines().last().unwrap_or_default().trim().to_owned(),
            });
        }
        parse_xl_info(&String::from_utf8_lossy(&output.stdout)).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/xl-info")
            .join(name);
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn xl_info_of_xen_4_17_under_qemu() {
        // Recorded in a PV dom0 of Xen 4.17.7 under QEMU TCG (hw/scripts/hw-check-in-xen-dom0.sh).
        let info = parse_xl_info(&fixture("qemu-tcg-xen-4.17.7.txt")).unwrap();
        assert_eq!(
            info,
            XenPhysInfo {
                hvm: true,
                hap: true,
                iommu: false,
                nr_cpus: 1,
                total_memory_mib: 2047,
                xen_cmdline: Some(
                    "console=com1 com1=115200,8n1 dom0_mem=512M,max:512M dom0_max_vcpus=1 bootscrub=0"
                        .into()
                ),
            }
        );
    }

    #[test]
    fn xl_info_with_an_iommu() {
        let info = parse_xl_info(&fixture("intel-production.txt")).unwrap();
        assert!(info.hvm && info.hap && info.iommu);
        assert_eq!((info.nr_cpus, info.total_memory_mib), (64, 262_034));
    }

    #[test]
    fn xl_info_missing_fields_are_named() {
        let text = fixture("intel-production.txt").replace("virt_caps", "virt_capz");
        assert_eq!(
            parse_xl_info(&text).unwrap_err().to_string(),
            "`xl info` output has no valid virt_caps"
        );
        assert!(matches!(
            parse_xl_info("nr_cpus : many\n"),
            Err(XenInfoError::Parse { field: "nr_cpus" })
        ));
    }

    #[test]
    fn a_missing_xl_is_a_spawn_error() {
        let err = XlInfoSource::new("/nonexistent/xl")
            .phys_info()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("cannot run /nonexistent/xl"),
            "{err}"
        );
    }
}
