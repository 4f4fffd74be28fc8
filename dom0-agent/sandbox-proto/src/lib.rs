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

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;

use nix::errno::Errno;

pub mod sys;

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

impl Msg {
    fn kind(&self) -> u16 {
        match self {
            Msg::Configure(_) => 0x0001,
            Msg::Clone { .. } => 0x0002,
            Msg::Shutdown => 0x0003,
            Msg::Ready { .. } => 0x0081,
            Msg::InitFailed { .. } => 0x0082,
            Msg::Spawned { .. } => 0x0083,
            Msg::SpawnFailed { .. } => 0x0084,
            Msg::Exited { .. } => 0x0085,
            Msg::Killed { .. } => 0x0086,
            Msg::Stopped { .. } => 0x0087,
        }
    }

    fn fd_count(kind: u16) -> usize {
        match kind {
            0x0002 => 3,
            0x0083 => 1,
            _ => 0,
        }
    }

    /// The message's 24-byte header, which is all of it except for `Configure` (see the
    /// [module docs](self)). No allocation: the zygote sends its messages from the stack.
    fn header(&self) -> [u8; HEADER_LEN] {
        let (clone_id, pid, value, aux) = match *self {
            Msg::Configure(_) | Msg::Shutdown => (0, 0, 0, 0),
            Msg::Clone { clone_id, ring_len } => (clone_id, 0, 0, ring_len),
            Msg::Ready { pid, .. } => (0, pid, 0, 0),
            Msg::InitFailed { stage, errno } => (0, 0, errno, stage),
            Msg::Spawned { clone_id, pid } => (clone_id, pid, 0, 0),
            Msg::SpawnFailed {
                clone_id,
                stage,
                errno,
            } => (clone_id, 0, errno, stage),
            Msg::Exited {
                clone_id,
                pid,
                code,
                cpu_ms,
            } => (clone_id, pid, code, cpu_ms),
            Msg::Killed {
                clone_id,
                pid,
                signal,
                cpu_ms,
            } => (clone_id, pid, signal, cpu_ms),
            Msg::Stopped {
                clone_id,
                pid,
                signal,
            } => (clone_id, pid, signal, 0),
        };
        let mut out = [0u8; HEADER_LEN];
        let fields: [&[u8]; 7] = [
            &MAGIC,
            &VERSION.to_le_bytes(),
            &self.kind().to_le_bytes(),
            &clone_id.to_le_bytes(),
            &pid.to_le_bytes(),
            &value.to_le_bytes(),
            &aux.to_le_bytes(),
        ];
        let mut at = 0;
        for field in fields {
            let end = at + field.len();
            out[at..end].copy_from_slice(field);
            at = end;
        }
        out
    }

    /// Encodes the message (see the [module docs](self)).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header().to_vec();
        if let Msg::Configure(s) = self {
            use std::os::unix::ffi::OsStrExt;
            let root = s.root.as_os_str().as_bytes();
            out.extend_from_slice(&s.limits.memory_bytes.to_le_bytes());
            out.extend_from_slice(&s.limits.cpu_seconds.to_le_bytes());
            out.extend_from_slice(&s.limits.max_fds.to_le_bytes());
            out.extend_from_slice(&s.first_uid.to_le_bytes());
            out.extend_from_slice(&s.gid.to_le_bytes());
            out.extend_from_slice(&u32::from(s.guest_stderr).to_le_bytes());
            out.extend_from_slice(&s.uid_count.to_le_bytes());
            // Checked by the sender before encoding (`MAX_ROOT_PATH`).
            let len = u32::try_from(root.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(root);
        }
        if let Msg::Ready { handlers, .. } = self {
            // Checked by the sender before encoding (`check_handlers`).
            let count = u16::try_from(handlers.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&count.to_le_bytes());
            for name in handlers {
                out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(name.as_bytes());
            }
        }
        out
    }

