//! The seccomp-BPF filter every clone runs under.
//!
//! A clone may only compute, use the memory it has, and talk over its ring: read and write
//! the eventfds, poll them, map the ring memfd it was given. Opening files, sockets,
//! `execve`, threads, `ptrace`, `mount`, `ioctl`, new fds of any kind — anything not listed
//! below — kills the whole clone at once (`SECCOMP_RET_KILL_PROCESS`), which the agent sees
//! as a death by `SIGSYS` and reports as [`mayfly_domain::DomainExit::ForbiddenSyscall`].
//!
//! # One filter, installed once, in the zygote
//!
//! Installing a filter costs the kernel a BPF conversion, a JIT compilation and a cache
//! of the allowed calls: measured here at 60–170 µs, more than all the rest of a clone's
//! start. So the **zygote** installs the filter once, before its first `fork`, and every
//! clone inherits it (a filter is copied by reference on `fork`; it can never be removed or
//! loosened). The filter therefore also allows what the zygote and a clone's confinement
//! need ([`SETUP_LIST`]). Each of those is narrowed so that a guest gains nothing from it:
//!
//! | call | narrowed to | why a guest gains nothing |
//! |---|---|---|
//! | `clone` | exactly glibc `fork`'s flags (no `CLONE_VM`, `CLONE_THREAD`, namespaces) | a clone runs with `RLIMIT_NPROC` 0 under its own uid and no capabilities: the kernel refuses the fork (`EAGAIN`); `clone3` stays forbidden, so no thread can ever be started, in the zygote either |
//! | `kill` | signal `SIGKILL` only (the zygote's) | every live clone has **its own uid** and no capabilities, so the kernel lets it signal only itself — not other clones, the zygote or the agent (root); `SIGCONT`, which the kernel lets through within a session whatever the uids (it would resume a quarantined clone), can never be sent |
//! | `tgkill` | signal `SIGABRT` only (glibc's `abort` raising it at itself) | as for `kill` |
//! | `prlimit64` | pid 0 (itself) | unprivileged: it can only lower its limits, or raise a soft limit to its hard one |
//! | `setpriority` | `PRIO_PROCESS`, pid 0 (itself), nice 0 exactly | a clone leaves the zygote's raised priority (nice -10) for the normal one; a guest can only set itself to nice 0, which it already is |
//! | `prctl` | `PR_SET_NAME`; `PR_SET_PDEATHSIG` with `SIGKILL` only; `PR_SET_DUMPABLE` with 0 only | its own name; it can neither clear its death signal (and outlive its zygote) nor make itself dumpable |
//! | `setgroups`, `setresgid`, `setresuid` | any | without capabilities they fail (`EPERM`) |
//! | `wait4`, `pidfd_open` | any | it has no children; a pidfd of another process can only be polled for its exit (`pidfd_send_signal`, `pidfd_getfd` stay forbidden) |
//! | `recvmsg`, `sendmsg` | any | it holds no socket and cannot create one |
//! | `dup2`, `close_range`, `fcntl(F_DUPFD_CLOEXEC)` | any | its own fds, under `RLIMIT_NOFILE` |
//! | `getppid`, `geteuid` | any | read-only identity |
//! | `set_robust_list` | any | its own thread's robust-futex list (glibc's `fork` re-registers it in the child) |
//!
//! What is lost: a guest that calls one of these is refused by the kernel rather than
//! killed, so such an attempt is not an audited forbidden-syscall signal (a `fork` attempt
//! through `posix_spawn` or threads still is: those use `clone3`).
//!
//! # The guest's own calls
//!
//! The list was found empirically: it is what the Rust standard library, glibc's allocator,
//! `abort`, the stack-overflow handler and `mayfly-ring` (`MmapMem::from_fd`, the eventfd
//! notifier) use in a forked child, and nothing more (traced with `strace -f` over the test
//! zygote's handlers, debug and release builds; the real `domu-shim` with the example
//! handlers, traced under the agent's tests, needs only `read`, `write`, `close`, `poll`,
//! `fcntl`, `newfstatat`, `mmap`, `munmap` and `exit_group`). Some calls are narrowed by
//! argument:
//!
//! | call | allowed only when |
//! |---|---|
//! | `mmap` | the protection has no `PROT_EXEC` (no new executable memory; `mprotect` is not allowed at all) |
//! | `fcntl` | the command is `F_GET_SEALS` (`MmapMem::from_fd`), `F_GETFD` (std checks an fd is open before closing it, in debug builds) or `F_DUPFD_CLOEXEC` (confinement) |
//! | `newfstatat` | the flags include `AT_EMPTY_PATH` (glibc's `fstat`) |
//! | `futex` | the operation is a private wait or wake (no requeue, no priority inheritance) |
//!
//! `tgkill` was narrowed to the clone's own pid when each clone compiled its own filter; with
//! one inherited filter, the per-clone uid does that job, and the signal is narrowed to
//! `SIGABRT` (table above).

