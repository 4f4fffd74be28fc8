//! Domain control through libxenctrl: the hypervisor's version, domain state, pause,
//! unpause, destroy.
//!
//! [`Control::open`] refuses a hypervisor other than Xen 4.17 (the bindings and the
//! domctl layouts are that release's). A domain's state comes from
//! `xc_domain_getinfolist`'s `flags` word (`public/domctl.h`):
//!
//! ```text
//!  bit 0  dying       bit 1  hvm        bit 2  shutdown   bit 3  paused
//!  bit 4  blocked     bit 5  running    bit 6  debugged   bit 7  xs_domain
//!  bit 8  hap         bits 16..23  shutdown reason (SHUTDOWN_poweroff 0, reboot 1,
//!                                  suspend 2, crash 3, watchdog 4, soft_reset 5)
//! ```

use std::io;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use mayfly_xen_sys::soname;
use mayfly_xen_sys::types::{
    xc_domaininfo_t, xc_interface, xc_physinfo_t, SHUTDOWN_crash, SHUTDOWN_poweroff,
    SHUTDOWN_reboot, SHUTDOWN_soft_reset, SHUTDOWN_suspend, SHUTDOWN_watchdog, XENVER_commandline,
    XENVER_version, XEN_DOMINF_dying, XEN_DOMINF_paused, XEN_DOMINF_shutdown,
    XEN_DOMINF_shutdownmask, XEN_DOMINF_shutdownshift, XEN_SYSCTL_PHYSCAP_directio,
    XEN_SYSCTL_PHYSCAP_hap, XEN_SYSCTL_PHYSCAP_hvm, XEN_SYSCTL_PHYSCAP_pv,
};

use crate::libs::{sym, Libraries, LoadError};
use crate::{DomId, DOMID_FIRST_RESERVED};

/// The hypervisor release this crate supports.
pub const SUPPORTED_XEN: (u32, u32) = mayfly_xen_sys::XEN_RELEASE;

/// Domains fetched per `xc_domain_getinfolist` call when listing.
const LIST_BATCH: u32 = 64;

/// A libxenctrl operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    /// A function could not be resolved.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `xc_interface_open` failed: not dom0, or `/dev/xen/privcmd` missing.
    #[error("xc_interface_open failed (is this Xen's dom0, with xen-privcmd loaded?)")]
    Open(#[source] io::Error),
    /// The hypervisor is not the supported release.
    #[error("the hypervisor is Xen {}.{}; this agent supports Xen {}.{} only", .found.0, .found.1, SUPPORTED_XEN.0, SUPPORTED_XEN.1)]
    Version {
        /// Major and minor found.
        found: (u32, u32),
    },
    /// A call about one domain failed.
    #[error("{call}(domain {domid}) failed")]
    Domain {
        /// The libxenctrl function.
        call: &'static str,
        /// The domain.
        domid: DomId,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// A call not about one domain failed.
    #[error("{call} failed")]
    Call {
        /// The libxenctrl function.
        call: &'static str,
        /// errno.
        #[source]
        source: io::Error,
    },
}

/// Why a domain shut down (`SHUTDOWN_*` in `public/sched.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// The guest powered off: a domu-shim's normal end.
    Poweroff,
    /// The guest asked to reboot.
    Reboot,
    /// The guest suspended.
    Suspend,
    /// The guest crashed (kernel panic, triple fault).
    Crash,
    /// The watchdog fired.
    Watchdog,
    /// Soft reset.
    SoftReset,
    /// A reason this crate does not know.
    Other(u32),
}

impl ShutdownReason {
    #[allow(non_upper_case_globals)] // Xen's constant names
    fn from_code(code: u32) -> Self {
        match code {
            SHUTDOWN_poweroff => Self::Poweroff,
            SHUTDOWN_reboot => Self::Reboot,
            SHUTDOWN_suspend => Self::Suspend,
            SHUTDOWN_crash => Self::Crash,
            SHUTDOWN_watchdog => Self::Watchdog,
            SHUTDOWN_soft_reset => Self::SoftReset,
            other => Self::Other(other),
        }
    }
}

