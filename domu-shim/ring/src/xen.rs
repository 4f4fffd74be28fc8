//! The ring's transport on Xen, through the Linux Xen device nodes (plain `ioctl`s, no
//! libxen): the guest's and dom0's ends of the shared pages and of the event channel.
//!
//! ```text
//!   dom0 (agent, or the test peer)                 domU (domu-shim as /init)
//!   GntallocMem::share(domid, N pages) ──refs──▶   GntdevMem::map(0, refs)
//!       /dev/xen/gntalloc                              /dev/xen/gntdev
//!   EvtchnNotifier::bind_unbound(domid) ─port──▶   EvtchnNotifier::bind_interdomain(0, port)
//!       /dev/xen/evtchn                                /dev/xen/evtchn
//! ```
//!
//! The refs and the port travel through xenstore (`/local/domain/<domid>/data/mayfly/`,
//! written by dom0 only; see `docs/formats.md` §2.5). The product's agent
//! grants pages with libxengnttab; [`GntallocMem`] is the same operation through the kernel
//! device, used by the Xen-in-QEMU suite's peer and benchmarks.
//!
//! The `ioctl` argument structures are variable-length in the kernel ABI
//! (`include/uapi/xen/{gntdev,gntalloc,evtchn}.h`), so they are built as byte buffers with
//! the fields at their documented offsets, native-endian, never as Rust references into
//! kernel-written memory.

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]

mod evtchn;
mod gntalloc;
mod gntdev;

pub use evtchn::{EvtchnError, EvtchnNotifier};
pub use gntalloc::{GntallocError, GntallocMem};
pub use gntdev::{GntdevError, GntdevMem};

/// The most pages one grant mapping may span (the ring's default geometry uses 69; the cap
/// keeps a hostile or mistaken page count from asking the kernel for a huge mapping).
pub const MAX_RING_PAGES: usize = 256;

/// A Xen domain id as the device ioctls take it.
pub type DomId = u16;

/// `_IOC(_IOC_NONE, ty, nr, size)`: Linux's ioctl request number for an argument of `size`
/// bytes that the kernel both reads and writes (the Xen devices use `_IOC_NONE`).
const fn ioc_none(ty: u8, nr: u8, size: u32) -> u32 {
    (size << 16) | ((ty as u32) << 8) | nr as u32
}

/// Writes `value` native-endian at `offset` of `buf` (`false` if it does not fit).
fn put_u32(buf: &mut [u8], offset: usize, value: u32) -> bool {
    put(buf, offset, &value.to_ne_bytes())
}

fn put_u16(buf: &mut [u8], offset: usize, value: u16) -> bool {
    put(buf, offset, &value.to_ne_bytes())
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) -> bool {
    let Some(end) = offset.checked_add(bytes.len()) else {
        return false;
    };
    match buf.get_mut(offset..end) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

fn get_u32(buf: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(4)?;
    let bytes: [u8; 4] = buf.get(offset..end)?.try_into().ok()?;
    Some(u32::from_ne_bytes(bytes))
}

fn get_u64(buf: &[u8], offset: usize) -> Option<u64> {
    let end = offset.checked_add(8)?;
    let bytes: [u8; 8] = buf.get(offset..end)?.try_into().ok()?;
    Some(u64::from_ne_bytes(bytes))
}

/// Opens a Xen device node read-write, close-on-exec (and non-blocking if asked).
fn open_device(path: &str, nonblock: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_CLOEXEC;
    if nonblock {
        flags |= libc::O_NONBLOCK;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
}

/// `ioctl(fd, request, buf)`: returns the non-negative result or the OS error.
///
/// # Safety
/// `buf` must be at least as long as the argument structure `request` makes the kernel
/// read and write (including any variable-length tail the structure's count field names).
#[allow(unsafe_code)]
unsafe fn ioctl_buf(
    fd: std::os::fd::BorrowedFd<'_>,
    request: u32,
    buf: &mut [u8],
) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: the caller guarantees `buf` covers everything the kernel touches for this
    // request; `buf` is exclusively borrowed for the call, so no Rust reference aliases it.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::Ioctl::from(request),
            buf.as_mut_ptr().cast::<libc::c_void>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_SHARED, fd, offset)` of a Xen device.
///
/// # Safety
/// The device must back `len` bytes at `offset` (a range it handed out through an ioctl)
/// for as long as the mapping is used.
#[allow(unsafe_code)]
unsafe fn map_device(
    fd: std::os::fd::BorrowedFd<'_>,
    len: usize,
    offset: u64,
) -> std::io::Result<std::ptr::NonNull<u8>> {
    use std::os::fd::AsRawFd;
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: a NULL hint lets the kernel pick an unused range (nothing existing is
    // replaced); the fd is open for the call; the caller guarantees the backing.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    std::ptr::NonNull::new(addr.cast::<u8>())
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFAULT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from include/uapi/xen/{gntdev,gntalloc,evtchn}.h on x86_64.
        assert_eq!(ioc_none(b'G', 0, 24), 0x0018_4700); // IOCTL_GNTDEV_MAP_GRANT_REF
        assert_eq!(ioc_none(b'G', 1, 16), 0x0010_4701); // IOCTL_GNTDEV_UNMAP_GRANT_REF
        assert_eq!(ioc_none(b'G', 5, 24), 0x0018_4705); // IOCTL_GNTALLOC_ALLOC_GREF
        assert_eq!(ioc_none(b'G', 6, 16), 0x0010_4706); // IOCTL_GNTALLOC_DEALLOC_GREF
        assert_eq!(ioc_none(b'E', 1, 8), 0x0008_4501); // IOCTL_EVTCHN_BIND_INTERDOMAIN
        assert_eq!(ioc_none(b'E', 2, 4), 0x0004_4502); // IOCTL_EVTCHN_BIND_UNBOUND_PORT
        assert_eq!(ioc_none(b'E', 4, 4), 0x0004_4504); // IOCTL_EVTCHN_NOTIFY
    }

    #[test]
    fn field_helpers_refuse_out_of_range() {
        let mut buf = [0u8; 8];
        assert!(put_u32(&mut buf, 4, 7));
        assert!(!put_u32(&mut buf, 5, 7));
        assert!(!put_u32(&mut buf, usize::MAX, 7));
        assert_eq!(get_u32(&buf, 4), Some(7));
        assert_eq!(get_u32(&buf, 6), None);
        assert_eq!(get_u64(&buf, 0), Some(u64::from(7u32) << 32));
        assert_eq!(get_u64(&buf, 1), None);
    }
}
