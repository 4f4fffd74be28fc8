//! The zygote: the paused, fully initialised template every clone is forked from.
//!
//! The agent spawns it by `exec` (a fresh image that never held the agent's memory, where
//! the ledger's signing key lives), in new network, mount, IPC and UTS namespaces, in its own
//! process group, with `PR_SET_PDEATHSIG(SIGKILL)`. The program the agent names (the small
//! `mayfly-zygote` executable) calls [`zygote_main`] (or [`zygote_main_with`]) first thing in
//! `main`, before it starts any thread:
//!
//! 1. close every fd except 0-2 and the control socket; receive `Configure`;
//! 2. run the caller's `init` (it may still read files), check the process is
//!    single-threaded, and move its read-only image onto huge pages where it can
//!    ([`crate::hugecode`]);
//! 3. make the mount namespace private, mount an empty read-only tmpfs on the root
//!    directory the agent named, `chroot` into it;
//! 4. block `SIGCHLD`/`SIGTERM` into a signalfd; map its private memory
//!    (module `private`, `MADV_DONTFORK`);
//! 5. check again that it is single-threaded, set `no_new_privs` and install the seccomp
//!    filter ([`crate::seccomp`]) that every clone inherits — from here on the kernel
//!    refuses to start a thread in the zygote or any clone (`clone3` and `clone` with
//!    thread flags are forbidden), so the single-thread property cannot be lost;
//! 6. report `Ready`, and wait on the control socket — paused.
//!
//! For each `Clone` request (a ring memfd and two eventfds), it picks a uid of the configured
//! range that no live clone holds, `fork`s, opens a pidfd for the child and sends it with the
//! host pid; it reaps its children and reports each exit (code or signal, and CPU time). That
//! loop allocates nothing and keeps its tables and receive buffer in memory `fork` leaves out
//! (module `private`): every page it shares with live clones is copy-on-write, and each of
//! its writes to one would cost a fault and a copy per clone. On
//! `Shutdown`, `SIGTERM`, or the agent closing the socket, it kills all its children, reaps
//! them and exits.
//!
//! # Why running Rust code in the forked child is sound
//!
//! After `fork` in a *multi-threaded* process only async-signal-safe calls are allowed until
//! `exec`, because other threads may have held locks (the allocator's, stdio's) that are
//! copied locked into the child. The zygote is **single-threaded**: it checks
//! `/proc/self/status` after `init` and again right before installing the seccomp filter,
//! which from then on makes starting a thread impossible. With one thread,
//! the forking thread is the only one that could hold a lock, and it holds none across
//! `fork`, so the child's copy of the process is consistent and may allocate, format and
//! unwind like any process. (The agent itself is multi-threaded; its `pre_exec` hook uses
//! only raw system calls — see `spawn`.)
//!
//! What a clone does between `fork` and the guest's code is in module `child`.
//!
//! Per-clone uids are what keep clones apart now that the filter is shared: the filter must
//! let the zygote `fork` and `kill`, and the kernel refuses both to a process without
//! capabilities whose uid no other process holds (see [`crate::seccomp`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{chdir, chroot, Pid};

use mayfly_sandbox_proto::sys::{self as shared, ScmFds};
use mayfly_sandbox_proto::{self as proto, Msg, ProtoError, Settings, Stage, CONTROL_FD_ENV};

use crate::child::{clone_main, RingFds};
use crate::private::{Child, Private};
use crate::{seccomp, sys};

pub use crate::child::{ChildRing, PANIC_EXIT};

