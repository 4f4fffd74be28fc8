//! Promotion of a standby (issue 18): the group that opens a new epoch.
//!
//! A standby's copy holds only what the former primary's chain proves. When a co-signed
//! admin command promotes it, [`Replica::promote`] appends one **promotion group** in one
//! LMDB write transaction:
//!
//! * the audit record `failover.promoted` (the new epoch, the group and head it promotes
//!   from, the command's body hash, its co-signers and the new signing key), then any
//!   further events the caller gives (the accepted command, for instance);
//! * a **promotion head** (formats.md §1.5, kind `0x03`) of epoch = the copy's + 1, signed
//!   by the promoted node's own key, naming the last replicated head by group and hash;
//! * the command's nonce in the `nonces` database, so that the promoted node refuses the
//!   same command if it is sent again (a replay);
//! * `meta`: the new tips, the group, and the new key in force.
//!
//! Nothing of the former primary's history changes: the promoted node's ledger is the
//! replicated prefix, byte for byte, followed by the promotion group. `verify` accepts the
//! epoch rise exactly there (and nowhere else); a standby of the new primary accepts the
//! group through [`Replica::apply`] once the promoted key is pinned
//! ([`Replica::trust_promotion_keys`]).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::audit::{AuditError, AuditEvent, AuditRecord, Severity};
use crate::checkpoint::{chain_hash, sha256};
use crate::codec::hex;
use crate::head::{Promotion, SignedHead, Tip, MAX_COSIGNERS};
use crate::keys::{PublicKey, SigningKey};
use crate::replication::{ApplyError, Held, Replica};
use crate::store::{encode_tip, meta_keys, u64_key};
use crate::Hash;

/// What promotes a standby: the admin command that decided it.
#[derive(Debug, Clone)]
pub struct PromotionRequest {
    /// SHA-256 of the co-signed command's body (formats.md §3).
    pub command: Hash,
    /// The command's nonce and expiry (Unix ns): recorded so that a replay is refused.
    pub nonce: [u8; 16],
    /// When the command expires (Unix ns).
    pub expires_ns: u64,
    /// The admins who signed it (distinct; sorted here).
    pub cosigners: Vec<PublicKey>,
    /// Further audit events of the same group (after `failover.promoted`).
    pub events: Vec<AuditEvent>,
    /// Time of the group (Unix ns).
    pub time_ns: u64,
}

/// What a promotion wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The promotion group.
    pub group: u64,
    /// The new epoch.
    pub epoch: u64,
    /// The last group replicated from the former primary.
    pub from_group: u64,
    /// SHA-256 of its head.
    pub from_head: Hash,
    /// The checkpoint tip promoted from: the former primary's records after it were not
    /// replicated.
    pub checkpoints: Tip,
    /// The key that signs from now on.
    pub signer: PublicKey,
}

