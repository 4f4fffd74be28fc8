//! Building Mayfly PV guests in-process with libxenguest's `xc_dom_*` builder: no `xl`, no
//! libxl, no xenstore, no per-domain devices.
//!
//! ```text
//!  PvBuilder::new(libs, kernel image, MiB)   dlopen libxenguest; the image held in memory
//!  PvBuilder::build(control, tag, boot)      one fresh domain, left paused:
//!    xc_domain_create     PV, 1 vCPU, handle = "MAYFLYPV" + tag (how the reconciler knows
//!                         it after an agent crash), small grant/maptrack/evtchn limits
//!    xc_domain_max_vcpus 1, xc_domain_setmaxmem (exactly the configured memory)
//!    xc_evtchn_alloc_unbound  the console's port (nobody reads it on this path)
//!    boot(domid)          the caller grants the ring to the new domid, binds its unbound
//!                         port and returns the boot-info block (docs/formats.md §2.6)
//!    xc_dom_allocate, kernel_mem (the image), module_mem (the boot info),
//!    boot_xen_init, parse_image, mem_init, boot_mem_init, build_image, boot_image,
//!    gnttab_init, release
//! ```
//!
//! Any failure after `xc_domain_create` destroys the half-built domain before returning.
//! The whole build holds the control handle's lock (libxenctrl handles are not meant for
//! concurrent use; a build takes milliseconds).

use std::ffi::CString;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_xen_sys::soname;
use mayfly_xen_sys::types::{
    xc_dom_image, xc_dom_image_XC_DOM_PV_CONTAINER, xen_domctl_createdomain,
};
use mayfly_xen_sys::xenguest::XenGuest;

use crate::ctrl::{Control, CtrlError};
use crate::libs::{sym, Libraries, LoadError};
use crate::DomId;

/// The first 8 bytes of every Mayfly PV guest's domain handle (`xen_domain_handle_t`).
pub const HANDLE_PREFIX: [u8; 8] = *b"MAYFLYPV";
/// The largest kernel image accepted (the guest is ~250 KB; a bound against a wrong file).
pub const MAX_KERNEL_LEN: usize = 16 * 1024 * 1024;
/// The smallest memory libxenguest's generic loader accepts for a PV guest.
pub const MIN_MEMORY_MIB: u32 = 4;
/// The largest memory this builder gives a Mayfly guest.
pub const MAX_MEMORY_MIB: u32 = 64;
/// Event-channel ports a guest may have (console, ring, a little slack): a guest that
/// tries to allocate more is refused by Xen.
const MAX_EVTCHN_PORT: u32 = 15;
/// Grant-table frames the guest may have (it grants nothing; the builder seeds two
/// entries).
const MAX_GRANT_FRAMES: i32 = 1;
/// Maptrack frames: the guest maps the ring's grants (69 by default, at most 256).
const MAX_MAPTRACK_FRAMES: i32 = 2;
/// `XEN_DOMCTL_GRANT_version(1)`: grant table v1 only.
const GRANT_OPTS_V1: u32 = 1;

/// Building a Mayfly PV guest failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// libxenguest or a function could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// libxenguest is missing.
    #[error("cannot load {}", soname::XENGUEST)]
    Missing(#[source] libloading::Error),
    /// The kernel image is not a plausible ELF file.
    #[error("kernel image of {len} bytes is not an ELF file of at most {MAX_KERNEL_LEN} bytes")]
    Image {
        /// Its length.
        len: usize,
    },
    /// The memory size is out of range.
    #[error("guest memory {mib} MiB is not in {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}")]
    Memory {
        /// The size asked for.
        mib: u32,
    },
    /// A libxenctrl/libxenguest call failed.
    #[error("{call} failed (domain {domid:?})")]
    Call {
        /// The function.
        call: &'static str,
        /// The domain, once created.
        domid: Option<DomId>,
        /// errno (libxenguest sets it on most failures).
        #[source]
        source: io::Error,
    },
    /// The caller's boot-info step failed (the domain was destroyed).
    #[error("preparing the boot info of domain {domid} failed: {reason}")]
    BootInfo {
        /// The domain.
        domid: DomId,
        /// The caller's error, as text.
        reason: String,
    },
    /// Destroying a half-built domain failed too.
    #[error("domain {domid}: {first}; destroying it failed as well: {destroy}")]
    Destroy {
        /// The domain.
        domid: DomId,
        /// The build error.
        first: Box<BuildError>,
        /// The destroy error.
        destroy: CtrlError,
    },
}

