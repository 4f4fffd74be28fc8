//! [`SharedMem`] over an `mmap` mapping: anonymous shared, or backed by a sealed memfd.
//!
//! The sandbox backend creates the ring with [`MmapMem::memfd`] in the agent and lets a
//! forked child inherit it (the `MAP_SHARED` mapping survives `fork`; the memfd can also be
//! passed on and mapped again with [`MmapMem::from_fd`]). The memfd is sealed against
//! shrinking and growing *before* anyone else can see it, so a hostile child cannot
//! truncate the file under the agent's mapping and make the agent's next access `SIGBUS`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use super::{MemError, SharedMem, PAGE_SIZE};

/// Creating or mapping ring memory failed.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The requested length is zero or not a multiple of [`PAGE_SIZE`].
    #[error("mapping length {len} is not a non-zero multiple of {PAGE_SIZE}")]
    BadLength {
        /// The refused length.
        len: usize,
    },
    /// `memfd_create` failed.
    #[error("memfd_create failed")]
    MemfdCreate(#[source] io::Error),
    /// `ftruncate` of the new memfd failed.
    #[error("ftruncate of the memfd to {len} bytes failed")]
    Truncate {
        /// The requested size.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `fcntl(F_ADD_SEALS)` / `fcntl(F_GET_SEALS)` failed.
    #[error("memfd seal operation failed")]
    Seals(#[source] io::Error),
    /// The fd passed to [`MmapMem::from_fd`] is not sealed against shrinking.
    #[error("fd is not sealed against shrinking (seals {seals:#x}); a peer could truncate it")]
    NotSealed {
        /// The seals found.
        seals: i32,
    },
    /// `fstat` failed.
    #[error("fstat failed")]
    Stat(#[source] io::Error),
    /// The file behind the fd is shorter than the requested mapping.
    #[error("file has {file_len} bytes, fewer than the {len}-byte mapping requested")]
    FileTooShort {
        /// Size reported by `fstat`.
        file_len: i64,
        /// The requested mapping length.
        len: usize,
    },
    /// `lseek(SEEK_DATA / SEEK_HOLE)` on the memfd failed.
    #[error("finding the memfd's data failed")]
    Seek(#[source] io::Error),
    /// Zeroing the memfd's data through the mapping failed.
    #[error("zeroing the memfd's data failed")]
    Zero(#[source] MemError),
    /// `mmap` failed.
    #[error("mmap of {len} bytes failed")]
    Mmap {
        /// The requested length.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A read-write `MAP_SHARED` mapping, unmapped on drop.
#[derive(Debug)]
pub struct MmapMem {
    ptr: NonNull<u8>,
    len: usize,
    fd: Option<OwnedFd>,
}

impl MmapMem {
    /// Maps `len` bytes of anonymous shared memory (zeroed). Processes forked afterwards
    /// share it.
    pub fn anonymous(len: usize) -> Result<Self, MapError> {
        check_len(len)?;
        // SAFETY: anonymous memory is backed for the whole length until unmapped.
        #[allow(unsafe_code)]
        let ptr = unsafe { map_shared(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS, None)? };
        Ok(Self { ptr, len, fd: None })
    }

    /// Creates a memfd named `name` of `len` bytes (zeroed), seals it against shrinking,
    /// growing and further sealing, and maps it. The memfd is close-on-exec; it survives
    /// `fork` (a sandbox that `exec`s must clear `FD_CLOEXEC` on the fd it passes on).
    pub fn memfd(name: &CStr, len: usize) -> Result<Self, MapError> {
        check_len(len)?;
        let size = libc::off_t::try_from(len).map_err(|_| MapError::BadLength { len })?;
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
        #[allow(unsafe_code)]
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(MapError::MemfdCreate(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        #[allow(unsafe_code)]
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on an fd we own.
        #[allow(unsafe_code)]
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(MapError::Truncate {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: plain fcntl on an fd we own.
        #[allow(unsafe_code)]
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(MapError::Seals(io::Error::last_os_error()));
        }
        // SAFETY: the file is exactly `len` bytes and sealed against shrinking, so every
        // page of the mapping stays backed.
        #[allow(unsafe_code)]
        let ptr = unsafe { map_shared(len, libc::MAP_SHARED, Some(fd.as_fd()))? };
        Ok(Self {
            ptr,
            len,
            fd: Some(fd),
        })
    }

    /// Maps `len` bytes of an existing memfd (e.g. one inherited from the agent).
    ///
    /// The fd must be sealed against shrinking (as [`MmapMem::memfd`] does) and hold at least
    /// `len` bytes; otherwise a peer could truncate it and turn accesses into `SIGBUS`. The
    /// mapping does not keep the fd: the caller may close it afterwards.
    pub fn from_fd(fd: BorrowedFd<'_>, len: usize) -> Result<Self, MapError> {
        check_len(len)?;
        // SAFETY: plain fcntl on a borrowed, open fd.
        #[allow(unsafe_code)]
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(MapError::Seals(io::Error::last_os_error()));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(MapError::NotSealed { seals });
        }
        // SAFETY: `libc::stat` is plain old data; all-zero is a valid value.
        #[allow(unsafe_code)]
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable `struct stat`; the fd is open.
        #[allow(unsafe_code)]
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(MapError::Stat(io::Error::last_os_error()));
        }
        let file_len: i64 = st.st_size;
        if usize::try_from(file_len).map_or(true, |f| f < len) {
            return Err(MapError::FileTooShort { file_len, len });
        }
        // SAFETY: the file is at least `len` bytes and cannot shrink (sealed), so every
        // page of the mapping stays backed.
        #[allow(unsafe_code)]
        let ptr = unsafe { map_shared(len, libc::MAP_SHARED, Some(fd))? };
        Ok(Self { ptr, len, fd: None })
    }

    /// The memfd behind this mapping, if it was created by [`MmapMem::memfd`].
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// Makes a memfd mapping all zero again, for reuse: zeroes every range the file holds
    /// data for — the pages anyone wrote to, faulted in, or that were swapped out — found
    /// with `lseek(SEEK_DATA/SEEK_HOLE)`; the holes in between read as zero already. Stops
    /// and returns `Ok(None)` once more than `limit` bytes hold data (the caller then
    /// discards the memory instead: wiping it would cost more than a new one), and for
    /// anonymous memory (its data cannot be found). `Ok(Some(n))`: `n` bytes were zeroed and
    /// the whole mapping now reads as zero.
    ///
    /// Only for memory no peer can write any more (every other mapping of the memfd gone):
    /// a concurrent writer could leave data behind.
    pub fn zero_data(&self, limit: usize) -> Result<Option<usize>, MapError> {
        let Some(fd) = &self.fd else {
            return Ok(None);
        };
        let seek = |from: usize, whence: i32| -> Result<Option<usize>, MapError> {
            let from =
                libc::off_t::try_from(from).map_err(|_| MapError::BadLength { len: from })?;
            // SAFETY: plain lseek on a memfd we own; it moves only this fd's offset, which
            // nothing else uses (the mapping does not depend on it).
            #[allow(unsafe_code)]
            let at = unsafe { libc::lseek(fd.as_raw_fd(), from, whence) };
            if at < 0 {
                let e = io::Error::last_os_error();
                // ENXIO: no data (or hole) at or after `from`.
                return match e.raw_os_error() {
                    Some(libc::ENXIO) => Ok(None),
                    _ => Err(MapError::Seek(e)),
                };
            }
            Ok(Some(
                usize::try_from(at).map_err(|_| MapError::BadLength { len: self.len })?,
            ))
        };
        let mut zeroed = 0usize;
        let mut at = 0usize;
        while at < self.len {
            let Some(start) = seek(at, libc::SEEK_DATA)? else {
                break;
            };
            let end = seek(start, libc::SEEK_HOLE)?
                .unwrap_or(self.len)
                .min(self.len);
            let Some(len) = end.checked_sub(start).filter(|&l| l > 0) else {
                break;
            };
            zeroed = zeroed.saturating_add(len);
            if zeroed > limit {
                return Ok(None);
            }
            self.fill_bytes(start, len, 0).map_err(MapError::Zero)?;
            at = end;
        }
        Ok(Some(zeroed))
    }
}

fn check_len(len: usize) -> Result<(), MapError> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(MapError::BadLength { len });
    }
    Ok(())
}

/// `mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, 0)`.
///
/// # Safety
/// The backing object (anonymous memory, or the file behind `fd`) must stay at least `len`
/// bytes long for as long as the mapping is used, so that no access faults with `SIGBUS`.
#[allow(unsafe_code)]
unsafe fn map_shared(
    len: usize,
    flags: i32,
    fd: Option<BorrowedFd<'_>>,
) -> Result<NonNull<u8>, MapError> {
    let raw_fd = fd.map_or(-1, |fd| fd.as_raw_fd());
    // SAFETY: a NULL hint lets the kernel choose an unused range, so no existing memory is
    // replaced; `len` is non-zero; the fd (if any) is open for the duration of the call.
    #[allow(unsafe_code)]
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            raw_fd,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(MapError::Mmap {
            len,
            source: io::Error::last_os_error(),
        });
    }
    NonNull::new(addr.cast::<u8>()).ok_or(MapError::Mmap {
        len,
        source: io::Error::other("mmap returned NULL"),
    })
}

// SAFETY: `ptr .. ptr + len` is a live MAP_SHARED mapping (page-aligned, as every mmap is)
// owned by this value until `Drop`, never resized, backed by anonymous memory or by a memfd
// sealed against shrinking; this crate never forms a Rust reference into it.
#[allow(unsafe_code)]
unsafe impl SharedMem for MmapMem {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }

    fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: the mapping is process-wide and only reached through atomic and volatile
// accessors, which may be used from any thread.
#[allow(unsafe_code)]
unsafe impl Send for MmapMem {}
// SAFETY: as for `Send`.
#[allow(unsafe_code)]
unsafe impl Sync for MmapMem {}

impl Drop for MmapMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created by `mmap` and owned by this value;
        // no reference into it outlives `self`.
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn memfd_is_sealed_and_remappable() {
        let a = MmapMem::memfd(c"mayfly-ring-test", 2 * PAGE_SIZE).unwrap();
        let fd = a.fd().unwrap();
        // A peer cannot shrink it.
        // SAFETY: plain syscall on an open fd.
        #[allow(unsafe_code)]
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), 0) };
        assert_eq!(r, -1);
        let b = MmapMem::from_fd(fd, 2 * PAGE_SIZE).unwrap();
        a.store_u32_release(PAGE_SIZE, 0xdead_beef).unwrap();
        assert_eq!(b.load_u32_acquire(PAGE_SIZE).unwrap(), 0xdead_beef);
        b.write_bytes(10, b"hello").unwrap();
        let mut out = [0u8; 5];
        a.read_bytes(10, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        // Longer than the file: refused.
        assert!(matches!(
            MmapMem::from_fd(fd, 3 * PAGE_SIZE),
            Err(MapError::FileTooShort { .. })
        ));
    }

    #[test]
    fn unsealed_fd_and_bad_lengths_are_refused() {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(MmapMem::from_fd(file.as_fd(), PAGE_SIZE).is_err());
        assert!(matches!(
            MmapMem::anonymous(0),
            Err(MapError::BadLength { len: 0 })
        ));
        assert!(matches!(
            MmapMem::anonymous(100),
            Err(MapError::BadLength { len: 100 })
        ));
        let anon = MmapMem::anonymous(PAGE_SIZE).unwrap();
        assert!(anon.fd().is_none());
        assert_eq!(anon.len(), PAGE_SIZE);
        assert_eq!(anon.base().as_ptr() as usize % PAGE_SIZE, 0);
    }

    #[test]
    fn zero_data_wipes_what_a_peer_wrote_and_only_that() {
        let pages = 16;
        let a = MmapMem::memfd(c"mayfly-ring-test", pages * PAGE_SIZE).unwrap();
        // A fresh memfd holds no data.
        assert_eq!(a.zero_data(usize::MAX).unwrap(), Some(0));
        // A peer's mapping writes a secret into two pages far apart.
        let peer = MmapMem::from_fd(a.fd().unwrap(), pages * PAGE_SIZE).unwrap();
        peer.write_bytes(3 * PAGE_SIZE + 100, b"secret").unwrap();
        peer.write_bytes(11 * PAGE_SIZE - 3, b"secret").unwrap(); // straddles pages 10-11
        drop(peer);
        // Over the limit: refused, nothing promised.
        assert_eq!(a.zero_data(2 * PAGE_SIZE).unwrap(), None);
        // Within it: those pages (and only data pages) are zeroed.
        let zeroed = a.zero_data(usize::MAX).unwrap().unwrap();
        assert!(
            zeroed >= 3 * PAGE_SIZE && zeroed < pages * PAGE_SIZE,
            "{zeroed}"
        );
        let mut all = vec![0xffu8; pages * PAGE_SIZE];
        a.read_bytes(0, &mut all).unwrap();
        assert!(all.iter().all(|&b| b == 0));
        // Anonymous memory: its data cannot be found, so it is never offered for reuse.
        assert_eq!(
            MmapMem::anonymous(PAGE_SIZE)
                .unwrap()
                .zero_data(usize::MAX)
                .unwrap(),
            None
        );
    }
}