/// Why a standby could not be promoted.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// The copy holds no group: there is no history to continue.
    #[error("the standby holds no group yet: there is nothing to promote")]
    Empty,
    /// The new key is one that signed the former primary's heads.
    #[error("the promotion key {key} is the key in force: a promoted node signs with its own key")]
    SameKey {
        /// Hex of the key.
        key: String,
    },
    /// Co-signers missing, too many, or repeated.
    #[error("the promotion names {count} co-signer(s) ({reason})")]
    Cosigners {
        /// How many were given.
        count: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The epoch cannot be raised any more.
    #[error("the epoch {epoch} cannot be raised")]
    EpochOverflow {
        /// The copy's epoch.
        epoch: u64,
    },
    /// The command was already recorded (a replay).
    #[error("nonce {nonce} was already used by a command accepted earlier (replay)")]
    NonceReused {
        /// Hex of the nonce.
        nonce: String,
    },
    /// An audit event is not valid.
    #[error("audit event: {0}")]
    Audit(#[from] AuditError),
    /// The copy's last head is missing.
    #[error("the head of group {group} is missing from the copy")]
    MissingHead {
        /// Group.
        group: u64,
    },
    /// LMDB failed; nothing was written.
    #[error("writing the promotion group {group}: {source}")]
    Storage {
        /// Group.
        group: u64,
        /// LMDB's error.
        source: heed::Error,
    },
}

/// The audit event a promotion group starts with.
pub const EVENT: &str = "failover.promoted";

impl Replica {
    /// Promotes this copy: appends the promotion group (see the module doc) signed by
    /// `key`, the promoted node's own key, which signs every later head. Afterwards the
    /// copy is a ledger of the new epoch that [`crate::Ledger::open`] opens with `key`.
    pub fn promote(
        &mut self,
        key: &SigningKey,
        request: PromotionRequest,
    ) -> Result<Promoted, PromoteError> {
        let held = self.held.clone();
        if held.group == 0 {
            return Err(PromoteError::Empty);
        }
        let signer = key.public_key();
        if signer == held.signer {
            return Err(PromoteError::SameKey { key: hex(&signer) });
        }
        let mut cosigners = request.cosigners.clone();
        cosigners.sort_unstable();
        cosigners.dedup();
        let count = request.cosigners.len();
        if cosigners.len() != count {
            return Err(PromoteError::Cosigners {
                count,
                reason: "an admin is named twice",
            });
        }
        if count == 0 || count > MAX_COSIGNERS {
            return Err(PromoteError::Cosigners {
                count,
                reason: "1 to 8 are recorded",
            });
        }
        let epoch = held
            .epoch
            .checked_add(1)
            .ok_or(PromoteError::EpochOverflow { epoch: held.epoch })?;
        let group = held.group.saturating_add(1);
        let storage = |source| PromoteError::Storage { group, source };
        let dbs = self.store.dbs;
        let env = self.store.env.clone();
        let mut wtxn = env.write_txn().map_err(storage)?;
        let from_head = dbs
            .heads
            .get(&wtxn, &u64_key(held.group))
            .map_err(storage)?
            .map(sha256)
            .ok_or(PromoteError::MissingHead { group: held.group })?;
        if dbs
            .nonces
            .get(&wtxn, &request.nonce)
            .map_err(storage)?
            .is_some()
        {
            return Err(PromoteError::NonceReused {
                nonce: hex(&request.nonce),
            });
        }
        let first = AuditEvent::new(EVENT, Severity::Warning)
            .field("epoch", epoch)
            .field("from_group", held.group)
            .field("from_head", hex(&from_head))
            .field("from_checkpoint", held.checkpoints.seq)
            .field("command", hex(&request.command))
            .field(
                "cosigners",
                cosigners
                    .iter()
                    .map(|k| hex(k))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .field("signer", hex(&signer));
        let mut audit = held.audit;
        for event in std::iter::once(first).chain(request.events) {
            event.validate()?;
            let record = AuditRecord {
                seq: audit.seq.saturating_add(1),
                prev_hash: audit.hash,
                time_ns: request.time_ns,
                event,
            };
            let bytes = record.encode();
            dbs.audit
                .put(&mut wtxn, &u64_key(record.seq), &bytes)
                .map_err(storage)?;
            audit = Tip {
                seq: record.seq,
                hash: chain_hash(&audit.hash, &bytes),
            };
        }
        let mut nonce_value = Vec::with_capacity(40);
        nonce_value.extend_from_slice(&request.expires_ns.to_be_bytes());
        nonce_value.extend_from_slice(&request.command);
        dbs.nonces
            .put(&mut wtxn, &request.nonce, &nonce_value)
            .map_err(storage)?;
        let head = SignedHead::sign_promotion(
            key,
            group,
            held.checkpoints,
            audit,
            request.time_ns,
            self.state.hash(),
            epoch,
            Promotion {
                from_group: held.group,
                from_head,
                command: request.command,
                cosigners,
            },
        );
        dbs.heads
            .put(&mut wtxn, &u64_key(group), &head.encode())
            .map_err(storage)?;
        let put = |wtxn: &mut heed::RwTxn<'_>, k: &[u8], v: &[u8]| {
            dbs.meta.put(wtxn, k, v).map_err(storage)
        };
        put(&mut wtxn, meta_keys::AUDIT_TIP, &encode_tip(&audit))?;
        put(&mut wtxn, meta_keys::GROUP, &u64_key(group))?;
        put(&mut wtxn, meta_keys::SIGNING_KEY, &signer)?;
        // The promotion head signs the live state: `meta/state` holds the digest it signs
        // (a copy of a version-1 ledger gets its first one here).
        put(&mut wtxn, meta_keys::STATE, &self.state.encode())?;
        wtxn.commit().map_err(storage)?;
        self.held = Held {
            group,
            checkpoints: held.checkpoints,
            audit,
            epoch,
            head_version: crate::head::VERSION_3,
            signer,
        };
        Ok(Promoted {
            group,
            epoch,
            from_group: held.group,
            from_head,
            checkpoints: held.checkpoints,
            signer,
        })
    }

    /// Checks a promotion head arriving as the next group: the next epoch, the held head
    /// named by group and hash, a pinned promotion key that is not the key in force.
    pub(crate) fn check_promotion_head(
        &self,
        head: &SignedHead,
        held: &crate::replication::Held,
        staged_prev: Option<&[u8]>,
    ) -> Result<(), ApplyError> {
        let g = head.group;
        let bad = |reason: String| ApplyError::BadPromotion { group: g, reason };
        let prev_bytes = match staged_prev {
            Some(b) => b.to_vec(),
            None => {
                let rtxn = self
                    .store
                    .read_txn()
                    .map_err(|source| ApplyError::Storage { group: g, source })?;
                let b = self
                    .store
                    .dbs
                    .heads
                    .get(&rtxn, &u64_key(held.group))
                    .map_err(|source| ApplyError::Storage { group: g, source })?
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                drop(rtxn);
                b
            }
        };
        let prev = SignedHead::decode(&prev_bytes).ok();
        let pinned: Vec<PublicKey> = self.promotion_keys.clone();
        crate::verify::check_promotion(head, prev.as_ref(), &prev_bytes, &pinned, &[])
            .map_err(bad)?;
        if head.public_key == held.signer {
            return Err(bad("signed by the key already in force".into()));
        }
        Ok(())
    }
}

/// Where an epoch began: what the promotion head that opened it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStart {
    /// The promotion group.
    pub group: u64,
    /// The group it promoted from (the last one replicated from the former primary).
    pub from_group: u64,
    /// The last checkpoint kept from the former primary (the promotion adds none).
    pub from_checkpoint: u64,
}

