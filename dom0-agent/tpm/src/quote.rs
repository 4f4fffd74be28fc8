//! TPM quotes: what the agent returns, and the checks a verifier makes without a TPM.
//!
//! The signed bytes are the TPM's own `TPMS_ATTEST` (TPM 2.0 Part 2, 10.12.12), parsed here
//! by hand with a bound on every length:
//!
//! ```text
//! u32 magic 0xff544347 ("\xffTCG") | u16 type 0x8018 (TPM_ST_ATTEST_QUOTE)
//! u16 n | n bytes qualifiedSigner (the AK's name)
//! u16 n | n bytes extraData (Mayfly: SHA-256(head bytes || nonce), n = 32)
//! u64 clock | u32 resetCount | u32 restartCount | u8 safe | u64 firmwareVersion
//! TPMS_QUOTE_INFO: u32 count | count x (u16 hash alg | u8 sizeofSelect | bitmap) | u16 n | n bytes pcrDigest
//! ```
//!
//! The signature is ECDSA P-256 over SHA-256 of those bytes, by the attestation key; Mayfly
//! carries it as the 64-byte `r || s` (each left-padded to 32 bytes).

#[cfg(feature = "esapi")]
use tss_esapi::structures::{EccParameter, EccPoint, Signature};

use crate::{pcr_digest, PcrValue};

