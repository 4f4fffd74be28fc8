//! The ledger's `tpm` key source: the Ed25519 seed sealed to PCR values, never in a file.
//!
//! Files in the data directory (each a [`SealedBlob`], mode 0600):
//!
//! | file | holds |
//! |---|---|
//! | `signing.sealed` | the current key, sealed to the PCRs of the boot that created it |
//! | `signing.sealed.alt` | the same key sealed to another boot chain's expected PCRs (`dom0-agent reseal`, before an update switches slots) |
//! | `signing.sealed.next` | the incoming key of a rotation, until its head is durable |
//!
//! [`SealedKeys::load`] tries `signing.sealed`, then `signing.sealed.alt`; the one that
//! unseals is the *active* blob of this boot. A re-seal writes the other one, so after an
//! update the old slot's seal stays usable (a fallback to the old slot still signs) until the
//! next re-seal replaces it. A rotation removes `.alt` (it holds the outgoing key) before the
//! new key is installed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mayfly_ledger::keys::{KeyError, KeyStore, SigningKey, KEY_FILE, SEALED_KEY_FILE};
use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use crate::{BlobError, PcrValue, SealedBlob, Tpm, TpmError};

/// The re-sealed copy for another boot chain.
pub const ALT_FILE: &str = "signing.sealed.alt";
/// The incoming key of a rotation.
pub const NEXT_FILE: &str = "signing.sealed.next";

/// Every sealed blob that was tried, and why each failed.
#[derive(Debug, thiserror::Error)]
#[error("{}", .attempts.iter().map(|(p, e)| format!("{}: {e}", p.display())).collect::<Vec<_>>().join("; "))]
pub struct UnsealFailed {
    /// Blob file and the TPM's refusal.
    pub attempts: Vec<(PathBuf, TpmError)>,
}

/// The TPM key source ([`KeyStore`] `tpm`).
#[derive(Debug)]
pub struct SealedKeys {
    tcti: String,
    pcrs: Vec<u8>,
    active: Mutex<Option<&'static str>>,
}

impl SealedKeys {
    /// A key source using the TPM at `tcti`, sealing new keys to `pcrs` (checked).
    pub fn new(tcti: &str, pcrs: &[u8]) -> Result<Self, crate::SelectionError> {
        Ok(Self {
            tcti: tcti.to_string(),
            pcrs: crate::check_selection(pcrs)?,
            active: Mutex::new(None),
        })
    }

