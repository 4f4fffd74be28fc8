//! The name rule, once: what a handler, an audit event, an exporter cursor or an admin
//! command may be called, shared by the guest (SDK registry, the wire's `Start`), the ledger
//! (checkpoints, audit records, cursors), the policy engine and the admin commands.
//!
//! - A **name** is 1..=max bytes of `[a-z0-9_.-]`; a handler name at most
//!   [`MAX_HANDLER_NAME`] (64) bytes. It fits an RFC 5424 structured-data value and a log key
//!   as is, and needs no escaping anywhere it is written.
//! - A **word** is a name without dots, `[a-z0-9_-]`: a name that is itself one component of
//!   a dotted name or a key (the policy's handler names, which rule names embed as
//!   `handler.<word>.<kind>`; the example handlers' account and user names inside keys).
//!
//! Xenstore domain names (`mayfly-xen`) follow xenstore's own, wider rule (upper case
//! allowed; they are read from the host's xenstore, not chosen by Mayfly) and are not this.
//!
//! `no_std`, no dependencies: the freestanding Mayfly PV guest links it too.

#![no_std]
#![forbid(unsafe_code)]

/// Longest handler name, in bytes (the wire's `Start`, the ledger's checkpoint field, the
/// SDK's registry).
pub const MAX_HANDLER_NAME: usize = 64;

/// Whether `b` may appear in a name: `[a-z0-9_.-]`.
pub const fn is_name_byte(b: u8) -> bool {
    is_word_byte(b) || b == b'.'
}

/// Whether `b` may appear in a word: `[a-z0-9_-]`.
pub const fn is_word_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-')
}

/// What breaks the rule, first found: emptiness, then length, then the first bad byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No bytes at all.
    Empty,
    /// More than the maximum.
    TooLong {
        /// The length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A byte outside the allowed set.
    Byte {
        /// Where.
        offset: usize,
        /// Which.
        byte: u8,
    },
}

impl core::fmt::Display for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Empty => f.write_str("empty"),
            Self::TooLong { len, max } => write!(f, "{len} bytes, longer than {max}"),
            Self::Byte { offset, byte } => write!(f, "byte {byte:#04x} at offset {offset}"),
        }
    }
}

fn check_with(s: &[u8], max: usize, allowed: fn(u8) -> bool) -> Result<(), Fault> {
    if s.is_empty() {
        return Err(Fault::Empty);
    }
    if s.len() > max {
        return Err(Fault::TooLong { len: s.len(), max });
    }
    match s.iter().position(|&b| !allowed(b)) {
        Some(offset) => Err(Fault::Byte {
            offset,
            byte: s.get(offset).copied().unwrap_or(0),
        }),
        None => Ok(()),
    }
}

/// Checks a name of at most `max` bytes (bytes, so the wire's decoder checks before any
/// UTF-8 validation).
pub fn check_name(s: &[u8], max: usize) -> Result<(), Fault> {
    check_with(s, max, is_name_byte)
}

/// Checks a word (a name without dots) of at most `max` bytes.
pub fn check_word(s: &[u8], max: usize) -> Result<(), Fault> {
    check_with(s, max, is_word_byte)
}

/// Whether `s` is a name of at most `max` bytes.
pub fn is_name(s: &str, max: usize) -> bool {
    check_name(s.as_bytes(), max).is_ok()
}

/// Whether `s` is a word of at most `max` bytes.
pub fn is_word(s: &str, max: usize) -> bool {
    check_word(s.as_bytes(), max).is_ok()
}

/// Whether `s` is a handler name: a name of at most [`MAX_HANDLER_NAME`] bytes.
pub fn is_handler_name(s: &str) -> bool {
    is_name(s, MAX_HANDLER_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercase_digits_underscore_dot_dash() {
        for ok in ["kv", "bank.transfer", "test.spin-2", "a_b", "0", "."] {
            assert!(is_handler_name(ok), "{ok}");
        }
        for bad in ["", "Kv", "a b", "a/b", "é", "a\0", "a:b"] {
            assert!(!is_handler_name(bad), "{bad:?}");
        }
        let longest = [b'a'; MAX_HANDLER_NAME];
        assert_eq!(check_name(&longest, MAX_HANDLER_NAME), Ok(()));
        assert_eq!(
            check_name(&[b'a'; MAX_HANDLER_NAME + 1], MAX_HANDLER_NAME),
            Err(Fault::TooLong { len: 65, max: 64 })
        );
    }

    #[test]
    fn words_are_names_without_dots() {
        assert!(is_word("acct-1_x", 64));
        assert!(!is_word("bank.transfer", 64));
        assert_eq!(
            check_word(b"a.b", 8),
            Err(Fault::Byte {
                offset: 1,
                byte: b'.'
            })
        );
        assert!(!is_word("abc", 2));
    }

    #[test]
    fn the_fault_found_first_is_emptiness_then_length_then_the_first_bad_byte() {
        assert_eq!(check_name(b"", 4), Err(Fault::Empty));
        assert_eq!(
            check_name(b"A-toolong", 4),
            Err(Fault::TooLong { len: 9, max: 4 })
        );
        assert_eq!(
            check_name(b"aB!", 4),
            Err(Fault::Byte {
                offset: 1,
                byte: b'B'
            })
        );
    }

    #[test]
    fn every_byte_is_classified_as_documented() {
        for b in 0..=u8::MAX {
            let word = b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-';
            assert_eq!(is_word_byte(b), word, "{b:#04x}");
            assert_eq!(is_name_byte(b), word || b == b'.', "{b:#04x}");
        }
    }
}