/// `TPM_GENERATED_VALUE`.
pub const TPM_GENERATED: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`.
pub const ST_ATTEST_QUOTE: u16 = 0x8018;
/// Largest `TPMS_ATTEST` accepted.
pub const MAX_ATTEST: usize = 1024;

/// A quote as the agent returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// The attestation key (uncompressed SEC1 P-256 point).
    pub public_key: [u8; 65],
    /// The signed `TPMS_ATTEST` bytes.
    pub attest: Vec<u8>,
    /// ECDSA signature `r || s`.
    pub signature: [u8; 64],
    /// The PCR values read just before the quote (informative: the quote's digest is what
    /// is signed; the verifier compares it with expected values, not with these).
    pub pcrs: Vec<(u8, PcrValue)>,
}

/// What a verified quote says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteInfo {
    /// The TPM's clock (ms).
    pub clock: u64,
    /// TPM resets (boots) seen by the TPM.
    pub reset_count: u32,
    /// The quoted PCR indices (SHA-256 bank), ascending.
    pub pcrs: Vec<u8>,
    /// SHA-256 over the quoted PCR values.
    pub pcr_digest: [u8; 32],
}

/// Why a quote was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuoteError {
    /// The signature does not verify under the pinned attestation key.
    #[error("the quote's signature does not verify under the pinned attestation key")]
    Signature,
    /// The signed bytes are not a TPM quote.
    #[error("the quote is malformed: {0}")]
    Malformed(String),
    /// The quote was not made for this request (nonce or head differ).
    #[error("the quote's qualifying data is {found}, expected {expected} (a different nonce or signed head, or a replayed quote)")]
    Nonce {
        /// What the quote carries.
        found: String,
        /// SHA-256(head || nonce) computed by the verifier.
        expected: String,
    },
    /// The quoted PCRs are not the ones expected.
    #[error("the quoted PCR selection {found:?} is not the expected {expected:?}")]
    Selection {
        /// Quoted.
        found: Vec<u8>,
        /// Expected.
        expected: Vec<u8>,
    },
    /// The PCR values differ from the expected ones.
    #[error("the quoted PCR digest {found} differs from the expected PCR values' digest {expected}: the machine did not boot the expected image")]
    Pcrs {
        /// Quoted.
        found: String,
        /// Expected.
        expected: String,
    },
}

#[cfg(feature = "esapi")]
fn param32(p: &EccParameter) -> Option<[u8; 32]> {
    let v = p.value();
    if v.len() > 32 {
        return None;
    }
    let mut out = [0u8; 32];
    out.get_mut(32 - v.len()..)?.copy_from_slice(v);
    Some(out)
}

/// The uncompressed SEC1 encoding of a P-256 point.
#[cfg(feature = "esapi")]
pub(crate) fn uncompressed_point(p: &EccPoint) -> Option<[u8; 65]> {
    let mut out = [0u8; 65];
    out[0] = 0x04;
    out.get_mut(1..33)?.copy_from_slice(&param32(p.x())?);
    out.get_mut(33..65)?.copy_from_slice(&param32(p.y())?);
    Some(out)
}

/// `r || s` of an ECDSA signature.
#[cfg(feature = "esapi")]
pub(crate) fn fixed_signature(sig: &Signature) -> Option<[u8; 64]> {
    match sig {
        Signature::EcDsa(s) => {
            let mut out = [0u8; 64];
            out.get_mut(..32)?
                .copy_from_slice(&param32(s.signature_r())?);
            out.get_mut(32..)?
                .copy_from_slice(&param32(s.signature_s())?);
            Some(out)
        }
        _ => None,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], QuoteError> {
        if self.0.len() < n {
            return Err(QuoteError::Malformed("truncated".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn be<const N: usize>(&mut self) -> Result<[u8; N], QuoteError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn sized(&mut self, max: usize, what: &str) -> Result<&'a [u8], QuoteError> {
        let n = usize::from(u16::from_be_bytes(self.be()?));
        if n > max {
            return Err(QuoteError::Malformed(format!("{what} of {n} bytes")));
        }
        self.take(n)
    }
}

/// Parses a `TPMS_ATTEST` of type quote (no signature check).
pub fn parse_attest(attest: &[u8]) -> Result<(Vec<u8>, QuoteInfo), QuoteError> {
    if attest.len() > MAX_ATTEST {
        return Err(QuoteError::Malformed(format!("{} bytes", attest.len())));
    }
    let mut r = Reader(attest);
    if u32::from_be_bytes(r.be()?) != TPM_GENERATED {
        return Err(QuoteError::Malformed(
            "not generated by a TPM (magic)".into(),
        ));
    }
    if u16::from_be_bytes(r.be()?) != ST_ATTEST_QUOTE {
        return Err(QuoteError::Malformed("not a quote (type)".into()));
    }
    r.sized(68, "qualifiedSigner")?;
    let extra = r.sized(64, "extraData")?.to_vec();
    let clock = u64::from_be_bytes(r.be()?);
    let reset_count = u32::from_be_bytes(r.be()?);
    let _restart: [u8; 4] = r.be()?;
    let _safe: [u8; 1] = r.be()?;
    let _firmware: [u8; 8] = r.be()?;
    let count = u32::from_be_bytes(r.be()?);
    if count != 1 {
        return Err(QuoteError::Malformed(format!(
            "{count} PCR banks quoted (expected the SHA-256 bank alone)"
        )));
    }
    let alg = u16::from_be_bytes(r.be()?);
    if alg != crate::blob::ALG_SHA256 {
        return Err(QuoteError::Malformed(format!(
            "PCR bank 0x{alg:04x} quoted"
        )));
    }
    let [size] = r.be::<1>()?;
    if size > 4 {
        return Err(QuoteError::Malformed(format!("sizeofSelect {size}")));
    }
    let bitmap = r.take(usize::from(size))?;
    let mut pcrs = Vec::new();
    for (byte, bits) in (0u8..).zip(bitmap) {
        for bit in 0..8u8 {
            if bits & (1 << bit) != 0 {
                pcrs.push(byte.saturating_mul(8).saturating_add(bit));
            }
        }
    }
    let digest = r.sized(64, "pcrDigest")?;
    let pcr_digest: [u8; 32] = digest
        .try_into()
        .map_err(|_| QuoteError::Malformed(format!("pcrDigest of {} bytes", digest.len())))?;
    if !r.0.is_empty() {
        return Err(QuoteError::Malformed(format!(
            "{} trailing bytes",
            r.0.len()
        )));
    }
    Ok((
        extra,
        QuoteInfo {
            clock,
            reset_count,
            pcrs,
            pcr_digest,
        },
    ))
}

/// The ECDSA P-256 / SHA-256 signature `signature` (`r || s`) of `attest` under `ak`.
pub fn check_signature(
    ak: &[u8; 65],
    attest: &[u8],
    signature: &[u8; 64],
) -> Result<(), QuoteError> {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, ak)
        .verify(attest, signature)
        .map_err(|_| QuoteError::Signature)
}

/// Checks a quote: the signature under the pinned key `ak`, the qualifying data against
/// `qualifying`, and the quoted PCRs against `expected` (ascending PCR index and value).
/// The signature is checked first: nothing in unsigned bytes is trusted.
pub fn verify_quote(
    ak: &[u8; 65],
    attest: &[u8],
    signature: &[u8; 64],
    qualifying: &[u8; 32],
    expected: &[(u8, PcrValue)],
) -> Result<QuoteInfo, QuoteError> {
    check_signature(ak, attest, signature)?;
    let (extra, info) = parse_attest(attest)?;
    if extra != qualifying {
        return Err(QuoteError::Nonce {
            found: crate::hex(&extra),
            expected: crate::hex(qualifying),
        });
    }
    let want: Vec<u8> = expected.iter().map(|p| p.0).collect();
    if info.pcrs != want {
        return Err(QuoteError::Selection {
            found: info.pcrs,
            expected: want,
        });
    }
    let want_digest = pcr_digest(expected);
    if info.pcr_digest != want_digest {
        return Err(QuoteError::Pcrs {
            found: crate::hex(&info.pcr_digest),
            expected: crate::hex(&want_digest),
        });
    }
    Ok(info)
}

/// The qualifying data of a Mayfly quote: SHA-256(signed head bytes || operator nonce).
pub fn qualifying_data(head: &[u8], nonce: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(head);
    ctx.update(nonce);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
