//! Every rule of the shipped policy bundle (`policies/default`) fires through the real
//! agent, and the audit trail names the rule and the action really taken: a quarantined
//! domain is kept (and not called destroyed), an aborted transaction writes nothing, an
//! alert lets the transaction commit, a rollback is applied and says so.
//!
//! The domain rules (`domain.hostile`, `domain.failed`) need the hostile test handlers:
//! `tests/hostile.rs`. The rate rules are the shipped ones with their numbers scaled down
//! (a test cannot run 2,000 transactions in a second here); the pattern rule
//! `acct.balance_format` needs a handler that may write `acct/` and writes something else
//! than a number, which no shipped handler does: it runs with the shipped detection and
//! engine files and a `kv` allowed to write `acct/`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{audit, Agent};
use serde_json::{json, Value};

type Record = (String, BTreeMap<String, String>);

/// The audit records of one transaction, once its domain's end is recorded (polled, 10 s).
fn records_of(dir: &Path, tx_id: &str) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mine: Vec<Record> = audit(dir)
            .into_iter()
            .filter(|(_, f)| f.get("tx_id").map(String::as_str) == Some(tx_id))
            .collect();
        let ended = mine
            .iter()
            .any(|(e, _)| e == "domain.destroyed" || e == "domain.quarantined");
        if ended || Instant::now() > deadline {
            return mine;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn decision<'a>(records: &'a [Record], rule: &str) -> &'a BTreeMap<String, String> {
    &records
        .iter()
        .find(|(e, f)| e == "policy.decision" && f["rule"] == rule)
        .unwrap_or_else(|| panic!("no decision of {rule} in {records:?}"))
        .1
}

fn has(records: &[Record], event: &str) -> bool {
    records.iter().any(|(e, _)| e == event)
}

/// A transaction the policy stops; returns its records. `action` is what the rule decided.
fn stopped(
    agent: &Agent,
    dir: &Path,
    handler: &str,
    payload: Value,
    rule: &str,
    action: &str,
) -> Vec<Record> {
    let (code, body) = agent.tx(handler, payload);
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["error"],
        format!("denied by policy rule {rule} ({action})"),
        "{body}"
    );
    let records = records_of(dir, body["tx_id"].as_str().unwrap());
    assert_eq!(decision(&records, rule)["action"], action);
    assert!(has(&records, "tx.denied_by_policy"), "{records:?}");
    assert!(!has(&records, "tx.committed"), "{records:?}");
    match action {
        // Kept for forensics, stopped, and not called destroyed.
        "quarantine" => {
            assert!(has(&records, "domain.quarantined"), "{records:?}");
            assert!(!has(&records, "domain.destroyed"), "{records:?}");
        }
        _ => {
            assert!(has(&records, "domain.destroyed"), "{records:?}");
            assert!(!has(&records, "domain.quarantined"), "{records:?}");
        }
    }
    records
}

fn committed(agent: &Agent, handler: &str, payload: Value) -> Value {
    let (code, body) = agent.tx(handler, payload);
    assert_eq!(code, 200, "{body}");
    body
}

#[test]
fn honeytokens_capabilities_and_patterns_of_the_shipped_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &[]);
    // Honeytokens: any touch quarantines.
    stopped(
        &agent,
        &data,
        "kv",
        json!({"op": "get", "key": "acct/admin"}),
        "canary.accounts",
        "quarantine",
    );
    stopped(
        &agent,
        &data,
        "kv",
        json!({"op": "get", "key": "secret/db"}),
        "canary.secrets",
        "quarantine",
    );
    // Capabilities: kv may only touch kv/; notes only notes/ (and its breach quarantines).
    stopped(
        &agent,
        &data,
        "kv",
        json!({"op": "get", "key": "notes/a/b"}),
        "handler.kv.read",
        "abort",
    );
    let rec = stopped(
        &agent,
        &data,
        "kv",
        json!({"op": "put", "key": "acct/bob", "value": "12abc"}),
        "handler.kv.write",
        "abort",
    );
    // The pattern fired too, and lost by precedence: the record says so.
    assert!(
        decision(&rec, "handler.kv.write")["also"].contains("acct.balance_format"),
        "{rec:?}"
    );
    stopped(
        &agent,
        &data,
        "notes",
        json!({"user": "mallory", "note_id": "../../acct/mallory", "text": "1000000"}),
        "handler.notes.write",
        "quarantine",
    );
    // A pattern that only alerts: the note is stored, and the alert recorded with it.
    let body = committed(
        &agent,
        "notes",
        json!({"user": "eve", "note_id": "n1", "text": "<script>alert(1)</script>"}),
    );
    let rec = records_of(&data, body["tx_id"].as_str().unwrap());
    assert_eq!(decision(&rec, "notes.script")["action"], "alert");
    assert!(has(&rec, "tx.committed"), "{rec:?}");
    let (_, shown) = agent.get(&format!(
        "/v1/transactions/{}",
        body["tx_id"].as_str().unwrap()
    ));
    assert_eq!(shown["status"], "committed", "{shown}");
}

#[test]
fn the_balance_pattern_refuses_a_non_number_under_acct() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let handlers = "[handler.kv]\nread = [\"kv/\", \"acct/\"]\nwrite = [\"kv/\", \"acct/\"]\n";
    let policy = common::policy_dir(
        dir.path(),
        "policy",
        &[
            (
                "detection.toml",
                &common::shipped_policy("default/detection.toml"),
            ),
            (
                "engine.toml",
                &common::shipped_policy("default/engine.toml"),
            ),
            ("handlers.toml", handlers),
        ],
    );
    let agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    stopped(
        &agent,
        &data,
        "kv",
        json!({"op": "put", "key": "acct/bob", "value": "12abc"}),
        "acct.balance_format",
        "abort",
    );
    committed(
        &agent,
        "kv",
        json!({"op": "put", "key": "acct/bob", "value": "12"}),
    );
}

