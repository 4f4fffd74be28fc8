//! Canonical binary encoding primitives shared by every record the ledger stores.
//!
//! All integers are big-endian and fixed-width. Variable-length fields are a length prefix
//! (`u8`, `u16` or `u32`, named per field in `docs/formats.md`) followed by exactly that many
//! bytes. An optional field is a presence byte (`0x00` absent, `0x01` present, anything else
//! rejected) followed by the field when present.
//!
//! The [`Reader`] never panics and never reads past its input: every length is checked
//! against both the remaining input and the caller's cap before anything is copied. A record
//! decoder must call [`Reader::finish`] so that trailing bytes are rejected: with that, each
//! value has exactly one encoding.
//!
//! Vocabulary, the bottom of the crate: it uses no other module.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

/// Why bytes could not be decoded as a ledger record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before a field was complete.
    #[error("truncated at byte {at}: {field} needs {need} more bytes")]
    Truncated {
        /// Offset where the field starts.
        at: usize,
        /// Field being read.
        field: &'static str,
        /// Bytes the field needs.
        need: usize,
    },
    /// Bytes remained after the last field.
    #[error("{count} trailing bytes after the record")]
    Trailing {
        /// Number of unread bytes.
        count: usize,
    },
    /// The record does not start with the expected magic.
    #[error("bad magic: expected {expected:?}")]
    BadMagic {
        /// Magic the decoder expected.
        expected: &'static str,
    },
    /// The record's format version is not one this build reads.
    #[error("unsupported {record} format version {found}")]
    UnsupportedVersion {
        /// Record type.
        record: &'static str,
        /// Version found.
        found: u8,
    },
    /// A length or count exceeds its documented cap.
    #[error("{field} is {len}, above the limit of {max}")]
    TooLarge {
        /// Field name.
        field: &'static str,
        /// Length or count found.
        len: usize,
        /// Cap from `docs/formats.md`.
        max: usize,
    },
    /// A field has a value that no encoder produces (bad tag, unsorted list, bad UTF-8, ...).
    #[error("non-canonical {field}: {reason}")]
    NotCanonical {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Appends canonical fields to a buffer. Callers check caps before encoding; the writer
/// itself only saturates length prefixes, which a decoder would then reject.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A writer with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: Vec::with_capacity(cap),
        }
    }
    /// Raw bytes, no prefix.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Big-endian u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Big-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Big-endian u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// `u8` length then bytes.
    pub fn bytes8(&mut self, b: &[u8]) {
        self.u8(u8::try_from(b.len()).unwrap_or(u8::MAX));
        self.raw(b);
    }
    /// `u16` length then bytes.
    pub fn bytes16(&mut self, b: &[u8]) {
        self.u16(u16::try_from(b.len()).unwrap_or(u16::MAX));
        self.raw(b);
    }
    /// `u32` length then bytes.
    pub fn bytes32(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.raw(b);
    }
    /// Presence byte then `u32` length and bytes when present.
    pub fn opt_bytes32(&mut self, b: Option<&[u8]>) {
        match b {
            None => self.u8(0),
            Some(b) => {
                self.u8(1);
                self.bytes32(b);
            }
        }
    }
    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// The encoding.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads canonical fields from an untrusted byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts at the beginning of `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Self { input, pos: 0 }
    }

    /// Current offset.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Takes exactly `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = self.input.get(self.pos..).unwrap_or(&[]);
        match rest.get(..n) {
            Some(bytes) => {
                self.pos = self.pos.saturating_add(n);
                Ok(bytes)
            }
            None => Err(DecodeError::Truncated {
                at: self.pos,
                field,
                need: n.saturating_sub(rest.len()),
            }),
        }
    }

    /// Fixed-size array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// Checks a magic prefix.
    pub fn magic(&mut self, expected: &'static str) -> Result<(), DecodeError> {
        let found = self.take(expected.len(), "magic")?;
        if found == expected.as_bytes() {
            Ok(())
        } else {
            Err(DecodeError::BadMagic { expected })
        }
    }

    /// The common record header: `magic`, a version byte that must be `version`, and a
    /// kind byte that must be `kind`.
    pub fn header(
        &mut self,
        magic: &'static str,
        record: &'static str,
        version: u8,
        kind: u8,
    ) -> Result<(), DecodeError> {
        self.magic(magic)?;
        let found = self.u8("version")?;
        if found != version {
            return Err(DecodeError::UnsupportedVersion { record, found });
        }
        if self.u8("kind")? != kind {
            return Err(DecodeError::NotCanonical {
                field: "kind",
                reason: "unknown record kind",
            });
        }
        Ok(())
    }

    /// A chain sequence number: a `u64` that is never 0.
    pub fn seq(&mut self) -> Result<u64, DecodeError> {
        match self.u64("seq")? {
            0 => Err(DecodeError::NotCanonical {
                field: "seq",
                reason: "sequence 0 is reserved",
            }),
            seq => Ok(seq),
        }
    }

    /// One byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }
    /// Big-endian u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }
    /// Big-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    /// Big-endian u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn capped(
        &mut self,
        len: usize,
        max: usize,
        field: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        if len > max {
            return Err(DecodeError::TooLarge { field, len, max });
        }
        self.take(len, field)
    }

    /// `u8` length then at most `max` bytes.
    pub fn bytes8(&mut self, max: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u8(field)?);
        self.capped(len, max, field)
    }
    /// `u16` length then at most `max` bytes.
    pub fn bytes16(&mut self, max: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16(field)?);
        self.capped(len, max, field)
    }
    /// `u32` length then at most `max` bytes.
    pub fn bytes32(&mut self, max: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.u32(field)?).unwrap_or(usize::MAX);
        self.capped(len, max, field)
    }
    /// Presence byte, then `u32` length and bytes when present.
    pub fn opt_bytes32(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => self.bytes32(max, field).map(Some),
            _ => Err(DecodeError::NotCanonical {
                field,
                reason: "presence byte is neither 0 nor 1",
            }),
        }
    }
    /// A `u8`-prefixed UTF-8 string.
    pub fn str8(&mut self, max: usize, field: &'static str) -> Result<&'a str, DecodeError> {
        let bytes = self.bytes8(max, field)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::NotCanonical {
            field,
            reason: "not UTF-8",
        })
    }
    /// A `u16`-prefixed UTF-8 string.
    pub fn str16(&mut self, max: usize, field: &'static str) -> Result<&'a str, DecodeError> {
        let bytes = self.bytes16(max, field)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::NotCanonical {
            field,
            reason: "not UTF-8",
        })
    }
    /// A count prefix (`u32`) checked against `max` and against the bytes left, given that
    /// each element needs at least `min_elem` bytes; protects allocations from huge counts.
    pub fn count32(
        &mut self,
        max: usize,
        min_elem: usize,
        field: &'static str,
    ) -> Result<usize, DecodeError> {
        let n = usize::try_from(self.u32(field)?).unwrap_or(usize::MAX);
        if n > max {
            return Err(DecodeError::TooLarge { field, len: n, max });
        }
        let left = self.input.len().saturating_sub(self.pos);
        if n.saturating_mul(min_elem) > left {
            return Err(DecodeError::Truncated {
                at: self.pos,
                field,
                need: n.saturating_mul(min_elem).saturating_sub(left),
            });
        }
        Ok(n)
    }

    /// Ends decoding; fails if any byte is left.
    pub fn finish(self) -> Result<(), DecodeError> {
        let count = self.input.len().saturating_sub(self.pos);
        if count == 0 {
            Ok(())
        } else {
            Err(DecodeError::Trailing { count })
        }
    }
}

