//! What the console acts on ([`Services`]) and the providers plugged into it: the policy in
//! force ([`PolicyControl`]) and the SIEM exporters' status ([`ExporterStatus`]).

use std::sync::Arc;

use mayfly_domain::DomainBackend;
use mayfly_executor::Executor;
use mayfly_incident::Incidents;
use mayfly_ledger::{Hash, Ledger};

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
    /// The replication state (a primary with a standby, docs/failover.md): the same object
    /// as the `replication` section of `GET /v1/health`.
    pub replication: Option<ReplicationStatus>,
    /// Number of authorized admin keys (for `status`).
    pub admin_keys: usize,
    /// Distinct admins a destructive command needs (for `status`).
    pub quorum: usize,
    /// The TPM for `attest` (None: `attest` answers that no TPM is configured).
    pub attestor: Option<Arc<dyn Attestor>>,
    /// The A/B update for `update.install` and `update.status` (None: they answer that
    /// updates are not configured).
    pub updater: Option<Arc<dyn Updater>>,
    /// The serial console's break-glass login for `breakglass.open` (None: not configured).
    pub breakglass: Option<Arc<dyn BreakGlass>>,
}

/// The serial console's break-glass login behind `breakglass.open` (the agent provides one
/// with `[breakglass] tty`): one root login on the console, by a one-time token the admins
/// chose, within a time window; nothing else ever listens on the console.
pub trait BreakGlass: Send + Sync {
    /// Opens the window: `minutes` long, for the token whose SHA-256 is `token_sha256`;
    /// `nonce` ties the later audit records (login, close) to the command. Refused while a
    /// window is open. The result, as JSON: `tty`, `minutes`.
    fn open(
        &self,
        minutes: u32,
        token_sha256: [u8; 32],
        nonce: &str,
    ) -> Result<serde_json::Value, String>;
}

/// An `update.install` the admins signed: which bundle, the digest they approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRequest {
    /// The bundle's file name on the update medium.
    pub bundle: String,
    /// SHA-256 of the whole bundle file, as the admins computed it.
    pub sha256: [u8; 32],
    /// Trial boots before GRUB falls back (1..=3).
    pub tries: u8,
}

/// Why an install did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateFailure {
    /// A stable short name: the refusal (`bad_signature`, `tampered`, `downgrade`,
    /// `too_large`, `not_approved`, ...) or `failed` for an error that is not a refusal.
    pub code: &'static str,
    /// Whether the bundle was refused before anything was written (otherwise the install
    /// failed on the way and the inactive slot may be partly written, never armed).
    pub refused: bool,
    /// What happened, for the operator.
    pub message: String,
}

/// The A/B updater behind `update.install` and `update.status` (the agent provides one
/// built on `mayfly-update`).
pub trait Updater: Send + Sync {
    /// Verifies the bundle and writes it to the inactive slot, arming its trial boots.
    /// The result, as JSON: `slot`, `version`, `tries`, `bundle_bytes`.
    fn install(&self, req: &UpdateRequest) -> Result<serde_json::Value, UpdateFailure>;
    /// The booted, committed and trial slots, trial boots left, image version, floor.
    fn status(&self) -> Result<serde_json::Value, UpdateFailure>;
}

/// Reports the replication state as JSON, when replication is configured.
pub type ReplicationStatus = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The TPM behind `attest` (the agent provides one with the TPM key source).
pub trait Attestor: Send + Sync {
    /// A quote over the configured PCRs with `qualifying` as its extra data, as JSON:
    /// `ak` (65-byte SEC1 point, hex), `attest` (TPMS_ATTEST, hex), `signature` (r || s,
    /// hex), `pcrs` (`[{"pcr": n, "sha256": hex}]`, read just before the quote).
    fn quote(
        &self,
        qualifying: &[u8; 32],
    ) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>>;
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
            replication: None,
            admin_keys,
            quorum,
            attestor: None,
            updater: None,
            breakglass: None,
        }
    }
}
