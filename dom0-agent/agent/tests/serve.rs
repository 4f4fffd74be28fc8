//! The transaction path end to end, with real processes: `dom0-agent serve` on the sandbox
//! backend, driven over HTTP on loopback.

mod common;

use std::collections::BTreeSet;

use common::{audit, process_alive, raw_request, verify, Agent};
use serde_json::{json, Value};

fn open(agent: &Agent, name: &str, balance: u64) {
    let (code, body) = agent.tx("open_account", json!({"name": name, "balance": balance}));
    assert_eq!(code, 200, "{body}");
}

fn balance(agent: &Agent, name: &str) -> u64 {
    let (code, body) = agent.tx("balance", json!({"name": name}));
    assert_eq!(code, 200, "{body}");
    body["result"]["balance"]
        .as_u64()
        .unwrap_or_else(|| panic!("no balance in {body}"))
}

#[test]
fn transactions_commit_with_checkpoints_each_in_its_own_vanished_domain() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &[]);
    open(&agent, "alice", 100);
    open(&agent, "bob", 0);

    let mut tx_ids = Vec::new();
    for _ in 0..5 {
        let (code, body) = agent.tx(
            "transfer",
            json!({"from": "alice", "to": "bob", "amount": 7}),
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "committed");
        tx_ids.push(body["tx_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(balance(&agent, "alice"), 65);
    assert_eq!(balance(&agent, "bob"), 35);

    // The overdraft is refused by the handler: 422, nothing written.
    let (code, body) = agent.tx(
        "transfer",
        json!({"from": "bob", "to": "alice", "amount": 1000}),
    );
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["status"], "aborted");
    assert!(
        body["error"].as_str().unwrap().contains("insufficient"),
        "{body}"
    );
    let aborted_id = body["tx_id"].as_str().unwrap().to_owned();
    assert_eq!(balance(&agent, "bob"), 35);

    // Checkpoint summaries come from the ledger.
    let (code, body) = agent.get(&format!("/v1/transactions/{}", tx_ids[0]));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "committed");
    assert_eq!(body["checkpoint"]["handler"], "transfer");
    assert_eq!(body["checkpoint"]["writes"], 2);
    let keys: BTreeSet<&str> = body["checkpoint"]["written_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, BTreeSet::from(["acct/alice", "acct/bob"]));
    let (code, body) = agent.get(&format!("/v1/transactions/{aborted_id}"));
    assert_eq!((code, body["status"].as_str()), (200, Some("aborted")));
    let (code, _) = agent.get(&format!("/v1/transactions/{}", "0".repeat(32)));
    assert_eq!(code, 404);

    // Every transaction ran in its own clone, and no clone outlived its transaction. Clones
    // of committed transactions are destroyed just after the answer: wait (bounded) until
    // the pool reports none in use.
    let mut settled = false;
    for _ in 0..10_000 {
        let (_, health) = agent.get("/v1/health");
        if health["pool"]["in_use"] == 0 {
            settled = true;
            break;
        }
        std::thread::yield_now();
    }
    assert!(
        settled,
        "clones still in use after every transaction answered"
    );
    // The destroyed records are routine lifecycle records: they ride with the next group
    // commit, or are committed alone within the ledger's lazy-audit delay. Read the audit
    // until every started domain's end is there (bounded in time).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let events = loop {
        let events = audit(dir.path());
        let count = |name: &str| events.iter().filter(|(e, _)| e == name).count();
        if count("domain.destroyed") >= count("domain.started")
            || std::time::Instant::now() > deadline
        {
            break events;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let handles: Vec<u32> = events
        .iter()
        .filter(|(e, _)| e == "domain.cloned")
        .map(|(_, f)| f["handle"].parse().unwrap())
        .collect();
    assert!(handles.len() >= 10, "{handles:?}");
    let distinct: BTreeSet<_> = handles.iter().collect();
    assert_eq!(
        distinct.len(),
        handles.len(),
        "a domain was reused: {handles:?}"
    );
    for pid in &handles {
        assert!(
            !process_alive(*pid),
            "clone {pid} still exists after its transaction: {:?}",
            std::fs::read_to_string(format!("/proc/{pid}/status")).map(|s| s
                .lines()
                .take(8)
                .collect::<Vec<_>>()
                .join(" | "))
        );
    }
    let started = events.iter().filter(|(e, _)| e == "domain.started").count();
    let destroyed = events
        .iter()
        .filter(|(e, _)| e == "domain.destroyed")
        .count();
    assert_eq!(started, handles.len());
    assert_eq!(destroyed, started, "destroyed {destroyed} of {started}");

    let (code, health) = agent.get("/v1/health");
    assert_eq!(code, 200);
    assert_eq!(health["backend"], "sandbox");
    assert!(health["ledger"]["checkpoint_seq"].as_u64().unwrap() >= 8);

    assert!(agent.stop().success());
    let (ok, out) = verify(dir.path());
    assert!(ok, "{out}");
}

#[test]
fn bad_requests_get_clear_client_errors() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    let (code, body) = agent.post("{not json");
    assert_eq!(code, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed request"),
        "{body}"
    );
    let (code, body) = agent.post(r#"{"handler":"transfer","payload":{},"surprise":1}"#);
    assert_eq!(code, 400, "{body}");
    let (code, body) = agent.tx("no_such_handler", json!({}));
    assert_eq!(code, 404);
    assert!(
        body["error"].as_str().unwrap().contains("known: "),
        "{body}"
    );
    let big = json!({"handler": "kv", "payload": "x".repeat(70_000)}).to_string();
    let (code, _) = agent.post(&big);
    assert_eq!(code, 413);
    let huge = vec![b' '; 300 * 1024];
    let (code, _) = raw_request(agent.addr, "POST", "/v1/transactions", &huge);
    assert_eq!(code, 413);
    let (code, _) = agent.get("/v1/nothing");
    assert_eq!(code, 404);
    let (code, _) = agent.get("/v1/transactions/not-hex");
    assert_eq!(code, 400);
}

#[test]
fn an_idempotency_key_runs_a_transaction_once() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    open(&agent, "a", 10);
    open(&agent, "b", 0);
    let body = json!({"handler": "transfer", "payload": {"from": "a", "to": "b", "amount": 1}, "idempotency_key": "order-1"}).to_string();
    let (c1, r1) = agent.post(&body);
    let (c2, r2) = agent.post(&body);
    assert_eq!((c1, c2), (200, 200));
    assert_eq!(r1["tx_id"], r2["tx_id"]);
    assert_eq!(
        balance(&agent, "b"),
        1,
        "the repeat must not transfer again"
    );
    let other = json!({"handler": "transfer", "payload": {"from": "a", "to": "b", "amount": 2}, "idempotency_key": "order-1"}).to_string();
    let (code, _) = agent.post(&other);
    assert_eq!(code, 422, "same key, different request");
}

/// Idempotency keys are durable (issue 18): after the agent restarts (its in-memory
/// cache gone), a resend gets the original outcome from the ledger and does not run again;
/// the same key for another request is still refused.
#[test]
fn an_idempotency_key_outlives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &[]);
    open(&agent, "a", 10);
    open(&agent, "b", 0);
    let body = json!({"handler": "transfer", "payload": {"from": "a", "to": "b", "amount": 3}, "idempotency_key": "order-7"}).to_string();
    let (c1, r1) = agent.post(&body);
    assert_eq!(c1, 200, "{r1}");
    agent.stop();
    let agent = Agent::start(dir.path(), &[]);
    let (c2, r2) = agent.post(&body);
    assert_eq!(c2, 200, "{r2}");
    assert_eq!(r1["tx_id"], r2["tx_id"]);
    assert_eq!(r1["seq"], r2["seq"]);
    assert_eq!(r1["result"], r2["result"]);
    assert_eq!(r2["answered_from"], "ledger");
    assert_eq!(
        balance(&agent, "b"),
        3,
        "the resend must not transfer again"
    );
    let other = json!({"handler": "transfer", "payload": {"from": "a", "to": "b", "amount": 4}, "idempotency_key": "order-7"}).to_string();
    assert_eq!(agent.post(&other).0, 422, "same key, different request");
    // A key with a control character is refused before anything runs.
    let bad = json!({"handler": "transfer", "payload": {"from": "a", "to": "b", "amount": 1}, "idempotency_key": "a\nb"}).to_string();
    assert_eq!(agent.post(&bad).0, 400);
    assert_eq!(balance(&agent, "b"), 3);
}

