//! The reconciler: removes what a previous run left behind before a new zygote starts.
//!
//! Every zygote runs in its own process group and its clones inherit it. The agent records
//! that group in `<run_dir>/sandbox.pgid` once the zygote is ready and removes the file on
//! shutdown. If the file is still there at start-up, the previous run did not shut down. Its
//! zygote and clones normally died with it (`PR_SET_PDEATHSIG`), but the reconciler makes
//! sure:
//!
//! - it lists the processes whose process group is the recorded one;
//! - it treats one as **ours** only if its `/proc/<pid>/exe` is the configured zygote
//!   executable (or that file, deleted by an upgrade) **and** either its arguments are the
//!   configured zygote arguments or its real uid is in the clones' configured range (a
//!   clone's command line is in its own memory, which a hostile guest can overwrite) — a
//!   pgid reused by unrelated processes is never killed;
//! - it refuses to start ([`ReconcileError::InUse`]) if the group's leader is one of ours
//!   and its parent is a live process other than this one and init: another agent is using
//!   the same `run_dir`;
//! - it asks the old zygote to stop (`SIGTERM`: it kills and reaps its clones), then
//!   `SIGKILL`s whatever of ours is left, through pidfds (no pid-reuse race between the check
//!   and the kill), and waits until each has exited;
//! - it logs what it removed and deletes the file.
//!
//! "The configured zygote executable" is the one configured *now*: after the zygote
//! executable changed (`serve --zygote`, an upgrade that moved it), a leftover of the previous
//! one is reported as spared, not killed. Such leftovers normally do not exist (they die with
//! the agent), and recognising any executable the pgid file names would let whoever can
//! write that file have arbitrary processes killed.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use slog::{error, info, warn, Logger};

use crate::config::SandboxConfig;
use crate::sys;

/// The file recording the zygote's process group, in `run_dir`.
pub const PGID_FILE: &str = "sandbox.pgid";

/// How long the old zygote gets to kill and reap its clones after `SIGTERM`.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long a `SIGKILL`ed process may take to exit.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The reconciler could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The pgid file could not be read, written or removed.
    #[error("pgid file {path:?}")]
    PgidFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `/proc` could not be listed.
    #[error("listing /proc failed")]
    ProcScan(#[source] io::Error),
    /// A leftover could not be signalled.
    #[error("killing leftover pid {pid} failed")]
    Kill {
        /// The pid.
        pid: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The recorded zygote is alive and its parent is another live process: an agent is
    /// using the same `run_dir`.
    #[error("run_dir is in use: zygote process group {pgid} belongs to live process {parent}")]
    InUse {
        /// The recorded process group.
        pgid: i32,
        /// The zygote's parent.
        parent: i32,
    },
    /// Leftovers were still running after `SIGKILL`.
    #[error("leftover pids {pids:?} still run after SIGKILL")]
    StillAlive {
        /// The pids.
        pids: Vec<i32>,
    },
}

/// What the reconciler found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// The recorded process group, if a pgid file was found.
    pub pgid: Option<i32>,
    /// Leftovers of ours that were killed.
    pub removed: Vec<i32>,
    /// Processes in that group that are not ours: left alone.
    pub spared: Vec<i32>,
}

/// Path of the pgid file.
pub(crate) fn pgid_path(run_dir: &Path) -> PathBuf {
    run_dir.join(PGID_FILE)
}

/// Records the zygote's process group (write to a temporary file, then rename).
pub(crate) fn record(run_dir: &Path, pgid: i32) -> Result<(), ReconcileError> {
    let path = pgid_path(run_dir);
    let tmp = run_dir.join(format!("{PGID_FILE}.tmp"));
    let err = |source| ReconcileError::PgidFile {
        path: path.clone(),
        source,
    };
    fs::write(&tmp, format!("{pgid}\n")).map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)
}

/// Removes the pgid file (after a clean shutdown).
pub(crate) fn clear(run_dir: &Path) -> Result<(), ReconcileError> {
    let path = pgid_path(run_dir);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ReconcileError::PgidFile { path, source }),
    }
}

