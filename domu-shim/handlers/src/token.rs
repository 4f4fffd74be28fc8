//! `token`: random bytes from the transaction's RNG, as lowercase hex.
//!
//! ```text
//! token  {"bytes":16}  ->  {"token":"<32 lowercase hex digits>"}     bytes: 1..=64
//! ```
//!
//! The RNG is seeded by the agent per transaction (`Start`'s entropy seed, stored in the
//! checkpoint), so two transactions get different tokens — also in two domains cloned from
//! one template — and a replay of the same transaction gets the same one. It reads and
//! writes no data.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;

use mayfly_sdk::{Ctx, HandlerError};
use serde::{Deserialize, Serialize};

use crate::payload::{from_json, to_json};

/// The longest token, in bytes.
pub const MAX_TOKEN_BYTES: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    bytes: usize,
}

#[derive(Serialize)]
struct TokenResponse {
    token: String,
}

/// The `token` handler.
pub fn token(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let req: TokenRequest = from_json(payload)?;
    if req.bytes == 0 || req.bytes > MAX_TOKEN_BYTES {
        return Err(HandlerError::bad_request(alloc::format!(
            "bytes {} is not in 1..={MAX_TOKEN_BYTES}",
            req.bytes
        )));
    }
    let mut raw = vec![0u8; req.bytes];
    ctx.rng().fill_bytes(&mut raw);
    let mut token = String::with_capacity(raw.len() * 2);
    for b in &raw {
        let _ = write!(token, "{b:02x}");
    }
    to_json(&TokenResponse { token })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_sdk::MemDb;

    fn run(seed: [u8; 32], payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
        let mut db = MemDb::new();
        let mut ctx = Ctx::new(&mut db, [0; 16], seed);
        token(&mut ctx, payload)
    }

    #[test]
    fn the_token_follows_the_seed() {
        let a = run([1; 32], br#"{"bytes":16}"#).unwrap();
        let again = run([1; 32], br#"{"bytes":16}"#).unwrap();
        let b = run([2; 32], br#"{"bytes":16}"#).unwrap();
        assert_eq!(a, again, "a replay gets the same token");
        assert_ne!(a, b, "another seed, another token");
        let text = String::from_utf8(a).unwrap();
        let hex = text
            .strip_prefix("{\"token\":\"")
            .and_then(|t| t.strip_suffix("\"}"))
            .unwrap();
        assert_eq!(hex.len(), 32);
        assert!(hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
    }

    #[test]
    fn sizes_outside_the_range_are_bad_requests() {
        for bad in [
            &br#"{"bytes":0}"#[..],
            br#"{"bytes":65}"#,
            br#"{"bytes":-1}"#,
        ] {
            assert!(matches!(
                run([0; 32], bad),
                Err(HandlerError::BadRequest { .. })
            ));
        }
        assert!(run([0; 32], br#"{"bytes":64}"#).is_ok());
    }
}
