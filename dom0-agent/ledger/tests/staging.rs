//! Staged groups on a standby (synchronous replication with a journal, docs/failover.md):
//! a group is checked on top of the groups staged before it (their writes are not in LMDB
//! yet), stays out of LMDB until committed, many staged groups commit in one LMDB
//! transaction into the same ledger a plain `apply` makes, a tentative group replaced at
//! its number is dropped (not a fork), a different group at a confirmed number is a fork,
//! and the committer tells its observer about a group before its commit (and when that
//! commit fails).

use std::path::Path;
use std::sync::{Arc, Mutex};

use mayfly_ledger::{
    verify, ApplyError, GroupObserver, GroupRecords, Ledger, Replica, Staging, Store, StoreOptions,
};

mod common;
use common::{open, read_then_put as put};

fn idx(g: u64) -> usize {
    usize::try_from(g).unwrap()
}

fn groups(primary: &Ledger, from: u64) -> Vec<GroupRecords> {
    let last = primary.store().last_group().unwrap();
    (from..=last)
        .map(|g| primary.store().export_group(g).unwrap())
        .collect()
}

fn assert_same_chain(a: &Store, b: &Store) {
    let last = a.last_group().unwrap();
    assert_eq!(last, b.last_group().unwrap(), "last groups differ");
    for g in 1..=last {
        assert_eq!(
            a.export_group(g).unwrap(),
            b.export_group(g).unwrap(),
            "group {g} differs"
        );
    }
    assert_eq!(a.data_snapshot().unwrap(), b.data_snapshot().unwrap());
}

/// Two ledgers with one history up to now, then each its own: `a` after `setup`, and a
/// copy of it taken while it is open and idle (its committer has nothing in flight once
/// `setup` returned), opened in `b` (which writes its own "opened" group next).
fn twins(a: &Path, b: &Path, setup: impl FnOnce(&Ledger)) -> (Ledger, Ledger) {
    let l = open(a);
    setup(&l);
    for f in ["data.mdb", "signing.key"] {
        std::fs::copy(a.join(f), b.join(f)).unwrap();
    }
    (l, open(b))
}

#[test]
fn staged_groups_are_checked_on_each_other_and_commit_in_one_transaction() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let primary = open(p.path());
    // The same key rewritten by consecutive groups: each before-version is one that only
    // the staged group before it wrote.
    for i in 0..6 {
        put(&primary, "acct/a", &i.to_string());
        put(&primary, &format!("acct/{i}"), "x");
    }
    let mut standby =
        Replica::open(s.path(), &StoreOptions::default(), primary.public_key()).unwrap();
    let all = groups(&primary, 1);
    for (i, g) in all.iter().enumerate() {
        if i == 3 {
            // A damaged signature is refused at staging, as by `apply`.
            let mut forged = g.clone();
            let last = forged.head.len() - 1;
            forged.head[last] ^= 1;
            assert!(matches!(
                standby.stage(&forged, true),
                Err(ApplyError::BadSignature { .. })
            ));
        }
        assert!(matches!(
            standby.stage(g, true).unwrap(),
            Staging::Staged(_)
        ));
    }
    // Nothing is in LMDB yet.
    assert_eq!(standby.store().last_group().unwrap(), 0);
    assert_eq!(standby.held().group, 0);
    assert_eq!(standby.staged_tip().group, primary.tips().group);
    assert_eq!(standby.staged_confirmed().0, all.len() as u64);
    // A group staged twice is a replay.
    assert_eq!(
        standby.stage(&all[2], true).unwrap(),
        Staging::Replayed { group: 3 }
    );
    assert_eq!(standby.commit_staged(false).unwrap(), all.len() as u64);
    assert_eq!(standby.held().group, primary.tips().group);
    assert_same_chain(primary.store(), standby.store());
    let r = verify(standby.store(), &[primary.public_key()], &mut |_| {}).unwrap();
    assert!(r.ok(), "{:?}", r.failures);
    // Reopened, the copy is what was committed, and nothing is staged.
    drop(standby);
    let standby = Replica::open(s.path(), &StoreOptions::default(), primary.public_key()).unwrap();
    assert_eq!(standby.held().group, primary.tips().group);
    assert_eq!(standby.tentative(), None);
}

#[test]
fn a_staged_group_that_does_not_follow_the_staged_ones_is_refused() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let primary = open(p.path());
    let first = primary.tips().group + 1;
    put(&primary, "acct/a", "1");
    put(&primary, "acct/a", "2");
    put(&primary, "acct/a", "3");
    let mut standby =
        Replica::open(s.path(), &StoreOptions::default(), primary.public_key()).unwrap();
    for g in groups(&primary, 1).iter().take(idx(first) - 1) {
        standby.apply(g).unwrap();
    }
    let all = groups(&primary, first);
    standby.stage(&all[0], true).unwrap();
    // The third after the first: a gap.
    assert!(matches!(
        standby.stage(&all[2], true),
        Err(ApplyError::OutOfOrder { .. })
    ));
    standby.stage(&all[1], true).unwrap();
    // Dropping the last staged group takes its writes out of the overlay: the second
    // checks again against the first's version of acct/a.
    standby.unstage_last();
    assert_eq!(standby.staged_tip().group, first);
    assert!(matches!(
        standby.stage(&all[1], false).unwrap(),
        Staging::Staged(_)
    ));
    assert_eq!(standby.tentative(), Some(first + 1));
    standby.stage(&all[2], true).unwrap();
    // A group after a tentative one confirms it.
    assert_eq!(standby.tentative(), None);
    assert_eq!(standby.commit_staged(false).unwrap(), 3);
    assert_same_chain(primary.store(), standby.store());
}

