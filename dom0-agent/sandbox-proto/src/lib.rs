//! The control protocol between the sandbox backend (the agent side, `mayfly-sandbox`) and
//! its zygote (the template side, `mayfly-sandbox-zygote`), which both sides depend on and
//! which depends on neither; and, in [`sys`], the system calls both sides use.
//!
//! One `SOCK_SEQPACKET` Unix socketpair, created by the agent and inherited by the zygote
//! across `exec`. Each message is one datagram; file descriptors travel beside it as
//! `SCM_RIGHTS`. Both ends are on the same host and run the same build, so the encoding is
//! simple, but it is still checked: a wrong magic, version, kind, length or fd count is
//! refused ([`ProtoError`]), never trusted.
//!
//! ```text
//!  offset size  field
//!  0      4     magic "MFSB"
//!  4      2     version (3), little-endian like every field below
//!  6      2     kind (table below)
//!  8      4     clone id
//!  12     4     pid (i32)
//!  16     4     value (i32): exit code, signal, errno
//!  20     4     aux (u32): ring length (Clone), stage (failures), CPU ms (exits)
//!  24     ..    body: Configure and Ready only
//!
//!  Configure body:
//!  24     8     RLIMIT_AS bytes        48  4  first uid    60  4  uid count
//!  32     8     RLIMIT_CPU seconds     52  4  gid          64  4  root path length n
//!  40     8     RLIMIT_NOFILE          56  4  flags (bit 0: guest stderr)
//!                                      68  n  root path (n <= 4096)
//!
//!  Ready body (the template's handlers, announced once):
//!  24     2     handler count c (0..=1024)
//!  26     ..    c times: u8 length n (1..=64), n bytes of [a-z0-9_.-]; names strictly
//!               increasing bytewise (sorted, no repeats), nothing after the last
//! ```
//!
//! Version 3 added the Ready body: the agent learns which handlers the template answers to
//! from the template itself (`DomainBackend::handlers`), not from a list compiled into the
//! agent.
//!
//! Each clone runs as its own uid, taken from `first uid .. first uid + uid count` (one not
//! held by a live clone); version 1 had one uid for every clone and no count.
//!
//! | kind | name | direction | fds |
//! |---|---|---|---|
//! | 0x0001 | Configure | agent → zygote | 0 |
//! | 0x0002 | Clone | agent → zygote | 3: ring memfd, signal eventfd, wait eventfd (guest's view) |
//! | 0x0003 | Shutdown | agent → zygote | 0 |
//! | 0x0081 | Ready | zygote → agent | 0 |
//! | 0x0082 | InitFailed | zygote → agent | 0 |
//! | 0x0083 | Spawned | zygote → agent | 1: pidfd of the clone |
//! | 0x0084 | SpawnFailed | zygote → agent | 0 |
//! | 0x0085 | Exited | zygote → agent | 0 |
//! | 0x0086 | Killed | zygote → agent | 0 |
//! | 0x0087 | Stopped | zygote → agent | 0 |
//!
//! Module `codec` encodes and decodes the messages ([`Msg::encode`], [`Msg::decode`]); this one
//! holds their types and sends and receives them ([`send`], [`recv`]).

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;

use nix::errno::Errno;

mod codec;
pub mod sys;

pub use codec::check_handlers;

use crate::sys::ScmFds;

/// The environment variable through which the agent names the zygote's control socket.
pub const CONTROL_FD_ENV: &str = "MAYFLY_SANDBOX_CONTROL_FD";

/// Resource limits applied to every clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_AS` in bytes (address space, counted from the zygote's inherited mappings).
    pub memory_bytes: u64,
    /// `RLIMIT_CPU` soft limit in seconds; the hard limit is one more.
    pub cpu_seconds: u64,
    /// `RLIMIT_NOFILE`.
    pub max_fds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            cpu_seconds: 10,
            max_fds: 16,
        }
    }
}

const MAGIC: [u8; 4] = *b"MFSB";
const VERSION: u16 = 3;
const HEADER_LEN: usize = 24;
const CONFIGURE_FIXED: usize = 44;
/// Longest root path a Configure message carries.
pub const MAX_ROOT_PATH: usize = 4096;
/// Receive buffer: the largest message plus room to detect an oversized one.
const RECV_BUF: usize = HEADER_LEN + CONFIGURE_FIXED + MAX_ROOT_PATH + 64;
/// Most handlers a template may announce.
pub const MAX_HANDLERS: usize = 1024;
/// The largest `Ready`: header, count, and every name at its longest.
const READY_MAX: usize = HEADER_LEN + 2 + MAX_HANDLERS * (1 + mayfly_names::MAX_HANDLER_NAME);
/// Bytes of the buffer the agent receives the zygote's `Ready` in ([`recv_in`]): the largest
/// `Ready`, plus room to detect an oversized one.
pub const READY_BUF_LEN: usize = READY_MAX + 64;
/// Most fds any message carries.
const MAX_FDS: usize = sys::MAX_SCM_FDS;

