//! Safe wrappers over Xen 4.17's toolstack libraries, for Mayfly's dom0 agent.
//!
//! ```text
//!  Libraries::load()          dlopen libxenctrl.so.4.17, libxengnttab.so.1, libxenevtchn.so.1
//!     │                        (mayfly-xen-sys; a host without them gets LoadError::Missing)
//!     ├─ Control::open()      xc_interface; refuses a hypervisor other than Xen 4.17;
//!     │                        domain info (state, shutdown reason), pause, unpause, destroy;
//!     │                        physinfo and Xen's command line (for hw-check);
//!     │                        the scheduler and a guest's credit weight/cap (sched)
//!     ├─ GrantedPages::share()  dom0 pages granted writable to one domU (xengntshr), the
//!     │                        ring's SharedMem; unshared on drop
//!     ├─ EventChannel::bind_unbound()  a dom0 port the domU binds; DomainNotifier wraps it
//!     │                        with a liveness check into the ring's Notifier (PeerGone)
//!     ├─ PvBuilder::new()     libxenguest's xc_dom_* builder with a Mayfly PV guest kernel
//!     │                        held in memory: fresh paused domains, boot info as the boot
//!     │                        module, no xl/libxl/xenstore; tagged in their domain handle
//!     ├─ clonecost            a measurement (xen-ring-peer clone-cost), not the agent's
//!     │                        path: a paused template's pages mapped and copied
//!     └─ Store::open()        xenstore (xenstore-rs): the ring contract keys, guest
//!                             read-only; domain names; cleanup after destroy
//! ```
//!
//! Every handle is RAII: dropping it closes, unbinds or unshares what it holds. `unsafe` is
//! allowed in this crate only (and the bindings crate); every block carries its `SAFETY`
//! argument. Everything read back from xenstore is treated as hostile: bounded, parsed,
//! validated.

#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod clonecost;
pub mod ctrl;
pub mod evtchn;
pub mod gntshr;
pub mod libs;
pub mod pvbuild;
pub mod sched;
pub mod xenstore;

pub use ctrl::{Control, CtrlError, DomainInfo, DomainState, PhysInfo, ShutdownReason};
pub use evtchn::{DomainNotifier, EventChannel, EvtchnError};
pub use gntshr::{GntshrError, GrantedPages};
pub use libs::{Libraries, LoadError};
pub use pvbuild::{BuildError, BuiltDomain, PvBuilder};
pub use sched::{CreditParams, SchedError, Scheduler};
pub use xenstore::{RingContract, Store, StoreError};

/// A Xen domain id.
pub type DomId = u32;

/// The first domain id that names no real domain (`DOMID_FIRST_RESERVED`).
pub const DOMID_FIRST_RESERVED: DomId = 0x7FF0;
