//! A measurement, not a product path: what the lower bound of "copy a paused template"
//! costs for a Mayfly PV guest, so that ADR 0005 rests on numbers (issue 21, item 3). The
//! agent never calls this; `xen-ring-peer clone-cost` does, in the Xen-in-QEMU suite.
//!
//! ```text
//!  Template::inspect(control, fmem, domid)   the paused template, read through dom0
//!    xc_vcpu_getcontext   CR3 -> the L4's machine frame
//!    walk L4 (guest slots, not Xen's 256..=271) -> L3 -> L2 -> L1: every page-table page,
//!                         every present entry, each leaf's machine frame by virtual address
//!    the start_info page  found among the leaves by its magic "xen-"..."-x86_64";
//!                         nr_pages, pt_base, nr_pt_frames, mfn_list (the p2m's address)
//!    the p2m              read through the walk: every page's machine frame, in pfn order
//!  copy_once(builder, control, fmem, template, tag)   one clone, lower bound:
//!    create      xc_domain_create (the builder's configuration), 1 vCPU, max memory
//!    populate    xc_domain_populate_physmap_exact, nr_pages order-0 extents (a PV domain
//!                gets each page's machine frame back: the new p2m)
//!    map         both domains' pages, one xenforeignmemory_map batch each
//!    copy        every page, template -> clone
//!    unmap       both mappings
//!    destroy     xc_domain_destroy (timed apart: not part of the clone)
//! ```
//!
//! What a real clone would add and this does not do: rewrite every entry that holds a
//! machine frame (page-table entries, the p2m, start_info's frame fields, CR3 and the GDT
//! frames in the vCPU context), pin the page tables, set the vCPU context, seed the grant
//! table, and redo the guest's own bindings. [`Template`] counts the first two.

use std::io;
use std::time::{Duration, Instant};

use mayfly_xen_sys::soname;
use mayfly_xen_sys::types::{vcpu_guest_context_any_t, xen_pfn_t, xenforeignmemory_handle};
use mayfly_xen_sys::xenforeignmemory::XenForeignMemory;

use crate::ctrl::{Control, CtrlError};
use crate::libs::{sym, LoadError};
use crate::pvbuild::PvBuilder;
use crate::DomId;

const PAGE: usize = 4096;
/// Present bit of a page-table entry.
const PTE_PRESENT: u64 = 1;
/// PSE: a large page (not used by PV guests; counted and not followed).
const PTE_PSE: u64 = 1 << 7;
/// The machine-frame bits of a page-table entry (bits 12..52).
const PTE_FRAME: u64 = 0x000f_ffff_ffff_f000;
/// The L4 slots Xen reserves in every 64-bit PV guest's top level (its own mappings).
const XEN_L4_SLOTS: std::ops::RangeInclusive<usize> = 256..=271;
/// The most pages a template may have (the builder's memory limit).
const MAX_PAGES: u64 = crate::pvbuild::MAX_MEMORY_MIB as u64 * 256;
/// The most page-table pages the walk follows (a 64 MiB guest needs about 40).
const MAX_PT_PAGES: usize = 1024;

