//! The published test vectors in `docs/vectors/` (also printed in `docs/formats.md`):
//! this build must encode the documented values to exactly those bytes, decode them back,
//! and agree on the chain hashes and the signature.
//!
//! Regenerate (only when a format version changes): `MAYFLY_BLESS=1 cargo test -p
//! mayfly-ledger --test vectors`.

use std::path::PathBuf;

use mayfly_ledger::checkpoint::chain_hash;
use mayfly_ledger::codec::{hex, unhex};
use mayfly_ledger::{
    AuditEvent, AuditRecord, Checkpoint, ReadEntry, Severity, SignedHead, SigningKey, Tip, TxId,
    WriteEntry,
};

fn vector_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/vectors")
        .join(name)
}

fn check(name: &str, bytes: &[u8]) {
    let path = vector_path(name);
    if std::env::var_os("MAYFLY_BLESS").is_some() {
        std::fs::write(&path, format!("{}\n", hex(bytes))).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let want = unhex(text.trim()).expect("hex");
    assert_eq!(
        hex(bytes),
        hex(&want),
        "{name}: encoding differs from the published vector"
    );
}

/// Checkpoint 1 of the documented example: a transfer of 5 from acct/a to acct/b.
fn checkpoint_1() -> Checkpoint {
    Checkpoint {
        seq: 1,
        prev_hash: [0; 32],
        tx_id: TxId([0x11; 16]),
        handler: "transfer".into(),
        client: None,
        domain_id: 7,
        policy_hash: [0x22; 32],
        entropy_seed: [0x55; 32],
        begin_ns: 1_700_000_000_000_000_000,
        commit_ns: 1_700_000_000_000_500_000,
        request: br#"{"from":"a","to":"b","amount":5}"#.to_vec(),
        result: b"ok".to_vec(),
        reads: vec![
            ReadEntry {
                key: b"acct/a".to_vec(),
                version: 0,
            },
            ReadEntry {
                key: b"acct/b".to_vec(),
                version: 0,
            },
        ],
        writes: vec![
            WriteEntry {
                key: b"acct/a".to_vec(),
                before_version: 0,
                before: None,
                after: Some(b"95".to_vec()),
            },
            WriteEntry {
                key: b"acct/b".to_vec(),
                before_version: 0,
                before: None,
                after: Some(b"105".to_vec()),
            },
        ],
    }
}

/// Checkpoint 2: acct/b read at version 1, then deleted.
fn checkpoint_2(prev: [u8; 32]) -> Checkpoint {
    Checkpoint {
        seq: 2,
        prev_hash: prev,
        tx_id: TxId([0x33; 16]),
        handler: "close".into(),
        client: None,
        domain_id: 8,
        policy_hash: [0x22; 32],
        entropy_seed: [0; 32],
        begin_ns: 1_700_000_001_000_000_000,
        commit_ns: 1_700_000_001_000_500_000,
        request: b"close b".to_vec(),
        result: Vec::new(),
        reads: vec![ReadEntry {
            key: b"acct/b".to_vec(),
            version: 1,
        }],
        writes: vec![WriteEntry {
            key: b"acct/b".to_vec(),
            before_version: 1,
            before: Some(b"105".to_vec()),
            after: None,
        }],
    }
}

#[test]
fn checkpoint_vectors() {
    let c1 = checkpoint_1();
    let e1 = c1.encode();
    check("checkpoint-1.hex", &e1);
    assert_eq!(Checkpoint::decode(&e1).unwrap(), c1);
    let h1 = chain_hash(&[0; 32], &e1);
    check("checkpoint-1.hash", &h1);

    let c2 = checkpoint_2(h1);
    let e2 = c2.encode();
    check("checkpoint-2.hex", &e2);
    assert_eq!(Checkpoint::decode(&e2).unwrap(), c2);
    check("checkpoint-2.hash", &chain_hash(&h1, &e2));
}

/// Checkpoint 1 of the example again, as a version 2 record naming its client (a mutual TLS
/// client: `spki:` and the SHA-256 of its certificate's public key, here 0xab × 32).
#[test]
fn checkpoint_with_client_vector() {
    let mut c = checkpoint_1();
    c.client = Some(format!("spki:{}", "ab".repeat(32)));
    let e = c.encode();
    check("checkpoint-client-1.hex", &e);
    assert_eq!(e[4], 2);
    assert_eq!(Checkpoint::decode(&e).unwrap(), c);
    check("checkpoint-client-1.hash", &chain_hash(&[0; 32], &e));
    // The version 1 vector still decodes, with no client, and re-encodes to itself.
    let v1 = checkpoint_1().encode();
    let decoded = Checkpoint::decode(&v1).unwrap();
    assert_eq!(decoded.client, None);
    assert_eq!(decoded.encode(), v1);
}

#[test]
fn audit_vector() {
    let r = AuditRecord {
        seq: 1,
        prev_hash: [0; 32],
        time_ns: 1_700_000_000_000_000_000,
        event: AuditEvent::new("domain.destroyed", Severity::Info)
            .field("domain", 7)
            .field("tx_id", "11111111111111111111111111111111"),
    };
    let e = r.encode();
    check("audit-1.hex", &e);
    assert_eq!(AuditRecord::decode(&e).unwrap(), r);
    check("audit-1.hash", &chain_hash(&[0; 32], &e));
}

#[test]
fn signed_head_vector() {
    // Ed25519 seed 0x01 repeated: signatures are deterministic, so the head is too.
    let key = SigningKey::from_seed(&[0x01; 32]);
    check("head-key.pub", &key.public_key());
    let c1 = checkpoint_1();
    let h1 = chain_hash(&[0; 32], &c1.encode());
    let h2 = chain_hash(&h1, &checkpoint_2(h1).encode());
    let audit_text = std::fs::read_to_string(vector_path("audit-1.hash")).unwrap();
    let audit_hash: [u8; 32] = unhex(audit_text.trim()).unwrap().try_into().unwrap();
    let head = SignedHead::sign(
        &key,
        1,
        Tip { seq: 2, hash: h2 },
        Tip {
            seq: 1,
            hash: audit_hash,
        },
        1_700_000_001_000_500_000,
    );
    let e = head.encode();
    check("head-1.hex", &e);
    let d = SignedHead::decode(&e).unwrap();
    assert!(d.signature_valid());
    assert_eq!(d, head);
}

#[test]
fn rollback_vector() {
    use mayfly_ledger::RollbackRecord;
    let h1 = chain_hash(&[0; 32], &checkpoint_1().encode());
    let h2 = chain_hash(&h1, &checkpoint_2(h1).encode());
    let r = RollbackRecord {
        seq: 3,
        prev_hash: h2,
        rollback_id: TxId([0x44; 16]),
        reason: "ids alert".into(),
        policy_hash: [0x22; 32],
        time_ns: 1_700_000_002_000_000_000,
        roots: vec![1],
        affected: vec![1, 2],
        writes: vec![WriteEntry {
            key: b"acct/a".to_vec(),
            before_version: 1,
            before: Some(b"95".to_vec()),
            after: None,
        }],
    };
    let e = r.encode();
    check("rollback-3.hex", &e);
    assert_eq!(RollbackRecord::decode(&e).unwrap(), r);
    check("rollback-3.hash", &chain_hash(&h2, &e));
}

#[test]
fn rotation_head_vector() {
    // Group 2: the key of head-1 (seed 0x01) hands signing over to the key of seed 0x02.
    let old = SigningKey::from_seed(&[0x01; 32]);
    let new = SigningKey::from_seed(&[0x02; 32]);
    check("head-key-2.pub", &new.public_key());
    let c1 = checkpoint_1();
    let h1 = chain_hash(&[0; 32], &c1.encode());
    let h2 = chain_hash(&h1, &checkpoint_2(h1).encode());
    let audit_text = std::fs::read_to_string(vector_path("audit-1.hash")).unwrap();
    let audit_hash: [u8; 32] = unhex(audit_text.trim()).unwrap().try_into().unwrap();
    let head = SignedHead::sign_rotation(
        &old,
        2,
        Tip { seq: 2, hash: h2 },
        Tip {
            seq: 1,
            hash: audit_hash,
        },
        1_700_000_002_000_000_000,
        new.public_key(),
    );
    let e = head.encode();
    check("head-rotation-2.hex", &e);
    let d = SignedHead::decode(&e).unwrap();
    assert!(d.signature_valid());
    assert_eq!(d.next_key, Some(new.public_key()));
    assert_eq!(d, head);
}

/// The live-state digest of a `data` database of two entries: `acct/a` live at version 1
/// with value `100`, `acct/b` a tombstone at version 2 (formats.md §1.8).
fn state_2() -> mayfly_ledger::StateDigest {
    let mut d = mayfly_ledger::StateDigest::default();
    let mut a = vec![0x01];
    a.extend_from_slice(&1u64.to_be_bytes());
    a.extend_from_slice(b"100");
    let mut b = vec![0x02];
    b.extend_from_slice(&2u64.to_be_bytes());
    d.add(b"acct/a", &a);
    d.add(b"acct/b", &b);
    d
}

#[test]
fn state_digest_vector() {
    let d = state_2();
    let e = d.encode();
    check("state-2.hex", &e);
    assert_eq!(mayfly_ledger::StateDigest::decode(&e).unwrap(), d);
    check("state-2.hash", &d.hash());
    // The element of one entry, alone: the first 64 bytes of its XOF output.
    let el = mayfly_ledger::state::element(b"acct/a", b"\x01\0\0\0\0\0\0\0\x01100");
    let first: Vec<u8> = el.iter().take(32).flat_map(|l| l.to_le_bytes()).collect();
    check("state-element-acct-a.hex", &first);
}

#[test]
fn version_2_head_vector() {
    // Group 3 over fixed tips, committing to the state of state-2, signed by seed 0x01.
    let key = SigningKey::from_seed(&[0x01; 32]);
    let head = SignedHead::sign_v2(
        &key,
        3,
        Tip {
            seq: 3,
            hash: [0x33; 32],
        },
        Tip {
            seq: 1,
            hash: [0x11; 32],
        },
        1_700_000_003_000_000_000,
        state_2().hash(),
        None,
    );
    let e = head.encode();
    check("head-v2-3.hex", &e);
    let d = SignedHead::decode(&e).unwrap();
    assert!(d.signature_valid());
    assert_eq!(d, head);
    assert_eq!(d.state, Some(state_2().hash()));
}

#[test]
fn version_3_head_vector() {
    // head-v2-3 as version 3: the same fields, then epoch 2, signed by seed 0x01.
    let key = SigningKey::from_seed(&[0x01; 32]);
    let head = SignedHead::sign_v3(
        &key,
        3,
        Tip {
            seq: 3,
            hash: [0x33; 32],
        },
        Tip {
            seq: 1,
            hash: [0x11; 32],
        },
        1_700_000_003_000_000_000,
        state_2().hash(),
        2,
        None,
    );
    let e = head.encode();
    check("head-v3-3.hex", &e);
    let d = SignedHead::decode(&e).unwrap();
    assert!(d.signature_valid());
    assert_eq!(d, head);
    assert_eq!((d.version(), d.epoch()), (3, 2));
}

#[test]
fn promotion_head_vector() {
    // head-v3-3's tips and state as group 4, a promotion to epoch 3 from group 3 whose
    // head is vectors/head-v3-3.hex, command hash 0xc0 x 32, co-signers the admin keys of
    // seeds 0x11 and 0x12 (sorted), signed by the seed-0x02 key.
    let key = SigningKey::from_seed(&[0x02; 32]);
    let from = std::fs::read_to_string(vector_path("head-v3-3.hex")).unwrap();
    let from = unhex(from.trim()).unwrap();
    let mut cosigners = vec![
        SigningKey::from_seed(&[0x11; 32]).public_key(),
        SigningKey::from_seed(&[0x12; 32]).public_key(),
    ];
    cosigners.sort_unstable();
    let head = SignedHead::sign_promotion(
        &key,
        4,
        Tip {
            seq: 3,
            hash: [0x33; 32],
        },
        Tip {
            seq: 1,
            hash: [0x11; 32],
        },
        1_700_000_004_000_000_000,
        state_2().hash(),
        3,
        mayfly_ledger::head::Promotion {
            from_group: 3,
            from_head: mayfly_ledger::checkpoint::sha256(&from),
            command: [0xc0; 32],
            cosigners,
        },
    );
    let e = head.encode();
    check("head-promotion-4.hex", &e);
    let d = SignedHead::decode(&e).unwrap();
    assert!(d.signature_valid());
    assert_eq!(d, head);
}