/// Lower-case hex of bytes; strict decoding (the workspace's one hex codec, `mayfly-hex`).
pub use mayfly_hex::{decode as unhex, encode as hex};

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn reader_rejects_truncation_trailing_and_caps() {
        let mut w = Writer::default();
        w.u32(7);
        w.bytes16(b"abc");
        let buf = w.finish();

        let mut r = Reader::new(&buf);
        assert_eq!(r.u32("n").unwrap(), 7);
        assert!(matches!(
            r.bytes16(2, "s"),
            Err(DecodeError::TooLarge { len: 3, max: 2, .. })
        ));

        let mut r = Reader::new(&buf[..buf.len() - 1]);
        r.u32("n").unwrap();
        assert!(matches!(
            r.bytes16(10, "s"),
            Err(DecodeError::Truncated { need: 1, .. })
        ));

        let mut r = Reader::new(&buf);
        r.u32("n").unwrap();
        assert!(matches!(
            r.finish(),
            Err(DecodeError::Trailing { count: 5 })
        ));
    }

    #[test]
    fn count_is_checked_against_remaining_input() {
        let mut w = Writer::default();
        w.u32(1_000);
        let buf = w.finish();
        let mut r = Reader::new(&buf);
        assert!(matches!(
            r.count32(10_000, 8, "reads"),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn presence_byte_must_be_canonical() {
        let mut r = Reader::new(&[2u8]);
        assert!(matches!(
            r.opt_bytes32(8, "v"),
            Err(DecodeError::NotCanonical { .. })
        ));
    }
}
