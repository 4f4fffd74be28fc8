//! The live-state digest: a commitment to every entry of the `data` database, updated in
//! O(writes) by the group committer and signed (as a hash) in every version-2 head.
//!
//! It is an **LtHash** (Bellare–Micciancio's lattice multiset hash, with the parameters used
//! in practice): 1,024 lanes of 16 bits. Each data entry maps to an element
//!
//! ```text
//! element(key, stored) = BLAKE3-XOF, derive-key context CONTEXT, over
//!                        u16 BE len(key) || key || u32 BE len(stored) || stored
//!                        first 2,048 bytes, read as 1,024 u16 little-endian lanes
//! ```
//!
//! where `stored` is the entry's whole stored value (`0x01 || u64 version || value`, or the
//! tombstone `0x02 || u64 version`), so key, value and version are all bound. The digest is
//! the lane-wise sum modulo 2^16 of the elements of all entries: a put adds the new entry's
//! element and subtracts the one it replaces, whatever the order of writes. Breaking it
//! (finding a different multiset with the same sum) is a short-vector lattice problem; an
//! additive hash with one 256-bit lane would fall to Wagner's generalized birthday attack.
//! Why BLAKE3: `docs/decisions/0004-live-state-digest.md`.
//!
//! Stored in `meta/state` and hashed into heads:
//!
//! ```text
//! offset size  field
//!      0    4  magic "MFSD"
//!      4    1  version = 1
//!      5    8  entries  u64 BE, entries in `data` (live values and tombstones)
//!     13 2048  lanes    1,024 × u16 little-endian
//! state_hash = SHA-256(these 2,061 bytes)
//! ```
//!
//! A record format: uses [`crate::codec`], the rollback record and data-value encodings
//! and the vocabulary; it reads LMDB databases it is handed, never the store itself.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;

use heed::types::Bytes;
use heed::{Database, RoTxn, WithoutTls};

use crate::codec::{DecodeError, Reader, Writer};
use crate::Hash;

/// Number of 16-bit lanes.
pub const LANES: usize = 1024;
/// Bytes of XOF output per element.
pub const ELEMENT_BYTES: usize = LANES * 2;
/// Magic of the stored digest.
pub const MAGIC: &str = "MFSD";
/// Version of the stored digest.
pub const VERSION: u8 = 1;
/// Length of the stored digest.
pub const ENCODED_LEN: usize = 4 + 1 + 8 + ELEMENT_BYTES;
/// BLAKE3 derive-key context string of an element.
pub const CONTEXT: &str = "Mayfly ledger 2026-12 live-state element v1";

/// The running digest of the `data` database.
#[derive(Clone, PartialEq, Eq)]
pub struct StateDigest {
    lanes: Box<[u16; LANES]>,
    entries: u64,
}

impl Default for StateDigest {
    fn default() -> Self {
        Self {
            lanes: Box::new([0; LANES]),
            entries: 0,
        }
    }
}

impl std::fmt::Debug for StateDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDigest")
            .field("entries", &self.entries)
            .field("hash", &crate::codec::hex(&self.hash()))
            .finish()
    }
}

/// The BLAKE3 hasher in derive-key mode for [`CONTEXT`], built once (the context key is a
/// hash of its own) and cloned per element.
fn keyed() -> &'static blake3::Hasher {
    static HASHER: std::sync::OnceLock<blake3::Hasher> = std::sync::OnceLock::new();
    HASHER.get_or_init(|| blake3::Hasher::new_derive_key(CONTEXT))
}

