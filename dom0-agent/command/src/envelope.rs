//! The signed command envelope: a canonical **body** (what is signed) and up to
//! [`MAX_SIGNATURES`] Ed25519 signatures over it by distinct admin keys.
//!
//! All integers big-endian. Every value has exactly one encoding: the decoder rejects
//! anything the encoder would not produce (unknown magic, version or kind, lengths over
//! their caps, characters outside the allowed sets, unsorted or duplicate argument names
//! or signers, trailing bytes).
//!
//! Body (the bytes every co-signer signs, as they are):
//!
//! ```text
//! offset size   field
//!      0    4   magic "MFAC"
//!      4    1   version = 1
//!      5    1   kind = 0x01 (command)
//!      6   16   nonce        random, chosen by whoever prepares the command
//!     22    8   issued_ns    u64, Unix time in ns
//!     30    8   expires_ns   u64, Unix time in ns, > issued_ns
//!     38  1+n   command      u8 length 1..=32, bytes of [a-z0-9._-]
//!      ·    1   arg count    0..=64, then per argument, strictly increasing by name:
//!           1+n   name       u8 length 1..=64, bytes of [a-z0-9._-]
//!           4+n   value      u32 length, UTF-8
//! ```
//! A whole body is at most [`MAX_BODY`] bytes.
//!
//! Envelope (what travels and what `prepare`/`cosign` write to a file):
//!
//! ```text
//! offset size   field
//!      0    4   magic "MFAE"
//!      4    1   version = 1
//!      5    4   body length  u32, 1..=MAX_BODY
//!      9    n   body
//!      ·    1   signature count 0..=8, then per signature, strictly increasing by key:
//!           32    key        the signer's Ed25519 public key (its key id)
//!           64    signature  Ed25519 by that key over the body bytes
//! ```
//!
//! The key id *is* the public key: nothing to look up, nothing to collide. A co-signer
//! adds a signature without touching the body, so every signer has signed exactly the same
//! command, arguments, nonce and validity window.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;

use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};

/// An Ed25519 public key, which is also the admin's key id.
pub type PublicKey = [u8; 32];

/// Magic of a body.
pub const BODY_MAGIC: &[u8; 4] = b"MFAC";
/// Magic of an envelope.
pub const ENVELOPE_MAGIC: &[u8; 4] = b"MFAE";
/// Format version.
pub const VERSION: u8 = 1;
/// Kind byte of a command body.
pub const KIND_COMMAND: u8 = 0x01;
/// Largest body.
pub const MAX_BODY: usize = 1 << 20;
/// Most signatures on one envelope.
pub const MAX_SIGNATURES: usize = 8;
/// Most arguments.
pub const MAX_ARGS: usize = 64;
/// Longest command name.
pub const MAX_COMMAND: usize = 32;
/// Longest argument name.
pub const MAX_ARG_NAME: usize = 64;
/// Largest envelope: header, the largest body, the most signatures.
pub const MAX_ENVELOPE: usize = 9 + MAX_BODY + 1 + MAX_SIGNATURES * 96;

/// Why bytes are not a canonical envelope or body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Input ended inside a field.
    #[error("truncated: {field} at offset {at} needs {need} more bytes")]
    Truncated {
        /// Field being read.
        field: &'static str,
        /// Offset.
        at: usize,
        /// Missing bytes.
        need: usize,
    },
    /// Wrong magic.
    #[error("not a Mayfly admin {what} (bad magic)")]
    BadMagic {
        /// "envelope" or "body".
        what: &'static str,
    },
    /// Unknown version.
    #[error("unsupported {what} version {found}")]
    Version {
        /// "envelope" or "body".
        what: &'static str,
        /// Found.
        found: u8,
    },
    /// Unknown kind.
    #[error("unknown body kind {0:#04x}")]
    Kind(u8),
    /// A length or count above its cap or below its minimum.
    #[error("{field}: {value} is outside {min}..={max}")]
    OutOfRange {
        /// Field.
        field: &'static str,
        /// Value found.
        value: u64,
        /// Minimum.
        min: u64,
        /// Maximum.
        max: u64,
    },
    /// A name with a byte outside `[a-z0-9._-]`.
    #[error("{field} contains a byte outside [a-z0-9._-]")]
    BadName {
        /// Field.
        field: &'static str,
    },
    /// An argument value that is not UTF-8.
    #[error("argument {name} is not UTF-8")]
    NotUtf8 {
        /// Argument name.
        name: String,
    },
    /// Argument names or signers not strictly increasing.
    #[error("{field} not strictly increasing (unsorted or duplicate)")]
    Order {
        /// Field.
        field: &'static str,
    },
    /// `expires_ns <= issued_ns`.
    #[error("expiry is not after issue time")]
    EmptyWindow,
    /// Bytes after the last field.
    #[error("{count} bytes after the end of the {what}")]
    Trailing {
        /// "envelope" or "body".
        what: &'static str,
        /// Extra bytes.
        count: usize,
    },
}

