//! The standby's copy with its journal (docs/failover.md, "The standby's journal"), on
//! real LMDB ledgers: a tentative group is durable in the journal (not LMDB) when it is
//! acknowledged, and reaches LMDB once confirmed; a tentative group replaced at its
//! number or abandoned is dropped and audited, never a fork; a standby restarted with a
//! tentative group keeps it tentative and applies the confirmed ones; a promotion applies
//! the tentative tail; a damaged journal is cut and audited, one holding another chain's
//! group is refused and kept; the journal stays bounded while tentative groups keep
//! coming; confirm and abandon frames about groups not held are ignored and audited.

use std::cell::RefCell;
use std::path::Path;

use mayfly_ledger::{
    AuditEvent, GroupRecords, Ledger, Options, Replica, StoreOptions, TxContext, TxId,
};
use mayfly_replica::copy::{replay, JournaledCopy, Received};
use mayfly_replica::journal::{Entry, Journal, FILE_NAME};
use slog::{o, Discard, Logger};

fn open(dir: &Path) -> Ledger {
    Ledger::open(dir, &Options::default(), &Logger::root(Discard, o!())).unwrap()
}

fn put(ledger: &Ledger, k: &str, v: &str) -> u64 {
    let mut t = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "kv".into(),
            request: format!("put {k}").into_bytes(),
            domain_id: 1,
            policy_hash: [0; 32],
        })
        .unwrap();
    let _ = t.get(k.as_bytes()).unwrap();
    t.put(k.as_bytes(), v.as_bytes()).unwrap();
    t.commit(b"ok".to_vec()).unwrap();
    ledger.tips().group
}

fn group(l: &Ledger, g: u64) -> GroupRecords {
    l.store().export_group(g).unwrap()
}

/// Audit events recorded by the copy, by name.
#[derive(Default)]
struct Audit(RefCell<Vec<AuditEvent>>);

impl Audit {
    fn sink(&self) -> impl Fn(AuditEvent) + '_ {
        |e| self.0.borrow_mut().push(e)
    }
    fn names(&self) -> Vec<String> {
        self.0.borrow().iter().map(|e| e.event.clone()).collect()
    }
    fn field(&self, event: &str, field: &str) -> Option<String> {
        self.0
            .borrow()
            .iter()
            .rev()
            .find(|e| e.event == event)
            .and_then(|e| e.fields.get(field).cloned())
    }
}

fn replica(dir: &Path, primary: &Ledger) -> Replica {
    Replica::open(dir, &StoreOptions::default(), primary.public_key()).unwrap()
}

/// A standby that follows `primary` up to group `upto` (through the journal, flushed).
fn following(dir: &Path, primary: &Ledger, upto: u64, audit: &Audit) -> (Replica, JournaledCopy) {
    let mut r = replica(dir, primary);
    let (mut copy, _) = JournaledCopy::open(&mut r, dir, &audit.sink()).unwrap();
    for g in 1..=upto {
        copy.receive(&mut r, &group(primary, g), false, &audit.sink())
            .unwrap();
    }
    copy.flush_due(&mut r, true).unwrap();
    assert_eq!(r.held().group, upto);
    (r, copy)
}

