//! The incident service against a real ledger on disk: the checkpoint view's bytes, the one
//! rollback orchestration (dry run, applied), and reports decided by a policy bundle.
//! Replays run transactions in real domains: `dom0-agent`'s `attack.rs` (sandbox) covers
//! them; here no domain is ever taken.

use std::sync::Arc;

use mayfly_executor::testing::NoDomains;
use mayfly_executor::{Executor, ExecutorConfig};
use mayfly_incident::{view, Incidents, ReportError, ReportTarget, RollbackOrder};
use mayfly_ledger::{Ledger, Options, Record, TxContext, TxId};
use slog::{o, Discard, Logger};

const POLICY: &str = r#"
[engine]
unlisted_handler = "allow"

[[external]]
name = "undo-tx"
target = "tx"
action = "rollback+cascade"

[[external]]
name = "watch-handler"
target = "handler"
action = "rollback"
"#;

fn setup() -> (tempfile::TempDir, Arc<Executor>, Incidents) {
    let dir = tempfile::tempdir().unwrap();
    let log = Logger::root(Discard, o!());
    let ledger = Ledger::open(dir.path(), &Options::default(), &log).unwrap();
    let bundle = mayfly_policy::Bundle::load(&[("p.toml", POLICY)]).unwrap();
    let executor = Arc::new(Executor::new(
        ledger,
        Arc::new(NoDomains),
        ["h".to_owned()],
        ExecutorConfig::default(),
        bundle,
        &log,
    ));
    let incidents = Incidents::new(executor.clone(), &log);
    (dir, executor, incidents)
}

/// Commits a transaction straight through the ledger: reads `reads`, writes `writes`.
fn commit(ledger: &Ledger, id: u8, reads: &[&str], writes: &[(&str, &str)]) -> u64 {
    let mut tx = ledger
        .begin(TxContext {
            tx_id: TxId([id; 16]),
            handler: "h".into(),
            request: format!("req-{id}").into_bytes(),
            domain_id: u64::from(id),
            policy_hash: [7; 32],
        })
        .unwrap();
    tx.set_client("client-a");
    for k in reads {
        tx.get(k.as_bytes()).unwrap();
    }
    for (k, v) in writes {
        tx.put(k.as_bytes(), v.as_bytes()).unwrap();
    }
    tx.commit(format!("res-{id}").into_bytes()).unwrap().seq
}

#[test]
fn the_checkpoint_view_shows_what_clients_read() {
    let (_d, ex, _) = setup();
    let seq = commit(ex.ledger(), 1, &[], &[("kv/a", "1")]);
    let cp = ex.ledger().store().checkpoint(seq).unwrap().unwrap();
    let hash = "07".repeat(32);
    let digest = mayfly_ledger::codec::hex(&mayfly_ledger::checkpoint::sha256(b"req-1"));
    // The API's `checkpoint` object, byte for byte.
    assert_eq!(
        view::checkpoint_summary(&cp).to_string(),
        format!(
            r#"{{"begin_ns":{},"client":"client-a","commit_ns":{},"domain_id":1,"handler":"h","policy_hash":"{hash}","reads":0,"request_digest":"{digest}","seq":{seq},"writes":1,"written_keys":["kv/a"]}}"#,
            cp.begin_ns, cp.commit_ns
        )
    );
    // The console's list entry, and what `show` adds.
    let record = Record::Transaction(cp.clone());
    let tx_id = TxId([1; 16]).to_string();
    assert_eq!(
        view::record(&record, false).to_string(),
        format!(
            r#"{{"client":"client-a","commit_ns":{},"domain_id":1,"handler":"h","kind":"transaction","policy_hash":"{hash}","reads":0,"seq":{seq},"tx_id":"{tx_id}","writes":1}}"#,
            cp.commit_ns
        )
    );
    let shown = view::record(&record, true);
    assert_eq!(shown["request"], "req-1");
    assert_eq!(shown["result"], "res-1");
    assert_eq!(shown["write_set"][0]["after"], "1");
    assert_eq!(shown["write_set"][0]["before"], serde_json::Value::Null);
    assert_eq!(shown["begin_ns"], cp.begin_ns);
}

#[test]
fn a_dry_run_plans_and_writes_nothing_then_the_rollback_restores() {
    let (_d, ex, incidents) = setup();
    let ledger = ex.ledger();
    let attack = commit(ledger, 1, &[], &[("kv/a", "stolen")]);
    let reader = commit(ledger, 2, &["kv/a"], &[("kv/b", "derived")]);
    let tip = ledger.tips().checkpoints.seq;
    let order = RollbackOrder {
        root: attack,
        cascade: true,
        replay: true,
        dry_run: true,
        why: "test",
        policy_hash: [0; 32],
    };
    let planned = incidents.rollback(&order).unwrap();
    assert_eq!(planned.plan.affected, vec![attack, reader]);
    assert_eq!(planned.rollback_seq, None);
    assert!(
        planned.replayed.unwrap().is_empty(),
        "a dry run replays nothing"
    );
    assert_eq!(
        ledger.tips().checkpoints.seq,
        tip,
        "a dry run writes nothing"
    );
    assert!(ledger.store().committed(b"kv/a").unwrap().is_some());

    let done = incidents
        .rollback(&RollbackOrder {
            dry_run: false,
            replay: false,
            ..order
        })
        .unwrap();
    let seq = done.rollback_seq.expect("applied");
    assert_eq!(seq, tip + 1);
    assert!(done.replayed.unwrap().is_empty(), "no replay was asked for");
    assert_eq!(ledger.store().committed(b"kv/a").unwrap(), None);
    assert_eq!(ledger.store().committed(b"kv/b").unwrap(), None);
    assert_eq!(ledger.store().undone_by(attack).unwrap(), Some(seq));
}

#[test]
fn reports_are_decided_by_the_policy_and_carried_out_or_refused() {
    let (_d, ex, incidents) = setup();
    let ledger = ex.ledger();
    let attack = commit(ledger, 1, &[], &[("kv/a", "stolen")]);
    let target = ReportTarget::Tx(TxId([1; 16]));

    let dry = incidents.report(&target, "ids", true).unwrap();
    assert_eq!(dry.action, "rollback+cascade");
    assert_eq!(dry.rule.as_deref(), Some("undo-tx"));
    assert_eq!(dry.plan.unwrap().affected, vec![attack]);
    assert_eq!(dry.rollback_seq, None);

    let done = incidents.report(&target, "ids", false).unwrap();
    assert!(done.rollback_seq.is_some());
    assert_eq!(ledger.store().committed(b"kv/a").unwrap(), None);

    // Unknown transaction: not found. A handler names no commit: refused, and audited.
    let missing = incidents.report(&ReportTarget::Tx(TxId([9; 16])), "ids", false);
    assert!(
        matches!(missing, Err(ReportError::NotFound(_))),
        "{missing:?}"
    );
    let handler = incidents.report(&ReportTarget::Handler("h".into()), "ids", false);
    assert!(
        matches!(
            handler,
            Err(ReportError::Unsupported {
                action: "rollback",
                ..
            })
        ),
        "{handler:?}"
    );
    let tip = ledger.tips().audit.seq;
    let outcomes: Vec<String> = ledger
        .store()
        .audit_records(1, usize::try_from(tip).unwrap())
        .unwrap()
        .into_iter()
        .filter(|r| r.event.event == "report.completed")
        .map(|r| r.event.fields["outcome"].clone())
        .collect();
    assert_eq!(outcomes, ["planned", "done", "failed", "failed"]);
}
