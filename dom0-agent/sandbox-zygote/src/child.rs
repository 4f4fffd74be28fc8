//! A clone, from `fork` to the guest's code: confined, then the entry point, then `_exit`.
//! The zygote (module `zygote`) forks it and runs [`clone_main`] in the child.
//!
//! # What a clone does before the guest's code runs
//!
//! It starts under the zygote's seccomp filter (inherited). In this order: restore the signal
//! mask; put `/dev/null` on fds 0-2 and the ring on fds 3-5 and close every other fd (the
//! control socket, the signalfd, other clones' rings); set its rlimits (`RLIMIT_NPROC` 0
//! among them); `setgroups([])`, `setresgid`, `setresuid` to **its own** unprivileged uid
//! (all capabilities go with uid 0); `PR_SET_PDEATHSIG(SIGKILL)` and a check that the zygote
//! is still its parent (after the uid change, which would clear it); `PR_SET_DUMPABLE(0)`.
//! Then it calls the entry point with its [`ChildRing`] and `_exit`s with the returned
//! status. A clone that fails a step exits with `200 + stage` before running anything of the
//! guest's.

use std::os::fd::{OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;

use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::{getppid, setgroups, setresgid, setresuid, Gid, Pid, Uid};

use mayfly_sandbox_proto::sys as shared;
use mayfly_sandbox_proto::{Limits, Settings, Stage};

use crate::sys;

/// Exit status of a clone whose entry point panicked.
pub const PANIC_EXIT: i32 = 101;

/// The guest's side of a clone's ring, handed to the entry point.
///
/// `ring` is the sealed memfd (map it with `mayfly_ring::MmapMem::from_fd(ring, ring_len)`);
/// `signal` and `wait` are the guest's eventfds (`EventFdNotifier::from_fds(signal, wait)`).
/// They are fds 3, 4 and 5; no other fd is open except 0-2 (`/dev/null`).
#[derive(Debug)]
pub struct ChildRing {
    /// The clone's id (the agent's `DomainId`), for logging only.
    pub clone_id: u32,
    /// The ring's memfd (sealed against shrinking and growing).
    pub ring: OwnedFd,
    /// The ring's length in bytes.
    pub ring_len: usize,
    /// The eventfd the guest writes to signal the agent.
    pub signal: OwnedFd,
    /// The eventfd the guest waits on.
    pub wait: OwnedFd,
}

/// The fd numbers a new clone starts from (owned by the zygote's frames, which the clone
/// never unwinds into).
#[derive(Clone, Copy)]
pub(crate) struct RingFds {
    pub(crate) ring: RawFd,
    pub(crate) ring_len: usize,
    pub(crate) signal: RawFd,
    pub(crate) wait: RawFd,
    pub(crate) devnull: RawFd,
}

/// The forked clone: confine, run the entry point, `_exit`.
pub(crate) fn clone_main<S, C>(
    clone_id: u32,
    uid: u32,
    fds: RingFds,
    settings: &Settings,
    zygote: Pid,
    state: &mut S,
    child: &C,
) -> !
where
    C: Fn(&mut S, ChildRing) -> i32,
{
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        match confine(clone_id, uid, fds, settings, zygote) {
            Ok(ring) => child(state, ring),
            Err(stage) => stage.exit_code(),
        }
    }));
    sys::exit_now(outcome.unwrap_or(PANIC_EXIT))
}

/// Everything between `fork` and the guest's code, in the order the module docs give; the
/// stage that failed is the clone's exit code.
fn confine(
    clone_id: u32,
    uid: u32,
    fds: RingFds,
    settings: &Settings,
    zygote: Pid,
) -> Result<ChildRing, Stage> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|_| Stage::SignalMask)?;
    let _ = prctl::set_name(c"mayfly-clone");
    arrange_fds(fds, settings.guest_stderr)?;
    set_limits(&settings.limits)?;
    become_unprivileged(Uid::from_raw(uid), Gid::from_raw(settings.gid), zygote)?;
    // SAFETY: fds 3-5 were placed by `arrange_fds` and nothing else owns them (every other
    // value that referred to these numbers belongs to the zygote's frames and is never
    // dropped here).
    #[allow(unsafe_code)]
    let (ring, signal, wait) = unsafe {
        (
            sys::own_arranged_fd(3),
            sys::own_arranged_fd(4),
            sys::own_arranged_fd(5),
        )
    };
    Ok(ChildRing {
        clone_id,
        ring,
        ring_len: fds.ring_len,
        signal,
        wait,
    })
}

