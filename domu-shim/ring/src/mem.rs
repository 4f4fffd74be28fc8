//! Access to the ring's shared pages.
//!
//! The ring lives in memory that a hostile peer can change at any moment, from another
//! process or another domain. So this module never hands out a Rust reference (`&[u8]`,
//! `&mut T`) into that memory: every access goes through [`SharedMem`]'s provided methods,
//! which
//!
//! - bounds-check `offset .. offset + len` against the mapping length with checked
//!   arithmetic and return [`MemError`] instead of touching anything out of range;
//! - read and write the ring indices as `u32` atomics (acquire loads and release stores,
//!   plus relaxed variants for fields ordered by an index);
//! - copy byte ranges in and out with volatile accesses, so each byte of shared memory is
//!   read exactly once per copy and the compiler cannot re-read it later.
//!
//! Implementations only say where the mapping is and how long it is:
//! [`MmapMem`] (anonymous or memfd-backed `mmap`, for the sandbox backend),
//! [`MockMem`] (a heap allocation, for tests and fuzzing), and on Xen the grant mappings of
//! [`crate::xen`] (`GntdevMem` in the guest, `GntallocMem` in dom0).

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]

#[cfg(feature = "std")]
mod mmap;
mod mock;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

#[cfg(feature = "std")]
pub use mmap::{MapError, MmapMem};
pub use mock::MockMem;

/// The page size the ring layout is built on (x86 4 KiB pages, also Xen's grant granularity).
pub const PAGE_SIZE: usize = 4096;

/// An access to shared memory that was refused before touching memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The range `offset .. offset + len` does not lie inside the mapping.
    #[error("access of {len} bytes at offset {offset} is outside the {mapping_len}-byte mapping")]
    OutOfBounds {
        /// First byte of the refused access.
        offset: usize,
        /// Length of the refused access.
        len: usize,
        /// Length of the mapping.
        mapping_len: usize,
    },
    /// A `u32` access at an offset that is not a multiple of 4.
    #[error("u32 access at offset {offset} is not 4-byte aligned")]
    Misaligned {
        /// Offset of the refused access.
        offset: usize,
    },
}

/// The backing pages of a ring: a fixed-size, page-aligned mapping shared with a peer.
///
/// Implementors provide only [`base`](SharedMem::base) and [`len`](SharedMem::len); all
/// accesses go through the provided methods, which bounds-check every range and never form a
/// Rust reference to the shared bytes. Implementors must not override the provided methods.
///
/// # Safety
///
/// An implementor guarantees that, for as long as the value lives:
/// - `base()` always returns the same pointer, aligned to [`PAGE_SIZE`];
/// - `len()` always returns the same value;
/// - `base() .. base() + len()` is one mapping that is valid for reads and writes and is
///   not unmapped, shrunk or remapped while the value lives (a peer shrinking a memfd
///   would turn an access into `SIGBUS`, so such files must be sealed);
/// - nothing in this process holds a Rust reference into that range; the peer may change
///   any byte at any time, which the provided methods tolerate.
#[allow(unsafe_code)]
pub unsafe trait SharedMem: Send + Sync {
    /// Start of the mapping.
    fn base(&self) -> NonNull<u8>;

    /// Length of the mapping in bytes.
    fn len(&self) -> usize;

    /// Whether the mapping is empty (never true for a usable ring).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Loads the `u32` at `offset` with acquire ordering: reads of data the peer published
    /// before storing this value (with release ordering) see that data.
    fn load_u32_acquire(&self, offset: usize) -> Result<u32, MemError> {
        with_atomic_u32(self, offset, |a| a.load(Ordering::Acquire))
    }

    /// Loads the `u32` at `offset` with relaxed ordering (for fields ordered by an index).
    fn load_u32_relaxed(&self, offset: usize) -> Result<u32, MemError> {
        with_atomic_u32(self, offset, |a| a.load(Ordering::Relaxed))
    }

    /// Stores `value` at `offset` with release ordering: everything this thread wrote before
    /// is visible to a peer that loads this value with acquire ordering.
    fn store_u32_release(&self, offset: usize, value: u32) -> Result<(), MemError> {
        with_atomic_u32(self, offset, |a| a.store(value, Ordering::Release))
    }

    /// Stores `value` at `offset` with relaxed ordering (for fields published by an index).
    fn store_u32_relaxed(&self, offset: usize, value: u32) -> Result<(), MemError> {
        with_atomic_u32(self, offset, |a| a.store(value, Ordering::Relaxed))
    }

