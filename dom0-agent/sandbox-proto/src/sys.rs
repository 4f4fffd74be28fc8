//! The system calls both sides of the sandbox use: pidfds and `setpriority` (rustix's safe
//! wrappers, with the agent's conventions: a kill of a process already gone is no error),
//! `sendmsg`/`recvmsg` with fds and no heap allocation (nix's and rustix's build or take
//! their control buffers in ways that allocate or need `unsafe` at the call anyway: kept
//! by hand, each `unsafe` block with its argument), a deadline-aware `poll`, and
//! close-on-exec for a descriptor a C library opened ([`set_cloexec`]: the TPM crate's, which
//! forbids `unsafe`). None of these functions allocates.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use rustix::process::{Pid, PidfdFlags, Signal};

/// Takes ownership of an fd the kernel just installed for us (received with `SCM_RIGHTS`).
pub fn owned_from_scm_rights(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `fd` in this process while receiving the message; nothing
    // else in the process knows its number, so this is its only owner.
    #[allow(unsafe_code)]
    unsafe {
        OwnedFd::from_raw_fd(fd)
    }
}

/// `pidfd_open(pid, 0)`; `EINVAL` for a pid that is not positive.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// `pidfd_send_signal(pidfd, signal, NULL, 0)`. A process that already exited (`ESRCH`) is
/// not an error: it can no longer run, which is what a kill wants.
/// `EINVAL` for a number that is not a named signal.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    let signal =
        Signal::from_named_raw(signal).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    match rustix::process::pidfd_send_signal(pidfd, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Milliseconds for `poll`, rounded up so a wait never ends early, capped at `i32::MAX`.
pub fn poll_timeout(remaining: Option<Duration>) -> PollTimeout {
    match remaining {
        None => PollTimeout::NONE,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            let ms = i32::try_from(ms).unwrap_or(i32::MAX);
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// Polls `fds` for readability until one is ready or `timeout` passes (`None`: forever).
/// Returns, per fd, whether it is readable (or hung up / in error, which a read will report).
pub fn wait_readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout: Option<Duration>,
) -> io::Result<[bool; N]> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        let remaining = match (deadline, timeout) {
            (Some(d), _) => Some(d.saturating_duration_since(Instant::now())),
            (None, Some(_)) => Some(Duration::from_millis(i32::MAX.unsigned_abs().into())),
            (None, None) => None,
        };
        let mut pfds = fds.map(|fd| PollFd::new(fd, PollFlags::POLLIN));
        match nix::poll::poll(&mut pfds, poll_timeout(remaining)) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() < d) {
                    continue; // rounding; finish the wait
                }
                if timeout.is_some() && deadline.is_none() {
                    continue;
                }
                return Ok([false; N]);
            }
            Ok(_) => {
                let ready = PollFlags::POLLIN
                    | PollFlags::POLLHUP
                    | PollFlags::POLLERR
                    | PollFlags::POLLNVAL;
                return Ok(pfds.map(|p| p.revents().is_some_and(|r| r.intersects(ready))));
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether the process behind `pidfd` has exited, waiting at most `timeout`.
pub fn pidfd_exited(pidfd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    wait_readable([pidfd], Some(timeout)).map(|[r]| r)
}

/// Most fds one control message carries (`SCM_RIGHTS`).
pub const MAX_SCM_FDS: usize = 3;

/// Room for one `SCM_RIGHTS` control message of up to [`MAX_SCM_FDS`] fds, aligned as
/// `cmsghdr` requires. On the stack: `sendmsg`/`recvmsg` here never allocate (in the zygote
/// every heap write after a `fork` is a copy-on-write fault).
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

// SAFETY: `CMSG_SPACE` is a pure computation on its argument (12: no truncation).
#[allow(unsafe_code, clippy::cast_possible_truncation)]
const SCM_SPACE: usize = unsafe {
    libc::CMSG_SPACE((MAX_SCM_FDS * std::mem::size_of::<RawFd>()) as libc::c_uint) as usize
};
const _: () = assert!(SCM_SPACE <= 64, "CmsgBuf too small");

/// `sendmsg(sock, bytes, SCM_RIGHTS fds, MSG_NOSIGNAL | flags)`, retried on `EINTR`.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[RawFd],
    flags: libc::c_int,
) -> Result<(), nix::errno::Errno> {
    if fds.len() > MAX_SCM_FDS {
        return Err(nix::errno::Errno::EINVAL);
    }
    let mut cmsg = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero `msghdr` is a valid value of this plain C struct.
    #[allow(unsafe_code)]
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds);
        let n = libc::c_uint::try_from(data_len).map_err(|_| nix::errno::Errno::EINVAL)?;
        // SAFETY: pure computations on a length of at most 12.
        #[allow(unsafe_code)]
        let (space, len) = unsafe { (libc::CMSG_SPACE(n) as usize, libc::CMSG_LEN(n) as usize) };
        hdr.msg_control = cmsg.0.as_mut_ptr().cast();
        hdr.msg_controllen = space;
        // SAFETY: `hdr` points at `cmsg`, 64 aligned bytes, at least `space` (checked at
        // compile time), so the first header and its `data_len` bytes of data lie inside it;
        // the kernel only reads the buffers while `sendmsg` runs, and `iov` points at
        // `bytes`, which it only reads.
        #[allow(unsafe_code)]
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = len;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), data_len);
        }
    }
    loop {
        // SAFETY: `hdr` and everything it points to live across the call (see above).
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL | flags) };
        if rc >= 0 {
            return Ok(());
        }
        match nix::errno::Errno::last() {
            nix::errno::Errno::EINTR => {}
            e => return Err(e),
        }
    }
}

