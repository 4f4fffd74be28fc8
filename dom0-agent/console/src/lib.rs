//! The admin console server: signed commands from operators, over a Unix socket (mode
//! 0600 in a directory only the agent's user can enter) and optionally TCP on loopback.
//!
//! ```text
//!  connection ─▶ frame (u32 length ≤ MAX_ENVELOPE, whole frame within io_timeout)
//!      │          ├─ "MFAH" ─────────────────▶ answer the identity key (not audited)
//!      │          └─ bad frame ───────────────────────────────▶ reject "malformed"
//!      ▼
//!  Envelope::decode (canonical, bounded) ────────────────────▶ reject "malformed"
//!      ▼
//!  commands::parse(command, args)  (unknown command → reject; bad args are answered
//!      │                            only after authorization, so a stranger learns nothing)
//!      ▼
//!  Authorizer::check: keys, signatures, validity window ± skew, quorum (destructive
//!      │              commands need `quorum` distinct admins) ─▶ reject with the rule
//!      ▼
//!  `appliance` argument == this ledger's identity key ────────▶ reject "wrong_appliance"
//!      ▼
//!  Ledger::record_admin_nonce + `admin.accepted` (one commit) ─▶ replay → reject
//!      ▼
//!  commands::execute ─▶ progress/records frames ─▶ result frame, `admin.completed`
//! ```
//!
//! Every rejection is an `admin.rejected` audit record with the reason code, the message,
//! the command, nonce and signers when known, and the peer (uid/pid of a Unix peer).
//! See `docs/console.md` for the operator's view and `docs/formats.md` §3 for the bytes.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod commands;
mod server;
pub mod status;

use std::sync::Arc;

use mayfly_executor::Executor;

pub use server::{ConsoleConfig, ConsoleError, ConsoleServer};

/// One SIEM collector's delivery state, as an exporter reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorStatus {
    /// Collector name from the configuration.
    pub name: String,
    /// `udp`, `tcp`, `tls`.
    pub transport: String,
    /// Last audit sequence the collector has acknowledged (its persisted cursor).
    pub delivered_seq: u64,
    /// The last delivery error, if the collector is currently failing.
    pub last_error: Option<String>,
}

/// The extension point through which the SIEM exporter reports per-collector lag in
/// `status` (lag = audit tip − `delivered_seq`). Without one, `status` says "no exporters
/// configured".
pub trait ExporterStatus: Send + Sync {
    /// Every configured collector.
    fn collectors(&self) -> Vec<CollectorStatus>;
}

/// Reports the replication state as JSON, when replication is configured.
pub type ReplicationStatus = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the console acts on.
#[derive(Clone)]
pub struct Services {
    /// The executor (and through it the ledger, the backend with its quarantined domains,
    /// and the policy).
    pub executor: Arc<Executor>,
    /// The SIEM exporter's status, once one is configured.
    pub exporters: Option<Arc<dyn ExporterStatus>>,
    /// The replication state (a primary with a standby, docs/failover.md): the same object
    /// as the `replication` section of `GET /v1/health`.
    pub replication: Option<ReplicationStatus>,
    /// Number of authorized admin keys (for `status`).
    pub admin_keys: usize,
    /// Distinct admins a destructive command needs (for `status`).
    pub quorum: usize,
}