/// What a command asks for: the signed part of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// Random, unique per command; the agent refuses a nonce it has seen.
    pub nonce: [u8; 16],
    /// When it was issued (Unix ns).
    pub issued_ns: u64,
    /// After when it is void (Unix ns).
    pub expires_ns: u64,
    /// Command name, e.g. `rollback`.
    pub command: String,
    /// Arguments by name.
    pub args: BTreeMap<String, String>,
}

/// One signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Signer's public key (key id).
    pub key: PublicKey,
    /// Ed25519 signature over the body bytes.
    pub signature: [u8; 64],
}

/// A body with its signatures, as sent and as kept between `prepare` and `submit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The canonical body bytes (what was signed).
    body_bytes: Vec<u8>,
    /// The decoded body.
    body: Body,
    /// Signatures, strictly increasing by key.
    signatures: Vec<Signature>,
}

/// Whether `s` is a valid command or argument name of at most `max` bytes: the workspace's
/// name rule, `[a-z0-9_.-]` (`mayfly-names`).
pub use mayfly_names::is_name as valid_name;

/// Why a body cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// See [`DecodeError`]: the encoder refuses what the decoder would.
    #[error(transparent)]
    Invalid(#[from] DecodeError),
}

impl Body {
    /// The canonical encoding. Refuses what the decoder would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, BuildError> {
        if !valid_name(&self.command, MAX_COMMAND) {
            return Err(DecodeError::BadName { field: "command" }.into());
        }
        if self.expires_ns <= self.issued_ns {
            return Err(DecodeError::EmptyWindow.into());
        }
        if self.args.len() > MAX_ARGS {
            return Err(out_of_range("arg count", self.args.len(), 0, MAX_ARGS).into());
        }
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(BODY_MAGIC);
        out.push(VERSION);
        out.push(KIND_COMMAND);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.issued_ns.to_be_bytes());
        out.extend_from_slice(&self.expires_ns.to_be_bytes());
        push_u8_str(&mut out, &self.command);
        out.push(u8::try_from(self.args.len()).unwrap_or(u8::MAX));
        for (name, value) in &self.args {
            if !valid_name(name, MAX_ARG_NAME) {
                return Err(DecodeError::BadName {
                    field: "argument name",
                }
                .into());
            }
            push_u8_str(&mut out, name);
            let len = u32::try_from(value.len())
                .map_err(|_| out_of_range("argument value", value.len(), 0, MAX_BODY))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(value.as_bytes());
            if out.len() > MAX_BODY {
                return Err(out_of_range("body length", out.len(), 1, MAX_BODY).into());
            }
        }
        Ok(out)
    }

    /// Decodes canonical body bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_BODY {
            return Err(out_of_range("body length", bytes.len(), 1, MAX_BODY));
        }
        let mut r = Cursor::new(bytes);
        if r.take(4, "magic")? != BODY_MAGIC {
            return Err(DecodeError::BadMagic { what: "body" });
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(DecodeError::Version {
                what: "body",
                found: version,
            });
        }
        let kind = r.u8("kind")?;
        if kind != KIND_COMMAND {
            return Err(DecodeError::Kind(kind));
        }
        let nonce = r.array::<16>("nonce")?;
        let issued_ns = r.u64("issued_ns")?;
        let expires_ns = r.u64("expires_ns")?;
        if expires_ns <= issued_ns {
            return Err(DecodeError::EmptyWindow);
        }
        let command = r.name(MAX_COMMAND, "command")?;
        let count = usize::from(r.u8("arg count")?);
        if count > MAX_ARGS {
            return Err(out_of_range("arg count", count, 0, MAX_ARGS));
        }
        let mut args = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..count {
            let name = r.name(MAX_ARG_NAME, "argument name")?;
            if last
                .as_deref()
                .is_some_and(|l| l.as_bytes() >= name.as_bytes())
            {
                return Err(DecodeError::Order {
                    field: "argument names",
                });
            }
            let len = r.u32("argument length")?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > MAX_BODY {
                return Err(out_of_range("argument length", len, 0, MAX_BODY));
            }
            let raw = r.take(len, "argument value")?;
            let value = std::str::from_utf8(raw)
                .map_err(|_| DecodeError::NotUtf8 { name: name.clone() })?
                .to_owned();
            last = Some(name.clone());
            args.insert(name, value);
        }
        r.finish("body")?;
        Ok(Self {
            nonce,
            issued_ns,
            expires_ns,
            command,
            args,
        })
    }
}