/// The domain handle a Mayfly PV guest gets: [`HANDLE_PREFIX`], then `tag`.
pub fn handle(tag: [u8; 8]) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&HANDLE_PREFIX);
    h[8..].copy_from_slice(&tag);
    h
}

/// Whether a domain handle is a Mayfly PV guest's, and if so its tag.
pub fn tag_of(handle: &[u8; 16]) -> Option<[u8; 8]> {
    let (prefix, tag) = handle.split_at(8);
    (prefix == HANDLE_PREFIX)
        .then(|| tag.try_into().ok())
        .flatten()
}

/// Builds Mayfly PV guests from a kernel image held in memory.
pub struct PvBuilder {
    guest: XenGuest,
    libs: Arc<Libraries>,
    kernel: Arc<[u8]>,
    memory_mib: u32,
}

impl std::fmt::Debug for PvBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvBuilder")
            .field("kernel_len", &self.kernel.len())
            .field("memory_mib", &self.memory_mib)
            .finish_non_exhaustive()
    }
}

/// A domain [`PvBuilder::build`] made: built, paused, never run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltDomain {
    /// Its id.
    pub domid: DomId,
    /// Its console's event channel (in the guest; unbound on dom0's side).
    pub console_port: u32,
    /// How long each step of the build took, in order ([`BUILD_STEPS`] names them).
    pub steps: [Duration; BUILD_STEPS.len()],
}

/// The steps of a build, as [`BuiltDomain::steps`] times them: `create`
/// (`xc_domain_create`, one vCPU, the memory limit, the console port), `boot_info` (the
/// caller's part: the ring's grants, its port, the boot info), `setup` (`xc_dom_allocate`
/// to `xc_dom_mem_init`: the image parsed), `populate` (`xc_dom_boot_mem_init`: the
/// domain's memory allocated by Xen), `load` (`xc_dom_build_image`: the image copied in
/// and its .bss zeroed through dom0 mappings, the boot module, the page-table and start
/// info pages reserved), `boot` (`xc_dom_boot_image`, `xc_dom_gnttab_init`: page tables,
/// start info, the vCPU's registers, the grant table seeded), `release`.
pub const BUILD_STEPS: [&str; 7] = [
    "create",
    "boot_info",
    "setup",
    "populate",
    "load",
    "boot",
    "release",
];

