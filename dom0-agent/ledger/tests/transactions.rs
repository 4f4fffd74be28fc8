//! Transaction semantics against a real LMDB on disk: checkpoints and indexes, serializable
//! isolation under real threads, group commit, restart.

use std::sync::{Arc, Barrier};

use mayfly_ledger::{verify, AuditEvent, CommitError, Ledger, Options, Severity, TxContext, TxId};

mod common;
use common::log;

fn open(dir: &std::path::Path) -> Ledger {
    Ledger::open(dir, &Options::default(), &log()).expect("open ledger")
}

fn ctx(handler: &str) -> TxContext {
    TxContext {
        tx_id: TxId::generate(),
        handler: handler.into(),
        request: b"req".to_vec(),
        domain_id: 42,
        policy_hash: [7; 32],
    }
}

fn put_all(ledger: &Ledger, kv: &[(&str, &str)]) -> u64 {
    let mut tx = ledger.begin(ctx("kv")).unwrap();
    for (k, v) in kv {
        tx.put(k.as_bytes(), v.as_bytes()).unwrap();
    }
    tx.commit(b"ok".to_vec()).unwrap().seq
}

fn assert_verifies(ledger: &Ledger) {
    let report = verify(ledger.store(), &[ledger.public_key()], &mut |_| {}).unwrap();
    assert!(report.ok(), "verify failed: {:?}", report.failures);
}

#[test]
fn commit_writes_data_checkpoint_and_dependency_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    let s1 = put_all(&ledger, &[("a", "1"), ("b", "2")]);

    let mut tx = ledger.begin(ctx("transfer")).unwrap();
    let id = tx.id();
    assert_eq!(tx.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(tx.get(b"nope").unwrap(), None);
    tx.put(b"b", b"3").unwrap();
    tx.delete(b"a").unwrap();
    assert_eq!(
        tx.get(b"a").unwrap(),
        None,
        "reads see the transaction's own delete"
    );
    let r = tx.commit(b"done".to_vec()).unwrap();
    assert_eq!(r.seq, s1 + 1);

    let cp = ledger.store().checkpoint(r.seq).unwrap().unwrap();
    assert_eq!(cp.tx_id, id);
    assert_eq!(cp.handler, "transfer");
    assert_eq!(cp.domain_id, 42);
    assert_eq!(cp.policy_hash, [7; 32]);
    assert_eq!(cp.request, b"req");
    assert_eq!(cp.result, b"done");
    let reads: Vec<_> = cp
        .reads
        .iter()
        .map(|r| (r.key.as_slice(), r.version))
        .collect();
    assert_eq!(reads, vec![(&b"a"[..], s1), (&b"nope"[..], 0)]);
    assert_eq!(cp.writes.len(), 2);
    assert_eq!(cp.writes[0].key, b"a");
    assert_eq!(
        (
            cp.writes[0].before_version,
            cp.writes[0].before.as_deref(),
            cp.writes[0].after.as_deref()
        ),
        (s1, Some(&b"1"[..]), None)
    );
    assert_eq!(cp.writes[1].key, b"b");
    assert_eq!(
        (
            cp.writes[1].before.as_deref(),
            cp.writes[1].after.as_deref()
        ),
        (Some(&b"2"[..]), Some(&b"3"[..]))
    );

    assert_eq!(ledger.store().seq_of(&id).unwrap(), Some(r.seq));
    assert_eq!(ledger.store().committed(b"a").unwrap(), None);
    assert_eq!(
        ledger.store().committed(b"b").unwrap(),
        Some((r.seq, b"3".to_vec()))
    );
    assert_eq!(ledger.store().writers_of(b"b").unwrap(), vec![s1, r.seq]);
    assert_eq!(
        ledger.store().writers_of(b"a").unwrap(),
        vec![s1, r.seq],
        "the delete is a write"
    );
    assert_eq!(ledger.store().depends_on(r.seq).unwrap(), vec![s1]);

    // A read of the deleted key records the tombstone's writer.
    let mut tx = ledger.begin(ctx("kv")).unwrap();
    assert_eq!(tx.get(b"a").unwrap(), None);
    let r3 = tx.commit(Vec::new()).unwrap();
    let cp3 = ledger.store().checkpoint(r3.seq).unwrap().unwrap();
    assert_eq!(cp3.reads[0].version, r.seq);
    assert_verifies(&ledger);
}