/// A step of the zygote's start-up or of a clone's confinement; reported when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    /// Reading `/proc/self/status` to count threads.
    ProcStatus = 1,
    /// The zygote is not single-threaded.
    Threads = 2,
    /// Receiving or decoding the Configure message.
    Configure = 3,
    /// Opening `/dev/null`.
    DevNull = 4,
    /// `mount(/, MS_REC|MS_PRIVATE)`.
    MountPrivate = 5,
    /// Mounting the empty read-only tmpfs root.
    MountRoot = 6,
    /// `chroot`.
    Chroot = 7,
    /// `chdir("/")`.
    Chdir = 8,
    /// Blocking signals and creating the signalfd.
    Signals = 9,
    /// `fork`.
    Fork = 10,
    /// `pidfd_open` of the new clone.
    Pidfd = 11,
    /// Clone: `PR_SET_PDEATHSIG` or the parent already gone.
    Pdeathsig = 12,
    /// Clone: arranging fds 0-5 and closing the rest.
    Fds = 13,
    /// Clone: `setrlimit`, or `setpriority` back to nice 0.
    Rlimit = 14,
    /// Clone: `setgroups([])`.
    Groups = 15,
    /// Clone: `setresgid`.
    Gid = 16,
    /// Clone: `setresuid` (or the uid did not change); zygote: no free uid in the range.
    Uid = 17,
    /// Clone: `PR_SET_DUMPABLE`.
    Dumpable = 18,
    /// Zygote: building or installing the seccomp filter (every clone inherits it).
    Seccomp = 19,
    /// Clone: restoring the signal mask.
    SignalMask = 20,
    /// Zygote: mapping its private memory (`mmap`, `madvise(MADV_DONTFORK)`), or no room in
    /// its pid table for a new clone (never expected: the table has room for every uid).
    Private = 21,
    /// Zygote: the handler names the template announces break the name rule or the cap.
    Handlers = 22,
}

impl Stage {
    const ALL: [Stage; 22] = [
        Stage::ProcStatus,
        Stage::Threads,
        Stage::Configure,
        Stage::DevNull,
        Stage::MountPrivate,
        Stage::MountRoot,
        Stage::Chroot,
        Stage::Chdir,
        Stage::Signals,
        Stage::Fork,
        Stage::Pidfd,
        Stage::Pdeathsig,
        Stage::Fds,
        Stage::Rlimit,
        Stage::Groups,
        Stage::Gid,
        Stage::Uid,
        Stage::Dumpable,
        Stage::Seccomp,
        Stage::SignalMask,
        Stage::Private,
        Stage::Handlers,
    ];

    /// The step, as the system call or check that failed.
    pub fn name(self) -> &'static str {
        match self {
            Stage::ProcStatus => "open/read /proc/self/status",
            Stage::Threads => "single-thread check",
            Stage::Configure => "receive Configure",
            Stage::DevNull => "open /dev/null",
            Stage::MountPrivate => "mount(/, MS_REC|MS_PRIVATE)",
            Stage::MountRoot => "mount(tmpfs, root, MS_RDONLY)",
            Stage::Chroot => "chroot",
            Stage::Chdir => "chdir(/)",
            Stage::Signals => "sigprocmask/signalfd",
            Stage::Fork => "fork",
            Stage::Pidfd => "pidfd_open",
            Stage::Pdeathsig => "prctl(PR_SET_PDEATHSIG)",
            Stage::Fds => "dup2/close_range",
            Stage::Rlimit => "setrlimit or setpriority",
            Stage::Groups => "setgroups",
            Stage::Gid => "setresgid",
            Stage::Uid => "setresuid",
            Stage::Dumpable => "prctl(PR_SET_DUMPABLE)",
            Stage::Seccomp => "seccomp",
            Stage::SignalMask => "sigprocmask(SIG_SETMASK, {})",
            Stage::Private => "mmap/madvise(MADV_DONTFORK) of the zygote's private memory",
            Stage::Handlers => {
                "the template's handler list (at most 1024 names of 1..=64 bytes of [a-z0-9_.-])"
            }
        }
    }

    /// The stage with this number.
    pub fn from_u32(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u32 == value)
    }

    /// A clone that fails a confinement step exits with `SETUP_EXIT_BASE + stage`; such a
    /// clone never ran guest code.
    pub fn exit_code(self) -> i32 {
        SETUP_EXIT_BASE.saturating_add(i32::try_from(self as u32).unwrap_or(0))
    }
}