impl PvBuilder {
    /// Loads libxenguest and keeps `kernel` (an ELF image) in memory for every build.
    pub fn new(libs: Arc<Libraries>, kernel: Vec<u8>, memory_mib: u32) -> Result<Self, BuildError> {
        if kernel.len() > MAX_KERNEL_LEN || !kernel.starts_with(b"\x7fELF") {
            return Err(BuildError::Image { len: kernel.len() });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(BuildError::Memory { mib: memory_mib });
        }
        // SAFETY: as for the other Xen libraries (libs.rs): loading runs no initialiser
        // with preconditions, and the functions are only called below with the arguments
        // their C declarations require.
        let guest = unsafe { XenGuest::new(soname::XENGUEST) }.map_err(BuildError::Missing)?;
        let g = &guest;
        let x = soname::XENGUEST;
        sym!(g, x, xc_dom_allocate)?;
        sym!(g, x, xc_dom_release)?;
        sym!(g, x, xc_dom_kernel_mem)?;
        sym!(g, x, xc_dom_module_mem)?;
        sym!(g, x, xc_dom_boot_xen_init)?;
        sym!(g, x, xc_dom_parse_image)?;
        sym!(g, x, xc_dom_mem_init)?;
        sym!(g, x, xc_dom_boot_mem_init)?;
        sym!(g, x, xc_dom_build_image)?;
        sym!(g, x, xc_dom_boot_image)?;
        sym!(g, x, xc_dom_gnttab_init)?;
        let c = &libs.ctrl;
        let x = soname::XENCTRL;
        sym!(c, x, xc_domain_create)?;
        sym!(c, x, xc_domain_max_vcpus)?;
        sym!(c, x, xc_domain_setmaxmem)?;
        sym!(c, x, xc_evtchn_alloc_unbound)?;
        Ok(Self {
            guest,
            libs,
            kernel: kernel.into(),
            memory_mib,
        })
    }

    /// The guest's memory in MiB.
    pub fn memory_mib(&self) -> u32 {
        self.memory_mib
    }

    /// Builds one fresh domain, tagged `tag` in its handle, and leaves it paused. `boot` gets
    /// the new domid and returns the boot module (the boot info); if it fails, or anything
    /// else does, the domain is destroyed before this returns.
    pub fn build<E: std::fmt::Display>(
        &self,
        control: &Control,
        tag: [u8; 8],
        boot: impl FnOnce(DomId) -> Result<Vec<u8>, E>,
    ) -> Result<BuiltDomain, BuildError> {
        control.with_handle(|xch| {
            let mut clock = StepClock::start();
            let domid = self.create(xch, tag)?;
            let built = self.fill(xch, domid, boot, &mut clock);
            or_destroy(control, xch, domid, built)
        })
    }

    /// For the clone-cost measurement ([`crate::clonecost`]): a domain created exactly as
    /// [`PvBuilder::build`] creates one (configuration, one vCPU, the memory limit), with
    /// no memory and nothing built. If a step fails it is destroyed before this returns;
    /// otherwise the caller destroys it.
    pub(crate) fn create_empty(
        &self,
        control: &Control,
        xch: *mut mayfly_xen_sys::types::xc_interface,
        tag: [u8; 8],
    ) -> Result<DomId, BuildError> {
        let domid = self.create(xch, tag)?;
        let limited = self.limits(xch, domid);
        or_destroy(control, xch, domid, limited).map(|()| domid)
    }