#[test]
fn the_shipped_rates_refuse_a_client_over_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shipped = common::shipped_policy("default/detection.toml");
    let scaled = shipped
        .replacen("max = 2_000", "max = 10", 1)
        .replacen("max = 1_000", "max = 2", 1)
        .replace("window_ms = 1_000", "window_ms = 3_600_000");
    assert_eq!(
        scaled.matches("window_ms = 3_600_000").count(),
        2,
        "detection.toml changed"
    );
    assert!(scaled.contains("max = 10") && scaled.contains("max = 2\n"));
    let policy = common::policy_dir(
        dir.path(),
        "policy",
        &[
            ("detection.toml", &scaled),
            (
                "engine.toml",
                &common::shipped_policy("default/engine.toml"),
            ),
            (
                "handlers.toml",
                &common::shipped_policy("default/handlers.toml"),
            ),
        ],
    );
    let agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    committed(
        &agent,
        "open_account",
        json!({"name": "alice", "balance": 100}),
    );
    committed(
        &agent,
        "open_account",
        json!({"name": "bob", "balance": 100}),
    );
    let transfer = json!({"from": "alice", "to": "bob", "amount": 1});
    committed(&agent, "transfer", transfer.clone());
    committed(&agent, "transfer", transfer.clone());
    let (code, body) = agent.tx("transfer", transfer);
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["error"],
        "refused by policy rule rate.transfer (abort)"
    );
    for _ in 0..6 {
        committed(&agent, "balance", json!({"name": "bob"}));
    }
    let (code, body) = agent.tx("balance", json!({"name": "bob"}));
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["error"], "refused by policy rule rate.client (abort)");
    let records = audit(&data);
    for rule in ["rate.transfer", "rate.client"] {
        let d = decision(&records, rule);
        assert_eq!(d["action"], "abort");
        assert_eq!(d["client"], "127.0.0.1");
    }
    // Refused at admission: no domain was taken for either.
    assert_eq!(
        records
            .iter()
            .filter(|(e, _)| e == "domain.started")
            .count(),
        10
    );
}

#[test]
fn the_detector_token_alone_rolls_back_cascades_and_replays_with_the_shipped_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &[]);
    let token = common::detector_token(&data);
    committed(
        &agent,
        "open_account",
        json!({"name": "alice", "balance": 100}),
    );
    let attack = committed(
        &agent,
        "open_account",
        json!({"name": "mallory", "balance": 1_000_000}),
    );
    let attack_id = attack["tx_id"].as_str().unwrap().to_owned();
    let spent = committed(
        &agent,
        "transfer",
        json!({"from": "mallory", "to": "alice", "amount": 500}),
    );

    // ids.tx: no admin, no quorum: the token is enough.
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"tx_id": attack_id, "reason": "ids sig 7"}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["action"], "rollback+cascade+replay");
    assert_eq!(body["rule"], "ids.tx");
    let rollback_seq = body["rollback"]["seq"].as_u64().unwrap();
    assert_eq!(
        body["rollback"]["affected"],
        json!([attack["seq"], spent["seq"]])
    );
    assert_eq!(body["replayed"].as_array().unwrap().len(), 1, "{body}");
    let records = audit(&data);
    assert_eq!(
        decision(&records, "ids.tx")["action"],
        "rollback+cascade+replay"
    );
    assert!(has(&records, "rollback.applied"));
    assert!(has(&records, "rollback.replayed"));
    let done = records
        .iter()
        .find(|(e, f)| e == "report.completed" && f["rule"] == "ids.tx")
        .expect("report.completed");
    assert_eq!(done.1["outcome"], "done");
    assert_eq!(done.1["rollback_seq"], rollback_seq.to_string());
    for id in [&attack_id, spent["tx_id"].as_str().unwrap()] {
        let (_, shown) = agent.get(&format!("/v1/transactions/{id}"));
        assert_eq!(shown["status"], "rolled_back", "{shown}");
    }

    // ids.acct_key: a tampered account's last writer is rolled back.
    let bob = committed(&agent, "open_account", json!({"name": "bob", "balance": 7}));
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"key": "acct/bob", "reason": "tampered"}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["rule"], "ids.acct_key");
    assert_eq!(body["rollback"]["roots"], json!([bob["seq"]]));
    let (_, shown) = agent.get(&format!(
        "/v1/transactions/{}",
        bob["tx_id"].as_str().unwrap()
    ));
    assert_eq!(
        shown["rolled_back_by"]["seq"], body["rollback"]["seq"],
        "{shown}"
    );
    // The same key again: its last writer is now the rollback, nothing is left to undo.
    let by = body["rollback"]["seq"].as_u64().unwrap();
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"key": "acct/bob", "reason": "tampered", "dry_run": true}),
    );
    assert_eq!(code, 409, "{body}");
    assert_eq!(
        body["error"],
        format!("nothing to undo: the key was last written by rollback record {by}")
    );

    // ids.client: an alert only; nothing is rolled back.
    let before = audit(&data)
        .iter()
        .filter(|(e, _)| e == "rollback.applied")
        .count();
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"client": "10.0.0.9", "reason": "scanner"}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["action"], "alert");
    assert_eq!(body["rule"], "ids.client");
    assert!(body["rollback"].is_null(), "{body}");
    let records = audit(&data);
    assert_eq!(decision(&records, "ids.client")["action"], "alert");
    assert_eq!(
        records
            .iter()
            .filter(|(e, _)| e == "rollback.applied")
            .count(),
        before
    );
}
