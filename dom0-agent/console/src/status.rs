//! `status`: what the appliance is running and where its chains stand, plus whatever the
//! plugged-in providers report (the SIEM exporters' lag, through [`ExporterStatus`]).

use mayfly_ledger::codec::hex;
use serde_json::{json, Value};

use crate::services::{ExporterStatus, Services};

/// The status document.
pub fn status(services: &Services) -> Value {
    let ledger = &services.ledger;
    let tips = ledger.tips();
    let backend = &services.backend;
    let pool = backend.stats();
    let nonces = ledger.store().admin_nonces().ok();
    let quarantined = backend.quarantined().len();
    json!({
        "backend": backend.name(),
        "pool": {
            "ready": pool.ready,
            "in_use": pool.in_use,
            "created": pool.created,
            "destroyed": pool.destroyed,
            "failed": pool.failed,
        },
        "chains": {
            "checkpoints": {"seq": tips.checkpoints.seq, "hash": hex(&tips.checkpoints.hash)},
            "audit": {"seq": tips.audit.seq, "hash": hex(&tips.audit.hash)},
            "group": tips.group,
            "epoch": tips.epoch,
        },
        "identity_key": hex(&ledger.public_key()),
        "signing_key": hex(&ledger.signing_key()),
        "policy_hash": hex(&services.policy.policy_hash()),
        "quarantined": quarantined,
        "admin": {
            "keys": services.admin_keys,
            "quorum": services.quorum,
            "nonces_recorded": nonces,
        },
        "exporters": exporters(services.exporters.as_deref(), tips.audit.seq),
        "capacity": ledger.capacity().as_ref().map_or(Value::Null, capacity_json),
        "key": key_json(ledger),
        "replication": services.replication.as_ref().map_or(Value::Null, |r| r()),
    })
}

/// Where the signing key is kept: `{"source": "file"|"tpm", ...}` with what the source
/// reports (the TCTI, the PCRs, the sealed file in use; never key material). Also the `key`
/// section of `GET /v1/health`.
pub fn key_json(ledger: &mayfly_ledger::Ledger) -> Value {
    let (source, detail) = ledger.key_source();
    let mut obj = serde_json::Map::new();
    obj.insert("source".into(), Value::from(source));
    for (k, v) in detail {
        obj.insert(k.into(), Value::from(v));
    }
    Value::Object(obj)
}

/// The ledger's space: used, left, growth rate and projected time to full, and whether
/// transactions are refused for lack of space (also the `capacity` section of
/// `GET /v1/health`).
pub fn capacity_json(c: &mayfly_ledger::capacity::Capacity) -> Value {
    json!({
        "used_bytes": c.used_bytes,
        "left_bytes": c.left_bytes,
        "used_percent": (c.used_percent * 10.0).round() / 10.0,
        "map_bytes": c.map_bytes,
        "max_map_bytes": c.max_map_bytes,
        "fs_free_bytes": c.fs_free_bytes,
        "bytes_per_hour": c.bytes_per_hour.map(f64::round),
        "seconds_to_full": c.seconds_to_full,
        "writable": c.refusing.is_none(),
        "refusing": c.refusing,
    })
}

fn exporters(provider: Option<&dyn ExporterStatus>, audit_tip: u64) -> Value {
    let Some(provider) = provider else {
        return json!({"configured": false, "collectors": []});
    };
    let collectors: Vec<Value> = provider
        .collectors()
        .into_iter()
        .map(|c| {
            json!({
                "name": c.name,
                "transport": c.transport,
                "delivered_seq": c.delivered_seq,
                "lag": audit_tip.saturating_sub(c.delivered_seq),
                "last_error": c.last_error,
            })
        })
        .collect();
    json!({"configured": !collectors.is_empty(), "collectors": collectors})
}
