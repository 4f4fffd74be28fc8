//! The audit trail says what really happened, through the real agent: what came of a
//! detector report (a refused rollback is recorded as not done), how a rolled-back
//! transaction looks to a client, that there is "nothing to undo" twice, which policy a
//! rollback record names, and that attempts lost to a serialization conflict are audited
//! like every other domain.

mod common;

use std::collections::BTreeMap;

use common::{audit, Agent};
use serde_json::{json, Value};

type Record = (String, BTreeMap<String, String>);

/// Bank handlers allowed, two IDS rules on transactions: reason "single" rolls back the
/// named transaction only (refused when others read its writes), "cascade" also its
/// dependents.
const REPORT_POLICY: &str = r#"[engine]
unlisted_handler = "allow"

[[external]]
name = "ids.tx.single"
target = "tx"
reasons = ["single"]
action = "rollback"

[[external]]
name = "ids.tx.cascade"
target = "tx"
reasons = ["cascade"]
action = "rollback+cascade"
"#;

fn ok_tx(agent: &Agent, handler: &str, payload: Value) -> Value {
    let (code, body) = agent.tx(handler, payload);
    assert_eq!(code, 200, "{body}");
    body
}

fn completed_for<'a>(records: &'a [Record], target: &str) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|(e, f)| e == "report.completed" && f["target"] == target)
        .collect()
}

#[test]
fn a_report_says_what_came_of_it_and_a_rolled_back_transaction_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = common::policy_dir(dir.path(), "policy", &[("ids.toml", REPORT_POLICY)]);
    let agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    let token = common::detector_token(&data);

    let attack = ok_tx(
        &agent,
        "open_account",
        json!({"name": "mallory", "balance": 1_000_000}),
    );
    let attack_id = attack["tx_id"].as_str().unwrap().to_owned();
    let attack_seq = attack["seq"].as_u64().unwrap();
    // A later transaction reads what the attack wrote: a dependent.
    let reader = ok_tx(&agent, "balance", json!({"name": "mallory"}));
    let reader_seq = reader["seq"].as_u64().unwrap();
    let target = format!("tx {attack_id}");

    // 1. The rule does not cascade: refused (409), and the trail says it was not done.
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"tx_id": attack_id, "reason": "single"}),
    );
    assert_eq!(code, 409, "{body}");
    let records = audit(&data);
    let decision = records
        .iter()
        .find(|(e, f)| e == "policy.decision" && f["rule"] == "ids.tx.single")
        .expect("the decision is audited");
    assert_eq!(decision.1["dry_run"], "false");
    let done = completed_for(&records, &target);
    assert_eq!(done.len(), 1, "{records:?}");
    assert_eq!(done[0].1["outcome"], "failed");
    assert_eq!(done[0].1["rule"], "ids.tx.single");
    assert_eq!(done[0].1["action"], "rollback");
    assert!(
        done[0].1["error"].contains("later commits read"),
        "{done:?}"
    );
    assert!(!done[0].1.contains_key("rollback_seq"));
    assert!(!records.iter().any(|(e, _)| e == "rollback.applied"));

    // 2. With cascade: done, and the record names the rollback.
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"tx_id": attack_id, "reason": "cascade"}),
    );
    assert_eq!(code, 200, "{body}");
    let rollback_seq = body["rollback"]["seq"].as_u64().unwrap();
    let records = audit(&data);
    let done = completed_for(&records, &target);
    assert_eq!(done.len(), 2);
    assert_eq!(done[1].1["outcome"], "done");
    assert_eq!(done[1].1["rule"], "ids.tx.cascade");
    assert_eq!(done[1].1["rollback_seq"], rollback_seq.to_string());
    assert_eq!(done[1].1["affected"], "2");

    // 3. Both undone transactions say so, and by which record.
    for (id, seq) in [
        (attack_id.as_str(), attack_seq),
        (reader["tx_id"].as_str().unwrap(), reader_seq),
    ] {
        let (code, body) = agent.get(&format!("/v1/transactions/{id}"));
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "rolled_back", "{body}");
        assert_eq!(body["rolled_back_by"]["seq"], rollback_seq, "{body}");
        assert_eq!(body["checkpoint"]["seq"], seq, "the checkpoint stays");
    }
    // A transaction no rollback touched is still just committed.
    let later = ok_tx(
        &agent,
        "open_account",
        json!({"name": "alice", "balance": 5}),
    );
    let (_, body) = agent.get(&format!(
        "/v1/transactions/{}",
        later["tx_id"].as_str().unwrap()
    ));
    assert_eq!(body["status"], "committed", "{body}");
    assert!(body.get("rolled_back_by").is_none(), "{body}");

    // 4. Again, without cascade, as a dry run: nothing to undo (the dependent is undone too).
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"tx_id": attack_id, "reason": "single", "dry_run": true}),
    );
    assert_eq!(code, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "nothing to undo: commit {attack_seq} was already rolled back by record {rollback_seq}"
        )),
        "{error}"
    );
    let records = audit(&data);
    let done = completed_for(&records, &target);
    assert_eq!(done.len(), 3);
    assert_eq!(done[2].1["outcome"], "failed");
    assert_eq!(done[2].1["dry_run"], "true");

    // 5. A rollback a policy decided names that policy's bundle.
    let store =
        mayfly_ledger::store::open_read_only(&data, &mayfly_ledger::StoreOptions::default())
            .unwrap();
    let Some(mayfly_ledger::rollback::Record::Rollback(rec)) = store.record(rollback_seq).unwrap()
    else {
        panic!("record {rollback_seq} is not a rollback");
    };
    let (_, shown) = agent.get(&format!(
        "/v1/transactions/{}",
        later["tx_id"].as_str().unwrap()
    ));
    assert_eq!(
        mayfly_ledger::codec::hex(&rec.policy_hash),
        shown["checkpoint"]["policy_hash"].as_str().unwrap()
    );
    assert_ne!(rec.policy_hash, [0u8; 32]);
}

