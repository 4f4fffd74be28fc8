//! Mayfly's Xen domain backend: the product's isolation. Each transaction runs in a fresh
//! PV domU built from the template (kernel + initramfs whose `/init` is domu-shim).
//!
//! ```text
//!  dom0: dom0-agent                                   domU mayfly-<n> (one transaction)
//!  XenBackend ── refill threads ── xl create -p -e ──▶ built, paused
//!     │  grant ring pages (gntalloc), unbound port,      │
//!     │  xenstore data/mayfly/* (guest read-only)        │
//!     │  credit weight/cap set (guest_weight, _cap_percent)
//!     │  xc_domain_unpause ─────────────────────────────▶ boots; shim maps the ring,
//!     │  ◀═══════ ring: Ready {v2, handlers} ════════════ binds the port, sends Ready
//!     │  first guest: its handler list recorded (handlers());
//!     │  later guests: same list, or destroyed + reported (a protocol violation)
//!     │  xc_domain_pause → pool
//!     │  take(): xc_domain_unpause → XenDomain ══ Start / requests / Commit ══▶
//!     │  destroy()/Drop: xc_domain_destroy, unshare, unbind, xenstore rm
//! ```
//!
//! Only **building** goes through `xl` (a child process, `xl create -p -e`); pause,
//! unpause, destroy, domain state, grants, event channels and xenstore are in-process
//! (`mayfly-xen`). See `docs/decisions/0003-xen-ffi-loaded-at-run-time.md`.
//!
//! By module: [`config`] (settings, the `[xen]` TOML table, the xl configuration),
//! [`pool`] (the generic pool, tested with a fake provisioner), `build` (building a
//! domain), [`domain`] (a built domain, its exits and destruction), [`phases`] (where a
//! domain's time goes), [`backend`] ([`XenBackend`], [`XenDomain`]), [`reconcile`]
//! (leftovers of a previous run).

#![forbid(unsafe_code)]

pub mod backend;
mod build;
pub mod config;
pub mod domain;
pub mod phases;
pub mod pool;
pub mod reconcile;

pub use backend::{StartError, XenBackend, XenDomain, BACKEND};
pub use config::{ConfigError, GuestKind, XenConfig, XenSection};
pub use domain::{exit_of, BuildFailure, BuildFailureSink, CreateError, DomainOpError, LiveDomain};
pub use phases::{Phase, PhaseTotal};
pub use reconcile::{ReconcileError, ReconcileReport};
