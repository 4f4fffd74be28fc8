//! Promotion of a standby (issue 18): the promotion group opens the next epoch under the
//! promoted node's own key; `verify` accepts the epoch rise exactly there and refuses any
//! other; the promoted copy opens as a ledger and commits on; a standby of the new
//! primary (a former primary that rejoined) follows across the promotion once the
//! promoted key is pinned; the command's nonce is refused when sent again.
#![cfg(feature = "test-tamper")]

use std::path::Path;

use mayfly_ledger::head::{Promotion, SignedHead};
use mayfly_ledger::store::{names, open_read_only};
use mayfly_ledger::{
    tamper, verify, ApplyError, AuditEvent, Ledger, PromoteError, PromotionRequest, Replica,
    Severity, SigningKey, Store, StoreOptions,
};

mod common;
use common::{open, put};

fn follow(primary: &Store, standby: &mut Replica) {
    let last = primary.last_group().unwrap();
    for g in standby.held().group + 1..=last {
        let group = primary.export_group(g).unwrap();
        standby
            .apply(&group)
            .unwrap_or_else(|e| panic!("group {g}: {e}"));
    }
}

fn request(nonce: u8) -> PromotionRequest {
    PromotionRequest {
        command: [0xc0; 32],
        nonce: [nonce; 16],
        expires_ns: u64::MAX,
        cosigners: vec![[0xa2; 32], [0xa1; 32]],
        events: vec![
            AuditEvent::new("admin.accepted", Severity::Notice).field("command", "promote")
        ],
        time_ns: 1_800_000_000_000_000_000,
    }
}

fn failures(store: &Store, trusted: &[[u8; 32]]) -> Vec<String> {
    let r = verify(store, trusted, &mut |_| {}).unwrap();
    r.failures.iter().map(ToString::to_string).collect()
}

/// A primary with 3 commits and a standby holding all of it, promoted with its own key.
/// Returns (primary identity, promotion key, the primary's ledger).
fn promoted(primary_dir: &Path, standby_dir: &Path) -> ([u8; 32], [u8; 32], Ledger) {
    let primary = open(primary_dir);
    for i in 0..3 {
        put(&primary, &format!("k{i}"), "v");
    }
    let mut standby =
        Replica::open(standby_dir, &StoreOptions::default(), primary.public_key()).unwrap();
    follow(primary.store(), &mut standby);
    let key = SigningKey::generate(standby_dir).unwrap();
    let before = standby.held().clone();
    let p = standby.promote(&key, request(1)).unwrap();
    assert_eq!(p.group, before.group + 1);
    assert_eq!((p.epoch, p.from_group), (1, before.group));
    assert_eq!(p.checkpoints, before.checkpoints);
    assert_eq!(standby.held().epoch, 1);
    assert_eq!(standby.held().signer, key.public_key());
    (primary.public_key(), key.public_key(), primary)
}