/// Moves the fds out of the way, then into place: 0-2 `/dev/null` (2 left as inherited if
/// the guest's stderr is kept), 3 ring, 4 signal, 5 wait; closes all others (control
/// socket, signalfd, `/proc/self/status`, other clones' rings, ...).
fn arrange_fds(fds: RingFds, guest_stderr: bool) -> Result<(), Stage> {
    let high = |fd| sys::dup_at_least(fd, 64).map_err(|_| Stage::Fds);
    let (ring, signal, wait, null) = (
        high(fds.ring)?,
        high(fds.signal)?,
        high(fds.wait)?,
        high(fds.devnull)?,
    );
    // SAFETY: the fds replaced or closed here belong to values of the zygote's frames (the
    // control socket, the signalfd, /proc/self/status, /dev/null, the received ring fds),
    // which this clone never uses or drops again: it runs the entry point and `_exit`s
    // without unwinding into those frames (`clone_main`). The copies at 64+ are ours.
    #[allow(unsafe_code)]
    unsafe {
        let place = |from, to| sys::dup2_raw(from, to).map_err(|_| Stage::Fds);
        place(null, 0)?;
        place(null, 1)?;
        if !guest_stderr {
            place(null, 2)?;
        }
        place(ring, 3)?;
        place(signal, 4)?;
        place(wait, 5)?;
        sys::close_range(6, u32::MAX).map_err(|_| Stage::Fds)?;
    }
    Ok(())
}

/// Sets the clone's rlimits (memory, CPU time with a hard limit one second above the soft
/// one, fds; no core files, file writes, processes, locked memory or message queues) and
/// its priority back to normal. The zygote runs at a raised priority (the agent sets nice
/// -10: it forks for everyone and must not wait behind spinning clones in their shared
/// cgroup); a clone runs at the normal one.
fn set_limits(limits: &Limits) -> Result<(), Stage> {
    let cpu_hard = limits.cpu_seconds.saturating_add(1);
    for (resource, soft, hard) in [
        (
            Resource::RLIMIT_AS,
            limits.memory_bytes,
            limits.memory_bytes,
        ),
        (Resource::RLIMIT_CPU, limits.cpu_seconds, cpu_hard),
        (Resource::RLIMIT_NOFILE, limits.max_fds, limits.max_fds),
        (Resource::RLIMIT_CORE, 0, 0),
        (Resource::RLIMIT_FSIZE, 0, 0),
        (Resource::RLIMIT_NPROC, 0, 0),
        (Resource::RLIMIT_MEMLOCK, 0, 0),
        (Resource::RLIMIT_MSGQUEUE, 0, 0),
    ] {
        setrlimit(resource, soft, hard).map_err(|_| Stage::Rlimit)?;
    }
    shared::set_nice(0, 0).map_err(|_| Stage::Rlimit)
}

/// Drops every privilege: no supplementary groups, the clone's gid, then **its own** uid
/// (checked), so all capabilities go; then the parent-death signal (changing credentials
/// clears it) with a check that the `zygote` is still the parent, and not dumpable.
fn become_unprivileged(uid: Uid, gid: Gid, zygote: Pid) -> Result<(), Stage> {
    setgroups(&[]).map_err(|_| Stage::Groups)?;
    setresgid(gid, gid, gid).map_err(|_| Stage::Gid)?;
    setresuid(uid, uid, uid).map_err(|_| Stage::Uid)?;
    if nix::unistd::getuid() != uid || nix::unistd::geteuid() != uid {
        return Err(Stage::Uid);
    }
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(|_| Stage::Pdeathsig)?;
    if getppid() != zygote {
        return Err(Stage::Pdeathsig); // the zygote died before the flag was set
    }
    prctl::set_dumpable(false).map_err(|_| Stage::Dumpable)
}
