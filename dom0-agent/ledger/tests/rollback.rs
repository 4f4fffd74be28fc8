//! Rollback at the ledger level: affected set, restored values, refusal without cascade,
//! atomicity under concurrent commits, and the record in the signed chain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mayfly_ledger::{verify, CommitError, Ledger, Options, Record, RollbackError};

mod common;
use common::{ctx, log};

fn open(dir: &std::path::Path) -> Ledger {
    Ledger::open(dir, &Options::default(), &log()).unwrap()
}

/// Reads `reads`, writes `writes` (None = delete); returns the commit sequence.
fn tx(ledger: &Ledger, reads: &[&str], writes: &[(&str, Option<&str>)]) -> u64 {
    let mut t = ledger.begin(ctx()).unwrap();
    for k in reads {
        t.get(k.as_bytes()).unwrap();
    }
    for (k, v) in writes {
        match v {
            Some(v) => t.put(k.as_bytes(), v.as_bytes()).unwrap(),
            None => t.delete(k.as_bytes()).unwrap(),
        }
    }
    t.commit(Vec::new()).unwrap().seq
}

fn value(ledger: &Ledger, key: &str) -> Option<String> {
    ledger
        .store()
        .committed(key.as_bytes())
        .unwrap()
        .map(|(_, v)| String::from_utf8(v).unwrap())
}

fn verifies(ledger: &Ledger) {
    let r = verify(ledger.store(), &[ledger.public_key()], &mut |_| {}).unwrap();
    assert!(r.ok(), "{:?}", r.failures);
}

