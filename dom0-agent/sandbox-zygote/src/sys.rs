//! The zygote's own system calls nix does not cover: `close_range`, raw `dup2` and
//! `F_DUPFD_CLOEXEC`, `wait4` with resource usage, `_exit`. Functions that close or replace
//! fds by number are `unsafe fn`: the caller must know that nothing live owns those numbers.
//! None of these functions allocates.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Closes every fd in `first ..= last`.
///
/// # Safety
/// No value that is still used or dropped by this process may own an fd in the range (for
/// instance: the zygote right after `exec`, before it opened anything; a forked clone that
/// never returns into the zygote's frames).
#[allow(unsafe_code)]
pub(crate) unsafe fn close_range(first: u32, last: u32) -> io::Result<()> {
    if first > last {
        return Ok(());
    }
    // SAFETY: closes fds by number; the caller guarantees nothing live owns them.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `dup2(old, new)` by number (the new fd is not close-on-exec).
///
/// # Safety
/// As for [`close_range`], for whatever fd `new` held before.
#[allow(unsafe_code)]
pub(crate) unsafe fn dup2_raw(old: RawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: replaces fd `new`, which the caller guarantees nothing live owns.
    let rc = unsafe { libc::dup2(old, new) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`: a copy at the lowest free number `>= min`.
pub(crate) fn dup_at_least(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: plain fcntl creating a new fd that the caller takes charge of.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Takes ownership of an fd number the caller arranged itself (e.g. with [`dup2_raw`]).
///
/// # Safety
/// `fd` must be open and owned by no other value; the caller hands its ownership over.
#[allow(unsafe_code)]
pub(crate) unsafe fn own_arranged_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: open and unowned, by the function contract.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What [`reap_one`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Exited with this status (reaped).
    Exited(i32),
    /// Killed by this signal (reaped).
    Signaled(i32),
    /// Stopped by this signal (still alive, not reaped).
    Stopped(i32),
}

/// A child found by [`reap_one`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reaped {
    pub pid: i32,
    pub outcome: Outcome,
    /// User plus system CPU time, milliseconds (saturating; 0 for a stop).
    pub cpu_ms: u32,
}

/// `wait4(-1, WUNTRACED | WNOHANG-or-0)`: reaps one exited child or reports one stopped
/// child. `Ok(None)`: nothing changed yet (only with `nohang`) or no children left.
pub(crate) fn reap_one(nohang: bool) -> io::Result<Option<Reaped>> {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    #[allow(unsafe_code)]
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = libc::WUNTRACED | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: `status` and `usage` are valid, writable out-parameters.
        #[allow(unsafe_code)]
        let pid = unsafe { libc::wait4(-1, &mut status, flags, &mut usage) };
        if pid == 0 {
            return Ok(None);
        }
        if pid < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => return Ok(None),
                _ => return Err(e),
            }
        }
        let outcome = if libc::WIFSTOPPED(status) {
            Outcome::Stopped(libc::WSTOPSIG(status))
        } else if libc::WIFSIGNALED(status) {
            Outcome::Signaled(libc::WTERMSIG(status))
        } else {
            Outcome::Exited(libc::WEXITSTATUS(status))
        };
        let ms = |t: libc::timeval| {
            u64::try_from(t.tv_sec)
                .unwrap_or(0)
                .saturating_mul(1000)
                .saturating_add(u64::try_from(t.tv_usec).unwrap_or(0) / 1000)
        };
        let cpu = ms(usage.ru_utime).saturating_add(ms(usage.ru_stime));
        return Ok(Some(Reaped {
            pid,
            outcome,
            cpu_ms: u32::try_from(cpu).unwrap_or(u32::MAX),
        }));
    }
}

/// `_exit(code)`: ends the process at once, without destructors, `atexit` handlers or
/// stdio flushing (a forked clone must not run the zygote's cleanup).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` takes a plain integer and never returns; skipping destructors is the
    // point (nothing here relies on them for soundness).
    #[allow(unsafe_code)]
    unsafe {
        libc::_exit(code)
    }
}
