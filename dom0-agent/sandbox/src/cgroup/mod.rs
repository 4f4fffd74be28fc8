//! The clones' control group: CPU weight and quota below the agent's, a memory limit and a
//! pids limit for **all clones of one sandbox together** (rlimits stay per clone).
//!
//! Layout. The zygote is moved into one group per sandbox right after it is spawned (before
//! it forks anything); every clone inherits the group at `fork`, so a clone costs no cgroup
//! work at all (no `mkdir`/`rmdir` or migration per transaction: a migration takes the
//! kernel's cgroup threadgroup lock for writing, which needs an RCU grace period).
//!
//! ```text
//!  cgroup v2 (the appliance, Debian 12)          cgroup v1 (hybrid hosts)
//!  <agent's cgroup>/                             /sys/fs/cgroup/{cpu,memory,pids}/<agent's>/
//!    cgroup.subtree_control  +cpu +memory +pids    (agent's threads stay where they are,
//!    mayfly-agent/   the agent's process           competing with the group as siblings)
//!    mayfly-sandbox-<pid>-<n>/                     mayfly-sandbox-<pid>-<n>/  zygote + clones
//!      cpu.weight  cpu.max  memory.max  pids.max     cpu.shares  cpu.cfs_quota_us/period_us
//!      cgroup.subtree_control  +cpu                  memory.limit_in_bytes  pids.max
//!      clones/   zygote + clones                     demoted/  (cpu hierarchy only)
//!      demoted/  demoted clones                        cpu.shares 2, cpu.cfs_quota_us
//!        cpu.weight 1  cpu.max
//! ```
//!
//! **Demoted clones.** A transaction that runs long is demoted (`Domain::demote`, after
//! 100 ms): besides nice 19, its clone is moved once into the `demoted` group, whose CPU
//! quota ([`CgroupLimits::demoted_cpu_max_percent`], default 20 % of one CPU) and weight
//! (1 in v2, 2 shares in v1) are shared by every demoted clone together: twenty spinning
//! guests get a fifth of a CPU between them, whatever their number. The move is the only
//! cgroup write on a transaction's path and only long transactions pay it; the memory and
//! pids limits of the sandbox's group still cover a demoted clone (v2: the group is its
//! parent; v1: only the cpu hierarchy has the child).
//!
//! In v2 a cgroup that has processes cannot enable controllers for its children, so unless
//! the agent runs in the root cgroup it moves itself into a `mayfly-agent` leaf of its own
//! cgroup first (what systemd's `Delegate=yes` expects). Under systemd the service needs
//! `Delegate=yes` (otherwise its cgroup has no `cpu`/`memory`/`pids` to give).
//!
//! Fairness inside the group: the kernel's CFS shares the group's CPU among its runnable
//! clones; a clone that slept (an honest one, waiting on its ring most of the time) is placed
//! ahead of clones that have been spinning, so it still runs promptly among twenty spinners,
//! and spinners end at the transaction's deadline (and at `RLIMIT_CPU`). What the group
//! takes from the agent is bounded by its weight (default 25 against the agent's 100 in v2;
//! v1: `cpu.shares` 1024, one agent thread's, against the agent's several threads) and its
//! quota. (v1 with 256 shares was measured: on a loaded host the clones then starved
//! behind unrelated processes, halving honest throughput with no hostile guest at all;
//! `BENCHMARKS.md`.)

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod layout;

use layout::CONTROLLERS;
pub use layout::{detect, layout_from, Layout};

/// Prefix of the groups' directory names (`mayfly-sandbox-<agent pid>-<n>`).
pub const GROUP_PREFIX: &str = "mayfly-sandbox-";
/// The v2 leaf the agent moves itself into when its own cgroup is not the root.
pub const AGENT_LEAF: &str = "mayfly-agent";
/// Period of the CPU quota: short, so that a throttled group (spinners used its quota)
/// holds its honest clones back for at most a few milliseconds.
pub const CPU_PERIOD_US: u64 = 10_000;