impl Envelope {
    /// An unsigned envelope around `body` (to be signed by one or more keys).
    pub fn new(body: Body) -> Result<Self, BuildError> {
        let body_bytes = body.encode()?;
        Ok(Self {
            body_bytes,
            body,
            signatures: Vec::new(),
        })
    }

    /// The decoded body.
    pub fn body(&self) -> &Body {
        &self.body
    }

    /// The exact bytes that were signed.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body_bytes
    }

    /// SHA-256 of the body bytes (recorded with the nonce, shown to co-signers).
    pub fn body_hash(&self) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.body_bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// Signatures, in key order.
    pub fn signatures(&self) -> &[Signature] {
        &self.signatures
    }

    /// Adds (or replaces) `key`'s signature. Refuses a ninth signer.
    pub fn sign(&mut self, key: &Ed25519KeyPair) -> Result<(), DecodeError> {
        use ring::signature::KeyPair;
        let mut public = [0u8; 32];
        public.copy_from_slice(key.public_key().as_ref());
        let mut signature = [0u8; 64];
        signature.copy_from_slice(key.sign(&self.body_bytes).as_ref());
        self.add_signature(Signature {
            key: public,
            signature,
        })
    }

    /// Adds (or replaces) a signature made elsewhere; it is not checked here (the agent
    /// checks every signature).
    pub fn add_signature(&mut self, sig: Signature) -> Result<(), DecodeError> {
        match self.signatures.binary_search_by(|s| s.key.cmp(&sig.key)) {
            Ok(i) => {
                if let Some(slot) = self.signatures.get_mut(i) {
                    *slot = sig;
                }
            }
            Err(i) => {
                if self.signatures.len() >= MAX_SIGNATURES {
                    return Err(out_of_range(
                        "signature count",
                        self.signatures.len().saturating_add(1),
                        0,
                        MAX_SIGNATURES,
                    ));
                }
                self.signatures.insert(i, sig);
            }
        }
        Ok(())
    }

    /// Whether `sig` is a valid signature of this body.
    pub fn signature_valid(&self, sig: &Signature) -> bool {
        verify_signature(&sig.key, &self.body_bytes, &sig.signature)
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.body_bytes
                .len()
                .saturating_add(10)
                .saturating_add(self.signatures.len().saturating_mul(96)),
        );
        out.extend_from_slice(ENVELOPE_MAGIC);
        out.push(VERSION);
        // The body was built under MAX_BODY, which fits a u32.
        out.extend_from_slice(
            &u32::try_from(self.body_bytes.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&self.body_bytes);
        out.push(u8::try_from(self.signatures.len()).unwrap_or(u8::MAX));
        for s in &self.signatures {
            out.extend_from_slice(&s.key);
            out.extend_from_slice(&s.signature);
        }
        out
    }

    /// Decodes an envelope (signatures are not verified here: see `authorize`).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_ENVELOPE {
            return Err(out_of_range(
                "envelope length",
                bytes.len(),
                0,
                MAX_ENVELOPE,
            ));
        }
        let mut r = Cursor::new(bytes);
        if r.take(4, "magic")? != ENVELOPE_MAGIC {
            return Err(DecodeError::BadMagic { what: "envelope" });
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(DecodeError::Version {
                what: "envelope",
                found: version,
            });
        }
        let len = usize::try_from(r.u32("body length")?).unwrap_or(usize::MAX);
        if len == 0 || len > MAX_BODY {
            return Err(out_of_range("body length", len, 1, MAX_BODY));
        }
        let body_bytes = r.take(len, "body")?.to_vec();
        let body = Body::decode(&body_bytes)?;
        let count = usize::from(r.u8("signature count")?);
        if count > MAX_SIGNATURES {
            return Err(out_of_range("signature count", count, 0, MAX_SIGNATURES));
        }
        let mut signatures: Vec<Signature> = Vec::with_capacity(count);
        for _ in 0..count {
            let key = r.array::<32>("signer key")?;
            let signature = r.array::<64>("signature")?;
            if signatures.last().is_some_and(|l| l.key >= key) {
                return Err(DecodeError::Order { field: "signers" });
            }
            signatures.push(Signature { key, signature });
        }
        r.finish("envelope")?;
        Ok(Self {
            body_bytes,
            body,
            signatures,
        })
    }
}

/// Whether `sig` is `key`'s Ed25519 signature of `msg`.
pub fn verify_signature(key: &PublicKey, msg: &[u8], sig: &[u8; 64]) -> bool {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(msg, sig)
        .is_ok()
}

