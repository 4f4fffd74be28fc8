//! The clones' seccomp-BPF allowlist.
//!
//! A clone may only compute, use the memory it has, and talk over its ring: read and write
//! the eventfds, poll them, map the ring memfd it was given. Everything else — opening files,
//! sockets, `fork`/`clone`/`execve`, `kill`/`ptrace`, `mount`, `ioctl`, new fds of any kind —
//! kills the whole clone at once (`SECCOMP_RET_KILL_PROCESS`), which the agent sees as a
//! death by `SIGSYS` and reports as [`mayfly_domain::DomainExit::ForbiddenSyscall`].
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
//! | `tgkill` | the target is the clone itself (glibc's `abort` raises `SIGABRT` this way) |
//! | `fcntl` | the command is `F_GET_SEALS` (`MmapMem::from_fd`) or `F_GETFD` (std checks an fd is open before closing it, in debug builds) |
//! | `newfstatat` | the flags include `AT_EMPTY_PATH` (glibc's `fstat`) |
//! | `futex` | the operation is a private wait or wake (no requeue, no priority inheritance) |
//!
//! The filter is built per clone (it names the clone's pid) right after `fork` and installed
//! last, after the rlimits and the uid change, with `no_new_privs` set.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// An argument restriction on an allowed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restriction {
    /// Any arguments.
    None,
    /// Argument 2 (protection) without `PROT_EXEC`.
    NoExec,
    /// Argument 0 (thread group) is the clone's own pid.
    OwnProcess,
    /// Argument 1 (command) is `F_GETFD` or `F_GET_SEALS`.
    FcntlQuery,
    /// Argument 3 (flags) includes `AT_EMPTY_PATH`.
    EmptyPath,
    /// Argument 1 (operation) is a private `FUTEX_WAIT`, `FUTEX_WAKE`, `FUTEX_WAIT_BITSET`
    /// or `FUTEX_WAKE_BITSET`.
    FutexPrivate,
}

/// The allowlist: system call name, number, and argument restriction.
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
    ("fcntl", libc::SYS_fcntl, Restriction::FcntlQuery),
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
    ("tgkill", libc::SYS_tgkill, Restriction::OwnProcess),
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
    // Leaving (`_exit`).
    ("exit_group", libc::SYS_exit_group, Restriction::None),
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

fn rules_for(restriction: Restriction, pid: u32) -> Result<Vec<SeccompRule>, SeccompError> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq};
    let prot_exec = u64::try_from(libc::PROT_EXEC).unwrap_or(4);
    let empty_path = u64::try_from(libc::AT_EMPTY_PATH).unwrap_or(0x1000);
    Ok(match restriction {
        Restriction::None => Vec::new(),
        Restriction::NoExec => vec![rule(vec![cond(2, Qword, MaskedEq(prot_exec), 0)?])?],
        Restriction::OwnProcess => vec![rule(vec![cond(0, Dword, Eq, u64::from(pid))?])?],
        Restriction::FcntlQuery => [libc::F_GETFD, libc::F_GET_SEALS]
            .into_iter()
            .map(|cmd| rule(vec![cond(1, Dword, Eq, u64::try_from(cmd).unwrap_or(0))?]))
            .collect::<Result<_, _>>()?,
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

/// Compiles the allowlist for the clone whose pid is `pid`.
pub(crate) fn compile(pid: u32) -> Result<BpfProgram, SeccompError> {
    let arch = std::env::consts::ARCH;
    let target = TargetArch::try_from(arch).map_err(|_| SeccompError::Arch { arch })?;
    let mut rules = BTreeMap::new();
    for &(_, number, restriction) in ALLOWLIST {
        rules.insert(number, rules_for(restriction, pid)?);
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

/// Sets `no_new_privs` and installs `program` on the calling thread (the clone has one).
pub(crate) fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowlist_compiles_and_has_no_duplicates() {
        let program = compile(1234).unwrap();
        assert!(!program.is_empty());
        let mut numbers: Vec<i64> = ALLOWLIST.iter().map(|&(_, n, _)| n).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), ALLOWLIST.len());
        // Never on the list: what an escape would need first.
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_kill,
            libc::SYS_ptrace,
            libc::SYS_ioctl,
            libc::SYS_memfd_create,
        ] {
            assert!(!numbers.contains(&forbidden), "{forbidden} is allowed");
        }
    }
}
