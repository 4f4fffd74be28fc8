//! [`GntallocMem`]: dom0 allocates pages and grants them to a domain, through
//! `/dev/xen/gntalloc` (the kernel-device equivalent of libxengnttab's `xengntshr_share`).
//!
//! Argument layout (`struct ioctl_gntalloc_alloc_gref`, native-endian):
//!
//! ```text
//!  0  u16 domid        domain the pages are granted to
//!  2  u16 flags        GNTALLOC_FLAG_WRITABLE = 1
//!  4  u32 count
//!  8  u64 index        (out) offset to pass to mmap
//! 16  u32 gref_ids[count]   (out) the grant references, in page order
//! ```
//!
//! The pages are zeroed by the kernel. Drop unmaps them and deallocates the grants (the
//! kernel ends a grant the peer still maps once the peer unmaps it).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use super::{
    get_u32, get_u64, ioc_none, ioctl_buf, map_device, open_device, put, put_u16, put_u32,
};
use super::{DomId, MAX_RING_PAGES};
use crate::mem::{SharedMem, PAGE_SIZE};

/// The gntalloc device node.
pub const GNTALLOC_PATH: &str = "/dev/xen/gntalloc";

const ALLOC_HEADER: usize = 16;
const ALLOC_MIN: usize = 24;
const GNTALLOC_FLAG_WRITABLE: u16 = 1;
const IOCTL_ALLOC: u32 = ioc_none(b'G', 5, 24);
const IOCTL_DEALLOC: u32 = ioc_none(b'G', 6, 16);

/// Granting pages failed.
#[derive(Debug, thiserror::Error)]
pub enum GntallocError {
    /// No pages, or more than [`MAX_RING_PAGES`].
    #[error("{count} pages requested; between 1 and {MAX_RING_PAGES} are allowed")]
    BadCount {
        /// The refused count.
        count: usize,
    },
    /// Opening `/dev/xen/gntalloc` failed.
    #[error("opening {GNTALLOC_PATH} failed")]
    Open(#[source] io::Error),
    /// `IOCTL_GNTALLOC_ALLOC_GREF` failed.
    #[error("IOCTL_GNTALLOC_ALLOC_GREF of {count} pages for domain {domid} failed")]
    Alloc {
        /// The domain granted to.
        domid: DomId,
        /// Number of pages.
        count: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `mmap` of the granted pages failed.
    #[error("mmap of {count} granted pages failed")]
    Mmap {
        /// Number of pages.
        count: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Zeroed pages granted writable to one domain and mapped here; ungranted on drop.
#[derive(Debug)]
pub struct GntallocMem {
    ptr: NonNull<u8>,
    len: usize,
    index: u64,
    count: u32,
    refs: Vec<u32>,
    dev: File,
}

// SAFETY: plain memory reached only through `SharedMem`'s atomic/volatile methods.
#[allow(unsafe_code)]
unsafe impl Send for GntallocMem {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for GntallocMem {}

impl GntallocMem {
    /// Allocates `pages` zeroed pages, grants them writable to `domid` and maps them.
    pub fn share(domid: DomId, pages: usize) -> Result<Self, GntallocError> {
        if pages == 0 || pages > MAX_RING_PAGES {
            return Err(GntallocError::BadCount { count: pages });
        }
        let bad = GntallocError::BadCount { count: pages };
        let count = u32::try_from(pages).map_err(|_| GntallocError::BadCount { count: pages })?;
        let buf_len = pages
            .checked_mul(4)
            .and_then(|r| r.checked_add(ALLOC_HEADER))
            .ok_or(bad)?
            .max(ALLOC_MIN);
        let len = pages
            .checked_mul(PAGE_SIZE)
            .ok_or(GntallocError::BadCount { count: pages })?;
        let dev = open_device(GNTALLOC_PATH, false).map_err(GntallocError::Open)?;
        let mut buf = vec![0u8; buf_len];
        let alloc_err = |source| GntallocError::Alloc {
            domid,
            count: pages,
            source,
        };
        if !(put_u16(&mut buf, 0, domid)
            && put_u16(&mut buf, 2, GNTALLOC_FLAG_WRITABLE)
            && put_u32(&mut buf, 4, count))
        {
            return Err(alloc_err(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        // SAFETY: `buf` holds the 16-byte header plus `count` u32 ref slots (at least the
        // structure's 24 bytes): everything the kernel reads and writes for `count` pages.
        #[allow(unsafe_code)]
        unsafe { ioctl_buf(dev.as_fd(), IOCTL_ALLOC, &mut buf) }.map_err(alloc_err)?;
        let einval = || alloc_err(io::Error::from_raw_os_error(libc::EINVAL));
        let index = get_u64(&buf, 8).ok_or_else(einval)?;
        let mut refs = Vec::with_capacity(pages);
        for i in 0..pages {
            let at = i.saturating_mul(4).saturating_add(ALLOC_HEADER);
            refs.push(get_u32(&buf, at).ok_or_else(einval)?);
        }
        // SAFETY: the ioctl just allocated `count` pages at offset `index` of this gntalloc
        // fd; they stay allocated until IOCTL_GNTALLOC_DEALLOC_GREF in `drop`, after munmap.
        #[allow(unsafe_code)]
        let mapped = unsafe { map_device(dev.as_fd(), len, index) };
        let ptr = match mapped {
            Ok(ptr) => ptr,
            Err(source) => {
                dealloc(&dev, index, count);
                return Err(GntallocError::Mmap {
                    count: pages,
                    source,
                });
            }
        };
        Ok(Self {
            ptr,
            len,
            index,
            count,
            refs,
            dev,
        })
    }

    /// The grant references, in page order (what the peer passes to [`super::GntdevMem::map`]).
    pub fn refs(&self) -> &[u32] {
        &self.refs
    }
}

fn dealloc(dev: &File, index: u64, count: u32) {
    let mut buf = [0u8; 16];
    if put(&mut buf, 0, &index.to_ne_bytes()) && put_u32(&mut buf, 8, count) {
        // SAFETY: `buf` is the 16-byte `struct ioctl_gntalloc_dealloc_gref`.
        #[allow(unsafe_code)]
        let _ = unsafe { ioctl_buf(dev.as_fd(), IOCTL_DEALLOC, &mut buf) };
    }
}

impl Drop for GntallocMem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `share`, unmapped only here; no references into it.
        #[allow(unsafe_code)]
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
        dealloc(&self.dev, self.index, self.count);
    }
}

// SAFETY: `ptr` is page-aligned (mmap), fixed, `len` bytes, valid for reads and writes until
// `drop`; the grantee may change any byte, which SharedMem's methods tolerate.
#[allow(unsafe_code)]
unsafe impl SharedMem for GntallocMem {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }

    fn len(&self) -> usize {
        self.len
    }
}