/// The zygote could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// The control-socket variable is missing.
    #[error("{CONTROL_FD_ENV} is not set: this process was not started by the sandbox backend")]
    NoControlFd,
    /// The control-socket variable is not an fd number.
    #[error("{CONTROL_FD_ENV}={value:?} is not an fd number above 2")]
    BadControlFd {
        /// The value found.
        value: String,
    },
    /// The fd is not open or not a `SOCK_SEQPACKET` socket.
    #[error("fd {fd} named by {CONTROL_FD_ENV} is not a SOCK_SEQPACKET socket")]
    NotASocket {
        /// The fd.
        fd: RawFd,
        /// The OS error, if any.
        #[source]
        source: Option<Errno>,
    },
    /// A start-up or spawn step failed.
    #[error("zygote: {} failed", stage.name())]
    Stage {
        /// The step.
        stage: Stage,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The control protocol failed.
    #[error("zygote: control protocol")]
    Proto(#[from] ProtoError),
    /// The agent sent something out of place.
    #[error("zygote: unexpected control message ({what})")]
    Unexpected {
        /// What arrived.
        what: &'static str,
    },
}

fn at(stage: Stage) -> impl FnOnce(io::Error) -> ZygoteError {
    move |source| ZygoteError::Stage { stage, source }
}

fn at_nix(stage: Stage) -> impl FnOnce(Errno) -> ZygoteError {
    move |e| ZygoteError::Stage {
        stage,
        source: e.into(),
    }
}

/// Takes the control socket named by [`CONTROL_FD_ENV`] and removes the variable, so the
/// fd is claimed once. Call it first thing in the zygote's `main`, while single-threaded.
pub fn control_fd_from_env() -> Result<OwnedFd, ZygoteError> {
    let value = std::env::var(CONTROL_FD_ENV).map_err(|_| ZygoteError::NoControlFd)?;
    std::env::remove_var(CONTROL_FD_ENV);
    let fd: RawFd = value
        .parse()
        .ok()
        .filter(|&fd| fd > 2)
        .ok_or(ZygoteError::BadControlFd { value })?;
    // SAFETY: F_GETFD only reads the fd's flags; it fails with EBADF if `fd` is not open.
    #[allow(unsafe_code)]
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ZygoteError::NotASocket {
            fd,
            source: Some(Errno::last()),
        });
    }
    // SAFETY: the fd is open (checked above) and was passed to this process, by number in
    // the environment, to be owned by the zygote; the variable is removed above, so no
    // second caller can claim it.
    #[allow(unsafe_code)]
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match getsockopt(&owned, sockopt::SockType) {
        Ok(nix::sys::socket::SockType::SeqPacket) => Ok(owned),
        Ok(_) => Err(ZygoteError::NotASocket { fd, source: None }),
        Err(e) => Err(ZygoteError::NotASocket {
            fd,
            source: Some(e),
        }),
    }
}

/// Runs the zygote with no template state: each clone calls `child` with its ring.
/// `handlers` are the handler names the template answers to (see [`zygote_main_with`]).
pub fn zygote_main(control: OwnedFd, handlers: Vec<String>, child: fn(ChildRing) -> i32) -> ! {
    zygote_main_with(control, handlers, || (), move |(), ring| child(ring))
}

/// Runs the zygote: `init` builds the template state once (before the `chroot`, so it may
/// read files; it must not start threads), and each clone calls `child` on its own
/// copy-on-write copy of that state. Never returns: the zygote exits when the agent tells it
/// to or goes away; each clone `_exit`s with `child`'s return value ([`PANIC_EXIT`] if it
/// panics).
///
/// `handlers` are the names of the handlers the template answers to, announced to the agent
/// in the zygote's `Ready` (sorted and without repeats here); the agent refuses
/// transactions for any other. A name outside the name rule, or more than
/// [`proto::MAX_HANDLERS`], fails the start-up ([`Stage::Handlers`]).
pub fn zygote_main_with<S, I, C>(control: OwnedFd, handlers: Vec<String>, init: I, child: C) -> !
where
    I: FnOnce() -> S,
    C: Fn(&mut S, ChildRing) -> i32,
{
    let code = match run(control, handlers, init, &child) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mayfly-sandbox zygote: {}", mayfly_domain::ErrorChain(&e));
            1
        }
    };
    sys::exit_now(code)
}

