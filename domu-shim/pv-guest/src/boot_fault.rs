//! Boot faults for the Xen-in-QEMU suite (the `boot-faults` feature; **never in a
//! production guest**): a guest that never reaches its `Ready`, as a hostile or broken
//! image would, so the suite can show the agent destroying it within its deadline, auditing
//! it (`domain.build_failed`) and serving on.
//!
//! The fault is chosen by the guest's own domid (learned from Xen, [`crate::domid::own`]),
//! which the hypervisor hands out in sequence, so any eight consecutive builds show each
//! fault once and leave five good guests to serve transactions:
//!
//! | domid mod 8 | what the guest does before its `Ready` |
//! |-------------|-----------------------------------------|
//! | 1           | `hang`: blocks for ever in the hypervisor (`SCHEDOP_poll` on no port event) |
//! | 3           | `crash`: shuts itself down with `SHUTDOWN_crash` |
//! | 5           | `spin`: spins for ever on its vCPU (the credit cap bounds its CPU) |
//! | otherwise   | boots normally |

use crate::{hypercall, println};

/// The fault of a guest with domid `domid`, if any.
pub fn fault_of(domid: u16) -> Option<&'static str> {
    match domid % 8 {
        1 => Some("hang"),
        3 => Some("crash"),
        5 => Some("spin"),
        _ => None,
    }
}

/// Does this guest's fault, if it has one; returns only if it has none.
pub fn maybe_fault() {
    let Some(domid) = crate::domid::own() else {
        panic!("boot-faults: cannot learn our own domid");
    };
    let Some(fault) = fault_of(domid) else {
        return;
    };
    println!("mayfly-pv-guest: boot fault {fault} (domain {domid})");
    match fault {
        "crash" => hypercall::shutdown(hypercall::SHUTDOWN_CRASH),
        "spin" => loop {
            core::hint::spin_loop();
        },
        _ => loop {
            // Port 0 is never bound: only the timeout (none) could end the poll.
            hypercall::poll(0, 0);
        },
    }
}
