//! Verification of both chains and every signed head.
//!
//! `verify` reads everything, checks every hash link and every signature, and reports the
//! first bad record of each chain: which chain, which sequence, and what is wrong.
//!
//! How a single altered record is located: for every record `n` the walk computes
//! `own_n = SHA-256(prev_n || encoding_n)` from the record's own bytes, where `prev_n` is
//! the link the record stores. If the link of record `n` does not equal `own_{n-1}`, either
//! record `n-1` changed (its hash moved) or record `n` changed its stored link (and with
//! it its own hash). The two are told apart by the next link: if `n+1` (or the signed head
//! that covers `n`) still agrees with `own_n`, record `n` is intact and `n-1` is the altered
//! one; otherwise `n` is. Missing, moved and undecodable records are named directly, and an
//! altered last record is caught by the signature of the head that covers it.
//!
//! The engine layer: uses the store, the queries, the `undone` index, the record formats
//! and the keys; nothing in the crate uses it.

use std::collections::HashMap;
use std::fmt;

use heed::types::Bytes;
use heed::{Database, RoTxn, WithoutTls};

use crate::audit::AuditRecord;
use crate::checkpoint::chain_hash;
use crate::codec::{hex, DecodeError};
use crate::head::SignedHead;
use crate::keys::PublicKey;
use crate::read::ReadError;
use crate::state::StateDigest;
use crate::store::{read_u64, Store};
use crate::Hash;

/// Progress of a long verification.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// `"checkpoints"`, `"audit"`, `"heads"` or `"state"` (the live data).
    pub chain: &'static str,
    /// Records read so far.
    pub done: u64,
    /// Records in the chain.
    pub total: u64,
}

/// One thing `verify` found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A checkpoint record.
    Checkpoint {
        /// Its sequence.
        seq: u64,
        /// What is wrong.
        problem: String,
    },
    /// An audit record.
    Audit {
        /// Its sequence.
        seq: u64,
        /// What is wrong.
        problem: String,
    },
    /// A signed head.
    Head {
        /// Its group sequence.
        group: u64,
        /// What is wrong.
        problem: String,
    },
    /// The tips recorded in `meta`.
    Meta {
        /// What is wrong.
        problem: String,
    },
    /// The live data: it does not match the state digest of the last signed head.
    State {
        /// What is wrong, naming the keys that differ from the checkpoint chain.
        problem: String,
        /// Those keys, altered first, then added, then missing.
        diff: crate::state::StateDiff,
    },
    /// The `undone` index (unsigned, derived) disagrees with the signed rollback records:
    /// the first entry that does.
    UndoneIndex {
        /// The commit seq of the entry.
        seq: u64,
        /// What is wrong.
        problem: String,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Checkpoint { seq, problem } => {
                write!(f, "checkpoint chain, record {seq}: {problem}")
            }
            Self::Audit { seq, problem } => write!(f, "audit chain, record {seq}: {problem}"),
            Self::Head { group, problem } => write!(f, "signed head, group {group}: {problem}"),
            Self::Meta { problem } => write!(f, "ledger tips: {problem}"),
            Self::State { problem, .. } => write!(f, "live state: {problem}"),
            Self::UndoneIndex { seq, problem } => {
                write!(f, "undone index, commit {seq}: {problem}")
            }
        }
    }
}

/// What `verify` checked and found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Checkpoint records stored in the chain: counted alike whether the walk met a record
    /// that does not decode or a broken link (the failures say where).
    pub checkpoints: u64,
    /// Audit records stored in the chain, counted the same way.
    pub audit: u64,
    /// Signed heads checked.
    pub heads: u64,
    /// Key rotations followed.
    pub rotations: u64,
    /// Promotions followed (heads of kind `0x03`, each opening an epoch).
    pub promotions: u64,
    /// Entries of the `data` database checked against the live-state digest of the last
    /// head; `None` when that head predates the digest (version 1) or the chains failed.
    pub state_entries: Option<u64>,
    /// Problems, the first bad record of each chain first.
    pub failures: Vec<Failure>,
}

