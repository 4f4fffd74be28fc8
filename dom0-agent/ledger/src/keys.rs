//! The appliance signing key (Ed25519, via `ring`) and where it is kept.
//!
//! Signing is the same whatever the key's source: an Ed25519 key pair in the agent's memory.
//! A [`KeyStore`] says where the private key is kept between starts:
//!
//! * [`FileKeys`] (source `file`, the default): `<data-dir>/signing.key`, the PKCS#8 v2
//!   document that `ring` generates, mode 0600, created on the ledger's first start and never
//!   rewritten. A key file readable by group or others is refused, as is a ledger whose key
//!   file has gone missing: generating a new key there would silently fork the appliance's
//!   identity.
//! * the TPM (source `tpm`, crate `mayfly-tpm`): the 32-byte seed sealed to PCR values, never
//!   in a file; it fails with [`KeyError::Unavailable`] when the TPM will not release it.
//!
//! Vocabulary: uses only [`crate::codec`] (hex).

#![forbid(unsafe_code)]

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// The durable 0600 write of a private file (temporary file, fsync, rename, directory
/// fsync), shared with the TPM key source's sealed blob (`mayfly-tpm`).
pub use mayfly_durable::write_private_file;

/// File name of the private key inside the data directory.
pub const KEY_FILE: &str = "signing.key";
/// File name of the incoming key during a key rotation (see [`SigningKey::generate_next`]).
pub const NEXT_KEY_FILE: &str = "signing.key.next";
/// Largest key file accepted (a PKCS#8 Ed25519 document is 83-85 bytes).
const MAX_KEY_FILE: u64 = 4096;

/// A 32-byte Ed25519 public key.
pub type PublicKey = [u8; 32];

/// Why the signing key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The ledger exists but its key file does not.
    #[error("signing key {path} is missing; the ledger in this directory was signed with it. Restore it from backup (a new key would not verify the existing chain)")]
    Missing {
        /// Expected path.
        path: PathBuf,
    },
    /// The key file is readable or writable by group or others.
    #[error("signing key {path} has mode {mode:o}; it must be 0600 (owner only)")]
    Permissions {
        /// Path.
        path: PathBuf,
        /// Mode found.
        mode: u32,
    },
    /// The key file is not a PKCS#8 Ed25519 key.
    #[error("signing key {path} is not a valid PKCS#8 Ed25519 key: {reason}")]
    Malformed {
        /// Path.
        path: PathBuf,
        /// What `ring` reported.
        reason: String,
    },
    /// Reading or writing the key file failed.
    #[error("signing key {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The system random generator failed.
    #[error("could not generate a signing key: system randomness unavailable")]
    Random,
    /// The key store holds the key but will not release it (a sealed key whose TPM refuses
    /// to unseal: another boot chain, another TPM). The agent refuses to sign.
    #[error("the {source_kind} signing key in {path} cannot be used: {source}")]
    Unavailable {
        /// The key source (`tpm`).
        source_kind: &'static str,
        /// The key's file (for a sealed key: the sealed blob).
        path: PathBuf,
        /// Why, as the key source reports it.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The data directory holds its key in another source than the one configured.
    #[error("the data directory {path} keeps its signing key in source {found:?}, but source {configured:?} is configured ([key] source); the key was not touched")]
    WrongSource {
        /// Data directory.
        path: PathBuf,
        /// The source the directory's files belong to.
        found: &'static str,
        /// The configured source.
        configured: &'static str,
    },
}

impl KeyError {
    /// Whether the key exists but its source refused to release it.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Where the ledger's signing key is kept between starts. Each operation names the data
/// directory; the ledger calls them as [`SigningKey`]'s file functions are described
/// (`generate` on first start, `generate_next`/`install_next`/`discard_next` for a rotation).
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// The source's name as configured and reported: `file` or `tpm`.
    fn source(&self) -> &'static str;
    /// The current key.
    fn load(&self, dir: &Path) -> Result<SigningKey, KeyError>;
    /// The incoming key of an interrupted rotation.
    fn load_next(&self, dir: &Path) -> Result<SigningKey, KeyError>;
    /// A new current key (first start). Fails if one exists.
    fn generate(&self, dir: &Path) -> Result<SigningKey, KeyError>;
    /// A new incoming key for a rotation (replacing a leftover one).
    fn generate_next(&self, dir: &Path) -> Result<SigningKey, KeyError>;
    /// Removes an incoming key that never committed.
    fn discard_next(&self, dir: &Path) -> Result<(), KeyError>;
    /// Makes the incoming key the current one; the outgoing key is gone afterwards.
    fn install_next(&self, dir: &Path) -> Result<(), KeyError>;
    /// What the operator sees about the source (`GET /v1/health`, console `status`):
    /// name/value pairs, e.g. the TCTI and the PCRs sealed to. Never key material.
    fn describe(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// The file key store: `<data-dir>/signing.key` (module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct FileKeys;

/// The file name of a sealed key ([`KeyStore`] `tpm`): a data directory holding it and no
/// `signing.key` is not the file source's.
pub const SEALED_KEY_FILE: &str = "signing.sealed";

impl KeyStore for FileKeys {
    fn source(&self) -> &'static str {
        "file"
    }
    fn load(&self, dir: &Path) -> Result<SigningKey, KeyError> {
        match SigningKey::load(dir) {
            Err(KeyError::Missing { .. }) if dir.join(SEALED_KEY_FILE).exists() => {
                Err(KeyError::WrongSource {
                    path: dir.to_path_buf(),
                    found: "tpm",
                    configured: "file",
                })
            }
            other => other,
        }
    }
    fn load_next(&self, dir: &Path) -> Result<SigningKey, KeyError> {
        SigningKey::load_next(dir)
    }
    fn generate(&self, dir: &Path) -> Result<SigningKey, KeyError> {
        if dir.join(SEALED_KEY_FILE).exists() {
            return Err(KeyError::WrongSource {
                path: dir.to_path_buf(),
                found: "tpm",
                configured: "file",
            });
        }
        SigningKey::generate(dir)
    }
    fn generate_next(&self, dir: &Path) -> Result<SigningKey, KeyError> {
        SigningKey::generate_next(dir)
    }
    fn discard_next(&self, dir: &Path) -> Result<(), KeyError> {
        SigningKey::discard_next(dir)
    }
    fn install_next(&self, dir: &Path) -> Result<(), KeyError> {
        SigningKey::install_next(dir)
    }
    fn describe(&self) -> Vec<(&'static str, String)> {
        vec![("file", KEY_FILE.to_string())]
    }
}

/// The appliance's signing key pair.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", crate::codec::hex(&self.public))
    }
}

