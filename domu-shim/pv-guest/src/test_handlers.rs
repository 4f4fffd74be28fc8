//! Hostile `test.*` handlers of the Mayfly PV guest, for the Xen-in-QEMU suite's checks that
//! the agent and Xen contain a misbehaving guest. Compiled only with the `test-handlers`
//! feature (the suite's image); **never in a production guest**.
//!
//! | name               | what the guest does |
//! |--------------------|---------------------|
//! | `test.spin`        | spins for ever: the agent's transaction timeout must destroy it |
//! | `test.evtchn_flood`| sends notifications on its ring's event channel until it is destroyed: the transaction ends as a doorbell flood and the agent keeps serving |
//! | `test.foreign_ops` | tries grant and event-channel operations naming dom0 and other domains (map grants it was not given, bind dom0's ports, allocate ports in other domains, set up another domain's grant table) and returns how many Xen allowed: all must be 0 |
//! | `test.bad_ring`    | writes an impossible `req_prod` into the ring and notifies: a protocol violation (500, audited, destroyed) |
//!
//! They are plain handlers (the SDK's signature) that reach the kernel's hypercall layer
//! directly, which no production handler can.

use alloc::format;
use alloc::vec::Vec;

use mayfly_ring::layout::offset;
use mayfly_sdk::{Ctx, HandlerError, Registry};

use crate::hypercall;

/// Adds the test handlers to `registry`.
pub fn register(registry: &mut Registry) {
    // Registered, so the guest's `Ready` announces them (domu_shim::PV_GUEST_TEST_HANDLERS).
    for name in domu_shim::PV_GUEST_TEST_HANDLERS {
        let handler: mayfly_sdk::Handler = match name {
            "test.spin" => spin,
            "test.evtchn_flood" => evtchn_flood,
            "test.foreign_ops" => foreign_ops,
            "test.bad_ring" => bad_ring,
            other => panic!("no test handler for {other}"),
        };
        if registry.register(name, handler).is_err() {
            panic!("test handler {name} cannot be registered");
        }
    }
}

fn spin(_: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    loop {
        core::hint::spin_loop();
    }
}

fn evtchn_flood(_: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    // Until destroyed: a flood that stops after a fixed count can be over before the agent
    // has woken often enough to call it one (its wake-ups coalesce while it is not
    // scheduled), and then the transaction commits; the outcome would hang on scheduling.
    let port = crate::ring::local_port();
    loop {
        hypercall::evtchn_send(port);
    }
}

/// A page whose mapping a foreign grant would replace (if Xen ever allowed one).
#[repr(C, align(4096))]
struct Scratch([u8; 4096]);
static mut SCRATCH: Scratch = Scratch([0; 4096]);

fn foreign_ops(_: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let own = crate::ring::granted_refs();
    let mut granted = 0u32;
    let mut bound = 0u32;
    let mut allocated = 0u32;
    let mut setup = 0u32;
    let mut tried = 0u32;
    for dom in [0u16, 1, 2, 3, 0x7fff] {
        for gref in 0u32..16 {
            if dom == 0 && own.contains(&gref) {
                continue; // granted to us on purpose
            }
            tried += 1;
            if crate::ring::try_map_one(dom, gref, &raw mut SCRATCH as u64) {
                granted += 1;
            }
        }
        for port in 1u32..8 {
            if dom == 0 && port == crate::ring::backend_port() {
                continue; // ours to bind (already bound)
            }
            tried += 1;
            if crate::ring::EvtchnNotifier::bind(dom, port).is_ok() {
                bound += 1;
            }
        }
        tried += 2;
        if alloc_unbound(dom, 0) == 0 {
            allocated += 1;
        }
        if setup_table(dom) {
            setup += 1;
        }
    }
    Ok(format!(
        "{{\"tried\":{tried},\"granted\":{granted},\"bound\":{bound},\"allocated\":{allocated},\"setup\":{setup}}}"
    )
    .into_bytes())
}

/// `EVTCHNOP_alloc_unbound` of a port in domain `dom` for `remote`.
fn alloc_unbound(dom: u16, remote: u16) -> i64 {
    #[repr(C)]
    struct AllocUnbound {
        dom: u16,
        remote_dom: u16,
        port: u32,
    }
    let mut arg = AllocUnbound {
        dom,
        remote_dom: remote,
        port: 0,
    };
    // SAFETY: `arg` lives on our stack for the call; Xen writes `port`.
    unsafe {
        hypercall::call3(
            hypercall::EVENT_CHANNEL_OP,
            6, // EVTCHNOP_alloc_unbound
            &raw mut arg as u64,
            0,
        )
    }
}

/// `GNTTABOP_setup_table` for domain `dom`; `true` if Xen did it.
fn setup_table(dom: u16) -> bool {
    #[repr(C)]
    struct SetupTable {
        dom: u16,
        nr_frames: u32,
        status: i16,
        frame_list: *mut u64,
    }
    let mut frames = [0u64; 1];
    let mut arg = SetupTable {
        dom,
        nr_frames: 1,
        status: 0,
        frame_list: frames.as_mut_ptr(),
    };
    // SAFETY: `arg` and the one-entry frame list live on our stack for the call.
    let rc = unsafe {
        hypercall::call3(
            20,
            2, /* GNTTABOP_setup_table */
            &raw mut arg as u64,
            1,
        )
    };
    rc == 0 && arg.status == 0
}

fn bad_ring(_: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let req_prod = crate::ring::window_base() + offset::REQ_PROD;
    // SAFETY: the ring window's first page is the agent's granted header page; this writes
    // the guest's own index word (a u32 at 0x40), as the protocol lets the guest do — with a
    // value the protocol forbids.
    unsafe { core::ptr::write_volatile(req_prod as *mut u32, 0xdead_0000) };
    hypercall::evtchn_send(crate::ring::local_port());
    // Wait to be destroyed (the agent must not wait for us).
    loop {
        hypercall::poll(crate::ring::local_port(), 0);
        crate::clock::clear_pending(crate::ring::local_port());
    }
}
