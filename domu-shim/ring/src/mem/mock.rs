//! A heap-backed [`SharedMem`] for unit tests and fuzzing.

use ::alloc::alloc::{self as heap, Layout};
use ::alloc::vec;
use ::alloc::vec::Vec;
use core::ptr::NonNull;

use super::{MemError, SharedMem, PAGE_SIZE};

/// Page-aligned, zero-initialised heap memory standing in for shared pages.
///
/// It behaves like a mapping shared with a peer: tests play the peer by calling the
/// [`SharedMem`] methods directly (for example to write garbage indices).
#[derive(Debug)]
pub struct MockMem {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl MockMem {
    /// Allocates `len` zeroed bytes, aligned to [`PAGE_SIZE`].
    pub fn new(len: usize) -> Result<Self, MemError> {
        let refused = MemError::OutOfBounds {
            offset: 0,
            len,
            mapping_len: 0,
        };
        if len == 0 {
            return Err(refused);
        }
        let layout = Layout::from_size_align(len, PAGE_SIZE).map_err(|_| refused.clone())?;
        // SAFETY: `layout` has a non-zero size (checked above).
        #[allow(unsafe_code)]
        let raw = unsafe { heap::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            heap::handle_alloc_error(layout)
        };
        Ok(Self { ptr, layout })
    }

    /// Allocates `len` bytes (at least `bytes.len()`, at least 1) and copies `bytes` to the
    /// start: memory "filled by a peer", e.g. with fuzzer input.
    pub fn from_bytes(bytes: &[u8], len: usize) -> Result<Self, MemError> {
        let mem = Self::new(len.max(bytes.len()).max(1))?;
        mem.write_bytes(0, bytes)?;
        Ok(mem)
    }

    /// A copy of the whole memory (for assertions in tests).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.layout.size()];
        // Cannot fail: the range is the whole mapping.
        let _ = self.read_bytes(0, &mut out);
        out
    }
}

// SAFETY: the pointer comes from a live allocation of `layout.size()` bytes aligned to
// PAGE_SIZE, freed only in `Drop`; no Rust reference into it is ever created.
#[allow(unsafe_code)]
unsafe impl SharedMem for MockMem {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }

    fn len(&self) -> usize {
        self.layout.size()
    }
}

// SAFETY: the allocation is owned by this value and only reached through `SharedMem`'s
// atomic and volatile accessors, which may be used from any thread.
#[allow(unsafe_code)]
unsafe impl Send for MockMem {}
// SAFETY: as for `Send`: concurrent access goes through atomics and volatile copies only.
#[allow(unsafe_code)]
unsafe impl Sync for MockMem {}

impl Drop for MockMem {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `new` with exactly `layout` and is freed only here.
        #[allow(unsafe_code)]
        unsafe {
            heap::dealloc(self.ptr.as_ptr(), self.layout)
        };
    }
}
