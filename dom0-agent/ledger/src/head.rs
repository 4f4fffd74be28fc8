//! Signed chain heads: one per group commit, covering both chains' tips at that commit.
//!
//! Stored under the group sequence in the `heads` database.
//!
//! ```text
//! offset size  field
//!      0    4  magic "MFHD"
//!      4    1  format version = 1
//!      5    1  kind: 0x01 group head (other values reserved)
//!      6    8  group       u64 BE, 1-based group-commit sequence
//!     14    8  ckpt_seq    u64 BE, last checkpoint in the chain at this commit (0: none)
//!     22   32  ckpt_hash   hash_ckpt_seq (zeros when ckpt_seq = 0)
//!     54    8  audit_seq   u64 BE, last audit record at this commit (0: none)
//!     62   32  audit_hash  hash_audit_seq (zeros when audit_seq = 0)
//!     94    8  time_ns     u64 BE, Unix time in ns
//!    102   32  public_key  Ed25519 key that signed
//!    134   64  signature   Ed25519 over bytes 0..134
//! ```
//!
//! A **key-rotation head** (kind `0x02`) is a group head that also names the key that
//! signs every later head. It is signed by the *old* key, so the hand-over is itself
//! covered by the chain of trust that starts at the ledger's first key:
//!
//! ```text
//! offset size  field
//!      0  134  as above, with kind = 0x02 and public_key = the old (outgoing) key
//!    134   32  next_key    Ed25519 key that signs every head after this one
//!    166   64  signature   Ed25519 by the old key over bytes 0..166
//! ```
//! Every group commit stores a head, so every record of both chains is covered by the
//! signature of the head of the group that appended it, and through the hash links by every
//! later head.
//!
//! **Version 2** (written since the live-state digest, issue 16) inserts the hash of the
//! live-state digest ([`crate::state`]) after the signer's key; version-1 heads of older
//! ledgers still decode and verify:
//!
//! ```text
//! offset size  field
//!      0  134  as version 1, with version = 2 (kind 0x01 or 0x02)
//!    134   32  state_hash  SHA-256 of the live-state digest after this group (state.rs)
//!    166   32  next_key    kind 0x02 only
//!   166 / 198  64  signature  Ed25519 over every byte before it
//! ```

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::codec::{DecodeError, Reader, Writer};
use crate::keys::{verify_signature, PublicKey, SigningKey};
use crate::Hash;

/// Magic of a signed head.
pub const MAGIC: &str = "MFHD";
/// Format version of heads without a state digest (read, and written by [`SignedHead::sign`]).
pub const VERSION_1: u8 = 1;
/// Format version written by the committer: with the live-state hash.
pub const VERSION: u8 = 2;
/// Kind byte of a group head.
pub const KIND_GROUP: u8 = 0x01;
/// Kind byte of a key-rotation head.
pub const KIND_ROTATION: u8 = 0x02;
/// Length of the signed part of a group head.
pub const SIGNED_LEN: usize = 134;
/// Length of a whole stored group head.
pub const HEAD_LEN: usize = SIGNED_LEN + 64;
/// Length of the signed part of a key-rotation head.
pub const ROTATION_SIGNED_LEN: usize = SIGNED_LEN + 32;
/// Length of a whole stored key-rotation head.
pub const ROTATION_HEAD_LEN: usize = ROTATION_SIGNED_LEN + 64;
/// Length of a whole stored version-2 group head.
pub const HEAD_V2_LEN: usize = HEAD_LEN + 32;
/// Length of a whole stored version-2 key-rotation head.
pub const ROTATION_HEAD_V2_LEN: usize = ROTATION_HEAD_LEN + 32;

/// The tip of one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tip {
    /// Sequence of the last record (0: empty chain).
    pub seq: u64,
    /// Its chain hash (zeros for an empty chain).
    pub hash: Hash,
}

/// A decoded head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// Group-commit sequence.
    pub group: u64,
    /// Checkpoint chain tip.
    pub checkpoints: Tip,
    /// Audit chain tip.
    pub audit: Tip,
    /// Unix time in ns.
    pub time_ns: u64,
    /// Signer.
    pub public_key: PublicKey,
    /// For a key-rotation head: the key that signs every later head.
    pub next_key: Option<PublicKey>,
    /// Version 2: SHA-256 of the live-state digest after this group. `None`: version 1.
    pub state: Option<Hash>,
    /// Signature over the encoding up to the signature.
    pub signature: [u8; 64],
}