#[test]
fn many_concurrent_clients_keep_the_bank_total_constant() {
    const ACCOUNTS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &["--pool-size", "8"]);
    for i in 0..ACCOUNTS {
        open(&agent, &format!("u{i}"), 1000);
    }
    let addr = agent.addr;
    let clients: Vec<_> = (0..8)
        .map(|c| {
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(c);
                let mut committed = 0;
                for _ in 0..25 {
                    let from = rng.usize(..ACCOUNTS);
                    let to = (from + rng.usize(1..ACCOUNTS)) % ACCOUNTS;
                    let body = json!({"handler": "transfer", "payload": {"from": format!("u{from}"), "to": format!("u{to}"), "amount": rng.u64(1..=300)}});
                    let (code, resp) = common::request(addr, "POST", "/v1/transactions", &body.to_string());
                    match code {
                        200 => committed += 1,
                        422 => assert!(resp["error"].as_str().unwrap().contains("insufficient"), "{resp}"),
                        // Contention beyond the retry budget: reported, nothing written.
                        409 => assert_eq!(resp["error"], "serialization conflicts on every attempt"),
                        _ => panic!("{code}: {resp}"),
                    }
                }
                committed
            })
        })
        .collect();
    let committed: u32 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(
        committed > 100,
        "only {committed} of 200 transfers committed"
    );
    let total: u64 = (0..ACCOUNTS)
        .map(|i| balance(&agent, &format!("u{i}")))
        .sum();
    assert_eq!(total, ACCOUNTS as u64 * 1000);
    assert!(agent.stop().success());
    let (ok, out) = verify(dir.path());
    assert!(ok, "{out}");
    let _: Value = Value::Null;
}

