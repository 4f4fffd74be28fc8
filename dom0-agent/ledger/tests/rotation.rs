//! Key rotation (a head signed by the old key naming the new one; `verify` follows the
//! hand-over and refuses forgeries) and admin nonces (recorded once, replays refused,
//! expired ones pruned).

use mayfly_ledger::codec::hex;
use mayfly_ledger::head::KIND_ROTATION;
use mayfly_ledger::keys::{KEY_FILE, NEXT_KEY_FILE};
use mayfly_ledger::{
    verify, AuditEvent, CommitError, Ledger, Options, Severity, SignedHead, SigningKey, TxContext,
    TxId,
};
use slog::{o, Discard, Logger};

fn open(dir: &std::path::Path) -> Ledger {
    Ledger::open(dir, &Options::default(), &Logger::root(Discard, o!())).unwrap()
}

fn put(ledger: &Ledger, k: &str, v: &str) -> u64 {
    let mut t = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "kv".into(),
            request: b"r".to_vec(),
            domain_id: 1,
            policy_hash: [0; 32],
        })
        .unwrap();
    t.put(k.as_bytes(), v.as_bytes()).unwrap();
    t.commit(Vec::new()).unwrap().seq
}

fn failures(dir: &std::path::Path, trusted: &[[u8; 32]]) -> Vec<String> {
    let store = mayfly_ledger::store::open_read_only(dir, &Default::default()).unwrap();
    let r = verify(&store, trusted, &mut |_| {}).unwrap();
    r.failures.iter().map(ToString::to_string).collect()
}

fn last_head(dir: &std::path::Path) -> (u64, SignedHead) {
    let store = mayfly_ledger::store::open_read_only(dir, &Default::default()).unwrap();
    newest_head(&store)
}

fn newest_head(store: &mayfly_ledger::Store) -> (u64, SignedHead) {
    let group = store.last_heads(1).unwrap();
    let h = group.into_iter().next().unwrap();
    (h.group, h)
}

#[test]
fn rotation_is_signed_by_the_old_key_and_verify_follows_it_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let root;
    let new_key;
    {
        let l = open(dir.path());
        root = l.public_key();
        put(&l, "a", "1");
        let (k, receipt) = l
            .rotate_key(vec![
                AuditEvent::new("test.rotate", Severity::Info).field("why", "test")
            ])
            .unwrap();
        new_key = k;
        assert_ne!(new_key, root);
        assert_eq!(l.signing_key(), new_key);
        assert_eq!(l.public_key(), root, "the identity stays the first key");
        let (group, head) = newest_head(l.store());
        assert_eq!(group, receipt.group);
        assert_eq!(head.next_key, Some(new_key));
        assert_eq!(
            head.public_key, root,
            "the rotation is signed by the old key"
        );
        assert!(head.signature_valid());
        assert_eq!(head.encode()[5], KIND_ROTATION);
        put(&l, "b", "2");
        let (_, after) = newest_head(l.store());
        assert_eq!(after.public_key, new_key);
    }
    assert!(!dir.path().join(NEXT_KEY_FILE).exists());
    assert_eq!(
        SigningKey::load(dir.path()).unwrap().public_key(),
        new_key,
        "the key file holds the new key"
    );
    assert!(failures(dir.path(), &[root]).is_empty());
    // Trusting only the new key cannot vouch for what the old key signed.
    let f = failures(dir.path(), &[new_key]);
    assert!(
        f[0].contains("group 1") && f[0].contains("untrusted"),
        "{f:?}"
    );
    // Reopens with the new key and keeps signing with it.
    let l = open(dir.path());
    assert_eq!(l.signing_key(), new_key);
    put(&l, "c", "3");
    let (k2, _) = l.rotate_key(Vec::new()).unwrap();
    put(&l, "d", "4");
    drop(l);
    assert!(failures(dir.path(), &[root]).is_empty());
    assert_ne!(k2, new_key);
}

#[cfg(feature = "test-tamper")]
mod forged {
    use super::*;
    use mayfly_ledger::tamper;

    /// Appends a head (as the next group) that an attacker signed, and points the recorded
    /// tips at it, as someone with write access to the files but not the key could.
    fn append_head(dir: &std::path::Path, head: &SignedHead) {
        tamper::set(
            dir,
            "heads",
            &head.group.to_be_bytes(),
            Some(&head.encode()),
        );
        tamper::set(dir, "meta", b"group", Some(&head.group.to_be_bytes()));
    }