/// A domain's state, as far as the agent cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// Runnable (running or blocked).
    Running,
    /// Paused by the toolstack.
    Paused,
    /// Shut down (not yet destroyed): it can no longer run.
    Shutdown(ShutdownReason),
    /// Being destroyed: it can no longer run.
    Dying,
}

impl DomainState {
    /// The state a `getdomaininfo` `flags` word describes.
    pub fn from_flags(flags: u32) -> Self {
        if flags & XEN_DOMINF_dying != 0 {
            Self::Dying
        } else if flags & XEN_DOMINF_shutdown != 0 {
            let code = (flags >> XEN_DOMINF_shutdownshift) & XEN_DOMINF_shutdownmask;
            Self::Shutdown(ShutdownReason::from_code(code))
        } else if flags & XEN_DOMINF_paused != 0 {
            Self::Paused
        } else {
            Self::Running
        }
    }

    /// Whether the domain can run again (not shut down, not dying).
    pub fn is_alive(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// What `xc_domain_getinfolist` says about one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainInfo {
    /// Domain id.
    pub domid: DomId,
    /// State.
    pub state: DomainState,
    /// Its UUID (`xen_domain_handle_t`).
    pub uuid: [u8; 16],
    /// CPU time used, in nanoseconds.
    pub cpu_time_ns: u64,
    /// Pages allocated.
    pub tot_pages: u64,
}

impl DomainInfo {
    fn from_raw(raw: &xc_domaininfo_t) -> Self {
        Self {
            domid: u32::from(raw.domain),
            state: DomainState::from_flags(raw.flags),
            uuid: raw.handle,
            cpu_time_ns: raw.cpu_time,
            tot_pages: raw.tot_pages,
        }
    }
}

/// The host as the hypervisor sees it (`xc_physinfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysInfo {
    /// Logical CPUs.
    pub nr_cpus: u32,
    /// Threads per core.
    pub threads_per_core: u32,
    /// Cores per socket.
    pub cores_per_socket: u32,
    /// CPU frequency, kHz.
    pub cpu_khz: u32,
    /// Memory, 4 KiB pages.
    pub total_pages: u64,
    /// Free memory, 4 KiB pages.
    pub free_pages: u64,
    /// HVM guests possible.
    pub hvm: bool,
    /// PV guests possible.
    pub pv: bool,
    /// Hardware-assisted paging (EPT/NPT).
    pub hap: bool,
    /// An IOMMU for device pass-through (`XEN_SYSCTL_PHYSCAP_directio`).
    pub iommu: bool,
}

impl PhysInfo {
    fn from_raw(raw: &xc_physinfo_t) -> Self {
        let cap = |bit: u32| raw.capabilities & bit != 0;
        Self {
            nr_cpus: raw.nr_cpus,
            threads_per_core: raw.threads_per_core,
            cores_per_socket: raw.cores_per_socket,
            cpu_khz: raw.cpu_khz,
            total_pages: raw.total_pages,
            free_pages: raw.free_pages,
            hvm: cap(XEN_SYSCTL_PHYSCAP_hvm),
            pv: cap(XEN_SYSCTL_PHYSCAP_pv),
            hap: cap(XEN_SYSCTL_PHYSCAP_hap),
            iommu: cap(XEN_SYSCTL_PHYSCAP_directio),
        }
    }

    /// Memory in MiB.
    pub fn total_memory_mib(&self) -> u64 {
        self.total_pages / 256
    }
}

/// Xen's command line from the `XENVER_commandline` buffer: up to the first NUL, lossy.
fn cmdline_from(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(buf.get(..end).unwrap_or_default()).into_owned()
}

struct Handle(NonNull<xc_interface>);

