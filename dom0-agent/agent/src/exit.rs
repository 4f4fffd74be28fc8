//! The exit codes of `dom0-agent`, in one table (docs/api.md and docs/failover.md list them
//! for operators). 0 is success and 2 a usage error (clap's).

/// Verification failed.
pub const VERIFY_FAILED: u8 = 1;
/// The data directory could not be opened or used.
pub const STORAGE: u8 = 3;
/// `serve` refused altered live data (issue 16).
pub const STATE_MISMATCH: u8 = 4;
/// The signing key's source refused to release it (issue 19).
pub const KEY_UNAVAILABLE: u8 = 5;
/// The standby stopped following for good (a fork, or its copy no longer matches its
/// chain): an operator must decide.
pub const REPLICATION_STOPPED: u8 = 6;
/// The primary refuses this standby (another ledger or epoch).
pub const REPLICATION_REFUSED: u8 = 7;
/// `promote` refused the command (signatures, quorum, appliance, epoch, a replay).
pub const PROMOTE_REFUSED: u8 = 8;
