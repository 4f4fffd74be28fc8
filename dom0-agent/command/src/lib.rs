//! Mayfly's signed admin commands, shared by the operator CLI (`mayfly admin`) and the
//! agent's console server (`mayfly-console`).
//!
//! * [`envelope`] — the canonical body and envelope, byte by byte; co-signatures.
//! * [`authorize`] — the rules: authorized keys, validity window and clock skew, quorum.
//! * [`frame`] — length-prefixed frames on the console socket.
//! * [`keyfile`] — admin key files (`keygen`).
//!
//! The formats are also specified in `docs/formats.md` §3, with vectors in `docs/vectors/`
//! checked by `tests/vectors.rs`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod authorize;
pub mod envelope;
pub mod frame;
pub mod keyfile;

pub use authorize::{Authorizer, Rejection};
pub use envelope::{Body, DecodeError, Envelope, PublicKey, Signature};

/// The argument every console command must carry: the appliance it is meant for, as the
/// 64 hex digits of that appliance's ledger identity key. It is signed like every
/// argument, so a command signed for one appliance is refused by any other (which would
/// otherwise accept it if the same admin keys are authorized there and its nonce has not
/// been seen there). See `docs/formats.md` §3.
pub const APPLIANCE_ARG: &str = "appliance";

/// Lower-case hex of bytes; strict decoding (the workspace's one hex codec, `mayfly-hex`).
pub use mayfly_hex::{decode as unhex, encode as hex};

/// Unix time now in ns.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A fresh random nonce.
pub fn random_nonce() -> Result<[u8; 16], ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut n = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut n)?;
    Ok(n)
}