#[test]
fn attempts_lost_to_a_conflict_are_cloned_started_and_ended_in_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &["--pool-size", "8"]);
    ok_tx(
        &agent,
        "open_account",
        json!({"name": "alice", "balance": 1_000_000}),
    );
    ok_tx(
        &agent,
        "open_account",
        json!({"name": "bob", "balance": 1_000_000}),
    );
    // Concurrent transfers between the same two accounts conflict now and then; send rounds
    // until some did (bounded).
    let mut conflicted = 0;
    for _round in 0..20 {
        let addr = agent.addr;
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let (from, to) = if t % 2 == 0 { ("alice", "bob") } else { ("bob", "alice") };
                    let mut more = 0;
                    for _ in 0..5 {
                        let (code, body) = common::request(
                            addr,
                            "POST",
                            "/v1/transactions",
                            &json!({"handler": "transfer", "payload": {"from": from, "to": to, "amount": 1}})
                                .to_string(),
                        );
                        // 409: still conflicting after every attempt (also audited).
                        assert!(code == 200 || code == 409, "{code} {body}");
                        more += body["attempts"].as_u64().unwrap() - 1;
                    }
                    more
                })
            })
            .collect();
        conflicted += threads.into_iter().map(|t| t.join().unwrap()).sum::<u64>();
        if conflicted >= 3 {
            break;
        }
    }
    assert!(
        conflicted > 0,
        "no serialization conflict in 400 concurrent transfers"
    );
    // Every ended attempt has its clone and start recorded (polled: routine records are
    // written lazily).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let records = audit(&data);
        let conflicts: Vec<&Record> = records.iter().filter(|(e, _)| e == "tx.conflict").collect();
        let missing: Vec<String> = conflicts
            .iter()
            .filter(|(_, c)| {
                let started = records
                    .iter()
                    .find(|(e, f)| e == "domain.started" && f.get("tx_id") == c.get("tx_id"));
                let cloned = started.and_then(|(_, s)| {
                    records
                        .iter()
                        .find(|(e, f)| e == "domain.cloned" && f.get("domain") == s.get("domain"))
                });
                let destroyed = records
                    .iter()
                    .any(|(e, f)| e == "domain.destroyed" && f.get("tx_id") == c.get("tx_id"));
                started.is_none() || cloned.is_none() || !destroyed
            })
            .map(|(_, c)| c["tx_id"].clone())
            .collect();
        if conflicts.len() as u64 >= conflicted && missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} conflicts recorded of {conflicted}; without clone/start/destroy: {missing:?}",
            conflicts.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn domain_numbers_never_repeat_across_agent_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut answered = Vec::new();
    for run in 0..2 {
        let mut agent = Agent::start(&data, &[]);
        for i in 0..4 {
            let body = ok_tx(
                &agent,
                "kv",
                json!({"op": "put", "key": format!("kv/{run}/{i}"), "value": "v"}),
            );
            answered.push(body["domain_id"].as_u64().unwrap());
        }
        assert!(agent.stop().success());
    }
    let distinct: std::collections::BTreeSet<_> = answered.iter().collect();
    assert_eq!(distinct.len(), answered.len(), "{answered:?}");
    // The checkpoints name the same numbers; the backend's own ids did repeat.
    let records = audit(&data);
    let store =
        mayfly_ledger::store::open_read_only(&data, &mayfly_ledger::StoreOptions::default())
            .unwrap();
    let in_checkpoints: Vec<u64> = (1..=8)
        .map(|seq| store.checkpoint(seq).unwrap().unwrap().domain_id)
        .collect();
    assert_eq!(in_checkpoints, answered);
    let field = |event: &str, name: &str| -> Vec<String> {
        records
            .iter()
            .filter(|(e, _)| e == event)
            .map(|(_, f)| f[name].clone())
            .collect()
    };
    let started = field("domain.started", "domain");
    let unique: std::collections::BTreeSet<_> = started.iter().collect();
    assert_eq!(
        unique.len(),
        started.len(),
        "audit domain fields repeat: {started:?}"
    );
    let backend_ids = field("domain.cloned", "backend_id");
    let unique_backend: std::collections::BTreeSet<_> = backend_ids.iter().collect();
    assert!(
        unique_backend.len() < backend_ids.len(),
        "the backend's clone numbers restart with the agent, which is why the ledger numbers: {backend_ids:?}"
    );
}

