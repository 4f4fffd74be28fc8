//! A standby's copy of a primary's ledger (issue 18): groups exported from the primary and
//! applied to a replica become a byte-identical ledger that verifies; every hostile group
//! (truncated, reordered, replayed, forged, from another key, of another epoch, with a
//! state the head does not sign, a fork) is refused and leaves the copy as it was.

use std::path::Path;

use mayfly_ledger::head::{SignedHead, Tip};
use mayfly_ledger::{
    verify, ApplyError, AuditEvent, GroupRecords, Ledger, Replica, Severity, SigningKey, Store,
    StoreOptions, TxContext, TxId,
};

mod common;
use common::{open, put};

fn delete(ledger: &Ledger, k: &str) {
    let mut t = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "kv".into(),
            request: format!("delete {k}").into_bytes(),
            domain_id: 2,
            policy_hash: [0; 32],
        })
        .unwrap();
    assert!(t.get(k.as_bytes()).unwrap().is_some());
    t.delete(k.as_bytes()).unwrap();
    t.commit(Vec::new()).unwrap();
}

/// A primary with commits, a delete, a rollback, a key rotation and audit-only groups.
fn busy_primary(dir: &Path) -> Ledger {
    let l = open(dir);
    let a = put(&l, "acct/a", "100");
    put(&l, "acct/b", "5");
    delete(&l, "acct/b");
    l.audit(vec![
        AuditEvent::new("test.event", Severity::Info).field("n", 1)
    ])
    .unwrap();
    let bad = put(&l, "acct/a", "999");
    l.rollback(&[bad], true, "test", [0; 32]).unwrap();
    l.rotate_key(Vec::new()).unwrap();
    put(&l, "acct/c", "7");
    assert!(a > 0);
    l
}

fn replica(dir: &Path, primary: &Ledger) -> Replica {
    Replica::open(dir, &StoreOptions::default(), primary.public_key()).unwrap()
}

fn follow(primary: &Ledger, standby: &mut Replica) {
    let last = primary.store().last_group().unwrap();
    for g in standby.held().group + 1..=last {
        let group = primary.store().export_group(g).unwrap();
        standby
            .apply(&group)
            .unwrap_or_else(|e| panic!("group {g}: {e}"));
    }
}

/// Both ledgers hold the same groups byte for byte (heads, checkpoint and audit records)
/// and the same live data.
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

fn verify_ok(store: &Store, trusted: [u8; 32]) -> mayfly_ledger::VerifyReport {
    let r = verify(store, &[trusted], &mut |_| {}).unwrap();
    assert!(r.ok(), "{:?}", r.failures);
    r
}

#[test]
fn a_replica_of_every_group_is_the_same_ledger_and_verifies() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let primary = busy_primary(p.path());
    let mut standby = replica(s.path(), &primary);
    assert_eq!(standby.held().group, 0);
    follow(&primary, &mut standby);
    let tips = primary.tips();
    assert_eq!(standby.held().group, tips.group);
    assert_eq!(standby.held().checkpoints, tips.checkpoints);
    assert_eq!(standby.held().audit, tips.audit);
    assert_eq!(standby.held().signer, primary.signing_key());
    let key = primary.public_key();
    let rp = verify_ok(primary.store(), key);
    let rs = verify_ok(standby.store(), key);
    assert_eq!(rp.state_entries, rs.state_entries);
    assert_eq!(rs.rotations, 1);
    assert_same_chain(primary.store(), standby.store());
    // The derived indexes agree too: the rollback is known as such on the standby.
    assert!(standby.store().undone_by(4).unwrap().is_some());
    assert_eq!(
        standby.store().undone_by(4).unwrap(),
        primary.store().undone_by(4).unwrap()
    );
    drop(standby);

    // Catch-up after a restart of the standby: it reopens where it stopped.
    put(&primary, "acct/d", "1");
    put(&primary, "acct/e", "2");
    let mut standby = replica(s.path(), &primary);
    assert_eq!(standby.held().group, tips.group);
    follow(&primary, &mut standby);
    verify_ok(standby.store(), key);
    assert_same_chain(primary.store(), standby.store());
}