pub use seccompiler::BpfProgram;
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};
use std::collections::BTreeMap;

/// An argument restriction on an allowed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restriction {
    /// Any arguments.
    None,
    /// Argument 2 (protection) without `PROT_EXEC`.
    NoExec,
    /// Argument 1 (command) is `F_GETFD`, `F_GET_SEALS` or `F_DUPFD_CLOEXEC`.
    FcntlSafe,
    /// Argument 0 (flags) is exactly [`FORK_FLAGS`].
    ForkOnly,
    /// Argument 1 (signal) of `kill` is `SIGKILL`.
    KillSignal,
    /// Argument 2 (signal) of `tgkill` is `SIGABRT`.
    AbortSignal,
    /// Argument 0 (pid) is 0: the caller's own limits.
    OwnLimits,
    /// `setpriority(PRIO_PROCESS, 0, 0)`: the caller itself, to nice 0.
    OwnNiceZero,
    /// `prctl(PR_SET_NAME, ..)`, `prctl(PR_SET_PDEATHSIG, SIGKILL)` or
    /// `prctl(PR_SET_DUMPABLE, 0)`.
    PrctlSetup,
    /// Argument 3 (flags) includes `AT_EMPTY_PATH`.
    EmptyPath,
    /// Argument 1 (operation) is a private `FUTEX_WAIT`, `FUTEX_WAKE`, `FUTEX_WAIT_BITSET`
    /// or `FUTEX_WAKE_BITSET`.
    FutexPrivate,
}

/// The `clone` flags of glibc's `fork` on Linux: `CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID
/// | SIGCHLD`. The only `clone` the filter lets through.
pub const FORK_FLAGS: u64 = 0x0100_0000 | 0x0020_0000 | 17;

/// The guest's allowlist: system call name, number, and argument restriction.
pub const ALLOWLIST: &[(&str, i64, Restriction)] = &[
    // The ring's eventfds (and /dev/null on fds 0-2: panic messages).
    ("read", libc::SYS_read, Restriction::None),
    ("write", libc::SYS_write, Restriction::None),
    ("close", libc::SYS_close, Restriction::None),
    #[cfg(target_arch = "x86_64")]
    ("poll", libc::SYS_poll, Restriction::None),
    #[cfg(not(target_arch = "x86_64"))]
    ("ppoll", libc::SYS_ppoll, Restriction::None),
    // Mapping the ring memfd (`MmapMem::from_fd`: fstat, F_GET_SEALS, mmap); F_GETFD before
    // closing an fd (std's debug assertion).
    ("newfstatat", libc::SYS_newfstatat, Restriction::EmptyPath),
    #[cfg(target_arch = "x86_64")]
    ("fstat", libc::SYS_fstat, Restriction::None),
    ("fcntl", libc::SYS_fcntl, Restriction::FcntlSafe),
    // Memory (glibc malloc: brk, mmap/munmap for large blocks, mremap to grow them).
    ("brk", libc::SYS_brk, Restriction::None),
    ("mmap", libc::SYS_mmap, Restriction::NoExec),
    ("munmap", libc::SYS_munmap, Restriction::None),
    ("mremap", libc::SYS_mremap, Restriction::None),
    // std's `Once`/`Mutex` wake-ups (a panic completes a `Once` with FUTEX_WAKE); private
    // wait/wake only, no requeue or priority-inheritance operations.
    ("futex", libc::SYS_futex, Restriction::FutexPrivate),
    // abort(): block signals, raise SIGABRT at itself.
    (
        "rt_sigprocmask",
        libc::SYS_rt_sigprocmask,
        Restriction::None,
    ),
    ("getpid", libc::SYS_getpid, Restriction::None),
    ("gettid", libc::SYS_gettid, Restriction::None),
    ("tgkill", libc::SYS_tgkill, Restriction::AbortSignal),
    // Rust's SIGSEGV/SIGBUS handler (inherited from the zygote): on a fault that is not a
    // stack overflow it restores the default action and returns, so the clone dies of the
    // real signal instead of SIGSYS.
    ("rt_sigaction", libc::SYS_rt_sigaction, Restriction::None),
    ("rt_sigreturn", libc::SYS_rt_sigreturn, Restriction::None),
    // Not seen in tests, kept deliberately: the vDSO falls back to the system call on hosts
    // whose clocksource it cannot read (timeouts must not become SIGSYS); handlers may seed
    // an RNG from the kernel.
    ("clock_gettime", libc::SYS_clock_gettime, Restriction::None),
    ("getrandom", libc::SYS_getrandom, Restriction::None),
    // Identity queries (read-only; the test zygote reports them).
    ("getuid", libc::SYS_getuid, Restriction::None),
    ("getgid", libc::SYS_getgid, Restriction::None),
    // The kernel's resumption of a call a stop interrupted (a `poll` with a timeout, stopped
    // by SIGSTOP and continued): it can only finish the call the process was already in.
    // Without it, stopping and continuing the zygote (a debugger, an operator's
    // `kill -STOP`) killed it with SIGSYS.
    (
        "restart_syscall",
        libc::SYS_restart_syscall,
        Restriction::None,
    ),
    // Leaving (`_exit`).
    ("exit_group", libc::SYS_exit_group, Restriction::None),
];

