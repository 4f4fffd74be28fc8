//! The fixed heap behind `alloc`: a bump allocator over a region of .bss.
//!
//! A Mayfly guest runs one transaction and is destroyed, so memory is never reused across
//! transactions. Freeing the most recent allocation gives its bytes back, and growing it
//! grows in place (the common `Vec`/`String` push pattern); anything else is reclaimed when
//! the domain dies. Exhaustion is an allocation failure: the handler's `alloc` error path
//! panics, and a panic crashes the domain (the agent sees the crash and destroys it).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

/// Heap size. The domain has 4 MiB; the image, the ring window (1 MiB of address space),
/// the stack, page tables and p2m take the rest. A transaction's largest messages are
/// 64 KiB windows; a handler's working set stays far below this.
pub const HEAP_SIZE: usize = 1024 * 1024;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; HEAP_SIZE]>);

/// The allocator (`#[global_allocator]` in main.rs).
pub struct Bump {
    arena: Arena,
    next: UnsafeCell<usize>,
}

// SAFETY: one vCPU and no interrupt handlers: the allocator is never entered concurrently.
unsafe impl Sync for Bump {}

impl Bump {
    /// An empty heap.
    pub const fn new() -> Self {
        Self {
            arena: Arena(UnsafeCell::new([0; HEAP_SIZE])),
            next: UnsafeCell::new(0),
        }
    }

    fn start(&self) -> usize {
        self.arena.0.get() as usize
    }

    /// Bytes handed out so far.
    pub fn used(&self) -> usize {
        // SAFETY: see `unsafe impl Sync`.
        unsafe { *self.next.get() }
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
        let start = self.start();
        // SAFETY: see `unsafe impl Sync`.
        let next = unsafe { &mut *self.next.get() };
        let Some(addr) = (start + *next).checked_next_multiple_of(layout.align()) else {
            return core::ptr::null_mut();
        };
        let Some(end) = addr.checked_add(layout.size()) else {
            return core::ptr::null_mut();
        };
        if end > start + HEAP_SIZE {
            return core::ptr::null_mut();
        }
        *next = end - start;
        addr as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let start = self.start();
        // SAFETY: see `unsafe impl Sync`.
        let next = unsafe { &mut *self.next.get() };
        if ptr as usize + layout.size() == start + *next {
            *next = ptr as usize - start;
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let start = self.start();
        // SAFETY: see `unsafe impl Sync`.
        let next = unsafe { &mut *self.next.get() };
        if ptr as usize + layout.size() == start + *next {
            if let Some(end) = (ptr as usize).checked_add(new_size) {
                if end <= start + HEAP_SIZE {
                    *next = end - start;
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