/// The XOF output of one entry's element (module docs), as bytes.
fn element_bytes(key: &[u8], stored: &[u8], out: &mut [u8; ELEMENT_BYTES]) {
    let mut h = keyed().clone();
    // Keys are at most 256 bytes and values at most 64 KiB + 9: the casts cannot truncate,
    // but saturate anyway rather than wrap.
    h.update(&u16::try_from(key.len()).unwrap_or(u16::MAX).to_be_bytes());
    h.update(key);
    h.update(
        &u32::try_from(stored.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    h.update(stored);
    h.finalize_xof().fill(out);
}

/// The element of one entry, as lanes.
pub fn element(key: &[u8], stored: &[u8]) -> Box<[u16; LANES]> {
    let mut bytes = [0u8; ELEMENT_BYTES];
    element_bytes(key, stored, &mut bytes);
    let mut lanes = Box::new([0u16; LANES]);
    for (lane, pair) in lanes.iter_mut().zip(bytes.chunks_exact(2)) {
        *lane = u16::from_le_bytes([
            pair.first().copied().unwrap_or(0),
            pair.get(1).copied().unwrap_or(0),
        ]);
    }
    lanes
}

/// Lanes of little-endian `bytes` (2 per lane).
fn lanes_of(bytes: &[u8; ELEMENT_BYTES]) -> [u16; LANES] {
    let mut out = [0u16; LANES];
    for (lane, pair) in out.iter_mut().zip(bytes.as_chunks::<2>().0) {
        *lane = u16::from_le_bytes(*pair);
    }
    out
}

impl StateDigest {
    /// Entries counted (live values and tombstones).
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Adds an entry.
    pub fn add(&mut self, key: &[u8], stored: &[u8]) {
        let mut bytes = [0u8; ELEMENT_BYTES];
        element_bytes(key, stored, &mut bytes);
        for (l, x) in self.lanes.iter_mut().zip(lanes_of(&bytes)) {
            *l = l.wrapping_add(x);
        }
        self.entries = self.entries.wrapping_add(1);
    }

    /// Removes an entry (that was added before).
    pub fn remove(&mut self, key: &[u8], stored: &[u8]) {
        let mut bytes = [0u8; ELEMENT_BYTES];
        element_bytes(key, stored, &mut bytes);
        for (l, x) in self.lanes.iter_mut().zip(lanes_of(&bytes)) {
            *l = l.wrapping_sub(x);
        }
        self.entries = self.entries.wrapping_sub(1);
    }

    /// Replaces `old` (if any) by `new` under `key`.
    pub fn replace(&mut self, key: &[u8], old: Option<&[u8]>, new: &[u8]) {
        let Some(old) = old else {
            self.add(key, new);
            return;
        };
        let (mut a, mut b) = ([0u8; ELEMENT_BYTES], [0u8; ELEMENT_BYTES]);
        element_bytes(key, new, &mut a);
        element_bytes(key, old, &mut b);
        for ((l, x), y) in self.lanes.iter_mut().zip(lanes_of(&a)).zip(lanes_of(&b)) {
            *l = l.wrapping_add(x).wrapping_sub(y);
        }
    }

    /// The stored encoding (module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(ENCODED_LEN);
        w.raw(MAGIC.as_bytes());
        w.u8(VERSION);
        w.u64(self.entries);
        for l in self.lanes.iter() {
            w.raw(&l.to_le_bytes());
        }
        w.finish()
    }

    /// Decodes [`StateDigest::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        r.magic(MAGIC)?;
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion {
                record: "state digest",
                found: version,
            });
        }
        let entries = r.u64("entries")?;
        let raw: [u8; ELEMENT_BYTES] = r.array("lanes")?;
        r.finish()?;
        let mut lanes = Box::new([0u16; LANES]);
        for (lane, pair) in lanes.iter_mut().zip(raw.chunks_exact(2)) {
            *lane = u16::from_le_bytes([
                pair.first().copied().unwrap_or(0),
                pair.get(1).copied().unwrap_or(0),
            ]);
        }
        Ok(Self { lanes, entries })
    }

    /// SHA-256 of the encoding: what a head signs.
    pub fn hash(&self) -> Hash {
        hash_encoding(&self.encode())
    }

    /// Computes the digest of every entry of `data` from scratch (a full scan).
    pub fn compute(
        rtxn: &RoTxn<'_, WithoutTls>,
        data: Database<Bytes, Bytes>,
    ) -> heed::Result<Self> {
        let mut d = Self::default();
        for item in data.iter(rtxn)? {
            let (k, v) = item?;
            d.add(k, v);
        }
        Ok(d)
    }
}

/// SHA-256 of an encoded digest ([`StateDigest::encode`]).
pub fn hash_encoding(encoded: &[u8]) -> Hash {
    let d = ring::digest::digest(&ring::digest::SHA256, encoded);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// How the `data` database differs from the state the checkpoint chain says it must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateDiff {
    /// Keys whose stored entry (value, version or tombstone) differs.
    pub altered: Vec<Vec<u8>>,
    /// Keys present in `data` that no checkpoint wrote.
    pub added: Vec<Vec<u8>>,
    /// Keys a checkpoint wrote that `data` does not hold.
    pub missing: Vec<Vec<u8>>,
}

/// Most keys of each kind a diff names.
pub const MAX_NAMED: usize = 32;