/// One process of the recorded group.
#[derive(Debug)]
struct Member {
    pid: i32,
    ppid: i32,
    ours: bool,
}

/// `(ppid, pgrp)` from `/proc/<pid>/stat` (fields 4 and 5, after the parenthesised name);
/// `None` if the process is gone or a zombie (it has exited: nothing left to kill).
fn stat_ids(pid: i32) -> Option<(i32, i32)> {
    let stat = fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(close.checked_add(2)?..)?).ok()?;
    let mut fields = rest.split(' ');
    if matches!(fields.next()?, "Z" | "X") {
        return None;
    }
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

/// Whether `pid` runs the configured zygote executable with the configured arguments, or
/// runs that executable under a uid of the clones' range (a clone's command line lives in
/// its own memory, which a hostile guest can overwrite; its uid it cannot change).
fn is_ours(pid: i32, exe: &Path, args: &[Vec<u8>], clone_uids: (u32, u32)) -> bool {
    let Ok(link) = fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let link = link.as_os_str().as_bytes();
    let link = link.strip_suffix(b" (deleted)").unwrap_or(link);
    if link != exe.as_os_str().as_bytes() {
        return false;
    }
    if real_uid(pid).is_some_and(|uid| {
        let (first, count) = clone_uids;
        uid >= first && u64::from(uid) < u64::from(first) + u64::from(count)
    }) {
        return true;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let found: Vec<&[u8]> = cmdline
        .strip_suffix(b"\0")
        .unwrap_or(&cmdline)
        .split(|&b| b == 0)
        .collect();
    found
        .get(1..)
        .is_some_and(|rest| rest.iter().copied().eq(args.iter().map(Vec::as_slice)))
}

/// The real uid of `pid`, from `/proc/<pid>/status`.
fn real_uid(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn members(
    pgid: i32,
    exe: &Path,
    args: &[Vec<u8>],
    clone_uids: (u32, u32),
) -> Result<Vec<Member>, ReconcileError> {
    let me = nix::unistd::getpid().as_raw();
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").map_err(ReconcileError::ProcScan)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some((ppid, pgrp)) = stat_ids(pid) else {
            continue; // exited (gone or a zombie)
        };
        if pgrp == pgid {
            out.push(Member {
                pid,
                ppid,
                ours: is_ours(pid, exe, args, clone_uids),
            });
        }
    }
    Ok(out)
}