impl SignedHead {
    fn signed_bytes(
        group: u64,
        checkpoints: Tip,
        audit: Tip,
        time_ns: u64,
        public_key: &PublicKey,
        state: Option<&Hash>,
        next_key: Option<&PublicKey>,
    ) -> Vec<u8> {
        let mut w = Writer::with_capacity(ROTATION_HEAD_V2_LEN);
        w.raw(MAGIC.as_bytes());
        w.u8(if state.is_some() { VERSION } else { VERSION_1 });
        w.u8(if next_key.is_some() {
            KIND_ROTATION
        } else {
            KIND_GROUP
        });
        w.u64(group);
        w.u64(checkpoints.seq);
        w.raw(&checkpoints.hash);
        w.u64(audit.seq);
        w.raw(&audit.hash);
        w.u64(time_ns);
        w.raw(public_key);
        if let Some(state) = state {
            w.raw(state);
        }
        if let Some(next) = next_key {
            w.raw(next);
        }
        w.finish()
    }

    /// Builds and signs a version-1 group head (no state digest; older ledgers' format).
    pub fn sign(key: &SigningKey, group: u64, checkpoints: Tip, audit: Tip, time_ns: u64) -> Self {
        Self::sign_inner(key, group, checkpoints, audit, time_ns, None, None)
    }

    /// Builds and signs a version-2 head committing to the live state `state` (the hash of
    /// the digest), a key-rotation head when `next_key` is given.
    pub fn sign_v2(
        key: &SigningKey,
        group: u64,
        checkpoints: Tip,
        audit: Tip,
        time_ns: u64,
        state: Hash,
        next_key: Option<PublicKey>,
    ) -> Self {
        Self::sign_inner(
            key,
            group,
            checkpoints,
            audit,
            time_ns,
            Some(state),
            next_key,
        )
    }

    /// Builds a version-1 key-rotation head: signed by `key` (the outgoing key), naming
    /// `next_key`.
    pub fn sign_rotation(
        key: &SigningKey,
        group: u64,
        checkpoints: Tip,
        audit: Tip,
        time_ns: u64,
        next_key: PublicKey,
    ) -> Self {
        Self::sign_inner(
            key,
            group,
            checkpoints,
            audit,
            time_ns,
            None,
            Some(next_key),
        )
    }

    fn sign_inner(
        key: &SigningKey,
        group: u64,
        checkpoints: Tip,
        audit: Tip,
        time_ns: u64,
        state: Option<Hash>,
        next_key: Option<PublicKey>,
    ) -> Self {
        let public_key = key.public_key();
        let msg = Self::signed_bytes(
            group,
            checkpoints,
            audit,
            time_ns,
            &public_key,
            state.as_ref(),
            next_key.as_ref(),
        );
        Self {
            group,
            checkpoints,
            audit,
            time_ns,
            public_key,
            next_key,
            state,
            signature: key.sign(&msg),
        }
    }

    /// Format version of this head.
    pub fn version(&self) -> u8 {
        if self.state.is_some() {
            VERSION
        } else {
            VERSION_1
        }
    }