#[test]
fn a_config_file_sets_limits_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "max_in_flight = 7\npool_size = 2\ntx_timeout_ms = 4000\n",
    )
    .unwrap();
    let conf = config.to_str().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--config", conf]);
    let (_, health) = agent.get("/v1/health");
    assert_eq!(health["max_in_flight"], 7, "{health}");
    drop(agent);
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--config", conf, "--max-in-flight", "3"],
    );
    let (_, health) = agent.get("/v1/health");
    assert_eq!(health["max_in_flight"], 3, "the flag must win: {health}");
}

#[test]
fn a_bad_config_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "max_in_flight = 7\npool_sise = 2\n").unwrap();
    let out = std::process::Command::new(common::agent_exe())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pool_sise"), "{err}");
    let out = std::process::Command::new(common::agent_exe())
        .args(["serve", "--backend", "kvm", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend \"kvm\""));
}

#[test]
fn the_xen_backend_off_xen_stops_with_what_is_missing() {
    // This test runs where there is no Xen hypervisor: `--backend xen` must refuse to
    // start, with the reason, and never fall back to the sandbox.
    if std::path::Path::new("/dev/xen/privcmd").exists() {
        eprintln!("a Xen dom0: skipped (the Xen-in-QEMU suite covers it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(common::agent_exe())
            .args([
                "serve",
                "--backend",
                "xen",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The default guest is the Mayfly PV guest: without its kernel, it is named.
    let (code, err) = run(&[]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("mayfly_kernel"), "{err}");
    // The Linux guest without its template: the missing setting is named.
    let (code, err) = run(&["--xen-guest".as_ref(), "linux".as_ref()]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("--xen-kernel"), "{err}");
    // A Mayfly guest kernel but no Xen: the missing library or interface is named.
    let pv = dir.path().join("mayfly-pv-guest");
    std::fs::write(&pv, b"\x7fELF").unwrap();
    let (code, err) = run(&["--xen-mayfly-kernel".as_ref(), pv.as_os_str()]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("starting the xen backend"), "{err}");
    // A template but no Xen: the missing library or interface is named.
    let kernel = dir.path().join("vmlinux");
    let ramdisk = dir.path().join("initramfs");
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&ramdisk, b"r").unwrap();
    let (code, err) = run(&[
        "--xen-guest".as_ref(),
        "linux".as_ref(),
        "--xen-kernel".as_ref(),
        kernel.as_os_str(),
        "--xen-ramdisk".as_ref(),
        ramdisk.as_os_str(),
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("starting the xen backend"), "{err}");
    assert!(
        err.contains("cannot load libxen") || err.contains("xc_interface_open failed"),
        "{err}"
    );
}

#[test]
fn the_shipped_policy_quarantines_the_notes_exploit_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &[]);
    open(&agent, "mallory", 0);
    // Ordinary use of the vulnerable handler stays inside notes/ and is allowed.
    let (code, body) = agent.tx(
        "notes",
        json!({"user": "alice", "note_id": "n1", "text": "hi"}),
    );
    assert_eq!(code, 200, "{body}");
    // The path-traversal exploit writes acct/mallory: stopped before it is served.
    let (code, body) = agent.tx(
        "notes",
        json!({"user": "mallory", "note_id": "../../acct/mallory", "text": "1000000"}),
    );
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["error"],
        "denied by policy rule handler.notes.write (quarantine)"
    );
    assert_eq!(
        balance(&agent, "mallory"),
        0,
        "nothing of the attack was written"
    );
    let tx_id = body["tx_id"].as_str().unwrap().to_owned();
    let events = audit(dir.path());
    let mine: Vec<&(String, std::collections::BTreeMap<String, String>)> = events
        .iter()
        .filter(|(_, f)| f.get("tx_id").map(String::as_str) == Some(tx_id.as_str()))
        .collect();
    let decision = mine
        .iter()
        .find(|(e, _)| e == "policy.decision")
        .expect("decision audited");
    assert_eq!(decision.1["rule"], "handler.notes.write");
    assert_eq!(decision.1["action"], "quarantine");
    // The domain is kept, stopped, for forensics.
    let (_, q) = mine
        .iter()
        .find(|(e, _)| e == "domain.quarantined")
        .expect("quarantine audited");
    let pid: u32 = q["handle"].parse().unwrap();
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = state
        .rsplit(')')
        .next()
        .unwrap()
        .trim_start()
        .chars()
        .next()
        .unwrap();
    assert_eq!(
        state, 'T',
        "the quarantined clone must be stopped, not running or gone"
    );
    assert!(agent.stop().success());
    assert!(!process_alive(pid), "shutdown releases quarantined domains");
}

#[test]
fn a_client_cannot_pile_up_quarantined_domains() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &[]);
    open(&agent, "mallory", 0);
    // The backend keeps at most 8 (mayfly_domain::MAX_QUARANTINED); the 9th is destroyed.
    for _ in 0..9 {
        let (code, body) = agent.tx(
            "notes",
            json!({"user": "mallory", "note_id": "../../acct/mallory", "text": "1000000"}),
        );
        assert_eq!(code, 403, "{body}");
    }
    let events = audit(dir.path());
    let count = |name: &str| events.iter().filter(|(e, _)| e == name).count();
    assert_eq!(count("domain.quarantined"), 8);
    assert_eq!(count("domain.destroy_failed"), 0);
    let failed: Vec<_> = events
        .iter()
        .filter(|(e, _)| e == "domain.quarantine_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{events:?}");
    assert!(
        failed[0].1["error"].contains("killed instead"),
        "{failed:?}"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_detector_report_rolls_back_and_replays_through_the_running_agent() {
    let dir = tempfile::tempdir().unwrap();
    // A permissive bundle (the exploit is not caught when it happens) with the IDS hook.
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.toml"),
        "[engine]\nunlisted_handler = \"allow\"\n\n[[external]]\nname = \"ids.tx\"\ntarget = \"tx\"\naction = \"rollback+cascade+replay\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &["--policy", policy.to_str().unwrap()]);
    open(&agent, "mallory", 0);
    open(&agent, "bob", 0);
    let (code, body) = agent.tx(
        "notes",
        json!({"user": "mallory", "note_id": "../../acct/mallory", "text": "1000"}),
    );
    assert_eq!(code, 200, "{body}");
    let attack = body["tx_id"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        let (code, body) = agent.tx(
            "transfer",
            json!({"from": "mallory", "to": "bob", "amount": 100}),
        );
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(balance(&agent, "bob"), 300);

    let report = |token: &str, dry_run: bool| {
        let body =
            json!({"tx_id": attack, "reason": "ids signature 7", "dry_run": dry_run}).to_string();
        let mut s = std::net::TcpStream::connect(agent.addr).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "POST /v1/reports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        let code: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, serde_json::from_str::<Value>(body).unwrap())
    };
    // A key longer than any key can be is a client error, not a storage failure.
    let long = json!({"key": "k".repeat(600), "reason": "x"}).to_string();
    let mut s = std::net::TcpStream::connect(agent.addr).unwrap();
    {
        use std::io::{Read, Write};
        let token = std::fs::read_to_string(data.join("detector.token")).unwrap();
        write!(
            s,
            "POST /v1/reports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{long}",
            token.trim(),
            long.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    }
    // Without the token: refused, and audited.
    let (code, _) = report("wrong-token", false);
    assert_eq!(code, 401);
    assert!(audit(&data).iter().any(|(e, _)| e == "report.rejected"));

    let token = std::fs::read_to_string(data.join("detector.token")).unwrap();
    let token = token.trim();
    // A dry run shows the plan and changes nothing.
    let (code, body) = report(token, true);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["action"], "rollback+cascade+replay");
    // The attack, the three transfers, and the balance query that read bob's money.
    assert_eq!(body["rollback"]["affected"].as_array().unwrap().len(), 5);
    assert_eq!(balance(&agent, "bob"), 300);

    // The real report: the attack and its dependents are undone and the dependents
    // replayed (the transfers now fail: the money never existed); balances repaired.
    let (code, body) = report(token, false);
    assert_eq!(code, 200, "{body}");
    let replayed = body["replayed"].as_array().unwrap();
    // Everything affected but the attack is replayed: the three transfers and the two
    // balance queries that read bob's balance (dependents too).
    let affected = body["rollback"]["affected"].as_array().unwrap().len();
    assert_eq!(affected, 6, "{body}");
    assert_eq!(replayed.len(), affected - 1);
    assert_eq!(
        replayed.iter().filter(|r| r["status"] == "aborted").count(),
        3,
        "{body}"
    );
    assert!(replayed.iter().all(|r| r["same_result"] == false), "{body}");
    assert_eq!(balance(&agent, "mallory"), 0);
    assert_eq!(balance(&agent, "bob"), 0);
    let events = audit(&data);
    for e in ["policy.decision", "rollback.applied", "rollback.replayed"] {
        assert!(events.iter().any(|(x, _)| x == e), "missing {e}");
    }
}

#[test]
fn a_honeytoken_touch_is_stopped_at_once_and_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    // `acct/~canary` is a honeytoken of the shipped bundle; the notes exploit aims at it.
    let (code, body) = agent.tx(
        "notes",
        json!({"user": "eve", "note_id": "../../acct/~canary", "text": "1"}),
    );
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["error"],
        "denied by policy rule canary.accounts (quarantine)"
    );
    let store =
        mayfly_ledger::store::open_read_only(dir.path(), &mayfly_ledger::StoreOptions::default())
            .unwrap();
    assert_eq!(
        store.committed(b"acct/~canary").unwrap(),
        None,
        "nothing was written"
    );
    assert!(store
        .seq_of(&mayfly_ledger::TxId::parse(body["tx_id"].as_str().unwrap()).unwrap())
        .unwrap()
        .is_none());
}

