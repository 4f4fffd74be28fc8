//! Dom0 pages granted to a domU (libxengnttab's `xengntshr_*`, Linux's gntalloc): the
//! backing memory of a domain's ring.
//!
//! ```text
//!  GrantedPages::share(domid, N)     N fresh, zeroed dom0 pages, mapped here at base;
//!     refs[0..N]                     grant refs, writable by domid, in page order
//!                                    → xenstore data/mayfly/ring-refs
//!  drop                              xengntshr_unshare: our mapping goes; Linux frees a
//!                                    page once the domU's mapping of it is gone too
//! ```
//!
//! The domU maps the refs (gntdev) and may write any byte at any time: the pages are only
//! ever accessed through [`SharedMem`]'s bounded, volatile accessors.
//!
//! Linux's gntalloc shares at most `limit` pages at once across dom0 (module parameter,
//! default 1024). A ring of the default geometry takes 69 pages: size the pool below it or
//! raise the limit (`modprobe xen-gntalloc limit=N`, or at run time
//! `/sys/module/xen_gntalloc/parameters/limit`, which the appliance's `S20xen` sets to 8192).

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use mayfly_ring::mem::PAGE_SIZE;
use mayfly_ring::SharedMem;
use mayfly_xen_sys::soname;
use mayfly_xen_sys::types::xengntshr_handle;

use crate::libs::{sym, Libraries, LoadError};
use crate::DomId;

/// Most pages one share may hold (a ring's largest geometry is 1 + 256 x 17 pages).
pub const MAX_PAGES: usize = 1 + 256 * 17;

/// Sharing pages failed.
#[derive(Debug, thiserror::Error)]
pub enum GntshrError {
    /// A function could not be resolved.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `xengntshr_open` failed (`/dev/xen/gntalloc` missing: xen-gntalloc not loaded?).
    #[error("xengntshr_open failed (is the xen-gntalloc module loaded?)")]
    Open(#[source] io::Error),
    /// The page count is 0 or above [`MAX_PAGES`].
    #[error("cannot share {pages} pages (1..={MAX_PAGES})")]
    BadCount {
        /// Pages asked for.
        pages: usize,
    },
    /// `xengntshr_share_pages` failed (ENOSPC/ENOMEM: gntalloc's page limit reached?).
    #[error("xengntshr_share_pages({pages} pages to domain {domid}) failed")]
    Share {
        /// The domain.
        domid: DomId,
        /// Pages asked for.
        pages: usize,
        /// errno.
        #[source]
        source: io::Error,
    },
}

/// Pages granted writable to one domain, mapped in this process. Unshared on drop.
pub struct GrantedPages {
    libs: Arc<Libraries>,
    xgs: NonNull<xengntshr_handle>,
    base: NonNull<u8>,
    pages: usize,
    refs: Vec<u32>,
    domid: DomId,
}

// SAFETY: the mapping is process memory valid until `drop`; the handle is only used by
// `share` and `drop`, which own `self`. Concurrent accesses to the bytes go through
// `SharedMem`'s atomic and volatile accessors.
unsafe impl Send for GrantedPages {}
// SAFETY: as above: `&self` methods only read `base`/`len`.
unsafe impl Sync for GrantedPages {}

impl std::fmt::Debug for GrantedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantedPages")
            .field("domid", &self.domid)
            .field("pages", &self.pages)
            .field("refs", &self.refs)
            .finish_non_exhaustive()
    }
}

impl GrantedPages {
    /// Allocates `pages` zeroed pages, grants them writable to `domid` and maps them here.
    pub fn share(libs: Arc<Libraries>, domid: DomId, pages: usize) -> Result<Self, GntshrError> {
        if pages == 0 || pages > MAX_PAGES {
            return Err(GntshrError::BadCount { pages });
        }
        let count = i32::try_from(pages).map_err(|_| GntshrError::BadCount { pages })?;
        let x = soname::XENGNTTAB;
        let open = sym!(libs.gnttab, x, xengntshr_open)?;
        let close = sym!(libs.gnttab, x, xengntshr_close)?;
        let share = sym!(libs.gnttab, x, xengntshr_share_pages)?;
        // SAFETY: a null logger selects the default; flags 0.
        let raw = unsafe { open(std::ptr::null_mut(), 0) };
        let xgs = NonNull::new(raw).ok_or_else(|| GntshrError::Open(io::Error::last_os_error()))?;
        let mut refs = vec![0u32; pages];
        // SAFETY: a live handle; `refs` has room for `count` refs; writable = 1.
        let addr = unsafe { share(xgs.as_ptr(), domid, count, refs.as_mut_ptr(), 1) };
        let Some(base) = NonNull::new(addr.cast::<u8>()) else {
            let source = io::Error::last_os_error();
            // SAFETY: the handle was opened above and is closed once, on this error path.
            unsafe { close(xgs.as_ptr()) };
            return Err(GntshrError::Share {
                domid,
                pages,
                source,
            });
        };
        Ok(Self {
            libs,
            xgs,
            base,
            pages,
            refs,
            domid,
        })
    }

    /// The grant refs, in page order.
    pub fn refs(&self) -> &[u32] {
        &self.refs
    }

    /// Pages shared.
    pub fn pages(&self) -> usize {
        self.pages
    }
}

// SAFETY: `base` is the page-aligned start of a `pages * PAGE_SIZE`-byte shared mapping
// made by xengntshr_share_pages (mmap of gntalloc), readable and writable, which stays
// mapped until `drop`; `base` and `len` never change; this crate never forms a Rust
// reference into it.
unsafe impl SharedMem for GrantedPages {
    fn base(&self) -> NonNull<u8> {
        self.base
    }

    fn len(&self) -> usize {
        self.pages.saturating_mul(PAGE_SIZE)
    }
}

impl Drop for GrantedPages {
    fn drop(&mut self) {
        let x = soname::XENGNTTAB;
        if let Ok(unshare) = sym!(self.libs.gnttab, x, xengntshr_unshare) {
            let count = u32::try_from(self.pages).unwrap_or(0);
            // SAFETY: `base` and `count` are exactly what share_pages returned and took;
            // unshared once, here.
            unsafe { unshare(self.xgs.as_ptr(), self.base.as_ptr().cast(), count) };
        }
        if let Ok(close) = sym!(self.libs.gnttab, x, xengntshr_close) {
            // SAFETY: closed once, here; nothing uses the handle afterwards.
            unsafe { close(self.xgs.as_ptr()) };
        }
    }
}