/// What the zygote and a clone's confinement need besides [`ALLOWLIST`] (see the
/// [module docs](self) for why each is harmless to a guest).
pub const SETUP_LIST: &[(&str, i64, Restriction)] = &[
    // The zygote: fork (glibc's child re-registers its robust-futex list), report, reap.
    ("clone", libc::SYS_clone, Restriction::ForkOnly),
    (
        "set_robust_list",
        libc::SYS_set_robust_list,
        Restriction::None,
    ),
    ("pidfd_open", libc::SYS_pidfd_open, Restriction::None),
    ("wait4", libc::SYS_wait4, Restriction::None),
    ("kill", libc::SYS_kill, Restriction::KillSignal),
    ("recvmsg", libc::SYS_recvmsg, Restriction::None),
    ("sendmsg", libc::SYS_sendmsg, Restriction::None),
    // A clone's confinement: fds, limits, identity, death signal.
    #[cfg(target_arch = "x86_64")]
    ("dup2", libc::SYS_dup2, Restriction::None),
    #[cfg(not(target_arch = "x86_64"))]
    ("dup3", libc::SYS_dup3, Restriction::None),
    ("close_range", libc::SYS_close_range, Restriction::None),
    ("prlimit64", libc::SYS_prlimit64, Restriction::OwnLimits),
    (
        "setpriority",
        libc::SYS_setpriority,
        Restriction::OwnNiceZero,
    ),
    ("setgroups", libc::SYS_setgroups, Restriction::None),
    ("setresgid", libc::SYS_setresgid, Restriction::None),
    ("setresuid", libc::SYS_setresuid, Restriction::None),
    ("geteuid", libc::SYS_geteuid, Restriction::None),
    ("getppid", libc::SYS_getppid, Restriction::None),
    ("prctl", libc::SYS_prctl, Restriction::PrctlSetup),
];

/// Building the filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The architecture has no seccompiler backend.
    #[error("seccomp: unsupported architecture {arch}")]
    Arch {
        /// `std::env::consts::ARCH`.
        arch: &'static str,
    },
    /// A rule or the filter was refused by the compiler.
    #[error("seccomp: building the filter failed")]
    Build(#[source] seccompiler::BackendError),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(SECCOMP_SET_MODE_FILTER)` failed.
    #[error("seccomp: installing the filter failed")]
    Install(#[source] seccompiler::Error),
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, len, op, value).map_err(SeccompError::Build)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Build)
}

fn signal(s: libc::c_int) -> u64 {
    u64::try_from(s).unwrap_or(0)
}