/// Exit codes `SETUP_EXIT_BASE + stage` mean "confinement failed at that stage".
pub const SETUP_EXIT_BASE: i32 = 200;

/// The zygote's start-up settings (the Configure body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The clones' resource limits.
    pub limits: Limits,
    /// The clones' uids: `first_uid .. first_uid + uid_count`, one per live clone.
    pub first_uid: u32,
    /// How many uids the range holds.
    pub uid_count: u32,
    /// The clones' gid.
    pub gid: u32,
    /// Whether clones keep the zygote's stderr (else `/dev/null`).
    pub guest_stderr: bool,
    /// The empty directory the zygote mounts its read-only root on and `chroot`s into.
    pub root: PathBuf,
}

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Agent → zygote, first: the start-up settings.
    Configure(Settings),
    /// Agent → zygote: fork a clone over the ring whose fds come with the message.
    Clone {
        /// The agent's id for the clone.
        clone_id: u32,
        /// Bytes of the ring memfd to map.
        ring_len: u32,
    },
    /// Agent → zygote: kill every clone and exit.
    Shutdown,
    /// Zygote → agent: configured, confined, ready to fork.
    Ready {
        /// The zygote's pid.
        pid: i32,
        /// The handlers the template answers to, sorted, without repeats.
        handlers: Vec<String>,
    },
    /// Zygote → agent: a start-up step failed (the zygote exits).
    InitFailed {
        /// The [`Stage`] number.
        stage: u32,
        /// The errno.
        errno: i32,
    },
    /// Zygote → agent: the clone is forked (its pidfd comes with the message).
    Spawned {
        /// The clone.
        clone_id: u32,
        /// Its host pid.
        pid: i32,
    },
    /// Zygote → agent: the clone could not be forked.
    SpawnFailed {
        /// The clone.
        clone_id: u32,
        /// The [`Stage`] number.
        stage: u32,
        /// The errno.
        errno: i32,
    },
    /// Zygote → agent: the clone exited by itself and was reaped.
    Exited {
        /// The clone.
        clone_id: u32,
        /// Its host pid.
        pid: i32,
        /// Its exit status.
        code: i32,
        /// CPU time it used, ms.
        cpu_ms: u32,
    },
    /// Zygote → agent: the clone died on a signal and was reaped.
    Killed {
        /// The clone.
        clone_id: u32,
        /// Its host pid.
        pid: i32,
        /// The signal.
        signal: i32,
        /// CPU time it used, ms.
        cpu_ms: u32,
    },
    /// Zygote → agent: the clone was stopped (quarantine).
    Stopped {
        /// The clone.
        clone_id: u32,
        /// Its host pid.
        pid: i32,
        /// The stopping signal.
        signal: i32,
    },
}

