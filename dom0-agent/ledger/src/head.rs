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
//!
//! **Version 3** (written since failover, issue 18) adds the **epoch** after the state
//! hash: a counter that only a promotion of a standby raises, so that a former primary
//! that meets a head of a higher epoch knows it has been replaced (fenced). Heads of
//! versions 1 and 2 are of epoch 0.
//!
//! ```text
//! offset size  field
//!      0  166  as version 2, with version = 3 (kind 0x01 or 0x02)
//!    166    8  epoch       u64 BE
//!    174   32  next_key    kind 0x02 only
//!   174 / 206  64  signature  Ed25519 over every byte before it
//! ```
//!
//! A **promotion head** (kind `0x03`, version 3 only) opens a new epoch: the head a
//! standby writes when a co-signed admin command promotes it (issue 18). It is signed by
//! the promoted node's own key, which signs every later head; the head before it is the
//! last one replicated from the former primary, and it names that head by hash:
//!
//! ```text
//! offset size  field
//!      0  174  as version 3, kind = 0x03, epoch = the previous head's + 1,
//!              public_key = the promoted node's key (signs this and every later head)
//!    174    8  from_group  u64 BE, the last group replicated (= group - 1)
//!    182   32  from_head   SHA-256 of that group's stored head
//!    214   32  command     SHA-256 of the co-signed admin command's body (formats.md §3)
//!    246    1  n           co-signers, 1..=8
//!    247 32*n  cosigners   their admin keys, strictly increasing
//!  247+32n 64  signature   Ed25519 over every byte before it
//! ```
//!
//! A record format: uses [`crate::codec`], [`crate::keys`] and the vocabulary.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::codec::{DecodeError, Reader, Writer};
use crate::keys::{verify_signature, PublicKey, SigningKey};
use crate::Hash;

/// Magic of a signed head.
pub const MAGIC: &str = "MFHD";
/// Format version of heads without a state digest (read, and written by [`SignedHead::sign`]).
pub const VERSION_1: u8 = 1;
/// Format version of heads with the live-state hash but no epoch (read, and written by
/// [`SignedHead::sign_v2`]).
pub const VERSION: u8 = 2;
/// Format version written by the committer: the live-state hash and the epoch.
pub const VERSION_3: u8 = 3;
/// Kind byte of a group head.
pub const KIND_GROUP: u8 = 0x01;
/// Kind byte of a key-rotation head.
pub const KIND_ROTATION: u8 = 0x02;
/// Kind byte of a promotion head (version 3 only).
pub const KIND_PROMOTION: u8 = 0x03;
/// Most co-signers a promotion head names (the admin envelope's limit).
pub const MAX_COSIGNERS: usize = 8;
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
/// Length of a whole stored version-3 group head.
pub const HEAD_V3_LEN: usize = HEAD_V2_LEN + 8;
/// Length of a whole stored version-3 key-rotation head.
pub const ROTATION_HEAD_V3_LEN: usize = ROTATION_HEAD_V2_LEN + 8;
/// Length of a whole stored promotion head, signature included, without its co-signers'
/// keys (32 bytes each).
pub const PROMOTION_HEAD_BASE_LEN: usize = HEAD_V3_LEN + 8 + 32 + 32 + 1;
/// Longest stored head of any version (a promotion head with the most co-signers).
pub const MAX_HEAD_LEN: usize = PROMOTION_HEAD_BASE_LEN + 32 * MAX_COSIGNERS;

/// What a promotion head (kind `0x03`) adds: where the new epoch starts from and who
/// decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    /// The last group replicated from the former primary (the group before this head).
    pub from_group: u64,
    /// SHA-256 of that group's stored head.
    pub from_head: Hash,
    /// SHA-256 of the co-signed admin command's body.
    pub command: Hash,
    /// The admins who signed the command, strictly increasing, 1..=[`MAX_COSIGNERS`].
    pub cosigners: Vec<PublicKey>,
}

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
    /// Version 3: the epoch (raised by each promotion of a standby). `None`: version 1 or
    /// 2, which are of epoch 0. Only a head with a state hash can carry one.
    pub epoch: Option<u64>,
    /// For a promotion head (kind `0x03`, version 3): where the new epoch starts.
    pub promotion: Option<Promotion>,
    /// Signature over the encoding up to the signature.
    pub signature: [u8; 64],
}