#[test]
fn affected_set_follows_read_from_transitively() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    let attack = put_all(&ledger, &[("a", "evil")]);
    let other = put_all(&ledger, &[("x", "1")]);
    // Reads a (depends on the attack), writes b.
    let mut tx = ledger.begin(ctx("kv")).unwrap();
    tx.get(b"a").unwrap();
    tx.put(b"b", b"derived").unwrap();
    let d1 = tx.commit(Vec::new()).unwrap().seq;
    // Reads x only: independent.
    let mut tx = ledger.begin(ctx("kv")).unwrap();
    tx.get(b"x").unwrap();
    tx.put(b"y", b"2").unwrap();
    let indep = tx.commit(Vec::new()).unwrap().seq;
    // Reads b (transitively depends on the attack) through a scan.
    let mut tx = ledger.begin(ctx("kv")).unwrap();
    tx.scan(b"b", Some(b"c"), 10).unwrap();
    let d2 = tx.commit(Vec::new()).unwrap().seq;
    assert_eq!(
        ledger.store().affected_by(attack).unwrap(),
        vec![attack, d1, d2]
    );
    assert_eq!(
        ledger.store().affected_by(other).unwrap(),
        vec![other, indep]
    );
    assert_eq!(ledger.store().depends_on(d2).unwrap(), vec![d1]);
}

#[test]
fn read_write_conflict_exactly_one_commits() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    put_all(&ledger, &[("counter", "0")]);
    for round in 1..=25u64 {
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (ledger, barrier) = (ledger.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut tx = ledger.begin(ctx("inc")).unwrap();
                    let v: u64 = String::from_utf8(tx.get(b"counter").unwrap().unwrap())
                        .unwrap()
                        .parse()
                        .unwrap();
                    // Both have read before either commits.
                    barrier.wait();
                    tx.put(b"counter", (v + 1).to_string().as_bytes()).unwrap();
                    tx.commit(Vec::new())
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let conflicts = results
            .iter()
            .filter(|r| matches!(r, Err(CommitError::Conflict { .. })))
            .count();
        assert_eq!((ok, conflicts), (1, 1), "round {round}: {results:?}");
        let (_, v) = ledger.store().committed(b"counter").unwrap().unwrap();
        assert_eq!(
            v,
            round.to_string().as_bytes(),
            "no lost update in round {round}"
        );
    }
    assert_verifies(&ledger);
}

