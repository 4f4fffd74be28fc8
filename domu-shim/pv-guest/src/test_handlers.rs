//! Hostile `test.*` handlers of the Mayfly PV guest, for the Xen-in-QEMU suite's checks that
//! the agent and Xen contain a misbehaving guest. Compiled only with the `test-handlers`
//! feature (the suite's image); **never in a production guest**.
//!
//! | name               | what the guest does |
//! |--------------------|---------------------|
//! | `test.spin`        | spins for ever: the agent's transaction timeout must destroy it |
//! | `test.evtchn_flood`| sends notifications on its ring's event channel until it is destroyed: the transaction ends as a doorbell flood and the agent keeps serving |
//! | `test.foreign_ops` | tries grant and event-channel operations naming dom0 and other domains (map grants it was not given, bind dom0's ports, allocate ports in other domains, set up another domain's grant table), over dom0, a few fixed ids and a sweep of domids 1..=1024 but its own; returns how many Xen allowed (all must be 0), what Xen answered (per operation: result code → count) and how many other live domains were named (`live_named`: ids whose port allocation Xen refused with EPERM, not ESRCH) |
//! | `test.bad_ring`    | writes an impossible `req_prod` into the ring and notifies: a protocol violation (500, audited, destroyed) |
//!
//! They are plain handlers (the SDK's signature) that reach the kernel's hypercall layer
//! directly, which no production handler can.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
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

/// Highest domid the sweep of `test.foreign_ops` names (the suite's guests have lower ones).
const SWEEP_MAX: u16 = 1024;
/// Xen's `-EPERM`: the domain exists, the operation is not ours to do.
const EPERM: i64 = -1;

/// What Xen answered to one kind of operation: result code → how many times.
#[derive(Default)]
struct Answers(BTreeMap<i64, u32>);

impl Answers {
    /// Counts `rc`; `true` if Xen allowed the operation (0).
    fn count(&mut self, rc: i64) -> bool {
        *self.0.entry(rc).or_insert(0) += 1;
        rc == 0
    }

    fn json(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", parts.join(","))
    }
}

fn foreign_ops(_: &mut Ctx<'_>, _: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let own = crate::ring::granted_refs();
    let me = crate::domid::own().ok_or_else(|| HandlerError::Rejected {
        reason: "cannot learn our own domid".into(),
    })?;
    let (mut map, mut bind, mut alloc, mut setup) = (
        Answers::default(),
        Answers::default(),
        Answers::default(),
        Answers::default(),
    );
    let (mut granted, mut bound, mut allocated, mut set_up) = (0u32, 0u32, 0u32, 0u32);
    let mut tried = 0u32;
    let mut live_named = 0u32;
    let mut try_dom = |dom: u16, grefs: u32, ports: u32| {
        for gref in 0..grefs {
            if dom == 0 && own.contains(&gref) {
                continue; // granted to us on purpose
            }
            tried += 1;
            if map.count(crate::ring::try_map_one(dom, gref, &raw mut SCRATCH as u64)) {
                granted += 1;
            }
        }
        for port in 1..=ports {
            if dom == 0 && port == crate::ring::backend_port() {
                continue; // ours to bind (already bound)
            }
            tried += 1;
            let rc = match crate::ring::EvtchnNotifier::bind(dom, port) {
                Ok(_) => 0,
                Err(crate::ring::RingSetupError::Bind { rc, .. }) => rc,
                Err(_) => i64::MIN,
            };
            if bind.count(rc) {
                bound += 1;
            }
        }
        tried += 2;
        let rc = crate::domid::alloc_unbound(dom, 0);
        if rc == EPERM && dom != 0 {
            live_named += 1;
        }
        if alloc.count(rc.min(0)) {
            allocated += 1;
        }
        if setup.count(setup_table(dom)) {
            set_up += 1;
        }
    };
    for dom in [0u16, 1, 2, 3, 0x7fff] {
        if dom != me {
            try_dom(dom, 16, 7);
        }
    }
    for dom in (4..=SWEEP_MAX).filter(|d| *d != me) {
        try_dom(dom, 1, 1);
    }
    Ok(format!(
        "{{\"tried\":{tried},\"granted\":{granted},\"bound\":{bound},\"allocated\":{allocated},\"setup\":{set_up},\"live_named\":{live_named},\"own_domid\":{me},\"map_rc\":{},\"bind_rc\":{},\"alloc_rc\":{},\"setup_rc\":{}}}",
        map.json(),
        bind.json(),
        alloc.json(),
        setup.json()
    )
    .into_bytes())
}

/// `GNTTABOP_setup_table` for domain `dom`: the hypercall's error, else the operation's
/// `GNTST_*` status (0: Xen did it).
fn setup_table(dom: u16) -> i64 {
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
    if rc != 0 {
        rc
    } else {
        i64::from(arg.status)
    }
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
