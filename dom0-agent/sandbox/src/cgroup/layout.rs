//! Where the cgroup hierarchies are, as this process sees them: v2 (one mount with the
//! `cpu`, `memory` and `pids` controllers) or v1 (one hierarchy per controller), read from
//! `/proc/self/mountinfo` and `/proc/self/cgroup`.

use std::fs;
use std::path::{Path, PathBuf};

use super::{io_err, CgroupError};

/// Where the hierarchies are, as this process sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// v2: the mount point and the process's cgroup (`/...`) in it.
    V2 {
        /// The cgroup2 mount point.
        mount: PathBuf,
        /// The process's cgroup path (from `/proc/self/cgroup`, `0::<path>`).
        own: String,
    },
    /// v1: per controller (`cpu`, `memory`, `pids`, in that order) its mount point and the
    /// process's cgroup in it.
    V1 {
        /// `(controller, mount point, own path)`.
        controllers: Vec<(&'static str, PathBuf, String)>,
    },
}

/// The controllers the clones' group is limited by.
pub(super) const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Reads the layout from `mountinfo` (`/proc/self/mountinfo`) and `cgroups`
/// (`/proc/self/cgroup`); `v2_controllers` reads a v2 mount's `cgroup.controllers`. v2 is
/// chosen when a cgroup2 mount has all three controllers; else v1 when all three have v1
/// mounts.
pub fn layout_from(
    mountinfo: &str,
    cgroups: &str,
    v2_controllers: impl Fn(&Path) -> Option<String>,
) -> Result<Layout, CgroupError> {
    let (v2_mount, v1_mounts) = cgroup_mounts(mountinfo);
    let mut v2_reason = String::from("no cgroup2 mount");
    if let Some(mount) = v2_mount {
        let available = v2_controllers(&mount).unwrap_or_default();
        let missing: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|c| !available.split_whitespace().any(|a| a == *c))
            .collect();
        if missing.is_empty() {
            let own = cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .ok_or_else(|| CgroupError::NoHierarchy {
                    reason: "/proc/self/cgroup has no v2 entry".into(),
                })?;
            return Ok(Layout::V2 {
                mount,
                own: own.to_owned(),
            });
        }
        v2_reason = format!(
            "cgroup2 at {} lacks {} (bound to v1 hierarchies?)",
            mount.display(),
            missing.join(", ")
        );
    }
    v1_layout(&v1_mounts, cgroups, &v2_reason)
}

/// The cgroup mounts in `mountinfo`: the first cgroup2 mount, and for each of
/// [`CONTROLLERS`] the first v1 hierarchy that has it.
fn cgroup_mounts(mountinfo: &str) -> (Option<PathBuf>, Vec<(&'static str, PathBuf)>) {
    let mut v2_mount = None;
    let mut v1_mounts: Vec<(&'static str, PathBuf)> = Vec::new();
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut l = left.split(' ');
        let mount_point = l.nth(4).map(unescape_mountinfo);
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let super_opts = r.nth(1).unwrap_or("");
        let Some(mount_point) = mount_point else {
            continue;
        };
        match fstype {
            "cgroup2" if v2_mount.is_none() => v2_mount = Some(PathBuf::from(mount_point)),
            "cgroup" => {
                for c in CONTROLLERS {
                    if super_opts.split(',').any(|o| o == c)
                        && !v1_mounts.iter().any(|(have, _)| *have == c)
                    {
                        v1_mounts.push((c, PathBuf::from(&mount_point)));
                    }
                }
            }
            _ => {}
        }
    }
    (v2_mount, v1_mounts)
}

/// The v1 layout: each of [`CONTROLLERS`] with its mount and this process's cgroup in it
/// (`cgroups` lines `hierarchy-id:controller-list:path`). `v2_reason` says why v2 was not
/// used, for the error when a controller has no v1 hierarchy.
fn v1_layout(
    v1_mounts: &[(&'static str, PathBuf)],
    cgroups: &str,
    v2_reason: &str,
) -> Result<Layout, CgroupError> {
    let mut controllers = Vec::new();
    for c in CONTROLLERS {
        let Some((_, mount)) = v1_mounts.iter().find(|(have, _)| *have == c) else {
            return Err(CgroupError::NoHierarchy {
                reason: format!("{v2_reason}; no v1 {c} hierarchy"),
            });
        };
        let own = cgroups.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let list = parts.next()?;
            let path = parts.next()?;
            list.split(',').any(|x| x == c).then(|| path.to_owned())
        });
        let Some(own) = own else {
            return Err(CgroupError::NoHierarchy {
                reason: format!("/proc/self/cgroup names no v1 {c} cgroup"),
            });
        };
        controllers.push((c, mount.clone(), own));
    }
    Ok(Layout::V1 { controllers })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// This process's layout, from `/proc`.
pub fn detect() -> Result<Layout, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading", Path::new("/proc/self/mountinfo")))?;
    let cgroups = fs::read_to_string("/proc/self/cgroup")
        .map_err(io_err("reading", Path::new("/proc/self/cgroup")))?;
    layout_from(&mountinfo, &cgroups, |mount| {
        fs::read_to_string(mount.join("cgroup.controllers")).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 31 0:30 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,cpu
36 31 0:31 / /sys/fs/cgroup/cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpuacct
38 31 0:33 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,memory
41 31 0:36 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:19 - cgroup cgroup rw,pids
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
1:cpu:/
0::/
";
    const V2_MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn a_hybrid_host_uses_v1_and_a_v2_host_v2() {
        // The unified mount of a hybrid host has no controllers: v1 it is.
        let layout = layout_from(HYBRID_MOUNTINFO, HYBRID_CGROUP, |_| Some(String::new()));
        assert_eq!(
            layout.unwrap(),
            Layout::V1 {
                controllers: vec![
                    ("cpu", "/sys/fs/cgroup/cpu".into(), "/".into()),
                    (
                        "memory",
                        "/sys/fs/cgroup/memory".into(),
                        "/process_api/abc".into()
                    ),
                    ("pids", "/sys/fs/cgroup/pids".into(), "/".into()),
                ]
            }
        );
        let layout = layout_from(V2_MOUNTINFO, "0::/system.slice/mayfly.service\n", |m| {
            assert_eq!(m, Path::new("/sys/fs/cgroup"));
            Some("cpuset cpu io memory hugetlb pids rdma misc\n".into())
        });
        assert_eq!(
            layout.unwrap(),
            Layout::V2 {
                mount: "/sys/fs/cgroup".into(),
                own: "/system.slice/mayfly.service".into()
            }
        );
        // v2 without pids and no v1: refused, saying what is missing.
        let err = layout_from(V2_MOUNTINFO, "0::/\n", |_| Some("cpu memory".into())).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("lacks pids") && text.contains("no v1 cpu"),
            "{text}"
        );
    }
}
