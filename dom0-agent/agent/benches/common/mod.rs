//! Helpers shared by the agent's benchmarks.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use mayfly_domain::DomainBackend;
use mayfly_ledger::Tx;
use mayfly_sandbox::{Sandbox, SandboxConfig};
use mayfly_sdk::{Db, DbError, LogLevel, Scan};
use slog::{o, Discard, Logger};

pub fn log() -> Logger {
    Logger::root(Discard, o!())
}

/// The SDK's `Db` straight over a ledger transaction (the in-process baseline).
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

/// The shipped default policy bundle: every ring operation is checked, as in production.
pub fn shipped_policy() -> mayfly_policy::Bundle {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/default");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    mayfly_policy::Bundle::load(&files).unwrap()
}

/// The sandbox backend with the agent binary as its zygote and a pool of 16.
pub 