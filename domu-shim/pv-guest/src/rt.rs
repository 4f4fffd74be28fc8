//! What a freestanding link needs from us: the C memory functions (the prebuilt
//! `compiler_builtins` does not export them for this link), the unwinding symbols the
//! prebuilt `liballoc` names (never called: `panic = "abort"`), and the panic handler.
//!
//! The copies use `rep movsb`/`rep stosb`, so the compiler cannot turn them back into calls
//! to themselves; the comparisons read through volatile loads for the same reason.

use core::arch::asm;

use crate::hypercall;

/// `memcpy`.
///
/// # Safety
/// The C contract: `n` bytes valid at both, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; the direction flag is clear (cleared in `_start`, and
    // `memmove` restores it).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// `memmove`.
///
/// # Safety
/// The C contract: `n` bytes valid at both.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dst is below src or past its end.
        return unsafe { memcpy(dst, src, n) };
    }
    if n == 0 {
        return dst;
    }
    // SAFETY: a backward copy from the last byte (direction flag set and cleared again).
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
             inout("rsi") src.add(n - 1) => _, options(nostack));
    }
    dst
}

/// `memset`.
///
/// # Safety
/// The C contract: `n` bytes valid at `dst`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// `memcmp`.
///
/// # Safety
/// The C contract: `n` bytes valid at both.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller's contract; `i < n`.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// `bcmp`.
///
/// # Safety
/// The C contract: `n` bytes valid at both.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// Named by the prebuilt `liballoc`; with `panic = "abort"` nothing unwinds.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    hypercall::shutdown(hypercall::SHUTDOWN_CRASH)
}

/// Named by the prebuilt `core`; never called (`panic = "abort"`).
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crate::println!("mayfly-pv-guest: panic: {info}");
    crate::console::flush(500_000_000);
    hypercall::shutdown(hypercall::SHUTDOWN_CRASH)
}