impl VerifyReport {
    /// Whether everything holds.
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Chain {
    Checkpoints,
    Audit,
}

impl Chain {
    fn name(self) -> &'static str {
        match self {
            Self::Checkpoints => "checkpoints",
            Self::Audit => "audit",
        }
    }
    fn failure(self, seq: u64, problem: String) -> Failure {
        match self {
            Self::Checkpoints => Failure::Checkpoint { seq, problem },
            Self::Audit => Failure::Audit { seq, problem },
        }
    }
    fn decode(self, bytes: &[u8]) -> Result<(u64, Hash), DecodeError> {
        match self {
            Self::Checkpoints => {
                crate::record::Record::decode(bytes).map(|r| (r.seq(), r.prev_hash()))
            }
            Self::Audit => AuditRecord::decode(bytes).map(|a| (a.seq, a.prev_hash)),
        }
    }
}

struct Link {
    prev: Hash,
    own: Hash,
}

/// Result of reading one chain: its intact prefix as links (index `i` is seq `i + 1`).
struct Walk {
    links: Vec<Link>,
    structural: Option<Failure>,
    /// Records stored in the database, walked or not.
    stored: u64,
}

fn walk(
    rtxn: &RoTxn<'_, WithoutTls>,
    db: Database<Bytes, Bytes>,
    chain: Chain,
    progress: &mut dyn FnMut(Progress),
) -> Result<Walk, ReadError> {
    let total = db.len(rtxn)?;
    let mut links = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut expected: u64 = 1;
    let mut structural = None;
    for item in db.iter(rtxn)? {
        let (k, v) = item?;
        let Some(key_seq) = read_u64(k) else {
            structural =
                Some(chain.failure(expected, format!("stored under a malformed key {}", hex(k))));
            break;
        };
        if key_seq != expected {
            structural = Some(chain.failure(
                expected,
                format!("missing (the next stored record is {key_seq}): records were deleted"),
            ));
            break;
        }
        let (seq, prev) = match chain.decode(v) {
            Ok(x) => x,
            Err(e) => {
                structural = Some(chain.failure(key_seq, format!("does not decode: {e}")));
                break;
            }
        };
        if seq != key_seq {
            structural = Some(chain.failure(
                key_seq,
                format!("stored under {key_seq} but its content says {seq}: records were moved or reordered"),
            ));
            break;
        }
        links.push(Link {
            prev,
            own: chain_hash(&prev, v),
        });
        if expected.is_multiple_of(4096) {
            progress(Progress {
                chain: chain.name(),
                done: expected,
                total,
            });
        }
        expected = expected.saturating_add(1);
    }
    progress(Progress {
        chain: chain.name(),
        done: links.len() as u64,
        total,
    });
    Ok(Walk {
        links,
        structural,
        stored: total,
    })
}

/// The first broken link in `links`, and which record it blames.
fn first_bad_link(links: &[Link], signed: &HashMap<u64, Hash>, chain: Chain) -> Option<Failure> {
    let zero = [0u8; 32];
    for (i, link) in links.iter().enumerate() {
        let seq = i as u64 + 1;
        let expected_prev = if i == 0 { &zero } else { &links[i - 1].own };
        if &link.prev == expected_prev {
            continue;
        }
        if i == 0 {
            return Some(chain.failure(
                1,
                "altered: its link to the previous record is not the genesis value".into(),
            ));
        }
        let next_agrees = match links.get(i + 1) {
            Some(next) => next.prev == link.own,
            None => signed.get(&seq) == Some(&link.own),
        };
        return Some(if next_agrees {
            chain.failure(
                seq - 1,
                format!("altered: its hash no longer matches the link stored in record {seq}"),
            )
        } else {
            chain.failure(
                seq,
                format!("altered: its link does not match record {}", seq - 1),
            )
        });
    }
    None
}