// SAFETY: an `xc_interface` is a heap object with its own fds; it may be used from any
// thread, one call at a time, which the `Mutex` around it guarantees.
unsafe impl Send for Handle {}

/// An open libxenctrl interface to a Xen 4.17 hypervisor. Calls are serialised.
pub struct Control {
    libs: Arc<Libraries>,
    xch: Mutex<Handle>,
    version: (u32, u32),
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The errno of the call that just failed.
fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl Control {
    /// Opens libxenctrl and checks that the hypervisor is Xen 4.17.
    pub fn open(libs: Arc<Libraries>) -> Result<Self, CtrlError> {
        let open = sym!(libs.ctrl, soname::XENCTRL, xc_interface_open)?;
        // SAFETY: null loggers select libxenctrl's default (stderr) logger; flags 0.
        let raw = unsafe { open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        let handle = NonNull::new(raw).ok_or_else(|| CtrlError::Open(errno()))?;
        let mut control = Self {
            libs,
            xch: Mutex::new(Handle(handle)),
            version: (0, 0),
        };
        let version = control.query_version()?;
        if version != SUPPORTED_XEN {
            return Err(CtrlError::Version { found: version });
        }
        control.version = version;
        Ok(control)
    }

    fn lock(&self) -> MutexGuard<'_, Handle> {
        mayfly_sync::lock(&self.xch)
    }

    fn query_version(&self) -> Result<(u32, u32), CtrlError> {
        let version = sym!(self.libs.ctrl, soname::XENCTRL, xc_version)?;
        let xch = self.lock();
        // SAFETY: a live handle; XENVER_version takes no argument buffer (NULL) and returns
        // (major << 16) | minor.
        let v = unsafe {
            version(
                xch.0.as_ptr(),
                i32::try_from(XENVER_version).unwrap_or(0),
                std::ptr::null_mut(),
            )
        };
        if v < 0 {
            return Err(CtrlError::Call {
                call: "xc_version(XENVER_version)",
                source: errno(),
            });
        }
        let v = v.unsigned_abs();
        Ok((v >> 16, v & 0xFFFF))
    }

    /// The hypervisor's version (major, minor).
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    /// The host's CPUs, memory and virtualisation capabilities (`xc_physinfo`).
    pub fn physinfo(&self) -> Result<PhysInfo, CtrlError> {
        let physinfo = sym!(self.libs.ctrl, soname::XENCTRL, xc_physinfo)?;
        // SAFETY: xc_physinfo_t is plain old data: all zeroes is a valid value.
        let mut raw: xc_physinfo_t = unsafe { std::mem::zeroed() };
        let xch = self.lock();
        // SAFETY: a live handle and one writable xc_physinfo_t.
        let rc = unsafe { physinfo(xch.0.as_ptr(), &mut raw) };
        drop(xch);
        if rc < 0 {
            return Err(CtrlError::Call {
                call: "xc_physinfo",
                source: errno(),
            });
        }
        Ok(PhysInfo::from_raw(&raw))
    }

    /// Xen's own command line (`XENVER_commandline`, at most 1023 bytes).
    pub fn xen_cmdline(&self) -> Result<String, CtrlError> {
        let version = sym!(self.libs.ctrl, soname::XENCTRL, xc_version)?;
        // xen_commandline_t is char[1024].
        let mut buf = [0u8; 1024];
        let xch = self.lock();
        // SAFETY: a live handle; XENVER_commandline writes at most 1024 bytes into the
        // buffer, which has exactly that size.
        let rc = unsafe {
            version(
                xch.0.as_ptr(),
                i32::try_from(XENVER_commandline).unwrap_or(0),
                buf.as_mut_ptr().cast(),
            )
        };
        drop(xch);
        if rc < 0 {
            return Err(CtrlError::Call {
                call: "xc_version(XENVER_commandline)",
                source: errno(),
            });
        }
        Ok(cmdline_from(&buf))
    }

    /// Up to `max` domains with id `>= first`, in id order.
    fn info_list(&self, first: DomId, max: u32) -> Result<Vec<DomainInfo>, CtrlError> {
        let getinfolist = sym!(self.libs.ctrl, soname::XENCTRL, xc_domain_getinfolist)?;
        let len = usize::try_from(max).unwrap_or(0);
        // SAFETY: xc_domaininfo_t is plain old data (integers and arrays): all zeroes is
        // a valid value.
        let zero: xc_domaininfo_t = unsafe { std::mem::zeroed() };
        let mut buf: Vec<xc_domaininfo_t> = vec![zero; len];
        let xch = self.lock();
        // SAFETY: `buf` holds `max` writable entries, which bounds what the call writes.
        let n = unsafe { getinfolist(xch.0.as_ptr(), first, max, buf.as_mut_ptr()) };
        drop(xch);
        if n < 0 {
            return Err(CtrlError::Call {
                call: "xc_domain_getinfolist",
                source: errno(),
            });
        }
        let n = usize::try_from(n).unwrap_or(0).min(len);
        buf.truncate(n);
        Ok(buf.iter().map(DomainInfo::from_raw).collect())
    }

    /// The domain's info, or `None` if no such domain exists (any more).
    pub fn info(&self, domid: DomId) -> Result<Option<DomainInfo>, CtrlError> {
        let list = self.info_list(domid, 1).map_err(|e| match e {
            CtrlError::Call { call, source } => CtrlError::Domain {
                call,
                domid,
                source,
            },
            other => other,
        })?;
        Ok(list.into_iter().find(|i| i.domid == domid))
    }

    /// Every domain (dom0 included).
    pub fn list(&self) -> Result<Vec<DomainInfo>, CtrlError> {
        let mut all = Vec::new();
        let mut first = 0;
        loop {
            let batch = self.info_list(first, LIST_BATCH)?;
            let Some(last) = batch.last().map(|i| i.domid) else {
                return Ok(all);
            };
            let full = batch.len() == usize::try_from(LIST_BATCH).unwrap_or(usize::MAX);
            all.extend(batch);
            match last.checked_add(1) {
                Some(next) if full && next < DOMID_FIRST_RESERVED => first = next,
                _ => return Ok(all),
            }
        }
    }

    fn domain_call(
        &self,
        call: &'static str,
        f: unsafe extern "C" fn(*mut xc_interface, u32) -> i32,
        domid: DomId,
    ) -> Result<(), CtrlError> {
        let xch = self.lock();
        // SAFETY: a live handle and a domain id; the call takes nothing else.
        let rc = unsafe { f(xch.0.as_ptr(), domid) };
        if rc < 0 {
            return Err(CtrlError::Domain {
                call,
                domid,
                source: errno(),
            });
        }
        Ok(())
    }

    /// The loaded libraries (for the wrappers in other modules of this crate, such as
    /// [`crate::clonecost`]'s calls).
    pub(crate) fn libs(&self) -> &Libraries {
        &self.libs
    }

    /// Runs `f` with the raw libxenctrl handle, holding its lock for the whole call (the
    /// in-process domain builder, [`crate::pvbuild`]).
    pub(crate) fn with_handle<R>(&self, f: impl FnOnce(*mut xc_interface) -> R) -> R {
        let xch = self.lock();
        f(xch.0.as_ptr())
    }

    /// [`Control::destroy`] for a caller that already holds the handle's lock (inside
    /// [`Control::with_handle`]).
    pub(crate) fn destroy_locked(
        &self,
        xch: *mut xc_interface,
        domid: DomId,
    ) -> Result<(), CtrlError> {
        if domid == 0 || domid >= DOMID_FIRST_RESERVED {
            return Err(CtrlError::Domain {
                call: "xc_domain_destroy",
                domid,
                source: io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        let f = sym!(self.libs.ctrl, soname::XENCTRL, xc_domain_destroy)?;
        // SAFETY: the caller holds the lock of the live handle `xch`; a domain id.
        if unsafe { f(xch, domid) } < 0 {
            return Err(CtrlError::Domain {
                call: "xc_domain_destroy",
                domid,
                source: errno(),
            });
        }
        Ok(())
    }

    /// Pauses the domain (`xc_domain_pause`): its vCPUs stop being scheduled.
    pub fn pause(&self, domid: DomId) -> Result<(), CtrlError> {
        let f = sym!(self.libs.ctrl, soname::XENCTRL, xc_domain_pause)?;
        self.domain_call("xc_domain_pause", f, domid)
    }

    /// Unpauses the domain (`xc_domain_unpause`).
    pub fn unpause(&self, domid: DomId) -> Result<(), CtrlError> {
        let f = sym!(self.libs.ctrl, soname::XENCTRL, xc_domain_unpause)?;
        self.domain_call("xc_domain_unpause", f, domid)
    }

    /// Destroys the domain (`xc_domain_destroy`, which retries Xen's preemptible
    /// destruction until it completes). Once it returns `Ok`, the domain can no longer run.
    /// Refuses dom0 and reserved ids.
    pub fn destroy(&self, domid: DomId) -> Result<(), CtrlError> {
        if domid == 0 || domid >= DOMID_FIRST_RESERVED {
            return Err(CtrlError::Domain {
                call: "xc_domain_destroy",
                domid,
                source: io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        let f = sym!(self.libs.ctrl, soname::XENCTRL, xc_domain_destroy)?;
        self.domain_call("xc_domain_destroy", f, domid)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Ok(close) = sym!(self.libs.ctrl, soname::XENCTRL, xc_interface_close) {
            let xch = self.lock();
            // SAFETY: the handle came from xc_interface_open and is closed once, here.
            unsafe { close(xch.0.as_ptr()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physinfo_capabilities_and_cmdline_are_decoded() {
        // SAFETY: plain old data.
        let mut raw: xc_physinfo_t = unsafe { std::mem::zeroed() };
        raw.nr_cpus = 4;
        raw.total_pages = 2560 * 256;
        raw.capabilities = XEN_SYSCTL_PHYSCAP_hvm | XEN_SYSCTL_PHYSCAP_hap;
        let p = PhysInfo::from_raw(&raw);
        assert_eq!((p.nr_cpus, p.total_memory_mib()), (4, 2560));
        assert!(p.hvm && p.hap && !p.pv && !p.iommu);
        assert_eq!(
            cmdline_from(b"console=com1 dom0_mem=512M\0garbage"),
            "console=com1 dom0_mem=512M"
        );
        assert_eq!(cmdline_from(&[b'x'; 4]), "xxxx");
        assert_eq!(cmdline_from(b"\xff\0"), "\u{fffd}");
    }

    #[test]
    fn flags_map_to_states() {
        assert_eq!(DomainState::from_flags(0), DomainState::Running);
        assert_eq!(DomainState::from_flags(1 << 5), DomainState::Running);
        assert_eq!(DomainState::from_flags(1 << 3), DomainState::Paused);
        assert_eq!(
            DomainState::from_flags((1 << 2) | (3 << 16)),
            DomainState::Shutdown(ShutdownReason::Crash)
        );
        assert_eq!(
            DomainState::from_flags(1 << 2),
            DomainState::Shutdown(ShutdownReason::Poweroff)
        );
        assert_eq!(
            DomainState::from_flags((1 << 2) | (200 << 16)),
            DomainState::Shutdown(ShutdownReason::Other(200))
        );
        // Dying wins over everything else.
        assert_eq!(
            DomainState::from_flags(1 | (1 << 2) | (1 << 3)),
            DomainState::Dying
        );
        assert!(DomainState::Paused.is_alive());
        assert!(!DomainState::Dying.is_alive());
        assert!(!DomainState::Shutdown(ShutdownReason::Poweroff).is_alive());
    }
}
