//! [`EvtchnNotifier`]: a ring's doorbell over one Xen interdomain event channel, through
//! `/dev/xen/evtchn`.
//!
//! - dom0 allocates an unbound port for the guest ([`EvtchnNotifier::bind_unbound`],
//!   `IOCTL_EVTCHN_BIND_UNBOUND_PORT { u32 remote_domain }`) and publishes its number;
//! - the guest binds to it ([`EvtchnNotifier::bind_interdomain`],
//!   `IOCTL_EVTCHN_BIND_INTERDOMAIN { u32 remote_domain; u32 remote_port }`);
//! - either side signals with `IOCTL_EVTCHN_NOTIFY { u32 port }` (its own local port);
//! - a pending event makes the fd readable: `read` returns the fired local ports as `u32`s
//!   and leaves them masked; writing a port back unmasks it.
//!
//! Only our own port is ever unmasked; anything else read is ignored. Events coalesce and
//! a wake-up may be spurious, as the [`Notifier`] contract allows. Closing the fd unbinds.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use super::{get_u32, ioc_none, ioctl_buf, open_device, put_u32, DomId};
use crate::notify::{poll_readable, Notifier, NotifyError, Wake};

/// The event channel device node.
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

const IOCTL_BIND_INTERDOMAIN: u32 = ioc_none(b'E', 1, 8);
const IOCTL_BIND_UNBOUND_PORT: u32 = ioc_none(b'E', 2, 4);
const IOCTL_NOTIFY: u32 = ioc_none(b'E', 4, 4);

/// Ports read per `read` (the driver hands out as many as fit).
const READ_PORTS: usize = 16;

/// Setting up an event channel failed.
#[derive(Debug, thiserror::Error)]
pub enum EvtchnError {
    /// Opening `/dev/xen/evtchn` failed.
    #[error("opening {EVTCHN_PATH} failed")]
    Open(#[source] io::Error),
    /// `IOCTL_EVTCHN_BIND_INTERDOMAIN` failed.
    #[error("binding to port {remote_port} of domain {remote_domid} failed")]
    BindInterdomain {
        /// The peer.
        remote_domid: DomId,
        /// The peer's port.
        remote_port: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `IOCTL_EVTCHN_BIND_UNBOUND_PORT` failed.
    #[error("allocating an unbound port for domain {remote_domid} failed")]
    BindUnbound {
        /// The domain allowed to bind.
        remote_domid: DomId,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// One bound event channel: signal the peer, wait for the peer's signal.
#[derive(Debug)]
pub struct EvtchnNotifier {
    dev: File,
    port: u32,
}

impl EvtchnNotifier {
    /// Binds a new local port to `remote_port` of `remote_domid` (the guest's side).
    pub fn bind_interdomain(remote_domid: DomId, remote_port: u32) -> Result<Self, EvtchnError> {
        let dev = open_device(EVTCHN_PATH, true).map_err(EvtchnError::Open)?;
        let mut buf = [0u8; 8];
        let ok = put_u32(&mut buf, 0, u32::from(remote_domid)) && put_u32(&mut buf, 4, remote_port);
        let err = |source| EvtchnError::BindInterdomain {
            remote_domid,
            remote_port,
            source,
        };
        if !ok {
            return Err(err(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        // SAFETY: `buf` is the 8-byte `struct ioctl_evtchn_bind_interdomain`.
        #[allow(unsafe_code)]
        let port =
            unsafe { ioctl_buf(dev.as_fd(), IOCTL_BIND_INTERDOMAIN, &mut buf) }.map_err(err)?;
        let port =
            u32::try_from(port).map_err(|_| err(io::Error::from_raw_os_error(libc::ERANGE)))?;
        Ok(Self { dev, port })
    }

    /// Allocates a local port that `remote_domid` may bind to (dom0's side); publish
    /// [`port`](Self::port) to the guest.
    pub fn bind_unbound(remote_domid: DomId) -> Result<Self, EvtchnError> {
        let dev = open_device(EVTCHN_PATH, true).map_err(EvtchnError::Open)?;
        let mut buf = [0u8; 4];
        let err = |source| EvtchnError::BindUnbound {
            remote_domid,
            source,
        };
        if !put_u32(&mut buf, 0, u32::from(remote_domid)) {
            return Err(err(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        // SAFETY: `buf` is the 4-byte `struct ioctl_evtchn_bind_unbound_port`.
        #[allow(unsafe_code)]
        let port =
            unsafe { ioctl_buf(dev.as_fd(), IOCTL_BIND_UNBOUND_PORT, &mut buf) }.map_err(err)?;
        let port =
            u32::try_from(port).map_err(|_| err(io::Error::from_raw_os_error(libc::ERANGE)))?;
        Ok(Self { dev, port })
    }

    /// Our local port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Reads the fired ports and unmasks ours if it is among them. Returns whether anything
    /// was read.
    fn drain(&self) -> Result<bool, NotifyError> {
        let fd = self.dev.as_raw_fd();
        let mut buf = [0u8; READ_PORTS * 4];
        let n = loop {
            match (&self.dev).read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(source) => return Err(NotifyError::Wait { fd, source }),
            }
        };
        let mut ours = false;
        let mut at = 0usize;
        while at < n {
            if get_u32(&buf, at) == Some(self.port) {
                ours = true;
            }
            at = at.saturating_add(4);
        }
        if ours {
            self.unmask()?;
        }
        Ok(n > 0)
    }

    fn unmask(&self) -> Result<(), NotifyError> {
        let fd = self.dev.as_raw_fd();
        loop {
            match (&self.dev).write(&self.port.to_ne_bytes()) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(NotifyError::Wait { fd, source }),
            }
        }
    }
}

impl Notifier for EvtchnNotifier {
    fn notify(&self) -> Result<(), NotifyError> {
        let mut buf = [0u8; 4];
        put_u32(&mut buf, 0, self.port);
        // SAFETY: `buf` is the 4-byte `struct ioctl_evtchn_notify`.
        #[allow(unsafe_code)]
        let rc = unsafe { ioctl_buf(self.dev.as_fd(), IOCTL_NOTIFY, &mut buf) };
        rc.map(|_| ()).map_err(|source| NotifyError::Signal {
            fd: self.dev.as_raw_fd(),
            source,
        })
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        if !poll_readable(self.dev.as_fd(), timeout)? {
            return Ok(Wake::TimedOut);
        }
        // Readable: drain and unmask. Nothing read is a spurious wake-up; re-check.
        self.drain()?;
        Ok(Wake::Notified)
    }
}