/// A ledger of an earlier release has no `undone` index (simulated here by emptying it and
/// removing its completion mark): the agent builds it at start, from the rollback records.
#[test]
fn the_undone_index_is_built_at_start_for_a_ledger_without_it() {
    use mayfly_ledger::store::names;
    use mayfly_ledger::tamper;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = common::policy_dir(dir.path(), "policy", &[("ids.toml", REPORT_POLICY)]);
    let mut agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    let token = common::detector_token(&data);
    let attack = ok_tx(
        &agent,
        "open_account",
        json!({"name": "mallory", "balance": 9}),
    );
    let attack_id = attack["tx_id"].as_str().unwrap().to_owned();
    let seq = attack["seq"].as_u64().unwrap();
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"tx_id": attack_id, "reason": "cascade"}),
    );
    assert_eq!(code, 200, "{body}");
    let rollback_seq = body["rollback"]["seq"].as_u64().unwrap();
    assert!(agent.stop().success());

    assert!(tamper::get(&data, names::META, b"undone_index").is_some());
    tamper::set(&data, names::UNDONE, &seq.to_be_bytes(), None);
    tamper::set(&data, names::META, b"undone_index", None);
    assert!(tamper::get(&data, names::UNDONE, &seq.to_be_bytes()).is_none());

    let agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    let (_, shown) = agent.get(&format!("/v1/transactions/{attack_id}"));
    assert_eq!(shown["status"], "rolled_back", "{shown}");
    assert_eq!(shown["rolled_back_by"]["seq"], rollback_seq, "{shown}");
    let opened: Vec<_> = audit(&data)
        .into_iter()
        .filter(|(e, _)| e == "ledger.opened")
        .collect();
    assert_eq!(
        opened
            .last()
            .unwrap()
            .1
            .get("undone_index_built_from")
            .map(String::as_str),
        Some("1"),
        "{opened:?}"
    );
    assert_eq!(
        opened.len(),
        1,
        "the first start created the ledger: {opened:?}"
    );
}

/// The `undone` index is unsigned: an entry added to it with LMDB directly (saying a
/// committed transaction was already rolled back) is named by `verify`, and the agent, which
/// rebuilds the index from the signed rollback records at start, still rolls the
/// transaction back instead of answering "nothing to undo".
#[test]
fn a_forged_undone_entry_is_caught_by_verify_and_ignored_at_start() {
    use mayfly_ledger::store::names;
    use mayfly_ledger::tamper;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = common::policy_dir(dir.path(), "policy", &[("ids.toml", REPORT_POLICY)]);
    let mut agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    let token = common::detector_token(&data);
    let attack = ok_tx(
        &agent,
        "open_account",
        json!({"name": "mallory", "balance": 9}),
    );
    let attack_id = attack["tx_id"].as_str().unwrap().to_owned();
    let seq = attack["seq"].as_u64().unwrap();
    assert!(agent.stop().success());
    let (ok, out) = common::verify(&data);
    assert!(ok, "{out}");

    // The forgery: "commit `seq` was undone by record `seq`".
    tamper::set(
        &data,
        names::UNDONE,
        &seq.to_be_bytes(),
        Some(&seq.to_be_bytes()),
    );
    let (ok, out) = common::verify(&data);
    assert!(!ok, "verify accepted a forged undone entry: {out}");
    assert!(
        out.contains(&format!("undone index, commit {seq}:"))
            && out.contains("no rollback record undid it"),
        "{out}"
    );

    let mut agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    let (_, shown) = agent.get(&format!("/v1/transactions/{attack_id}"));
    assert_eq!(shown["status"], "committed", "{shown}");
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"tx_id": attack_id, "reason": "single"}),
    );
    assert_eq!(code, 200, "the real rollback was refused: {body}");
    let rollback_seq = body["rollback"]["seq"].as_u64().unwrap();
    let (_, shown) = agent.get(&format!("/v1/transactions/{attack_id}"));
    assert_eq!(shown["status"], "rolled_back", "{shown}");
    assert_eq!(shown["rolled_back_by"]["seq"], rollback_seq, "{shown}");
    assert!(agent.stop().success());
    let repaired: Vec<_> = audit(&data)
        .into_iter()
        .filter(|(e, _)| e == "ledger.undone_index_repaired")
        .collect();
    assert_eq!(repaired.len(), 1, "{repaired:?}");
    assert_eq!(repaired[0].1["first_seq"], seq.to_string(), "{repaired:?}");
    let (ok, out) = common::verify(&data);
    assert!(ok, "{out}");
}

