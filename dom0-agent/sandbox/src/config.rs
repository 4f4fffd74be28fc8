//! The sandbox's configuration: where the zygote comes from, how many clones to keep, and
//! the limits every clone runs under.
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `zygote_exe`, `zygote_args` | (required) | the executable spawned as the zygote and its arguments (the agent passes `mayfly-zygote`, beside itself or as configured, with none) |
//! | `run_dir` | (required) | holds `sandbox.pgid` (for the reconciler) and `sandbox-root/` (the zygote's empty root) |
//! | `pool_size` | 4 | clones kept at their ready point |
//! | `refill_threads` | 1 | threads asking the zygote for clones to keep the pool full (a request does not wait for its clone: one thread keeps `pool_size` requests in flight) |
//! | `max_in_use` | 64 | clones handed out and not yet destroyed; `take` waits while at the cap |
//! | `ready_timeout` | 5 s | how long a new clone (and the zygote at start) may take to become ready |
//! | `geometry` | [`Geometry::DEFAULT`] | ring geometry |
//! | `first_uid`, `uid_count` | 1,900,000,000, 65,536 | the uids clones run as: each live clone has its own uid from `first_uid .. first_uid + uid_count`, so the kernel's permission checks (signals, `prlimit`, ptrace) keep clones apart; no host account may use the range (systemd leaves 1,879,048,192–2,147,352,575 unassigned). The sandbox claims aligned blocks of 1,024 uids of it, enough for twice `pool_size + max_in_use + 8` (the quarantine; twice: clones still dying hold theirs) |
//! | `uid_lock_dir` | `/run/mayfly/sandbox-uids` | where sandboxes claim blocks of their uid ranges, so two sandboxes on one host never share a uid ([`crate::uids`]) |
//! | `gid` | 65534 | the group every clone runs as (no supplementary groups) |
//! | `limits.memory_bytes` | 256 MiB | `RLIMIT_AS`: the clone's whole address space, including what it inherits from the zygote |
//! | `limits.cpu_seconds` | 10 | `RLIMIT_CPU` soft limit (`SIGXCPU`); the hard limit is one second more (`SIGKILL`) |
//! | `limits.max_fds` | 16 | `RLIMIT_NOFILE` (a clone starts with 6 fds: 0–2 on `/dev/null`, 3–5 its ring) |
//! | `cgroups` | [`CgroupLimits::host_defaults`] | the control group of all clones together (see [`crate::cgroup`]): CPU weight 25 against the agent's 100, a CPU quota of 90 % of the host's CPUs, a quarter of the host's memory, pids for every clone that can be alive; `None` runs clones without cgroup limits (hosts without cgroups only) |
//! | `guest_stderr` | false | let clones write to the zygote's stderr (debugging only: a hostile guest could flood the agent's log) |

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use mayfly_ring::Geometry;

use crate::cgroup::CgroupLimits;

/// The default first uid of the clones' range: inside 1,879,048,192–2,147,352,575, which
/// systemd's conventions leave unassigned (below the container range's end, above nothing
/// it allocates).
pub const DEFAULT_FIRST_UID: u32 = 1_900_000_000;
/// The default number of uids in the range.
pub const DEFAULT_UID_COUNT: u32 = 65_536;
/// The default directory of the host-wide uid block locks.
pub const DEFAULT_UID_LOCK_DIR: &str = "/run/mayfly/sandbox-uids";

/// Resource limits applied to every clone (see the [module docs](self)); the control
/// protocol carries them to the zygote.
pub use mayfly_sandbox_proto::Limits;

