//! Hypercalls through the page Xen filled (`hypercall_page`, see [`crate::boot`]): stub `n`
//! is at `hypercall_page + 32 * n`. PV x86_64 ABI: arguments in `%rdi %rsi %rdx %r10 %r8`,
//! result in `%rax`; the stub's `syscall` clobbers `%rcx` and `%r11`, and a debug Xen
//! poisons the argument registers, so all of them are declared clobbered.
//!
//! Every function here passes pointers to memory it owns for the duration of the call; the
//! hypervisor validates everything else (a bad argument is an error code, never a fault).

use core::arch::asm;

extern "C" {
    static hypercall_page: [u8; 4096];
}

/// `__HYPERVISOR_mmu_update`.
pub const MMU_UPDATE: usize = 1;
/// `DOMID_SELF`.
pub const DOMID_SELF: u64 = 0x7ff0;
/// `__HYPERVISOR_update_va_mapping`.
pub const UPDATE_VA_MAPPING: usize = 14;
/// `__HYPERVISOR_sched_op`.
pub const SCHED_OP: usize = 29;
/// `__HYPERVISOR_event_channel_op`.
pub const EVENT_CHANNEL_OP: usize = 32;

/// `SCHEDOP_yield`.
pub const SCHEDOP_YIELD: u64 = 0;
/// `SCHEDOP_shutdown`.
pub const SCHEDOP_SHUTDOWN: u64 = 2;
/// `SCHEDOP_poll`.
pub const SCHEDOP_POLL: u64 = 3;
/// `SHUTDOWN_poweroff`.
pub const SHUTDOWN_POWEROFF: u32 = 0;
/// `SHUTDOWN_crash`.
pub const SHUTDOWN_CRASH: u32 = 3;
/// `EVTCHNOP_send`.
pub const EVTCHNOP_SEND: u64 = 4;
/// `UVMF_INVLPG`: flush the one TLB entry.
pub const UVMF_INVLPG: u64 = 2;

fn stub(nr: usize) -> usize {
    // The page is 4096 bytes and every number used here is below 128, so the stub lies
    // inside it.
    (&raw const hypercall_page as usize) + nr * 32
}

/// A three-argument hypercall.
///
/// # Safety
/// Every pointer argument must be valid for the access the hypercall makes, for its whole
/// duration.
pub unsafe fn call3(nr: usize, a1: u64, a2: u64, a3: u64) -> i64 {
    // SAFETY: the caller's guarantee; the fourth argument register is unused by these calls.
    unsafe { call4(nr, a1, a2, a3, 0) }
}

/// A four-argument hypercall (the fourth in `%r10`).
///
/// # Safety
/// Every pointer argument must be valid for the access the hypercall makes, for its whole
/// duration.
pub unsafe fn call4(nr: usize, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    let ret: i64;
    // SAFETY: `stub(nr)` is inside the hypercall page Xen filled at build time; the stub
    // only traps into Xen and returns. The caller guarantees the arguments (see above).
    unsafe {
        asm!(
            "call {stub}",
            stub = in(reg) stub(nr),
            inlateout("rdi") a1 => _,
            inlateout("rsi") a2 => _,
            inlateout("rdx") a3 => _,
            inlateout("r10") a4 => _,
            lateout("r8") _,
            lateout("rax") ret,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}

/// `mmu_update` of one page-table entry of our own (`MMU_NORMAL_PT_UPDATE`): writes `val`
/// at machine address `ptr`, which Xen validates like any page-table write of a PV guest.
pub fn mmu_update(ptr: u64, val: u64) -> i64 {
    // struct mmu_update { uint64_t ptr; uint64_t val; }; the low bits of ptr (0) select
    // MMU_NORMAL_PT_UPDATE.
    let req = [ptr & !7, val];
    let mut done = 0u32;
    // SAFETY: `req` and `done` live on our stack for the call; Xen checks that `ptr` is an
    // entry of one of this domain's page tables and that `val` is a valid entry.
    unsafe {
        call4(
            MMU_UPDATE,
            req.as_ptr() as u64,
            1,
            &raw mut done as u64,
            DOMID_SELF,
        )
    }
}

/// `sched_op(SCHEDOP_shutdown, reason)`: powers off (or crashes) this domain. Does not return.
pub fn shutdown(reason: u32) -> ! {
    let arg = reason;
    loop {
        // SAFETY: `arg` (struct sched_shutdown { unsigned int reason; }) lives on our stack
        // for the call.
        unsafe {
            call3(SCHED_OP, SCHEDOP_SHUTDOWN, &raw const arg as u64, 0);
        }
    }
}

/// `sched_op(SCHEDOP_yield)`.
pub fn yield_now() {
    // SAFETY: no pointer argument.
    unsafe {
        call3(SCHED_OP, SCHEDOP_YIELD, 0, 0);
    }
}

/// `sched_op(SCHEDOP_poll)` on one port: blocks this vCPU until the port is pending or Xen's
/// system time reaches `timeout_ns` (0: no timeout). Returns Xen's result (0 or -errno).
pub fn poll(port: u32, timeout_ns: u64) -> i64 {
    // struct sched_poll { XEN_GUEST_HANDLE(evtchn_port_t) ports; unsigned int nr_ports;
    //                     uint64_t timeout; }  (x86_64: 8 + 4 (+4 pad) + 8 bytes)
    #[repr(C)]
    struct SchedPoll {
        ports: *const u32,
        nr_ports: u32,
        timeout: u64,
    }
    let ports = [port];
    let arg = SchedPoll {
        ports: ports.as_ptr(),
        nr_ports: 1,
        timeout: timeout_ns,
    };
    // SAFETY: `arg` and the port array it points to live on our stack for the call.
    unsafe { call3(SCHED_OP, SCHEDOP_POLL, &raw const arg as u64, 0) }
}

/// `event_channel_op(EVTCHNOP_send, port)`.
pub fn evtchn_send(port: u32) -> i64 {
    let arg = port; // struct evtchn_send { evtchn_port_t port; }
                    // SAFETY: `arg` lives on our stack for the call.
    unsafe { call3(EVENT_CHANNEL_OP, EVTCHNOP_SEND, &raw const arg as u64, 0) }
}

/// `update_va_mapping(va, pte, UVMF_INVLPG)`: points the page at `va` to `pte`.
///
/// # Safety
/// Nothing may hold a reference into the page at `va` across the call: its contents change.
pub unsafe fn update_va_mapping(va: u64, pte: u64) -> i64 {
    // SAFETY: no pointer is dereferenced by Xen; the caller vouches for `va`.
    unsafe { call3(UPDATE_VA_MAPPING, va, pte, UVMF_INVLPG) }
}
