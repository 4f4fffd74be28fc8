//! Hex, once: how hashes, keys, ids and signatures are written in logs, JSON answers, key
//! files, test vectors and admin commands.
//!
//! Encoding is lower case. Decoding is **strict**: an even number of hex digits (either
//! case) and nothing else — no surrounding whitespace, no `0x`, no separators. A caller
//! reading a file whose format allows whitespace trims it itself, where the format says so.

#![forbid(unsafe_code)]

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        for nibble in [b >> 4, b & 0x0f] {
            s.push(
                DIGITS
                    .get(usize::from(nibble))
                    .map_or('?', |d| char::from(*d)),
            );
        }
    }
    s
}

/// The bytes of `s`: hex digits of either case, an even number of them, nothing else;
/// `None` otherwise.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|pair| match pair {
            [hi, lo] => Some((digit(*hi)? << 4) | digit(*lo)?),
            _ => None,
        })
        .collect()
}

/// Exactly `N` bytes of hex (`2 * N` digits); `None` for any other length or a non-digit.
pub fn decode_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    decode(s)?.try_into().ok()
}

fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => c.checked_sub(b'0'),
        b'a'..=b'f' => c.checked_sub(b'a' - 10),
        b'A'..=b'F' => c.checked_sub(b'A' - 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_lower_case() {
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x00, 0xab, 0xff, 0x10]), "00abff10");
    }

    #[test]
    fn decodes_either_case_and_nothing_else() {
        assert_eq!(decode("00ABff"), Some(vec![0x00, 0xab, 0xff]));
        assert_eq!(decode(""), Some(vec![]));
        for bad in ["0", "zz", " 00", "00 ", "00\n", "0x00", "0g", "+1", "é0"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn arrays_need_exactly_their_length() {
        assert_eq!(decode_array::<2>("beef"), Some([0xbe, 0xef]));
        assert_eq!(decode_array::<2>("be"), None);
        assert_eq!(decode_array::<2>("beef00"), None);
    }

    proptest::proptest! {
        #[test]
        fn round_trips(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let text = encode(&bytes);
            proptest::prop_assert_eq!(text.len(), bytes.len() * 2);
            proptest::prop_assert_eq!(decode(&text), Some(bytes.clone()));
            proptest::prop_assert_eq!(decode(&text.to_uppercase()), Some(bytes));
        }

        #[test]
        fn never_panics(text in ".{0,64}") {
            let _ = decode(&text);
        }
    }
}
