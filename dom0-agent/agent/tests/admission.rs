//! Admission through the real agent: transactions that run (or wait) hold no network
//! thread, and beyond `max_in_flight` a transaction is refused with 503 + Retry-After at
//! once (issue 15).

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use serde_json::json;

#[test]
fn slow_transactions_hold_no_network_thread_and_the_excess_gets_503_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let policy = common::permissive_policy(dir.path());
    let data = dir.path().join("data");
    let agent = Agent::start(
        &data,
        &[
            "--workers",
            "1",
            "--max-in-flight",
            "3",
            "--max-per-client",
            "3",
            "--tx-timeout-ms",
            "4000",
            &policy[0],
            &policy[1],
        ],
    );
    let (code, body) = agent.tx("open_account", json!({"name": "first", "balance": 1}));
    assert_eq!(code, 200, "{body}");
    let first = body["tx_id"].as_str().unwrap().to_owned();
    let addr = agent.addr;
    let slow: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                common::request(
                    addr,
                    "POST",
                    "/v1/transactions",
                    r#"{"handler":"test.loop_forever"}"#,
                )
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // One network thread, three transactions running: health is still answered.
        let (code, h) = agent.get("/v1/health");
        assert_eq!(code, 200);
        if h["in_flight"].as_u64() == Some(3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow transactions never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, raw) = common::raw_request(
        addr,
        "POST",
        "/v1/transactions",
        json!({"handler": "open_account", "payload": {"name": "late", "balance": 1}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(code, 503, "{}", String::from_utf8_lossy(&raw));
    assert!(String::from_utf8_lossy(&raw).contains("in flight"));
    // Answered while the three still run (the metrics below say 3 in flight): the refusal
    // did not wait for a place.
    let (code, metrics) = common::raw_request(addr, "GET", "/metrics", b"");
    assert_eq!(code, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("mayfly_api_admission_refused_total{limit=\"in_flight\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("mayfly_api_in_flight 3\n"), "{metrics}");
    for t in slow {
        let (code, body) = t.join().unwrap();
        assert_ne!(code, 503, "{body}");
    }
    // Admitted again once they ended; the earlier commit is intact.
    let (code, body) = agent.tx("open_account", json!({"name": "after", "balance": 1}));
    assert_eq!(code, 200, "{body}");
    let (code, body) = agent.get(&format!("/v1/transactions/{first}"));
    assert_eq!(code, 200, "{body}");
    drop(agent);
    // The refusal is in the audit trail, not only in the metrics.
    let refused: Vec<_> = common::audit(&data)
        .into_iter()
        .filter(|(e, _)| e == "tx.refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].1["limit"], "max_in_flight", "{refused:?}");
    assert_eq!(refused[0].1["client"], "127.0.0.1", "{refused:?}");
    let (ok, out) = common::verify(&data);
    assert!(ok, "{out}");
}