    /// Copies `dst.len()` bytes starting at `offset` out of shared memory into `dst`.
    ///
    /// Each shared byte is read exactly once (volatile loads). If the peer writes the range
    /// concurrently, `dst` may hold a mix of old and new bytes, never anything else.
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        let src = checked_ptr(self, offset, dst.len())?;
        // SAFETY: `checked_ptr` proved `offset .. offset + dst.len()` lies inside the
        // mapping, which the trait contract says is valid for reads while `self` lives.
        #[allow(unsafe_code)]
        unsafe {
            copy_from_shared(src, dst);
        }
        Ok(())
    }

    /// Copies `src` into shared memory starting at `offset` (volatile stores).
    fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        let dst = checked_ptr(self, offset, src.len())?;
        // SAFETY: `checked_ptr` proved `offset .. offset + src.len()` lies inside the
        // mapping, which the trait contract says is valid for writes while `self` lives.
        #[allow(unsafe_code)]
        unsafe {
            copy_to_shared(src, dst);
        }
        Ok(())
    }

    /// Sets `len` bytes starting at `offset` to `value` (volatile stores).
    fn fill_bytes(&self, offset: usize, len: usize, value: u8) -> Result<(), MemError> {
        let dst = checked_ptr(self, offset, len)?;
        // SAFETY: `checked_ptr` proved `offset .. offset + len` lies inside the mapping,
        // which the trait contract says is valid for writes while `self` lives.
        #[allow(unsafe_code)]
        unsafe {
            fill_shared(dst, len, value);
        }
        Ok(())
    }
}

// SAFETY: a shared reference forwards to the same mapping, which outlives the reference.
#[allow(unsafe_code)]
unsafe impl<T: SharedMem + ?Sized> SharedMem for &T {
    fn base(&self) -> NonNull<u8> {
        (**self).base()
    }

    fn len(&self) -> usize {
        (**self).len()
    }
}

// SAFETY: an `Arc` forwards to the same mapping, which lives as long as the `Arc`.
#[allow(unsafe_code)]
unsafe impl<T: SharedMem + ?Sized> SharedMem for alloc::sync::Arc<T> {
    fn base(&self) -> NonNull<u8> {
        (**self).base()
    }

    fn len(&self) -> usize {
        (**self).len()
    }
}

/// Bounds-checks `offset .. offset + len` and returns a pointer to `offset`.
fn checked_ptr<M: SharedMem + ?Sized>(
    mem: &M,
    offset: usize,
    len: usize,
) -> Result<*mut u8, MemError> {
    let mapping_len = mem.len();
    let in_bounds = offset
        .checked_add(len)
        .is_some_and(|end| end <= mapping_len);
    if !in_bounds {
        return Err(MemError::OutOfBounds {
            offset,
            len,
            mapping_len,
        });
    }
    // `wrapping_add` is exact here because `offset <= mapping_len`.
    Ok(mem.base().as_ptr().wrapping_add(offset))
}

/// Runs `f` on the `u32` at `offset`, viewed as an atomic for the duration of the call.
fn with_atomic_u32<M: SharedMem + ?Sized, T>(
    mem: &M,
    offset: usize,
    f: impl FnOnce(&AtomicU32) -> T,
) -> Result<T, MemError> {
    if !offset.is_multiple_of(4) {
        return Err(MemError::Misaligned { offset });
    }
    let ptr = checked_ptr(mem, offset, 4)?.cast::<u32>();
    // SAFETY: `ptr` is in bounds for 4 bytes (checked above), 4-byte aligned (the base is
    // page-aligned by the trait contract and `offset % 4 == 0`), and valid for reads and
    // writes while `mem` lives. All accesses this crate makes to index words are atomic; the
    // peer's accesses happen outside this process's Rust abstract machine. The `&AtomicU32`
    // does not escape `f`, and an atomic (an `UnsafeCell`) may be changed behind a shared
    // reference.
    #[allow(unsafe_code)]
    let atomic = unsafe { AtomicU32::from_ptr(ptr) };
    Ok(f(atomic))
}

/// Copies from shared memory with volatile loads: aligned `u64` words in the middle,
/// single bytes at the ends.
///
/// # Safety
/// `src .. src + dst.len()` must be valid for reads.
#[allow(unsafe_code)]
unsafe fn copy_from_shared(src: *const u8, dst: &mut [u8]) {
    let head_len = src.align_offset(8).min(dst.len());
    let Some((head, rest)) = dst.split_at_mut_checked(head_len) else {
        return; // unreachable: head_len <= dst.len()
    };
    let mut cursor = src;
    for byte in head {
        // SAFETY: `cursor` stays within `src .. src + dst.len()` (one step per byte of `dst`).
        *byte = unsafe { cursor.read_volatile() };
        cursor = cursor.wrapping_add(1);
    }
    let mut words = rest.chunks_exact_mut(8);
    for chunk in &mut words {
        // SAFETY: `cursor` is 8-byte aligned (after `head_len` bytes) and the 8 bytes it
        // reads are within the caller's valid range (one step per 8 bytes of `dst`).
        let word = unsafe { cursor.cast::<u64>().read_volatile() };
        chunk.copy_from_slice(&word.to_ne_bytes());
        cursor = cursor.wrapping_add(8);
    }
    for byte in words.into_remainder() {
        // SAFETY: as for the head: within the caller's valid range.
        *byte = unsafe { cursor.read_volatile() };
        cursor = cursor.wrapping_add(1);
    }
}