fn out_of_range(field: &'static str, value: usize, min: usize, max: usize) -> DecodeError {
    DecodeError::OutOfRange {
        field,
        value: value as u64,
        min: min as u64,
        max: max as u64,
    }
}

fn push_u8_str(out: &mut Vec<u8>, s: &str) {
    // Callers checked the length against a cap below 256.
    out.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(s.as_bytes());
}

/// A bounds-checked reader over untrusted bytes.
struct Cursor<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(input: &'a [u8]) -> Self {
        Self { input, pos: 0 }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = self.input.get(self.pos..).unwrap_or(&[]);
        let bytes = rest.get(..n).ok_or(DecodeError::Truncated {
            field,
            at: self.pos,
            need: n.saturating_sub(rest.len()),
        })?;
        self.pos = self.pos.saturating_add(n);
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn name(&mut self, max: usize, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u8(field)?);
        if len == 0 || len > max {
            return Err(out_of_range(field, len, 1, max));
        }
        let raw = self.take(len, field)?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::BadName { field })?;
        if !valid_name(s, max) {
            return Err(DecodeError::BadName { field });
        }
        Ok(s.to_owned())
    }

    fn finish(self, what: &'static str) -> Result<(), DecodeError> {
        let count = self.input.len().saturating_sub(self.pos);
        if count == 0 {
            Ok(())
        } else {
            Err(DecodeError::Trailing { what, count })
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    pub(crate) fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn body() -> Body {
        Body {
            nonce: [7; 16],
            issued_ns: 1_700_000_000_000_000_000,
            expires_ns: 1_700_000_300_000_000_000,
            command: "rollback".into(),
            args: [
                ("seq".to_string(), "3".to_string()),
                ("cascade".into(), "true".into()),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let mut env = Envelope::new(body()).unwrap();
        env.sign(&key(1)).unwrap();
        env.sign(&key(2)).unwrap();
        let bytes = env.encode();
        let back = Envelope::decode(&bytes).unwrap();
        assert_eq!(back, env);
        assert!(back.signatures().iter().all(|s| back.signature_valid(s)));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            let still_valid = Envelope::decode(&bad)
                .map(|e| {
                    e.signatures().len() == 2 && e.signatures().iter().all(|s| e.signature_valid(s))
                })
                .unwrap_or(false);
            assert!(!still_valid, "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn non_canonical_input_is_refused() {
        let env = Envelope::new(body()).unwrap();
        let mut bytes = env.encode();
        bytes.push(0);
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(DecodeError::Trailing { .. })
        ));
        // Arguments out of order: swap the two names by hand.
        let mut b = body();
        b.args.clear();
        b.args.insert("a".into(), "1".into());
        b.args.insert("b".into(), "2".into());
        let enc = b.encode().unwrap();
        let s = crate::hex(&enc);
        let swapped = s.replacen(
            "0161000000013101620000000132",
            "0162000000013201610000000131",
            1,
        );
        assert_ne!(s, swapped);
        assert!(matches!(
            Body::decode(&crate::unhex(&swapped).unwrap()),
            Err(DecodeError::Order { .. })
        ));
        // Upper case command.
        let mut b = body();
        b.command = "Rollback".into();
        assert!(b.encode().is_err());
        // Expiry not after issue.
        let mut b = body();
        b.expires_ns = b.issued_ns;
        assert_eq!(
            b.encode(),
            Err(BuildError::Invalid(DecodeError::EmptyWindow))
        );
        // Duplicate signer: encode two signatures by the same key by hand.
        let mut e = Envelope::new(body()).unwrap();
        e.sign(&key(1)).unwrap();
        let one = e.encode();
        let sig = one[one.len() - 96..].to_vec();
        let mut two = one.clone();
        let count_at = two.len() - 97;
        two[count_at] = 2;
        two.extend_from_slice(&sig);
        assert!(matches!(
            Envelope::decode(&two),
            Err(DecodeError::Order { .. })
        ));
        // Nine signers.
        let mut e = Envelope::new(body()).unwrap();
        for k in 1..=8 {
            e.sign(&key(k)).unwrap();
        }
        assert!(e.sign(&key(9)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Envelope::decode(&bytes);
            let _ = Body::decode(&bytes);
        }

        #[test]
        fn mutated_envelopes_decode_to_their_own_encoding(
            flips in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 1..4)
        ) {
            let mut e = Envelope::new(body()).unwrap();
            e.sign(&key(3)).unwrap();
            let mut bytes = e.encode();
            for (at, v) in flips {
                let n = bytes.len();
                bytes[at % n] = v;
            }
            if let Ok(d) = Envelope::decode(&bytes) {
                proptest::prop_assert_eq!(d.encode(), bytes);
            }
        }
    }
}