    fn unavailable(
        &self,
        path: PathBuf,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> KeyError {
        KeyError::Unavailable {
            source_kind: "tpm",
            path,
            source: Box::new(e),
        }
    }

    fn tpm(&self, dir: &Path) -> Result<Tpm, KeyError> {
        Tpm::open(&self.tcti).map_err(|e| self.unavailable(dir.join(SEALED_KEY_FILE), e))
    }

    fn blob(path: &Path) -> Result<SealedBlob, KeyError> {
        SealedBlob::read(path).map_err(|e| match e {
            BlobError::Missing { path } => KeyError::Missing { path },
            BlobError::Io { path, source } => KeyError::Io { path, source },
            BlobError::Malformed { path, reason } => KeyError::Malformed { path, reason },
        })
    }

    fn unseal(tpm: &mut Tpm, path: &Path, blob: &SealedBlob) -> Result<SigningKey, KeyError> {
        let seed = tpm.unseal(blob).map_err(|e| KeyError::Unavailable {
            source_kind: "tpm",
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let key = SigningKey::from_seed(&seed);
        if key.public_key() != blob.public_key {
            return Err(KeyError::Malformed {
                path: path.to_path_buf(),
                reason: "the unsealed seed is not the key the file names".into(),
            });
        }
        Ok(key)
    }

    fn seal_new(&self, dir: &Path, name: &str) -> Result<SigningKey, KeyError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        ring::rand::SystemRandom::new()
            .fill(seed.as_mut())
            .map_err(|_| KeyError::Random)?;
        let key = SigningKey::from_seed(&seed);
        let path = dir.join(name);
        let mut tpm = self.tpm(dir)?;
        let values = tpm
            .read_pcrs(&self.pcrs)
            .map_err(|e| self.unavailable(path.clone(), e))?;
        let blob = tpm
            .seal(&seed, &values, key.public_key())
            .map_err(|e| self.unavailable(path.clone(), e))?;
        write(&blob, &path)?;
        Ok(key)
    }

    /// The blob that unsealed on this boot (`signing.sealed` or `signing.sealed.alt`), once
    /// [`KeyStore::load`] succeeded.
    pub fn active(&self) -> Option<&'static str> {
        self.active.lock().ok().and_then(|a| *a)
    }

    /// Seals the current key also to `expected` (an update's PCR values), unsealing it on
    /// this (good) boot first; writes whichever of `signing.sealed`/`signing.sealed.alt` did
    /// not unseal now, and returns its path. The blob in use is not touched.
    pub fn reseal(&self, dir: &Path, expected: &[(u8, PcrValue)]) -> Result<PathBuf, KeyError> {
        self.reseal_states(dir, &[expected.to_vec()])
    }

    /// As [`SealedKeys::reseal`], to several boot states at once (1..=8, the same PCRs in
    /// each): one blob the TPM releases in any of them (`TPM2_PolicyOR`), e.g. every boot an
    /// A/B switch can lead to (trial boots, the committed new slot, the fallback).
    pub fn reseal_states(
        &self,
        dir: &Path,
        states: &[Vec<(u8, PcrValue)>],
    ) -> Result<PathBuf, KeyError> {
        let Some(first) = states.first() else {
            return Err(self.unavailable(
                dir.join(ALT_FILE),
                TpmError::Selection(crate::SelectionError {
                    pcrs: Vec::new(),
                    reason: "no boot state to seal to",
                }),
            ));
        };
        crate::check_selection(&first.iter().map(|p| p.0).collect::<Vec<_>>())
            .map_err(|e| self.unavailable(dir.join(ALT_FILE), TpmError::Selection(e)))?;
        let mut tpm = self.tpm(dir)?;
        let mut attempts = Vec::new();
        for (name, target) in [(SEALED_KEY_FILE, ALT_FILE), (ALT_FILE, SEALED_KEY_FILE)] {
            let source = dir.join(name);
            if !source.exists() {
                continue;
            }
            let blob = Self::blob(&source)?;
            let seed = match tpm.unseal(&blob) {
                Ok(seed) => seed,
                Err(e) => {
                    attempts.push((source, e));
                    continue;
                }
            };
            let path = dir.join(target);
            let sealed = tpm
                .seal_states(&seed, states, blob.public_key)
                .map_err(|e| self.unavailable(path.clone(), e))?;
            write(&sealed, &path)?;
            return Ok(path);
        }
        if attempts.is_empty() {
            return Err(KeyError::Missing {
                path: dir.join(SEALED_KEY_FILE),
            });
        }
        Err(self.unavailable(dir.join(SEALED_KEY_FILE), UnsealFailed { attempts }))
    }
}

fn write(blob: &SealedBlob, path: &Path) -> Result<(), KeyError> {
    blob.write(path).map_err(|e| match e {
        BlobError::Io { path, source } => KeyError::Io { path, source },
        BlobError::Missing { path } | BlobError::Malformed { path, .. } => KeyError::Io {
            path,
            source: std::io::Error::other("writing the sealed key failed"),
        },
    })
}

fn remove(path: &Path) -> Result<(), KeyError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(KeyError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl KeyStore for SealedKeys {
    fn source(&self) -> &'static str {
        "tpm"
    }

    fn load(&self, dir: &Path) -> Result<SigningKey, KeyError> {
        let candidates: Vec<&'static str> = [SEALED_KEY_FILE, ALT_FILE]
            .into_iter()
            .filter(|n| dir.join(n).exists())
            .collect();
        if candidates.is_empty() {
            if dir.join(KEY_FILE).exists() {
                return Err(KeyError::WrongSource {
                    path: dir.to_path_buf(),
                    found: "file",
                    configured: "tpm",
                });
            }
            return Err(KeyError::Missing {
                path: dir.join(SEALED_KEY_FILE),
            });
        }
        let mut tpm = self.tpm(dir)?;
        let mut attempts = Vec::new();
        for name in candidates {
            let path = dir.join(name);
            let blob = Self::blob(&path)?;
            match Self::unseal(&mut tpm, &path, &blob) {
                Ok(key) => {
                    if let Ok(mut a) = self.active.lock() {
                        *a = Some(name);
                    }
                    return Ok(key);
                }
                Err(KeyError::Unavailable { source, .. }) => match source.downcast::<TpmError>() {
                    Ok(e) => attempts.push((path, *e)),
                    Err(other) => {
                        return Err(KeyError::Unavailable {
                            source_kind: "tpm",
                            path,
                            source: other,
                        })
                    }
                },
                Err(e) => return Err(e),
            }
        }
        Err(self.unavailable(dir.join(SEALED_KEY_FILE), UnsealFailed { attempts }))
    }

    fn load_next(&self, dir: &Path) -> Result<SigningKey, KeyError> {
        let path = dir.join(NEXT_FILE);
        let blob = Self::blob(&path)?;
        let mut tpm = self.tpm(dir)?;
        Self::unseal(&mut tpm, &path, &blob)
    }

    fn generate(&self, dir: &Path) -> Result<SigningKey, KeyError> {
        if dir.join(KEY_FILE).exists() {
            return Err(KeyError::WrongSource {
                path: dir.to_path_buf(),
                found: "file",
                configured: "tpm",
            });
        }
        let path = dir.join(SEALED_KEY_FILE);
        if path.exists() {
            return Err(KeyError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "refusing to overwrite a sealed key",
                ),
            });
        }
        let key = self.seal_new(dir, SEALED_KEY_FILE)?;
        if let Ok(mut a) = self.active.lock() {
            *a = Some(SEALED_KEY_FILE);
        }
        Ok(key)
    }

    fn generate_next(&self, dir: &Path) -> Result<SigningKey, KeyError> {
        self.discard_next(dir)?;
        self.seal_new(dir, NEXT_FILE)
    }

    fn discard_next(&self, dir: &Path) -> Result<(), KeyError> {
        remove(&dir.join(NEXT_FILE))
    }

    fn install_next(&self, dir: &Path) -> Result<(), KeyError> {
        // The outgoing key's copy for another boot chain goes first: a crash in between
        // leaves signing.sealed (outgoing) and signing.sealed.next, which the next start
        // finishes like any interrupted rotation.
        remove(&dir.join(ALT_FILE))?;
        let path = dir.join(SEALED_KEY_FILE);
        std::fs::rename(dir.join(NEXT_FILE), &path)
            .and_then(|()| std::fs::File::open(dir)?.sync_all())
            .map_err(|source| KeyError::Io { path, source })?;
        if let Ok(mut a) = self.active.lock() {
            *a = Some(SEALED_KEY_FILE);
        }
        Ok(())
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        let pcrs: Vec<String> = self.pcrs.iter().map(ToString::to_string).collect();
        let mut out = vec![("tcti", self.tcti.clone()), ("pcrs", pcrs.join(","))];
        if let Some(a) = self.active() {
            out.push(("sealed_file", a.to_string()));
        }
        out
    }
}
