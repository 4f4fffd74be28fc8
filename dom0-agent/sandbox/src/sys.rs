//! The agent's own system call nix does not cover (`malloc_trim`), and the shared ones
//! (`mayfly_sandbox_proto::sys`).

pub(crate) use mayfly_sandbox_proto::sys::*;

/// Gives the C allocator's free memory back to the kernel: glibc's `malloc_trim(0)`, which
/// releases the free pages of every arena (not only the top of the main heap, as `free`
/// does). Memory a transaction made the agent buffer is freed into the arena of the thread
/// that served it, often below chunks still in use, where `free` keeps it mapped; the agent
/// calls this after a transaction that buffered a lot. Returns whether anything was
/// released. Elsewhere than glibc it does nothing.
pub fn release_free_heap() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only walks the allocator's own arenas under their locks and
        // madvises free pages; it takes no pointers and is safe to call from any thread.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        released != 0
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}
