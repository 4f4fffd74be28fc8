//! The heap behind `alloc`: a bump allocator over the domain's free pages after the boot
//! elements ([`crate::memory`]), not over .bss, so the domain builder neither copies nor
//! zeroes it.
//!
//! A Mayfly guest runs one transaction and is destroyed, so memory is never reused across
//! transactions. Freeing the most recent allocation gives its bytes back, and growing it
//! grows in place (the common `Vec`/`String` push pattern); anything else is reclaimed when
//! the domain dies. Exhaustion is an allocation failure: the handler's `alloc` error path
//! panics, and a panic crashes the domain (the agent sees the crash and destroys it).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

/// The allocator (`#[global_allocator]` in main.rs). Empty until [`Bump::init`] gives it
/// the free pages [`crate::memory::setup`] found: every allocation before that fails.
pub struct Bump {
    /// First byte of the heap.
    start: UnsafeCell<usize>,
    /// End of the heap (exclusive).
    end: UnsafeCell<usize>,
    /// Next free byte (`start <= next <= end`).
    next: UnsafeCell<usize>,
}

// SAFETY: one vCPU and no interrupt handlers: the allocator is never entered concurrently.
unsafe impl Sync for Bump {}

impl Bump {
    /// An empty heap.
    pub const fn new() -> Self {
        Self {
            start: UnsafeCell::new(0),
            end: UnsafeCell::new(0),
            next: UnsafeCell::new(0),
        }
    }

    /// Hands the heap its memory, once, before the first allocation.
    ///
    /// # Safety
    /// `start..end` must be mapped read-write, used by nothing else for the life of the
    /// domain, and `start <= end`.
    pub unsafe fn init(&self, start: usize, end: usize) {
        // SAFETY: see `unsafe impl Sync`; nothing is allocated yet.
        unsafe {
            *self.start.get() = start;
            *self.end.get() = end;
            *self.next.get() = start;
        }
    }

    fn start(&self) -> usize {
        // SAFETY: see `unsafe impl Sync`.
        unsafe { *self.start.get() }
    }

    fn end(&self) -> usize {
        // SAFETY: see `unsafe impl Sync`.
        unsafe { *self.end.get() }
    }

    /// Bytes handed out so far.
    pub fn used(&self) -> usize {
        // SAFETY: see `unsafe impl Sync`.
        unsafe { *self.next.get() - self.start() }
    }

    /// The heap's size in bytes.
    pub fn size(&self) -> usize {
        self.end() - self.start()
    }
}

impl Default for Bump {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: `alloc` returns disjoint, suitably aligned ranges inside the arena (or null);
// `dealloc` and `realloc` only move `next` back or forward over the latest allocation.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let limit = self.end();
        // SAFETY: see `unsafe impl Sync`.
        let next = unsafe { &mut *self.next.get() };
        let Some(addr) = next.checked_next_multiple_of(layout.align()) else {
            return core::ptr::null_mut();
        };
        let Some(end) = addr.checked_add(layout.size()) else {
            return core::ptr::null_mut();
        };
        if end > limit {
            return core::ptr::null_mut();
        }
        *next = end;
        addr as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: see `unsafe impl Sync`.
        let next = unsafe { &mut *self.next.get() };
        if ptr as usize + layout.size() == *next {
            *next = ptr as usize;
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let limit = self.end();
        // SAFETY: see `unsafe impl Sync`.
        let next = unsafe { &mut *self.next.get() };
        if ptr as usize + layout.size() == *next {
            if let Some(end) = (ptr as usize).checked_add(new_size) {
                if end <= limit {
                    *next = end;
                    return ptr;
                }
            }
            return core::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `realloc` is the one `alloc` and `copy` need.
        unsafe {
            let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
            if !new.is_null() {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            }
            new
        }
    }
}
