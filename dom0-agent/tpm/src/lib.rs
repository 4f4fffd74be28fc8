//! Mayfly's use of a TPM 2.0: the ledger's Ed25519 signing seed sealed to PCR values, and
//! PCR quotes for attestation.
//!
//! * [`Tpm::seal`] creates a sealed-data object holding the 32-byte seed under the owner
//!   hierarchy's storage primary key (an ECC P-256 key re-derived from the TPM's owner seed at
//!   every use, so nothing is persisted inside the TPM). Its only authorisation is a
//!   `TPM2_PolicyPCR` over a PCR selection of the SHA-256 bank and their expected values: the
//!   TPM releases the seed only while those PCRs hold exactly those values. The object's
//!   public and private parts go to a [`SealedBlob`] file (docs/formats.md): the private part
//!   is encrypted by the TPM's primary key, so the file is useless to any other TPM.
//! * [`Tpm::unseal`] reads the PCRs first and, when they differ from the values the blob was
//!   sealed to, says which ([`TpmError::PcrMismatch`]); the TPM enforces the same policy
//!   itself, the early check only names the cause.
//! * [`Tpm::quote`] signs the selected PCRs with a restricted ECDSA P-256 attestation key,
//!   also a primary of the owner hierarchy (same template, same key, every boot); the caller
//!   supplies the qualifying data.
//!
//! No `unsafe` here: everything goes through `tss-esapi`'s safe API.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod blob;
#[cfg(feature = "esapi")]
mod device;
#[cfg(feature = "esapi")]
pub mod keystore;
pub mod pcrfile;
pub mod quote;
#[cfg(feature = "esapi")]
pub mod swtpm;

pub use blob::{BlobError, SealedBlob};
#[cfg(feature = "esapi")]
pub use device::{Tpm, TpmError};
pub use quote::{Quote, QuoteError};

/// A SHA-256 PCR value.
pub type PcrValue = [u8; 32];

/// The PCRs sealed to by default: 7 (Secure Boot state and keys), 8 (the GRUB commands and
/// kernel command lines), 9 (the files GRUB loaded: Xen, the dom0 kernel, the initramfs).
/// See docs/design.md, "The signing key sealed to the TPM".
pub const DEFAULT_PCRS: &[u8] = &[7, 8, 9];

/// Highest PCR index accepted (a PC client TPM has 24).
pub const MAX_PCR: u8 = 23;

/// A PCR selection that is not 1..=24 distinct indices in 0..=23.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCR selection {pcrs:?}: {reason}")]
pub struct SelectionError {
    /// The selection as given.
    pub pcrs: Vec<u8>,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a PCR selection: 1..=24 distinct indices in 0..=23. Returns it sorted (the order
/// the TPM digests PCRs in).
pub fn check_selection(pcrs: &[u8]) -> Result<Vec<u8>, SelectionError> {
    let bad = |reason| SelectionError {
        pcrs: pcrs.to_vec(),
        reason,
    };
    if pcrs.is_empty() {
        return Err(bad("no PCRs selected"));
    }
    let mut sorted = pcrs.to_vec();
    sorted.sort_unstable();
    if sorted.iter().any(|p| *p > MAX_PCR) {
        return Err(bad("a PCR index is above 23"));
    }
    if sorted.windows(2).any(|w| w.first() == w.get(1)) {
        return Err(bad("a PCR is named twice"));
    }
    Ok(sorted)
}

/// SHA-256 over the concatenated values, in the given (ascending) order: the `pcrDigest` of
/// `TPM2_PolicyPCR` and of a quote.
pub fn pcr_digest(values: &[(u8, PcrValue)]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (_, v) in values {
        ctx.update(v);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