#[test]
fn write_skew_is_prevented() {
    // Invariant: at least one doctor on call. Each transaction checks both and takes one off.
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    put_all(&ledger, &[("oncall/alice", "1"), ("oncall/bob", "1")]);
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = ["oncall/alice", "oncall/bob"]
        .into_iter()
        .map(|me| {
            let (ledger, barrier) = (ledger.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut tx = ledger.begin(ctx("offcall")).unwrap();
                let on = tx.scan(b"oncall/", Some(b"oncall0"), 10).unwrap();
                let count = on.entries.iter().filter(|(_, v)| v == b"1").count();
                barrier.wait();
                if count >= 2 {
                    tx.put(me.as_bytes(), b"0").unwrap();
                }
                tx.commit(Vec::new())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let on_call = ledger
        .store()
        .data_snapshot()
        .unwrap()
        .values()
        .filter(|v| v.as_slice() == b"1")
        .count();
    assert_eq!(on_call, 1);
}

#[test]
fn insert_into_scanned_range_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    put_all(&ledger, &[("item/1", "x"), ("item/3", "x"), ("other", "y")]);

    let mut tx = ledger.begin(ctx("count")).unwrap();
    tx.put(b"item/2", b"own").unwrap();
    tx.delete(b"item/3").unwrap();
    let scan = tx.scan(b"item/", Some(b"item0"), 10).unwrap();
    let keys: Vec<_> = scan.entries.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(
        keys,
        vec![&b"item/1"[..], &b"item/2"[..]],
        "scan merges own writes and deletes"
    );
    assert!(!scan.more);
    let limited = tx.scan(b"item/", Some(b"item0"), 1).unwrap();
    assert_eq!(limited.entries.len(), 1);
    assert!(limited.more);
    tx.put(b"count", b"2").unwrap();

    // A phantom: another transaction inserts into the scanned range and commits first.
    put_all(&ledger, &[("item/4", "x")]);
    let err = tx.commit(Vec::new()).unwrap_err();
    assert!(matches!(err, CommitError::ScanConflict { .. }), "{err:?}");
    assert!(err.is_conflict());
    assert_eq!(
        ledger.store().committed(b"count").unwrap(),
        None,
        "a conflict writes nothing"
    );

    // An insert outside the scanned range is not a conflict.
    let mut tx = ledger.begin(ctx("count")).unwrap();
    tx.scan(b"item/", Some(b"item0"), 10).unwrap();
    put_all(&ledger, &[("zzz", "1")]);
    tx.put(b"count", b"3").unwrap();
    tx.commit(Vec::new()).unwrap();
}

#[test]
fn snapshot_reads_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    put_all(&ledger, &[("a", "50"), ("b", "50")]);
    let mut reader = ledger.begin(ctx("audit")).unwrap();
    assert_eq!(reader.get(b"a").unwrap().unwrap(), b"50");
    put_all(&ledger, &[("a", "0"), ("b", "100")]);
    assert_eq!(
        reader.get(b"b").unwrap().unwrap(),
        b"50",
        "a transaction never sees half of another"
    );
    assert!(reader.commit(Vec::new()).unwrap_err().is_conflict());
}

#[test]
fn group_commit_shares_groups_and_isolates_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    put_all(&ledger, &[("hot", "0")]);
    let start_group = ledger.tips().group;
    // 200 independent writers and 20 that all read-modify-write one hot key.
    let mut tickets = Vec::new();
    for i in 0..200 {
        let mut tx = ledger.begin(ctx("kv")).unwrap();
        tx.put(format!("k/{i:04}").as_bytes(), b"v").unwrap();
        tickets.push((false, tx.submit(Vec::new(), Vec::new()).unwrap()));
    }
    let mut hot = Vec::new();
    for _ in 0..20 {
        let mut tx = ledger.begin(ctx("kv")).unwrap();
        tx.get(b"hot").unwrap();
        tx.put(b"hot", b"1").unwrap();
        hot.push(tx);
    }
    for tx in hot {
        tickets.push((true, tx.submit(Vec::new(), Vec::new()).unwrap()));
    }
    let mut hot_ok = 0;
    for (is_hot, t) in tickets {
        match (is_hot, t.wait()) {
            (false, r) => assert!(r.is_ok(), "{r:?}"),
            (true, Ok(_)) => hot_ok += 1,
            (true, Err(e)) => assert!(e.is_conflict(), "{e:?}"),
        }
    }
    assert_eq!(hot_ok, 1, "exactly one of the hot-key writers commits");
    let groups = ledger.tips().group - start_group;
    assert!(
        groups < 201,
        "201 commits took {groups} groups: no grouping happened"
    );
    assert_eq!(ledger.store().data_snapshot().unwrap().len(), 201);
    assert_verifies(&ledger);
}

#[test]
fn duplicate_transaction_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    let c = ctx("kv");
    let mut tx = ledger.begin(c.clone()).unwrap();
    tx.put(b"x", b"1").unwrap();
    tx.commit(Vec::new()).unwrap();
    let mut again = ledger.begin(c.clone()).unwrap();
    again.put(b"x", b"2").unwrap();
    assert!(
        matches!(again.commit(Vec::new()), Err(CommitError::DuplicateTxId(id)) if id == c.tx_id)
    );
    assert_eq!(ledger.store().committed(b"x").unwrap().unwrap().1, b"1");
}

#[test]
fn audit_events_chain_and_commit_atomically_with_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    let before = ledger.tips().audit.seq;
    ledger
        .audit(vec![
            AuditEvent::new("domain.cloned", Severity::Info).field("domain", 3)
        ])
        .unwrap();
    let mut tx = ledger.begin(ctx("kv")).unwrap();
    tx.put(b"k", b"v").unwrap();
    let r = tx
        .commit_with_audit(
            Vec::new(),
            vec![AuditEvent::new("tx.committed", Severity::Info).field("tx_id", "x")],
        )
        .unwrap();
    assert_eq!(r.audit_seq, before + 2);
    let recs = ledger.store().audit_records(before + 1, 10).unwrap();
    let names: Vec<_> = recs.iter().map(|r| r.event.event.as_str()).collect();
    assert_eq!(names, vec!["domain.cloned", "tx.committed"]);
    // An invalid event is refused up front, with no effect.
    let bad = ledger.audit(vec![AuditEvent::new("Bad Name", Severity::Info)]);
    assert!(matches!(bad, Err(CommitError::Audit(_))));
    assert_eq!(ledger.tips().audit.seq, before + 2);
    assert_verifies(&ledger);
}

