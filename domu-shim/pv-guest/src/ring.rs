//! The guest's end of the ring transport: the agent's granted pages mapped into our address
//! space (a [`SharedMem`]) and the interdomain event channel (a [`Notifier`]), both straight
//! hypercalls — the same `mayfly-ring` code then runs on top of them as everywhere else.
//!
//! ```text
//!   boot info (docs/formats.md §2.6)       this module
//!   backend domid, grant refs ──────────▶  GNTTABOP_map_grant_ref (GNTMAP_host_map) of each
//!                                          ref onto window + 4096 * i (the 2 MiB of
//!                                          address space crate::memory set up: its own
//!                                          L1 table, no page behind it)
//!   backend's unbound port ─────────────▶  EVTCHNOP_bind_interdomain → our local port;
//!                                          notify = EVTCHNOP_send, wait = SCHEDOP_poll
//! ```

use alloc::vec::Vec;
use core::ptr::NonNull;
use core::time::Duration;

use mayfly_ring::bootinfo::{BootInfo, MAX_PAGES};
use mayfly_ring::mem::PAGE_SIZE;
use mayfly_ring::notify::{Notifier, NotifyError, Wake};
use mayfly_ring::SharedMem;

use crate::{clock, hypercall};

/// `__HYPERVISOR_grant_table_op`.
const GRANT_TABLE_OP: usize = 20;
/// `GNTTABOP_map_grant_ref`.
const GNTTABOP_MAP_GRANT_REF: u64 = 0;
/// `GNTMAP_host_map`.
const GNTMAP_HOST_MAP: u32 = 1 << 1;
/// `EVTCHNOP_bind_interdomain`.
const EVTCHNOP_BIND_INTERDOMAIN: u64 = 0;

/// Pages of address space the ring window needs: the most a boot info may name.
pub const WINDOW_PAGES: usize = MAX_PAGES;

/// The ring window's address (set once by [`map`]; 0 before).
static mut WINDOW: usize = 0;

/// What the test handlers need to know of the ring (set once by [`map`] and
/// [`EvtchnNotifier::bind`] of the ring's port; single vCPU, so plain statics).
static mut LOCAL_PORT: u32 = 0;
static mut BACKEND_PORT: u32 = 0;
static mut GRANTED: [u32; MAX_PAGES] = [0; MAX_PAGES];
static mut GRANTED_COUNT: usize = 0;

/// The ring's local event-channel port (0 before it is bound).
pub fn local_port() -> u32 {
    // SAFETY: single vCPU, no interrupt handlers: nothing writes it concurrently.
    unsafe { LOCAL_PORT }
}

/// The backend's port the ring was bound to.
pub fn backend_port() -> u32 {
    // SAFETY: as in `local_port`.
    unsafe { BACKEND_PORT }
}

/// The grant references of the ring's pages.
pub fn granted_refs() -> Vec<u32> {
    // SAFETY: as in `local_port`; the array is copied out by value, no reference is made.
    let (all, n) = unsafe { ((&raw const GRANTED).read(), GRANTED_COUNT) };
    all.iter().take(n).copied().collect()
}

/// The ring window's virtual address (0 before [`map`]).
pub fn window_base() -> usize {
    // SAFETY: as in `local_port`.
    unsafe { WINDOW }
}

/// Records the ring's ports (after binding it).
pub fn set_ports(local: u32, backend: u32) {
    // SAFETY: as in `local_port`.
    unsafe {
        LOCAL_PORT = local;
        BACKEND_PORT = backend;
    }
}

/// Tries to map grant `gref` of domain `dom` at `va` (one page): Xen's answer, the
/// hypercall's error if it failed, else the operation's `GNTST_*` status (0: mapped).
pub fn try_map_one(dom: u16, gref: u32, va: u64) -> i64 {
    #[repr(C)]
    struct MapOp {
        host_addr: u64,
        flags: u32,
        gref: u32,
        dom: u16,
        status: i16,
        handle: u32,
        dev_bus_addr: u64,
    }
    let mut op = MapOp {
        host_addr: va,
        flags: GNTMAP_HOST_MAP,
        gref,
        dom,
        status: 0,
        handle: 0,
        dev_bus_addr: 0,
    };
    // SAFETY: one map operation on our stack; `va` is a page of ours nothing references.
    let rc = unsafe {
        hypercall::call3(
            GRANT_TABLE_OP,
            GNTTABOP_MAP_GRANT_REF,
            &raw mut op as u64,
            1,
        )
    };
    if rc != 0 {
        rc
    } else {
        i64::from(op.status)
    }
}

/// Mapping the ring failed.
#[derive(Debug)]
pub enum RingSetupError {
    /// No ring window was set up.
    NoWindow,
    /// The grant-table hypercall itself failed.
    MapHypercall(i64),
    /// Xen refused to map grant `gref` (page `page`): its `GNTST_*` status.
    MapStatus {
        /// Page index.
        page: usize,
        /// The grant reference.
        gref: u32,
        /// Xen's status.
        status: i16,
    },
    /// Binding the backend's port failed.
    Bind {
        /// The backend's port.
        remote_port: u32,
        /// Xen's return code.
        rc: i64,
    },
}

impl core::fmt::Display for RingSetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoWindow => write!(f, "no ring window"),
            Self::MapHypercall(rc) => write!(f, "GNTTABOP_map_grant_ref failed: {rc}"),
            Self::MapStatus { page, gref, status } => {
                write!(
                    f,
                    "grant {gref} (ring page {page}) refused: status {status}"
                )
            }
            Self::Bind { remote_port, rc } => {
                write!(
                    f,
                    "EVTCHNOP_bind_interdomain of port {remote_port} failed: {rc}"
                )
            }
        }
    }
}