impl crate::Store {
    /// The promotion head that opened `epoch` (`None` for epoch 0, or when this ledger
    /// holds none: it never reached that epoch). Reads heads from the newest back.
    pub fn epoch_start(&self, epoch: u64) -> Result<Option<EpochStart>, crate::ReadError> {
        if epoch == 0 {
            return Ok(None);
        }
        let rtxn = self.read_txn()?;
        for item in self.dbs.heads.rev_iter(&rtxn)? {
            let (_, v) = item?;
            let Ok(h) = SignedHead::decode(v) else {
                continue;
            };
            if h.epoch() < epoch {
                break;
            }
            if let (Some(p), true) = (&h.promotion, h.epoch() == epoch) {
                return Ok(Some(EpochStart {
                    group: h.group,
                    from_group: p.from_group,
                    from_checkpoint: h.checkpoints.seq,
                }));
            }
        }
        Ok(None)
    }

    /// The head of `group`, decoded (`None` if this ledger holds no such head, or it does
    /// not decode: `verify` names that).
    fn head_of_group(&self, group: u64) -> Result<Option<SignedHead>, crate::ReadError> {
        let rtxn = self.read_txn()?;
        Ok(self
            .dbs
            .heads
            .get(&rtxn, &u64_key(group))?
            .and_then(|v| SignedHead::decode(v).ok()))
    }

    /// The epoch of the head of `group` (`None` if this ledger holds no such head).
    pub fn epoch_of_group(&self, group: u64) -> Result<Option<u64>, crate::ReadError> {
        Ok(self.head_of_group(group)?.map(|h| h.epoch()))
    }

    /// The audit tip (last audit sequence) the head of `group` signs (`None` if this
    /// ledger holds no such head).
    pub fn audit_tip_of_group(&self, group: u64) -> Result<Option<u64>, crate::ReadError> {
        Ok(self.head_of_group(group)?.map(|h| h.audit.seq))
    }
}
