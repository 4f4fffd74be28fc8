//! The JSON view of the checkpoint chain, written once for its two readers: the client
//! API's `GET /v1/transactions/{id}` ([`checkpoint_summary`]) and the console's
//! `tx.list`/`checkpoint.list`/`tx.show`/`checkpoint.show` ([`record`]). Both start from the
//! same fields of a transaction checkpoint ([`transaction_fields`]); keys and values are
//! what clients have always read (serde_json's maps are sorted, so the bytes do not depend on
//! the order fields are added in). Byte strings are shown as UTF-8, lossily; hashes as hex.

use mayfly_ledger::codec::hex;
use mayfly_ledger::{Checkpoint, Record, WriteEntry};
use serde_json::{json, Map, Value};

/// The fields every view of a transaction checkpoint shows: sequence, handler, client,
/// domain, commit time, the sizes of its read and write sets, and its policy hash.
pub fn transaction_fields(c: &Checkpoint) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("seq".into(), json!(c.seq));
    m.insert("handler".into(), json!(c.handler));
    m.insert("client".into(), json!(c.client));
    m.insert("domain_id".into(), json!(c.domain_id));
    m.insert("commit_ns".into(), json!(c.commit_ns));
    m.insert("reads".into(), json!(c.reads.len()));
    m.insert("writes".into(), json!(c.writes.len()));
    m.insert("policy_hash".into(), json!(hex(&c.policy_hash)));
    m
}

/// The `checkpoint` object of `GET /v1/transactions/{id}`: the common fields, the begin
/// time, the digest of the request (not the request: a client may not be the one that
/// sent it) and the keys written.
pub fn checkpoint_summary(c: &Checkpoint) -> Value {
    let mut m = transaction_fields(c);
    m.insert("begin_ns".into(), json!(c.begin_ns));
    m.insert(
        "request_digest".into(),
        json!(hex(&mayfly_ledger::checkpoint::sha256(&c.request))),
    );
    m.insert(
        "written_keys".into(),
        c.writes
            .iter()
            .map(|w| Value::String(String::from_utf8_lossy(&w.key).into_owned()))
            .collect(),
    );
    Value::Object(m)
}

/// A record of the checkpoint chain as the console lists it (`detail`: as it shows one,
/// with the request, result, read and write sets and the chain link).
pub fn record(r: &Record, detail: bool) -> Value {
    match r {
        Record::Transaction(c) => {
            let mut m = transaction_fields(c);
            m.insert("kind".into(), json!("transaction"));
            m.insert("tx_id".into(), json!(c.tx_id.to_string()));
            if detail {
                m.insert("begin_ns".into(), json!(c.begin_ns));
                m.insert("request".into(), json!(String::from_utf8_lossy(&c.request)));
                m.insert("result".into(), json!(String::from_utf8_lossy(&c.result)));
                m.insert("prev_hash".into(), json!(hex(&c.prev_hash)));
                m.insert(
                    "read_set".into(),
                    c.reads
                        .iter()
                        .map(|r| json!({"key": String::from_utf8_lossy(&r.key), "version": r.version}))
                        .collect(),
                );
                m.insert("write_set".into(), write_set(&c.writes));
            }
            Value::Object(m)
        }
        Record::Rollback(rb) => {
            let mut v = json!({
                "seq": rb.seq,
                "kind": "rollback",
                "tx_id": rb.rollback_id.to_string(),
                "handler": "(rollback)",
                "domain_id": 0,
                "commit_ns": rb.time_ns,
                "reads": 0,
                "writes": rb.writes.len(),
                "policy_hash": hex(&rb.policy_hash),
                "roots": rb.roots,
            });
            if detail {
                v["reason"] = json!(rb.reason);
                v["affected"] = json!(rb.affected);
                v["prev_hash"] = json!(hex(&rb.prev_hash));
                v["write_set"] = write_set(&rb.writes);
            }
            v
        }
    }
}

/// A write set (or what a rollback restores): key, the version it replaced, the before- and
/// after-image (`null`: absent).
pub fn write_set(writes: &[WriteEntry]) -> Value {
    writes
        .iter()
        .map(|w| {
            json!({
                "key": String::from_utf8_lossy(&w.key),
                "before_version": w.before_version,
                "before": w.before.as_deref().map(String::from_utf8_lossy),
                "after": w.after.as_deref().map(String::from_utf8_lossy),
            })
        })
        .collect()
}