/// Copies into shared memory with volatile stores (aligned `u64` words in the middle).
///
/// # Safety
/// `dst .. dst + src.len()` must be valid for writes.
#[allow(unsafe_code)]
unsafe fn copy_to_shared(src: &[u8], dst: *mut u8) {
    let head_len = dst.align_offset(8).min(src.len());
    let Some((head, rest)) = src.split_at_checked(head_len) else {
        return; // unreachable: head_len <= src.len()
    };
    let mut cursor = dst;
    for &byte in head {
        // SAFETY: `cursor` stays within `dst .. dst + src.len()`.
        unsafe { cursor.write_volatile(byte) };
        cursor = cursor.wrapping_add(1);
    }
    let mut words = rest.chunks_exact(8);
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        // SAFETY: `cursor` is 8-byte aligned and the 8 bytes are in the caller's range.
        unsafe {
            cursor
                .cast::<u64>()
                .write_volatile(u64::from_ne_bytes(word))
        };
        cursor = cursor.wrapping_add(8);
    }
    for &byte in words.remainder() {
        // SAFETY: within the caller's range, as for the head.
        unsafe { cursor.write_volatile(byte) };
        cursor = cursor.wrapping_add(1);
    }
}

/// Fills shared memory with volatile stores.
///
/// # Safety
/// `dst .. dst + len` must be valid for writes.
#[allow(unsafe_code)]
unsafe fn fill_shared(dst: *mut u8, len: usize, value: u8) {
    let mut cursor = dst;
    for _ in 0..len {
        // SAFETY: `len` steps of one byte from `dst` stay in the caller's range.
        unsafe { cursor.write_volatile(value) };
        cursor = cursor.wrapping_add(1);
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let mem = MockMem::new(PAGE_SIZE).unwrap();
        assert!(mem.load_u32_acquire(PAGE_SIZE - 4).is_ok());
        assert_eq!(
            mem.load_u32_acquire(PAGE_SIZE),
            Err(MemError::OutOfBounds {
                offset: PAGE_SIZE,
                len: 4,
                mapping_len: PAGE_SIZE
            })
        );
        assert_eq!(
            mem.store_u32_release(6, 1),
            Err(MemError::Misaligned { offset: 6 })
        );
        assert!(matches!(
            mem.load_u32_relaxed(usize::MAX - 3),
            Err(MemError::OutOfBounds { .. })
        ));
        let mut buf = [0u8; 8];
        assert!(mem.read_bytes(PAGE_SIZE - 7, &mut buf).is_err());
        assert!(mem.read_bytes(usize::MAX, &mut buf).is_err());
        assert!(mem.write_bytes(usize::MAX - 2, &buf).is_err());
        assert!(mem.fill_bytes(1, PAGE_SIZE, 0).is_err());
        assert!(mem.read_bytes(PAGE_SIZE, &mut []).is_ok());
    }

    #[test]
    fn copies_round_trip_at_every_alignment() {
        let mem = MockMem::new(PAGE_SIZE).unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        for offset in 0..17 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 100] {
                mem.fill_bytes(0, 256, 0xAA).unwrap();
                mem.write_bytes(offset, &data[..len]).unwrap();
                let mut out = vec![0u8; len + 2];
                mem.read_bytes(offset, &mut out[..len]).unwrap();
                assert_eq!(&out[..len], &data[..len]);
                // Neighbours untouched.
                let mut around = [0u8; 1];
                mem.read_bytes(offset + len, &mut around).unwrap();
                assert_eq!(around[0], 0xAA);
            }
        }
    }

    #[test]
    fn u32_accessors_are_native_endian() {
        let mem = MockMem::new(PAGE_SIZE).unwrap();
        mem.store_u32_release(8, 0x0102_0304).unwrap();
        let mut b = [0u8; 4];
        mem.read_bytes(8, &mut b).unwrap();
        assert_eq!(u32::from_ne_bytes(b), 0x0102_0304);
        mem.store_u32_relaxed(12, 7).unwrap();
        assert_eq!(mem.load_u32_relaxed(12).unwrap(), 7);
    }
}
