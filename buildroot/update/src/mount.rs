//! A file system mounted for the duration of one operation: the EFI system partition
//! (`MAYFLY-ESP`) for an install or a boot check, the operator's update medium
//! (`MAYFLY-MEDIA`) for an install. Found by label with `findfs`, mounted with `mount`
//! (`nosuid,nodev,noexec`; read-only unless asked), unmounted when dropped. A directory given
//! by the caller (tests, hosts, a medium already mounted) is used as it is and left alone.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a labelled file system could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A helper program could not be run.
    #[error("running {program}: {source}")]
    Spawn {
        /// `findfs` or `mount`.
        program: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// No partition carries the label.
    #[error("no partition labelled {0}")]
    NoLabel(String),
    /// The mount point could not be created.
    #[error("creating the mount point {path}: {source}")]
    MountPoint {
        /// Directory.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// `mount` failed.
    #[error("cannot mount {device} ({label}) on {dir}")]
    Mount {
        /// Block device.
        device: String,
        /// Its label.
        label: String,
        /// Mount point.
        dir: PathBuf,
    },
}

/// A mounted (or given) directory; unmounted on drop if this mounted it.
#[derive(Debug)]
pub struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// A directory that is already there (nothing is mounted or unmounted).
    pub fn given(dir: &Path) -> Mounted {
        Mounted {
            dir: dir.to_path_buf(),
            mounted: false,
        }
    }

    /// Mounts the partition labelled `label` (file system `fstype`, or what `mount` finds
    /// when `None`) on `dir`.
    pub fn by_label(
        label: &str,
        fstype: Option<&str>,
        dir: &Path,
        writable: bool,
    ) -> Result<Mounted, MountError> {
        let out = Command::new("findfs")
            .arg(format!("LABEL={label}"))
            .output()
            .map_err(|source| MountError::Spawn {
                program: "findfs",
                source,
            })?;
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || device.is_empty() {
            return Err(MountError::NoLabel(label.to_owned()));
        }
        std::fs::create_dir_all(dir).map_err(|source| MountError::MountPoint {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut cmd = Command::new("mount");
        if let Some(t) = fstype {
            cmd.args(["-t", t]);
        }
        let st = cmd
            .arg("-o")
            .arg(if writable {
                "rw,nosuid,nodev,noexec"
            } else {
                "ro,nosuid,nodev,noexec"
            })
            .arg(&device)
            .arg(dir)
            .status()
            .map_err(|source| MountError::Spawn {
                program: "mount",
                source,
            })?;
        if !st.success() {
            return Err(MountError::Mount {
                device,
                label: label.to_owned(),
                dir: dir.to_path_buf(),
            });
        }
        Ok(Mounted {
            dir: dir.to_path_buf(),
            mounted: true,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
    }
}
