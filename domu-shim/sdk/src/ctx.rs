//! [`Ctx`]: what a handler receives besides its payload.

use crate::db::{Db, DbError, LogLevel};
use crate::rng::HandlerRng;

/// A handler's view of its transaction: the database, the transaction id and an RNG seeded
/// for this transaction only.
pub struct Ctx<'a> {
    db: &'a mut dyn Db,
    tx_id: [u8; 16],
    rng: HandlerRng,
}

impl<'a> Ctx<'a> {
    /// A context over `db` for transaction `tx_id`, with the RNG seeded from
    /// `entropy_seed` (see [`HandlerRng`]).
    pub fn new(db: &'a mut dyn Db, tx_id: [u8; 16], entropy_seed: [u8; 32]) -> Self {
        Self {
            db,
            tx_id,
            rng: HandlerRng::from_seed(entropy_seed),
        }
    }

    /// The database.
    pub fn db(&mut self) -> &mut dyn Db {
        &mut *self.db
    }

    /// The transaction id the agent assigned.
    pub fn tx_id(&self) -> &[u8; 16] {
        &self.tx_id
    }

    /// The transaction's RNG: deterministic given the entropy seed, fresh per transaction.
    pub fn rng(&mut self) -> &mut HandlerRng {
        &mut self.rng
    }

    /// Sends a log line to the agent (shorthand for `ctx.db().log(level, line)`).
    pub fn log(&mut self, level: LogLevel, line: &str) -> Result<(), DbError> {
        self.db.log(level, line)
    }
}

impl core::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ctx")
            .field("tx_id", &self.tx_id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memdb::MemDb;

    #[test]
    fn ctx_forwards_to_its_db_and_seeds_its_rng() {
        let mut db = MemDb::new();
        {
            let mut ctx = Ctx::new(&mut db, [4; 16], [8; 32]);
            assert_eq!(ctx.tx_id(), &[4; 16]);
            ctx.db().put(b"k", b"v").unwrap();
            ctx.log(LogLevel::Info, "hello").unwrap();
            let drawn = ctx.rng().next_u64();
            assert_eq!(drawn, HandlerRng::from_seed([8; 32]).next_u64());
            assert!(format!("{ctx:?}").contains("tx_id"));
        }
        assert_eq!(db.value(b"k"), Some(&b"v"[..]));
        assert_eq!(db.logs(), &[(LogLevel::Info, "hello".to_string())]);
    }
}
