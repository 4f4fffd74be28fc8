//! Event channels through libxenevtchn, and the ring's [`Notifier`] over one.
//!
//! ```text
//!  dom0 (agent)                                     domU (domu-shim)
//!  EventChannel::bind_unbound(domid) ── port P ──▶  xenstore data/mayfly/event-channel = P
//!                                                   binds interdomain (remote dom 0, port P)
//!  notify()  ───────────────────────────────────▶   its port fires
//!  fd readable ◀─────────────────────────────────   notify on its port
//!    pending() → P, unmask(P)
//! ```
//!
//! Each channel has its own libxenevtchn handle, so its fd fires for that domain's port
//! only. A Xen event channel does not tell its dom0 end that the domain died: the
//! [`DomainNotifier`] therefore waits in slices of [`LIVENESS_SLICE`] and asks the
//! hypervisor between slices whether the domain can still run, returning
//! [`Wake::PeerGone`] once it cannot (shut down, crashed, dying or gone).

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_ring::notify::NotifyError;
use mayfly_ring::{Notifier, Wake};
use mayfly_xen_sys::soname;
use mayfly_xen_sys::types::xenevtchn_handle;

use crate::ctrl::Control;
use crate::libs::{sym, Libraries, LoadError};
use crate::DomId;

/// Longest a [`DomainNotifier`] sleeps before checking that its domain still lives.
pub const LIVENESS_SLICE: Duration = Duration::from_millis(50);

/// An event-channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvtchnError {
    /// A function could not be resolved.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `xenevtchn_open` failed (`/dev/xen/evtchn` missing: xen-evtchn not loaded?).
    #[error("xenevtchn_open failed (is the xen-evtchn module loaded?)")]
    Open(#[source] io::Error),
    /// A call failed.
    #[error("{call} (domain {domid}, port {port}) failed")]
    Call {
        /// The libxenevtchn function.
        call: &'static str,
        /// The peer domain.
        domid: DomId,
        /// The local port (0 before one was bound).
        port: u32,
        /// errno.
        #[source]
        source: io::Error,
    },
}

/// A dom0 event-channel port allocated for one domU, with its own handle. Unbound and
/// closed on drop.
pub struct EventChannel {
    libs: Arc<Libraries>,
    xce: NonNull<xenevtchn_handle>,
    fd: RawFd,
    port: u32,
    domid: DomId,
}

// SAFETY: the handle is an fd wrapper; `notify` (an ioctl) may run on any thread, and the
// ring's protocol has one waiter at a time (`pending`/`unmask` are called by the thread
// that owns the domain).
unsafe impl Send for EventChannel {}