/// Number of threads of this process, from `/proc/self/status` (opened before the chroot).
fn thread_count(status: &File) -> io::Result<u32> {
    let mut buf = [0u8; 8192];
    let n = status.read_at(&mut buf, 0)?;
    let text = std::str::from_utf8(buf.get(..n).unwrap_or_default())
        .map_err(|_| io::Error::other("/proc/self/status is not UTF-8"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

fn check_single_threaded(status: &File) -> Result<(), ZygoteError> {
    let n = thread_count(status).map_err(at(Stage::ProcStatus))?;
    if n != 1 {
        return Err(ZygoteError::Stage {
            stage: Stage::Threads,
            source: io::Error::other(format!(
                "the zygote has {n} threads; forking it would copy held locks"
            )),
        });
    }
    Ok(())
}

/// What the zygote holds while paused.
struct Template<'a, S, C> {
    control: BorrowedFd<'a>,
    settings: Settings,
    devnull: File,
    signals: SignalFd,
    state: S,
    child: &'a C,
    pid: Pid,
    /// The uids live clones hold, pid → clone, the receive buffer: memory no clone
    /// shares, so that the zygote's writes per clone cost no copy-on-write fault.
    private: Private,
}

fn run<S, I, C>(
    control: OwnedFd,
    handlers: Vec<String>,
    init: I,
    child: &C,
) -> Result<(), ZygoteError>
where
    I: FnOnce() -> S,
    C: Fn(&mut S, ChildRing) -> i32,
{
    let cfd = u32::try_from(control.as_raw_fd()).unwrap_or(0);
    if cfd < 3 {
        return Err(ZygoteError::BadControlFd {
            value: cfd.to_string(),
        });
    }
    // Nothing else of the agent's may reach the clones: close every inherited fd.
    // SAFETY: right after `exec` nothing in this process has opened an fd yet; the ones
    // above 2 are inherited strays, owned by no value, except `control`, which is skipped.
    #[allow(unsafe_code)]
    unsafe {
        sys::close_range(3, cfd.saturating_sub(1)).map_err(at(Stage::Configure))?;
        sys::close_range(cfd.saturating_add(1), u32::MAX).map_err(at(Stage::Configure))?;
    }

    let settings = match proto::recv(control.as_fd())? {
        Some((Msg::Configure(settings), _)) => settings,
        Some(_) => {
            return Err(ZygoteError::Unexpected {
                what: "not Configure",
            })
        }
        None => return Ok(()), // the agent went away before configuring us
    };
    let template = match prepare(control.as_fd(), settings, handlers, init, child) {
        Ok(t) => t,
        Err(e) => {
            if let ZygoteError::Stage { stage, source } = &e {
                let errno = source.raw_os_error().unwrap_or(0);
                let failed = Msg::InitFailed {
                    stage: *stage as u32,
                    errno,
                };
                // Best effort: the agent also sees us exit.
                let _ = proto::send(control.as_fd(), &failed, &[]);
            }
            return Err(e);
        }
    };
    template.serve()
}

/// Configures and confines the zygote (steps 2-6 of the module docs) and reports `Ready`
/// with the handlers it announces: the template every clone is forked from.
fn prepare<'a, S, I, C>(
    control: BorrowedFd<'a>,
    settings: Settings,
    handlers: Vec<String>,
    init: I,
    child: &'a C,
) -> Result<Template<'a, S, C>, ZygoteError>
where
    I: FnOnce() -> S,
    C: Fn(&mut S, ChildRing) -> i32,
{
    let handlers = announceable(handlers)?;
    let status = File::open("/proc/self/status").map_err(at(Stage::ProcStatus))?;
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(at(Stage::DevNull))?;
    let state = init();
    check_single_threaded(&status)?;
    // Before the chroot (it reads /proc/self/maps) and the filter (it forbids mprotect).
    // SAFETY: single-threaded (checked just above), nothing else maps memory meanwhile.
    #[allow(unsafe_code)]
    if let Err(e) = unsafe { crate::hugecode::move_image_to_huge_pages() } {
        eprintln!("mayfly-sandbox zygote: moving the image to huge pages: {e}");
    }
    enter_empty_root(&settings.root)?;
    let signals = block_signals()?;
    // Before the filter, which does not allow `madvise`.
    let private = Private::new(proto::RECV_BUF_LEN, settings.first_uid, settings.uid_count)
        .map_err(at(Stage::Private))?;
    install_filter(status)?;
    let pid = nix::unistd::getpid();
    let ready = Msg::Ready {
        pid: pid.as_raw(),
        handlers,
    };
    proto::send(control, &ready, &[])?;
    Ok(Template {
        control,
        settings,
        devnull,
        signals,
        state,
        child,
        pid,
        private,
    })
}

/// The handler names the template announces: sorted, without repeats, each valid. The
/// agent sees the stage and `EINVAL`; what exactly is wrong goes to stderr.
fn announceable(mut handlers: Vec<String>) -> Result<Vec<String>, ZygoteError> {
    handlers.sort_unstable();
    handlers.dedup();
    if let Err(what) = proto::check_handlers(&handlers) {
        eprintln!("mayfly-sandbox zygote: refusing to announce the handlers: {what}");
        return Err(ZygoteError::Stage {
            stage: Stage::Handlers,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    Ok(handlers)
}

/// Makes the mount namespace private and `chroot`s into an empty read-only tmpfs mounted
/// on `root`: nothing mounted from here on is seen by the host, and nothing of the host's
/// filesystem is reachable after the chroot.
fn enter_empty_root(root: &Path) -> Result<(), ZygoteError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(at_nix(Stage::MountPrivate))?;
    mount(
        Some("mayfly-sandbox-root"),
        root,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,mode=0555"),
    )
    .map_err(at_nix(Stage::MountRoot))?;
    chroot(root).map_err(at_nix(Stage::Chroot))?;
    chdir("/").map_err(at_nix(Stage::Chdir))
}

/// Blocks `SIGCHLD` and `SIGTERM` and returns the signalfd they arrive on (non-blocking).
fn block_signals() -> Result<SignalFd, ZygoteError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.add(Signal::SIGTERM);
    mask.thread_block().map_err(at_nix(Stage::Signals))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(at_nix(Stage::Signals))
}

/// Installs the seccomp filter every clone inherits: once, here, while single-threaded
/// (checked again on `status`; after the filter, no thread can be started). The status
/// file is closed first: nothing reads it again.
fn install_filter(status: File) -> Result<(), ZygoteError> {
    check_single_threaded(&status)?;
    drop(status);
    let filter = seccomp::compile().map_err(|e| ZygoteError::Stage {
        stage: Stage::Seccomp,
        source: io::Error::other(e),
    })?;
    seccomp::install(&filter).map_err(|e| ZygoteError::Stage {
        stage: Stage::Seccomp,
        source: io::Error::other(e),
    })
}

impl<S, C> Template<'_, S, C>
where
    C: Fn(&mut S, ChildRing) -> i32,
{
    /// The paused loop: clone on request, reap and report, until told to stop.
    fn serve(mut self) -> Result<(), ZygoteError> {
        let mut result = Ok(());
        loop {
            let [control, signal] =
                match shared::wait_readable([self.control, self.signals.as_fd()], None) {
                    Ok(r) => r,
                    Err(e) => {
                        result = Err(at(Stage::Signals)(e));
                        break;
                    }
                };
            if signal {
                let mut terminate = false;
                while let Ok(Some(info)) = self.signals.read_signal() {
                    if info.ssi_signo == Signal::SIGTERM as u32 {
                        terminate = true;
                    }
                }
                if !self.reap(false) || terminate {
                    break;
                }
            }
            if control {
                match proto::recv_in(self.control, self.private.recv_buf()) {
                    Ok(Some((Msg::Clone { clone_id, ring_len }, fds))) => {
                        if let Err(e) = self.spawn(clone_id, ring_len, fds) {
                            result = Err(e);
                            break;
                        }
                    }
                    Ok(Some((Msg::Shutdown, _))) | Ok(None) => break,
                    Ok(Some(_)) => {
                        result = Err(ZygoteError::Unexpected {
                            what: "agent sent a zygote-to-agent message",
                        });
                        break;
                    }
                    // A malformed request is refused, not fatal: nothing was forked.
                    Err(e @ (ProtoError::Malformed { .. } | ProtoError::FdCount { .. })) => {
                        eprintln!("mayfly-sandbox zygote: refused a control message: {e}");
                    }
                    Err(e) => {
                        result = Err(e.into());
                        break;
                    }
                }
            }
        }
        self.terminate();
        result
    }

    /// Reaps exited children and reports them. `block`: wait until no child is left.
    /// Returns false if the agent can no longer be told.
    fn reap(&mut self, block: bool) -> bool {
        let mut agent_alive = true;
        loop {
            let reaped = match sys::reap_one(!block) {
                Ok(Some(r)) => r,
                Ok(None) => return agent_alive,
                Err(e) => {
                    eprintln!("mayfly-sandbox zygote: wait4 failed: {e}");
                    return agent_alive;
                }
            };
            let child = match reaped.outcome {
                // A stopped (quarantined) clone keeps its uid until it is reaped.
                sys::Outcome::Stopped(_) => self.private.get(reaped.pid),
                _ => {
                    let child = self.private.remove(reaped.pid);
                    if let Some(c) = child {
                        self.private.free_uid(c.uid);
                    }
                    child
                }
            };
            let Some(Child { clone_id, .. }) = child else {
                continue;
            };
            let msg = match reaped.outcome {
                sys::Outcome::Exited(code) => Msg::Exited {
                    clone_id,
                    pid: reaped.pid,
                    code,
                    cpu_ms: reaped.cpu_ms,
                },
                sys::Outcome::Signaled(signal) => Msg::Killed {
                    clone_id,
                    pid: reaped.pid,
                    signal,
                    cpu_ms: reaped.cpu_ms,
                },
                sys::Outcome::Stopped(signal) => Msg::Stopped {
                    clone_id,
                    pid: reaped.pid,
                    signal,
                },
            };
            if agent_alive && proto::send(self.control, &msg, &[]).is_err() {
                agent_alive = false;
            }
        }
    }

    /// Kills every child and reaps them all.
    fn terminate(&mut self) {
        for pid in self.private.pids() {
            // An unreaped child's pid cannot be reused, so killing by pid is exact.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.reap(true);
    }

    /// Forks one clone. Errors are fatal to the zygote; a failed clone is reported instead.
    fn spawn(&mut self, clone_id: u32, ring_len: u32, fds: ScmFds) -> Result<(), ZygoteError> {
        let failed = |stage: Stage, errno: i32| Msg::SpawnFailed {
            clone_id,
            stage: stage as u32,
            errno,
        };
        let Some([ring, signal, wait]) = fds.exactly::<3>() else {
            return Ok(()); // unreachable: `proto::recv` checked the count
        };
        // The agent's configuration keeps the range larger than the clones that can live
        // at once; if it is exhausted anyway, this clone is refused, not forked.
        let Some(uid) = self.private.take_uid() else {
            let _ = proto::send(self.control, &failed(Stage::Uid, libc::EAGAIN), &[]);
            return Ok(());
        };
        let raw = RingFds {
            ring: ring.as_raw_fd(),
            ring_len: usize::try_from(ring_len).unwrap_or(0),
            signal: signal.as_raw_fd(),
            wait: wait.as_raw_fd(),
            devnull: self.devnull.as_raw_fd(),
        };
        // SAFETY: the zygote is single-threaded (checked before its seccomp filter was
        // installed; the filter forbids starting a thread), so the child gets a consistent
        // copy of the whole process and may run ordinary Rust code (see the module docs). The child never returns from
        // `clone_main`: it `_exit`s, so no destructor of the zygote's values runs twice.
        #[allow(unsafe_code)]
        let forked = unsafe { nix::unistd::fork() };
        match forked {
            Ok(nix::unistd::ForkResult::Child) => clone_main(
                clone_id,
                uid,
                raw,
                &self.settings,
                self.pid,
                &mut self.state,
                self.child,
            ),
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                let pid = child.as_raw();
                // Room for every uid's clone: cannot fail while the uid is held. Were it to,
                // an untracked child must not live on: killed, reaped here, refused.
                if !self.private.insert(pid, Child { clone_id, uid }) {
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(child, None);
                    self.private.free_uid(uid);
                    let _ = proto::send(self.control, &failed(Stage::Private, libc::ENOSPC), &[]);
                    return Ok(());
                }
                match shared::pidfd_open(pid) {
                    Ok(pidfd) => {
                        let spawned = Msg::Spawned { clone_id, pid };
                        if proto::send(self.control, &spawned, &[pidfd.as_fd()]).is_err() {
                            // The agent is gone; the loop notices on its next poll.
                            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                        }
                    }
                    Err(e) => {
                        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                        let errno = e.raw_os_error().unwrap_or(0);
                        let _ = proto::send(self.control, &failed(Stage::Pidfd, errno), &[]);
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.private.free_uid(uid);
                let _ = proto::send(self.control, &failed(Stage::Fork, e as i32), &[]);
                Ok(())
            }
        }
        // `ring`, `signal`, `wait` are dropped here in the zygote: only the clone keeps them.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_count_is_read_again_at_offset_zero() {
        let status = File::open("/proc/self/status").unwrap();
        let before = thread_count(&status).unwrap();
        assert!(before >= 1);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            started_tx.send(()).unwrap();
            let _ = rx.recv();
        });
        started_rx.recv().unwrap();
        // The same fd, read again, sees at least this thread and the new one.
        assert!(thread_count(&status).unwrap() >= 2);
        drop(tx);
        t.join().unwrap();
    }
}