/// What the clones' group is limited to (`SandboxConfig::cgroups`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// CPU weight of the group, 1..=10000 on v2's scale (the agent's leaf is 100). In v1
    /// the agent is not grouped: each of its threads weighs 1024 on its own, so the weight
    /// is taken against four of them (the committer, executor callers, the sandbox's
    /// supervisor and refill threads are the agent's busy set): `cpu.shares` is
    /// `weight * 4096 / 100` (25 → 1024, one agent thread).
    pub cpu_weight: u32,
    /// CPU quota in percent of one CPU (150 = one and a half CPUs), per
    /// [`CPU_PERIOD_US`]; `None`: no quota.
    pub cpu_max_percent: Option<u32>,
    /// Memory of all clones (and the zygote) together, bytes.
    pub memory_max: u64,
    /// Processes of the group (the zygote and its clones); `None`: enough for every clone
    /// that can be alive at once (twice the pool, the clones in use and the quarantine —
    /// clones still dying count) plus the zygote and 15 more.
    pub pids_max: Option<u64>,
    /// CPU quota of all demoted clones together (the `demoted` child group), in percent
    /// of one CPU per [`CPU_PERIOD_US`]; `None`: no such group (a demoted clone only gets
    /// nice 19).
    pub demoted_cpu_max_percent: Option<u32>,
}

/// The default quota of the demoted clones together: a fifth of one CPU.
pub const DEMOTED_CPU_MAX_PERCENT: u32 = 20;

impl CgroupLimits {
    /// The defaults for a host with `cpus` online CPUs and `mem_total` bytes of memory:
    /// weight 25 (a quarter of the agent's), a quota of 90 % of the host's CPUs (the rest of
    /// the host keeps a tenth even when the agent is idle), a quarter of the memory (at
    /// least 256 MiB), pids for every clone that can be alive, and demoted clones capped at
    /// [`DEMOTED_CPU_MAX_PERCENT`] of one CPU together.
    pub fn defaults_for(cpus: u32, mem_total: u64) -> Self {
        Self {
            cpu_weight: 25,
            cpu_max_percent: Some(cpus.max(1).saturating_mul(90)),
            memory_max: (mem_total / 4).max(256 << 20),
            pids_max: None,
            demoted_cpu_max_percent: Some(DEMOTED_CPU_MAX_PERCENT),
        }
    }

    /// The pids limit for a sandbox whose clones alive at once are at most `clones`.
    pub fn pids_for(&self, clones: u64) -> u64 {
        self.pids_max
            .unwrap_or_else(|| clones.saturating_mul(2).saturating_add(16))
    }

    /// The defaults for this host ([`CgroupLimits::defaults_for`] with its online CPUs and
    /// `MemTotal`).
    pub fn host_defaults() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let mem_total = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|kib| kib.parse::<u64>().ok())
            })
            .map_or(1 << 30, |kib| kib.saturating_mul(1024));
        Self::defaults_for(cpus, mem_total)
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), CgroupError> {
        let bad = |what: &'static str, value: u64| Err(CgroupError::Limit { what, value });
        if !(1..=10_000).contains(&self.cpu_weight) {
            return bad("cpu_weight (1..=10000)", self.cpu_weight.into());
        }
        if self.cpu_max_percent == Some(0) {
            return bad("cpu_max_percent (at least 1)", 0);
        }
        if self.memory_max < (64 << 20) {
            return bad("memory_max (at least 64 MiB)", self.memory_max);
        }
        if let Some(p @ 0..2) = self.pids_max {
            return bad("pids_max (at least 2)", p);
        }
        if self.demoted_cpu_max_percent == Some(0) {
            return bad("demoted_cpu_max_percent (at least 1)", 0);
        }
        Ok(())
    }

    fn v1_shares(&self) -> u64 {
        (u64::from(self.cpu_weight) * 4096 / 100).max(2)
    }

    fn quota_us(&self) -> Option<u64> {
        self.cpu_max_percent.map(quota_of)
    }

    fn demoted_quota_us(&self) -> Option<u64> {
        self.demoted_cpu_max_percent.map(quota_of)
    }
}

