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

use mayfly_domain::DomainBackend;
use mayfly_executor::Executor;
use mayfly_incident::Incidents;
use mayfly_ledger::{Hash, Ledger};

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

/// The policy in force, as the console sees it: its hash (`status`) and its reload
/// (`policy.load`). The executor holds it; the console needs nothing else of the executor.
pub trait PolicyControl: Send + Sync {
    /// Hash of the bundle in force.
    fn policy_hash(&self) -> Hash;
    /// Loads a bundle (refused with its reason if malformed; the active one stays).
    fn load_policy(&self, files: &[(String, String)]) -> Result<Hash, String>;
}

impl PolicyControl for Executor {
    fn policy_hash(&self) -> Hash {
        Executor::policy_hash(self)
    }

    fn load_policy(&self, files: &[(String, String)]) -> Result<Hash, String> {
        Executor::load_policy(self, files).map_err(|e| e.to_string())
    }
}

/// What the console acts on.
#[derive(Clone)]
pub struct Services {
    /// The ledger: chains, records, nonces, keys.
    pub ledger: Ledger,
    /// The backend (its pool and quarantined domains).
    pub backend: Arc<dyn DomainBackend>,
    /// The policy in force.
    pub policy: Arc<dyn PolicyControl>,
    /// Rollback and replay.
    pub incidents: Arc<Incidents>,
    /// The SIEM exporter's status, once one is configured.
    pub exporters: Option<Arc<dyn ExporterStatus>>,
    /// Number of authorized admin keys (for `status`).
    pub admin_keys: usize,
    /// Distinct admins a destructive command needs (for `status`).
    pub quorum: usize,
}

impl Services {
    /// The services of `executor` (its ledger, backend and policy) with `incidents`, no
    /// exporters, and the admin key count and quorum shown by `status`.
    pub fn new(
        executor: &Arc<Executor>,
        incidents: Arc<Incidents>,
        admin_keys: usize,
        quorum: usize,
    ) -> Self {
        Self {
            ledger: executor.ledger().clone(),
            backend: Arc::clone(executor.backend()),
            policy: Arc::clone(executor) as Arc<dyn PolicyControl>,
            incidents,
            exporters: None,
            admin_keys,
            quorum,
        }
    }
}
