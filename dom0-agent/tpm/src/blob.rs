//! The sealed-key file: a TPM sealed-data object holding the ledger's Ed25519 seed, with the
//! PCR values it is sealed to. Written with mode 0600 through a temporary file, fsync and
//! rename. Nothing in it is secret without the TPM that sealed it (the private part is
//! encrypted by that TPM's storage primary key), but it is kept private all the same.
//!
//! A blob is sealed to one boot state (version 1: `TPM2_PolicyPCR` over its values) or to
//! 2..=[`MAX_STATES`] boot states of the same PCRs (version 2: `TPM2_PolicyOR` over one
//! `TPM2_PolicyPCR` branch per state, in the order stored), e.g. every boot an A/B update
//! can lead to (docs/decisions/0006-reseal-for-every-boot-of-a-switch.md).
//!
//! ```text
//! offset  size   field
//! 0       8      magic b"MFSEALED"
//! 8       1      version: 1 (one state) or 2 (several)
//! 9       32     Ed25519 public key of the sealed seed
//! 41      2      PCR bank, big-endian TPM_ALG_ID (0x000b, SHA-256)
//! 43      1      n, number of PCRs (1..=24)
//! 44      33*n   n times: u8 PCR index (ascending, distinct, <= 23) || 32-byte value of the
//!                first state
//! version 2 only:
//! ..      1      m, further states (1..=7)
//! ..      32*n*m m times: the n values of one more state, in the PCR order above
//! both:
//! ..      2      u16 big-endian length p (1..=1024) of the TPMT_PUBLIC that follows
//! ..      p      TPMT_PUBLIC of the sealed object (TPM marshalling)
//! ..      2      u16 big-endian length q (1..=1024) of the TPM2B_PRIVATE buffer that follows
//! ..      q      TPM2B_PRIVATE contents (encrypted by the TPM)
//! ..      32     SHA-256 of every byte before it (detects a torn or damaged file)
//! ```
//!
//! Nothing follows the trailing digest; a file longer than [`MAX_BLOB`] is refused before it
//! is read.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{check_selection, PcrValue};

/// Magic at the start of a sealed-key file.
pub const MAGIC: &[u8; 8] = b"MFSEALED";
/// Format version of a blob sealed to one boot state.
pub const VERSION: u8 = 1;
/// Format version of a blob sealed to several boot states (`TPM2_PolicyOR`).
pub const VERSION_STATES: u8 = 2;
/// Most boot states one blob is sealed to (a `TPM2_PolicyOR` takes at most 8 branches).
pub const MAX_STATES: usize = 8;
/// `TPM_ALG_SHA256`.
pub const ALG_SHA256: u16 = 0x000b;
/// Largest TPMT_PUBLIC or TPM2B_PRIVATE part accepted.
pub const MAX_PART: usize = 1024;
/// Largest file accepted (24 PCRs in 8 states and both parts at their bound fit).
pub const MAX_BLOB: u64 = 16 * 1024;

/// A sealed seed as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBlob {
    /// Public key of the sealed seed (so a blob can be matched to the ledger's key without
    /// unsealing it).
    pub public_key: [u8; 32],
    /// PCR index and the value sealed to, ascending: the first (or only) boot state.
    pub pcrs: Vec<(u8, PcrValue)>,
    /// Further boot states the seed is released in: the values of the same PCRs, in the
    /// same order (empty for a blob of one state).
    pub more: Vec<Vec<PcrValue>>,
    /// TPMT_PUBLIC of the sealed object.
    pub tpm_public: Vec<u8>,
    /// TPM2B_PRIVATE contents of the sealed object.
    pub tpm_private: Vec<u8>,
}

impl std::fmt::Debug for SealedBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedBlob")
            .field("public_key", &crate::hex(&self.public_key))
            .field("pcrs", &self.pcrs.iter().map(|p| p.0).collect::<Vec<_>>())
            .field("states", &self.states().len())
            .finish_non_exhaustive()
    }
}

