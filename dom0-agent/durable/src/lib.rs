//! A private file written durably, once: how the ledger writes its signing key
//! (`mayfly_ledger::keys`, which re-exports [`write_private_file`]) and the TPM crate its
//! sealed key blob.
//!
//! The bytes go to a temporary file created new with mode 0600 (a leftover of an
//! interrupted write is removed first), are fsynced, and the file is renamed over the
//! target; then the directory is fsynced, so that after a crash the target holds either
//! the old bytes or all of the new ones, never a part. Its own crate, with no dependency,
//! because the TPM crate reads and writes sealed blobs without depending on the ledger
//! (its `esapi` feature off: the operator's CLI, `mayfly-hw`).

#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` (mode 0600) through `tmp`: removes a leftover `tmp`, creates it
/// new with mode 0600, writes and fsyncs it, renames it to `path` and fsyncs `path`'s
/// directory. With `overwrite` off an existing `path` is refused (`AlreadyExists`, "refusing
/// to overwrite a key") and `tmp` removed; with it on, `path` is replaced.
///
/// A failure is handed to `err` with the path the failing step touched (`tmp`, `path`, or
/// the directory), so that each caller reports it in its own error type.
pub fn write_private_file<E>(
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    overwrite: bool,
    err: impl Fn(PathBuf, io::Error) -> E,
) -> Result<(), E> {
    let at = |p: &Path| {
        let p = p.to_path_buf();
        let err = &err;
        move |source| err(p, source)
    };
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(tmp)(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(at(tmp))?;
    // The umask can only take bits away from the mode asked for: set it exactly.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(at(tmp))?;
    f.write_all(bytes).map_err(at(tmp))?;
    f.sync_all().map_err(at(tmp))?;
    drop(f);
    if !overwrite && path.exists() {
        let _ = fs::remove_file(tmp);
        return Err(at(path)(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "refusing to overwrite a key",
        )));
    }
    fs::rename(tmp, path).map_err(at(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, bytes: &[u8], overwrite: bool) -> Result<(), (PathBuf, io::Error)> {
        write_private_file(
            &dir.join("k"),
            &dir.join("k.tmp"),
            bytes,
            overwrite,
            |p, e| (p, e),
        )
    }

    #[test]
    fn writes_0600_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A leftover of an interrupted write, readable by others, is replaced.
        fs::write(dir.path().join("k.tmp"), b"stale").unwrap();
        fs::set_permissions(dir.path().join("k.tmp"), fs::Permissions::from_mode(0o644)).unwrap();
        write(dir.path(), b"secret", false).unwrap();
        let path = dir.path().join("k");
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!dir.path().join("k.tmp").exists());
    }

    #[test]
    fn refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), b"first", false).unwrap();
        let (path, e) = write(dir.path(), b"second", false).unwrap_err();
        assert_eq!(path, dir.path().join("k"));
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(dir.path().join("k")).unwrap(), b"first");
        assert!(!dir.path().join("k.tmp").exists());
        write(dir.path(), b"second", true).unwrap();
        assert_eq!(fs::read(dir.path().join("k")).unwrap(), b"second");
    }

    #[test]
    fn a_failing_step_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let (path, e) = write(&missing, b"x", true).unwrap_err();
        assert_eq!(path, missing.join("k.tmp"));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
