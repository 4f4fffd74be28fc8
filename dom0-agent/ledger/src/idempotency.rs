//! Durable idempotency keys (issue 18): a client's key and the commit it produced,
//! written in the same group commit as the transaction, so that they survive a restart and
//! reach a standby with the chain.
//!
//! A transaction committed with a key ([`crate::Tx::set_idempotency_key`]) appends, in its
//! own commit, an audit record `tx.idempotency_key` (fields `client`, `key`, `seq`,
//! `tx_id`): that record is what the chain signs and what a standby replays into its own
//! index. The index itself is the `idempotency` database, derived and unsigned:
//!
//! ```text
//! key                                   value
//! 0x01 || SHA-256(u8 len client ||      u64 commit seq || u64 commit_ns
//!         client || u16 len key || key)
//! 0x02 || u64 commit seq                the 32-byte hash above || u64 commit_ns
//! ```
//!
//! The `0x02` entries order the keys by age, so that retention is enforced in every group
//! that adds a key: beyond [`Retention::max_keys`] keys, or for keys older than
//! [`Retention::max_age_ns`] (by the group's commit time), the oldest are deleted. A key
//! pruned is forgotten: a resend after that runs again. Because the index is unsigned,
//! [`crate::Store::idempotent_commit`] cross-checks the checkpoint it points to (the
//! client it names); a damaged entry can only make a resend run again, never answer with
//! another client's outcome.
//!
//! A table: uses the store, the queries ([`crate::read`]: the checkpoint a key points to)
//! and the checkpoint format.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn, WithoutTls};

use crate::checkpoint::{canonical_client, sha256, Checkpoint};
use crate::read::ReadError;
use crate::store::{names, read_u64, OpenError, Store};
use crate::types::Hash;

/// Name of the audit event that records a key in the chain.
pub const EVENT: &str = "tx.idempotency_key";
/// Longest key, bytes (the client API's limit).
pub const MAX_KEY: usize = 128;
/// Default: most keys kept.
pub const DEFAULT_MAX_KEYS: u64 = 1_000_000;
/// Default: longest a key is kept, ns (7 days).
pub const DEFAULT_MAX_AGE_NS: u64 = 7 * 24 * 3600 * 1_000_000_000;

const TAG_KEY: u8 = 0x01;
const TAG_AGE: u8 = 0x02;

/// How long and how many keys are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most keys kept; the oldest beyond are deleted.
    pub max_keys: u64,
    /// Keys whose commit is older than this (against the time of the group that prunes)
    /// are deleted.
    pub max_age_ns: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_keys: DEFAULT_MAX_KEYS,
            max_age_ns: DEFAULT_MAX_AGE_NS,
        }
    }
}

/// Whether `key` may be used as an idempotency key: 1..=128 bytes with no control
/// characters (it is also an audit field value).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY && !key.chars().any(char::is_control)
}

/// The index hash of (client, key).
pub fn key_hash(client: &str, key: &str) -> Hash {
    let c = client.as_bytes();
    let k = key.as_bytes();
    let mut m = Vec::with_capacity(c.len().saturating_add(k.len()).saturating_add(3));
    m.push(u8::try_from(c.len()).unwrap_or(u8::MAX));
    m.extend_from_slice(c);
    m.extend_from_slice(&u16::try_from(k.len()).unwrap_or(u16::MAX).to_be_bytes());
    m.extend_from_slice(k);
    sha256(&m)
}

fn tagged_hash(hash: &Hash) -> [u8; 33] {
    let mut out = [0u8; 33];
    let (tag, rest) = out.split_at_mut(1);
    tag.copy_from_slice(&[TAG_KEY]);
    rest.copy_from_slice(hash);
    out
}

fn tagged_seq(seq: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    let (tag, rest) = out.split_at_mut(1);
    tag.copy_from_slice(&[TAG_AGE]);
    rest.copy_from_slice(&seq.to_be_bytes());
    out
}