    /// Decodes one datagram.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        let len = bytes.len();
        let bad = |what| ProtoError::Malformed { what, len };
        let mut r = Reader { bytes, pos: 0 };
        if r.take::<4>().ok_or(bad("short header"))? != MAGIC {
            return Err(bad("bad magic"));
        }
        if u16::from_le_bytes(r.take().ok_or(bad("short header"))?) != VERSION {
            return Err(bad("unsupported version"));
        }
        let kind = u16::from_le_bytes(r.take().ok_or(bad("short header"))?);
        let clone_id = u32::from_le_bytes(r.take().ok_or(bad("short header"))?);
        let pid = i32::from_le_bytes(r.take().ok_or(bad("short header"))?);
        let value = i32::from_le_bytes(r.take().ok_or(bad("short header"))?);
        let aux = u32::from_le_bytes(r.take().ok_or(bad("short header"))?);
        let msg = match kind {
            0x0001 => {
                let short = bad("short Configure body");
                let memory_bytes = u64::from_le_bytes(r.take().ok_or(short)?);
                let short = bad("short Configure body");
                let cpu_seconds = u64::from_le_bytes(r.take().ok_or(short)?);
                let short = bad("short Configure body");
                let max_fds = u64::from_le_bytes(r.take().ok_or(short)?);
                let first_uid = u32::from_le_bytes(r.take().ok_or(bad("short Configure body"))?);
                let gid = u32::from_le_bytes(r.take().ok_or(bad("short Configure body"))?);
                let flags = u32::from_le_bytes(r.take().ok_or(bad("short Configure body"))?);
                let uid_count = u32::from_le_bytes(r.take().ok_or(bad("short Configure body"))?);
                let root_len = u32::from_le_bytes(r.take().ok_or(bad("short Configure body"))?);
                let root_len = usize::try_from(root_len)
                    .ok()
                    .filter(|&n| n <= MAX_ROOT_PATH)
                    .ok_or(bad("root path too long"))?;
                let root = r.take_slice(root_len).ok_or(bad("short root path"))?;
                if flags > 1 {
                    return Err(bad("unknown Configure flags"));
                }
                let last = u64::from(first_uid) + u64::from(uid_count);
                if first_uid == 0 || uid_count == 0 || last > u64::from(u32::MAX) {
                    return Err(bad("bad uid range"));
                }
                use std::os::unix::ffi::OsStrExt;
                Msg::Configure(Settings {
                    limits: Limits {
                        memory_bytes,
                        cpu_seconds,
                        max_fds,
                    },
                    first_uid,
                    uid_count,
                    gid,
                    guest_stderr: flags == 1,
                    root: PathBuf::from(std::ffi::OsStr::from_bytes(root)),
                })
            }
            0x0002 => Msg::Clone {
                clone_id,
                ring_len: aux,
            },
            0x0003 => Msg::Shutdown,
            0x0081 => Msg::Ready {
                pid,
                handlers: decode_handlers(&mut r).map_err(bad)?,
            },
            0x0082 => Msg::InitFailed {
                stage: aux,
                errno: value,
            },
            0x0083 => Msg::Spawned { clone_id, pid },
            0x0084 => Msg::SpawnFailed {
                clone_id,
                stage: aux,
                errno: value,
            },
            0x0085 => Msg::Exited {
                clone_id,
                pid,
                code: value,
                cpu_ms: aux,
            },
            0x0086 => Msg::Killed {
                clone_id,
                pid,
                signal: value,
                cpu_ms: aux,
            },
            0x0087 => Msg::Stopped {
                clone_id,
                pid,
                signal: value,
            },
            _ => return Err(bad("unknown kind")),
        };
        if r.pos != len {
            return Err(bad("trailing bytes"));
        }
        Ok(msg)
    }
}

/// Whether `handlers` can be announced in `Ready`: at most [`MAX_HANDLERS`] valid handler
/// names, strictly increasing. `Err` names what is wrong.
pub fn check_handlers(handlers: &[String]) -> Result<(), &'static str> {
    if handlers.len() > MAX_HANDLERS {
        return Err("more than 1024 handlers");
    }
    if !handlers.iter().all(|h| mayfly_names::is_handler_name(h)) {
        return Err("a handler name that is not 1..=64 bytes of [a-z0-9_.-]");
    }
    if !handlers.windows(2).all(|w| w.first() < w.get(1)) {
        return Err("handler names not sorted or repeated");
    }
    Ok(())
}

