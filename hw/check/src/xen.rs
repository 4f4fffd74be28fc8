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
//! [`XenPhysInfoSource`] supplies those facts; `mayfly hw-check` is built with
//! [`NoXenPhysInfo`] until the run-time-loaded libxenctrl bindings (`mayfly-xen`) land, and
//! then an implementation over `xc_physinfo`/`xc_version` is all that is needed: the checks
//! already use it when it answers.

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
}

/// Something that can ask Xen for [`XenPhysInfo`].
pub trait XenPhysInfoSource {
    /// The facts, or `Ok(None)` when this source has no way to ask (not wired in).
    fn phys_info(&self) -> Result<Option<XenPhysInfo>, XenInfoError>;
}

/// The source used until `mayfly-xen` is wired in: it never has an answer, so the checks
/// that need Xen's physical view report "unknown" and say why.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoXenPhysInfo;

impl XenPhysInfoSource for NoXenPhysInfo {
    fn phys_info(&self) -> Result<Option<XenPhysInfo>, XenInfoError> {
        Ok(None)
    }
}

/// A fixed answer, for tests and for callers that already hold the facts.
#[derive(Debug, Clone)]
pub struct FixedXenPhysInfo(pub XenPhysInfo);

impl XenPhysInfoSource for FixedXenPhysInfo {
    fn phys_info(&self) -> Result<Option<XenPhysInfo>, XenInfoError> {
        Ok(Some(self.0.clone()))
    }
}
