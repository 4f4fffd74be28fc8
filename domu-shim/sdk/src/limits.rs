//! The size caps the agent enforces on every database operation, checked locally too so that
//! a handler gets a clear [`DbError::BadRequest`] instead of a transport failure.
//!
//! They equal the wire caps of `mayfly-ring` (`docs/formats.md` §2.3); the guest runtime
//! has a test that they agree.

use alloc::format;
use alloc::string::String;

use crate::db::DbError;

/// Longest key, in bytes (keys are at least 1 byte).
pub const MAX_KEY_LEN: usize = 256;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Largest `limit` of one scan (and most entries in one answer).
pub const MAX_SCAN_LIMIT: u32 = 1024;
/// Longest log line, in bytes.
pub const MAX_LOG_LINE_LEN: usize = 1024;
/// Longest transaction payload, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// Longest handler result, in bytes (a larger result aborts the transaction).
pub const MAX_RESULT_LEN: usize = 64 * 1024;
/// Longest abort reason, in bytes.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest handler name, in bytes.
pub const MAX_HANDLER_NAME_LEN: usize = mayfly_names::MAX_HANDLER_NAME;

/// Checks a key: 1..=[`MAX_KEY_LEN`] bytes.
pub fn check_key(key: &[u8]) -> Result<(), DbError> {
    if key.is_empty() {
        return Err(DbError::BadRequest {
            message: "empty key".into(),
        });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(DbError::BadRequest {
            message: format!("key of {} bytes exceeds {MAX_KEY_LEN}", key.len()),
        });
    }
    Ok(())
}

/// Checks a value: at most [`MAX_VALUE_LEN`] bytes.
pub fn check_value(value: &[u8]) -> Result<(), DbError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(DbError::BadRequest {
            message: format!("value of {} bytes exceeds {MAX_VALUE_LEN}", value.len()),
        });
    }
    Ok(())
}

/// Checks a scan: `start` at most [`MAX_KEY_LEN`] bytes (may be empty), `end` a valid key,
/// `limit` in 1..=[`MAX_SCAN_LIMIT`].
pub fn check_scan(start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<(), DbError> {
    if start.len() > MAX_KEY_LEN {
        return Err(DbError::BadRequest {
            message: format!("scan start of {} bytes exceeds {MAX_KEY_LEN}", start.len()),
        });
    }
    if let Some(end) = end {
        check_key(end)?;
    }
    if limit == 0 || limit > MAX_SCAN_LIMIT {
        return Err(DbError::BadRequest {
            message: format!("scan limit {limit} is not in 1..={MAX_SCAN_LIMIT}"),
        });
    }
    Ok(())
}

/// Makes `text` acceptable as a wire text field: every control character (Unicode `Cc`,
/// including newlines) becomes U+FFFD, and the result is cut to at most `max_len` bytes at a
/// character boundary.
pub fn sanitize_text(text: &str, max_len: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_len));
    for c in text.chars() {
        let c = if c.is_control() {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        };
        if out.len().saturating_add(c.len_utf8()) > max_len {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_values_and_scans_are_bounded() {
        assert!(check_key(b"").is_err());
        assert!(check_key(b"k").is_ok());
        assert!(check_key(&[b'k'; MAX_KEY_LEN]).is_ok());
        assert!(check_key(&[b'k'; MAX_KEY_LEN + 1]).is_err());
        assert!(check_value(&[]).is_ok());
        assert!(check_value(&vec![0; MAX_VALUE_LEN]).is_ok());
        assert!(check_value(&vec![0; MAX_VALUE_LEN + 1]).is_err());
        assert!(check_scan(b"", None, 1).is_ok());
        assert!(check_scan(b"", Some(b"z"), MAX_SCAN_LIMIT).is_ok());
        assert!(check_scan(b"", None, 0).is_err());
        assert!(check_scan(b"", None, MAX_SCAN_LIMIT + 1).is_err());
        assert!(check_scan(b"", Some(b""), 1).is_err());
        assert!(check_scan(&[b'k'; MAX_KEY_LEN + 1], None, 1).is_err());
    }

    #[test]
    fn sanitize_replaces_controls_and_cuts_on_char_boundaries() {
        assert_eq!(sanitize_text("a\nb\u{7f}c", 100), "a\u{fffd}b\u{fffd}c");
        // "é" is 2 bytes: cutting at 3 bytes keeps "aé", at 2 bytes only "a".
        assert_eq!(sanitize_text("aéb", 3), "aé");
        assert_eq!(sanitize_text("aéb", 2), "a");
        assert_eq!(sanitize_text("", 0), "");
        let long = "x".repeat(5000);
        assert_eq!(
            sanitize_text(&long, MAX_LOG_LINE_LEN).len(),
            MAX_LOG_LINE_LEN
        );
        assert!(sanitize_text("\u{0}\u{1b}[31m", 100)
            .chars()
            .all(|c| !c.is_control()));
    }
}
