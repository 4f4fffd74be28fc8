//! The domain's memory beyond its image: the free pages after the boot elements (the heap)
//! and the ring's virtual window (a page table of our own over addresses no page backs).
//!
//! Neither lives in the ELF image any more, so the domain builder copies and zeroes only the
//! real image (code, data and a small .bss) instead of 2.3 MiB, and maps fewer pages through
//! dom0 (issue 21).
//!
//! ```text
//!  va = pfn * 4096 (virtual base 0)              what
//!  0 .. _end                                     the ELF image (link.ld)
//!  .. boot module, p2m list, start_info, console/xenstore pages, page tables, boot stack
//!                                                the builder's boot elements (public/xen.h)
//!  free_start .. heap_end                        the heap: every following page the initial
//!                                                mapping maps read-write at its own pfn,
//!                                                up to nr_pages (checked entry by entry)
//!  heap_end .. heap_end + 4096                   the window's L1 page table (read-only)
//!  window .. window + 512 * 4096                 the ring window: the first 2 MiB slot past
//!                                                the mapped memory whose L2 entry is empty;
//!                                                only grant mappings ever fill it
//! ```
//!
//! Pages are not zeroed here: the heap gives no zeroing promise (`alloc_zeroed` zeroes
//! itself), and the one page-table page is zeroed before Xen validates it.

use crate::hypercall;
use crate::start_info::StartInfo;

const PAGE: usize = 4096;
/// Bytes one L1 page table maps.
const L1_SPAN: usize = 512 * PAGE;
const PRESENT: u64 = 1;
const RW: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
/// A large-page entry (no lower table): never in the builder's tables, refused here.
const PSE: u64 = 1 << 7;
/// The machine-address bits of an entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

extern "C" {
    /// End of the image (link.ld).
    static _end: u8;
}

/// The layout could not be set up: the domain crashes with this message.
#[derive(Debug)]
pub enum MemoryError {
    /// A boot element's extent overflows the address space.
    Overflow(&'static str),
    /// No free page follows the boot elements (or the first one is not mapped writable).
    NoFreePages {
        /// First page after the boot elements.
        start: usize,
        /// End of the domain's memory.
        end: usize,
    },
    /// The page table covering `va` is not reachable from `pt_base`.
    NoTable {
        /// The address looked up.
        va: usize,
    },
    /// No empty 2 MiB slot for the ring window in the L2 table covering the image.
    NoWindowSlot,
    /// The ring window asks for more pages than one L1 table maps.
    WindowTooLarge(usize),
    /// Xen refused to remap the page-table page read-only.
    Remap {
        /// The page's address.
        va: usize,
        /// Xen's return code.
        rc: i64,
    },
    /// Xen refused the new L2 entry (`mmu_update`).
    Install {
        /// Xen's return code.
        rc: i64,
    },
}

impl core::fmt::Display for MemoryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Overflow(what) => write!(f, "boot element {what} overflows"),
            Self::NoFreePages { start, end } => {
                write!(f, "no free mapped page in {start:#x}..{end:#x}")
            }
            Self::NoTable { va } => write!(f, "no page table reaches {va:#x}"),
            Self::NoWindowSlot => write!(f, "no empty 2 MiB slot for the ring window"),
            Self::WindowTooLarge(n) => write!(f, "ring window of {n} pages exceeds 512"),
            Self::Remap { va, rc } => write!(f, "remapping {va:#x} read-only failed: {rc}"),
            Self::Install { rc } => write!(f, "installing the window's page table failed: {rc}"),
        }
    }
}

/// What [`setup`] found and built.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// First heap byte (page-aligned).
    pub heap_start: usize,
    /// End of the heap (exclusive, page-aligned).
    pub heap_end: usize,
    /// Base of the ring window (2 MiB-aligned, [`crate::ring::WINDOW_PAGES`] pages).
    pub window: usize,
}

/// Finds the free pages after the boot elements, takes the last one as the ring window's
/// page table, and returns the rest as the heap.
pub fn setup(si: &StartInfo, window_pages: usize) -> Result<Layout, MemoryError> {
    if window_pages > 512 {
        return Err(MemoryError::WindowTooLarge(window_pages));
    }
    let start = free_start(si)?;
    let cap = usize::try_from(si.nr_pages)
        .ok()
        .and_then(|n| n.checked_mul(PAGE))
        .ok_or(MemoryError::Overflow("nr_pages"))?;
    let end = mapped_end(si, start, cap);
    // At least the window's table page and one heap page.
    if end < start + 2 * PAGE {
        return Err(MemoryError::NoFreePages { start, end: cap });
    }
    let table = end - PAGE;
    let window = install_window_table(si, table, end)?;
    Ok(Layout {
        heap_start: start,
        heap_end: table,
        window,
    })
}