    #[test]
    fn a_rotation_signed_by_another_key_or_altered_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path());
        let root = l.public_key();
        put(&l, "a", "1");
        drop(l);
        let (group, head) = last_head(dir.path());
        let attacker = SigningKey::from_seed(&[0xee; 32]);

        // 1. A rotation head signed by the attacker, handing over to the attacker.
        let forged = SignedHead::sign_rotation(
            &attacker,
            group + 1,
            head.checkpoints,
            head.audit,
            head.time_ns + 1,
            attacker.public_key(),
        );
        let saved_meta = tamper::get(dir.path(), "meta", b"group").unwrap();
        append_head(dir.path(), &forged);
        let f = failures(dir.path(), &[root]);
        assert!(
            f[0].contains(&format!("group {}", group + 1)) && f[0].contains("untrusted"),
            "{f:?}"
        );

        // 2. A genuine-looking rotation whose next key was swapped after signing.
        let genuine_next = SigningKey::from_seed(&[0x42; 32]);
        let mut rot = SignedHead::sign(&attacker, 0, head.checkpoints, head.audit, 0);
        rot.group = group + 1;
        rot.public_key = root;
        rot.next_key = Some(genuine_next.public_key());
        rot.signature = head.signature; // any signature that is not over these bytes
        append_head(dir.path(), &rot);
        let f = failures(dir.path(), &[root]);
        assert!(f[0].contains("signature does not verify"), "{f:?}");

        // 3. After a real rotation, a head signed by the retired (still trusted) key.
        tamper::set(dir.path(), "heads", &(group + 1).to_be_bytes(), None);
        tamper::set(dir.path(), "meta", b"group", Some(&saved_meta));
        let old_pkcs8 = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
        let l = open(dir.path());
        l.rotate_key(Vec::new()).unwrap();
        drop(l);
        assert!(failures(dir.path(), &[root]).is_empty());
        // The attacker recovered the old key file from a backup and signs a new group.
        let old_dir = tempfile::tempdir().unwrap();
        std::fs::write(old_dir.path().join(KEY_FILE), &old_pkcs8).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            old_dir.path().join(KEY_FILE),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let old = SigningKey::load(old_dir.path()).unwrap();
        assert_eq!(old.public_key(), root);
        let (g, h) = last_head(dir.path());
        let stale = SignedHead::sign(&old, g + 1, h.checkpoints, h.audit, h.time_ns + 1);
        append_head(dir.path(), &stale);
        let f = failures(dir.path(), &[root]);
        assert!(
            f[0].contains(&format!("group {}", g + 1)) && f[0].contains("rotation 1 handed"),
            "{f:?}"
        );
        let _ = hex(&root);
    }

    #[test]
    fn a_rotation_back_to_a_retired_key_or_to_itself_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path());
        let root = l.public_key();
        put(&l, "a", "1");
        l.rotate_key(Vec::new()).unwrap();
        put(&l, "b", "2");
        drop(l);
        assert!(failures(dir.path(), &[root]).is_empty());
        // Whoever holds the current key signs a rotation back to the retired root key
        // (which may have leaked from a backup), or to itself.
        let current = SigningKey::load(dir.path()).unwrap();
        assert_ne!(current.public_key(), root);
        let (g, h) = last_head(dir.path());
        for (next, says) in [
            (root, "the retired key"),
            (current.public_key(), "its own key"),
        ] {
            let back = SignedHead::sign_rotation(
                &current,
                g + 1,
                h.checkpoints,
                h.audit,
                h.time_ns + 1,
                next,
            );
            assert!(back.signature_valid());
            append_head(dir.path(), &back);
            let f = failures(dir.path(), &[root]);
            assert!(
                !f.is_empty() && f[0].contains(&format!("group {}", g + 1)) && f[0].contains(says),
                "{f:?}"
            );
        }
    }
}

#[test]
fn an_interrupted_rotation_is_finished_or_discarded_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    let root = l.public_key();
    drop(l);
    // Never committed: a stray next-key file is discarded and the old key stays.
    SigningKey::generate_next(dir.path()).unwrap();
    let l = open(dir.path());
    assert_eq!(l.signing_key(), root);
    assert!(!dir.path().join(NEXT_KEY_FILE).exists());
    // Committed, but the rename did not happen: simulate by putting the old key back as
    // signing.key and the new one as signing.key.next.
    let old = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
    let (new_key, _) = l.rotate_key(Vec::new()).unwrap();
    drop(l);
    std::fs::rename(dir.path().join(KEY_FILE), dir.path().join(NEXT_KEY_FILE)).unwrap();
    std::fs::write(dir.path().join(KEY_FILE), old).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join(KEY_FILE),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let l = open(dir.path());
    assert_eq!(l.signing_key(), new_key);
    put(&l, "x", "y");
    drop(l);
    assert_eq!(SigningKey::load(dir.path()).unwrap().public_key(), new_key);
    assert!(failures(dir.path(), &[root]).is_empty());
}

#[test]
fn nonces_are_recorded_once_and_pruned_after_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path());
    let ev =
        || vec![AuditEvent::new("admin.accepted", Severity::Notice).field("command", "status")];
    let before = l.tips().audit.seq;
    l.record_admin_nonce([1; 16], 1_000, [0; 32], 0, ev())
        .unwrap();
    assert_eq!(
        l.tips().audit.seq,
        before + 1,
        "the audit event rides with the nonce"
    );
    let e = l
        .record_admin_nonce([1; 16], 1_000, [0; 32], 0, ev())
        .unwrap_err();
    assert!(matches!(e, CommitError::NonceReused { .. }), "{e}");
    assert_eq!(
        l.tips().audit.seq,
        before + 1,
        "a refused nonce writes nothing"
    );
    l.record_admin_nonce([2; 16], 5_000, [0; 32], 0, ev())
        .unwrap();
    assert_eq!(l.store().admin_nonces().unwrap(), 2);
    // Pruning everything that expired before 2,000 removes nonce 1 (expiry 1,000) only.
    l.record_admin_nonce([3; 16], 9_000, [0; 32], 2_000, ev())
        .unwrap();
    assert_eq!(l.store().admin_nonces().unwrap(), 2);
    // Once pruned, the nonce is forgotten (the command has expired, so it is refused on
    // time grounds before the nonce is consulted).
    l.record_admin_nonce([1; 16], 1_000, [0; 32], 2_000, ev())
        .unwrap();
    drop(l);
    assert!(failures(
        dir.path(),
        &[SigningKey::load(dir.path()).unwrap().public_key()]
    )
    .is_empty());
}