/// Checks a promotion head (kind `0x03`) against the head before it (`prev`, stored as
/// `prev_bytes`): it opens exactly the next epoch, names that head by group and hash, is
/// signed by a key of `trusted` that is neither the key in force nor a retired one, and
/// its signature holds. Returns what is wrong.
pub(crate) fn check_promotion(
    head: &SignedHead,
    prev: Option<&SignedHead>,
    prev_bytes: &[u8],
    trusted: &[PublicKey],
    retired: &[PublicKey],
) -> Result<(), String> {
    let Some(p) = &head.promotion else {
        return Ok(());
    };
    let Some(prev) = prev else {
        return Err(
            "a promotion head cannot open a ledger (there is nothing to promote from)".into(),
        );
    };
    if Some(head.epoch()) != prev.epoch().checked_add(1) {
        return Err(format!(
            "promotion to epoch {} after a head of epoch {}: a promotion raises the epoch by exactly one",
            head.epoch(),
            prev.epoch()
        ));
    }
    let prev_hash = crate::checkpoint::sha256(prev_bytes);
    if p.from_group != prev.group || p.from_head != prev_hash {
        return Err(format!(
            "promotes from group {} (head {}), but the head before it is group {} (head {})",
            p.from_group,
            hex(&p.from_head),
            prev.group,
            hex(&prev_hash)
        ));
    }
    if head.public_key == prev.public_key || retired.contains(&head.public_key) {
        return Err(format!(
            "promotion hands signing to key {}, which signed before it: a promoted node signs with its own key",
            hex(&head.public_key)
        ));
    }
    if !trusted.contains(&head.public_key) {
        return Err(format!(
            "promotion signed by untrusted key {}",
            hex(&head.public_key)
        ));
    }
    if !head.signature_valid() {
        return Err("signature does not verify".into());
    }
    Ok(())
}

/// The keys that signed promotion heads in `store`, in order: what `verify` without a
/// pinned key trusts besides the ledger's own identity (integrity, not authenticity; an
/// operator pins them with repeated `--public-key`). Heads that do not decode are skipped
/// here (`verify` names them).
pub fn promotion_keys(store: &Store) -> Result<Vec<PublicKey>, ReadError> {
    let rtxn = store.read_txn()?;
    let mut keys = Vec::new();
    for item in store.dbs.heads.iter(&rtxn)? {
        let (_, v) = item?;
        if let Ok(h) = SignedHead::decode(v) {
            if h.promotion.is_some() && !keys.contains(&h.public_key) {
                keys.push(h.public_key);
            }
        }
    }
    Ok(keys)
}