#[test]
fn a_promoted_standby_opens_the_next_epoch_and_commits_on() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (identity, promo, primary) = promoted(a.path(), b.path());
    let store = open_read_only(b.path(), &StoreOptions::default()).unwrap();
    let r = verify(&store, &[identity, promo], &mut |_| {}).unwrap();
    assert!(r.ok(), "{:?}", r.failures);
    assert_eq!(r.promotions, 1);
    // Pinned to the primary's identity only, the promotion key is not trusted.
    let f = failures(&store, &[identity]);
    assert!(
        f.iter()
            .any(|f| f.contains("promotion signed by untrusted key")),
        "{f:?}"
    );
    // The replicated prefix is the primary's, byte for byte.
    let last = primary.store().last_group().unwrap();
    for g in 1..=last {
        assert_eq!(
            primary.store().export_group(g).unwrap(),
            store.export_group(g).unwrap()
        );
    }
    let head = SignedHead::decode(&store.export_group(last + 1).unwrap().head).unwrap();
    let p = head.promotion.clone().unwrap();
    assert_eq!((head.epoch(), p.from_group), (1, last));
    assert_eq!(p.cosigners, vec![[0xa1; 32], [0xa2; 32]]);
    drop(store);
    // The promoted copy is a ledger of epoch 1 signed by its own key.
    let l = open(b.path());
    assert_eq!(l.signing_key(), promo);
    assert_eq!(l.public_key(), identity);
    put(&l, "after", "promotion");
    let g = l.store().last_group().unwrap();
    let h = SignedHead::decode(&l.store().export_group(g).unwrap().head).unwrap();
    assert_eq!((h.epoch(), h.public_key), (1, promo));
    let r = verify(l.store(), &[identity, promo], &mut |_| {}).unwrap();
    assert!(r.ok(), "{:?}", r.failures);
    // The same command sent again to the promoted node is a replay.
    drop(l);
    let mut again = Replica::open(b.path(), &StoreOptions::default(), identity).unwrap();
    let other = SigningKey::from_seed(&[9; 32]);
    match again.promote(&other, request(1)) {
        Err(PromoteError::NonceReused { .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_standby_of_the_new_primary_follows_across_the_promotion_when_pinned() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (identity, promo, _primary) = promoted(a.path(), b.path());
    let new_primary = open(b.path());
    put(&new_primary, "k9", "after");
    // Without the promotion key pinned, the promotion group is refused.
    let mut unpinned = Replica::open(c.path(), &StoreOptions::default(), identity).unwrap();
    let last = new_primary.store().last_group().unwrap();
    let mut refused = None;
    for g in 1..=last {
        if let Err(e) = unpinned.apply(&new_primary.store().export_group(g).unwrap()) {
            refused = Some((g, e));
            break;
        }
    }
    match refused {
        Some((_, ApplyError::BadPromotion { reason, .. })) => {
            assert!(reason.contains("untrusted key"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    drop(unpinned);
    let d = tempfile::tempdir().unwrap();
    let mut standby = Replica::open(d.path(), &StoreOptions::default(), identity).unwrap();
    standby.trust_promotion_keys(vec![promo]);
    follow(new_primary.store(), &mut standby);
    assert_eq!(standby.held().epoch, 1);
    for g in 1..=last {
        assert_eq!(
            new_primary.store().export_group(g).unwrap(),
            standby.store().export_group(g).unwrap()
        );
    }
    assert_eq!(
        new_primary.store().data_snapshot().unwrap(),
        standby.store().data_snapshot().unwrap()
    );
    let r = verify(standby.store(), &[identity, promo], &mut |_| {}).unwrap();
    assert!(r.ok(), "{:?}", r.failures);
}

/// Re-signs the promotion head of `dir` (group `g`) after `edit`, with `key`.
fn resign(dir: &Path, g: u64, key: &SigningKey, edit: impl Fn(&mut SignedHead)) {
    let raw = tamper::get(dir, names::HEADS, &g.to_be_bytes()).unwrap();
    let mut h = SignedHead::decode(&raw).unwrap();
    edit(&mut h);
    let p: Promotion = h.promotion.clone().unwrap();
    let new = SignedHead::sign_promotion(
        key,
        h.group,
        h.checkpoints,
        h.audit,
        h.time_ns,
        h.state.unwrap(),
        h.epoch(),
        p,
    );
    tamper::set(dir, names::HEADS, &g.to_be_bytes(), Some(&new.encode()));
}

#[test]
fn verify_refuses_a_promotion_that_does_not_follow() {
    type Edit = fn(&mut SignedHead);
    let cases: [(&str, Edit, &str); 4] = [
        (
            "epoch + 2",
            |h| h.epoch = Some(2),
            "raises the epoch by exactly one",
        ),
        (
            "another head",
            |h| h.promotion.as_mut().unwrap().from_head = [7; 32],
            "but the head before it is group",
        ),
        (
            "another group",
            |h| h.promotion.as_mut().unwrap().from_group -= 1,
            "but the head before it is group",
        ),
        ("untouched", |_| {}, ""),
    ];
    for (name, edit, expect) in cases {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (identity, promo, _p) = promoted(a.path(), b.path());
        let key = SigningKey::load(b.path()).unwrap();
        let g = open_read_only(b.path(), &StoreOptions::default())
            .unwrap()
            .last_group()
            .unwrap();
        resign(b.path(), g, &key, edit);
        let store = open_read_only(b.path(), &StoreOptions::default()).unwrap();
        let f = failures(&store, &[identity, promo]);
        if expect.is_empty() {
            assert!(f.is_empty(), "{name}: {f:?}");
        } else {
            assert!(
                f.iter()
                    .any(|f| f.contains(&format!("signed head, group {g}")) && f.contains(expect)),
                "{name}: {f:?}"
            );
        }
    }
    // Signed by the former primary's key (in force before it): refused, even if trusted.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (identity, _promo, _p) = promoted(a.path(), b.path());
    let old = SigningKey::load(a.path()).unwrap();
    let g = open_read_only(b.path(), &StoreOptions::default())
        .unwrap()
        .last_group()
        .unwrap();
    resign(b.path(), g, &old, |_| {});
    let store = open_read_only(b.path(), &StoreOptions::default()).unwrap();
    let f = failures(&store, &[identity]);
    assert!(
        f.iter()
            .any(|f| f.contains("a promoted node signs with its own key")),
        "{f:?}"
    );
}

#[test]
fn after_a_promotion_the_epoch_neither_falls_nor_rises_without_one() {
    for (epoch, expect) in [
        (0, "the epoch moves backwards"),
        (2, "the epoch is raised without a promotion"),
    ] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (identity, promo, _p) = promoted(a.path(), b.path());
        let l = open(b.path());
        put(&l, "x", "y");
        let g = l.store().last_group().unwrap();
        drop(l);
        let key = SigningKey::load(b.path()).unwrap();
        let raw = tamper::get(b.path(), names::HEADS, &g.to_be_bytes()).unwrap();
        let h = SignedHead::decode(&raw).unwrap();
        let forged = SignedHead::sign_v3(
            &key,
            h.group,
            h.checkpoints,
            h.audit,
            h.time_ns,
            h.state.unwrap(),
            epoch,
            None,
        );
        tamper::set(
            b.path(),
            names::HEADS,
            &g.to_be_bytes(),
            Some(&forged.encode()),
        );
        let store = open_read_only(b.path(), &StoreOptions::default()).unwrap();
        let f = failures(&store, &[identity, promo]);
        assert!(
            f.iter()
                .any(|f| f.contains(&format!("signed head, group {g}")) && f.contains(expect)),
            "{f:?}"
        );
    }
}

#[test]
fn a_promotion_is_refused_on_an_empty_copy_with_the_key_in_force_or_without_cosigners() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = open(a.path());
    put(&primary, "k", "v");
    let mut standby =
        Replica::open(b.path(), &StoreOptions::default(), primary.public_key()).unwrap();
    let key = SigningKey::generate(b.path()).unwrap();
    assert!(matches!(
        standby.promote(&key, request(1)),
        Err(PromoteError::Empty)
    ));
    follow(primary.store(), &mut standby);
    let old = SigningKey::load(a.path()).unwrap();
    assert!(matches!(
        standby.promote(&old, request(1)),
        Err(PromoteError::SameKey { .. })
    ));
    let mut none = request(1);
    none.cosigners.clear();
    assert!(matches!(
        standby.promote(&key, none),
        Err(PromoteError::Cosigners { .. })
    ));
    let mut twice = request(1);
    twice.cosigners = vec![[1; 32], [1; 32]];
    assert!(matches!(
        standby.promote(&key, twice),
        Err(PromoteError::Cosigners { .. })
    ));
    // Nothing was written by the refusals.
    assert_eq!(standby.held().epoch, 0);
    assert_eq!(
        standby.store().last_group().unwrap(),
        primary.store().last_group().unwrap()
    );
}

#[test]
fn an_admin_command_accepted_by_the_primary_is_a_replay_on_the_promoted_standby() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = open(a.path());
    put(&primary, "k", "v");
    let nonce = [0x5a; 16];
    let accepted = AuditEvent::new("admin.accepted", Severity::Notice)
        .field("command", "key.rotate")
        .field("nonce", mayfly_ledger::codec::hex(&nonce))
        .field("body_sha256", mayfly_ledger::codec::hex(&[7; 32]));
    primary
        .record_admin_nonce(nonce, u64::MAX, [7; 32], 0, vec![accepted])
        .unwrap();
    let mut standby =
        Replica::open(b.path(), &StoreOptions::default(), primary.public_key()).unwrap();
    follow(primary.store(), &mut standby);
    let key = SigningKey::generate(b.path()).unwrap();
    standby.promote(&key, request(1)).unwrap();
    drop(standby);
    let promoted = open(b.path());
    match promoted.record_admin_nonce(nonce, u64::MAX, [7; 32], 0, Vec::new()) {
        Err(mayfly_ledger::CommitError::NonceReused { .. }) => {}
        other => panic!("the replayed command was not refused: {other:?}"),
    }
    // Another nonce is accepted.
    promoted
        .record_admin_nonce([0x5b; 16], u64::MAX, [7; 32], 0, Vec::new())
        .unwrap();
}
