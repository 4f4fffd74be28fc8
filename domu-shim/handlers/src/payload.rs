//! What every handler of this crate shares: its JSON payload in and result out, and the
//! name rule for the names its payloads carry. A leaf: the handler modules use it.

use alloc::format;
use alloc::vec::Vec;

use mayfly_sdk::HandlerError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes a JSON payload.
pub(crate) fn from_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, HandlerError> {
    serde_json::from_slice(payload)
        .map_err(|e| HandlerError::bad_request(format!("invalid JSON payload: {e}")))
}

/// Encodes a JSON result.
pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(value)
        .map_err(|e| HandlerError::rejected(format!("cannot encode the result: {e}")))
}

/// Checks a name used inside keys (account, user): 1..=64 bytes of `[a-z0-9_-]`.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), HandlerError> {
    if mayfly_names::is_word(name, 64) {
        Ok(())
    } else {
        Err(HandlerError::bad_request(format!(
            "{what} name {name:?} is not 1..=64 characters of [a-z0-9_-]"
        )))
    }
}