#[test]
fn the_committer_writes_version_3_heads_of_epoch_0() {
    let p = tempfile::tempdir().unwrap();
    let l = open(p.path());
    put(&l, "k", "v");
    let g = l.store().export_group(l.tips().group).unwrap();
    let head = SignedHead::decode(&g.head).unwrap();
    assert_eq!(head.version(), mayfly_ledger::head::VERSION_3);
    assert_eq!(head.epoch(), 0);
    assert_eq!(l.tips().epoch, 0);
}

/// Expects `group` to be refused by `standby` without any change to what it holds.
fn refused(standby: &mut Replica, group: &GroupRecords) -> ApplyError {
    let before = standby.held().clone();
    let e = standby
        .apply(group)
        .expect_err("a hostile group was applied");
    assert_eq!(
        *standby.held(),
        before,
        "a refused group changed the replica"
    );
    e
}

/// Re-signs a group's head with `key`, changing it with `edit` first.
fn resign(group: &GroupRecords, key: &SigningKey, edit: impl Fn(&mut SignedHead)) -> GroupRecords {
    let mut h = SignedHead::decode(&group.head).unwrap();
    edit(&mut h);
    let signed = SignedHead::sign_v3(
        key,
        h.group,
        h.checkpoints,
        h.audit,
        h.time_ns,
        h.state.unwrap(),
        h.epoch(),
        h.next_key,
    );
    GroupRecords {
        head: signed.encode(),
        ..group.clone()
    }
}

#[test]
fn hostile_groups_are_refused_and_leave_nothing_behind() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let primary = open(p.path());
    for i in 0..4 {
        put(&primary, &format!("k{i}"), "v");
    }
    let key = SigningKey::load(p.path()).unwrap();
    let mut standby = replica(s.path(), &primary);
    let g = |n: u64| primary.store().export_group(n).unwrap();
    standby.apply(&g(1)).unwrap();
    standby.apply(&g(2)).unwrap();

    // Reordered: group 4 before 3.
    assert!(matches!(
        refused(&mut standby, &g(4)),
        ApplyError::OutOfOrder {
            expected: 3,
            found: 4
        }
    ));
    // Replayed: group 2 again.
    assert!(matches!(
        refused(&mut standby, &g(2)),
        ApplyError::Replayed { group: 2 }
    ));
    // Truncated head, and a head cut anywhere.
    let good = g(3);
    for cut in [0, 5, 100, good.head.len() - 1] {
        let mut t = good.clone();
        t.head.truncate(cut);
        assert!(matches!(
            refused(&mut standby, &t),
            ApplyError::BadHead { .. }
        ));
    }
    // A record left out, or cut short.
    let mut t = good.clone();
    t.checkpoints.clear();
    assert!(matches!(
        refused(&mut standby, &t),
        ApplyError::TipMismatch { .. }
    ));
    let mut t = good.clone();
    t.checkpoints[0].truncate(60);
    assert!(matches!(
        refused(&mut standby, &t),
        ApplyError::BadRecord { .. }
    ));
    // Forged: the signature flipped; a record altered under the genuine head.
    let mut t = good.clone();
    let last = t.head.len() - 1;
    t.head[last] ^= 1;
    assert!(matches!(
        refused(&mut standby, &t),
        ApplyError::BadSignature { group: 3 }
    ));
    let mut t = good.clone();
    let n = t.checkpoints[0].len();
    t.checkpoints[0][n - 1] ^= 1; // the last byte of the last write's value
    assert!(matches!(
        refused(&mut standby, &t),
        ApplyError::TipMismatch { .. }
    ));
    // Signed by another key (another appliance, or an attacker's).
    let stranger = SigningKey::from_seed(&[9; 32]);
    assert!(matches!(
        refused(&mut standby, &resign(&good, &stranger, |_| {})),
        ApplyError::UntrustedSigner { group: 3, .. }
    ));
    // Of another epoch, though signed by the primary's own key.
    assert!(matches!(
        refused(&mut standby, &resign(&good, &key, |h| h.epoch = Some(1))),
        ApplyError::WrongEpoch {
            found: 1,
            expected: 0,
            ..
        }
    ));
    // A head whose signed state is not what the records produce.
    assert!(matches!(
        refused(
            &mut standby,
            &resign(&good, &key, |h| h.state = Some([7; 32]))
        ),
        ApplyError::StateMismatch { group: 3, .. }
    ));
    // A version-2 head after version-3 ones.
    let mut h = SignedHead::decode(&good.head).unwrap();
    h.epoch = None;
    let v2 = SignedHead::sign_v2(
        &key,
        h.group,
        h.checkpoints,
        h.audit,
        h.time_ns,
        h.state.unwrap(),
        None,
    );
    let t = GroupRecords {
        head: v2.encode(),
        ..good.clone()
    };
    assert!(matches!(
        refused(&mut standby, &t),
        ApplyError::VersionDowngrade { .. }
    ));

    // None of it left a trace: the genuine groups still apply, and the copy verifies.
    standby.apply(&good).unwrap();
    standby.apply(&g(4)).unwrap();
    follow(&primary, &mut standby);
    verify_ok(standby.store(), primary.public_key());
    assert_same_chain(primary.store(), standby.store());
}

