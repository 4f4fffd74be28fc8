//! Spawning the zygote from the agent.
//!
//! `fork` + `exec` of the configured executable, with an empty environment except
//! [`CONTROL_FD_ENV`], stdin and stdout on `/dev/null`, stderr
//! inherited (the zygote's own start-up errors), in a new process group. Between `fork` and
//! `exec` — in a copy of the multi-threaded agent, so only async-signal-safe raw system
//! calls — the child:
//!
//! 1. sets `PR_SET_PDEATHSIG(SIGKILL)` and checks its parent is still the agent (the signal
//!    follows the *thread* that forked, so the agent forks from its long-lived supervisor
//!    thread);
//! 2. `unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)` (needs
//!    `CAP_SYS_ADMIN`);
//! 3. clears close-on-exec on its end of the control socket.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::config::SandboxConfig;
use mayfly_sandbox_proto::CONTROL_FD_ENV;

/// The namespaces the zygote (and so every clone) gets.
pub const NAMESPACES: &str = "CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWIPC|CLONE_NEWUTS";

/// The zygote could not be spawned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The executable is missing or not executable.
    #[error("zygote executable {path:?} is not an executable file")]
    Executable {
        /// The configured path.
        path: PathBuf,
        /// The OS error, if any.
        #[source]
        source: Option<io::Error>,
    },
    /// A privilege is missing.
    #[error(
        "spawning the zygote {path:?} was refused (EPERM): unshare({NAMESPACES}) needs \
         CAP_SYS_ADMIN and the clones' setresuid/setgroups need CAP_SETUID/CAP_SETGID — run \
         the agent as root"
    )]
    Privilege {
        /// The executable.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `fork`, a `pre_exec` step or `exec` failed otherwise.
    #[error("spawning the zygote {path:?} failed (pdeathsig, unshare({NAMESPACES}) or exec)")]
    Spawn {
        /// The executable.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Spawns the zygote with `control` (the zygote's end of the socketpair) inherited.
pub(crate) fn spawn_zygote(config: &SandboxConfig, control: &OwnedFd) -> Result<Child, SpawnError> {
    let path = config.zygote_exe.clone();
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
        Ok(_) => return Err(SpawnError::Executable { path, source: None }),
        Err(e) => {
            return Err(SpawnError::Executable {
                path,
                source: Some(e),
            })
        }
    }
    let raw = control.as_raw_fd();
    // The agent's pid, to check in the child that the parent has not died already.
    let agent = nix::unistd::getpid().as_raw();
    let mut command = Command::new(&path);
    command
        .args(&config.zygote_args)
        .env_clear()
        .env(CONTROL_FD_ENV, raw.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0);
    let hook = move || -> io::Result<()> {
        // SAFETY: runs in the child between fork and exec of a
        // multi-threaded process, so it makes only raw, async-signal-safe system calls and
        // builds errors with `last_os_error`/`from_raw_os_error`, which do not allocate.
        #[allow(unsafe_code)]
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != agent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            let flags =
                libc::CLONE_NEWNET | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            if libc::unshare(flags) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::fcntl(raw, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe system calls (see inside) and touches no
    // memory shared with other threads; `raw` stays open in the parent until `spawn`
    // returns, because `control` is borrowed for the whole call.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(hook);
    }
    command.spawn().map_err(|source| {
        if source.raw_os_error() == Some(libc::EPERM) {
            SpawnError::Privilege { path, source }
        } else {
            SpawnError::Spawn { path, source }
        }
    })
}
