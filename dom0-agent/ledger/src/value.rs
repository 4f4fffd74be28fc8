//! Encodings of the values the ledger derives per commit: a `data` entry (live value or
//! tombstone, with the version that wrote it) and a `deps` entry (the commits a
//! transaction read from).
//!
//! Stored data values (`data` database):
//! ```text
//! 0x01 | version u64 BE | value bytes      live value
//! 0x02 | version u64 BE                    tombstone (deleted by `version`)
//! ```
//! Tombstones are kept so that a read of a deleted key records who deleted it.
//!
//! A record format: uses only [`crate::checkpoint`] (the read entries of `deps`).

use crate::checkpoint::ReadEntry;

/// Tag of a live value.
pub const TAG_LIVE: u8 = 0x01;
/// Tag of a tombstone.
pub const TAG_TOMBSTONE: u8 = 0x02;

/// A stored data value, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored<'a> {
    /// Sequence of the checkpoint that wrote it.
    pub version: u64,
    /// The value; `None` for a tombstone.
    pub value: Option<&'a [u8]>,
}

/// Decodes a stored data value; `None` if it is malformed.
pub fn decode_value(bytes: &[u8]) -> Option<Stored<'_>> {
    let (&tag, rest) = bytes.split_first()?;
    let version = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let body = rest.get(8..)?;
    match tag {
        TAG_LIVE => Some(Stored {
            version,
            value: Some(body),
        }),
        TAG_TOMBSTONE if body.is_empty() => Some(Stored {
            version,
            value: None,
        }),
        _ => None,
    }
}

/// Encodes a data value (`None`: tombstone).
pub fn encode_value(version: u64, value: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + value.map_or(0, <[u8]>::len));
    out.push(if value.is_some() {
        TAG_LIVE
    } else {
        TAG_TOMBSTONE
    });
    out.extend_from_slice(&version.to_be_bytes());
    if let Some(v) = value {
        out.extend_from_slice(v);
    }
    out
}

/// Value of the `deps` database: the distinct non-zero versions a transaction read, i.e.
/// the commits it depends on, as ascending `u64 BE`.
pub fn encode_deps(reads: &[ReadEntry]) -> Vec<u8> {
    let mut writers: Vec<u64> = reads
        .iter()
        .map(|r| r.version)
        .filter(|v| *v != 0)
        .collect();
    writers.sort_unstable();
    writers.dedup();
    writers.iter().flat_map(|w| w.to_be_bytes()).collect()
}