/// Removes the leftovers recorded in `config.run_dir` (see the [module docs](self)).
pub fn reconcile(
    config: &SandboxConfig,
    logger: &Logger,
) -> Result<ReconcileReport, ReconcileError> {
    let path = pgid_path(&config.run_dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ReconcileReport::default()),
        Err(source) => return Err(ReconcileError::PgidFile { path, source }),
    };
    let mut report = ReconcileReport::default();
    let Some(pgid) = text.trim().parse::<i32>().ok().filter(|&p| p > 1) else {
        warn!(logger, "ignoring a malformed pgid file"; "path" => %path.display());
        clear(&config.run_dir)?;
        return Ok(report);
    };
    report.pgid = Some(pgid);
    let me = nix::unistd::getpid().as_raw();
    if pgid == nix::unistd::getpgrp().as_raw() {
        warn!(logger, "recorded pgid is our own process group; not touching it"; "pgid" => pgid);
        clear(&config.run_dir)?;
        return Ok(report);
    }
    let exe = fs::canonicalize(&config.zygote_exe).unwrap_or_else(|_| config.zygote_exe.clone());
    let args: Vec<Vec<u8>> = config
        .zygote_args
        .iter()
        .map(|a| a.as_bytes().to_vec())
        .collect();

    let clone_uids = (config.first_uid, config.uid_count);
    let found = members(pgid, &exe, &args, clone_uids)?;
    let leader_parent = found.iter().find(|m| m.pid == pgid).map(|m| m.ppid);
    let owned_by_live_agent = leader_parent
        .is_some_and(|p| p != me && p > 1 && Path::new(&format!("/proc/{p}")).exists());
    if owned_by_live_agent {
        let parent = leader_parent.unwrap_or(0);
        error!(logger, "a zygote recorded in run_dir belongs to a live process (another agent using the same run_dir?)";
            "pgid" => pgid, "parent_pid" => parent);
        return Err(ReconcileError::InUse { pgid, parent });
    }
    for m in found.iter().filter(|m| !m.ours) {
        report.spared.push(m.pid);
    }
    if !report.spared.is_empty() {
        warn!(logger, "recorded pgid now holds processes that are not ours; left alone";
            "pgid" => pgid, "pids" => ?report.spared);
    }

    // Pin each leftover with a pidfd, then check again that the pid still names it.
    let mut pinned: Vec<(i32, OwnedFd)> = Vec::new();
    for m in found.iter().filter(|m| m.ours) {
        let Ok(fd) = sys::pidfd_open(m.pid) else {
            continue; // already gone
        };
        if is_ours(m.pid, &exe, &args, clone_uids)
            && stat_ids(m.pid).is_some_and(|(_, g)| g == pgid)
        {
            pinned.push((m.pid, fd));
        }
    }
    if pinned.is_empty() {
        info!(logger, "previous run left no process behind"; "pgid" => pgid);
        clear(&config.run_dir)?;
        return Ok(report);
    }
    // The old zygote first, gently: it kills and reaps its own clones.
    if let Some((_, zygote)) = pinned.iter().find(|(pid, _)| *pid == pgid) {
        sys::pidfd_send_signal(zygote.as_fd(), libc::SIGTERM)
            .map_err(|source| ReconcileError::Kill { pid: pgid, source })?;
        let _ = sys::pidfd_exited(zygote.as_fd(), TERM_GRACE);
    }
    for (pid, fd) in &pinned {
        sys::pidfd_send_signal(fd.as_fd(), libc::SIGKILL)
            .map_err(|source| ReconcileError::Kill { pid: *pid, source })?;
    }
    let mut alive = Vec::new();
    for (pid, fd) in &pinned {
        if !sys::pidfd_exited(fd.as_fd(), KILL_WAIT).unwrap_or(false) {
            alive.push(*pid);
        }
    }
    if !alive.is_empty() {
        return Err(ReconcileError::StillAlive { pids: alive });
    }
    report.removed = pinned.iter().map(|(pid, _)| *pid).collect();
    info!(logger, "removed leftovers of a previous sandbox run";
        "pgid" => pgid, "pids" => ?report.removed);
    clear(&config.run_dir)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ids_parse_names_with_spaces_and_parens() {
        let me = nix::unistd::getpid().as_raw();
        let (ppid, pgrp) = stat_ids(me).unwrap();
        assert_eq!(ppid, nix::unistd::getppid().as_raw());
        assert_eq!(pgrp, nix::unistd::getpgrp().as_raw());
        assert!(stat_ids(-5).is_none());
    }

    #[test]
    fn real_uid_is_read_from_proc() {
        let me = nix::unistd::getpid().as_raw();
        assert_eq!(real_uid(me), Some(nix::unistd::getuid().as_raw()));
        assert_eq!(real_uid(-5), None);
    }

    #[test]
    fn a_missing_or_malformed_file_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let config = SandboxConfig::new("/bin/true", ["x"], dir.path());
        let logger = Logger::root(slog::Discard, slog::o!());
        assert_eq!(
            reconcile(&config, &logger).unwrap(),
            ReconcileReport::default()
        );
        fs::write(pgid_path(dir.path()), "garbage").unwrap();
        assert_eq!(reconcile(&config, &logger).unwrap().pgid, None);
        assert!(!pgid_path(dir.path()).exists());
        record(dir.path(), 1234).unwrap();
        assert_eq!(fs::read_to_string(pgid_path(dir.path())).unwrap(), "1234\n");
    }
}
