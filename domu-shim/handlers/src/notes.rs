//! `notes` — **A DELIBERATELY VULNERABLE HANDLER. DO NOT COPY IT.**
//!
//! It exists to demonstrate Mayfly's detection and rollback: a realistic-looking bug in a
//! customer handler, an attacker who exploits it, and an agent that contains the damage
//! (policy capabilities abort the out-of-range write, or the attack is found later and the
//! transaction and everything that read its writes are rolled back).
//!
//! Payload:
//!
//! ```text
//! {"op":"put","user":"alice","note_id":"n1","text":"hi"} -> {"key":"notes/alice/n1","bytes":2}
//! {"op":"get","user":"alice","note_id":"n1"}             -> {"key":"notes/alice/n1","text":"hi"}
//! ```
//!
//! (`op` defaults to `put`.) A note should live under `notes/<user>/<note_id>`.
//!
//! # The flaw
//!
//! [`note_key`] builds the key like a file path and normalises it: empty and `.` segments
//! are dropped and each `..` removes the segment before it. The user name is validated; the
//! note id is not, and **the normalised key is never checked to stay under
//! `notes/<user>/`**. So
//!
//! ```text
//! user "mallory", note_id "../../acct/mallory", text "1000000"
//!   notes/mallory/../../acct/mallory  ->  acct/mallory = "1000000"
//! ```
//!
//! credits the attacker's bank account with a million (the `transfer` handler reads balances
//! from `acct/<name>`), and any other key can be overwritten or read the same way. The fix
//! would be one check: refuse any note id with a `..` or `/` segment, or refuse a key that
//! does not start with `notes/<user>/` after normalisation.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use mayfly_sdk::{Ctx, HandlerError};
use serde::Deserialize;

use crate::payload::{check_name, from_json, to_json};

/// Longest note id accepted, in bytes.
pub const MAX_NOTE_ID_LEN: usize = 128;
/// Longest note text accepted, in bytes.
pub const MAX_TEXT_LEN: usize = 4096;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    #[default]
    Put,
    Get,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default)]
    op: Op,
    user: String,
    note_id: String,
    #[serde(default)]
    text: Option<String>,
}

/// The storage key of note `note_id` of `user`: `notes/<user>/<note_id>`, normalised like a
/// path. **VULNERABLE**: the result is not checked to stay under `notes/<user>/` (see the
/// [module docs](self)).
pub fn note_key(user: &str, note_id: &str) -> String {
    let path = format!("notes/{user}/{note_id}");
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    // BUG (deliberate): no check that `segments` still starts with ["notes", user].
    segments.join("/")
}

