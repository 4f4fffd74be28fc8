//! Size caps, enforced when a transaction is built and again when a record is decoded, and
//! the default snapshot hold.
//!
//! Vocabulary: a leaf module (it uses no other module of the crate).

/// Longest key.
pub const MAX_KEY: usize = 256;
/// Longest value.
pub const MAX_VALUE: usize = 64 << 10;
/// Longest handler name.
pub const MAX_HANDLER: usize = mayfly_names::MAX_HANDLER_NAME;
/// Longest request.
pub const MAX_REQUEST: usize = 64 << 10;
/// Longest result.
pub const MAX_RESULT: usize = 64 << 10;
/// Most keys in a read set (scanned keys included).
pub const MAX_READS: usize = 4096;
/// Most keys in a write set.
pub const MAX_WRITES: usize = 1024;
/// Largest scan limit.
pub const MAX_SCAN: usize = 1024;
/// Most scans per transaction.
pub const MAX_SCANS: usize = 64;
/// How long a transaction keeps its first read snapshot by default
/// ([`crate::Options::snapshot_hold`]); past it the snapshot is given up after each
/// operation so that LMDB can reuse pages beside a long transaction ([`crate::Tx`]).
pub const DEFAULT_SNAPSHOT_HOLD: std::time::Duration = std::time::Duration::from_millis(50);
/// Most read-set entries (keys read, keys scanned, one per scan) a transaction past its
/// snapshot hold may have re-checked in all: a guest that reads a large set and then keeps
/// operating while others commit would otherwise cost the agent the whole read set per
/// operation (4,096 lookups, up to the executor's operation limit). 16 re-checks of a full
/// read set; an honest transaction (about a millisecond) never re-checks.
pub const MAX_RECHECKED: usize = 16 * MAX_READS;
