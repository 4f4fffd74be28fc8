//! The attack scenario, end to end on the sandbox backend: the vulnerable `notes` handler is
//! exploited to mint money for an attacker and to corrupt another account; 50+ later
//! transactions read the damaged keys; the attack is reported after the fact; a cascading
//! rollback with replay must leave exactly the database a fresh appliance reaches by running
//! only the legitimate transactions, in the same order. Compared key by key.

use std::path::Path;
use std::sync::Arc;

use mayfly_executor::{Executor, ExecutorConfig, TxOutcome, TxRequest, TxStatus};
use mayfly_ledger::{verify, Ledger, Options};
use mayfly_sandbox::{Sandbox, SandboxConfig};
use serde_json::{json, Value};
use slog::{o, Discard, Logger};

struct Appliance {
    executor: Arc<Executor>,
    incidents: mayfly_incident::Incidents,
    backend: Arc<Sandbox>,
}

impl Appliance {
    fn start(dir: &Path) -> Self {
        let log = Logger::root(Discard, o!());
        let ledger = Ledger::open(&dir.join("data"), &Options::default(), &log).unwrap();
        let config = SandboxConfig::new(
            env!("CARGO_BIN_EXE_mayfly-zygote"),
            Vec::<String>::new(),
            dir.join("run"),
        );
        let backend = Arc::new(Sandbox::start(config, log.clone()).unwrap());
        let names = mayfly_handlers::registry()
            .names()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        // A permissive policy: this attack was not caught when it happened.
        let permissive = mayfly_policy::Bundle::load(&[(
            "allow.toml",
            "[engine]\nunlisted_handler = \"allow\"\n",
        )])
        .unwrap();
        let executor = Arc::new(Executor::new(
            ledger,
            backend.clone(),
            names,
            ExecutorConfig::default(),
            permissive,
            &log,
        ));
        let incidents = mayfly_incident::Incidents::new(executor.clone(), &log);
        Self {
            executor,
            incidents,
            backend,
        }
    }

    fn run(&self, handler: &str, payload: Value) -> TxOutcome {
        self.executor
            .execute(&TxRequest {
                handler: handler.into(),
                payload: serde_json::to_vec(&payload).unwrap(),
                client: "test".into(),
            })
            .unwrap()
    }

    fn ledger(&self) -> &Ledger {
        self.executor.ledger()
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.executor.wait_for_reapers();
        mayfly_domain::DomainBackend::shutdown(&*self.backend);
    }
}

fn transfer(from: &str, to: &str, amount: u64) -> (&'static str, Value) {
    (
        "transfer",
        json!({"from": from, "to": to, "amount": amount}),
    )
}

#[test]
fn rollback_with_replay_equals_running_only_the_legitimate_transactions() {
    // The legitimate history, in order; `None` marks where the attacker acts.
    let mut history: Vec<Option<(&'static str, Value)>> = Vec::new();
    for name in ["alice", "bob", "carol", "dave"] {
        history.push(Some((
            "open_account",
            json!({"name": name, "balance": 1000}),
        )));
    }
    history.push(Some((
        "open_account",
        json!({"name": "mallory", "balance": 0}),
    )));
    for i in 0..10 {
        history.push(Some(transfer(
            ["alice", "carol"][i % 2],
            ["carol", "dave"][i % 2],
            3,
        )));
    }
    history.push(None); // the attack: mint money, corrupt bob
    for i in 0..55 {
        // Each reads bob's corrupted balance: a dependent of the attack.
        history.push(Some(transfer("bob", "alice", 5)));
        if i % 3 == 0 {
            // Independent work in between.
            history.push(Some(transfer("carol", "dave", 1)));
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let attacked = Appliance::start(&dir.path().join("a"));
    let mut roots = Vec::new();
    for step in &history {
        match step {
            Some((handler, payload)) => {
                let o = attacked.run(handler, payload.clone());
                assert_eq!(
                    o.status,
                    TxStatus::Committed,
                    "{handler} {payload}: {:?}",
                    o.error
                );
            }
            None => {
                for (target, text) in [("mallory", "1000000"), ("bob", "999999")] {
                    let o = attacked.run(
                        "notes",
                        json!({"user": "mallory", "note_id": format!("../../acct/{target}"), "text": text}),
                    );
                    assert_eq!(o.status, TxStatus::Committed, "{:?}", o.error);
                    roots.push(o.seq.unwrap());
                }
                // The attacker cashes out; this reads the minted money and must not survive.
                let o = attacked.run(
                    "transfer",
                    json!({"from": "mallory", "to": "dave", "amount": 500000}),
                );
                assert_eq!(o.status, TxStatus::Committed);
            }
        }
    }
    let store = attacked.ledger().store();
    assert_eq!(
        store.committed(b"acct/mallory").unwrap().unwrap().1,
        b"500000"
    );

    // Reported after the fact.
    let dry = store.plan_rollback(&roots, true).unwrap();
    // Two attack transactions, 55 bob-to-alice transfers and the cash-out.
    assert!(dry.affected.len() >= 58, "affected {}", dry.affected.len());
    let (plan, _) = attacked
        .ledger()
        .rollback(&roots, true, "notes exploit reported by the IDS", [0; 32])
        .unwrap();
    assert_eq!(plan.affected, dry.affected);
    let replays = attacked.incidents.replay(&plan.replay).unwrap();
    assert_eq!(replays.len(), plan.replay.len());
    let cash_out = replays.iter().find(|r| {
        r.outcome
            .as_ref()
            .is_ok_and(|o| o.status == TxStatus::Aborted)
    });
    assert!(
        cash_out.is_some(),
        "the attacker's transfer must now fail for lack of funds"
    );
    assert!(
        replays.iter().any(|r| !r.same_result),
        "results built on the corrupted balance change"
    );
    let (ok, failures) = {
        let r = verify(store, &[attacked.ledger().public_key()], &mut |_| {}).unwrap();
        (r.ok(), r.failures)
    };
    assert!(ok, "{failures:?}");

    // A fresh appliance runs only the legitimate transactions, in the same order.
    let clean = Appliance::start(&dir.path().join("b"));
    for (handler, payload) in history.iter().flatten() {
        let o = clean.run(handler, payload.clone());
        assert_eq!(o.status, TxStatus::Committed, "{:?}", o.error);
    }

    let got = attacked.ledger().store().data_snapshot().unwrap();
    let want = clean.ledger().store().data_snapshot().unwrap();
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "key {}", String::from_utf8_lossy(k));
    }
    for k in got.keys() {
        assert!(
            want.contains_key(k),
            "extra key {}",
            String::from_utf8_lossy(k)
        );
    }
    assert_eq!(got.len(), want.len());
}
