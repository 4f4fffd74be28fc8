//! The example handlers built into the Mayfly template domain.
//!
//! | name           | module    | what it does                                               |
//! |----------------|-----------|------------------------------------------------------------|
//! | `kv`           | [`kv`]    | get / put / delete / scan of UTF-8 keys and values          |
//! | `open_account` | [`bank`]  | creates `acct/<name>` with an initial balance               |
//! | `balance`      | [`bank`]  | reads an account's balance                                  |
//! | `transfer`     | [`bank`]  | moves an amount between two accounts, refusing overdrafts   |
//! | `notes`        | [`notes`] | stores a user's notes — **deliberately vulnerable** (a path |
//! |                |           | traversal in the note id writes any key, e.g. a balance)    |
//! | `token`        | [`token`] | random bytes from the transaction's seeded RNG, as hex      |
//!
//! Payloads and results are JSON. Every handler is deterministic given its payload and the
//! data it reads. A malformed payload aborts with [`HandlerError::BadRequest`]; a request
//! the rules refuse (overdraft, unknown account) aborts with [`HandlerError::Rejected`].
//!
//! `README.md` beside this crate tells a customer how to add a handler.
//!
//! # Features
//!
//! `std` (default) links std and turns on serde's and serde_json's `std`; without it the
//! handlers are `no_std` + `alloc` code for the freestanding Mayfly PV guest kernel — the
//! same source on every backend.

#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod bank;
pub mod kv;
pub mod notes;
mod payload;
pub mod token;

use mayfly_sdk::{Handler, Registry};

/// Every example handler, by name.
pub const HANDLERS: &[(&str, Handler)] = &[
    ("kv", kv::kv),
    ("open_account", bank::open_account),
    ("balance", bank::balance),
    ("transfer", bank::transfer),
    ("notes", notes::notes),
    ("token", token::token),
];

/// A registry holding every example handler ([`HANDLERS`]).
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    for &(name, handler) in HANDLERS {
        // The names are constants checked by this crate's tests: a failure here is a bug in
        // this file, not something a payload or the agent can cause.
        #[allow(clippy::expect_used)]
        registry
            .register(name, handler)
            .expect("example handler names are valid and distinct");
    }
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::check_name;
    use mayfly_sdk::{Ctx, HandlerError, MemDb};
    use serde_json::{json, Value};

    pub(crate) fn call(db: &mut MemDb, name: &str, payload: &Value) -> Result<Value, HandlerError> {
        let handler = registry().get(name).unwrap();
        let mut ctx = Ctx::new(db, [1; 16], [2; 32]);
        let out = handler(&mut ctx, payload.to_string().as_bytes())?;
        Ok(serde_json::from_slice(&out).unwrap())
    }

    #[test]
    fn registry_holds_every_example_handler() {
        let r = registry();
        assert_eq!(
            r.names().collect::<Vec<_>>(),
            [
                "balance",
                "kv",
                "notes",
                "open_account",
                "token",
                "transfer"
            ]
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("account", "alice_01-x").is_ok());
        for bad in ["", "Alice", "a/b", "a.b", "..", &"a".repeat(65)] {
            assert!(check_name("account", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_payloads_are_bad_requests_for_every_handler() {
        let mut db = MemDb::new();
        for &(name, handler) in HANDLERS {
            for payload in [&b""[..], b"{", b"[]", b"\xff\xfe", b"{\"unexpected\":1}"] {
                let mut ctx = Ctx::new(&mut db, [0; 16], [0; 32]);
                let err = handler(&mut ctx, payload).unwrap_err();
                assert!(
                    matches!(err, HandlerError::BadRequest { .. }),
                    "{name} on {payload:?}: {err}"
                );
            }
        }
        assert!(db.data().is_empty());
    }

    /// The attack the `notes` flaw enables, end to end through the handlers: mallory has no
    /// money, stores a "note" over her own balance, then spends it.
    #[test]
    fn notes_exploit_mints_money_that_transfer_then_spends() {
        let mut db = MemDb::new();
        call(
            &mut db,
            "open_account",
            &json!({"name":"alice","balance":10}),
        )
        .unwrap();
        call(
            &mut db,
            "open_account",
            &json!({"name":"mallory","balance":0}),
        )
        .unwrap();
        let err = call(
            &mut db,
            "transfer",
            &json!({"from":"mallory","to":"alice","amount":500}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("insufficient funds"), "{err}");

        let out = call(
            &mut db,
            "notes",
            &json!({"op":"put","user":"mallory","note_id":"../../acct/mallory","text":"1000000"}),
        )
        .unwrap();
        assert_eq!(out["key"], "acct/mallory");
        let out = call(
            &mut db,
            "transfer",
            &json!({"from":"mallory","to":"alice","amount":500}),
        )
        .unwrap();
        assert_eq!(out["from"]["balance"], 999_500);
        assert_eq!(out["to"]["balance"], 510);
    }
}