/// Why a sealed-key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No such file.
    #[error("sealed key {path} is missing")]
    Missing {
        /// Path.
        path: PathBuf,
    },
    /// Reading or writing failed.
    #[error("sealed key {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The bytes are not a sealed-key file of this version.
    #[error("sealed key {path} is malformed: {reason}")]
    Malformed {
        /// Path (empty when decoding bytes).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

impl SealedBlob {
    /// Every boot state the seed is released in, each as PCR index and value (ascending).
    pub fn states(&self) -> Vec<Vec<(u8, PcrValue)>> {
        let mut out = vec![self.pcrs.clone()];
        for values in &self.more {
            out.push(
                self.pcrs
                    .iter()
                    .map(|p| p.0)
                    .zip(values.iter().copied())
                    .collect(),
            );
        }
        out
    }

    /// The canonical encoding (module docs): version 1 without further states, else 2.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            128 + 32 * self.pcrs.len() * self.more.len()
                + self.tpm_public.len()
                + self.tpm_private.len(),
        );
        out.extend_from_slice(MAGIC);
        out.push(if self.more.is_empty() {
            VERSION
        } else {
            VERSION_STATES
        });
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&ALG_SHA256.to_be_bytes());
        out.push(u8::try_from(self.pcrs.len()).unwrap_or(u8::MAX));
        for (pcr, value) in &self.pcrs {
            out.push(*pcr);
            out.extend_from_slice(value);
        }
        if !self.more.is_empty() {
            out.push(u8::try_from(self.more.len()).unwrap_or(u8::MAX));
            for values in &self.more {
                for value in values {
                    out.extend_from_slice(value);
                }
            }
        }
        for part in [&self.tpm_public, &self.tpm_private] {
            out.extend_from_slice(&u16::try_from(part.len()).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(part);
        }
        let digest = sha256(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Decodes and checks a sealed-key file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader(bytes);
        let body_len = bytes
            .len()
            .checked_sub(32)
            .ok_or_else(|| "shorter than its digest".to_string())?;
        let (body, digest) = bytes.split_at(body_len);
        if sha256(body) != digest {
            return Err("its digest does not match (damaged or truncated)".into());
        }
        if r.take(8)? != MAGIC {
            return Err("not a sealed-key file (bad magic)".into());
        }
        let version = r.u8()?;
        if version != VERSION && version != VERSION_STATES {
            return Err(format!(
                "version {version} is not supported (expected {VERSION} or {VERSION_STATES})"
            ));
        }
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(r.take(32)?);
        let bank = r.u16()?;
        if bank != ALG_SHA256 {
            return Err(format!("PCR bank 0x{bank:04x} is not SHA-256"));
        }
        let n = r.u8()?;
        let mut pcrs = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let pcr = r.u8()?;
            let mut value = [0u8; 32];
            value.copy_from_slice(r.take(32)?);
            pcrs.push((pcr, value));
        }
        let indices: Vec<u8> = pcrs.iter().map(|p| p.0).collect();
        match check_selection(&indices) {
            Ok(sorted) if sorted == indices => {}
            Ok(_) => return Err("PCRs not in ascending order".into()),
            Err(e) => return Err(e.to_string()),
        }
        let mut more = Vec::new();
        if version == VERSION_STATES {
            let m = usize::from(r.u8()?);
            if m == 0 || m >= MAX_STATES {
                return Err(format!("{m} further states outside 1..={}", MAX_STATES - 1));
            }
            for _ in 0..m {
                let mut values = Vec::with_capacity(pcrs.len());
                for _ in 0..pcrs.len() {
                    let mut value = [0u8; 32];
                    value.copy_from_slice(r.take(32)?);
                    values.push(value);
                }
                more.push(values);
            }
        }
        let mut part = |what: &str| -> Result<Vec<u8>, String> {
            let len = usize::from(r.u16()?);
            if len == 0 || len > MAX_PART {
                return Err(format!("{what} length {len} outside 1..={MAX_PART}"));
            }
            Ok(r.take(len)?.to_vec())
        };
        let tpm_public = part("TPMT_PUBLIC")?;
        let tpm_private = part("TPM2B_PRIVATE")?;
        if r.0.len() != 32 {
            return Err(format!(
                "{} unexpected bytes before the digest",
                r.0.len() - 32
            ));
        }
        Ok(Self {
            public_key,
            pcrs,
            more,
            tpm_public,
            tpm_private,
        })
    }

    /// Reads `path` (at most [`MAX_BLOB`] bytes).
    pub fn read(path: &Path) -> Result<Self, BlobError> {
        let io = |source| BlobError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::Missing {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_BLOB {
            return Err(BlobError::Malformed {
                path: path.to_path_buf(),
                reason: format!("{} bytes is more than {MAX_BLOB}", meta.len()),
            });
        }
        let bytes = fs::read(path).map_err(io)?;
        Self::decode(&bytes).map_err(|reason| BlobError::Malformed {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Writes `path` (mode 0600) through `<path>.tmp`, fsync, rename and a directory fsync,
    /// replacing any file there.
    pub fn write(&self, path: &Path) -> Result<(), BlobError> {
        let tmp = path.with_extension("tmp");
        mayfly_durable::write_private_file(path, &tmp, &self.encode(), true, |path, source| {
            BlobError::Io { path, source }
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([
            b.first().copied().unwrap_or(0),
            b.get(1).copied().unwrap_or(0),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> SealedBlob {
        SealedBlob {
            public_key: [0x11; 32],
            pcrs: vec![(7, [0x07; 32]), (8, [0x08; 32]), (9, [0x09; 32])],
            more: Vec::new(),
            tpm_public: vec![0xaa; 4],
            tpm_private: vec![0xbb; 3],
        }
    }

    /// Sealed to three states: the sample's, then PCR 8 and 9 of two more boots.
    fn sample_states() -> SealedBlob {
        SealedBlob {
            more: vec![
                vec![[0x07; 32], [0x18; 32], [0x19; 32]],
                vec![[0x07; 32], [0x28; 32], [0x29; 32]],
            ],
            ..sample()
        }
    }

    #[test]
    fn states_round_trip_and_vector() {
        let b = sample_states();
        let bytes = b.encode();
        assert_eq!(bytes.get(8), Some(&VERSION_STATES));
        assert_eq!(SealedBlob::decode(&bytes).unwrap(), b);
        let states = b.states();
        assert_eq!(states.len(), 3);
        assert_eq!(
            states[2],
            vec![(7, [0x07; 32]), (8, [0x28; 32]), (9, [0x29; 32])]
        );
        let vector = include_str!("../../../docs/vectors/sealed-key-2.hex");
        assert_eq!(crate::hex(&bytes), vector.trim());
        // One state is still written as version 1, byte for byte.
        assert_eq!(sample().encode().get(8), Some(&VERSION));
        assert_eq!(sample().states(), vec![sample().pcrs]);
    }

    /// Every single flipped bit and every truncation of `bytes` is refused.
    fn every_change_refused(bytes: &[u8]) {
        for i in 0..bytes.len() {
            let mut t = bytes.to_vec();
            if let Some(b) = t.get_mut(i) {
                *b ^= 0x01;
            }
            assert!(
                SealedBlob::decode(&t).is_err(),
                "byte {i} flipped was accepted"
            );
        }
        for len in 0..bytes.len() {
            assert!(SealedBlob::decode(bytes.get(..len).unwrap()).is_err());
        }
    }

    #[test]
    fn states_count_bounded_and_every_byte_checked() {
        every_change_refused(&sample_states().encode());
        let mut b = sample();
        b.more = vec![vec![[0; 32]; 3]; MAX_STATES];
        assert!(SealedBlob::decode(&b.encode())
            .unwrap_err()
            .contains("further states"));
        b.more = vec![vec![[0; 32]; 3]; MAX_STATES - 1];
        assert_eq!(
            SealedBlob::decode(&b.encode()).unwrap().states().len(),
            MAX_STATES
        );
    }

    #[test]
    fn round_trip_and_vector() {
        let b = sample();
        let bytes = b.encode();
        assert_eq!(SealedBlob::decode(&bytes).unwrap(), b);
        let vector = include_str!("../../../docs/vectors/sealed-key-1.hex");
        assert_eq!(crate::hex(&bytes), vector.trim());
    }

    #[test]
    fn every_single_byte_change_is_refused() {
        every_change_refused(&sample().encode());
    }

    #[test]
    fn bad_selection_refused_even_with_a_good_digest() {
        let mut b = sample();
        b.pcrs = vec![(9, [0; 32]), (8, [0; 32])];
        assert!(SealedBlob::decode(&b.encode())
            .unwrap_err()
            .contains("ascending"));
        b.pcrs = vec![(24, [0; 32])];
        assert!(SealedBlob::decode(&b.encode()).is_err());
        b.pcrs = vec![];
        assert!(SealedBlob::decode(&b.encode()).is_err());
    }

    #[test]
    fn file_is_0600_and_oversize_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("signing.sealed");
        sample().write(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(SealedBlob::read(&p).unwrap(), sample());
        fs::write(&p, vec![0u8; 5000]).unwrap();
        assert!(matches!(
            SealedBlob::read(&p),
            Err(BlobError::Malformed { .. })
        ));
        assert!(matches!(
            SealedBlob::read(&dir.path().join("none")),
            Err(BlobError::Missing { .. })
        ));
    }
}