impl std::fmt::Debug for EventChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventChannel")
            .field("domid", &self.domid)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl EventChannel {
    /// Opens a handle and allocates an unbound port that `domid` may bind to.
    pub fn bind_unbound(libs: Arc<Libraries>, domid: DomId) -> Result<Self, EvtchnError> {
        let x = soname::XENEVTCHN;
        let open = sym!(libs.evtchn, x, xenevtchn_open)?;
        let close = sym!(libs.evtchn, x, xenevtchn_close)?;
        let fd_of = sym!(libs.evtchn, x, xenevtchn_fd)?;
        let bind = sym!(libs.evtchn, x, xenevtchn_bind_unbound_port)?;
        // SAFETY: a null logger selects the default; flags 0.
        let raw = unsafe { open(std::ptr::null_mut(), 0) };
        let xce = NonNull::new(raw).ok_or_else(|| EvtchnError::Open(io::Error::last_os_error()))?;
        let fail = |call, source| {
            // SAFETY: the handle was opened above and is closed once, on this error path.
            unsafe { close(xce.as_ptr()) };
            EvtchnError::Call {
                call,
                domid,
                port: 0,
                source,
            }
        };
        // SAFETY: a live handle.
        let fd = unsafe { fd_of(xce.as_ptr()) };
        if fd < 0 {
            return Err(fail("xenevtchn_fd", io::Error::last_os_error()));
        }
        // SAFETY: a live handle and a domain id.
        let port = unsafe { bind(xce.as_ptr(), domid) };
        let Ok(port) = u32::try_from(port) else {
            return Err(fail(
                "xenevtchn_bind_unbound_port",
                io::Error::last_os_error(),
            ));
        };
        Ok(Self {
            libs,
            xce,
            fd,
            port,
            domid,
        })
    }

    /// The dom0-side port (what the domU binds to, remotely).
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The handle's fd: readable when a port of this handle fired.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    fn call_error(&self, call: &'static str) -> EvtchnError {
        EvtchnError::Call {
            call,
            domid: self.domid,
            port: self.port,
            source: io::Error::last_os_error(),
        }
    }

    /// Signals the domU.
    pub fn notify(&self) -> Result<(), EvtchnError> {
        let notify = sym!(self.libs.evtchn, soname::XENEVTCHN, xenevtchn_notify)?;
        // SAFETY: a live handle and the port bound through it.
        if unsafe { notify(self.xce.as_ptr(), self.port) } < 0 {
            return Err(self.call_error("xenevtchn_notify"));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the fd to become readable. Returns whether it did.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool, EvtchnError> {
        let ms = i32::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid, writable pollfd and a count of 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(EvtchnError::Call {
                call: "poll(evtchn fd)",
                domid: self.domid,
                port: self.port,
                source: e,
            });
        }
        if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(EvtchnError::Call {
                call: "poll(evtchn fd)",
                domid: self.domid,
                port: self.port,
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(n > 0)
    }

    /// Consumes one pending event (the fd must be readable) and unmasks the port again.
    pub fn consume(&self) -> Result<(), EvtchnError> {
        let x = soname::XENEVTCHN;
        let pending = sym!(self.libs.evtchn, x, xenevtchn_pending)?;
        let unmask = sym!(self.libs.evtchn, x, xenevtchn_unmask)?;
        // SAFETY: a live handle; the fd was readable, so the read does not block.
        let fired = unsafe { pending(self.xce.as_ptr()) };
        let Ok(fired) = u32::try_from(fired) else {
            return Err(self.call_error("xenevtchn_pending"));
        };
        // SAFETY: a live handle and a port it reported.
        if unsafe { unmask(self.xce.as_ptr(), fired) } < 0 {
            return Err(self.call_error("xenevtchn_unmask"));
        }
        Ok(())
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        let x = soname::XENEVTCHN;
        if let Ok(unbind) = sym!(self.libs.evtchn, x, xenevtchn_unbind) {
            // SAFETY: a live handle and its own port, unbound once.
            unsafe { unbind(self.xce.as_ptr(), self.port) };
        }
        if let Ok(close) = sym!(self.libs.evtchn, x, xenevtchn_close) {
            // SAFETY: the handle is closed once, here; nothing uses it afterwards.
            unsafe { close(self.xce.as_ptr()) };
        }
    }
}

/// The agent's end of a domain's doorbell: its event channel plus a liveness check, so a
/// dead domain wakes the waiter with [`Wake::PeerGone`].
#[derive(Debug)]
pub struct DomainNotifier {
    channel: EventChannel,
    control: Arc<Control>,
}

impl DomainNotifier {
    /// Wraps `channel`, whose peer's liveness `control` checks.
    pub fn new(channel: EventChannel, control: Arc<Control>) -> Self {
        Self { channel, control }
    }

    /// The channel.
    pub fn channel(&self) -> &EventChannel {
        &self.channel
    }

    fn wait_error(&self, source: io::Error) -> NotifyError {
        NotifyError::Wait {
            fd: self.channel.fd,
            source,
        }
    }

    /// Whether the domain can still run (a failed query counts as an error, not as gone).
    fn peer_alive(&self) -> Result<bool, NotifyError> {
        match self.control.info(self.channel.domid) {
            Ok(Some(info)) => Ok(info.state.is_alive()),
            Ok(None) => Ok(false),
            Err(e) => Err(self.wait_error(io::Error::other(e))),
        }
    }
}

impl Notifier for DomainNotifier {
    fn notify(&self) -> Result<(), NotifyError> {
        self.channel.notify().map_err(|e| NotifyError::Signal {
            fd: self.channel.fd,
            source: io::Error::other(e),
        })
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if !self.peer_alive()? {
                return Ok(Wake::PeerGone);
            }
            let left = match (timeout, deadline) {
                (None, _) | (Some(_), None) => LIVENESS_SLICE,
                (Some(_), Some(d)) => d.saturating_duration_since(Instant::now()),
            };
            let slice = left.min(LIVENESS_SLICE);
            let readable = self
                .channel
                .wait_readable(slice)
                .map_err(|e| self.wait_error(io::Error::other(e)))?;
            if readable {
                self.channel
                    .consume()
                    .map_err(|e| self.wait_error(io::Error::other(e)))?;
                return Ok(Wake::Notified);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Wake::TimedOut);
            }
        }
    }
}
