//! [`Handler`]: the signature of a transaction handler, and [`HandlerError`].

use alloc::string::String;
use alloc::vec::Vec;

use crate::ctx::Ctx;
use crate::db::DbError;

/// A transaction handler: gets the context and the client's payload; returns the result
/// for the client (the transaction commits) or an error (it aborts, and the error's text is
/// the abort reason).
///
/// A handler must be deterministic given its payload, the data it reads and
/// [`Ctx::rng`]; it must not panic on any payload (a panic aborts the transaction at best,
/// and kills the domain in release builds).
pub type Handler = fn(&mut Ctx<'_>, &[u8]) -> Result<Vec<u8>, HandlerError>;

/// Why a handler gave up. Its `Display` text becomes the abort reason the client and the
/// audit log see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The payload is malformed or invalid.
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// The request is well formed but refused by the handler's rules (e.g. insufficient
    /// funds, unknown account).
    #[error("rejected: {reason}")]
    Rejected {
        /// Why.
        reason: String,
    },
    /// A database operation failed.
    #[error("database: {0}")]
    Db(#[from] DbError),
}

impl HandlerError {
    /// A [`HandlerError::BadRequest`].
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::BadRequest {
            reason: reason.into(),
        }
    }

    /// A [`HandlerError::Rejected`].
    pub fn rejected(reason: impl Into<String>) -> Self {
        Self::Rejected {
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_abort_reason() {
        assert_eq!(
            HandlerError::rejected("insufficient funds").to_string(),
            "rejected: insufficient funds"
        );
        assert_eq!(
            HandlerError::bad_request("amount must be > 0").to_string(),
            "bad request: amount must be > 0"
        );
        let db: HandlerError = DbError::Denied {
            message: "honeytoken".into(),
        }
        .into();
        assert_eq!(db.to_string(), "database: denied by policy: honeytoken");
    }
}