/// What [`recv_with_fds`] received.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the message.
    pub len: usize,
    /// `msg_flags` (`MSG_TRUNC`, `MSG_CTRUNC`).
    pub flags: libc::c_int,
    /// The fds that came with it, in order.
    pub fds: ScmFds,
}

/// Up to [`MAX_SCM_FDS`] received fds, owned, without a heap allocation; fds past the room
/// are closed but still counted, so a peer that sent too many fails every count check.
#[derive(Debug, Default)]
pub struct ScmFds {
    fds: [Option<OwnedFd>; MAX_SCM_FDS],
    len: usize,
    /// Received past the room, and closed.
    dropped: usize,
}

impl ScmFds {
    /// How many were received (kept or closed for want of room).
    pub fn len(&self) -> usize {
        self.len.saturating_add(self.dropped)
    }

    /// Whether none was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All of them, if there are exactly `N` (and none was dropped).
    pub fn exactly<const N: usize>(self) -> Option<[OwnedFd; N]> {
        if self.len() != N {
            return None;
        }
        let mut it = self.fds.into_iter().flatten();
        let out: [Option<OwnedFd>; N] = std::array::from_fn(|_| it.next());
        if out.iter().any(Option::is_none) {
            return None;
        }
        Some(out.map(|fd| fd.expect("checked above")))
    }

    /// Keeps `fd`, or closes it and counts it if there is no room.
    fn push(&mut self, fd: OwnedFd) {
        match self.fds.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(fd);
                self.len += 1;
            }
            None => {
                drop(fd);
                self.dropped = self.dropped.saturating_add(1);
            }
        }
    }
}

impl IntoIterator for ScmFds {
    type Item = OwnedFd;
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<OwnedFd>, MAX_SCM_FDS>>;

    fn into_iter(self) -> Self::IntoIter {
        self.fds.into_iter().flatten()
    }
}

