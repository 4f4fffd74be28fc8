//! Helpers shared by the ledger's integration tests (each test binary compiles this module
//! and uses part of it, hence `dead_code` is allowed here).
#![allow(dead_code)]

use mayfly_ledger::{TxContext, TxId};
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