/// The first page past every boot element the builder placed (`public/xen.h`: image, boot
/// module, p2m list, start_info, console and xenstore pages, page tables, boot stack).
fn free_start(si: &StartInfo) -> Result<usize, MemoryError> {
    let end_of =
        |base: u64, len: u64, what| base.checked_add(len).ok_or(MemoryError::Overflow(what));
    // Only the symbol's address is taken; nothing reads through it.
    let image_end = &raw const _end as u64;
    let mut end = image_end;
    end = end.max(end_of(si.module_va(), si.mod_len, "module")?);
    let p2m_len = si
        .nr_pages
        .checked_mul(8)
        .ok_or(MemoryError::Overflow("p2m"))?;
    end = end.max(end_of(si.mfn_list, p2m_len, "p2m")?);
    end = end.max(end_of(si.addr, PAGE as u64, "start_info")?);
    // The page tables, then one page of boot stack (`_start` has left it for our own).
    let pt_len = si
        .nr_pt_frames
        .checked_add(1)
        .and_then(|n| n.checked_mul(PAGE as u64))
        .ok_or(MemoryError::Overflow("page tables"))?;
    end = end.max(end_of(si.pt_base, pt_len, "page tables")?);
    for mfn in [si.console_mfn, si.store_mfn] {
        if let Some(pfn) = si.pfn_of(mfn) {
            end = end.max(end_of(pfn * PAGE as u64, PAGE as u64, "console/xenstore")?);
        }
    }
    let aligned = end
        .checked_next_multiple_of(PAGE as u64)
        .ok_or(MemoryError::Overflow("boot elements"))?;
    usize::try_from(aligned).map_err(|_| MemoryError::Overflow("boot elements"))
}

/// Entry `index` of the page table mapped at `table`.
fn entry(table: usize, index: usize) -> u64 {
    // SAFETY: `table` is a page-table page of this domain inside the initial mapping (found
    // through `table_va`, which checks the frame is ours), mapped readable; index < 512.
    unsafe { core::ptr::read_volatile((table + (index & 511) * 8) as *const u64) }
}

/// The address (va = pfn * 4096) of the table an entry points to, if it is present, not a
/// large page, and one of this domain's frames.
fn table_va(si: &StartInfo, e: u64) -> Option<usize> {
    if e & PRESENT == 0 || e & PSE != 0 {
        return None;
    }
    let pfn = si.pfn_of((e & ADDR) >> 12)?;
    usize::try_from(pfn).ok()?.checked_mul(PAGE)
}

/// The L2 table covering `va`: its address and its machine address.
fn l2_of(si: &StartInfo, va: usize) -> Option<(usize, u64)> {
    let l4 = usize::try_from(si.pt_base).ok()?;
    let l3 = table_va(si, entry(l4, va >> 39))?;
    let e = entry(l3, va >> 30);
    Some((table_va(si, e)?, e & ADDR))
}

/// The end of the run of pages from `start` that the initial mapping maps read-write, each
/// at its own pfn (va = pfn * 4096), stopping at `cap`.
fn mapped_end(si: &StartInfo, start: usize, cap: usize) -> usize {
    let mut va = start;
    let mut l1: Option<usize> = None;
    let mut l1_slot = usize::MAX;
    while va < cap {
        if va / L1_SPAN != l1_slot {
            l1_slot = va / L1_SPAN;
            l1 = l2_of(si, va).and_then(|(l2, _)| table_va(si, entry(l2, va >> 21)));
        }
        let Some(table) = l1 else { break };
        let e = entry(table, va >> 12);
        if e & (PRESENT | RW) != PRESENT | RW || (e & ADDR) >> 12 != si.mfn_of((va / PAGE) as u64) {
            break;
        }
        va += PAGE;
    }
    va
}

/// Makes the page at `table` (mapped read-write, unused) the L1 table of the first empty
/// 2 MiB slot at or after `above`, and returns that slot's address.
fn install_window_table(si: &StartInfo, table: usize, above: usize) -> Result<usize, MemoryError> {
    let (l2, l2_maddr) = l2_of(si, 0).ok_or(MemoryError::NoTable { va: 0 })?;
    let first = above.div_ceil(L1_SPAN);
    let slot = (first..512)
        .find(|&i| entry(l2, i) & PRESENT == 0)
        .ok_or(MemoryError::NoWindowSlot)?;
    let mfn = si.mfn_of((table / PAGE) as u64);
    // SAFETY: `table` is a free page of ours, mapped read-write (checked by `mapped_end`);
    // nothing references it.
    unsafe { core::ptr::write_bytes(table as *mut u8, 0, PAGE) };
    // Xen types a frame as a page table only if no writable mapping of it remains.
    // SAFETY: nothing holds a reference into the page; it is only read from now on.
    let rc =
        unsafe { hypercall::update_va_mapping(table as u64, (mfn << 12) | PRESENT | ACCESSED) };
    if rc != 0 {
        return Err(MemoryError::Remap { va: table, rc });
    }
    let pte = (mfn << 12) | PRESENT | RW | USER | ACCESSED | DIRTY;
    let rc = hypercall::mmu_update(l2_maddr + (slot * 8) as u64, pte);
    if rc != 0 {
        return Err(MemoryError::Install { rc });
    }
    Ok(slot * L1_SPAN)
}
