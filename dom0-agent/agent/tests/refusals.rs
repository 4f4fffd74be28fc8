//! A flood of identical refusals from one client cannot fill the ledger: the first is
//! recorded at once, the repeats are counted into one `refusal.repeated` record per
//! interval, and a different refusal is still recorded at once.

mod common;

use std::time::{Duration, Instant};

use common::{audit, Agent};
use serde_json::json;

/// kv only, and one admission per hour per client: every request after the first is
/// refused by `rate.flood` at admission (no domain is taken).
const FLOOD_POLICY: &str = "[engine]\nunlisted_handler = \"abort\"\n\n[handler.kv]\nread = [\"kv/\"]\nwrite = [\"kv/\"]\n\n[[rate]]\nname = \"rate.flood\"\nmax = 1\nwindow_ms = 3_600_000\nhandlers = [\"kv\"]\naction = \"abort\"\n";

type Record = (String, std::collections::BTreeMap<String, String>);

/// Sends `n` kv requests from 4 threads; every one must be refused with 429 or 403.
fn flood(agent: &Agent, n: usize) {
    let addr = agent.addr;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in (t..n).step_by(4) {
                    let (code, body) = common::request(
                        addr,
                        "POST",
                        "/v1/transactions",
                        &json!({"handler": "kv", "payload": {"op": "get", "key": format!("kv/{i}")}})
                            .to_string(),
                    );
                    assert!(code == 429 || code == 403, "{code} {body}");
                    assert!(
                        body["error"].as_str().unwrap().contains("rate.flood"),
                        "{body}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn with_rule<'a>(records: &'a [Record], rule: &str) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|(e, f)| e == "policy.decision" && f.get("rule").map(String::as_str) == Some(rule))
        .collect()
}

fn repeated(records: &[Record]) -> Vec<&Record> {
    records
        .iter()
        .filter(|(e, _)| e == "refusal.repeated")
        .collect()
}

fn counted(records: &[&Record]) -> u64 {
    records
        .iter()
        .map(|(_, f)| f["count"].parse::<u64>().unwrap())
        .sum()
}

#[test]
fn ten_thousand_identical_refusals_make_two_records_and_a_different_one_is_recorded_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = common::policy_dir(dir.path(), "policy", &[("flood.toml", FLOOD_POLICY)]);
    let mut agent = Agent::start(
        &data,
        &[&policy[0], &policy[1], "--refusal-interval-ms", "3600000"],
    );
    let (code, body) = agent.tx("kv", json!({"op": "put", "key": "kv/a", "value": "1"}));
    assert_eq!(code, 200, "{body}");
    let before = audit(&data).len();

    flood(&agent, 10_000);
    let records = audit(&data);
    let first = with_rule(&records, "rate.flood");
    assert_eq!(first.len(), 1, "only the first refusal is recorded in full");
    assert_eq!(first[0].1["client"], "127.0.0.1");
    assert_eq!(first[0].1["action"], "abort");
    assert!(repeated(&records).is_empty(), "the window is still open");

    // Another reason from the same client: recorded before the answer, not counted.
    let (code, body) = agent.tx("balance", json!({"name": "x"}));
    assert_eq!(code, 403, "{body}");
    let records = audit(&data);
    assert_eq!(with_rule(&records, "builtin.unlisted_handler").len(), 1);

    // Reports without the detector token: another event, aggregated the same way.
    for _ in 0..50 {
        let (code, _) = common::report(agent.addr, "wrong", &json!({"tx_id": "00", "reason": "x"}));
        assert_eq!(code, 401);
    }
    let records = audit(&data);
    let rejected: Vec<_> = records
        .iter()
        .filter(|(e, _)| e == "report.rejected")
        .collect();
    assert_eq!(rejected.len(), 1);

    // Stopping closes the windows: one counted record each.
    assert!(agent.stop().success());
    let records = audit(&data);
    let rep = repeated(&records);
    assert_eq!(rep.len(), 2, "{rep:?}");
    let flood_rec = rep
        .iter()
        .find(|(_, f)| f["reason"] == "rate.flood")
        .expect("the flood's count");
    assert_eq!(flood_rec.1["count"], "9999");
    assert_eq!(flood_rec.1["client"], "127.0.0.1");
    assert_eq!(flood_rec.1["refused_event"], "policy.decision");
    let report_rec = rep
        .iter()
        .find(|(_, f)| f["refused_event"] == "report.rejected")
        .expect("the reports' count");
    assert_eq!(report_rec.1["count"], "49");
    // 10,050 refusals, and the ledger grew by a handful of records (the lifecycle records
    // of the one transaction, the agent's stop), not by ten thousand.
    let grown = records.len() - before;
    assert!(grown <= 12, "{grown} records for 10,050 refusals");
    let (ok, out) = common::verify(&data);
    assert!(ok, "{out}");
}

#[test]
fn a_steady_flood_is_counted_once_per_interval_while_the_agent_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = common::policy_dir(dir.path(), "policy", &[("flood.toml", FLOOD_POLICY)]);
    let interval = Duration::from_millis(400);
    let mut agent = Agent::start(
        &data,
        &[&policy[0], &policy[1], "--refusal-interval-ms", "400"],
    );
    let (code, body) = agent.tx("kv", json!({"op": "put", "key": "kv/a", "value": "1"}));
    assert_eq!(code, 200, "{body}");
    let started = Instant::now();
    let mut sent = 0usize;
    // Flood for at least three intervals.
    while started.elapsed() < interval * 3 {
        flood(&agent, 200);
        sent += 200;
    }
    // The counts come out while the agent runs (polled, bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = audit(&data);
        let rep = repeated(&records);
        if counted(&rep) + 1 == sent as u64 || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let rep = repeated(&records);
    assert_eq!(
        counted(&rep) + 1,
        sent as u64,
        "every refusal counted: {rep:?}"
    );
    // Written while the flood went on (more than one window), and aggregated: far fewer
    // records than refusals (at least 200 refusals per window).
    assert!(rep.len() >= 2, "{rep:?}");
    assert!(
        rep.len() * 100 <= sent,
        "{} records for {sent} refusals",
        rep.len()
    );
    assert_eq!(with_rule(&records, "rate.flood").len(), 1);
    assert!(agent.stop().success());
    // Nothing more was counted after the flood: no further record at the stop.
    assert_eq!(repeated(&audit(&data)).len(), rep.len());
}
