//! [`GntdevMem`]: the guest maps pages another domain granted it, through `/dev/xen/gntdev`.
//!
//! `IOCTL_GNTDEV_MAP_GRANT_REF` registers the grant references and returns an offset into
//! the device; `mmap` of that offset maps them (on a PV guest the grant is mapped at `mmap`
//! time, so a bad reference fails there); drop unmaps and `IOCTL_GNTDEV_UNMAP_GRANT_REF`
//! releases them.
//!
//! Argument layout (`struct ioctl_gntdev_map_grant_ref`, native-endian):
//!
//! ```text
//!  0  u32 count        number of refs
//!  4  u32 pad
//!  8  u64 index        (out) offset to pass to mmap
//! 16  { u32 domid; u32 ref; } x count
//! ```

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use super::MAX_RING_PAGES;
use super::{get_u64, ioc_none, ioctl_buf, map_device, open_device, put_u32, DomId};
use crate::mem::{SharedMem, PAGE_SIZE};

/// The gntdev device node.
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";

const MAP_HEADER: usize = 16;
const REF_SIZE: usize = 8;
const IOCTL_MAP: u32 = ioc_none(b'G', 0, 24);
const IOCTL_UNMAP: u32 = ioc_none(b'G', 1, 16);

/// Mapping granted pages failed.
#[derive(Debug, thiserror::Error)]
pub enum GntdevError {
    /// No refs, or more than [`MAX_RING_PAGES`].
    #[error("{count} grant refs requested; between 1 and {MAX_RING_PAGES} are allowed")]
    BadCount {
        /// The refused count.
        count: usize,
    },
    /// Opening `/dev/xen/gntdev` failed.
    #[error("opening {GNTDEV_PATH} failed")]
    Open(#[source] io::Error),
    /// `IOCTL_GNTDEV_MAP_GRANT_REF` failed.
    #[error("IOCTL_GNTDEV_MAP_GRANT_REF of {count} refs from domain {domid} failed")]
    MapGrantRef {
        /// The granting domain.
        domid: DomId,
        /// Number of refs.
        count: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `mmap` of the registered refs failed (on PV: a ref that is not granted to us).
    #[error("mmap of {count} grant refs from domain {domid} failed")]
    Mmap {
        /// The granting domain.
        domid: DomId,
        /// Number of refs.
        count: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Pages granted by another domain, mapped read-write into this process; unmapped on drop.
#[derive(Debug)]
pub struct GntdevMem {
    ptr: NonNull<u8>,
    len: usize,
    count: usize,
    index: u64,
    dev: File,
}

// SAFETY: the mapping is plain memory that every access reaches through `SharedMem`'s
// atomic/volatile methods; the raw pointer is not tied to a thread.
#[allow(unsafe_code)]
unsafe impl Send for GntdevMem {}
// SAFETY: as above; `&GntdevMem` only exposes `SharedMem`'s methods.
#[allow(unsafe_code)]
unsafe impl Sync for GntdevMem {}

impl GntdevMem {
    /// Maps `refs` (in page order) granted by domain `domid`, read-write, as one mapping.
    pub fn map(domid: DomId, refs: &[u32]) -> Result<Self, GntdevError> {
        let count = refs.len();
        if count == 0 || count > MAX_RING_PAGES {
            return Err(GntdevError::BadCount { count });
        }
        // count <= MAX_RING_PAGES, so none of these overflow.
        let (Some(buf_len), Some(len)) = (
            count
                .checked_mul(REF_SIZE)
                .and_then(|r| r.checked_add(MAP_HEADER)),
            count.checked_mul(PAGE_SIZE),
        ) else {
            return Err(GntdevError::BadCount { count });
        };
        let dev = open_device(GNTDEV_PATH, false).map_err(GntdevError::Open)?;
        let mut buf = vec![0u8; buf_len];
        let count32 = u32::try_from(count).map_err(|_| GntdevError::BadCount { count })?;
        let mut ok = put_u32(&mut buf, 0, count32);
        let mut at = MAP_HEADER;
        for &gref in refs {
            ok &= put_u32(&mut buf, at, u32::from(domid));
            ok &= put_u32(&mut buf, at.saturating_add(4), gref);
            at = at.saturating_add(REF_SIZE);
        }
        let map_err = |source| GntdevError::MapGrantRef {
            domid,
            count,
            source,
        };
        if !ok {
            return Err(map_err(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        // SAFETY: `buf` holds the 16-byte header plus `count` 8-byte refs, exactly what the
        // kernel reads for `count` refs (and the header it writes `index` into).
        #[allow(unsafe_code)]
        unsafe { ioctl_buf(dev.as_fd(), IOCTL_MAP, &mut buf) }.map_err(map_err)?;
        let index =
            get_u64(&buf, 8).ok_or_else(|| map_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: the ioctl just registered `count` pages at offset `index` of this gntdev
        // fd; they stay registered until IOCTL_GNTDEV_UNMAP_GRANT_REF in `drop`, after the
        // munmap.
        #[allow(unsafe_code)]
        let mapped = unsafe { map_device(dev.as_fd(), len, index) };
        let ptr = match mapped {
            Ok(ptr) => ptr,
            Err(source) => {
                unmap_refs(&dev, index, count32);
                return Err(GntdevError::Mmap {
                    domid,
                    count,
                    source,
                });
            }
        };
        Ok(Self {
            ptr,
            len,
            count,
            index,
            dev,
        })
    }

    /// Number of pages mapped.
    pub fn pages(&self) -> usize {
        self.count
    }
}

/// Releases `count` refs registered at `index` (best effort: on failure the kernel releases
/// them when the fd is closed).
fn unmap_refs(dev: &File, index: u64, count: u32) {
    let mut buf = [0u8; 16];
    let ok = super::put(&mut buf, 0, &index.to_ne_bytes()) && put_u32(&mut buf, 8, count);
    if ok {
        // SAFETY: `buf` is the 16-byte `struct ioctl_gntdev_unmap_grant_ref`.
        #[allow(unsafe_code)]
        let _ = unsafe { ioctl_buf(dev.as_fd(), IOCTL_UNMAP, &mut buf) };
    }
}

impl Drop for GntdevMem {
    fn drop(&mut self) {
        // SAFETY: `ptr .. ptr + len` is the mapping made in `map`, unmapped only here; no
        // Rust reference into it exists (SharedMem's contract).
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
        let count = u32::try_from(self.count).unwrap_or(0);
        unmap_refs(&self.dev, self.index, count);
    }
}

// SAFETY: `ptr` is page-aligned (mmap), fixed for the value's life, `len` bytes long, valid
// for reads and writes until `drop` unmaps it; the granting domain may change any byte, which
// SharedMem's provided methods tolerate; nothing here forms a reference into it.
#[allow(unsafe_code)]
unsafe impl SharedMem for GntdevMem {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_counts_before_touching_the_device() {
        assert!(matches!(
            GntdevMem::map(0, &[]),
            Err(GntdevError::BadCount { count: 0 })
        ));
        let too_many = vec![1u32; MAX_RING_PAGES + 1];
        assert!(matches!(
            GntdevMem::map(0, &too_many),
            Err(GntdevError::BadCount { .. })
        ));
    }
}