    /// One vCPU and the memory limit (`build` and `create_empty`).
    fn limits(
        &self,
        xch: *mut mayfly_xen_sys::types::xc_interface,
        domid: DomId,
    ) -> Result<(), BuildError> {
        let fail = |call: &'static str| BuildError::Call {
            call,
            domid: Some(domid),
            source: io::Error::last_os_error(),
        };
        let c = &self.libs.ctrl;
        let x = soname::XENCTRL;
        let max_vcpus = sym!(c, x, xc_domain_max_vcpus)?;
        let setmaxmem = sym!(c, x, xc_domain_setmaxmem)?;
        // SAFETY: a live handle (the caller holds its lock) and the domain just created.
        if unsafe { max_vcpus(xch, domid, 1) } < 0 {
            return Err(fail("xc_domain_max_vcpus"));
        }
        // SAFETY: as above.
        if unsafe { setmaxmem(xch, domid, u64::from(self.memory_mib) * 1024) } < 0 {
            return Err(fail("xc_domain_setmaxmem"));
        }
        Ok(())
    }

    fn create(
        &self,
        xch: *mut mayfly_xen_sys::types::xc_interface,
        tag: [u8; 8],
    ) -> Result<DomId, BuildError> {
        let create = sym!(self.libs.ctrl, soname::XENCTRL, xc_domain_create)?;
        // SAFETY: plain old data; all zeroes is a valid (PV, no flags) configuration.
        let mut config: xen_domctl_createdomain = unsafe { std::mem::zeroed() };
        config.handle = handle(tag);
        config.max_vcpus = 1;
        config.max_evtchn_port = MAX_EVTCHN_PORT;
        config.max_grant_frames = MAX_GRANT_FRAMES;
        config.max_maptrack_frames = MAX_MAPTRACK_FRAMES;
        config.grant_opts = GRANT_OPTS_V1;
        let mut domid: u32 = 0;
        // SAFETY: a live handle (the caller holds its lock), a writable domid and a
        // writable configuration, both alive for the call.
        let rc = unsafe { create(xch, &mut domid, &mut config) };
        if rc < 0 {
            return Err(BuildError::Call {
                call: "xc_domain_create",
                domid: None,
                source: io::Error::last_os_error(),
            });
        }
        Ok(domid)
    }

    fn fill<E: std::fmt::Display>(
        &self,
        xch: *mut mayfly_xen_sys::types::xc_interface,
        domid: DomId,
        boot: impl FnOnce(DomId) -> Result<Vec<u8>, E>,
        clock: &mut StepClock,
    ) -> Result<BuiltDomain, BuildError> {
        let fail = |call: &'static str| BuildError::Call {
            call,
            domid: Some(domid),
            source: io::Error::last_os_error(),
        };
        let alloc_unbound = sym!(self.libs.ctrl, soname::XENCTRL, xc_evtchn_alloc_unbound)?;
        self.limits(xch, domid)?;
        // SAFETY: a live handle and the domain just created; dom0 (0) is the remote end.
        let console_port = unsafe { alloc_unbound(xch, domid, 0) };
        let console_port =
            u32::try_from(console_port).map_err(|_| fail("xc_evtchn_alloc_unbound"))?;
        clock.lap(0);
        let module = boot(domid).map_err(|e| BuildError::BootInfo {
            domid,
            reason: e.to_string(),
        })?;
        clock.lap(1);
        self.run_builder(xch, domid, console_port, &module, clock)?;
        Ok(BuiltDomain {
            domid,
            console_port,
            steps: clock.steps,
        })
    }

    fn run_builder(
        &self,
        xch: *mut mayfly_xen_sys::types::xc_interface,
        domid: DomId,
        console_port: u32,
        module: &[u8],
        clock: &mut StepClock,
    ) -> Result<(), BuildError> {
        let g = &self.guest;
        let x = soname::XENGUEST;
        let allocate = sym!(g, x, xc_dom_allocate)?;
        let release = sym!(g, x, xc_dom_release)?;
        let cmdline = CString::new("mayfly").unwrap_or_default();
        // SAFETY: a live handle; the command line is a NUL-terminated string the builder
        // copies; no feature string.
        let dom = unsafe { allocate(xch, cmdline.as_ptr(), std::ptr::null()) };
        if dom.is_null() {
            return Err(BuildError::Call {
                call: "xc_dom_allocate",
                domid: Some(domid),
                source: io::Error::last_os_error(),
            });
        }
        let result = self.steps(dom, xch, domid, console_port, module, clock);
        // SAFETY: `dom` came from xc_dom_allocate and is released once, here; the kernel and
        // module buffers it points to are ours and outlive this call (it does not free them).
        unsafe { release(dom) };
        clock.lap(6);
        result
    }

    fn steps(
        &self,
        dom: *mut xc_dom_image,
        xch: *mut mayfly_xen_sys::types::xc_interface,
        domid: DomId,
        console_port: u32,
        module: &[u8],
        clock: &mut StepClock,
    ) -> Result<(), BuildError> {
        let g = &self.guest;
        let x = soname::XENGUEST;
        let check = |rc: i32, call: &'static str| {
            if rc == 0 {
                Ok(())
            } else {
                Err(BuildError::Call {
                    call,
                    domid: Some(domid),
                    source: io::Error::last_os_error(),
                })
            }
        };
        // SAFETY: for every call below, `dom` is a live xc_dom_image from xc_dom_allocate;
        // the kernel image and `module` stay alive and unchanged until xc_dom_release (the
        // builder keeps pointers to them, it does not copy or free them); `xch` is the live
        // handle whose lock our caller holds.
        unsafe {
            (*dom).container_type = xc_dom_image_XC_DOM_PV_CONTAINER;
            (*dom).console_evtchn = console_port;
            (*dom).console_domid = 0;
            (*dom).xenstore_evtchn = 0;
            (*dom).xenstore_domid = 0;
            (*dom).max_vcpus = 1;
            (*dom).flags = 0;
            check(
                sym!(g, x, xc_dom_kernel_mem)?(
                    dom,
                    self.kernel.as_ptr().cast(),
                    self.kernel.len() as u64,
                ),
                "xc_dom_kernel_mem",
            )?;
            check(
                sym!(g, x, xc_dom_module_mem)?(
                    dom,
                    module.as_ptr().cast(),
                    module.len() as u64,
                    std::ptr::null(),
                ),
                "xc_dom_module_mem",
            )?;
            check(
                sym!(g, x, xc_dom_boot_xen_init)?(dom, xch, domid),
                "xc_dom_boot_xen_init",
            )?;
            check(sym!(g, x, xc_dom_parse_image)?(dom), "xc_dom_parse_image")?;
            check(
                sym!(g, x, xc_dom_mem_init)?(dom, self.memory_mib),
                "xc_dom_mem_init",
            )?;
            clock.lap(2);
            check(
                sym!(g, x, xc_dom_boot_mem_init)?(dom),
                "xc_dom_boot_mem_init",
            )?;
            clock.lap(3);
            check(sym!(g, x, xc_dom_build_image)?(dom), "xc_dom_build_image")?;
            clock.lap(4);
            check(sym!(g, x, xc_dom_boot_image)?(dom), "xc_dom_boot_image")?;
            check(sym!(g, x, xc_dom_gnttab_init)?(dom), "xc_dom_gnttab_init")?;
            clock.lap(5);
        }
        Ok(())
    }
}