impl StateDiff {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.altered.is_empty() && self.added.is_empty() && self.missing.is_empty()
    }

    /// One line naming the keys (printable keys as text, others as hex), at most
    /// [`MAX_NAMED`] of each kind.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (what, keys) in [
            ("altered", &self.altered),
            ("added", &self.added),
            ("missing", &self.missing),
        ] {
            if keys.is_empty() {
                continue;
            }
            let mut names: Vec<String> = keys.iter().take(MAX_NAMED).map(|k| show_key(k)).collect();
            if keys.len() > MAX_NAMED {
                names.push(format!("... ({} in all)", keys.len()));
            }
            parts.push(format!("{what}: {}", names.join(", ")));
        }
        if parts.is_empty() {
            "no key differs from the checkpoint chain (the stored digest itself was altered)".into()
        } else {
            parts.join("; ")
        }
    }
}

/// A key for a message: as text when it is printable ASCII, else `0x` and hex.
pub fn show_key(key: &[u8]) -> String {
    if key.iter().all(|b| (0x21..0x7f).contains(b) && *b != b'"') {
        String::from_utf8_lossy(key).into_owned()
    } else {
        format!("0x{}", crate::codec::hex(key))
    }
}

/// Folds the checkpoint chain's after-images (commits and rollback restorations, in
/// order) into the state `data` must hold, and compares it with `data`. Records that do
/// not decode are skipped (`verify` reports them as chain failures).
pub fn diff_against_chain(
    rtxn: &RoTxn<'_, WithoutTls>,
    checkpoints: Database<Bytes, Bytes>,
    data: Database<Bytes, Bytes>,
) -> heed::Result<StateDiff> {
    let mut expected: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for item in checkpoints.iter(rtxn)? {
        let (_, v) = item?;
        let Ok(record) = crate::record::Record::decode(v) else {
            continue;
        };
        let seq = record.seq();
        for w in record.writes() {
            expected.insert(
                w.key.clone(),
                crate::value::encode_value(seq, w.after.as_deref()),
            );
        }
    }
    let mut diff = StateDiff::default();
    for item in data.iter(rtxn)? {
        let (k, v) = item?;
        match expected.remove(k) {
            Some(e) if e == v => {}
            Some(_) => diff.altered.push(k.to_vec()),
            None => diff.added.push(k.to_vec()),
        }
    }
    diff.missing = expected.into_keys().collect();
    Ok(diff)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn order_independent_and_removal_undoes_addition() {
        let mut a = StateDigest::default();
        a.add(b"k1", b"\x01\0\0\0\0\0\0\0\x01v1");
        a.add(b"k2", b"\x01\0\0\0\0\0\0\0\x02v2");
        let mut b = StateDigest::default();
        b.add(b"k2", b"\x01\0\0\0\0\0\0\0\x02v2");
        b.add(b"k1", b"\x01\0\0\0\0\0\0\0\x01v1");
        assert_eq!(a, b);
        assert_eq!(a.hash(), b.hash());
        b.replace(
            b"k1",
            Some(b"\x01\0\0\0\0\0\0\0\x01v1"),
            b"\x01\0\0\0\0\0\0\0\x03v3",
        );
        assert_ne!(a.hash(), b.hash());
        b.replace(
            b"k1",
            Some(b"\x01\0\0\0\0\0\0\0\x03v3"),
            b"\x01\0\0\0\0\0\0\0\x01v1",
        );
        assert_eq!(a, b);
        b.remove(b"k2", b"\x01\0\0\0\0\0\0\0\x02v2");
        b.remove(b"k1", b"\x01\0\0\0\0\0\0\0\x01v1");
        assert_eq!(b, StateDigest::default());
    }

    #[test]
    fn key_and_value_boundary_is_bound() {
        // The same concatenated bytes split differently are different entries.
        let mut a = StateDigest::default();
        a.add(b"ab", b"c");
        let mut b = StateDigest::default();
        b.add(b"a", b"bc");
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn encoding_round_trips_and_rejects_damage() {
        let mut a = StateDigest::default();
        a.add(b"k", b"v");
        let enc = a.encode();
        assert_eq!(enc.len(), ENCODED_LEN);
        assert_eq!(StateDigest::decode(&enc).unwrap(), a);
        assert!(StateDigest::decode(&enc[..enc.len() - 1]).is_err());
        let mut bad = enc.clone();
        bad[4] = 9;
        assert!(StateDigest::decode(&bad).is_err());
        let mut more = enc;
        more.push(0);
        assert!(StateDigest::decode(&more).is_err());
    }
}