impl SigningKey {
    /// Loads `<dir>/signing.key`.
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        Self::load_file(&dir.join(KEY_FILE))
    }

    /// Loads `<dir>/signing.key.next`, the incoming key of a rotation.
    pub fn load_next(dir: &Path) -> Result<Self, KeyError> {
        Self::load_file(&dir.join(NEXT_KEY_FILE))
    }

    fn load_file(path: &Path) -> Result<Self, KeyError> {
        let path = path.to_path_buf();
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::Missing { path })
            }
            Err(e) => return Err(io(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path, mode });
        }
        if meta.len() > MAX_KEY_FILE {
            return Err(KeyError::Malformed {
                path,
                reason: format!("{} bytes is too long for a key", meta.len()),
            });
        }
        let der = fs::read(&path).map_err(io)?;
        Self::from_pkcs8(&der).map_err(|reason| KeyError::Malformed { path, reason })
    }

    /// Generates a new key into `<dir>/signing.key` (mode 0600, written through a temporary
    /// file, fsynced, then renamed). Fails if the file already exists.
    pub fn generate(dir: &Path) -> Result<Self, KeyError> {
        Self::generate_as(dir, KEY_FILE)
    }

    /// Generates the incoming key of a rotation into `<dir>/signing.key.next` (replacing a
    /// leftover of an interrupted rotation). The ledger installs it with
    /// [`SigningKey::install_next`] once the rotation head is durable; until then the
    /// current key stays in `signing.key`.
    pub fn generate_next(dir: &Path) -> Result<Self, KeyError> {
        Self::discard_next(dir)?;
        Self::generate_as(dir, NEXT_KEY_FILE)
    }

    /// Removes `<dir>/signing.key.next` if present (an interrupted rotation that never
    /// committed).
    pub fn discard_next(dir: &Path) -> Result<(), KeyError> {
        let path = dir.join(NEXT_KEY_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KeyError::Io { path, source }),
        }
    }

    /// Replaces `signing.key` with `signing.key.next` (atomic rename, then the directory is
    /// fsynced). The outgoing private key is gone afterwards: a retired key cannot sign.
    pub fn install_next(dir: &Path) -> Result<(), KeyError> {
        let path = dir.join(KEY_FILE);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        fs::rename(dir.join(NEXT_KEY_FILE), &path).map_err(io)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    }

    fn generate_as(dir: &Path, name: &str) -> Result<Self, KeyError> {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        let der =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Random)?;
        // A leftover from an interrupted first start holds no committed identity; an
        // existing key is never overwritten.
        write_private_file(&path, &tmp, der.as_ref(), false, |path, source| {
            KeyError::Io { path, source }
        })?;
        Self::from_pkcs8(der.as_ref()).map_err(|reason| KeyError::Malformed { path, reason })
    }

    /// A key from a raw 32-byte Ed25519 seed: a seed unsealed by the TPM key source, and the
    /// published test vectors. A file key always comes from [`SigningKey::generate`].
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        // A 32-byte seed is always a valid Ed25519 private key; the public key is derived.
        let pair = match Ed25519KeyPair::from_seed_unchecked(seed) {
            Ok(pair) => pair,
            Err(_) => unreachable!("any 32-byte seed is a valid Ed25519 key"),
        };
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Self { pair, public }
    }

    fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_pkcs8(der).map_err(|e| e.to_string())?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(Self { pair, public })
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

/// Whether `sig` is `key`'s Ed25519 signature of `msg`.
pub fn verify_signature(key: &PublicKey, msg: &[u8], sig: &[u8; 64]) -> bool {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(msg, sig)
        .is_ok()
}

/// Reads a public key given as 64 hex digits (surrounding whitespace ignored).
pub fn parse_public_key(text: &str) -> Option<PublicKey> {
    let bytes = crate::codec::unhex(text.trim())?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_then_load_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let k = SigningKey::generate(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = SigningKey::load(dir.path()).unwrap();
        assert_eq!(k.public_key(), again.public_key());
        let sig = k.sign(b"msg");
        assert!(verify_signature(&k.public_key(), b"msg", &sig));
        assert!(!verify_signature(&k.public_key(), b"msh", &sig));
        assert!(
            SigningKey::generate(dir.path()).is_err(),
            "must not overwrite"
        );
    }

    #[test]
    fn loose_permissions_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            SigningKey::load(dir.path()),
            Err(KeyError::Missing { .. })
        ));
        SigningKey::generate(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SigningKey::load(dir.path()),
            Err(KeyError::Permissions { mode: 0o644, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, b"not a key").unwrap();
        assert!(matches!(
            SigningKey::load(dir.path()),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn public_key_hex() {
        let hex = "00".repeat(31) + "ff";
        assert_eq!(parse_public_key(&hex).unwrap()[31], 0xff);
        assert!(parse_public_key("abcd").is_none());
    }
}
