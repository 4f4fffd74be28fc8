//! Helpers shared by the agent's benchmarks (included with `mod common;`).
#![allow(dead_code)]

use mayfly_ledger::{Ledger, Tx, TxContext, TxId};
use mayfly_sdk::{Db, DbError, LogLevel, Scan};
use slog::{o, Discard, Logger};

/// A logger that drops everything.
pub fn log() -> Logger {
    Logger::root(Discard, o!())
}

/// The SDK's `Db` straight over a ledger transaction: a handler run in-process, with no
/// domain, no ring and no policy.
pub struct LedgerDb<'a>(pub &'a mut Tx);

fn db_err(e: mayfly_ledger::TxError) -> DbError {
    DbError::Internal {
        message: e.to_string(),
    }
}

impl Db for LedgerDb<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.0.get(key).map_err(db_err)
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        self.0.put(key, value).map_err(db_err)
    }
    fn delete(&mut self, key: &[u8]) -> Result<(), DbError> {
        self.0.delete(key).map_err(db_err)
    }
    fn scan(&mut self, start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<Scan, DbError> {
        let s = self.0.scan(start, end, limit as usize).map_err(db_err)?;
        Ok(Scan {
            entries: s.entries,
            more: s.more,
        })
    }
    fn log(&mut self, _level: LogLevel, _line: &str) -> Result<(), DbError> {
        Ok(())
    }
}

/// Accounts the transfer benchmarks seed and move money between.
pub const ACCOUNTS: u32 = 1000;

/// A transfer of 1 between two different random seeded accounts.
pub fn payload(rng: &mut fastrand::Rng) -> Vec<u8> {
    let from = rng.u32(..ACCOUNTS);
    let to = (from + rng.u32(1..ACCOUNTS)) % ACCOUNTS;
    format!("{{\"from\":\"a{from}\",\"to\":\"a{to}\",\"amount\":1}}").into_bytes()
}

/// Opens [`ACCOUNTS`] accounts with a large balance, in one transaction.
pub fn seed(ledger: &Ledger) {
    let mut tx = ledger
        .begin(TxContext {
            tx_id: TxId::generate(),
            handler: "seed".into(),
            request: Vec::new(),
            domain_id: 0,
            policy_hash: [0; 32],
        })
        .unwrap();
    for i in 0..ACCOUNTS {
        tx.put(format!("acct/a{i}").as_bytes(), b"1000000000")
            .unwrap();
    }
    tx.commit(Vec::new()).unwrap();
}