#[test]
fn sighup_reloads_the_policy_under_load_and_refuses_a_malformed_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let file = policy.join("p.toml");
    std::fs::write(&file, "[engine]\nunlisted_handler = \"allow\"\n# v1\n").unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &["--policy", policy.to_str().unwrap()]);
    for n in ["a", "b"] {
        open(&agent, n, 1_000_000);
    }
    let addr = agent.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut codes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && codes.len() < 5_000 {
                let body = json!({"handler": "transfer", "payload": {"from": "a", "to": "b", "amount": 1}});
                codes.push(common::request(addr, "POST", "/v1/transactions", &body.to_string()).0);
            }
            codes
        })
    };
    let pid =
        nix::unistd::Pid::from_raw(i32::try_from(agent.child.as_ref().unwrap().id()).unwrap());
    let wait_for = |event: &str, count: usize| {
        for _ in 0..100_000 {
            if audit(&data).iter().filter(|(e, _)| e == event).count() >= count {
                return;
            }
            std::thread::yield_now();
        }
        panic!("no {event} audit record");
    };
    std::fs::write(&file, "[engine]\nunlisted_handler = \"allow\"\n# v2\n").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for("policy.loaded", 1);
    std::fs::write(&file, "[engine]\nunlisted_handler = \"sometimes\"\n").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for("policy.rejected", 1);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let codes = load.join().unwrap();
    assert!(
        codes.iter().all(|c| *c == 200),
        "transactions failed during reloads: {codes:?}"
    );
    let (_, rejected) = audit(&data)
        .into_iter()
        .find(|(e, _)| e == "policy.rejected")
        .unwrap();
    assert!(rejected["error"].starts_with("p.toml:2:"), "{rejected:?}");
    // The agent still serves, under the v2 bundle.
    let (code, body) = agent.tx("transfer", json!({"from": "a", "to": "b", "amount": 1}));
    assert_eq!(code, 200, "{body}");
    let (_, loaded) = audit(&data)
        .into_iter()
        .find(|(e, _)| e == "policy.loaded")
        .unwrap();
    let (_, cp) = agent.get(&format!(
        "/v1/transactions/{}",
        body["tx_id"].as_str().unwrap()
    ));
    assert_eq!(
        cp["checkpoint"]["policy_hash"].as_str(),
        Some(loaded["policy_hash"].as_str())
    );
}

