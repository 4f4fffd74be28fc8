//! Failover to a standby appliance (issue 18): the signed chain as the replication stream.
//!
//! The primary ships every durable group of its ledger (checkpoint records, audit records
//! and the signed head, read back with [`mayfly_ledger::Store::export_group`]) to one
//! standby as a [`frame::Frame::Group`]; the standby applies it with
//! [`mayfly_ledger::Replica::apply`], which checks every hash link, the signature, the
//! epoch and the live-state digest before the group becomes durable in its LMDB, and
//! acknowledges it. See `docs/failover.md` for the operator's view and
//! `docs/formats.md` §6 for the frames.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
pub mod copy;
pub mod fence;
pub mod frame;
pub mod heartbeat;
pub mod inbox;
pub mod journal;
pub mod primary;
pub mod standby;
pub mod tls;

pub use config::{ReplicationSection, Role};
pub use fence::Fenced;
pub use heartbeat::Heartbeat;
pub use primary::{PrimaryConfig, Shipper, StartError, Status, StatusHandle};
pub use standby::{follow, End, StandbyConfig};
pub use tls::{pin_of, PinnedTls, TlsError};

/// Whether the primary waits for the standby before acknowledging a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Commits are acknowledged when durable on the primary; the standby follows behind.
    Async,
    /// Commits are acknowledged when durable on the standby too (degrading to asynchronous
    /// after `sync_timeout`).
    Sync,
}

impl Mode {
    /// `async` or `sync`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Async => "async",
            Self::Sync => "sync",
        }
    }
}
