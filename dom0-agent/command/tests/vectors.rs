//! Published vectors of the admin command format (`docs/formats.md` §3, `docs/vectors/`):
//! this build must produce exactly those bytes, decode them back, and agree on the body
//! hash and the signatures. `scripts/check-vectors.py` checks the same files with Python's
//! `cryptography` and `hashlib`, independently of this code.
//!
//! Regenerate (only when the format version changes): `MAYFLY_BLESS=1 cargo test -p
//! mayfly-command --test vectors`.

use std::path::PathBuf;

use mayfly_command::{hex, unhex, Authorizer, Body, Envelope};
use ring::signature::Ed25519KeyPair;

fn check(name: &str, bytes: &[u8]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/vectors")
        .join(name);
    if std::env::var_os("MAYFLY_BLESS").is_some() {
        std::fs::write(&path, format!("{}\n", hex(bytes))).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        hex(bytes),
        hex(&unhex(text.trim()).unwrap()),
        "{name} differs"
    );
}

fn admin(seed: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
}

const ISSUED: u64 = 1_700_000_000_000_000_000;

#[test]
fn status_signed_by_one_admin() {
    let body = Body {
        nonce: [0xa1; 16],
        issued_ns: ISSUED,
        expires_ns: ISSUED + 300_000_000_000,
        command: "status".into(),
        args: Default::default(),
    };
    check("command-status.body.hex", &body.encode().unwrap());
    let mut env = Envelope::new(body).unwrap();
    env.sign(&admin(0x11)).unwrap();
    check(
        "admin-key-11.pub",
        &mayfly_command::keyfile::public_of(&admin(0x11)),
    );
    let bytes = env.encode();
    check("command-status.hex", &bytes);
    check("command-status.body.sha256", &env.body_hash());
    assert_eq!(Envelope::decode(&bytes).unwrap(), env);
}

#[test]
fn rollback_cosigned_by_two_admins() {
    let body = Body {
        nonce: [0xb2; 16],
        issued_ns: ISSUED,
        expires_ns: ISSUED + 600_000_000_000,
        command: "rollback".into(),
        args: [("cascade", "true"), ("seq", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let mut env = Envelope::new(body).unwrap();
    env.sign(&admin(0x12)).unwrap();
    env.sign(&admin(0x11)).unwrap();
    check(
        "admin-key-12.pub",
        &mayfly_command::keyfile::public_of(&admin(0x12)),
    );
    let bytes = env.encode();
    check("command-rollback.hex", &bytes);
    check("command-rollback.body.sha256", &env.body_hash());
    let d = Envelope::decode(&bytes).unwrap();
    assert_eq!(d, env);
    let keys = [0x11, 0x12]
        .into_iter()
        .map(|s| {
            (
                mayfly_command::keyfile::public_of(&admin(s)),
                format!("admin-{s:x}"),
            )
        })
        .collect();
    let a = Authorizer::new(
        keys,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(3600),
    );
    assert_eq!(a.check(&d, ISSUED + 1, 2).unwrap().len(), 2);
}
