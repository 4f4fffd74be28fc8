//! Admin key files, as `mayfly admin keygen` writes them:
//!
//! * `NAME.key` — the private key, the PKCS#8 v2 document `ring` generates for Ed25519,
//!   mode 0600, never overwritten; a key file readable by group or others is refused;
//! * `NAME.pub` — the public key (the key id) as 64 lowercase hex digits and a newline,
//!   the line an agent's `admin_keys` list takes.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::envelope::PublicKey;
use crate::{hex, unhex};

/// Largest key file read.
const MAX_KEY_FILE: u64 = 4096;

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// I/O on the file.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// A private key readable or writable by others.
    #[error("{path} has mode {mode:o}; an admin private key must be 0600")]
    Permissions {
        /// Path.
        path: PathBuf,
        /// Mode.
        mode: u32,
    },
    /// Not a key.
    #[error("{path} is not {what}")]
    Malformed {
        /// Path.
        path: PathBuf,
        /// What it should be.
        what: &'static str,
    },
    /// No randomness.
    #[error("system randomness unavailable")]
    Random,
}

/// Generates a key pair into `<stem>.key` (0600, created exclusively) and `<stem>.pub`.
/// Returns the public key.
pub fn generate(stem: &Path) -> Result<PublicKey, KeyFileError> {
    let key_path = stem.with_extension("key");
    let pub_path = stem.with_extension("pub");
    let io_err = |p: &Path| {
        let path = p.to_path_buf();
        move |source| KeyFileError::Io { path, source }
    };
    let der =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyFileError::Random)?;
    let pair = Ed25519KeyPair::from_pkcs8(der.as_ref()).map_err(|_| KeyFileError::Random)?;
    let mut public = [0u8; 32];
    public.copy_from_slice(pair.public_key().as_ref());
    // The public file is created first (exclusively): if either file exists, nothing is
    // written, and a failure after that removes what this call created.
    let mut p = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&pub_path)
        .map_err(io_err(&pub_path))?;
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io_err(&key_path))?;
        let key_written = (|| {
            f.write_all(der.as_ref()).map_err(io_err(&key_path))?;
            f.sync_all().map_err(io_err(&key_path))
        })();
        if key_written.is_err() {
            let _ = fs::remove_file(&key_path);
        }
        key_written?;
        writeln!(p, "{}", hex(&public)).map_err(io_err(&pub_path))?;
        p.sync_all().map_err(io_err(&pub_path))
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&pub_path);
        return Err(e);
    }
    Ok(public)
}

/// Loads a private key file (mode must be 0600 or stricter).
pub fn load_private(path: &Path) -> Result<Ed25519KeyPair, KeyFileError> {
    let io_err = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let md = fs::metadata(path).map_err(io_err)?;
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if md.len() > MAX_KEY_FILE {
        return Err(KeyFileError::Malformed {
            path: path.to_path_buf(),
            what: "a PKCS#8 Ed25519 private key (too long)",
        });
    }
    let der = fs::read(path).map_err(io_err)?;
    Ed25519KeyPair::from_pkcs8(&der).map_err(|_| KeyFileError::Malformed {
        path: path.to_path_buf(),
        what: "a PKCS#8 Ed25519 private key",
    })
}

/// Parses a public key: 64 hex digits, or a path to a file holding them.
pub fn parse_public(text: &str) -> Result<PublicKey, KeyFileError> {
    let t = text.trim();
    if let Some(k) = unhex(t).and_then(|b| <[u8; 32]>::try_from(b).ok()) {
        return Ok(k);
    }
    let path = Path::new(t);
    let md = fs::metadata(path).map_err(|source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let malformed = || KeyFileError::Malformed {
        path: path.to_path_buf(),
        what: "64 hex digits of an Ed25519 public key",
    };
    if md.len() > MAX_KEY_FILE {
        return Err(malformed());
    }
    let s = fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    unhex(s.trim())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(malformed)
}

/// The public key of a key pair.
pub fn public_of(pair: &Ed25519KeyPair) -> PublicKey {
    let mut public = [0u8; 32];
    public.copy_from_slice(pair.public_key().as_ref());
    public
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_0600_key_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("alice");
        let public = generate(&stem).unwrap();
        let mode = fs::metadata(stem.with_extension("key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let pair = load_private(&stem.with_extension("key")).unwrap();
        assert_eq!(public_of(&pair), public);
        assert_eq!(
            parse_public(stem.with_extension("pub").to_str().unwrap()).unwrap(),
            public
        );
        assert_eq!(parse_public(&hex(&public)).unwrap(), public);
        assert!(generate(&stem).is_err());
        fs::set_permissions(
            stem.with_extension("key"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        assert!(matches!(
            load_private(&stem.with_extension("key")),
            Err(KeyFileError::Permissions { mode: 0o640, .. })
        ));
    }

    #[test]
    fn keygen_over_half_a_pair_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // Only the public file exists: no private key is created beside it.
        let a = dir.path().join("a");
        fs::write(a.with_extension("pub"), "x\n").unwrap();
        assert!(generate(&a).is_err());
        assert!(!a.with_extension("key").exists());
        assert_eq!(fs::read_to_string(a.with_extension("pub")).unwrap(), "x\n");
        // Only the private file exists: it is untouched and no public file is left behind.
        let b = dir.path().join("b");
        fs::write(b.with_extension("key"), "old").unwrap();
        assert!(generate(&b).is_err());
        assert!(!b.with_extension("pub").exists());
        assert_eq!(fs::read_to_string(b.with_extension("key")).unwrap(), "old");
    }
}