/// Verifies both chains and all signed heads of `store`. Heads must be signed by one of
/// `trusted` (the ledger's first key, normally) until a key-rotation head, which must
/// itself verify under the key then in force; every head after it must be signed by the
/// key it names, and by no other (a retired key, even a trusted one, is refused). A
/// rotation to the key itself or back to a retired key is refused too: it would revive a
/// key the appliance gave up (a genuine rotation always generates a fresh key).
/// A promotion head (kind `0x03`, a standby promoted by a co-signed admin command) may
/// raise the epoch by exactly one and hand signing to the promoted node's key, which must
/// be one of `trusted`; the key in force before it retires. Any other change of epoch is
/// refused.
/// `progress` is called every few thousand records.
pub fn verify(
    store: &Store,
    trusted: &[PublicKey],
    progress: &mut dyn FnMut(Progress),
) -> Result<VerifyReport, ReadError> {
    let mut report = VerifyReport::default();
    // One snapshot for everything: a live ledger keeps committing while this runs.
    let rtxn = store.read_txn()?;
    let cp = walk(&rtxn, store.dbs.checkpoints, Chain::Checkpoints, progress)?;
    let au = walk(&rtxn, store.dbs.audit, Chain::Audit, progress)?;
    report.checkpoints = cp.stored;
    report.audit = au.stored;

    // Heads: decode, check signature and key, collect what each signs.
    let total = store.dbs.heads.len(&rtxn)?;
    let mut head_failure: Option<Failure> = None;
    let mut signed_cp: HashMap<u64, Hash> = HashMap::new();
    let mut signed_au: HashMap<u64, Hash> = HashMap::new();
    let mut last: Option<SignedHead> = None;
    // The stored bytes of `last`: a promotion head names them by hash.
    let mut last_bytes: Vec<u8> = Vec::new();
    let mut promotions: u64 = 0;
    let mut expected_group: u64 = 1;
    // The key handed over to by the last rotation head; `None`: any of `trusted`.
    let mut rotated_to: Option<PublicKey> = None;
    let mut rotations: u64 = 0;
    // Keys that have handed signing over: none may sign again, nor be handed back to.
    let mut retired: Vec<PublicKey> = Vec::new();
    for item in store.dbs.heads.iter(&rtxn)? {
        let (k, v) = item?;
        let fail = |group: u64, problem: String| Some(Failure::Head { group, problem });
        let Some(group) = read_u64(k) else {
            head_failure = fail(
                expected_group,
                format!("stored under a malformed key {}", hex(k)),
            );
            break;
        };
        if group != expected_group {
            head_failure = fail(
                expected_group,
                format!("missing (the next stored head is {group})"),
            );
            break;
        }
        let head = match SignedHead::decode(v) {
            Ok(h) => h,
            Err(e) => {
                head_failure = fail(group, format!("does not decode: {e}"));
                break;
            }
        };
        if head.group != group {
            head_failure = fail(
                group,
                format!("stored under {group} but says {}", head.group),
            );
            break;
        }
        if head.promotion.is_some() {
            match check_promotion(&head, last.as_ref(), &last_bytes, trusted, &retired) {
                Ok(()) => {
                    // The key in force until now retires; the promoted node's signs on.
                    if let Some(prev) = &last {
                        retired.push(prev.public_key);
                    }
                    rotated_to = Some(head.public_key);
                    promotions = promotions.saturating_add(1);
                }
                Err(problem) => {
                    head_failure = fail(group, problem);
                    break;
                }
            }
        }
        match rotated_to {
            _ if head.promotion.is_some() => {}
            None if !trusted.contains(&head.public_key) => {
                head_failure = fail(
                    group,
                    format!("signed by untrusted key {}", hex(&head.public_key)),
                );
                break;
            }
            Some(current) if head.public_key != current => {
                head_failure = fail(
                    group,
                    format!(
                        "signed by key {}, but rotation {rotations} handed signing over to {}",
                        hex(&head.public_key),
                        hex(&current)
                    ),
                );
                break;
            }
            _ => {}
        }
        if !head.signature_valid() {
            head_failure = fail(group, "signature does not verify".into());
            break;
        }
        if let Some(next) = head.next_key {
            if next == head.public_key || retired.contains(&next) {
                head_failure = fail(
                    group,
                    format!(
                        "rotation hands signing back to {} key {}",
                        if next == head.public_key {
                            "its own"
                        } else {
                            "the retired"
                        },
                        hex(&next)
                    ),
                );
                break;
            }
            retired.push(head.public_key);
            rotated_to = Some(next);
            rotations = rotations.saturating_add(1);
        }
        if let Some(prev) = &last {
            if head.checkpoints.seq < prev.checkpoints.seq || head.audit.seq < prev.audit.seq {
                head_failure = fail(group, "tips move backwards".into());
                break;
            }
            if head.version() < prev.version() {
                head_failure = fail(
                    group,
                    format!(
                        "version {} after a version-{} head: a head without the live-state digest after one with it",
                        head.version(),
                        prev.version()
                    ),
                );
                break;
            }
            if head.epoch() != prev.epoch() && head.promotion.is_none() {
                // Only a promotion head raises the epoch (checked above, by exactly one):
                // any other change of epoch between heads is refused.
                head_failure = fail(
                    group,
                    format!(
                        "epoch {} after a head of epoch {}: {}",
                        head.epoch(),
                        prev.epoch(),
                        if head.epoch() < prev.epoch() {
                            "the epoch moves backwards"
                        } else {
                            "the epoch is raised without a promotion"
                        }
                    ),
                );
                break;
            }
        }
        if head.checkpoints.seq > 0 {
            signed_cp.insert(head.checkpoints.seq, head.checkpoints.hash);
        }
        if head.audit.seq > 0 {
            signed_au.insert(head.audit.seq, head.audit.hash);
        }
        report.heads = group;
        if group.is_multiple_of(4096) {
            progress(Progress {
                chain: "heads",
                done: group,
                total,
            });
        }
        last = Some(head);
        last_bytes = v.to_vec();
        expected_group = expected_group.saturating_add(1);
    }
    progress(Progress {
        chain: "heads",
        done: report.heads,
        total,
    });

    for (walked, signed, chain) in [
        (&cp, &signed_cp, Chain::Checkpoints),
        (&au, &signed_au, Chain::Audit),
    ] {
        let found = walked
            .structural
            .clone()
            .into_iter()
            .chain(first_bad_link(&walked.links, signed, chain))
            .min_by_key(|f| match f {
                Failure::Checkpoint { seq, .. } | Failure::Audit { seq, .. } => *seq,
                _ => u64::MAX,
            });
        let found = found.or_else(|| {
            // Links hold: every signed hash must match, and the chain must reach the tip
            // the last head signed.
            let mut seqs: Vec<_> = signed.keys().copied().collect();
            seqs.sort_unstable();
            for seq in seqs {
                let Some(link) = usize::try_from(seq - 1)
                    .ok()
                    .and_then(|i| walked.links.get(i))
                else {
                    return Some(chain.failure(
                        walked.links.len() as u64 + 1,
                        format!(
                            "missing: a signed head covers record {seq} but the chain ends at {}",
                            walked.links.len()
                        ),
                    ));
                };
                if signed.get(&seq) != Some(&link.own) {
                    return Some(chain.failure(
                        seq,
                        "altered: its hash does not match the signed head that covers it".into(),
                    ));
                }
            }
            None
        });
        report.failures.extend(found);
    }

    if head_failure.is_none() {
        if let Some(head) = &last {
            if head.checkpoints.seq < report.checkpoints {
                head_failure = Some(Failure::Head {
                    group: head.group,
                    problem: format!(
                        "checkpoints {}..={} are not covered by any signed head",
                        head.checkpoints.seq + 1,
                        report.checkpoints
                    ),
                });
            } else if head.audit.seq < report.audit {
                head_failure = Some(Failure::Head {
                    group: head.group,
                    problem: format!(
                        "audit records {}..={} are not covered by any signed head",
                        head.audit.seq + 1,
                        report.audit
                    ),
                });
            }
        } else {
            head_failure = Some(Failure::Head {
                group: 1,
                problem: "no signed head at all".into(),
            });
        }
    }
    report.failures.extend(head_failure);
    report.rotations = rotations;
    report.promotions = promotions;

    if report.failures.is_empty() {
        if let (Ok(meta), Some(head)) = (store.meta_in(&rtxn, false), &last) {
            if meta.checkpoints != head.checkpoints
                || meta.audit != head.audit
                || meta.group != head.group
            {
                report.failures.push(Failure::Meta {
                    problem: format!(
                        "recorded tips (group {}) differ from the last signed head (group {})",
                        meta.group, head.group
                    ),
                });
            } else if meta.state.as_ref().map(StateDigest::hash) != head.state {
                report.failures.push(Failure::Meta {
                    problem: format!(
                        "meta/state ({}) is not the live-state digest the last signed head (group {}) commits to",
                        meta.state
                            .as_ref()
                            .map_or_else(|| "absent".to_string(), |d| hex(&d.hash())),
                        head.group
                    ),
                });
            } else if meta.signing_key != rotated_to.unwrap_or(meta.public_key) {
                report.failures.push(Failure::Meta {
                    problem: format!(
                        "recorded signing key {} is not the one the signed heads hand over to",
                        hex(&meta.signing_key)
                    ),
                });
            }
        }
    }
    if let Some(signed) = last.as_ref().and_then(|h| h.state) {
        progress(Progress {
            chain: "state",
            done: 0,
            total: store.dbs.data.len(&rtxn)?,
        });
        let found = StateDigest::compute(&rtxn, store.dbs.data)?;
        progress(Progress {
            chain: "state",
            done: found.entries(),
            total: found.entries(),
        });
        if found.hash() == signed {
            report.state_entries = Some(found.entries());
        } else {
            let diff =
                crate::state::diff_against_chain(&rtxn, store.dbs.checkpoints, store.dbs.data)?;
            report.failures.push(Failure::State {
                problem: format!(
                    "the data database ({} entries) does not match the digest signed in the last head; {}",
                    found.entries(),
                    diff.describe()
                ),
                diff,
            });
        }
    }
    // The `undone` index steers rollbacks but is not signed: rebuilt from the signed
    // rollback records, it must match the stored copy entry for entry.
    if let Some(db) = store.dbs.undone {
        let (expected, _) = store.undone_expected_in(&rtxn)?;
        let stored = crate::undone::read_undone(db, &rtxn)?;
        if let Some((first, count)) = crate::undone::first_difference(&stored, &expected) {
            report.failures.push(Failure::UndoneIndex {
                seq: first.seq,
                problem: format!("the index {first} ({count} entries differ)"),
            });
        }
    }
    Ok(report)
}