impl SignedHead {
    /// The encoding up to the signature: what the signature covers.
    fn signed_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(MAX_HEAD_LEN);
        w.raw(MAGIC.as_bytes());
        w.u8(self.version());
        w.u8(self.kind());
        w.u64(self.group);
        w.u64(self.checkpoints.seq);
        w.raw(&self.checkpoints.hash);
        w.u64(self.audit.seq);
        w.raw(&self.audit.hash);
        w.u64(self.time_ns);
        w.raw(&self.public_key);
        if let Some(state) = &self.state {
            w.raw(state);
            if let Some(epoch) = self.epoch {
                w.u64(epoch);
            }
        }
        if let Some(next) = &self.next_key {
            w.raw(next);
        }
        if let Some(p) = &self.promotion {
            w.u64(p.from_group);
            w.raw(&p.from_head);
            w.raw(&p.command);
            w.u8(u8::try_from(p.cosigners.len()).unwrap_or(u8::MAX));
            for k in &p.cosigners {
                w.raw(k);
            }
        }
        w.finish()
    }

    /// The kind byte: group, key rotation or promotion.
    pub fn kind(&self) -> u8 {
        if self.promotion.is_some() {
            KIND_PROMOTION
        } else if self.next_key.is_some() {
            KIND_ROTATION
        } else {
            KIND_GROUP
        }
    }

    /// Builds and signs a promotion head (version 3, kind `0x03`): signed by `key`, the
    /// promoted node's, at `epoch` (the previous head's + 1). The tips and state are
    /// those after the group (the promotion adds audit records only).
    #[allow(clippy::too_many_arguments)]
    pub fn sign_promotion(
        key: &SigningKey,
        group: u64,
        checkpoints: Tip,
        audit: Tip,
        time_ns: u64,
        state: Hash,
        epoch: u64,
        promotion: Promotion,
    ) -> Self {
        let mut head = Self {
            group,
            checkpoints,
            audit,
            time_ns,
            public_key: key.public_key(),
            next_key: None,
            state: Some(state),
            epoch: Some(epoch),
            promotion: Some(promotion),
            signature: [0; 64],
        };
        head.signature = key.sign(&head.signed_bytes());
        head
    }

    /// Builds and signs a version-1 group head (no state digest; older ledgers' format).
    pub fn sign(key: &SigningKey, group: u64, checkpoints: Tip, audit: Tip, time_ns: u64) -> Self {
        Self::sign_inner(key, group, checkpoints, audit, time_ns, None, None, None)
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
            None,
            next_key,
        )
    }

    /// Builds and signs a version-3 head: the live state `state` (the hash of the digest)
    /// and the `epoch`; a key-rotation head when `next_key` is given. What the committer
    /// writes.
    #[allow(clippy::too_many_arguments)]
    pub fn sign_v3(
        key: &SigningKey,
        group: u64,
        checkpoints: Tip,
        audit: Tip,
        time_ns: u64,
        state: Hash,
        epoch: u64,
        next_key: Option<PublicKey>,
    ) -> Self {
        Self::sign_inner(
            key,
            group,
            checkpoints,
            audit,
            time_ns,
            Some(state),
            Some(epoch),
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
            None,
            Some(next_key),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn sign_inner(
        key: &SigningKey,
        group: u64,
        checkpoints: Tip,
        audit: Tip,
        time_ns: u64,
        state: Option<Hash>,
        epoch: Option<u64>,
        next_key: Option<PublicKey>,
    ) -> Self {
        let mut head = Self {
            group,
            checkpoints,
            audit,
            time_ns,
            public_key: key.public_key(),
            next_key,
            state,
            // An epoch is only carried next to a state hash (version 3).
            epoch: state.and(epoch),
            promotion: None,
            signature: [0; 64],
        };
        head.signature = key.sign(&head.signed_bytes());
        head
    }

    /// Format version of this head.
    pub fn version(&self) -> u8 {
        match (self.state, self.epoch) {
            (Some(_), Some(_)) => VERSION_3,
            (Some(_), None) => VERSION,
            (None, _) => VERSION_1,
        }
    }

    /// The epoch this head belongs to: 0 for heads of versions 1 and 2.
    pub fn epoch(&self) -> u64 {
        self.epoch.unwrap_or(0)
    }

    /// The stored encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.signed_bytes();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Whether the signature verifies under the head's own public key. Callers must also
    /// check that this key is one they trust.
    pub fn signature_valid(&self) -> bool {
        let msg = self.signed_bytes();
        verify_signature(&self.public_key, &msg, &self.signature)
    }

    /// Decodes a stored head (the signature is not checked here).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        r.magic(MAGIC)?;
        let version = r.u8("version")?;
        if version != VERSION_3 && version != VERSION && version != VERSION_1 {
            return Err(DecodeError::UnsupportedVersion {
                record: "head",
                found: version,
            });
        }
        let kind = r.u8("kind")?;
        if kind != KIND_GROUP && kind != KIND_ROTATION && kind != KIND_PROMOTION {
            return Err(DecodeError::NotCanonical {
                field: "kind",
                reason: "unknown record kind",
            });
        }
        if kind == KIND_PROMOTION && version != VERSION_3 {
            return Err(DecodeError::NotCanonical {
                field: "kind",
                reason: "a promotion head is of version 3",
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
        let state = if version >= VERSION {
            Some(r.array("state_hash")?)
        } else {
            None
        };
        let epoch = if version == VERSION_3 {
            Some(r.u64("epoch")?)
        } else {
            None
        };
        let next_key = if kind == KIND_ROTATION {
            Some(r.array("next_key")?)
        } else {
            None
        };
        let promotion = if kind == KIND_PROMOTION {
            let from_group = r.u64("from_group")?;
            let from_head = r.array("from_head")?;
            let command = r.array("command")?;
            let n = usize::from(r.u8("cosigners")?);
            if n == 0 || n > MAX_COSIGNERS {
                return Err(DecodeError::NotCanonical {
                    field: "cosigners",
                    reason: "a promotion names 1 to 8 co-signers",
                });
            }
            let mut cosigners: Vec<PublicKey> = Vec::with_capacity(n);
            for _ in 0..n {
                let k: PublicKey = r.array("cosigner")?;
                if cosigners.last().is_some_and(|prev| *prev >= k) {
                    return Err(DecodeError::NotCanonical {
                        field: "cosigners",
                        reason: "not strictly increasing",
                    });
                }
                cosigners.push(k);
            }
            Some(Promotion {
                from_group,
                from_head,
                command,
                cosigners,
            })
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
            epoch,
            promotion,
            signature,
        })
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    /// Flipping `mask` in any one byte of `enc` makes it fail to decode or to verify.
    fn every_byte_is_bound(enc: &[u8], mask: u8, what: &str) {
        for i in 0..enc.len() {
            let mut bad = enc.to_vec();
            bad[i] ^= mask;
            let ok = SignedHead::decode(&bad)
                .map(|h| h.signature_valid())
                .unwrap_or(false);
            assert!(!ok, "flipping byte {i} of {what} went unnoticed");
        }
    }

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
        every_byte_is_bound(&enc, 0x80, "a head");
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
        every_byte_is_bound(&enc, 0x01, "a rotation head");
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
            every_byte_is_bound(&enc, 0x04, "a version-2 head");
            // Relabelled as version 1 it no longer decodes (32 bytes too many).
            let mut v1 = enc.clone();
            v1[4] = VERSION_1;
            assert!(SignedHead::decode(&v1).is_err());
        }
    }

    #[test]
    fn version_3_heads_bind_the_epoch() {
        let key = SigningKey::from_seed(&[1; 32]);
        let next = SigningKey::from_seed(&[2; 32]);
        for next_key in [None, Some(next.public_key())] {
            let h = SignedHead::sign_v3(
                &key,
                3,
                Tip::default(),
                Tip::default(),
                7,
                [5; 32],
                0x0102_0304_0506_0708,
                next_key,
            );
            let enc = h.encode();
            let len = if next_key.is_some() {
                ROTATION_HEAD_V3_LEN
            } else {
                HEAD_V3_LEN
            };
            assert_eq!(enc.len(), len);
            assert_eq!(enc[4], VERSION_3);
            assert_eq!(&enc[134..166], &[5; 32]);
            assert_eq!(&enc[166..174], &[1, 2, 3, 4, 5, 6, 7, 8]);
            let d = SignedHead::decode(&enc).unwrap();
            assert_eq!(d, h);
            assert_eq!(d.epoch(), 0x0102_0304_0506_0708);
            assert_eq!(d.version(), VERSION_3);
            assert!(d.signature_valid());
            every_byte_is_bound(&enc, 0x10, "a version-3 head");
            // Relabelled as version 2 it no longer decodes (8 bytes too many), nor as 4.
            for v in [VERSION, 4] {
                let mut other = enc.clone();
                other[4] = v;
                assert!(SignedHead::decode(&other).is_err());
            }
        }
        // Older heads are of epoch 0.
        let v2 = SignedHead::sign_v2(&key, 1, Tip::default(), Tip::default(), 1, [0; 32], None);
        assert_eq!((v2.version(), v2.epoch()), (VERSION, 0));
    }

    #[test]
    fn promotion_heads_bind_where_the_epoch_starts_and_who_decided() {
        let key = SigningKey::from_seed(&[3; 32]);
        let promotion = Promotion {
            from_group: 4,
            from_head: [0x44; 32],
            command: [0xc0; 32],
            cosigners: vec![[0xa1; 32], [0xa2; 32]],
        };
        let h = SignedHead::sign_promotion(
            &key,
            5,
            Tip::default(),
            Tip {
                seq: 9,
                hash: [9; 32],
            },
            7,
            [5; 32],
            1,
            promotion.clone(),
        );
        let enc = h.encode();
        assert_eq!(enc.len(), PROMOTION_HEAD_BASE_LEN + 2 * 32);
        assert_eq!((enc[4], enc[5]), (VERSION_3, KIND_PROMOTION));
        assert_eq!(&enc[174..182], &4u64.to_be_bytes());
        assert_eq!(enc[246], 2);
        let d = SignedHead::decode(&enc).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.promotion, Some(promotion.clone()));
        assert!(d.signature_valid());
        every_byte_is_bound(&enc, 0x20, "a promotion head");
        // Co-signers: none, more than 8, or not strictly increasing do not decode.
        for cosigners in [
            vec![],
            vec![[1; 32]; 9],
            vec![[0xa2; 32], [0xa1; 32]],
            vec![[0xa1; 32], [0xa1; 32]],
        ] {
            let mut p = promotion.clone();
            p.cosigners = cosigners;
            let e = SignedHead::sign_promotion(
                &key,
                5,
                Tip::default(),
                Tip::default(),
                7,
                [5; 32],
                1,
                p,
            )
            .encode();
            assert!(SignedHead::decode(&e).is_err());
        }
        // A promotion head relabelled as version 2 does not decode.
        let mut v2 = enc.clone();
        v2[4] = VERSION;
        assert!(SignedHead::decode(&v2).is_err());
        assert_eq!(MAX_HEAD_LEN, 567);
    }
}
