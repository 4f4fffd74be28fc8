//! Helpers shared by the ledger's integration tests (each test binary compiles this module
//! and uses part of it, hence `dead_code` is allowed here).
#![allow(dead_code)]

use std::path::Path;

use mayfly_ledger::{Ledger, Options, TxContext, TxId};
use slog::{o, Discard, Logger};

/// A logger that drops everything.
pub fn log() -> Logger {
    Logger::root(Discard, o!())
}

/// The context of a plain `kv` transaction with a fresh id.
pub fn ctx() -> TxContext {
    TxContext {
        tx_id: TxId::generate(),
        handler: "kv".into(),
        request: b"req".to_vec(),
        domain_id: 1,
        policy_hash: [7; 32],
    }
}

/// A ledger in `dir` with the default options.
pub fn open(dir: &Path) -> Ledger {
    Ledger::open(dir, &Options::default(), &log()).unwrap()
}

/// Commits `k = v` in one `kv` transaction; returns its checkpoint's sequence.
pub fn put(ledger: &Ledger, k: &str, v: &str) -> u64 {
    commit_put(ledger, k, v, false)
}

/// As [`put`], reading `k` first: the write then carries a before-version a standby checks.
pub fn read_then_put(ledger: &Ledger, k: &str, v: &str) -> u64 {
    commit_put(ledger, k, v, true)
}

fn commit_put(ledger: &Ledger, k: &str, v: &str, read_first: bool) -> u64 {
    let mut t = ledger
        .begin(TxContext {
            request: format!("put {k}").into_bytes(),
            policy_hash: [0; 32],
            ..ctx()
        })
        .unwrap();
    if read_first {
        let _ = t.get(k.as_bytes()).unwrap();
    }
    t.put(k.as_bytes(), v.as_bytes()).unwrap();
    t.commit(b"ok".to_vec()).unwrap().seq
}