fn decode_handlers(r: &mut Reader<'_>) -> Result<Vec<String>, &'static str> {
    let count = usize::from(u16::from_le_bytes(r.take().ok_or("short Ready body")?));
    if count > MAX_HANDLERS {
        return Err("more than 1024 handlers");
    }
    let mut handlers = Vec::with_capacity(count);
    for _ in 0..count {
        let [len] = r.take::<1>().ok_or("short Ready body")?;
        let name = r.take_slice(usize::from(len)).ok_or("short handler name")?;
        mayfly_names::check_name(name, mayfly_names::MAX_HANDLER_NAME)
            .map_err(|_| "a handler name that is not 1..=64 bytes of [a-z0-9_.-]")?;
        // Only [a-z0-9_.-] bytes: ASCII, so valid UTF-8.
        let name = std::str::from_utf8(name).map_err(|_| "handler name not UTF-8")?;
        handlers.push(name.to_owned());
    }
    check_handlers(&handlers)?;
    Ok(handlers)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let slice = self.take_slice(N)?;
        slice.try_into().ok()
    }

    fn take_slice(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let slice = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(slice)
    }
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
    fn every_message_round_trips() {
        let messages = [
            Msg::Configure(Settings {
                limits: Limits::default(),
                first_uid: 1_900_000_000,
                uid_count: 77,
                gid: 65533,
                guest_stderr: true,
                root: PathBuf::from("/run/mayfly/sandbox-root"),
            }),
            Msg::Shutdown,
            Msg::Ready {
                pid: 42,
                handlers: Vec::new(),
            },
            Msg::Ready {
                pid: 43,
                handlers: vec!["kv".into(), "test.crash".into(), "z".repeat(64)],
            },
            Msg::InitFailed {
                stage: Stage::Chroot as u32,
                errno: 1,
            },
            Msg::SpawnFailed {
                clone_id: 7,
                stage: 10,
                errno: 11,
            },
            Msg::Exited {
                clone_id: 7,
                pid: 99,
                code: -3,
                cpu_ms: 12,
            },
            Msg::Killed {
                clone_id: u32::MAX,
                pid: 1,
                signal: 31,
                cpu_ms: 0,
            },
            Msg::Stopped {
                clone_id: 5,
                pid: 6,
                signal: 19,
            },
        ];
        for msg in messages {
            assert_eq!(Msg::decode(&msg.encode()).unwrap(), msg);
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = Msg::Ready {
            pid: 1,
            handlers: Vec::new(),
        }
        .encode();
        assert!(Msg::decode(&good[..10]).is_err());
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(Msg::decode(&bad).is_err());
        let mut bad = good.clone();
        bad[6] = 0x77;
        assert!(Msg::decode(&bad).is_err());
        let mut long = good;
        long.push(0);
        assert!(Msg::decode(&long).is_err());
        let mut conf = Msg::Configure(Settings {
            limits: Limits::default(),
            first_uid: 1,
            uid_count: 1,
            gid: 1,
            guest_stderr: false,
            root: PathBuf::from("/x"),
        })
        .encode();
        assert!(Msg::decode(&conf).is_ok());
        // An empty uid range, or one running past the last uid.
        let mut empty = conf.clone();
        empty[60..64].copy_from_slice(&0u32.to_le_bytes());
        assert!(Msg::decode(&empty).is_err());
        let mut past = conf.clone();
        past[48..52].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
        past[60..64].copy_from_slice(&2u32.to_le_bytes());
        assert!(Msg::decode(&past).is_err());
        // Claim a root path longer than the cap.
        conf[64..68].copy_from_slice(&5000u32.to_le_bytes());
        assert!(Msg::decode(&conf).is_err());
    }

    fn ready(names: &[&[u8]]) -> Vec<u8> {
        let mut out = Msg::Ready {
            pid: 1,
            handlers: Vec::new(),
        }
        .encode();
        out.truncate(HEADER_LEN);
        out.extend_from_slice(&u16::try_from(names.len()).unwrap().to_le_bytes());
        for n in names {
            out.push(u8::try_from(n.len()).unwrap());
            out.extend_from_slice(n);
        }
        out
    }

    #[test]
    fn the_handlers_announced_in_ready_are_checked() {
        let ok = ready(&[b"balance", b"kv", b"test.spin"]);
        assert!(matches!(
            Msg::decode(&ok),
            Ok(Msg::Ready { handlers, .. }) if handlers == ["balance", "kv", "test.spin"]
        ));
        let long = [b'a'; 65];
        for bad in [
            ready(&[b"kv", b"balance"]),                // not sorted
            ready(&[b"kv", b"kv"]),                     // repeated
            ready(&[b"Kv"]),                            // outside the name rule
            ready(&[b""]),                              // empty
            ready(&[&long]),                            // too long
            ready(&[b"kv"])[..HEADER_LEN + 3].to_vec(), // cut inside a name
        ] {
            assert!(
                matches!(Msg::decode(&bad), Err(ProtoError::Malformed { .. })),
                "{bad:?}"
            );
        }
        // A count past the cap is refused before anything is read for it.
        let mut many = ready(&[]);
        many[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&1025u16.to_le_bytes());
        assert!(Msg::decode(&many).is_err());
        // The largest Ready fits the agent's buffer for it.
        let names: Vec<String> = (0..MAX_HANDLERS).map(|i| format!("{i:064}")).collect();
        let largest = Msg::Ready {
            pid: 1,
            handlers: names,
        }
        .encode();
        assert_eq!(largest.len(), READY_MAX);
        assert!(largest.len() < READY_BUF_LEN);
        assert!(Msg::decode(&largest).is_ok());
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
