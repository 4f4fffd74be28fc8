//! The epoch in signed heads (version 3, issue 18): `verify` refuses a head whose epoch
//! differs from the one before it (only a promotion may raise it, and this build writes
//! none), and a version-2 head after a version-3 one.
#![cfg(feature = "test-tamper")]

use mayfly_ledger::store::{names, open_read_only};
use mayfly_ledger::{tamper, verify, Ledger, Options, SignedHead, SigningKey, TxContext, TxId};
use slog::{o, Discard, Logger};

fn ledger_with_groups(dir: &std::path::Path) -> [u8; 32] {
    let l = Ledger::open(dir, &Options::default(), &Logger::root(Discard, o!())).unwrap();
    for i in 0..3 {
        let mut t = l
            .begin(TxContext {
                tx_id: TxId::generate(),
                handler: "kv".into(),
                request: b"r".to_vec(),
                domain_id: 1,
                policy_hash: [0; 32],
            })
            .unwrap();
        t.put(format!("k{i}").as_bytes(), b"v").unwrap();
        t.commit(Vec::new()).unwrap();
    }
    l.public_key()
}

/// Re-signs the stored head of `group` (with the ledger's own key) after `edit`.
fn resign_head(dir: &std::path::Path, group: u64, edit: impl Fn(&SignedHead) -> SignedHead) {
    let raw = tamper::get(dir, names::HEADS, &group.to_be_bytes()).unwrap();
    let head = SignedHead::decode(&raw).unwrap();
    let new = edit(&head);
    tamper::set(dir, names::HEADS, &group.to_be_bytes(), Some(&new.encode()));
}

/// `h` re-signed as a version-3 head of `epoch`.
fn with_epoch(key: &SigningKey, h: &SignedHead, epoch: u64) -> SignedHead {
    SignedHead::sign_v3(
        key,
        h.group,
        h.checkpoints,
        h.audit,
        h.time_ns,
        h.state.unwrap(),
        epoch,
        None,
    )
}

fn failures(dir: &std::path::Path, key: [u8; 32]) -> Vec<String> {
    let store = open_read_only(dir, &Default::default()).unwrap();
    let r = verify(&store, &[key], &mut |_| {}).unwrap();
    r.failures.iter().map(ToString::to_string).collect()
}

#[test]
fn verify_refuses_a_head_whose_epoch_moves() {
    for (epoch_of_2, expect) in [
        (1, "the epoch is raised without a promotion"),
        (u64::MAX, "the epoch is raised without a promotion"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let key_pub = ledger_with_groups(dir.path());
        assert!(failures(dir.path(), key_pub).is_empty());
        let key = SigningKey::load(dir.path()).unwrap();
        resign_head(dir.path(), 2, |h| with_epoch(&key, h, epoch_of_2));
        let f = failures(dir.path(), key_pub);
        assert!(
            f.iter()
                .any(|f| f.contains("signed head, group 2") && f.contains(expect)),
            "{f:?}"
        );
    }
    // Backwards: group 3 of epoch 0 after group 2 of epoch 1 is refused at group 2 already
    // (raised); make groups 2.. all epoch 1 except the last, which goes back.
    let dir = tempfile::tempdir().unwrap();
    let key_pub = ledger_with_groups(dir.path());
    let key = SigningKey::load(dir.path()).unwrap();
    let last = open_read_only(dir.path(), &Default::default())
        .unwrap()
        .last_group()
        .unwrap();
    for g in 1..last {
        resign_head(dir.path(), g, |h| with_epoch(&key, h, 5));
    }
    let f = failures(dir.path(), key_pub);
    assert!(
        f.iter()
            .any(|f| f.contains(&format!("signed head, group {last}"))
                && f.contains("the epoch moves backwards")),
        "{f:?}"
    );
}

#[test]
fn verify_refuses_a_version_2_head_after_a_version_3_one() {
    let dir = tempfile::tempdir().unwrap();
    let key_pub = ledger_with_groups(dir.path());
    let key = SigningKey::load(dir.path()).unwrap();
    resign_head(dir.path(), 3, |h| {
        SignedHead::sign_v2(
            &key,
            h.group,
            h.checkpoints,
            h.audit,
            h.time_ns,
            h.state.unwrap(),
            None,
        )
    });
    let f = failures(dir.path(), key_pub);
    assert!(
        f.iter().any(
            |f| f.contains("signed head, group 3") && f.contains("version 2 after a version-3")
        ),
        "{f:?}"
    );
}