fn rules_for(restriction: Restriction) -> Result<Vec<SeccompRule>, SeccompError> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq};
    let prot_exec = u64::try_from(libc::PROT_EXEC).unwrap_or(4);
    let empty_path = u64::try_from(libc::AT_EMPTY_PATH).unwrap_or(0x1000);
    Ok(match restriction {
        Restriction::None => Vec::new(),
        Restriction::NoExec => vec![rule(vec![cond(2, Qword, MaskedEq(prot_exec), 0)?])?],
        Restriction::FcntlSafe => [libc::F_GETFD, libc::F_GET_SEALS, libc::F_DUPFD_CLOEXEC]
            .into_iter()
            .map(|cmd| rule(vec![cond(1, Dword, Eq, u64::try_from(cmd).unwrap_or(0))?]))
            .collect::<Result<_, _>>()?,
        Restriction::ForkOnly => vec![rule(vec![cond(0, Qword, Eq, FORK_FLAGS)?])?],
        Restriction::OwnLimits => vec![rule(vec![cond(0, Dword, Eq, 0)?])?],
        Restriction::OwnNiceZero => vec![rule(vec![
            cond(0, Dword, Eq, u64::from(libc::PRIO_PROCESS))?,
            cond(1, Dword, Eq, 0)?,
            cond(2, Dword, Eq, 0)?,
        ])?],
        Restriction::KillSignal => vec![rule(vec![cond(1, Dword, Eq, signal(libc::SIGKILL))?])?],
        Restriction::AbortSignal => {
            vec![rule(vec![cond(2, Dword, Eq, signal(libc::SIGABRT))?])?]
        }
        Restriction::PrctlSetup => {
            let option = |op: libc::c_int| cond(0, Dword, Eq, u64::try_from(op).unwrap_or(0));
            vec![
                rule(vec![option(libc::PR_SET_NAME)?])?,
                // Only ever *set* to SIGKILL: a guest must not clear it and outlive its zygote.
                rule(vec![
                    option(libc::PR_SET_PDEATHSIG)?,
                    cond(1, Qword, Eq, signal(libc::SIGKILL))?,
                ])?,
                // Only ever *cleared*: a guest must not make itself dumpable (ptrace-able).
                rule(vec![option(libc::PR_SET_DUMPABLE)?, cond(1, Qword, Eq, 0)?])?,
            ]
        }
        Restriction::FutexPrivate => {
            let private = libc::FUTEX_PRIVATE_FLAG;
            [
                libc::FUTEX_WAIT | private,
                libc::FUTEX_WAKE | private,
                libc::FUTEX_WAIT_BITSET | private,
                libc::FUTEX_WAIT_BITSET | private | libc::FUTEX_CLOCK_REALTIME,
                libc::FUTEX_WAKE_BITSET | private,
            ]
            .into_iter()
            .map(|op| rule(vec![cond(1, Dword, Eq, u64::try_from(op).unwrap_or(0))?]))
            .collect::<Result<_, _>>()?
        }
        Restriction::EmptyPath => {
            vec![rule(vec![cond(
                3,
                Dword,
                MaskedEq(empty_path),
                empty_path,
            )?])?]
        }
    })
}

/// Compiles the filter: [`ALLOWLIST`] and [`SETUP_LIST`].
pub fn compile() -> Result<BpfProgram, SeccompError> {
    let arch = std::env::consts::ARCH;
    let target = TargetArch::try_from(arch).map_err(|_| SeccompError::Arch { arch })?;
    let mut rules = BTreeMap::new();
    for &(_, number, restriction) in ALLOWLIST.iter().chain(SETUP_LIST) {
        rules.insert(number, rules_for(restriction)?);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        target,
    )
    .map_err(SeccompError::Build)?;
    BpfProgram::try_from(filter).map_err(SeccompError::Build)
}

/// Sets `no_new_privs` and installs `program` on the calling thread (the zygote has one;
/// every process it forks inherits the filter).
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_has_no_duplicates() {
        let program = compile().unwrap();
        assert!(!program.is_empty());
        let all: Vec<_> = ALLOWLIST.iter().chain(SETUP_LIST).collect();
        let mut numbers: Vec<i64> = all.iter().map(|&&(_, n, _)| n).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), all.len());
        // Never on the list: what an escape would need first.
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_ioctl,
            libc::SYS_memfd_create,
            libc::SYS_mprotect,
            libc::SYS_pidfd_send_signal,
            libc::SYS_pidfd_getfd,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_chroot,
            libc::SYS_unshare,
            libc::SYS_setns,
        ] {
            assert!(!numbers.contains(&forbidden), "{forbidden} is allowed");
        }
        // The setup calls a guest could reach are narrowed where a wider use would matter.
        let restriction = |n| all.iter().find(|&&&(_, m, _)| m == n).map(|&&(_, _, r)| r);
        assert_eq!(restriction(libc::SYS_clone), Some(Restriction::ForkOnly));
        assert_eq!(
            restriction(libc::SYS_prlimit64),
            Some(Restriction::OwnLimits)
        );
        assert_eq!(restriction(libc::SYS_prctl), Some(Restriction::PrctlSetup));
        assert_eq!(restriction(libc::SYS_mmap), Some(Restriction::NoExec));
        assert_eq!(restriction(libc::SYS_kill), Some(Restriction::KillSignal));
        assert_eq!(
            restriction(libc::SYS_tgkill),
            Some(Restriction::AbortSignal)
        );
        // glibc's fork flags: no shared memory, no thread, no new namespace.
        let shared = u64::try_from(
            libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_NEWUSER | libc::CLONE_NEWNS,
        )
        .unwrap();
        assert_eq!(FORK_FLAGS & shared, 0);
    }
}