#[test]
fn restart_continues_both_chains() {
    let dir = tempfile::tempdir().unwrap();
    let (tips, key) = {
        let ledger = open(dir.path());
        put_all(&ledger, &[("a", "1")]);
        (ledger.tips(), ledger.public_key())
    };
    let ledger = open(dir.path());
    assert_eq!(ledger.public_key(), key);
    assert_eq!(ledger.tips().checkpoints, tips.checkpoints);
    assert_eq!(
        ledger.tips().audit.seq,
        tips.audit.seq + 1,
        "the restart itself is audited"
    );
    let seq = put_all(&ledger, &[("b", "2")]);
    assert_eq!(seq, tips.checkpoints.seq + 1);
    assert_verifies(&ledger);
}

#[test]
fn limits_are_enforced_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    let mut tx = ledger.begin(ctx("kv")).unwrap();
    let e = tx.put(b"k", &vec![0u8; 64 * 1024 + 1]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "value of 65537 bytes is above the limit of 65536"
    );
    let e = tx.put(&[b'k'; 257], b"v").unwrap_err();
    assert_eq!(
        e.to_string(),
        "key of 257 bytes: keys must be 1..=256 bytes"
    );
    assert!(tx.put(b"", b"v").is_err());
    assert!(tx.scan(b"a", None, 0).is_err());
    assert!(tx.scan(b"a", None, 1025).is_err());
    // The transaction is still usable after refused operations.
    tx.put(b"k", &vec![1u8; 64 * 1024]).unwrap();
    tx.commit(Vec::new()).unwrap();
    assert!(matches!(
        ledger.begin(ctx("Bad Handler")),
        Err(mayfly_ledger::TxError::BadHandler(_))
    ));
    let mut big = ctx("kv");
    big.request = vec![0; 64 * 1024 + 1];
    assert!(matches!(
        ledger.begin(big),
        Err(mayfly_ledger::TxError::RequestTooLarge { .. })
    ));
    let tx = ledger.begin(ctx("kv")).unwrap();
    assert!(matches!(
        tx.commit(vec![0; 64 * 1024 + 1]),
        Err(CommitError::ResultTooLarge { .. })
    ));
    assert_verifies(&ledger);
}

#[test]
fn lazy_audit_events_join_the_next_group_or_flush_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    let before = ledger.tips();
    // The transaction is ready before the lazy event is queued, so the two are queued
    // microseconds apart: the commit carries the lazy record in its group.
    let mut tx = ledger.begin(ctx("kv")).unwrap();
    tx.put(b"k", b"v").unwrap();
    ledger
        .audit_lazily(vec![
            AuditEvent::new("domain.destroyed", Severity::Info).field("domain", 1)
        ])
        .unwrap();
    let seq = tx.commit(Vec::new()).unwrap().seq;
    let after = ledger.tips();
    assert_eq!(
        after.group,
        before.group + 1,
        "the lazy event forced a group of its own"
    );
    assert_eq!(after.audit.seq, before.audit.seq + 1);
    assert_eq!(after.checkpoints.seq, seq);
    // Alone, it is committed within the lazy delay; wait for it through the ledger's own
    // durable tips, bounded in time.
    ledger
        .audit_lazily(vec![
            AuditEvent::new("domain.destroyed", Severity::Info).field("domain", 2)
        ])
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ledger.tips().audit.seq != after.audit.seq + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "lazy audit record never committed"
        );
        std::thread::yield_now();
    }
    // An invalid lazy event is refused up front.
    assert!(ledger
        .audit_lazily(vec![AuditEvent::new("Bad", Severity::Info)])
        .is_err());
    assert_verifies(&ledger);
}