#[test]
fn a_tentative_group_replaced_at_its_number_is_dropped_and_a_confirmed_one_is_a_fork() {
    let p = tempfile::tempdir().unwrap();
    let twin = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let (primary, other) = twins(p.path(), twin.path(), |l| {
        put(l, "acct/a", "1");
    });
    // Group n as the primary shipped it before its commit failed (the twin's), and the
    // group n it wrote instead (its own).
    put(&primary, "acct/a", "kept");
    let n = primary.tips().group;
    assert_eq!(other.tips().group, n);
    let mut standby =
        Replica::open(s.path(), &StoreOptions::default(), primary.public_key()).unwrap();
    for g in groups(&primary, 1).iter().take(idx(n) - 1) {
        standby.apply(g).unwrap();
    }
    let lost = other.store().export_group(n).unwrap();
    let kept = primary.store().export_group(n).unwrap();
    assert_ne!(lost, kept);
    assert!(matches!(
        standby.stage(&lost, false).unwrap(),
        Staging::Staged(_)
    ));
    assert_eq!(standby.tentative(), Some(n));
    match standby.stage(&kept, true).unwrap() {
        Staging::Replaced { applied, .. } => assert_eq!(applied.group, n),
        other => panic!("{other:?}"),
    }
    assert_eq!(standby.tentative(), None);
    assert_eq!(standby.commit_staged(false).unwrap(), 1);
    assert_same_chain(primary.store(), standby.store());

    // Staged confirmed, then a different group at its number: a fork, fatal.
    put(&primary, "acct/b", "1");
    put(&other, "acct/b", "2");
    let m = n + 1;
    let mine = primary.store().export_group(m).unwrap();
    let theirs = other.store().export_group(m).unwrap();
    standby.stage(&mine, true).unwrap();
    let e = standby.stage(&theirs, false).unwrap_err();
    assert!(matches!(e, ApplyError::Fork { chain: "group", .. }), "{e}");
    assert!(e.is_fatal());
    // Confirmed by a later frame: the same.
    standby.unstage_last();
    standby.stage(&mine, false).unwrap();
    assert_eq!(standby.confirm(m), 1);
    assert!(standby.stage(&theirs, true).unwrap_err().is_fatal());
}

#[test]
fn a_tentative_group_is_dropped_only_when_it_is_the_tentative_one() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let primary = open(p.path());
    put(&primary, "acct/a", "1");
    let n = primary.tips().group;
    put(&primary, "acct/a", "2");
    let mut standby =
        Replica::open(s.path(), &StoreOptions::default(), primary.public_key()).unwrap();
    let all = groups(&primary, 1);
    for g in &all[..idx(n)] {
        standby.stage(g, true).unwrap();
    }
    assert!(
        !standby.drop_tentative(n),
        "a confirmed group is not dropped"
    );
    standby.stage(&all[idx(n)], false).unwrap();
    assert!(!standby.drop_tentative(n));
    assert!(!standby.drop_tentative(n + 2));
    assert!(standby.drop_tentative(n + 1));
    assert_eq!(standby.staged_tip().group, n);
    // A commit with the tentative one held writes only the confirmed ones.
    standby.stage(&all[idx(n)], false).unwrap();
    assert_eq!(standby.commit_staged(false).unwrap(), n);
    assert_eq!(standby.held().group, n);
    assert_eq!(standby.tentative(), Some(n + 1));
    // A promotion writes it too.
    assert_eq!(standby.commit_staged(true).unwrap(), 1);
    assert_same_chain(primary.store(), standby.store());
}

/// Records what the committer tells it, in order.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>, Mutex<Vec<GroupRecords>>);

impl GroupObserver for Recorder {
    fn durable(&self, group: u64, _acknowledging: bool) {
        self.0.lock().unwrap().push(format!("durable {group}"));
    }
    fn wants_tentative(&self) -> bool {
        true
    }
    fn tentative(&self, group: u64, records: GroupRecords) {
        self.1.lock().unwrap().push(records);
        self.0.lock().unwrap().push(format!("tentative {group}"));
    }
    fn abandoned(&self, group: u64) {
        self.0.lock().unwrap().push(format!("abandoned {group}"));
    }
}

#[test]
fn the_committer_hands_a_group_over_before_its_commit_with_the_bytes_it_commits() {
    let p = tempfile::tempdir().unwrap();
    let primary = open(p.path());
    let before = primary.tips().group;
    let rec = Arc::new(Recorder::default());
    assert!(primary.set_group_observer(rec.clone()));
    put(&primary, "acct/a", "1");
    let g = before + 1;
    assert_eq!(
        *rec.0.lock().unwrap(),
        vec![format!("tentative {g}"), format!("durable {g}")]
    );
    assert_eq!(
        rec.1.lock().unwrap()[0],
        primary.store().export_group(g).unwrap(),
        "what ships before the commit is what was committed"
    );
}