/// How to run the sandbox backend (see the [module docs](self) for the defaults).
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The zygote executable (spawned by `exec`, so it never inherits the agent's memory).
    pub zygote_exe: PathBuf,
    /// Its arguments (not including `argv[0]`).
    pub zygote_args: Vec<OsString>,
    /// Directory for `sandbox.pgid` and the zygote's empty root; created if missing.
    pub run_dir: PathBuf,
    /// Clones kept ready.
    pub pool_size: usize,
    /// Threads creating clones concurrently to keep the pool full.
    pub refill_threads: usize,
    /// Clones handed out and not yet destroyed, at most.
    pub max_in_use: usize,
    /// Time a new clone (or the zygote) may take to reach its ready point.
    pub ready_timeout: Duration,
    /// Ring geometry.
    pub geometry: Geometry,
    /// The first uid of the clones' range (each live clone has its own).
    pub first_uid: u32,
    /// How many uids the range holds.
    pub uid_count: u32,
    /// Directory of the host-wide uid block locks.
    pub uid_lock_dir: PathBuf,
    /// Gid clones run as.
    pub gid: u32,
    /// Resource limits of each clone.
    pub limits: Limits,
    /// Whether clones keep the zygote's stderr (otherwise `/dev/null`).
    pub guest_stderr: bool,
    /// Limits of the control group all clones run in; `None`: no cgroup (start then warns
    /// loudly). When set and the host cannot apply them, [`crate::Sandbox::start`] fails.
    pub cgroups: Option<CgroupLimits>,
}

impl SandboxConfig {
    /// A configuration with the documented defaults.
    pub fn new(
        zygote_exe: impl Into<PathBuf>,
        zygote_args: impl IntoIterator<Item = impl Into<OsString>>,
        run_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            zygote_exe: zygote_exe.into(),
            zygote_args: zygote_args.into_iter().map(Into::into).collect(),
            run_dir: run_dir.into(),
            pool_size: 4,
            refill_threads: 1,
            max_in_use: 64,
            ready_timeout: Duration::from_secs(5),
            geometry: Geometry::DEFAULT,
            first_uid: DEFAULT_FIRST_UID,
            uid_count: DEFAULT_UID_COUNT,
            uid_lock_dir: PathBuf::from(DEFAULT_UID_LOCK_DIR),
            gid: 65534,
            limits: Limits::default(),
            guest_stderr: false,
            cgroups: Some(CgroupLimits::host_defaults()),
        }
    }

    /// The fewest uids the range must hold: one per clone that can be alive at once (pooled
    /// or being created — together at most `pool_size` —, handed out, quarantined).
    pub fn uids_needed(&self) -> u64 {
        [
            self.pool_size,
            self.max_in_use,
            mayfly_domain::MAX_QUARANTINED,
        ]
        .into_iter()
        .map(|n| u64::try_from(n).unwrap_or(u64::MAX))
        .fold(0u64, u64::saturating_add)
    }

    /// Blocks of [`crate::uids::BLOCK`] uids the sandbox claims: room for twice the clones
    /// that can be alive at once (clones already released but not yet reaped hold theirs).
    pub fn uid_blocks_needed(&self) -> u32 {
        crate::uids::blocks_for(self.uids_needed().saturating_mul(2))
    }

    /// Checks the values that would make the sandbox useless or unsafe.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.first_uid == 0 || self.gid == 0 {
            return Err(ConfigError::RootIdentity {
                uid: self.first_uid,
                gid: self.gid,
            });
        }
        // The last uid must exist: u32::MAX is "(uid_t) -1", which setresuid reads as
        // "leave unchanged".
        let last = u64::from(self.first_uid) + u64::from(self.uid_count);
        if self.uid_count == 0 || last > u64::from(u32::MAX) {
            return Err(ConfigError::UidRange {
                first_uid: self.first_uid,
                uid_count: self.uid_count,
                needed: u64::from(self.uid_blocks_needed()) * u64::from(crate::uids::BLOCK),
            });
        }
        if crate::uids::whole_blocks(self.first_uid, self.uid_count) < self.uid_blocks_needed() {
            return Err(ConfigError::UidRange {
                first_uid: self.first_uid,
                uid_count: self.uid_count,
                needed: u64::from(self.uid_blocks_needed()) * u64::from(crate::uids::BLOCK),
            });
        }
        if self.max_in_use == 0 {
            return Err(ConfigError::Zero {
                field: "max_in_use",
            });
        }
        if self.ready_timeout.is_zero() {
            return Err(ConfigError::Zero {
                field: "ready_timeout",
            });
        }
        if self.limits.cpu_seconds == 0 {
            return Err(ConfigError::Zero {
                field: "limits.cpu_seconds",
            });
        }
        // 0-2 and the three ring fds must fit under RLIMIT_NOFILE.
        if self.limits.max_fds < 6 {
            return Err(ConfigError::TooFewFds {
                max_fds: self.limits.max_fds,
            });
        }
        let ring = u64::try_from(self.geometry.total_len()).unwrap_or(u64::MAX);
        if self.limits.memory_bytes < ring.saturating_add(16 << 20) {
            return Err(ConfigError::MemoryTooSmall {
                memory_bytes: self.limits.memory_bytes,
            });
        }
        if self.run_dir.as_os_str().is_empty() {
            return Err(ConfigError::Zero { field: "run_dir" });
        }
        Ok(())
    }
}

