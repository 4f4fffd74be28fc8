//! What verifying a signed admin command costs, against a bare Ed25519 verification of
//! the same bytes measured in the same run.
//!
//! * `ed25519 verify (baseline)` — `ring` verifying one signature over a typical body;
//! * `decode envelope` — parse and check the canonical encoding (1 signature);
//! * `authorize, 1 signer` — decode + every rule of `Authorizer::check` (key lookup,
//!   signature, time window, quorum 1);
//! * `authorize, 2 signers` — the same with a two-admin quorum (two verifications).
//!
//! The nonce check and its audit record are a ledger commit (an fsync), measured by the
//! ledger's own benchmark, not here.
//!
//! Run: `cargo bench -p mayfly-command --bench verify` (`BENCH_REPS`, default 7; each rep
//! times `BENCH_ITERS`, default 2,000, iterations per case, interleaved; medians).
#![allow(missing_docs, clippy::cast_precision_loss)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use mayfly_command::{Authorizer, Body, Envelope};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

fn env_var(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let reps = env_var("BENCH_REPS", 7);
    let iters = env_var("BENCH_ITERS", 2000);
    let a = Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
    let b = Ed25519KeyPair::from_seed_unchecked(&[2; 32]).unwrap();
    let pk = |k: &Ed25519KeyPair| -> [u8; 32] { k.public_key().as_ref().try_into().unwrap() };
    let now = mayfly_command::now_ns();
    let body = Body {
        nonce: [9; 16],
        issued_ns: now,
        expires_ns: now + 300_000_000_000,
        command: "rollback".into(),
        args: [("cascade", "true"), ("replay", "true"), ("seq", "12345")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
    };
    let mut one = Envelope::new(body.clone()).unwrap();
    one.sign(&a).unwrap();
    let mut two = Envelope::new(body).unwrap();
    two.sign(&a).unwrap();
    two.sign(&b).unwrap();
    let one_bytes = one.encode();
    let two_bytes = two.encode();
    let body_bytes = one.body_bytes().to_vec();
    let sig = one.signatures()[0].signature;
    let pub_a = pk(&a);
    let auth = Authorizer::new(
        [(pk(&a), "a".to_string()), (pk(&b), "b".to_string())]
            .into_iter()
            .collect(),
        Duration::from_secs(60),
        Duration::from_secs(3600),
    );

    type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let cases: Vec<Case> = vec![
        (
            "ed25519 verify (baseline)",
            Box::new(|| {
                UnparsedPublicKey::new(&ED25519, black_box(&pub_a))
                    .verify(black_box(&body_bytes), black_box(&sig))
                    .unwrap();
            }),
        ),
        (
            "decode envelope",
            Box::new(|| {
                black_box(Envelope::decode(black_box(&one_bytes)).unwrap());
            }),
        ),
        (
            "authorize, 1 signer",
            Box::new(|| {
                let e = Envelope::decode(black_box(&one_bytes)).unwrap();
                black_box(auth.check(&e, now, 1).unwrap());
            }),
        ),
        (
            "authorize, 2 signers",
            Box::new(|| {
                let e = Envelope::decode(black_box(&two_bytes)).unwrap();
                black_box(auth.check(&e, now, 2).unwrap());
            }),
        ),
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..reps {
        for (i, (_, f)) in cases.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            samples[i].push(t.elapsed().as_nanos() as f64 / iters as f64);
        }
    }
    println!(
        "body {} bytes; {reps} reps x {iters} iterations, interleaved; medians",
        body_bytes.len()
    );
    println!("{:<28} {:>12} {:>10}", "case", "median", "÷ baseline");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = median(&mut samples[0].clone());
    for (i, (name, _)) in cases.iter().enumerate() {
        let m = median(&mut samples[i]);
        println!("{name:<28} {:>9.1} µs {:>9.2}×", m / 1000.0, m / base);
    }
}
