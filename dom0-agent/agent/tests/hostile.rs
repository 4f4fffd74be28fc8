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

/// The shipped `policies/default/engine.toml`, with only `unlisted_handler` opened so that
/// the hostile `test.*` handlers may run: its `[[domain]]` rules are the shipped ones.
fn shipped_engine_policy(dir: &std::path::Path) -> [String; 2] {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../policies/default/engine.toml"
    ))
    .unwrap();
    let opened = shipped.replace(
        "unlisted_handler = \"abort\"",
        "unlisted_handler = \"allow\"",
    );
    assert_ne!(
        opened, shipped,
        "engine.toml no longer sets unlisted_handler"
    );
    let policy = dir.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(policy.join("engine.toml"), opened).unwrap();
    ["--policy".to_owned(), policy.to_string_lossy().into_owned()]
}

type Record = (String, std::collections::BTreeMap<String, String>);

/// The audit records of one transaction, once its domain's end is recorded (a destroyed or
/// quarantined domain: routine records ride with a later group commit), polled for at most
/// 10 s.
fn records_of(dir: &std::path::Path, tx_id: &str) -> Vec<Record> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mine: Vec<Record> = audit(dir)
            .into_iter()
            .filter(|(_, f)| f.get("tx_id").map(String::as_str) == Some(tx_id))
            .collect();
        let ended = mine
            .iter()
            .any(|(e, _)| e == "domain.destroyed" || e == "domain.quarantined");
        if ended || std::time::Instant::now() > deadline {
            return mine;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The one domain-event decision of a transaction: (rule, action, event).
fn domain_decision(records: &[Record]) -> (String, String, String) {
    let decisions: Vec<_> = records
        .iter()
        .filter(|(e, f)| e == "policy.decision" && f.contains_key("event"))
        .collect();
    assert_eq!(decisions.len(), 1, "{records:?}");
    let f = &decisions[0].1;
    (f["rule"].clone(), f["action"].clone(), f["event"].clone())
}

fn names(records: &[Record]) -> Vec<&str> {
    records.iter().map(|(e, _)| e.as_str()).collect()
}

#[test]
fn domain_events_reach_the_shipped_rules_as_what_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = shipped_engine_policy(dir.path());
    let mut agent = Agent::start(&data, &[&policy[0], &policy[1]]);

    // A forbidden system call (open /etc/passwd): `domain.hostile` decides quarantine, but
    // the seccomp filter has already killed the clone: the trail says it could not be kept.
    let (code, body) = agent.tx("test.open_file", json!(null));
    assert_eq!(code, 500, "{body}");
    let rec = records_of(&data, body["tx_id"].as_str().unwrap());
    assert_eq!(
        domain_decision(&rec),
        (
            "domain.hostile".into(),
            "quarantine".into(),
            "forbidden_syscall".into()
        )
    );
    let n = names(&rec);
    assert!(n.contains(&"domain.forbidden_syscall"), "{n:?}");
    let failed = rec
        .iter()
        .find(|(e, _)| e == "domain.quarantine_failed")
        .unwrap_or_else(|| panic!("{rec:?}"));
    assert!(failed.1["error"].contains("already ended"), "{failed:?}");
    let destroyed = rec.iter().find(|(e, _)| e == "domain.destroyed").unwrap();
    assert_eq!(destroyed.1["exit"], "killed for a forbidden system call");
    assert!(!n.contains(&"domain.quarantined"), "{n:?}");

    // A protocol violation: the live clone is quarantined, stopped, and not called destroyed.
    let (code, body) = agent.tx("test.ring_garbage", json!(null));
    assert_eq!(code, 500, "{body}");
    let rec = records_of(&data, body["tx_id"].as_str().unwrap());
    assert_eq!(
        domain_decision(&rec),
        (
            "domain.hostile".into(),
            "quarantine".into(),
            "protocol_violation".into()
        )
    );
    let n = names(&rec);
    assert!(n.contains(&"domain.protocol_violation"), "{n:?}");
    assert!(!n.contains(&"domain.destroyed"), "{n:?}");
    let (_, q) = rec.iter().find(|(e, _)| e == "domain.quarantined").unwrap();
    let pid: u32 = q["handle"].parse().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(
        stat.rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('T'),
        "the quarantined clone must be stopped: {stat}"
    );

    // A crash: `domain.failed` aborts; the clone is destroyed.
    let (code, body) = agent.tx("test.crash", json!(null));
    assert_eq!(code, 500, "{body}");
    let rec = records_of(&data, body["tx_id"].as_str().unwrap());
    assert_eq!(
        domain_decision(&rec),
        ("domain.failed".into(), "abort".into(), "crash".into())
    );
    let n = names(&rec);
    assert!(
        n.contains(&"domain.crashed") && n.contains(&"domain.destroyed"),
        "{n:?}"
    );
    assert!(agent.stop().success());
    assert!(
        !common::process_alive(pid),
        "shutdown releases quarantined domains"
    );

    // A timeout, and a CPU-time limit, each with an agent set up to show it.
    let timeout_dir = dir.path().join("timeout");
    let agent = Agent::start(
        &timeout_dir,
        &[&policy[0], &policy[1], "--tx-timeout-ms", "1500"],
    );
    let (code, body) = agent.tx("test.loop_forever", json!(null));
    assert_eq!(code, 500, "{body}");
    let rec = records_of(&timeout_dir, body["tx_id"].as_str().unwrap());
    assert_eq!(
        domain_decision(&rec),
        ("domain.failed".into(), "abort".into(), "timeout".into())
    );
    assert!(names(&rec).contains(&"domain.timeout"), "{rec:?}");
    drop(agent);

    let limit_dir = dir.path().join("limit");
    let agent = Agent::start(
        &limit_dir,
        &[
            &policy[0],
            &policy[1],
            "--cpu-seconds",
            "1",
            "--tx-timeout-ms",
            "20000",
        ],
    );
    let (code, body) = agent.tx("test.loop_forever", json!(null));
    assert_eq!(code, 500, "{body}");
    let rec = records_of(&limit_dir, body["tx_id"].as_str().unwrap());
    assert_eq!(
        domain_decision(&rec),
        ("domain.failed".into(), "abort".into(), "limit".into())
    );
    assert!(names(&rec).contains(&"domain.resource_limit"), "{rec:?}");
    assert_still_serves(&agent, "after");
}

