//! Hostile guests against the real sandbox backend (built with the `test-handlers` feature):
//! escape attempts, ring attacks, a guest that never ends and one that crashes. The agent
//! never panics, fails the transaction, destroys the domain, audits the reason, writes
//! nothing, and keeps serving.

mod common;

use common::{audit, verify, Agent};
use serde_json::json;

fn events_for(dir: &std::path::Path, tx_id: &str) -> Vec<String> {
    audit(dir)
        .into_iter()
        .filter(|(_, f)| f.get("tx_id").map(String::as_str) == Some(tx_id))
        .map(|(e, _)| e)
        .collect()
}

fn assert_still_serves(agent: &Agent, key: &str) {
    let (code, body) = agent.tx("kv", json!({"op": "put", "key": key, "value": "ok"}));
    assert_eq!(code, 200, "the agent stopped serving: {body}");
}

#[test]
fn escape_attempts_fail_and_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let policy = common::permissive_policy(dir.path());
    let mut agent = Agent::start(&dir.path().join("data"), &[&policy[0], &policy[1]]);
    for handler in ["test.open_file", "test.socket", "test.spawn"] {
        let (code, body) = agent.tx(handler, json!(null));
        assert_eq!(code, 500, "{handler}: {body}");
        assert_eq!(body["status"], "failed");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("forbidden system call"),
            "{handler}: {error}"
        );
        let events = events_for(&dir.path().join("data"), body["tx_id"].as_str().unwrap());
        assert!(
            events.iter().any(|e| e == "domain.forbidden_syscall"),
            "{handler}: {events:?}"
        );
        assert_still_serves(&agent, handler);
    }
    assert!(agent.stop().success());
    let (ok, out) = verify(&dir.path().join("data"));
    assert!(ok, "{out}");
}

#[test]
fn ring_attacks_are_protocol_violations() {
    let dir = tempfile::tempdir().unwrap();
    let policy = common::permissive_policy(dir.path());
    let mut agent = Agent::start(&dir.path().join("data"), &[&policy[0], &policy[1]]);
    for handler in [
        "test.ring_garbage",
        "test.bad_index",
        "test.overflow",
        "test.huge_length",
        "test.bad_encoding",
    ] {
        let (code, body) = agent.tx(handler, json!(null));
        assert_eq!(code, 500, "{handler}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("protocol violation"),
            "{handler}: {body}"
        );
        let events = events_for(&dir.path().join("data"), body["tx_id"].as_str().unwrap());
        assert!(
            events.iter().any(|e| e == "domain.protocol_violation"),
            "{handler}: {events:?}"
        );
        assert!(
            events.iter().any(|e| e == "domain.destroyed"),
            "{handler}: {events:?}"
        );
        assert_still_serves(&agent, handler);
    }
    assert!(agent.stop().success());
    let (ok, out) = verify(&dir.path().join("data"));
    assert!(ok, "{out}");
}

#[test]
fn a_looping_guest_times_out_and_a_crashing_one_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let policy = common::permissive_policy(dir.path());
    let agent = Agent::start(
        &dir.path().join("data"),
        &[&policy[0], &policy[1], "--tx-timeout-ms", "1500"],
    );
    let (code, body) = agent.tx("test.loop_forever", json!(null));
    assert_eq!(code, 500, "{body}");
    assert_eq!(body["error"], "transaction timed out");
    assert!(
        events_for(&dir.path().join("data"), body["tx_id"].as_str().unwrap())
            .iter()
            .any(|e| e == "domain.timeout")
    );

    let (code, body) = agent.tx("test.crash", json!(null));
    assert_eq!(code, 500, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("crashed"),
        "{body}"
    );
    assert!(
        events_for(&dir.path().join("data"), body["tx_id"].as_str().unwrap())
            .iter()
            .any(|e| e == "domain.crashed")
    );
    assert_still_serves(&agent, "after");
}

#[test]
fn clones_get_fresh_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = common::permissive_policy(dir.path());
    let agent = Agent::start(&dir.path().join("data"), &[&policy[0], &policy[1]]);
    let draws: Vec<String> = (0..4)
        .map(|_| {
            let (code, body) = agent.tx("test.random", json!(null));
            assert_eq!(code, 200, "{body}");
            body.to_string()
        })
        .collect();
    let distinct: std::collections::BTreeSet<_> = draws
        .iter()
        .map(|d| d.split("\"result").nth(1).unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        distinct.len(),
        draws.len(),
        "clones of one template shared RNG state: {draws:?}"
    );
}

#[test]
fn overload_is_refused_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let policy = common::permissive_policy(dir.path());
    let agent = Agent::start(
        &dir.path().join("data"),
        &[
            &policy[0],
            &policy[1],
            "--max-in-flight",
            "1",
            "--tx-timeout-ms",
            "3000",
        ],
    );
    let addr = agent.addr;
    let busy = std::thread::spawn(move || {
        common::request(
            addr,
            "POST",
            "/v1/transactions",
            &json!({"handler": "test.loop_forever"}).to_string(),
        )
    });
    // Wait until the looping transaction holds the only slot.
    let mut refused = None;
    for _ in 0..2000 {
        let (code, health) = agent.get("/v1/health");
        assert_eq!(code, 200);
        if health["in_flight"] == 1 {
            refused = Some(agent.tx("kv", json!({"op": "get", "key": "k"})));
            break;
        }
        std::thread::yield_now();
    }
    let (code, body) = refused.expect("the looping transaction never started");
    assert_eq!(code, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("overloaded"),
        "{body}"
    );
    let (code, _) = busy.join().unwrap();
    assert_eq!(code, 500);
}