/// The `notes` handler. **DELIBERATELY VULNERABLE**: see the [module docs](self).
pub fn notes(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let req: Request = from_json(payload)?;
    check_name("user", &req.user)?;
    if req.note_id.is_empty() || req.note_id.len() > MAX_NOTE_ID_LEN {
        return Err(HandlerError::bad_request(format!(
            "note id must be 1..={MAX_NOTE_ID_LEN} bytes"
        )));
    }
    let key = note_key(&req.user, &req.note_id);
    match req.op {
        Op::Put => {
            let text = req
                .text
                .ok_or_else(|| HandlerError::bad_request("put needs a text"))?;
            if text.len() > MAX_TEXT_LEN {
                return Err(HandlerError::bad_request(format!(
                    "note text exceeds {MAX_TEXT_LEN} bytes"
                )));
            }
            ctx.db().put(key.as_bytes(), text.as_bytes())?;
            to_json(&serde_json::json!({ "key": key, "bytes": text.len() }))
        }
        Op::Get => {
            let text = ctx
                .db()
                .get(key.as_bytes())?
                .map(|v| {
                    String::from_utf8(v).map_err(|_| HandlerError::rejected("note is not UTF-8"))
                })
                .transpose()?;
            to_json(&serde_json::json!({ "key": key, "text": text }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_sdk::MemDb;
    use serde_json::{json, Value};

    fn call(db: &mut MemDb, payload: Value) -> Result<Value, HandlerError> {
        let mut ctx = Ctx::new(db, [0; 16], [0; 32]);
        let out = notes(&mut ctx, payload.to_string().as_bytes())?;
        Ok(serde_json::from_slice(&out).unwrap())
    }

    #[test]
    fn normal_use_stays_under_the_users_prefix() {
        let mut db = MemDb::new();
        let out = call(
            &mut db,
            json!({"op":"put","user":"alice","note_id":"n1","text":"hi"}),
        )
        .unwrap();
        assert_eq!(out, json!({"key":"notes/alice/n1","bytes":2}));
        // `op` defaults to put; nested ids and harmless `.`/`..` inside the id stay in range.
        call(
            &mut db,
            json!({"user":"alice","note_id":"2024/todo","text":"a"}),
        )
        .unwrap();
        call(
            &mut db,
            json!({"user":"alice","note_id":"./x/../y","text":"b"}),
        )
        .unwrap();
        let keys: Vec<_> = db
            .data()
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert_eq!(
            keys,
            ["notes/alice/2024/todo", "notes/alice/n1", "notes/alice/y"]
        );
        assert!(keys.iter().all(|k| k.starts_with("notes/alice/")));
        assert_eq!(
            call(&mut db, json!({"op":"get","user":"alice","note_id":"n1"})).unwrap(),
            json!({"key":"notes/alice/n1","text":"hi"})
        );
        assert_eq!(
            call(&mut db, json!({"op":"get","user":"alice","note_id":"none"})).unwrap(),
            json!({"key":"notes/alice/none","text":null})
        );
    }

    #[test]
    fn the_user_name_is_validated_but_not_the_note_id() {
        let mut db = MemDb::new();
        for payload in [
            json!({"user":"../acct","note_id":"x","text":"1"}),
            json!({"user":"Alice","note_id":"x","text":"1"}),
            json!({"user":"alice","note_id":"","text":"1"}),
            json!({"user":"alice","note_id":"x".repeat(129),"text":"1"}),
            json!({"user":"alice","note_id":"x"}),
            json!({"user":"alice","note_id":"x","text":"t".repeat(4097)}),
        ] {
            let err = call(&mut db, payload.clone()).unwrap_err();
            assert!(
                matches!(err, HandlerError::BadRequest { .. }),
                "{payload}: {err:?}"
            );
        }
        assert!(db.data().is_empty());
    }

    /// The exploit works: this is the handler's purpose.
    #[test]
    fn exploit_writes_a_balance_outside_the_notes_range() {
        assert_eq!(note_key("mallory", "../../acct/mallory"), "acct/mallory");
        let mut db = MemDb::from_entries([("acct/mallory", "0"), ("acct/alice", "100")]);
        let out = call(
            &mut db,
            json!({"op":"put","user":"mallory","note_id":"../../acct/mallory","text":"1000000"}),
        )
        .unwrap();
        assert_eq!(out["key"], "acct/mallory");
        assert_eq!(db.value(b"acct/mallory"), Some(&b"1000000"[..]));
        // ... and corrupts any key: alice's balance becomes text.
        call(
            &mut db,
            json!({"user":"mallory","note_id":"../../../../acct/alice","text":"pwned"}),
        )
        .unwrap();
        assert_eq!(db.value(b"acct/alice"), Some(&b"pwned"[..]));
        // ... and reads outside the range too.
        let out = call(
            &mut db,
            json!({"op":"get","user":"mallory","note_id":"../../acct/mallory"}),
        )
        .unwrap();
        assert_eq!(out["text"], "1000000");
        assert!(db.data().keys().all(|k| !k.starts_with(b"notes/")));
    }

    #[test]
    fn traversal_to_nothing_is_refused_by_the_database() {
        let mut db = MemDb::new();
        assert_eq!(note_key("bob", "../.."), "");
        let err = call(&mut db, json!({"user":"bob","note_id":"../..","text":"x"})).unwrap_err();
        assert!(matches!(err, HandlerError::Db(_)), "{err:?}");
    }
}