/// Measuring the copy path failed.
#[derive(Debug, thiserror::Error)]
pub enum CloneCostError {
    /// A function could not be resolved.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// libxenforeignmemory is missing.
    #[error("cannot load {}", soname::XENFOREIGNMEMORY)]
    Missing(#[source] libloading::Error),
    /// A control call failed.
    #[error(transparent)]
    Ctrl(#[from] CtrlError),
    /// Creating the clone's domain failed.
    #[error(transparent)]
    Build(#[from] crate::pvbuild::BuildError),
    /// A libxenctrl/libxenforeignmemory call failed.
    #[error("{call} failed (domain {domid})")]
    Call {
        /// The function.
        call: &'static str,
        /// The domain.
        domid: DomId,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// The template's memory does not look like a Mayfly PV guest's.
    #[error("template domain {domid}: {what}")]
    Template {
        /// The domain.
        domid: DomId,
        /// What is wrong.
        what: String,
    },
}

/// An open libxenforeignmemory handle: maps other domains' pages into dom0.
pub struct ForeignMemory {
    lib: XenForeignMemory,
    handle: *mut xenforeignmemory_handle,
}

impl std::fmt::Debug for ForeignMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignMemory").finish_non_exhaustive()
    }
}

impl ForeignMemory {
    /// Loads libxenforeignmemory and opens a handle.
    pub fn open() -> Result<Self, CloneCostError> {
        // SAFETY: as for the other Xen libraries (libs.rs): loading runs no initialiser
        // with preconditions; the functions are called only below, as declared.
        let lib = unsafe { XenForeignMemory::new(soname::XENFOREIGNMEMORY) }
            .map_err(CloneCostError::Missing)?;
        let x = soname::XENFOREIGNMEMORY;
        sym!(lib, x, xenforeignmemory_open)?;
        sym!(lib, x, xenforeignmemory_close)?;
        sym!(lib, x, xenforeignmemory_map)?;
        sym!(lib, x, xenforeignmemory_unmap)?;
        let open = sym!(lib, x, xenforeignmemory_open)?;
        // SAFETY: no logger (the library's default), no flags.
        let handle = unsafe { open(std::ptr::null_mut(), 0) };
        if handle.is_null() {
            return Err(CloneCostError::Call {
                call: "xenforeignmemory_open",
                domid: 0,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { lib, handle })
    }

    /// Maps `frames` of `domid` (machine frames: the domain is PV) contiguously,
    /// read-only or writable.
    pub fn map(
        &self,
        domid: DomId,
        frames: &[u64],
        writable: bool,
    ) -> Result<Mapping<'_>, CloneCostError> {
        let map = sym!(self.lib, soname::XENFOREIGNMEMORY, xenforeignmemory_map)?;
        let fail = |source| CloneCostError::Call {
            call: "xenforeignmemory_map",
            domid,
            source,
        };
        if frames.is_empty() {
            return Err(fail(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let arr: Vec<xen_pfn_t> = frames.to_vec();
        let mut errs = vec![0i32; frames.len()];
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a live handle; `arr` and `errs` hold `frames.len()` elements each and
        // outlive the call (the library does not keep them).
        let addr = unsafe {
            map(
                self.handle,
                domid,
                prot,
                arr.len() as u64,
                arr.as_ptr(),
                errs.as_mut_ptr(),
            )
        };
        if addr.is_null() {
            return Err(fail(io::Error::last_os_error()));
        }
        let mapping = Mapping {
            fmem: self,
            addr: addr.cast(),
            pages: frames.len(),
        };
        if let Some(e) = errs.iter().find(|e| **e != 0) {
            // Dropping `mapping` unmaps the whole range.
            return Err(fail(io::Error::from_raw_os_error(e.saturating_abs())));
        }
        Ok(mapping)
    }
}

impl Drop for ForeignMemory {
    fn drop(&mut self) {
        if let Ok(close) = sym!(self.lib, soname::XENFOREIGNMEMORY, xenforeignmemory_close) {
            // SAFETY: the handle came from xenforeignmemory_open and is closed once; every
            // Mapping borrows self, so none is left.
            unsafe { close(self.handle) };
        }
    }
}

/// Pages of another domain mapped into dom0; unmapped on drop.
pub struct Mapping<'a> {
    fmem: &'a ForeignMemory,
    addr: *mut u8,
    pages: usize,
}

impl Mapping<'_> {
    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `addr` is a live mapping of `pages` pages (unmapped only on drop); the
        // other domain may write its pages meanwhile (a paused template does not), which
        // can change values but not make the memory invalid for reads of `u8`.
        unsafe { std::slice::from_raw_parts(self.addr, self.pages * PAGE) }
    }

    /// The mapped bytes, writable (a mapping made with `writable`; read-only pages fault).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only slice over the mapping.
        unsafe { std::slice::from_raw_parts_mut(self.addr, self.pages * PAGE) }
    }

    /// The little-endian u64 at byte `off`, if inside.
    fn u64_at(&self, off: usize) -> Option<u64> {
        let b = self.bytes().get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

impl Drop for Mapping<'_> {
    fn drop(&mut self) {
        if let Ok(unmap) = sym!(
            self.fmem.lib,
            soname::XENFOREIGNMEMORY,
            xenforeignmemory_unmap
        ) {
            // SAFETY: `addr`/`pages` are exactly what xenforeignmemory_map returned on this
            // handle; no slice into it outlives `self`.
            unsafe { unmap(self.fmem.handle, self.addr.cast(), self.pages as u64) };
        }
    }
}

/// What a clone of the template would copy and rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template's domid.
    pub domid: DomId,
    /// Its pages' machine frames, in pfn order (its p2m).
    pub frames: Vec<u64>,
    /// `start_info.nr_pt_frames`: the boot page tables.
    pub nr_pt_frames: u64,
    /// Page-table pages reachable from CR3 now (the L4, and every L3, L2, L1 below the
    /// guest's slots).
    pub pt_pages: usize,
    /// Present entries in those pages that name one of the template's frames: each must
    /// be rewritten for a clone.
    pub pt_entries_own: usize,
    /// Present entries naming a frame the template does not own (grant-mapped ring
    /// pages, shared info): the clone's guest would have to map its own again.
    pub pt_entries_foreign: usize,
}

impl Template {
    /// Reads the paused template `domid`'s page tables, start_info and p2m.
    pub fn inspect(
        control: &Control,
        fmem: &ForeignMemory,
        domid: DomId,
    ) -> Result<Self, CloneCostError> {
        let bad = |what: String| CloneCostError::Template { domid, what };
        let tot_pages = control
            .info(domid)?
            .ok_or_else(|| bad("no such domain".into()))?
            .tot_pages;
        let cr3 = control.with_handle(|xch| vcpu0_cr3(control, xch, domid))?;
        let mut walk = Walk::default();
        let mut read = |mfn: u64| -> Result<Vec<u64>, CloneCostError> {
            let map = fmem.map(domid, &[mfn], false)?;
            Ok((0..512).map(|i| map.u64_at(i * 8).unwrap_or(0)).collect())
        };
        walk.table(&mut read, domid, cr3 >> 12, 4, 0)?;
        // The boot image is mapped at virtual address pfn * 4096 (VIRT_BASE 0).
        let own: std::collections::BTreeMap<u64, u64> = walk
            .leaves
            .iter()
            .filter(|(va, _)| va / (PAGE as u64) < tot_pages.min(MAX_PAGES))
            .map(|&(va, mfn)| (va, mfn))
            .collect();
        // Virtual page -> its index in the mapping below.
        let index: std::collections::BTreeMap<u64, usize> =
            own.keys().enumerate().map(|(i, va)| (*va, i)).collect();
        let lowmem: Vec<u64> = own.values().copied().collect();
        if lowmem.is_empty() {
            return Err(bad("no page mapped below its memory size".into()));
        }
        let low = fmem.map(domid, &lowmem, false)?;
        let si = (0..lowmem.len())
            .map(|i| i * PAGE)
            .find(|&off| {
                let m = low.bytes().get(off..off + 32).unwrap_or(&[]);
                m.starts_with(b"xen-") && m.windows(7).any(|w| w == b"-x86_64")
            })
            .ok_or_else(|| bad("no start_info page among its mapped pages".into()))?;
        let field = |o: usize| low.u64_at(si + o).unwrap_or(0);
        let (nr_pages, nr_pt_frames, mfn_list) = (field(32), field(96), field(104));
        if mfn_list % 8 != 0 {
            return Err(bad(format!(
                "start_info.mfn_list {mfn_list:#x} is not aligned"
            )));
        }
        if nr_pages == 0 || nr_pages > tot_pages || nr_pages > MAX_PAGES {
            return Err(bad(format!(
                "start_info.nr_pages {nr_pages} (domain has {tot_pages})"
            )));
        }
        let frames = p2m_frames(&low, &index, mfn_list, nr_pages, domid)?;
        let owned: std::collections::BTreeSet<u64> = frames.iter().copied().collect();
        let (pt_entries_own, pt_entries_foreign) =
            walk.entries.iter().fold((0, 0), |(o, f), mfn| {
                if owned.contains(mfn) {
                    (o + 1, f)
                } else {
                    (o, f + 1)
                }
            });
        Ok(Self {
            domid,
            frames,
            nr_pt_frames,
            pt_pages: walk.pages,
            pt_entries_own,
            pt_entries_foreign,
        })
    }
}

/// The template's p2m (`nr_pages` machine frame numbers from `mfn_list`), read through
/// `low`, the mapping of its own pages (`index`: virtual page -> index in `low`).
fn p2m_frames(
    low: &Mapping<'_>,
    index: &std::collections::BTreeMap<u64, usize>,
    mfn_list: u64,
    nr_pages: u64,
    domid: DomId,
) -> Result<Vec<u64>, CloneCostError> {
    let bad = |what: String| CloneCostError::Template { domid, what };
    (0..nr_pages)
        .map(|pfn| {
            let va = mfn_list.saturating_add(pfn * 8);
            let page = va & !(PAGE as u64 - 1);
            let idx = *index
                .get(&page)
                .ok_or_else(|| bad(format!("p2m address {va:#x} not mapped")))?;
            let within = usize::try_from(va - page).unwrap_or(PAGE);
            low.u64_at(idx * PAGE + within)
                .ok_or_else(|| bad(format!("p2m entry at {va:#x} straddles a page")))
        })
        .collect()
}

/// CR3 of vCPU 0 (a 64-bit PV guest's: the L4's machine address).
fn vcpu0_cr3(
    control: &Control,
    xch: *mut mayfly_xen_sys::types::xc_interface,
    domid: DomId,
) -> Result<u64, CloneCostError> {
    let get = sym!(control.libs().ctrl, soname::XENCTRL, xc_vcpu_getcontext)?;
    // SAFETY: plain old data; all zeroes is a valid value to be overwritten.
    let mut ctxt: vcpu_guest_context_any_t = unsafe { std::mem::zeroed() };
    // SAFETY: a live handle whose lock our caller holds; a writable context alive for the
    // call.
    if unsafe { get(xch, domid, 0, &mut ctxt) } < 0 {
        return Err(CloneCostError::Call {
            call: "xc_vcpu_getcontext",
            domid,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the domain is a 64-bit PV guest (the builder makes no other), so the x64
    // member is the one Xen filled; every member is plain old data anyway.
    Ok(unsafe { ctxt.x64.ctrlreg[3] })
}

/// The page-table walk's findings.
#[derive(Default)]
struct Walk {
    pages: usize,
    /// The frame of every present entry (tables and leaves).
    entries: Vec<u64>,
    /// (virtual address, machine frame) of every present L1 entry.
    leaves: Vec<(u64, u64)>,
}

impl Walk {
    /// Reads the table in frame `mfn` at `level` (4 = L4) covering addresses from `base`;
    /// `read` returns a frame's 512 entries.
    fn table(
        &mut self,
        read: &mut impl FnMut(u64) -> Result<Vec<u64>, CloneCostError>,
        domid: DomId,
        mfn: u64,
        level: u32,
        base: u64,
    ) -> Result<(), CloneCostError> {
        self.pages += 1;
        if self.pages > MAX_PT_PAGES {
            return Err(CloneCostError::Template {
                domid,
                what: format!("more than {MAX_PT_PAGES} page-table pages"),
            });
        }
        let entries = read(mfn)?;
        let shift = 12 + 9 * (level - 1);
        for (i, pte) in entries.into_iter().enumerate() {
            if pte & PTE_PRESENT == 0 || (level == 4 && XEN_L4_SLOTS.contains(&i)) {
                continue;
            }
            let frame = (pte & PTE_FRAME) >> 12;
            let mut va = base | ((i as u64) << shift);
            if level == 4 && i >= 256 {
                va |= 0xffff_0000_0000_0000; // canonical upper half
            }
            self.entries.push(frame);
            if level == 1 {
                self.leaves.push((va, frame));
            } else if pte & PTE_PSE == 0 {
                self.table(read, domid, frame, level - 1, va)?;
            }
        }
        Ok(())
    }
}

/// Times of one lower-bound clone ([`COPY_STEPS`] names them).
pub type CopySteps = [Duration; COPY_STEPS.len()];

/// The steps [`copy_once`] times, in order.
pub const COPY_STEPS: [&str; 6] = ["create", "populate", "map", "copy", "unmap", "destroy"];

/// One lower-bound clone of `template`: a fresh domain (the builder's configuration,
/// tagged `tag`) populated with as many pages, both mapped, every page copied, unmapped,
/// destroyed. The domain is destroyed on every path.
pub fn copy_once(
    builder: &PvBuilder,
    control: &Control,
    fmem: &ForeignMemory,
    template: &Template,
    tag: [u8; 8],
) -> Result<CopySteps, CloneCostError> {
    let mut steps = [Duration::ZERO; COPY_STEPS.len()];
    let mut last = Instant::now();
    let mut lap = |i: usize| {
        let now = Instant::now();
        if let Some(s) = steps.get_mut(i) {
            *s = now.saturating_duration_since(last);
        }
        last = now;
    };
    let domid = control.with_handle(|xch| builder.create_empty(control, xch, tag))?;
    let result = (|| {
        lap(0);
        let mut frames: Vec<xen_pfn_t> = (0..template.frames.len() as u64).collect();
        let populate = sym!(
            control.libs().ctrl,
            soname::XENCTRL,
            xc_domain_populate_physmap_exact
        )?;
        // SAFETY: a live handle (its lock held); `frames` holds one pfn per extent and
        // is written back with each page's machine frame (a PV domain).
        let rc = control.with_handle(|xch| unsafe {
            populate(xch, domid, frames.len() as _, 0, 0, frames.as_mut_ptr())
        });
        if rc < 0 {
            return Err(CloneCostError::Call {
                call: "xc_domain_populate_physmap_exact",
                domid,
                source: io::Error::last_os_error(),
            });
        }
        lap(1);
        let from = fmem.map(template.domid, &template.frames, false)?;
        let mut to = fmem.map(domid, &frames, true)?;
        lap(2);
        to.bytes_mut().copy_from_slice(from.bytes());
        lap(3);
        drop((from, to));
        lap(4);
        Ok(())
    })();
    let destroyed = control.destroy(domid);
    lap(5);
    result?;
    destroyed?;
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit PV guest's tables in miniature: L4 (frame 10) slot 0 -> L3 (11) slot 0 ->
    /// L2 (12) slot 1 -> L1 (13) with pages at slots 0, 1 and 5; a Xen slot (256) and a
    /// large page in the L2 (slot 2) that must not be followed.
    fn tables() -> std::collections::BTreeMap<u64, Vec<u64>> {
        let entry = |frame: u64, flags: u64| (frame << 12) | flags;
        let mut t = std::collections::BTreeMap::new();
        let mut l4 = vec![0u64; 512];
        l4[0] = entry(11, 0x67);
        l4[256] = entry(999, 0x63); // Xen's: not walked, not counted
        let mut l3 = vec![0u64; 512];
        l3[0] = entry(12, 0x67);
        let mut l2 = vec![0u64; 512];
        l2[1] = entry(13, 0x67);
        l2[2] = entry(14, 0x67 | PTE_PSE);
        let mut l1 = vec![0u64; 512];
        l1[0] = entry(100, 0x67);
        l1[1] = entry(101, 0x67);
        l1[2] = entry(102, 0x66); // not present
        l1[5] = entry(105, 0x65) | (1 << 63); // NX does not leak into the frame
        t.insert(10, l4);
        t.insert(11, l3);
        t.insert(12, l2);
        t.insert(13, l1);
        t
    }

    #[test]
    fn the_walk_counts_tables_entries_and_leaves_by_address() {
        let t = tables();
        let mut read = |mfn: u64| {
            t.get(&mfn).cloned().ok_or(CloneCostError::Template {
                domid: 1,
                what: format!("frame {mfn} read"),
            })
        };
        let mut walk = Walk::default();
        walk.table(&mut read, 1, 10, 4, 0).unwrap();
        assert_eq!(walk.pages, 4, "L4, L3, L2, L1");
        assert_eq!(walk.entries, vec![11, 12, 13, 100, 101, 105, 14]);
        let l2 = 1u64 << 21;
        assert_eq!(
            walk.leaves,
            vec![(l2, 100), (l2 + 4096, 101), (l2 + 5 * 4096, 105)]
        );
    }

    #[test]
    fn the_walk_is_bounded_against_a_table_that_names_itself() {
        let mut l4 = vec![0u64; 512];
        l4[0] = (10 << 12) | 0x67; // the L4 as its own L3, L2, L1: a loop in a hostile guest
        let mut read = |_mfn: u64| Ok(l4.clone());
        let mut walk = Walk::default();
        walk.table(&mut read, 1, 10, 4, 0).unwrap();
        assert_eq!(walk.pages, 4, "levels bound the depth");
        let mut all = vec![0u64; 512];
        for (i, e) in all.iter_mut().enumerate().take(255) {
            *e = ((i as u64 + 20) << 12) | 0x67;
        }
        let mut read = |_mfn: u64| Ok(all.clone());
        let err = Walk::default().table(&mut read, 1, 10, 4, 0).unwrap_err();
        assert!(err.to_string().contains("page-table pages"), "{err}");
    }
}
