//! An accepted admin command end to end through the console's Unix socket, against what
//! it cannot avoid, measured in the same run on the same ledger directory:
//!
//! * `ledger audit commit (baseline)` — `Ledger::audit` of one event: one group commit,
//!   one fsync; the floor for anything that must be on record before it is answered;
//! * `status, 1 signer` — connect, send a signed `status`, verify (one Ed25519
//!   verification), record nonce + `admin.accepted` (one group commit), build the status,
//!   answer; the `admin.completed` record of a read-only command rides lazily with the
//!   next commit;
//! * `rollback dry run, 2 signers` — the same with two verifications and a rollback plan
//!   (still read-only: a dry run needs one admin but carries two signatures here).
//!
//! Run: `cargo bench -p mayfly-console --bench roundtrip` (`BENCH_REPS`, default 5; each
//! rep times `BENCH_ITERS`, default 200, of each case, interleaved; medians).
#![allow(missing_docs, clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_command::{frame, keyfile, Authorizer, Body, Envelope};
use mayfly_console::{ConsoleConfig, ConsoleServer, Services};
use mayfly_domain::{Domain, DomainBackend, DomainError, PoolStats};
use mayfly_executor::{Executor, ExecutorConfig};
use mayfly_ledger::{AuditEvent, Ledger, Options, Severity, TxContext, TxId};
use ring::signature::Ed25519KeyPair;
use slog::{o, Discard, Logger};

struct NoDomains;

impl DomainBackend for NoDomains {
    fn name(&self) -> &'static str {
        "none"
    }
    fn take(&self, _timeout: Duration) -> Result<Box<dyn Domain>, DomainError> {
        Err(DomainError::ShutDown { backend: "none" })
    }
    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }
    fn quarantined(&self) -> Vec<mayfly_domain::Quarantined> {
        Vec::new() // this double keeps no quarantined domains: it has no domains
    }
    fn release_quarantined(
        &self,
        _id: mayfly_domain::DomainId,
    ) -> Result<Option<mayfly_domain::DomainExit>, DomainError> {
        Ok(None)
    }
    fn shutdown(&self) {}
}

fn env_var(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn envelope(command: &str, args: &[(&str, &str)], keys: &[&Ed25519KeyPair]) -> Vec<u8> {
    let now = mayfly_command::now_ns();
    let mut e = Envelope::new(Body {
        nonce: mayfly_command::random_nonce().unwrap(),
        issued_ns: now,
        expires_ns: now + 300_000_000_000,
        command: command.into(),
        args: args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    })
    .unwrap();
    for k in keys {
        e.sign(k).unwrap();
    }
    e.encode()
}

fn round_trip(sock: &std::path::Path, request: &[u8]) {
    let mut s = UnixStream::connect(sock).unwrap();
    frame::write_request(&mut s, request).unwrap();
    loop {
        let f = frame::read_response(&mut s).unwrap();
        if f["type"] == "result" {
            assert_eq!(f["ok"], true, "{f}");
            return;
        }
    }
}

fn main() {
    let reps = env_var("BENCH_REPS", 5);
    let iters = env_var("BENCH_ITERS", 200);
    let log = Logger::root(Discard, o!());
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger"), &Options::default(), &log).unwrap();
    // Something to plan a rollback of.
    let mut tx = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "kv".into(),
            request: b"r".to_vec(),
            domain_id: 1,
            policy_hash: [0; 32],
        })
        .unwrap();
    tx.put(b"k", b"v").unwrap();
    tx.commit(Vec::new()).unwrap();
    let bundle = mayfly_policy::Bundle::load(&[(
        "allow.toml",
        "[engine]\nunlisted_handler = \"allow\"\ndomain_default = \"abort\"\n",
    )])
    .unwrap();
    let executor = Arc::new(Executor::new(
        ledger.clone(),
        Arc::new(NoDomains),
        Vec::new(),
        ExecutorConfig::default(),
        bundle,
        &log,
    ));
    let a = Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
    let b = Ed25519KeyPair::from_seed_unchecked(&[2; 32]).unwrap();
    let keys: BTreeMap<_, _> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, k)| (keyfile::public_of(k), format!("admin-{i}")))
        .collect();
    let server = ConsoleServer::start(
        ConsoleConfig {
            socket: dir.path().join("admin.sock"),
            tcp: None,
            authorizer: Authorizer::new(keys, Duration::from_secs(60), Duration::from_secs(3600)),
            quorum: 2,
            max_connections: 8,
            max_tcp_connections: 8,
            io_timeout: Duration::from_secs(30),
        },
        Services {
            executor,
            exporters: None,
            replication: None,
            admin_keys: 2,
            quorum: 2,
        },
        &log,
    )
    .unwrap();
    let sock = server.socket_path().to_path_buf();
    let appliance = mayfly_command::hex(&ledger.public_key());
    let appliance = appliance.as_str();

    type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let cases: Vec<Case> = vec![
        (
            "ledger audit commit (baseline)",
            Box::new(|| {
                ledger
                    .audit(vec![AuditEvent::new("bench.baseline", Severity::Info)])
                    .unwrap();
            }),
        ),
        (
            "status, 1 signer",
            Box::new(|| {
                round_trip(
                    &sock,
                    &envelope("status", &[("appliance", appliance)], &[&a]),
                )
            }),
        ),
        (
            "rollback dry run, 2 signers",
            Box::new(|| {
                round_trip(
                    &sock,
                    &envelope(
                        "rollback",
                        &[("appliance", appliance), ("id", "1"), ("dry_run", "true")],
                        &[&a, &b],
                    ),
                );
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
        "ledger in {}; {reps} reps x {iters} iterations, interleaved; medians",
        dir.path().display()
    );
    println!("{:<32} {:>12} {:>10}", "case", "median", "÷ baseline");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = median(&mut samples[0].clone());
    for (i, (name, _)) in cases.iter().enumerate() {
        let m = median(&mut samples[i]);
        println!("{name:<32} {:>9.1} µs {:>9.2}×", m / 1000.0, m / base);
    }
    server.shutdown(Duration::from_secs(5));
}