#[test]
fn a_fork_is_named_as_one_and_is_fatal() {
    let p = tempfile::tempdir().unwrap();
    let twin = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let key_pub;
    {
        let primary = open(p.path());
        put(&primary, "a", "1");
        key_pub = primary.public_key();
    }
    // The same ledger, copied while closed: two appliances with one history so far.
    for f in ["data.mdb", "signing.key"] {
        std::fs::copy(p.path().join(f), twin.path().join(f)).unwrap();
    }
    let primary = open(p.path());
    let other = open(twin.path());
    put(&primary, "a", "2");
    put(&other, "a", "3");
    let mut standby = Replica::open(s.path(), &StoreOptions::default(), key_pub).unwrap();
    follow(&primary, &mut standby);
    let held = standby.held().group;
    // The twin's last group: the same number as one the standby holds, different bytes.
    let e = refused(&mut standby, &other.store().export_group(held).unwrap());
    assert!(matches!(e, ApplyError::Fork { chain: "group", .. }), "{e}");
    assert!(e.is_fatal());
    // The twin's next group: links to a record the standby holds differently.
    put(&other, "a", "4");
    let e = refused(&mut standby, &other.store().export_group(held + 1).unwrap());
    assert!(
        matches!(e, ApplyError::Fork { .. } | ApplyError::OutOfOrder { .. }),
        "{e}"
    );
}

#[test]
fn random_damage_to_a_group_is_always_refused_and_never_panics() {
    let p = tempfile::tempdir().unwrap();
    let s = tempfile::tempdir().unwrap();
    let primary = open(p.path());
    put(&primary, "x", "1");
    put(&primary, "y", "2");
    let mut standby = replica(s.path(), &primary);
    let last = primary.store().last_group().unwrap();
    for g in 1..last {
        standby
            .apply(&primary.store().export_group(g).unwrap())
            .unwrap();
    }
    let good = primary.store().export_group(last).unwrap();
    let mut rng = fastrand::Rng::with_seed(18);
    for round in 0..300 {
        let mut t = good.clone();
        let target: &mut Vec<u8> = match (rng.bool(), t.checkpoints.first_mut()) {
            (true, Some(cp)) => cp,
            _ => &mut t.head,
        };
        match rng.u8(0..3) {
            0 => {
                let i = rng.usize(0..target.len());
                target[i] ^= 1 << rng.u8(0..8);
            }
            1 => {
                let n = rng.usize(0..target.len());
                target.truncate(n);
            }
            _ => {
                let i = rng.usize(0..=target.len());
                target.insert(i, rng.u8(..));
            }
        }
        let e = refused(&mut standby, &t);
        assert!(!e.to_string().is_empty(), "round {round}");
    }
    standby.apply(&good).unwrap();
    assert_eq!(standby.held().checkpoints, primary.tips().checkpoints);
    assert_eq!(
        standby.held().audit,
        Tip {
            seq: primary.tips().audit.seq,
            hash: primary.tips().audit.hash
        }
    );
}