#[test]
fn a_rollback_without_cascade_is_refused_when_others_built_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    // This deployment's rule rolls back only the named transaction.
    std::fs::write(
        policy.join("p.toml"),
        "[engine]\nunlisted_handler = \"allow\"\n\n[[external]]\nname = \"ids.tx.single\"\ntarget = \"tx\"\naction = \"rollback\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &["--policy", policy.to_str().unwrap()]);
    open(&agent, "mallory", 0);
    open(&agent, "bob", 0);
    let (_, body) = agent.tx(
        "notes",
        json!({"user": "m", "note_id": "../../acct/mallory", "text": "500"}),
    );
    let attack = body["tx_id"].as_str().unwrap().to_owned();
    let (code, _) = agent.tx(
        "transfer",
        json!({"from": "mallory", "to": "bob", "amount": 200}),
    );
    assert_eq!(code, 200);
    let out = std::process::Command::new(common::agent_exe())
        .args(["report", "--agent", &agent.addr.to_string(), "--token-file"])
        .arg(data.join("detector.token"))
        .args(["--tx", &attack, "--reason", "ids"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the CLI reports the refusal");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("later commits read what the rolled-back transactions wrote"),
        "{text}"
    );
    // Nothing changed: no half-undone state.
    assert_eq!(balance(&agent, "bob"), 200);
    assert_eq!(balance(&agent, "mallory"), 300);
}

/// Children of `pid`, from `/proc/*/stat`.
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

#[test]
fn every_domain_is_forked_from_the_small_template_executable_not_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &["--pool-size", "2"]);
    open(&agent, "alice", 1);
    let agent_pid = agent.child.as_ref().unwrap().id();
    let zygote_exe = std::fs::canonicalize(common::zygote_exe()).unwrap();
    // The pool is refilled after the transaction above: wait (bounded) for a pooled clone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (zygote, clones) = loop {
        let zygotes: Vec<u32> = children(agent_pid)
            .into_iter()
            .filter(|p| {
                std::fs::read_link(format!("/proc/{p}/exe")).ok() == Some(zygote_exe.clone())
            })
            .collect();
        assert!(zygotes.len() <= 1, "{zygotes:?}");
        if let Some(&z) = zygotes.first() {
            let clones = children(z);
            if !clones.is_empty() {
                break (z, clones);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no zygote with clones under the agent"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // The static build (scripts/build-zygote.sh, 2 MiB-aligned segments) puts its code and
    // read-only data on transparent huge pages that every clone shares, where the kernel
    // has them; cargo's dynamic build keeps them file-backed.
    let static_build = std::env::var_os("MAYFLY_TEST_ZYGOTE").is_some();
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|t| !t.contains("[never]"));
    for pid in std::iter::once(zygote).chain(clones) {
        let (Ok(maps), Ok(smaps)) = (
            std::fs::read_to_string(format!("/proc/{pid}/maps")),
            std::fs::read_to_string(format!("/proc/{pid}/smaps")),
        ) else {
            continue; // a clone that ended meanwhile
        };
        if maps.is_empty() {
            continue; // a clone that ended meanwhile: a zombie's maps read empty
        }
        assert!(maps.contains("mayfly-zygote"), "{pid}: {maps}");
        assert!(
            !maps.contains("dom0-agent"),
            "the agent's executable is mapped in domain process {pid}: {maps}"
        );
        if static_build && thp {
            // Per mapping, not the process total (with THP "always" a heap could make that):
            // the image's anonymous r-x and r-- windows, each one whole huge page.
            let mut perms = "";
            let mut on_thp = Vec::new();
            for line in smaps.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields
                    .first()
                    .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
                {
                    // A header: anonymous (5 fields) or named (6+).
                    perms = if fields.len() == 5 { fields[1] } else { "" };
                } else if line.starts_with("AnonHugePages:")
                    && line.contains(" 2048 kB")
                    && (perms == "r-xp" || perms == "r--p")
                {
                    on_thp.push(perms);
                }
            }
            assert!(
                on_thp.contains(&"r-xp") && on_thp.iter().filter(|p| **p == "r--p").count() >= 1,
                "code and read-only data of {pid} not on huge pages ({on_thp:?}):\n{maps}"
            );
        }
    }
    assert!(agent.stop().success());
}