/// A guest that breaks the ring and then dies of its own choosing (abort) does not turn its
/// violation into an ordinary crash: the shipped rules decide on `protocol_violation`, the
/// answer and the audit name the violation, and the death is recorded beside it.
#[test]
fn a_violation_stays_one_when_the_guest_then_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = shipped_engine_policy(dir.path());
    let mut agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    for _ in 0..3 {
        let (code, body) = agent.tx("test.garbage_then_crash", json!(null));
        assert_eq!(code, 500, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("protocol violation"),
            "{body}"
        );
        let rec = records_of(&data, body["tx_id"].as_str().unwrap());
        assert_eq!(
            domain_decision(&rec),
            (
                "domain.hostile".into(),
                "quarantine".into(),
                "protocol_violation".into()
            )
        );
        let n = names(&rec);
        assert!(!n.contains(&"domain.crashed"), "{n:?}");
        let (_, violation) = rec
            .iter()
            .find(|(e, _)| e == "domain.protocol_violation")
            .unwrap_or_else(|| panic!("{rec:?}"));
        assert!(
            violation["then"].contains("crashed (signal 6)"),
            "{violation:?}"
        );
        // The dead clone cannot be kept: the trail says so, and how it ended.
        assert!(n.contains(&"domain.quarantine_failed"), "{n:?}");
        let (_, destroyed) = rec.iter().find(|(e, _)| e == "domain.destroyed").unwrap();
        assert_eq!(destroyed["exit"], "crashed (signal 6)");
        assert_still_serves(&agent, "after");
    }
    assert!(agent.stop().success());
    let (ok, out) = verify(&data);
    assert!(ok, "{out}");
}