/// A configuration value was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Clones must not run as root.
    #[error("clones must not run as uid/gid 0 (configured uid {uid}, gid {gid})")]
    RootIdentity {
        /// Configured uid.
        uid: u32,
        /// Configured gid.
        gid: u32,
    },
    /// The uid range is empty, runs past the last uid, or is smaller than the clones that
    /// can be alive at once.
    #[error(
        "uid range {first_uid} + {uid_count} is invalid: it must end below 4294967295 and \
         hold at least {needed} uids in whole blocks of 1024 aligned to multiples of 1024 \
         (twice the pool, clones in use and quarantine)"
    )]
    UidRange {
        /// Configured first uid.
        first_uid: u32,
        /// Configured count.
        uid_count: u32,
        /// The fewest uids needed.
        needed: u64,
    },
    /// A field that must be non-zero is zero (or empty).
    #[error("{field} must not be zero or empty")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// `RLIMIT_NOFILE` below the six fds a clone starts with.
    #[error("limits.max_fds {max_fds} is below the 6 fds a clone starts with")]
    TooFewFds {
        /// Configured value.
        max_fds: u64,
    },
    /// `RLIMIT_AS` too small to hold the inherited image and the ring.
    #[error("limits.memory_bytes {memory_bytes} is too small (ring plus at least 16 MiB)")]
    MemoryTooSmall {
        /// Configured value.
        memory_bytes: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_root_is_refused() {
        let config = SandboxConfig::new("/bin/true", ["sandbox-zygote"], "/run/mayfly");
        config.validate().unwrap();
        assert_eq!(config.first_uid, DEFAULT_FIRST_UID);
        assert_eq!(config.limits.cpu_seconds, 10);
        let mut root = config.clone();
        root.first_uid = 0;
        assert!(matches!(
            root.validate(),
            Err(ConfigError::RootIdentity { .. })
        ));
        // Too few uids for the clones that can be alive at once, or past the last uid.
        let mut few = config.clone();
        few.first_uid = 4096;
        few.uid_count = config.uid_blocks_needed() * crate::uids::BLOCK - 1;
        assert!(matches!(few.validate(), Err(ConfigError::UidRange { .. })));
        few.uid_count += 1;
        few.validate().unwrap();
        few.first_uid += 1; // no longer whole aligned blocks
        assert!(matches!(few.validate(), Err(ConfigError::UidRange { .. })));
        let mut high = config.clone();
        high.first_uid = u32::MAX - 10;
        assert!(matches!(high.validate(), Err(ConfigError::UidRange { .. })));
        high.first_uid = u32::MAX - config.uid_count;
        high.validate().unwrap();
        let mut fds = config.clone();
        fds.limits.max_fds = 3;
        assert!(matches!(fds.validate(), Err(ConfigError::TooFewFds { .. })));
        let mut mem = config;
        mem.limits.memory_bytes = 4096;
        assert!(matches!(
            mem.validate(),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
    }
}