/// `result`, or if it failed, its error after destroying `domid` (the caller holds the
/// handle's lock).
fn or_destroy<T>(
    control: &Control,
    xch: *mut mayfly_xen_sys::types::xc_interface,
    domid: DomId,
    result: Result<T, BuildError>,
) -> Result<T, BuildError> {
    result.map_err(|first| match control.destroy_locked(xch, domid) {
        Ok(()) => first,
        Err(destroy) => BuildError::Destroy {
            domid,
            first: Box::new(first),
            destroy,
        },
    })
}

/// Times the steps of one build ([`BUILD_STEPS`]).
struct StepClock {
    last: Instant,
    steps: [Duration; BUILD_STEPS.len()],
}

impl StepClock {
    fn start() -> Self {
        Self {
            last: Instant::now(),
            steps: [Duration::ZERO; BUILD_STEPS.len()],
        }
    }

    /// Step `i` ended now: it took the time since the previous lap.
    fn lap(&mut self, i: usize) {
        let now = Instant::now();
        if let Some(step) = self.steps.get_mut(i) {
            *step = now.saturating_duration_since(self.last);
        }
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_carry_the_prefix_and_tag() {
        let h = handle(*b"\x00\x01\x02\x03\x04\x05\x06\x07");
        assert_eq!(&h[..8], b"MAYFLYPV");
        assert_eq!(tag_of(&h), Some(*b"\x00\x01\x02\x03\x04\x05\x06\x07"));
        let mut other = h;
        other[0] = b'N';
        assert_eq!(tag_of(&other), None);
        assert_eq!(tag_of(&[0; 16]), None);
    }
}