/// A control message could not be sent, received or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// `sendmsg` failed.
    #[error("sendmsg of control message kind {kind:#06x} failed")]
    Send {
        /// The message kind.
        kind: u16,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// `recvmsg` failed.
    #[error("recvmsg on the control socket failed")]
    Recv(#[source] Errno),
    /// The datagram or its fds were truncated.
    #[error("control message truncated (flags {flags:#x})")]
    Truncated {
        /// `msg_flags`.
        flags: i32,
    },
    /// Bad magic, version, kind or length.
    #[error("malformed control message: {what} (length {len})")]
    Malformed {
        /// What is wrong.
        what: &'static str,
        /// Datagram length.
        len: usize,
    },
    /// The message came with the wrong number of fds.
    #[error("control message kind {kind:#06x} carries {got} fds, expected {expected}")]
    FdCount {
        /// The message kind.
        kind: u16,
        /// Fds received.
        got: usize,
        /// Fds expected.
        expected: usize,
    },
}

/// Sends `msg` with `fds` attached, waiting for room in the socket. Never raises `SIGPIPE`.
pub fn send(sock: BorrowedFd<'_>, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), ProtoError> {
    send_with(sock, msg, fds, 0)
}

/// Like [`send`], but fails with `EAGAIN` instead of waiting when the peer is not reading.
pub fn send_nowait(sock: BorrowedFd<'_>, msg: &Msg) -> Result<(), ProtoError> {
    send_with(sock, msg, &[], libc::MSG_DONTWAIT)
}

fn send_with(
    sock: BorrowedFd<'_>,
    msg: &Msg,
    fds: &[BorrowedFd<'_>],
    flags: libc::c_int,
) -> Result<(), ProtoError> {
    // Header-only messages (all but `Configure`) go from the stack, and the fds with them:
    // nothing here allocates (see `recv_in`).
    let header;
    let configure;
    let bytes: &[u8] = if matches!(msg, Msg::Configure(_) | Msg::Ready { .. }) {
        configure = msg.encode();
        &configure
    } else {
        header = msg.header();
        &header
    };
    let mut raw = [0 as RawFd; MAX_FDS];
    let n = fds.len().min(MAX_FDS);
    for (slot, fd) in raw.iter_mut().zip(fds) {
        *slot = fd.as_raw_fd();
    }
    if fds.len() > MAX_FDS {
        return Err(ProtoError::Send {
            kind: msg.kind(),
            source: Errno::EINVAL,
        });
    }
    sys::send_with_fds(sock, bytes, &raw[..n], flags).map_err(|source| ProtoError::Send {
        kind: msg.kind(),
        source,
    })
}

/// Receives one message and its fds (close-on-exec). `Ok(None)`: the peer closed its end.
pub fn recv(sock: BorrowedFd<'_>) -> Result<Option<(Msg, ScmFds)>, ProtoError> {
    recv_in(sock, &mut [0u8; RECV_BUF])
}

/// Bytes a receive buffer for [`recv_in`] needs: the largest message, plus room to detect an
/// oversized one.
pub const RECV_BUF_LEN: usize = RECV_BUF;

/// [`recv`] into `buf` (at least [`RECV_BUF_LEN`] bytes), without allocating for any
/// message but `Configure`: the zygote receives into memory no clone shares, so that a
/// request costs it no copy-on-write fault.
pub fn recv_in(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<(Msg, ScmFds)>, ProtoError> {
    let received = sys::recv_with_fds(sock, buf).map_err(ProtoError::Recv)?;
    if received.flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(ProtoError::Truncated {
            flags: received.flags,
        });
    }
    let (len, fds) = (received.len, received.fds);
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let bytes = buf.get(..len).ok_or(ProtoError::Malformed {
        what: "length beyond buffer",
        len,
    })?;
    let msg = Msg::decode(bytes)?;
    let expected = Msg::fd_count(msg.kind());
    if fds.len() != expected {
        return Err(ProtoError::FdCount {
            kind: msg.kind(),
            got: fds.len(),
            expected,
        });
    }
    Ok(Some((msg, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn fds_travel_and_counts_are_checked() {
        let (a, b) = pair();
        let (x, y) = pair();
        let (z, _w) = pair();
        send(
            a.as_fd(),
            &Msg::Clone {
                clone_id: 3,
                ring_len: 4096,
            },
            &[x.as_fd(), y.as_fd(), z.as_fd()],
        )
        .unwrap();
        let (msg, fds) = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(
            msg,
            Msg::Clone {
                clone_id: 3,
                ring_len: 4096
            }
        );
        assert_eq!(fds.len(), 3);
        // A Clone without its fds is refused.
        send(
            a.as_fd(),
            &Msg::Clone {
                clone_id: 4,
                ring_len: 4096,
            },
            &[],
        )
        .unwrap();
        assert!(matches!(
            recv(b.as_fd()),
            Err(ProtoError::FdCount { got: 0, .. })
        ));
        // One fd too many (the control buffer's alignment has room for it) is refused too.
        let clone = Msg::Clone {
            clone_id: 5,
            ring_len: 4096,
        }
        .encode();
        let four = [x.as_raw_fd(), y.as_raw_fd(), z.as_raw_fd(), a.as_raw_fd()];
        nix::sys::socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[std::io::IoSlice::new(&clone)],
            &[nix::sys::socket::ControlMessage::ScmRights(&four)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(matches!(
            recv(b.as_fd()),
            Err(ProtoError::FdCount { got: 4, .. })
        ));
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none());
        for s in Stage::ALL {
            assert_eq!(Stage::from_u32(s as u32), Some(s));
        }
    }
}
