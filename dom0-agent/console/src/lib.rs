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
mod services;
pub mod status;

pub use server::{ConsoleConfig, ConsoleError, ConsoleServer};
pub use services::{
    Attestor, BreakGlass, CollectorStatus, ExporterStatus, PolicyControl, ReplicationStatus,
    Services, UpdateFailure, UpdateRequest, Updater,
};