/// The commit seq recorded for `hash`, if any.
pub(crate) fn lookup(
    db: Database<Bytes, Bytes>,
    txn: &RoTxn<'_, WithoutTls>,
    hash: &Hash,
) -> heed::Result<Option<u64>> {
    Ok(db
        .get(txn, &tagged_hash(hash))?
        .and_then(|v| v.get(..8))
        .and_then(read_u64))
}

/// Records `hash` → (`seq`, `commit_ns`).
pub(crate) fn insert(
    db: Database<Bytes, Bytes>,
    wtxn: &mut RwTxn<'_>,
    hash: &Hash,
    seq: u64,
    commit_ns: u64,
) -> heed::Result<()> {
    let mut v = [0u8; 16];
    let (a, b) = v.split_at_mut(8);
    a.copy_from_slice(&seq.to_be_bytes());
    b.copy_from_slice(&commit_ns.to_be_bytes());
    db.put(wtxn, &tagged_hash(hash), &v)?;
    let mut age = [0u8; 40];
    let (h, t) = age.split_at_mut(32);
    h.copy_from_slice(hash);
    t.copy_from_slice(&commit_ns.to_be_bytes());
    db.put(wtxn, &tagged_seq(seq), &age)
}

/// Deletes the oldest keys beyond `keep.max_keys` and those older than `keep.max_age_ns`
/// at `now_ns`. Returns how many were deleted.
pub(crate) fn prune(
    db: Database<Bytes, Bytes>,
    wtxn: &mut RwTxn<'_>,
    now_ns: u64,
    keep: Retention,
) -> heed::Result<u64> {
    // Every key has one entry of each tag.
    let mut count = db.len(wtxn)? / 2;
    let cutoff = now_ns.saturating_sub(keep.max_age_ns);
    let mut doomed: Vec<([u8; 9], Hash)> = Vec::new();
    let start = [TAG_AGE];
    for item in db.prefix_iter(wtxn, &start)? {
        let (k, v) = item?;
        let (Some(seq), Some(hash), Some(ns)) = (
            k.get(1..).and_then(read_u64),
            v.get(..32).and_then(|h| <Hash>::try_from(h).ok()),
            v.get(32..).and_then(read_u64),
        ) else {
            continue;
        };
        if count <= keep.max_keys && ns >= cutoff {
            break;
        }
        doomed.push((tagged_seq(seq), hash));
        count = count.saturating_sub(1);
    }
    let n = u64::try_from(doomed.len()).unwrap_or(u64::MAX);
    for (age_key, hash) in doomed {
        db.delete(wtxn, &age_key)?;
        db.delete(wtxn, &tagged_hash(&hash))?;
    }
    Ok(n)
}

impl Store {
    /// Creates the `idempotency` database of a ledger written before it existed (at a
    /// read-write open). Keys committed before are not indexed: there were none durable.
    pub(crate) fn ensure_idempotency_db(&mut self) -> Result<(), OpenError> {
        if self.dbs.idempotency.is_some() {
            return Ok(());
        }
        let storage = |e| self.storage_err(e);
        let mut wtxn = self.env.write_txn().map_err(storage)?;
        let db = self
            .env
            .create_database::<Bytes, Bytes>(&mut wtxn, Some(names::IDEMPOTENCY))
            .map_err(storage)?;
        wtxn.commit().map_err(storage)?;
        self.dbs.idempotency = Some(db);
        Ok(())
    }

    /// The commit that recorded `client`'s idempotency `key`, if one did and it is still
    /// kept. The index is unsigned: the checkpoint it points to must name the same client
    /// (else `None`, and the request runs again).
    pub fn idempotent_commit(
        &self,
        client: &str,
        key: &str,
    ) -> Result<Option<Checkpoint>, ReadError> {
        let Some(db) = self.dbs.idempotency else {
            return Ok(None);
        };
        let client = canonical_client(client).unwrap_or_default();
        let hash = key_hash(&client, key);
        let rtxn = self.read_txn()?;
        let Some(seq) = lookup(db, &rtxn, &hash)? else {
            return Ok(None);
        };
        drop(rtxn);
        Ok(self
            .checkpoint(seq)?
            .filter(|cp| cp.client.as_deref().unwrap_or("") == client))
    }
}