#[test]
fn a_missing_template_executable_is_refused_with_where_it_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-zygote");
    let out = std::process::Command::new(common::agent_exe())
        .args(["serve", "--listen", "127.0.0.1:0", "--zygote"])
        .arg(&missing)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("missing"),
        "{err}"
    );
    // Run by hand, the template says what it is instead of waiting for a control socket.
    let out = std::process::Command::new(common::zygote_exe())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not run by hand"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Settings above their upper bound (which would overflow a semaphore or a deadline, or
/// allocate per request) stop `serve` at once with an error naming the key, instead of a
/// panic or an abort later.
#[test]
fn out_of_range_settings_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, key) in [
        ("--max-connections", "99999999999", "max_connections"),
        (
            "--header-timeout-ms",
            "18446744073709551615",
            "header_timeout_ms",
        ),
        ("--tx-timeout-ms", "18446744073709551615", "tx_timeout_ms"),
        (
            "--max-header-bytes",
            "18446744073709551615",
            "max_header_bytes",
        ),
        ("--max-headers", "100000000", "max_headers"),
    ] {
        let mut child = std::process::Command::new(common::agent_exe())
            .args(["serve", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", flag, value])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // It must stop by itself; one that serves is stopped here and fails the test.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{flag} {value}: serve started instead of refusing the value");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("{key} = {value} is above its limit")),
            "{flag}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{flag}: {stderr}");
        assert!(
            !dir.path().join("data").exists(),
            "{flag}: the ledger was opened"
        );
    }
}

/// The agent's log on stderr failing (EPIPE: whoever read it went away) loses log lines,
/// never the agent: it goes on serving and stops cleanly, in either log format.
#[test]
fn a_closed_stderr_does_not_stop_the_agent() {
    use std::io::BufRead;
    for format in ["json", "term"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(common::agent_exe())
            .args(["--log-format", format, "--log-level", "debug", "serve"])
            .args(["--listen", "127.0.0.1:0", "--pool-size", "2", "--data-dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Nobody reads the log any more: the agent's next write gets EPIPE.
        drop(child.stderr.take());
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let addr: std::net::SocketAddr = loop {
            let line = lines.next().expect("agent exited before serving").unwrap();
            if let Some(rest) = line.strip_prefix("mayfly: serving on http://") {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        for i in 0..5 {
            let (code, body) = common::request(
                addr,
                "POST",
                "/v1/transactions",
                &json!({"handler": "open_account", "payload": {"name": format!("n{i}"), "balance": 1}})
                    .to_string(),
            );
            assert_eq!(code, 200, "{format}: {body}");
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{format}: {status:?}");
    }
}
