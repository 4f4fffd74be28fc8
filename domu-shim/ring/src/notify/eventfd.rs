//! [`EventFdNotifier`]: the ring's doorbell over two eventfds (sandbox backend), and the
//! `poll` wait shared with the Xen event-channel device.

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation
)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::{Notifier, NotifyError, Wake};

/// A [`Notifier`] over two non-blocking eventfds: one we write to signal the peer, one we
/// poll and drain to wait.
///
/// The fds are close-on-exec; they survive `fork`, so a sandbox forks after
/// [`EventFdNotifier::pair`], keeps one end in each process and drops the other.
#[derive(Debug)]
pub struct EventFdNotifier {
    signal: File,
    wait: File,
}

impl EventFdNotifier {
    /// Creates two eventfds and returns `(backend, frontend)` ends: the backend signals the
    /// one the frontend waits on, and the other way round.
    pub fn pair() -> Result<(Self, Self), NotifyError> {
        let to_frontend = new_eventfd()?;
        let to_backend = new_eventfd()?;
        let backend = Self {
            signal: File::from(to_frontend.try_clone().map_err(NotifyError::Dup)?),
            wait: File::from(to_backend.try_clone().map_err(NotifyError::Dup)?),
        };
        let frontend = Self {
            signal: File::from(to_backend),
            wait: File::from(to_frontend),
        };
        Ok((backend, frontend))
    }

    /// An end made of an eventfd to signal the peer and an eventfd to wait on (e.g. fds
    /// inherited from the agent). Both must be eventfds opened `EFD_NONBLOCK`.
    pub fn from_fds(signal: OwnedFd, wait: OwnedFd) -> Self {
        Self {
            signal: File::from(signal),
            wait: File::from(wait),
        }
    }

    /// The eventfd this end writes to signal the peer.
    pub fn signal_fd(&self) -> BorrowedFd<'_> {
        self.signal.as_fd()
    }

    /// The eventfd this end waits on.
    pub fn wait_fd(&self) -> BorrowedFd<'_> {
        self.wait.as_fd()
    }
}

fn new_eventfd() -> Result<OwnedFd, NotifyError> {
    // SAFETY: plain syscall with valid flags; it returns a new fd or -1.
    #[allow(unsafe_code)]
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(NotifyError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a freshly created fd that nothing else owns.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl Notifier for EventFdNotifier {
    fn notify(&self) -> Result<(), NotifyError> {
        loop {
            match (&self.signal).write(&1u64.to_ne_bytes()) {
                Ok(_) => return Ok(()),
                // The counter is saturated: a wake-up is already pending.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(NotifyError::Signal {
                        fd: self.signal.as_raw_fd(),
                        source,
                    })
                }
            }
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        if !poll_readable(self.wait.as_fd(), timeout)? {
            return Ok(Wake::TimedOut);
        }
        let mut counter = [0u8; 8];
        match (&self.wait).read(&mut counter) {
            // Drained, or someone else drained it first: either way, re-check the ring.
            Ok(_) => Ok(Wake::Notified),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Wake::Notified),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Wake::Notified),
            Err(source) => Err(NotifyError::Wait {
                fd: self.wait.as_raw_fd(),
                source,
            }),
        }
    }
}

/// Waits until `fd` is readable (`true`) or `timeout` has passed (`false`; `None` waits for
/// ever), across `EINTR` and `poll`'s millisecond rounding. An fd that `poll` reports in
/// error or invalid is [`NotifyError::BadFd`]. Shared by every notifier that sleeps on an
/// fd (eventfds here, the Xen event channel device).
pub(crate) fn poll_readable(
    fd: BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> Result<bool, NotifyError> {
    let raw = fd.as_raw_fd();
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        let timeout_ms = match deadline {
            None if timeout.is_some() => i32::MAX, // absurdly long timeout
            None => -1,
            Some(d) => poll_millis(d.saturating_duration_since(Instant::now())),
        };
        let mut pfd = libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid, writable pollfd and we pass a count of 1; `fd` is
        // borrowed, so it stays open for the call.
        #[allow(unsafe_code)]
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ready < 0 {
            let source = io::Error::last_os_error();
            if source.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(NotifyError::Wait { fd: raw, source });
        }
        if ready == 0 {
            if deadline.is_some_and(|d| Instant::now() < d) {
                continue; // poll rounds to milliseconds; finish the wait
            }
            return Ok(false);
        }
        if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(NotifyError::BadFd {
                fd: raw,
                revents: pfd.revents,
            });
        }
        return Ok(true);
    }
}

/// Milliseconds for `poll`, rounded up so that a wait never ends early, capped at `i32::MAX`.
fn poll_millis(d: Duration) -> i32 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    i32::try_from(ms).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_cross_and_coalesce() {
        let (backend, frontend) = EventFdNotifier::pair().unwrap();
        assert_eq!(
            frontend.wait(Some(Duration::from_millis(1))).unwrap(),
            Wake::TimedOut
        );
        backend.notify().unwrap();
        backend.notify().unwrap();
        assert_eq!(frontend.wait(None).unwrap(), Wake::Notified);
        // Coalesced: the second notify was drained with the first.
        assert_eq!(frontend.wait(Some(Duration::ZERO)).unwrap(), Wake::TimedOut);
        // Directions are independent.
        assert_eq!(backend.wait(Some(Duration::ZERO)).unwrap(), Wake::TimedOut);
        frontend.notify().unwrap();
        assert_eq!(
            backend.wait(Some(Duration::from_secs(5))).unwrap(),
            Wake::Notified
        );
    }

    #[test]
    fn saturated_counter_does_not_block_or_fail() {
        let (backend, frontend) = EventFdNotifier::pair().unwrap();
        // A hostile peer pushes the counter to its maximum (0xffff_ffff_ffff_fffe).
        (&frontend.wait)
            .write_all(&(u64::MAX - 1).to_ne_bytes())
            .unwrap();
        backend.notify().unwrap();
        assert_eq!(frontend.wait(None).unwrap(), Wake::Notified);
    }

    #[test]
    fn waits_honour_the_timeout() {
        let (backend, _frontend) = EventFdNotifier::pair().unwrap();
        let start = Instant::now();
        assert_eq!(
            backend.wait(Some(Duration::from_millis(30))).unwrap(),
            Wake::TimedOut
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(poll_millis(Duration::from_nanos(1)), 1);
        assert_eq!(poll_millis(Duration::MAX), i32::MAX);
    }
}