/// The agent's granted pages, mapped contiguously.
#[derive(Debug)]
pub struct GrantMem {
    /// The window's address (non-zero, checked by [`map`]).
    base: usize,
    len: usize,
}

// SAFETY: `base()` is the window's fixed, page-aligned address and `len()` never changes;
// the grant mappings stay in place until the domain is destroyed (this kernel never unmaps
// them), and nothing in the kernel forms a reference into the window (it is only reached
// through this trait's volatile, bounds-checked accessors).
unsafe impl SharedMem for GrantMem {
    fn base(&self) -> NonNull<u8> {
        NonNull::new(self.base as *mut u8).unwrap_or(NonNull::dangling())
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// Maps every ring page of `info` (one batched hypercall) onto the ring window at `window`
/// ([`crate::memory::Layout::window`]: [`WINDOW_PAGES`] pages of address space whose L1
/// table exists and maps nothing).
pub fn map(info: &BootInfo, window: usize) -> Result<GrantMem, RingSetupError> {
    if window == 0 {
        return Err(RingSetupError::NoWindow);
    }
    // struct gnttab_map_grant_ref (x86_64, 32 bytes): host_addr u64 @0, flags u32 @8,
    // ref u32 @12, dom u16 @16, status i16 @18, handle u32 @20, dev_bus_addr u64 @24.
    #[repr(C)]
    struct MapOp {
        host_addr: u64,
        flags: u32,
        gref: u32,
        dom: u16,
        status: i16,
        handle: u32,
        dev_bus_addr: u64,
    }
    let window = window as u64;
    let mut ops: Vec<MapOp> = info
        .grant_refs
        .iter()
        .take(MAX_PAGES)
        .enumerate()
        .map(|(i, &gref)| MapOp {
            host_addr: window + (i * PAGE_SIZE) as u64,
            flags: GNTMAP_HOST_MAP,
            gref,
            dom: info.backend_domid,
            status: 0,
            handle: 0,
            dev_bus_addr: 0,
        })
        .collect();
    // SAFETY: `ops` is a live array of `ops.len()` map operations that Xen reads and writes
    // for the call; every host_addr is a page of the window, which nothing references.
    let rc = unsafe {
        hypercall::call3(
            GRANT_TABLE_OP,
            GNTTABOP_MAP_GRANT_REF,
            ops.as_mut_ptr() as u64,
            ops.len() as u64,
        )
    };
    if rc != 0 {
        return Err(RingSetupError::MapHypercall(rc));
    }
    for (page, op) in ops.iter().enumerate() {
        if op.status != 0 {
            return Err(RingSetupError::MapStatus {
                page,
                gref: op.gref,
                status: op.status,
            });
        }
    }
    let mut refs = [0u32; MAX_PAGES];
    for (slot, r) in refs.iter_mut().zip(&info.grant_refs) {
        *slot = *r;
    }
    // SAFETY: single vCPU, no interrupt handlers: nothing reads them concurrently; written
    // by value through raw pointers, no reference is made.
    unsafe {
        (&raw mut GRANTED).write(refs);
        GRANTED_COUNT = info.grant_refs.len().min(MAX_PAGES);
        WINDOW = window as usize;
    }
    Ok(GrantMem {
        base: window as usize,
        len: ops.len() * PAGE_SIZE,
    })
}

/// Our end of the interdomain event channel.
#[derive(Debug)]
pub struct EvtchnNotifier {
    port: u32,
}

impl EvtchnNotifier {
    /// Binds the backend's unbound port (`EVTCHNOP_bind_interdomain`).
    pub fn bind(remote_dom: u16, remote_port: u32) -> Result<Self, RingSetupError> {
        // struct evtchn_bind_interdomain: remote_dom u16 @0, remote_port u32 @4,
        // local_port u32 @8 (out).
        #[repr(C)]
        struct Bind {
            remote_dom: u16,
            remote_port: u32,
            local_port: u32,
        }
        let mut arg = Bind {
            remote_dom,
            remote_port,
            local_port: 0,
        };
        // SAFETY: `arg` lives on our stack for the call; Xen writes `local_port`.
        let rc = unsafe {
            hypercall::call3(
                hypercall::EVENT_CHANNEL_OP,
                EVTCHNOP_BIND_INTERDOMAIN,
                &raw mut arg as u64,
                0,
            )
        };
        if rc != 0 {
            return Err(RingSetupError::Bind { remote_port, rc });
        }
        Ok(Self {
            port: arg.local_port,
        })
    }

    /// Our local port.
    pub fn port(&self) -> u32 {
        self.port
    }
}

impl Notifier for EvtchnNotifier {
    fn notify(&self) -> Result<(), NotifyError> {
        match hypercall::evtchn_send(self.port) {
            0 => Ok(()),
            rc => Err(NotifyError::Hypercall {
                op: "EVTCHNOP_send",
                rc,
            }),
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, NotifyError> {
        let start = clock::now_ns();
        // 0 is "no timeout" for SCHEDOP_poll; a deadline that overflows is as good as none.
        let deadline = match timeout {
            None => 0,
            Some(t) => u64::try_from(t.as_nanos())
                .ok()
                .and_then(|ns| start.checked_add(ns))
                .unwrap_or(0)
                .max(1),
        };
        let rc = hypercall::poll(self.port, deadline);
        // Clear before the caller re-checks the ring: an event after this sets it again
        // and the next poll returns at once, so none is lost.
        clock::clear_pending(self.port);
        if rc < 0 {
            return Err(NotifyError::Hypercall {
                op: "SCHEDOP_poll",
                rc,
            });
        }
        if deadline != 0 && clock::now_ns() >= deadline {
            return Ok(Wake::TimedOut);
        }
        Ok(Wake::Notified)
    }
}