/// A rule that decides a rollback for a handler or a client target (which name no commits
/// to undo) is not silently dropped: the detector hears 422 "not supported", and the trail
/// has `report.completed` `outcome=failed` saying so.
#[test]
fn a_rollback_of_a_handler_or_client_target_is_answered_and_audited_as_not_supported() {
    const POLICY: &str = r#"[engine]
unlisted_handler = "allow"

[[external]]
name = "ids.handler"
target = "handler"
reasons = ["bad handler"]
action = "rollback"

[[external]]
name = "ids.client"
target = "client"
reasons = ["bad client"]
action = "rollback+cascade"
"#;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = common::policy_dir(dir.path(), "policy", &[("ids.toml", POLICY)]);
    let mut agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    let token = common::detector_token(&data);
    ok_tx(&agent, "open_account", json!({"name": "x", "balance": 1}));
    for (report, rule) in [
        (
            json!({"handler": "open_account", "reason": "bad handler"}),
            "ids.handler",
        ),
        (
            json!({"client": "127.0.0.1", "reason": "bad client"}),
            "ids.client",
        ),
    ] {
        let (code, body) = common::report(agent.addr, &token, &report);
        assert_eq!(code, 422, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("not supported for this target"),
            "{body}"
        );
        let records = audit(&data);
        let completed: Vec<_> = records
            .iter()
            .filter(|(e, f)| e == "report.completed" && f["rule"] == rule)
            .collect();
        assert_eq!(completed.len(), 1, "{records:?}");
        assert_eq!(completed[0].1["outcome"], "failed", "{completed:?}");
        assert!(
            completed[0].1["error"].contains("not supported for this target"),
            "{completed:?}"
        );
    }
    assert!(agent.stop().success());
    assert!(!audit(&data).iter().any(|(e, _)| e == "rollback.applied"));
    let (ok, out) = common::verify(&data);
    assert!(ok, "{out}");
}

/// A replay after a rollback is recorded for the original's client (`replay:<client>`),
/// in its signed checkpoint too, not for an anonymous "replay of commit N".
#[test]
fn a_replay_is_recorded_for_the_original_client() {
    const POLICY: &str = r#"[engine]
unlisted_handler = "allow"

[[external]]
name = "ids.tx.replay"
target = "tx"
reasons = ["replay"]
action = "rollback+cascade+replay"
"#;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = common::policy_dir(dir.path(), "policy", &[("ids.toml", POLICY)]);
    let mut agent = Agent::start(&data, &[&policy[0], &policy[1]]);
    let token = common::detector_token(&data);
    for name in ["alice", "bob", "carol"] {
        ok_tx(
            &agent,
            "open_account",
            json!({"name": name, "balance": 100}),
        );
    }
    let attack = ok_tx(
        &agent,
        "transfer",
        json!({"from": "alice", "to": "bob", "amount": 50}),
    );
    // Reads bob's balance the attack wrote: undone with it, then replayed.
    ok_tx(
        &agent,
        "transfer",
        json!({"from": "bob", "to": "carol", "amount": 10}),
    );
    let (code, body) = common::report(
        agent.addr,
        &token,
        &json!({"tx_id": attack["tx_id"], "reason": "replay"}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["replayed"][0]["status"], "committed", "{body}");
    let records = audit(&data);
    let (_, replayed) = records
        .iter()
        .find(|(e, _)| e == "rollback.replayed")
        .unwrap_or_else(|| panic!("{records:?}"));
    let (code, shown) = agent.get(&format!("/v1/transactions/{}", replayed["tx_id"]));
    assert_eq!(code, 200, "{shown}");
    assert_eq!(shown["checkpoint"]["client"], "replay:127.0.0.1", "{shown}");
    assert!(agent.stop().success());
    let (ok, out) = common::verify(&data);
    assert!(ok, "{out}");
}
