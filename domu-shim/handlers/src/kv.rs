//! `kv`: a plain key-value handler over UTF-8 strings.
//!
//! Payload (JSON object, unknown fields refused):
//!
//! ```text
//! {"op":"get",    "key":"k"}                          -> {"key":"k","value":"v"}   (null if absent)
//! {"op":"put",    "key":"k","value":"v"}              -> {"key":"k","ok":true}
//! {"op":"delete", "key":"k"}                          -> {"key":"k","ok":true}
//! {"op":"scan",   "key":"a","end":"b","limit":10}     -> {"entries":[{"key":..,"value":..}],"more":false}
//! ```
//!
//! For `scan`, `key` is the first key (default: from the beginning), `end` the exclusive end
//! (default: none) and `limit` 1..=1024 (default 100). Keys are 1..=256 bytes, values at
//! most 64 KiB. A stored value that is not UTF-8 is refused rather than mangled.
//!
//! `kv` reaches whatever key it is given; what it may touch is the policy engine's business
//! (a deployment grants it a key range, e.g. `kv/`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use mayfly_sdk::limits;
use mayfly_sdk::{Ctx, HandlerError};
use serde::{Deserialize, Serialize};

use crate::payload::{from_json, to_json};

const DEFAULT_SCAN_LIMIT: u32 = 100;

fn default_scan_limit() -> u32 {
    DEFAULT_SCAN_LIMIT
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Get {
        key: String,
    },
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    Scan {
        #[serde(default)]
        key: String,
        #[serde(default)]
        end: Option<String>,
        #[serde(default = "default_scan_limit")]
        limit: u32,
    },
}

#[derive(Debug, Serialize)]
struct Entry {
    key: String,
    value: String,
}

/// The `kv` handler. See the [module docs](self).
pub fn kv(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    match from_json::<Request>(payload)? {
        Request::Get { key } => {
            check_key(&key)?;
            let value = ctx
                .db()
                .get(key.as_bytes())?
                .map(|v| utf8(&key, v))
                .transpose()?;
            to_json(&serde_json::json!({ "key": key, "value": value }))
        }
        Request::Put { key, value } => {
            check_key(&key)?;
            limits::check_value(value.as_bytes()).map_err(bad)?;
            ctx.db().put(key.as_bytes(), value.as_bytes())?;
            to_json(&serde_json::json!({ "key": key, "ok": true }))
        }
        Request::Delete { key } => {
            check_key(&key)?;
            ctx.db().delete(key.as_bytes())?;
            to_json(&serde_json::json!({ "key": key, "ok": true }))
        }
        Request::Scan { key, end, limit } => {
            let end = end.as_deref().map(str::as_bytes);
            limits::check_scan(key.as_bytes(), end, limit).map_err(bad)?;
            let scan = ctx.db().scan(key.as_bytes(), end, limit)?;
            let entries = scan
                .entries
                .into_iter()
                .map(|(k, v)| {
                    let key = String::from_utf8(k)
                        .map_err(|_| HandlerError::rejected("a key in range is not UTF-8"))?;
                    let value = utf8(&key, v)?;
                    Ok(Entry { key, value })
                })
                .collect::<Result<Vec<_>, HandlerError>>()?;
            to_json(&serde_json::json!({ "entries": entries, "more": scan.more }))
        }
    }
}

fn check_key(key: &str) -> Result<(), HandlerError> {
    limits::check_key(key.as_bytes()).map_err(bad)
}

fn bad(e: mayfly_sdk::DbError) -> HandlerError {
    match e {
        mayfly_sdk::DbError::BadRequest { message } => HandlerError::bad_request(message),
        other => other.into(),
    }
}

fn utf8(key: &str, value: Vec<u8>) -> Result<String, HandlerError> {
    String::from_utf8(value)
        .map_err(|_| HandlerError::rejected(format!("the value of {key:?} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_sdk::{DbError, MemDb};
    use serde_json::{json, Value};

    fn call(db: &mut MemDb, payload: Value) -> Result<Value, HandlerError> {
        let mut ctx = Ctx::new(db, [0; 16], [0; 32]);
        let out = kv(&mut ctx, payload.to_string().as_bytes())?;
        Ok(serde_json::from_slice(&out).unwrap())
    }

    #[test]
    fn put_get_delete_round_trip() {
        let mut db = MemDb::new();
        assert_eq!(
            call(&mut db, json!({"op":"get","key":"a"})).unwrap(),
            json!({"key":"a","value":null})
        );
        assert_eq!(
            call(&mut db, json!({"op":"put","key":"a","value":"héllo"})).unwrap(),
            json!({"key":"a","ok":true})
        );
        assert_eq!(db.value(b"a"), Some("héllo".as_bytes()));
        assert_eq!(
            call(&mut db, json!({"op":"get","key":"a"})).unwrap(),
            json!({"key":"a","value":"héllo"})
        );
        call(&mut db, json!({"op":"delete","key":"a"})).unwrap();
        assert_eq!(db.value(b"a"), None);
    }

    #[test]
    fn scan_pages_through_a_range() {
        let mut db = MemDb::from_entries([("k/1", "a"), ("k/2", "b"), ("k/3", "c"), ("z", "z")]);
        let out = call(
            &mut db,
            json!({"op":"scan","key":"k/","end":"k0","limit":2}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"entries":[{"key":"k/1","value":"a"},{"key":"k/2","value":"b"}],"more":true})
        );
        let out = call(&mut db, json!({"op":"scan","key":"k/3","end":"k0"})).unwrap();
        assert_eq!(
            out,
            json!({"entries":[{"key":"k/3","value":"c"}],"more":false})
        );
        let all = call(&mut db, json!({"op":"scan"})).unwrap();
        assert_eq!(all["entries"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn invalid_requests_are_bad_requests() {
        let mut db = MemDb::new();
        for payload in [
            json!({"op":"get"}),
            json!({"op":"get","key":""}),
            json!({"op":"get","key":"x".repeat(257)}),
            json!({"op":"put","key":"a"}),
            json!({"op":"put","key":"a","value":"v","extra":1}),
            json!({"op":"put","key":"a","value":"v".repeat(64 * 1024 + 1)}),
            json!({"op":"scan","limit":0}),
            json!({"op":"scan","limit":1025}),
            json!({"op":"scan","end":""}),
            json!({"op":"frobnicate","key":"a"}),
            json!({"key":"a"}),
        ] {
            let err = call(&mut db, payload.clone()).unwrap_err();
            assert!(
                matches!(err, HandlerError::BadRequest { .. }),
                "{payload}: {err:?}"
            );
        }
        assert_eq!(db.operations(), 0, "nothing reached the database");
    }

    #[test]
    fn non_utf8_values_are_refused_not_mangled() {
        let mut db = MemDb::from_entries([(&b"bin"[..], &b"\xff\x00"[..])]);
        let err = call(&mut db, json!({"op":"get","key":"bin"})).unwrap_err();
        assert!(matches!(err, HandlerError::Rejected { .. }), "{err:?}");
        let err = call(&mut db, json!({"op":"scan"})).unwrap_err();
        assert!(matches!(err, HandlerError::Rejected { .. }), "{err:?}");
    }

    #[test]
    fn database_errors_propagate() {
        let mut db = MemDb::new();
        let denied = DbError::Denied {
            message: "kv may not write secret/".into(),
        };
        db.fail_next(denied.clone());
        let err = call(&mut db, json!({"op":"put","key":"secret/x","value":"1"})).unwrap_err();
        assert_eq!(err, HandlerError::Db(denied));
        assert_eq!(db.value(b"secret/x"), None);
    }
}
