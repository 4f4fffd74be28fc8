//! Why the sandbox could not start ([`SandboxError`]) or a clone could not be made ready
//! ([`CreateError`]).

use std::path::PathBuf;
use std::time::Duration;

use mayfly_domain::DomainExit;
use mayfly_ring::RingError;

use crate::clone::CloneError;
use crate::config::ConfigError;
use crate::reconcile::ReconcileError;
use crate::spawn::SpawnError;
use mayfly_sandbox_proto::{ProtoError, Stage, SETUP_EXIT_BASE};

/// The sandbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The configuration was refused.
    #[error("sandbox configuration")]
    Config(#[from] ConfigError),
    /// No uids of the configured range are free on this host.
    #[error("claiming the clones' uids")]
    Uids(#[from] crate::uids::ClaimError),
    /// `run_dir` or the root directory could not be prepared.
    #[error("preparing {path:?} failed")]
    RunDir {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The reconciler failed.
    #[error("reconciling leftovers of a previous run failed")]
    Reconcile(#[from] ReconcileError),
    /// The control socketpair could not be created.
    #[error("socketpair(AF_UNIX, SOCK_SEQPACKET) failed")]
    Socket(#[source] nix::errno::Errno),
    /// A thread could not be started.
    #[error("starting the {role} thread failed")]
    Thread {
        /// Which thread.
        role: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The zygote could not be spawned.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// The clones' cgroup limits could not be applied. Without cgroups a host can only run
    /// the sandbox with the limits switched off (`cgroups: None`, `serve --no-cgroups`).
    #[error(
        "applying the clones' cgroup limits failed (a host without usable cgroups needs \
         --no-cgroups, which leaves clones' CPU and memory unbounded as a group)"
    )]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// Talking to the zygote failed during start-up.
    #[error("zygote (pid {pid}) control protocol")]
    Control {
        /// Zygote pid.
        pid: u32,
        /// The failure.
        #[source]
        source: ProtoError,
    },
    /// The zygote reported a failed start-up step.
    #[error("zygote (pid {pid}): {} failed (errno {errno}: {})", stage_name(*stage), std::io::Error::from_raw_os_error(*errno))]
    ZygoteInit {
        /// Zygote pid.
        pid: u32,
        /// The stage number (see [`Stage`]).
        stage: u32,
        /// The errno.
        errno: i32,
    },
    /// The zygote exited or went silent before reporting ready.
    #[error("zygote (pid {pid}) did not become ready within {waited:?} (exit status: {status})")]
    ZygoteNotReady {
        /// Zygote pid.
        pid: u32,
        /// The wait.
        waited: Duration,
        /// Its exit status, if it exited.
        status: String,
    },
    /// Opening the zygote's pidfd failed.
    #[error("pidfd_open of the zygote (pid {pid}) failed")]
    ZygotePidfd {
        /// Zygote pid.
        pid: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

pub(super) fn stage_name(stage: u32) -> &'static str {
    Stage::from_u32(stage).map_or("unknown stage", Stage::name)
}

/// A clone could not be created or did not reach its ready point.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The ring's memfd could not be created or mapped.
    #[error("clone {clone_id}: creating the ring memfd failed")]
    Memfd {
        /// Clone id.
        clone_id: u32,
        /// The failure.
        #[source]
        source: mayfly_ring::mem::MapError,
    },
    /// Initialising the ring or its eventfds failed.
    #[error("clone {clone_id}: initialising the ring failed")]
    Ring {
        /// Clone id.
        clone_id: u32,
        /// The failure.
        #[source]
        source: RingError,
    },
    /// Creating the eventfds failed.
    #[error("clone {clone_id}: creating the eventfds failed")]
    Eventfd {
        /// Clone id.
        clone_id: u32,
        /// The failure.
        #[source]
        source: mayfly_ring::notify::NotifyError,
    },
    /// Sending the Clone request failed.
    #[error("clone {clone_id}: sending the Clone request failed")]
    Send {
        /// Clone id.
        clone_id: u32,
        /// The failure.
        #[source]
        source: ProtoError,
    },
    /// The zygote could not fork it.
    #[error("clone {clone_id}: the zygote's {} failed (errno {errno})", stage_name(*stage))]
    Spawn {
        /// Clone id.
        clone_id: u32,
        /// Stage number.
        stage: u32,
        /// The errno.
        errno: i32,
    },
    /// The zygote did not answer the Clone request in time.
    #[error("clone {clone_id}: no answer from the zygote within {waited:?}")]
    SpawnTimeout {
        /// Clone id.
        clone_id: u32,
        /// The wait.
        waited: Duration,
    },
    /// The zygote is gone.
    #[error("clone {clone_id}: the zygote is gone")]
    ZygoteGone {
        /// Clone id.
        clone_id: u32,
    },
    /// The guest did not send `Ready` in time.
    #[error("clone {clone_id} (pid {pid}): no Ready within {waited:?}")]
    ReadyTimeout {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// The wait.
        waited: Duration,
    },
    /// The guest sent something other than a valid `Ready`, or broke the ring protocol.
    #[error("clone {clone_id} (pid {pid}): bad first request: {what}")]
    NotReady {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// What arrived.
        what: String,
    },
    /// The clone's ring `Ready` announced other handlers than the template did on the
    /// control socket (a broken or hostile clone).
    #[error(
        "clone {clone_id} (pid {pid}): its ring Ready differs from the template's list: {differs}"
    )]
    HandlersDiffer {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// How the clone's list differs from the template's.
        differs: mayfly_domain::handlers::ListDiffers,
    },
    /// The ring failed while waiting for `Ready`.
    #[error("clone {clone_id} (pid {pid}): waiting for Ready failed")]
    ReadyRing {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// The failure.
        #[source]
        source: RingError,
    },
    /// The clone died before `Ready`.
    #[error("clone {clone_id} (pid {pid}) ended before Ready: {exit}{}", setup_hint(*exit))]
    Died {
        /// Clone id.
        clone_id: u32,
        /// Host pid.
        pid: i32,
        /// How it ended.
        exit: DomainExit,
    },
    /// Killing or reaping it failed.
    #[error(transparent)]
    Clone(#[from] CloneError),
}

pub(super) fn setup_hint(exit: DomainExit) -> String {
    match exit {
        DomainExit::Exited { code } if code > SETUP_EXIT_BASE => {
            let stage = u32::try_from(code.saturating_sub(SETUP_EXIT_BASE)).unwrap_or(0);
            format!(" (confinement step {} failed)", stage_name(stage))
        }
        _ => String::new(),
    }
}