/// The quota per [`CPU_PERIOD_US`] of `percent` of one CPU (at least 1 ms, cgroupfs's
/// minimum).
fn quota_of(percent: u32) -> u64 {
    (u64::from(percent) * CPU_PERIOD_US / 100).max(1000)
}

/// The v2 leaf of the zygote and its clones inside a sandbox's group.
pub const CLONES_LEAF: &str = "clones";
/// The child group demoted clones are moved into.
pub const DEMOTED_LEAF: &str = "demoted";

impl CgroupLimits {
    /// v1 `cpu.shares` and v2 `cpu.weight` of the demoted group: the least either takes
    /// (v1's minimum is 2).
    const DEMOTED_V1_SHARES: u64 = 2;
    const DEMOTED_V2_WEIGHT: u64 = 1;
}

/// Which cgroup hierarchy the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The unified hierarchy (cgroup2) with `cpu`, `memory` and `pids`.
    V2,
    /// Separate v1 hierarchies for `cpu`, `memory` and `pids` (a hybrid host).
    V1,
}

impl Version {
    /// `"v2"` or `"v1"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V2 => "v2",
            Self::V1 => "v1",
        }
    }
}

/// The limits could not be applied: the sandbox refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A configured limit is out of range.
    #[error("cgroup limit {what} is out of range: {value}")]
    Limit {
        /// Which limit, with its range.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// Neither a usable v2 nor a v1 layout was found.
    #[error(
        "no usable cgroup hierarchy: {reason} (the sandbox needs cgroup v2 with the cpu, memory \
         and pids controllers, or cgroup v1 with all three mounted)"
    )]
    NoHierarchy {
        /// What was found instead.
        reason: String,
    },
    /// v2: the controllers are not available to the agent's cgroup.
    #[error(
        "cgroup v2: controller(s) {missing} not available in {path:?} (cgroup.controllers: \
         {available:?}); under systemd give the service Delegate=yes"
    )]
    NotDelegated {
        /// The agent's cgroup directory.
        path: PathBuf,
        /// What is missing.
        missing: String,
        /// What is there.
        available: String,
    },
    /// Reading, creating or writing a cgroup file failed.
    #[error("cgroup: {what} {path:?} failed")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { what, path, source }
}

fn join(mount: &Path, own: &str) -> PathBuf {
    let rel = own.trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    // One write(2) per value, as cgroupfs expects.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("opening", path))?;
    f.write_all(value.as_bytes())
        .map_err(io_err("writing", path))
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// Names each sandbox of this process its own group.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// One sandbox's group: created by [`ClonesGroup::create`], the zygote moved in with
/// [`ClonesGroup::enter`], removed by [`ClonesGroup::remove`] once it is empty.
#[derive(Debug)]
pub struct ClonesGroup {
    version: Version,
    /// The group's directory in each hierarchy (one in v2; cpu, memory, pids in v1).
    dirs: Vec<PathBuf>,
    /// Where the zygote is moved: v2, the `clones` leaf; v1, `dirs`.
    enter_dirs: Vec<PathBuf>,
    /// The demoted clones' group (v2: beside the `clones` leaf; v1: in the cpu hierarchy
    /// only), if [`CgroupLimits::demoted_cpu_max_percent`] is set.
    demoted: Option<PathBuf>,
    limits: CgroupLimits,
}

/// What `/v1/health` shows of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// `v1` or `v2`.
    pub version: Version,
    /// The group's directories.
    pub paths: Vec<PathBuf>,
    /// The limits written.
    pub limits: CgroupLimits,
    /// Memory the group uses now (`memory.current` / `memory.usage_in_bytes`).
    pub memory_bytes: Option<u64>,
    /// Processes in the group now (`pids.current`).
    pub pids: Option<u64>,
    /// Periods in which the group was throttled by its quota (`cpu.stat` `nr_throttled`).
    pub throttled_periods: Option<u64>,
    /// Periods in which the demoted clones' group was throttled by its quota.
    pub demoted_throttled_periods: Option<u64>,
}

