//! Durable idempotency keys (issue 18): recorded in the commit of the transaction (an audit
//! record and an index entry), found again after a restart and on a standby, per client,
//! refused twice, and bounded by count and age.

use std::path::Path;

use mayfly_ledger::idempotency::{Retention, EVENT};
use mayfly_ledger::{
    CommitError, Ledger, Options, Replica, StoreOptions, TxContext, TxError, TxId,
};
use slog::{o, Discard, Logger};

fn open_with(dir: &Path, retention: Retention) -> Ledger {
    let opts = Options {
        idempotency: retention,
        ..Options::default()
    };
    Ledger::open(dir, &opts, &Logger::root(Discard, o!())).unwrap()
}

fn keyed(ledger: &Ledger, client: &str, key: &str, value: &str) -> Result<u64, CommitError> {
    let mut t = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "kv".into(),
            request: value.as_bytes().to_vec(),
            domain_id: 1,
            policy_hash: [0; 32],
        })
        .unwrap();
    t.set_client(client);
    t.set_idempotency_key(key).unwrap();
    t.put(b"k", value.as_bytes()).unwrap();
    t.commit(format!("result {value}").into_bytes())
        .map(|r| r.seq)
}

#[test]
fn a_key_is_durable_per_client_and_refused_twice() {
    let dir = tempfile::tempdir().unwrap();
    let seq;
    {
        let l = open_with(dir.path(), Retention::default());
        seq = keyed(&l, "spki:aa", "order-1", "1").unwrap();
        let cp = l
            .store()
            .idempotent_commit("spki:aa", "order-1")
            .unwrap()
            .unwrap();
        assert_eq!((cp.seq, cp.result.as_slice()), (seq, &b"result 1"[..]));
        // Another client's key of the same name is another key.
        assert!(l
            .store()
            .idempotent_commit("spki:bb", "order-1")
            .unwrap()
            .is_none());
        let other = keyed(&l, "spki:bb", "order-1", "2").unwrap();
        assert_ne!(other, seq);
        // The same client's key again: refused, nothing written.
        let tips = l.tips();
        match keyed(&l, "spki:aa", "order-1", "3") {
            Err(CommitError::IdempotencyKeyUsed { seq: s }) => assert_eq!(s, seq),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(l.tips().checkpoints, tips.checkpoints);
        // The audit chain says it, in the commit's own group.
        let recs = l.store().audit_records(1, 1000).unwrap();
        let rec = recs
            .iter()
            .find(|r| r.event.event == EVENT && r.event.fields["client"] == "spki:aa")
            .unwrap();
        assert_eq!(rec.event.fields["key"], "order-1");
        assert_eq!(rec.event.fields["seq"], seq.to_string());
    }
    // After a restart.
    let l = open_with(dir.path(), Retention::default());
    let cp = l
        .store()
        .idempotent_commit("spki:aa", "order-1")
        .unwrap()
        .unwrap();
    assert_eq!(cp.seq, seq);
}

#[test]
fn bad_keys_are_refused_before_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let l = open_with(dir.path(), Retention::default());
    let mut t = l
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "kv".into(),
            request: Vec::new(),
            domain_id: 1,
            policy_hash: [0; 32],
        })
        .unwrap();
    for bad in [String::new(), "x".repeat(129), "a\nb".into()] {
        assert!(matches!(
            t.set_idempotency_key(&bad),
            Err(TxError::BadIdempotencyKey { .. })
        ));
    }
    assert!(t.set_idempotency_key(&"x".repeat(128)).is_ok());
}

#[test]
fn retention_bounds_the_keys_by_count_and_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let l = open_with(
        dir.path(),
        Retention {
            max_keys: 3,
            max_age_ns: u64::MAX,
        },
    );
    for i in 0..5 {
        keyed(&l, "c", &format!("k{i}"), &i.to_string()).unwrap();
    }
    let kept: Vec<bool> = (0..5)
        .map(|i| {
            l.store()
                .idempotent_commit("c", &format!("k{i}"))
                .unwrap()
                .is_some()
        })
        .collect();
    assert_eq!(kept, [false, false, true, true, true]);
    // A forgotten key runs again.
    keyed(&l, "c", "k0", "again").unwrap();
    drop(l);

    let dir = tempfile::tempdir().unwrap();
    let l = open_with(
        dir.path(),
        Retention {
            max_keys: u64::MAX,
            max_age_ns: 1,
        },
    );
    keyed(&l, "c", "old", "1").unwrap();
    keyed(&l, "c", "new", "2").unwrap();
    assert!(l.store().idempotent_commit("c", "old").unwrap().is_none());
    assert!(l.store().idempotent_commit("c", "new").unwrap().is_some());
}

#[test]
fn a_standby_holds_the_keys_of_the_groups_it_applied() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let l = open_with(p.path(), Retention::default());
    let seq = keyed(&l, "spki:aa", "order-9", "9").unwrap();
    let mut standby = Replica::open(s.path(), &StoreOptions::default(), l.public_key()).unwrap();
    for g in 1..=l.tips().group {
        standby.apply(&l.store().export_group(g).unwrap()).unwrap();
    }
    let cp = standby
        .store()
        .idempotent_commit("spki:aa", "order-9")
        .unwrap()
        .unwrap();
    assert_eq!((cp.seq, cp.result.as_slice()), (seq, &b"result 9"[..]));
    assert!(standby
        .store()
        .idempotent_commit("spki:bb", "order-9")
        .unwrap()
        .is_none());
}
