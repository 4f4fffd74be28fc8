//! The shared-info page (`public/xen.h`, x86_64): Xen's system time, the vCPU's event mask
//! and the event-channel pending bits.
//!
//! ```text
//!  shared_info:  vcpu_info[32] x 64 bytes, then evtchn_pending[64] u64 (offset 2048), ...
//!  vcpu_info 0:  +0 evtchn_upcall_pending u8, +1 evtchn_upcall_mask u8,
//!                +8 evtchn_pending_sel u64, +16 arch (16 bytes),
//!                +32 vcpu_time_info { +0 version u32, +8 tsc_timestamp u64,
//!                                     +16 system_time u64, +24 tsc_to_system_mul u32,
//!                                     +28 tsc_shift i8 }
//! ```
//!
//! [`init`] maps the page (its machine address is in `start_info`) over a page of our .bss
//! and masks event upcalls: this kernel registers no event callback, it only blocks in
//! `SCHEDOP_poll` and clears the pending bit itself afterwards.

use core::sync::atomic::{compiler_fence, AtomicU64, Ordering};

use crate::hypercall;

/// The page the shared-info frame is mapped over.
#[repr(C, align(4096))]
struct Page([u8; 4096]);
static mut SHARED_INFO: Page = Page([0; 4096]);

const TIME: usize = 32;
const UPCALL_MASK: usize = 1;
const EVTCHN_PENDING: usize = 2048;

fn base() -> usize {
    &raw const SHARED_INFO as usize
}

/// Why [`init`] failed.
#[derive(Debug)]
pub struct MapError(pub i64);

/// Maps the shared-info page and masks event upcalls.
pub fn init(shared_info_maddr: u64) -> Result<(), MapError> {
    // present | rw | accessed | dirty
    let pte = (shared_info_maddr & !0xfff) | 0x63;
    // SAFETY: nothing refers to SHARED_INFO's old contents; from now on it is only read and
    // written through volatile accesses at the offsets above.
    let rc = unsafe { hypercall::update_va_mapping(base() as u64, pte) };
    if rc != 0 {
        return Err(MapError(rc));
    }
    // SAFETY: byte 1 of vcpu_info[0], inside the mapped page.
    unsafe { core::ptr::write_volatile((base() + UPCALL_MASK) as *mut u8, 1) };
    Ok(())
}

fn rd<T: Copy>(off: usize) -> T {
    // SAFETY: `off` is inside the mapped shared-info page and aligned for T.
    unsafe { core::ptr::read_volatile((base() + off) as *const T) }
}

fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Xen's system time in nanoseconds (monotonic, since the host booted).
pub fn now_ns() -> u64 {
    loop {
        let version: u32 = rd(TIME);
        compiler_fence(Ordering::SeqCst);
        let tsc_timestamp: u64 = rd(TIME + 8);
        let system_time: u64 = rd(TIME + 16);
        let mul: u32 = rd(TIME + 24);
        let shift: i8 = rd(TIME + 28);
        let tsc = rdtsc();
        compiler_fence(Ordering::SeqCst);
        if version & 1 != 0 || rd::<u32>(TIME) != version {
            continue; // Xen is updating it
        }
        let mut delta = tsc.wrapping_sub(tsc_timestamp);
        if shift >= 0 {
            delta <<= shift;
        } else {
            delta >>= -shift;
        }
        let scaled = ((u128::from(delta) * u128::from(mul)) >> 32) as u64;
        return system_time.wrapping_add(scaled);
    }
}

/// Clears `port`'s pending bit (after a `SCHEDOP_poll` returned for it).
pub fn clear_pending(port: u32) {
    let word = (port / 64) as usize;
    if word >= 64 {
        return;
    }
    let at = base() + EVTCHN_PENDING + word * 8;
    // SAFETY: an aligned u64 inside the mapped page; Xen sets bits in it with locked
    // operations, so clearing ours is an atomic AND.
    let cell = unsafe { &*(at as *const AtomicU64) };
    cell.fetch_and(!(1u64 << (port % 64)), Ordering::SeqCst);
}