#[test]
fn cascade_undoes_the_attack_and_its_dependents_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    let base = tx(
        &l,
        &[],
        &[("a", Some("1")), ("b", Some("2")), ("gone", Some("keep"))],
    );
    let attack = tx(
        &l,
        &[],
        &[
            ("a", Some("666")),
            ("b", Some("666")),
            ("evil", Some("x")),
            ("gone", None),
        ],
    );
    let dependent = tx(&l, &["a"], &[("c", Some("derived from 666"))]);
    let second = tx(&l, &["c"], &[("d", Some("derived again"))]);
    let blind = tx(&l, &[], &[("b", Some("5"))]); // overwrote b without reading it
    let independent = tx(&l, &["x"], &[("y", Some("fine"))]);

    let dry = l.store().plan_rollback(&[attack], true).unwrap();
    assert_eq!(dry.affected, vec![attack, dependent, second]);
    assert_eq!(dry.replay, vec![dependent, second]);
    let keys: Vec<&[u8]> = dry.writes.iter().map(|w| w.key.as_slice()).collect();
    assert_eq!(
        keys,
        vec![&b"a"[..], b"c", b"d", b"evil", b"gone"],
        "b stands: its last writer is unaffected"
    );
    assert_eq!(
        value(&l, "a").as_deref(),
        Some("666"),
        "a dry run changes nothing"
    );

    let (plan, receipt) = l
        .rollback(&[attack], true, "ids alert 42", [9; 32])
        .unwrap();
    assert_eq!(plan.affected, dry.affected);
    assert_eq!(value(&l, "a").as_deref(), Some("1"));
    assert_eq!(
        value(&l, "b").as_deref(),
        Some("5"),
        "the later blind write stands"
    );
    assert_eq!(value(&l, "c"), None);
    assert_eq!(value(&l, "d"), None);
    assert_eq!(value(&l, "evil"), None);
    assert_eq!(
        value(&l, "gone").as_deref(),
        Some("keep"),
        "a delete is undone too"
    );
    assert_eq!(value(&l, "y").as_deref(), Some("fine"));

    // The rollback is a signed link of the chain, with before-images of its own.
    match l.store().record(receipt.seq).unwrap().unwrap() {
        Record::Rollback(r) => {
            assert_eq!(r.roots, vec![attack]);
            assert_eq!(r.reason, "ids alert 42");
            assert_eq!(r.policy_hash, [9; 32]);
            let a = r.writes.iter().find(|w| w.key == b"a").unwrap();
            assert_eq!(
                (a.before.as_deref(), a.after.as_deref()),
                (Some(&b"666"[..]), Some(&b"1"[..]))
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        l.store().checkpoint(receipt.seq).unwrap(),
        None,
        "not a transaction checkpoint"
    );
    assert_eq!(
        l.store().writers_of(b"a").unwrap(),
        vec![base, attack, receipt.seq]
    );
    let events = l.store().audit_records(1, 1000).unwrap();
    assert!(events.iter().any(|e| e.event.event == "rollback.applied"));
    let _ = (blind, independent);
    verifies(&l);

    // Rolling back again has nothing left to undo, and says which record undid it, with or
    // without cascade (its former dependents are undone too), planned or applied.
    let by = receipt.seq;
    assert_eq!(l.store().undone_by(attack).unwrap(), Some(by));
    assert_eq!(l.store().undone_by(base).unwrap(), None);
    for cascade in [true, false] {
        assert!(matches!(
            l.store().plan_rollback(&[attack], cascade),
            Err(RollbackError::AlreadyRolledBack { seq, by: b }) if seq == attack && b == by
        ));
        assert!(matches!(
            l.rollback(&[attack], cascade, "again", [0; 32]),
            Err(RollbackError::AlreadyRolledBack { seq, by: b }) if seq == attack && b == by
        ));
    }
}

#[test]
fn without_cascade_dependents_make_it_refuse_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    tx(&l, &[], &[("a", Some("1"))]);
    let attack = tx(&l, &[], &[("a", Some("666"))]);
    let reader = tx(&l, &["a"], &[("c", Some("built on 666"))]);
    let tip = l.tips();
    match l.rollback(&[attack], false, "no cascade", [0; 32]) {
        Err(RollbackError::DependentsExist { count, first }) => {
            assert_eq!((count, first), (1, vec![reader]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        l.tips().checkpoints,
        tip.checkpoints,
        "nothing was appended"
    );
    assert_eq!(value(&l, "a").as_deref(), Some("666"));
}

#[test]
fn without_cascade_a_later_overwrite_is_kept_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    tx(&l, &[], &[("a", Some("1")), ("b", Some("1"))]);
    let attack = tx(&l, &[], &[("a", Some("666")), ("b", Some("666"))]);
    tx(&l, &[], &[("a", Some("7"))]); // blind overwrite: does not depend on the attack
    let (plan, _) = l.rollback(&[attack], false, "no cascade", [0; 32]).unwrap();
    assert_eq!(plan.affected, vec![attack]);
    assert_eq!(
        value(&l, "a").as_deref(),
        Some("7"),
        "the later write stands"
    );
    assert_eq!(
        value(&l, "b").as_deref(),
        Some("1"),
        "the attack's other write is undone"
    );
    verifies(&l);
}

#[test]
fn bad_roots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    let s = tx(&l, &[], &[("a", Some("1"))]);
    assert!(matches!(
        l.rollback(&[], true, "", [0; 32]),
        Err(RollbackError::BadRoots(0))
    ));
    assert!(matches!(
        l.rollback(&[s + 100], true, "", [0; 32]),
        Err(RollbackError::NotATransaction { .. })
    ));
    let (_, r) = l.rollback(&[s], true, "", [0; 32]).unwrap();
    assert!(matches!(
        l.rollback(&[r.seq], true, "", [0; 32]),
        Err(RollbackError::NotATransaction {
            what: "a rollback record",
            ..
        })
    ));
}

#[test]
fn rollback_is_atomic_while_transactions_keep_committing() {
    // A bank of 20 accounts holding 100 each; an attack mints 1,000,000 into one of them;
    // transfers keep running (some will read the minted money) while the rollback runs.
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    let accounts: Vec<String> = (0..20).map(|i| format!("acct/{i:02}")).collect();
    {
        let mut t = l.begin(ctx()).unwrap();
        for a in &accounts {
            t.put(a.as_bytes(), b"100").unwrap();
        }
        t.commit(Vec::new()).unwrap();
    }
    let attack = tx(&l, &["acct/00"], &[("acct/00", Some("1000100"))]);
    let transfer = |l: &Ledger, from: &str, to: &str| -> Result<(), CommitError> {
        let mut t = l.begin(ctx()).unwrap();
        let f: u64 = String::from_utf8(t.get(from.as_bytes()).unwrap().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        let g: u64 = String::from_utf8(t.get(to.as_bytes()).unwrap().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        if f >= 10 {
            t.put(from.as_bytes(), (f - 10).to_string().as_bytes())
                .unwrap();
            t.put(to.as_bytes(), (g + 10).to_string().as_bytes())
                .unwrap();
        }
        t.commit(Vec::new()).map(drop)
    };
    for i in 0..30 {
        let _ = transfer(&l, &accounts[i % 20], &accounts[(i * 7 + 1) % 20]);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (l, stop, accounts) = (l.clone(), stop.clone(), accounts.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(w);
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < 2_000 {
                    let a = rng.usize(..20);
                    let b = (a + rng.usize(1..20)) % 20;
                    match transfer(&l, &accounts[a], &accounts[b]) {
                        Ok(()) | Err(CommitError::Conflict { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let (plan, _) = l
        .rollback(&[attack], true, "minted money", [0; 32])
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    assert!(
        plan.affected.len() > 1,
        "some transfers read the minted money"
    );
    let total: u64 = accounts
        .iter()
        .map(|a| value(&l, a).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        total, 2_000,
        "after the rollback no minted money remains and none was lost"
    );
    verifies(&l);
}