impl ClonesGroup {
    /// Creates this sandbox's group under `layout` with `limits` (in v2, first moving the
    /// agent into its leaf and enabling the controllers for its cgroup's children), for at
    /// most `clones` clones alive at once.
    pub fn create(layout: &Layout, limits: CgroupLimits, clones: u64) -> Result<Self, CgroupError> {
        limits.validate()?;
        let pids_max = limits.pids_for(clones);
        let limits = CgroupLimits {
            pids_max: Some(pids_max),
            ..limits
        };
        let name = format!(
            "{GROUP_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        match layout {
            Layout::V2 { mount, own } => {
                let base = v2_base(mount, own)?;
                let dir = base.join(&name);
                make_dir(&dir)?;
                let leaf = dir.join(CLONES_LEAF);
                let demoted = limits.demoted_quota_us().map(|_| dir.join(DEMOTED_LEAF));
                let group = Self {
                    version: Version::V2,
                    dirs: vec![dir.clone()],
                    enter_dirs: vec![leaf.clone()],
                    demoted: demoted.clone(),
                    limits,
                };
                let applied = (|| {
                    write(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
                    let max = limits
                        .quota_us()
                        .map_or_else(|| "max".to_owned(), |q| q.to_string());
                    write(&dir.join("cpu.max"), &format!("{max} {CPU_PERIOD_US}"))?;
                    write(&dir.join("memory.max"), &limits.memory_max.to_string())?;
                    write(&dir.join("pids.max"), &pids_max.to_string())?;
                    // No internal processes in v2: the zygote goes into a leaf, so that
                    // the group may give its children the cpu controller.
                    write(&dir.join("cgroup.subtree_control"), "+cpu")?;
                    make_dir(&leaf)?;
                    if let (Some(d), Some(q)) = (&demoted, limits.demoted_quota_us()) {
                        make_dir(d)?;
                        write(
                            &d.join("cpu.weight"),
                            &CgroupLimits::DEMOTED_V2_WEIGHT.to_string(),
                        )?;
                        write(&d.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
                    }
                    Ok(())
                })();
                match applied {
                    Ok(()) => Ok(group),
                    Err(e) => {
                        group.remove(Duration::ZERO);
                        Err(e)
                    }
                }
            }
            Layout::V1 { controllers } => {
                let mut group = Self {
                    version: Version::V1,
                    dirs: Vec::new(),
                    enter_dirs: Vec::new(),
                    demoted: None,
                    limits,
                };
                let applied = (|| {
                    for (c, mount, own) in controllers {
                        let dir = join(mount, own).join(&name);
                        make_dir(&dir)?;
                        group.dirs.push(dir.clone());
                        match *c {
                            "cpu" => {
                                write(&dir.join("cpu.shares"), &limits.v1_shares().to_string())?;
                                if let Some(q) = limits.quota_us() {
                                    write(
                                        &dir.join("cpu.cfs_period_us"),
                                        &CPU_PERIOD_US.to_string(),
                                    )?;
                                    write(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
                                }
                                if let Some(q) = limits.demoted_quota_us() {
                                    let d = dir.join(DEMOTED_LEAF);
                                    make_dir(&d)?;
                                    group.demoted = Some(d.clone());
                                    write(
                                        &d.join("cpu.shares"),
                                        &CgroupLimits::DEMOTED_V1_SHARES.to_string(),
                                    )?;
                                    write(
                                        &d.join("cpu.cfs_period_us"),
                                        &CPU_PERIOD_US.to_string(),
                                    )?;
                                    write(&d.join("cpu.cfs_quota_us"), &q.to_string())?;
                                }
                            }
                            "memory" => write(
                                &dir.join("memory.limit_in_bytes"),
                                &limits.memory_max.to_string(),
                            )?,
                            _ => write(&dir.join("pids.max"), &pids_max.to_string())?,
                        }
                    }
                    Ok(())
                })();
                group.enter_dirs.clone_from(&group.dirs);
                match applied {
                    Ok(()) => Ok(group),
                    Err(e) => {
                        group.remove(Duration::ZERO);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Moves process `pid` (the zygote, before it forks) into the group.
    pub fn enter(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in &self.enter_dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Moves clone `pid` into the demoted clones' group (once per demoted transaction);
    /// `Ok(false)` when there is no such group.
    pub fn demote(&self, pid: u32) -> Result<bool, CgroupError> {
        let Some(dir) = &self.demoted else {
            return Ok(false);
        };
        write(&dir.join("cgroup.procs"), &pid.to_string())?;
        Ok(true)
    }

    /// The demoted clones' group, if there is one.
    pub fn demoted_path(&self) -> Option<&Path> {
        self.demoted.as_deref()
    }

    /// The hierarchy in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The group's directories.
    pub fn paths(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Current usage and the limits.
    pub fn status(&self) -> GroupStatus {
        let find = |file: &str| {
            self.dirs
                .iter()
                .map(|d| d.join(file))
                .find(|p| p.exists())
                .and_then(|p| read_trimmed(&p))
        };
        let number = |file: &str| find(file).and_then(|v| v.parse::<u64>().ok());
        let memory_bytes = match self.version {
            Version::V2 => number("memory.current"),
            Version::V1 => number("memory.usage_in_bytes"),
        };
        let throttled = |stat: String| {
            stat.lines()
                .find_map(|l| l.strip_prefix("nr_throttled "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let throttled_periods = find("cpu.stat").and_then(throttled);
        let demoted_throttled_periods = self
            .demoted
            .as_ref()
            .and_then(|d| read_trimmed(&d.join("cpu.stat")))
            .and_then(throttled);
        GroupStatus {
            version: self.version,
            paths: self.dirs.clone(),
            limits: self.limits,
            memory_bytes,
            pids: number("pids.current"),
            throttled_periods,
            demoted_throttled_periods,
        }
    }

    /// Removes the group's directories, waiting up to `wait` for their last processes to be
    /// gone (the zygote reaps its clones before it exits; a directory with processes cannot
    /// be removed). Returns the directories that remain.
    pub fn remove(&self, wait: Duration) -> Vec<PathBuf> {
        let deadline = Instant::now().checked_add(wait);
        // Children first: a group with children cannot be removed.
        let mut left: Vec<PathBuf> = self.demoted.iter().cloned().collect();
        left.extend(
            self.enter_dirs
                .iter()
                .filter(|d| !self.dirs.contains(d))
                .cloned(),
        );
        left.extend(self.dirs.iter().cloned());
        loop {
            left.retain(|d| match fs::remove_dir(d) {
                Ok(()) => false,
                Err(e) => e.kind() != io::ErrorKind::NotFound,
            });
            if left.is_empty() || deadline.is_none_or(|d| Instant::now() >= d) {
                return left;
            }
            // Wait for the group to empty: poll its process list (cgroupfs offers no
            // event for it in v1) a bounded number of times.
            let _ = wait_empty(&left, Duration::from_millis(20));
        }
    }
}

impl Drop for ClonesGroup {
    /// Removes what is left of the group without waiting (after a failed start; after a
    /// shutdown, which removes it and waits, there is nothing left).
    fn drop(&mut self) {
        let _ = self.remove(Duration::ZERO);
    }
}

/// Polls `cgroup.procs` of `dirs` for up to `limit` until all are empty.
fn wait_empty(dirs: &[PathBuf], limit: Duration) -> bool {
    let deadline = Instant::now().checked_add(limit);
    loop {
        let empty = dirs
            .iter()
            .all(|d| read_trimmed(&d.join("cgroup.procs")).is_none_or(|procs| procs.is_empty()));
        if empty {
            return true;
        }
        if deadline.is_none_or(|d| Instant::now() >= d) {
            return false;
        }
        // cgroupfs has no event for "empty" in v1: look again shortly (bounded above).
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("creating", dir)(e)),
    }
}

/// v2: the directory the groups are created in: the agent's cgroup (the root, or the
/// cgroup whose `mayfly-agent` leaf the agent is in or is moved into), with the controllers
/// enabled for its children.
fn v2_base(mount: &Path, own: &str) -> Result<PathBuf, CgroupError> {
    let own_dir = join(mount, own);
    let is_root = own.trim_start_matches('/').is_empty();
    let base = if is_root {
        own_dir
    } else if own_dir.file_name().is_some_and(|n| n == AGENT_LEAF) {
        // An earlier sandbox of this process moved the agent already.
        own_dir.parent().map(Path::to_path_buf).unwrap_or(own_dir)
    } else {
        own_dir
    };
    let available = read_trimmed(&base.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect();
    if !missing.is_empty() {
        return Err(CgroupError::NotDelegated {
            path: base,
            missing: missing.join(", "),
            available,
        });
    }
    if !is_root {
        // No internal processes: the agent leaves `base` for a leaf before `base` may
        // enable controllers for its children.
        let leaf = base.join(AGENT_LEAF);
        make_dir(&leaf)?;
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
    }
    let enabled = read_trimmed(&base.join("cgroup.subtree_control")).unwrap_or_default();
    let wanted: Vec<String> = CONTROLLERS
        .into_iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if !wanted.is_empty() {
        write(&base.join("cgroup.subtree_control"), &wanted.join(" "))?;
    }
    Ok(base)
}

/// Removes empty groups a previous run of an agent left behind (its pid no longer alive)
/// under `layout`. Best effort: returns how many were removed.
pub fn remove_stale(layout: &Layout) -> usize {
    let parents: Vec<PathBuf> = match layout {
        Layout::V2 { mount, own } => {
            let own_dir = join(mount, own);
            let base = if own_dir.file_name().is_some_and(|n| n == AGENT_LEAF) {
                own_dir.parent().map(Path::to_path_buf).unwrap_or(own_dir)
            } else {
                own_dir
            };
            vec![base]
        }
        Layout::V1 { controllers } => controllers
            .iter()
            .map(|(_, mount, own)| join(mount, own))
            .collect(),
    };
    let mut removed = 0;
    for parent in parents {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(GROUP_PREFIX)) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            for child in [CLONES_LEAF, DEMOTED_LEAF] {
                let _ = fs::remove_dir(entry.path().join(child));
            }
            if fs::remove_dir(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake v2 hierarchy in a temporary directory (cgroupfs files are plain files here):
    /// the agent's service cgroup with the controllers delegated.
    fn fake_v2() -> (tempfile::TempDir, Layout, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let service = root.path().join("system.slice/mayfly.service");
        fs::create_dir_all(&service).unwrap();
        fs::write(service.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(service.join("cgroup.subtree_control"), "").unwrap();
        fs::write(service.join("cgroup.procs"), "").unwrap();
        let layout = Layout::V2 {
            mount: root.path().to_path_buf(),
            own: "/system.slice/mayfly.service".into(),
        };
        (root, layout, service)
    }

    /// cgroupfs creates a new group's files itself; the fake does it for the test.
    fn precreate(dir: &Path, files: &[&str]) {
        fs::create_dir_all(dir).unwrap();
        for f in files {
            fs::write(dir.join(f), "").unwrap();
        }
    }

    /// The directory (and files) cgroupfs would make for the next group this process
    /// creates under `service`, with the agent's leaf and the clones' leaf.
    fn next_group(service: &Path) -> PathBuf {
        precreate(&service.join(AGENT_LEAF), &["cgroup.procs"]);
        // The next group number this process will use.
        let n = NEXT.load(Ordering::Relaxed);
        let dir = service.join(format!("{GROUP_PREFIX}{}-{n}", std::process::id()));
        precreate(
            &dir,
            &[
                "cpu.weight",
                "cpu.max",
                "memory.max",
                "pids.max",
                "cgroup.procs",
                "cgroup.subtree_control",
            ],
        );
        precreate(&dir.join(CLONES_LEAF), &["cgroup.procs"]);
        dir
    }

    /// Both v2 cases in one test: the group number comes from a process-wide counter.
    #[test]
    fn v2_moves_the_agent_to_a_leaf_enables_the_controllers_and_writes_the_limits() {
        let limits = CgroupLimits::defaults_for(2, 8 << 30);
        // A cgroup without the controllers delegated is refused, saying what to do.
        let (_root, layout, service) = fake_v2();
        fs::write(service.join("cgroup.controllers"), "cpu\n").unwrap();
        let err = ClonesGroup::create(&layout, limits, 40).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("memory, pids") && text.contains("Delegate=yes"),
            "{text}"
        );

        let (_root, layout, service) = fake_v2();
        let dir = next_group(&service);
        precreate(
            &dir.join(DEMOTED_LEAF),
            &["cpu.weight", "cpu.max", "cgroup.procs"],
        );
        let group = ClonesGroup::create(&layout, limits, 40).unwrap();
        assert_eq!(group.version(), Version::V2);
        assert_eq!(group.paths(), std::slice::from_ref(&dir));
        let read = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(
            read(service.join(AGENT_LEAF).join("cgroup.procs")),
            std::process::id().to_string()
        );
        assert_eq!(
            read(service.join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(read(dir.join("cpu.weight")), "25");
        assert_eq!(read(dir.join("cpu.max")), "18000 10000");
        assert_eq!(read(dir.join("memory.max")), (2u64 << 30).to_string());
        assert_eq!(read(dir.join("pids.max")), "96");
        // The zygote goes into the clones' leaf (v2: no processes in a group whose
        // children have controllers), and the group gives its children the cpu controller.
        assert_eq!(read(dir.join("cgroup.subtree_control")), "+cpu");
        group.enter(4242).unwrap();
        assert_eq!(read(dir.join(CLONES_LEAF).join("cgroup.procs")), "4242");
        assert_eq!(read(dir.join("cgroup.procs")), "");
        // The demoted clones' group: the least weight, a fifth of a CPU for all of them.
        let demoted = dir.join(DEMOTED_LEAF);
        assert_eq!(group.demoted_path(), Some(demoted.as_path()));
        assert_eq!(read(demoted.join("cpu.weight")), "1");
        assert_eq!(read(demoted.join("cpu.max")), "2000 10000");
        assert!(group.demote(4343).unwrap());
        assert_eq!(read(demoted.join("cgroup.procs")), "4343");
        // Without a demoted quota there is no such group, and demoting moves nothing.
        let (_root, layout, service) = fake_v2();
        let dir = next_group(&service);
        let off = CgroupLimits {
            demoted_cpu_max_percent: None,
            ..limits
        };
        let group = ClonesGroup::create(&layout, off, 40).unwrap();
        assert_eq!(group.demoted_path(), None);
        assert!(!group.demote(4343).unwrap());
        assert!(!dir.join(DEMOTED_LEAF).exists());
    }

    #[test]
    fn limits_are_checked_and_scaled_for_v1() {
        let mut l = CgroupLimits::defaults_for(4, 16 << 30);
        assert_eq!(l.pids_for(100), 216);
        assert_eq!(l.cpu_max_percent, Some(360));
        assert_eq!(l.quota_us(), Some(36_000));
        assert_eq!(l.v1_shares(), 1024);
        l.validate().unwrap();
        l.cpu_weight = 0;
        assert!(l.validate().is_err());
        l.cpu_weight = 1;
        assert_eq!(l.v1_shares(), 40);
        l.memory_max = 1 << 20;
        assert!(l.validate().is_err());
        let mut l = CgroupLimits::defaults_for(4, 16 << 30);
        assert_eq!(l.demoted_cpu_max_percent, Some(DEMOTED_CPU_MAX_PERCENT));
        assert_eq!(l.demoted_quota_us(), Some(2_000));
        l.demoted_cpu_max_percent = Some(0);
        assert!(l.validate().is_err());
        l.demoted_cpu_max_percent = Some(1);
        // cgroupfs takes no quota below 1 ms.
        assert_eq!(l.demoted_quota_us(), Some(1_000));
    }
}