    /// The stored encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Self::signed_bytes(
            self.group,
            self.checkpoints,
            self.audit,
            self.time_ns,
            &self.public_key,
            self.state.as_ref(),
            self.next_key.as_ref(),
        );
        out.extend_from_slice(&self.signature);
        out
    }

    /// Whether the signature verifies under the head's own public key. Callers must also
    /// check that this key is one they trust.
    pub fn signature_valid(&self) -> bool {
        let msg = Self::signed_bytes(
            self.group,
            self.checkpoints,
            self.audit,
            self.time_ns,
            &self.public_key,
            self.state.as_ref(),
            self.next_key.as_ref(),
        );
        verify_signature(&self.public_key, &msg, &self.signature)
    }

    /// Decodes a stored head (the signature is not checked here).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        r.magic(MAGIC)?;
        let version = r.u8("version")?;
        if version != VERSION && version != VERSION_1 {
            return Err(DecodeError::UnsupportedVersion {
                record: "head",
                found: version,
            });
        }
        let kind = r.u8("kind")?;
        if kind != KIND_GROUP && kind != KIND_ROTATION {
            return Err(DecodeError::NotCanonical {
                field: "kind",
                reason: "unknown record kind",
            });
        }
        let group = r.u64("group")?;
        let checkpoints = Tip {
            seq: r.u64("ckpt_seq")?,
            hash: r.array("ckpt_hash")?,
        };
        let audit = Tip {
            seq: r.u64("audit_seq")?,
            hash: r.array("audit_hash")?,
        };
        let time_ns = r.u64("time_ns")?;
        let public_key = r.array("public_key")?;
        let state = if version == VERSION {
            Some(r.array("state_hash")?)
        } else {
            None
        };
        let next_key = if kind == KIND_ROTATION {
            Some(r.array("next_key")?)
        } else {
            None
        };
        let signature = r.array("signature")?;
        r.finish()?;
        Ok(Self {
            group,
            checkpoints,
            audit,
            time_ns,
            public_key,
            next_key,
            state,
            signature,
        })
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn sign_encode_decode_verify() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(dir.path()).unwrap();
        let h = SignedHead::sign(
            &key,
            4,
            Tip {
                seq: 10,
                hash: [1; 32],
            },
            Tip {
                seq: 3,
                hash: [2; 32],
            },
            99,
        );
        let enc = h.encode();
        assert_eq!(enc.len(), HEAD_LEN);
        let d = SignedHead::decode(&enc).unwrap();
        assert_eq!(d, h);
        assert!(d.signature_valid());
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x80;
            let ok = SignedHead::decode(&bad)
                .map(|h| h.signature_valid())
                .unwrap_or(false);
            assert!(!ok, "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn rotation_head_round_trips_and_binds_the_next_key() {
        let old = SigningKey::from_seed(&[1; 32]);
        let new = SigningKey::from_seed(&[2; 32]);
        let h = SignedHead::sign_rotation(
            &old,
            7,
            Tip::default(),
            Tip {
                seq: 3,
                hash: [9; 32],
            },
            5,
            new.public_key(),
        );
        let enc = h.encode();
        assert_eq!(enc.len(), ROTATION_HEAD_LEN);
        assert_eq!(enc[5], KIND_ROTATION);
        let d = SignedHead::decode(&enc).unwrap();
        assert_eq!(d, h);
        assert!(d.signature_valid());
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x01;
            let ok = SignedHead::decode(&bad)
                .map(|h| h.signature_valid())
                .unwrap_or(false);
            assert!(!ok, "flipping byte {i} of a rotation head went unnoticed");
        }
        // A group head's bytes with the kind changed to rotation do not decode (too short).
        let mut g = SignedHead::sign(&old, 1, Tip::default(), Tip::default(), 1).encode();
        g[5] = KIND_ROTATION;
        assert!(SignedHead::decode(&g).is_err());
    }

    #[test]
    fn version_2_heads_bind_the_state_hash() {
        let key = SigningKey::from_seed(&[1; 32]);
        let next = SigningKey::from_seed(&[2; 32]);
        for next_key in [None, Some(next.public_key())] {
            let h = SignedHead::sign_v2(
                &key,
                3,
                Tip::default(),
                Tip::default(),
                7,
                [5; 32],
                next_key,
            );
            let enc = h.encode();
            let len = if next_key.is_some() {
                ROTATION_HEAD_V2_LEN
            } else {
                HEAD_V2_LEN
            };
            assert_eq!(enc.len(), len);
            assert_eq!(enc[4], VERSION);
            assert_eq!(&enc[134..166], &[5; 32]);
            let d = SignedHead::decode(&enc).unwrap();
            assert_eq!(d, h);
            assert_eq!(d.state, Some([5; 32]));
            assert!(d.signature_valid());
            for i in 0..enc.len() {
                let mut bad = enc.clone();
                bad[i] ^= 0x04;
                let ok = SignedHead::decode(&bad)
                    .map(|h| h.signature_valid())
                    .unwrap_or(false);
                assert!(!ok, "flipping byte {i} of a version-2 head went unnoticed");
            }
            // Relabelled as version 1 it no longer decodes (32 bytes too many).
            let mut v1 = enc.clone();
            v1[4] = VERSION_1;
            assert!(SignedHead::decode(&v1).is_err());
        }
    }
}