/// `recvmsg(sock, buf, MSG_CMSG_CLOEXEC)` with room for [`MAX_SCM_FDS`] fds, retried on
/// `EINTR`. Every fd the kernel installed is owned by the result, or closed and counted if
/// it was past the room (the control buffer's alignment can fit one more fd than
/// [`MAX_SCM_FDS`]; beyond that the kernel reports `MSG_CTRUNC`).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Received, nix::errno::Errno> {
    let mut cmsg = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero `msghdr` is a valid value of this plain C struct.
    #[allow(unsafe_code)]
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = cmsg.0.as_mut_ptr().cast();
    hdr.msg_controllen = SCM_SPACE;
    let len = loop {
        // SAFETY: `iov` points at `buf` and `msg_control` at `cmsg` (`SCM_SPACE` of its 64
        // bytes), both writable and alive across the call.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if rc >= 0 {
            break usize::try_from(rc).unwrap_or(0);
        }
        match nix::errno::Errno::last() {
            nix::errno::Errno::EINTR => {}
            e => return Err(e),
        }
    };
    let mut fds = ScmFds::default();
    // SAFETY: the kernel filled `hdr.msg_control`/`msg_controllen` with well-formed control
    // messages inside `cmsg`; CMSG_FIRSTHDR/CMSG_NXTHDR stay within `msg_controllen`, and
    // each SCM_RIGHTS payload is `cmsg_len - CMSG_LEN(0)` bytes of ints, read unaligned.
    #[allow(unsafe_code)]
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = (*c).cmsg_len.saturating_sub(libc::CMSG_LEN(0) as usize);
                let n = bytes / std::mem::size_of::<RawFd>();
                for i in 0..n {
                    let raw = std::ptr::read_unaligned(
                        data.add(i * std::mem::size_of::<RawFd>()).cast::<RawFd>(),
                    );
                    // Owned either way: kept, or closed and counted past the room.
                    fds.push(owned_from_scm_rights(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    Ok(Received {
        len,
        flags: hdr.msg_flags,
        fds,
    })
}

/// `setpriority(PRIO_PROCESS, pid, nice)`; `pid` 0 is the caller.
pub fn set_nice(pid: u32, nice: i32) -> io::Result<()> {
    let pid = match i32::try_from(pid) {
        Ok(0) => None,
        Ok(p) => Some(Pid::from_raw(p).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?),
        Err(_) => return Err(io::Error::from_raw_os_error(libc::ESRCH)),
    };
    Ok(rustix::process::setpriority_process(pid, nice)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn pidfd_reports_exit_and_kill_of_dead_process_is_ok() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let fd = pidfd_open(pid).unwrap();
        assert!(!pidfd_exited(fd.as_fd(), Duration::ZERO).unwrap());
        pidfd_send_signal(fd.as_fd(), libc::SIGKILL).unwrap();
        assert!(pidfd_exited(fd.as_fd(), Duration::from_secs(10)).unwrap());
        child.wait().unwrap();
        // Reaped: still no error.
        pidfd_send_signal(fd.as_fd(), libc::SIGKILL).unwrap();
    }

    #[test]
    fn poll_timeouts_round_up() {
        assert_eq!(
            poll_timeout(Some(Duration::from_nanos(1))),
            PollTimeout::try_from(1).unwrap()
        );
        assert_eq!(poll_timeout(Some(Duration::MAX)), PollTimeout::MAX);
        assert_eq!(poll_timeout(None), PollTimeout::NONE);
    }
}

/// Sets close-on-exec on descriptor `fd` of this process, one that a C library opened
/// without it and keeps (libtss2's TPM device: no Rust value owns it, so there is no `AsFd`
/// to hand to `fcntl`). A number that is not open fails with `EBADF`; a negative one with
/// `EINVAL`.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `fd` is not -1, and it is borrowed only for the two `fcntl` calls below, which
    // read and set the descriptor flags of that one number and touch no memory of ours. If
    // the number was closed meanwhile they fail with EBADF; if it was reused, close-on-exec
    // is set on the newcomer, which only keeps it from leaking into a child.
    #[allow(unsafe_code)]
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = rustix::io::fcntl_getfd(borrowed)?;
    rustix::io::fcntl_setfd(borrowed, flags | rustix::io::FdFlags::CLOEXEC)?;
    Ok(())
}

#[cfg(test)]
mod cloexec_tests {
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};

    /// A descriptor made inheritable (as a C library's `open` without `O_CLOEXEC` leaves
    /// it) is close-on-exec again after `set_cloexec`; a number that is not open is an
    /// error.
    #[test]
    fn set_cloexec_sets_the_flag_and_refuses_bad_numbers() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd: OwnedFd = file.into();
        rustix::io::fcntl_setfd(fd.as_fd(), rustix::io::FdFlags::empty()).unwrap();
        super::set_cloexec(fd.as_raw_fd()).unwrap();
        let flags = rustix::io::fcntl_getfd(fd.as_fd()).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        // Above any descriptor limit: never open (a just-closed number could be reused by
        // another test's thread).
        assert!(super::set_cloexec(1 << 30).is_err());
        assert!(super::set_cloexec(-1).is_err());
    }
}
