//! The guest's own domain id, which no boot structure carries: learned from Xen through
//! an event channel allocated in our own domain (test builds only: the `test-handlers`
//! and `boot-faults` features).

use crate::hypercall;

/// `DOMID_SELF`.
pub const DOMID_SELF: u16 = 0x7ff0;

/// Our own domid: a port allocated in our own domain for ourselves (`DOMID_SELF` both
/// ways), whose `EVTCHNOP_status` names the remote end by number; the port is closed again.
pub fn own() -> Option<u16> {
    let port = u32::try_from(alloc_unbound(DOMID_SELF, DOMID_SELF)).ok()?;
    // struct evtchn_status: dom u16 @0, port u32 @4, status u32 @8, vcpu u32 @12, then the
    // union @16 whose `unbound.dom` is a u16 (8 bytes: interdomain {dom u16, port u32}).
    #[repr(C)]
    struct Status {
        dom: u16,
        port: u32,
        status: u32,
        vcpu: u32,
        remote_dom: u16,
        remote_port: u32,
    }
    let mut st = Status {
        dom: DOMID_SELF,
        port,
        status: 0,
        vcpu: 0,
        remote_dom: 0,
        remote_port: 0,
    };
    // SAFETY: `st` lives on our stack for the call; Xen writes its status fields.
    let rc = unsafe { hypercall::call3(hypercall::EVENT_CHANNEL_OP, 5, &raw mut st as u64, 0) };
    let mut close = port;
    // SAFETY: `close` (struct evtchn_close: port u32) lives on our stack for the call.
    unsafe { hypercall::call3(hypercall::EVENT_CHANNEL_OP, 3, &raw mut close as u64, 0) };
    // EVTCHNSTAT_unbound = 1.
    (rc == 0 && st.status == 1).then_some(st.remote_dom)
}

/// `EVTCHNOP_alloc_unbound` of a port in domain `dom` for `remote`: the port, or Xen's
/// error (negative).
pub fn alloc_unbound(dom: u16, remote: u16) -> i64 {
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
    let rc = unsafe {
        hypercall::call3(
            hypercall::EVENT_CHANNEL_OP,
            6, // EVTCHNOP_alloc_unbound
            &raw mut arg as u64,
            0,
        )
    };
    if rc == 0 {
        i64::from(arg.port)
    } else {
        rc
    }
}