fn journal_groups(dir: &Path) -> Vec<(u64, bool)> {
    Journal::read(dir)
        .unwrap()
        .0
        .into_iter()
        .filter_map(|e| match e {
            Entry::Group { records, tentative } => Some((
                mayfly_ledger::SignedHead::decode(&records.head)
                    .unwrap()
                    .group,
                tentative,
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn a_tentative_group_is_acknowledged_from_the_journal_and_reaches_lmdb_once_confirmed() {
    let (p, s) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (primary, audit) = (open(p.path()), Audit::default());
    let n = put(&primary, "acct/a", "1");
    let (mut r, mut copy) = following(s.path(), &primary, n, &audit);
    let t = put(&primary, "acct/a", "2");
    assert_eq!(
        copy.receive(&mut r, &group(&primary, t), true, &audit.sink())
            .unwrap(),
        Received { ack: t }
    );
    // Durable in the journal, not in LMDB, and tentative.
    assert_eq!(journal_groups(s.path()), vec![(t, true)]);
    assert_eq!(r.store().last_group().unwrap(), n);
    assert_eq!(r.tentative(), Some(t));
    // Not written to LMDB while tentative, even when forced.
    assert_eq!(copy.flush_due(&mut r, true).unwrap(), 0);
    copy.confirm(&mut r, t, &audit.sink()).unwrap();
    assert_eq!(r.tentative(), None);
    assert_eq!(copy.flush_due(&mut r, true).unwrap(), 1);
    assert_eq!(r.store().last_group().unwrap(), t);
    assert!(
        Journal::read(s.path()).unwrap().0.is_empty(),
        "the journal is cut once LMDB holds everything"
    );
    assert!(!audit.names().contains(&"replication.frame_ignored".into()));
    // Confirmed again (replayed), or for a group not held: ignored, audited.
    copy.confirm(&mut r, t, &audit.sink()).unwrap();
    copy.confirm(&mut r, t + 5, &audit.sink()).unwrap();
    assert_eq!(
        audit
            .names()
            .iter()
            .filter(|e| *e == "replication.frame_ignored")
            .count(),
        2
    );
    assert!(audit
        .field("replication.frame_ignored", "reason")
        .unwrap()
        .contains("does not hold"));
    assert_eq!(r.store().last_group().unwrap(), t);
}

#[test]
fn an_abandoned_tentative_group_is_dropped_and_a_stray_abandon_is_ignored() {
    let (p, s) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (primary, audit) = (open(p.path()), Audit::default());
    let n = put(&primary, "acct/a", "1");
    let (mut r, mut copy) = following(s.path(), &primary, n - 1, &audit);
    copy.receive(&mut r, &group(&primary, n), true, &audit.sink())
        .unwrap();
    // An abandon for another group: ignored, the tentative one kept.
    copy.abandon(&mut r, n + 1, &audit.sink()).unwrap();
    assert_eq!(r.tentative(), Some(n));
    assert!(audit.names().contains(&"replication.frame_ignored".into()));
    copy.abandon(&mut r, n, &audit.sink()).unwrap();
    assert_eq!(r.tentative(), None);
    assert_eq!(r.staged_tip().group, n - 1);
    assert!(audit
        .field("replication.tentative_dropped", "reason")
        .unwrap()
        .contains("abandoned"));
    // Replayed: ignored now.
    let before = audit.names().len();
    copy.abandon(&mut r, n, &audit.sink()).unwrap();
    assert_eq!(audit.names().len(), before + 1);
    // The group can come again (as the primary commits it anew) and is taken.
    copy.receive(&mut r, &group(&primary, n), false, &audit.sink())
        .unwrap();
    copy.flush_due(&mut r, true).unwrap();
    assert_eq!(r.store().last_group().unwrap(), n);
    // And a restart replays nothing wrongly: the abandon marker and the journal agree.
    drop((r, copy));
    let mut r = replica(s.path(), &primary);
    let (_, rec) = JournaledCopy::open(&mut r, s.path(), &audit.sink()).unwrap();
    assert_eq!(rec.tentative, None);
    assert_eq!(r.held().group, n);
}

#[test]
fn a_tentative_group_replaced_at_its_number_is_dropped_not_a_fork() {
    let p = tempfile::tempdir().unwrap();
    let twin = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let audit = Audit::default();
    let primary = open(p.path());
    put(&primary, "acct/a", "1");
    // The same ledger copied while open and idle: the twin's next group is "the primary's
    // group shipped before a commit that never became durable".
    for f in ["data.mdb", "signing.key"] {
        std::fs::copy(p.path().join(f), twin.path().join(f)).unwrap();
    }
    let common = primary.tips().group;
    let other = open(twin.path());
    let n = put(&primary, "acct/a", "kept");
    assert_eq!(other.tips().group, n);
    let (mut r, mut copy) = following(s.path(), &primary, common, &audit);
    copy.receive(&mut r, &group(&other, n), true, &audit.sink())
        .unwrap();
    assert_eq!(r.tentative(), Some(n));
    // The primary's own group n, durable there: the tentative one is dropped.
    assert_eq!(
        copy.receive(&mut r, &group(&primary, n), false, &audit.sink())
            .unwrap(),
        Received { ack: n }
    );
    assert!(audit
        .names()
        .contains(&"replication.tentative_dropped".into()));
    assert!(!audit.names().iter().any(|e| e.contains("fork")));
    copy.flush_due(&mut r, true).unwrap();
    assert_eq!(r.store().export_group(n).unwrap(), group(&primary, n));
    // Now confirmed: the twin's group at that number is a fork.
    let e = copy
        .receive(&mut r, &group(&other, n), true, &audit.sink())
        .unwrap_err();
    assert!(e.to_string().contains("FORK"), "{e}");
}

#[test]
fn a_restarted_standby_keeps_its_tentative_group_and_applies_the_confirmed_ones() {
    let (p, s) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (primary, audit) = (open(p.path()), Audit::default());
    let n = put(&primary, "acct/a", "1");
    let (mut r, mut copy) = following(s.path(), &primary, n, &audit);
    let g1 = put(&primary, "acct/a", "2");
    let g2 = put(&primary, "acct/b", "1");
    let g3 = put(&primary, "acct/a", "3");
    copy.receive(&mut r, &group(&primary, g1), true, &audit.sink())
        .unwrap();
    copy.confirm(&mut r, g1, &audit.sink()).unwrap();
    copy.receive(&mut r, &group(&primary, g2), true, &audit.sink())
        .unwrap();
    // g2 confirmed by the group after it; g3 tentative.
    copy.receive(&mut r, &group(&primary, g3), true, &audit.sink())
        .unwrap();
    // Killed before any LMDB commit: only the journal holds them.
    assert_eq!(r.store().last_group().unwrap(), n);
    drop((r, copy));
    let mut r = replica(s.path(), &primary);
    let audit2 = Audit::default();
    let (mut copy, rec) = JournaledCopy::open(&mut r, s.path(), &audit2.sink()).unwrap();
    assert_eq!(rec.records, 4);
    assert_eq!(rec.applied, 2);
    assert_eq!(rec.tentative, Some(g3));
    assert_eq!(r.held().group, g2);
    assert_eq!(r.confirmed_group(), g2, "the hello asks from here");
    // A confirm on the new connection does not resolve the carried tentative group...
    copy.connected(&r);
    copy.confirm(&mut r, g3, &audit2.sink()).unwrap();
    assert_eq!(r.tentative(), Some(g3));
    assert!(audit2.names().contains(&"replication.frame_ignored".into()));
    // ...the primary's group at its number does.
    copy.receive(&mut r, &group(&primary, g3), false, &audit2.sink())
        .unwrap();
    assert_eq!(r.tentative(), None);
    copy.flush_due(&mut r, true).unwrap();
    assert_eq!(r.store().export_group(g3).unwrap(), group(&primary, g3));
}

#[test]
fn a_promotion_applies_the_tentative_tail_of_the_journal() {
    let (p, s) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (primary, audit) = (open(p.path()), Audit::default());
    let n = put(&primary, "acct/a", "1");
    let (mut r, mut copy) = following(s.path(), &primary, n, &audit);
    let t = put(&primary, "acct/a", "2");
    copy.receive(&mut r, &group(&primary, t), true, &audit.sink())
        .unwrap();
    drop((r, copy));
    let mut r = replica(s.path(), &primary);
    let (_, rec) = replay(&mut r, s.path(), true, &audit.sink()).unwrap();
    assert_eq!(rec.tentative_applied, Some(t));
    assert_eq!(rec.tentative, None);
    assert_eq!(r.held().group, t);
    assert_eq!(r.store().export_group(t).unwrap(), group(&primary, t));
    assert!(Journal::read(s.path()).unwrap().0.is_empty());
}

#[test]
fn a_damaged_journal_or_one_of_another_chain_is_cut_and_audited() {
    let p = tempfile::tempdir().unwrap();
    let q = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let primary = open(p.path());
    let stranger = open(q.path());
    let audit = Audit::default();
    let n = put(&primary, "acct/a", "1");
    let (mut r, mut copy) = following(s.path(), &primary, n, &audit);
    let g1 = put(&primary, "acct/a", "2");
    let g2 = put(&primary, "acct/a", "3");
    copy.receive(&mut r, &group(&primary, g1), false, &audit.sink())
        .unwrap();
    copy.receive(&mut r, &group(&primary, g2), false, &audit.sink())
        .unwrap();
    drop((r, copy));
    let path = s.path().join(FILE_NAME);
    let whole = std::fs::read(&path).unwrap();

    // Torn in the middle of the second record: the first is applied, the rest dropped.
    let (entries, _) = Journal::read(s.path()).unwrap();
    assert_eq!(entries.len(), 2);
    let first_len = entries[0].encode().len();
    std::fs::write(&path, &whole[..first_len + 20]).unwrap();
    let mut r = replica(s.path(), &primary);
    let a = Audit::default();
    let (_, rec) = JournaledCopy::open(&mut r, s.path(), &a.sink()).unwrap();
    assert_eq!(rec.applied, 1);
    assert_eq!(r.held().group, g1);
    assert!(a
        .field("replication.journal_damaged", "reason")
        .unwrap()
        .contains("torn"));
    drop(r);

    // A valid record of another chain (another ledger's group, well formed and
    // checksummed): refused by the chain, audited, the standby stops; the copy is
    // unchanged and the journal kept as it is (its records may be acknowledged groups
    // this copy cannot take yet).
    while stranger.tips().group < g1 + 1 {
        put(&stranger, "acct/z", "0");
    }
    let mut j = Journal::open(s.path()).unwrap().0;
    j.cut().unwrap();
    j.append(
        &Entry::Group {
            records: group(&stranger, g1 + 1),
            tentative: false,
        },
        true,
    )
    .unwrap();
    drop(j);
    let kept = std::fs::read(&path).unwrap();
    let mut r = replica(s.path(), &primary);
    let a = Audit::default();
    let err = JournaledCopy::open(&mut r, s.path(), &a.sink())
        .err()
        .expect("a journal of another chain is refused");
    assert!(
        matches!(err, mayfly_replica::copy::CopyError::Refused { group, offset: 0, .. } if group == g1 + 1),
        "{err}"
    );
    assert_eq!(r.held().group, g1);
    assert!(
        a.names().contains(&"replication.journal_refused".into()),
        "{:?}",
        a.names()
    );
    assert_eq!(std::fs::read(&path).unwrap(), kept, "the journal is kept");
    std::fs::remove_file(&path).unwrap();

    // A flipped byte in a record: dropped from it on, audited.
    let mut bad = whole.clone();
    bad[first_len + 40] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let a = Audit::default();
    let (_, rec) = JournaledCopy::open(&mut r, s.path(), &a.sink()).unwrap();
    assert_eq!(rec.records, 1);
    assert!(a
        .field("replication.journal_damaged", "reason")
        .unwrap()
        .contains("damaged"));
    // An oversized length: refused before its body, audited.
    let mut big = whole[..first_len].to_vec();
    big.extend_from_slice(b"MFRJ\x01\x01\xff\xff\xff\xff");
    std::fs::write(&path, &big).unwrap();
    let a = Audit::default();
    let (_, rec) = JournaledCopy::open(&mut r, s.path(), &a.sink()).unwrap();
    assert_eq!(rec.records, 1);
    assert!(a
        .field("replication.journal_damaged", "reason")
        .unwrap()
        .contains("above"));
    assert_eq!(r.held().group, g1);
}

#[test]
fn the_journal_stays_bounded_while_tentative_groups_keep_coming() {
    // Under steady sync load a tentative group is almost always staged (the next one
    // arrives with the confirm of the last): the confirmed groups still reach LMDB, and
    // the journal is reduced to the one tentative group instead of growing.
    let (p, s) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (primary, audit) = (open(p.path()), Audit::default());
    let n = put(&primary, "acct/a", "1");
    let (mut r, mut copy) = following(s.path(), &primary, n, &audit);
    let mut last = n;
    for round in 0..3 {
        for i in 0..5 {
            // Each tentative group confirms the one before it (a group after a tentative
            // one confirms it), so one is always left tentative.
            last = put(&primary, "acct/a", &format!("{round}-{i}"));
            copy.receive(&mut r, &group(&primary, last), true, &audit.sink())
                .unwrap();
        }
        assert_eq!(r.tentative(), Some(last));
        assert!(copy.flush_due(&mut r, true).unwrap() > 0);
        assert_eq!(r.store().last_group().unwrap(), last - 1);
        assert_eq!(
            journal_groups(s.path()),
            vec![(last, true)],
            "round {round}: only the tentative group is left in the journal"
        );
    }
    // A restart still finds the tentative group, and its confirm brings it to LMDB.
    drop((r, copy));
    let mut r = replica(s.path(), &primary);
    let (mut copy, rec) = JournaledCopy::open(&mut r, s.path(), &audit.sink()).unwrap();
    assert_eq!(rec.tentative, Some(last));
    copy.connected(&r);
    copy.receive(&mut r, &group(&primary, last), false, &audit.sink())
        .unwrap();
    copy.flush_due(&mut r, true).unwrap();
    assert_eq!(r.held().group, last);
    assert!(Journal::read(s.path()).unwrap().0.is_empty());
}
