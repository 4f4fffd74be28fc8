//! The PV console: the `xencons_interface` ring page (`public/io/console.h`) the builder
//! gave us, read by dom0's console daemon (or the agent).
//!
//! ```text
//!     0  in[1024]      dom0 -> guest (unused)
//!  1024  out[2048]     guest -> dom0
//!  3072  in_cons  u32
//!  3076  in_prod  u32
//!  3080  out_cons u32  (dom0 advances it)
//!  3084  out_prod u32  (we advance it)
//! ```
//!
//! Output waits for room (bounded: a console nobody reads drops the rest of a message
//! rather than hang the guest) and notifies the console's event channel.

use core::sync::atomic::{fence, Ordering};

use crate::{clock, hypercall};

const OUT: usize = 1024;
const OUT_SIZE: u32 = 2048;
const OUT_CONS: usize = 3080;
const OUT_PROD: usize = 3084;

/// How long one write waits for the reader to make room.
const ROOM_WAIT_NS: u64 = 200_000_000;

/// Whether a full console waits for its reader (a console nobody reads — the agent's
/// own builds — must never slow the guest down: then a full ring drops output).
static mut WAIT_FOR_READER: bool = true;

/// Makes a full console drop output instead of waiting for the reader.
pub fn never_wait() {
    // SAFETY: single vCPU, no interrupt handlers.
    unsafe { WAIT_FOR_READER = false };
}

fn waits() -> bool {
    // SAFETY: as in `never_wait`.
    unsafe { WAIT_FOR_READER }
}

/// The console, once [`init`] found its page.
static mut CONSOLE: Option<(usize, u32)> = None;

/// Records the console page's virtual address and event channel.
pub fn init(page_va: usize, evtchn: u32) {
    // SAFETY: single vCPU, no interrupt handlers: nothing else runs while this writes.
    unsafe { CONSOLE = Some((page_va, evtchn)) };
}

fn console() -> Option<(usize, u32)> {
    // SAFETY: as in `init`; read after it.
    unsafe { CONSOLE }
}

fn load(page: usize, off: usize) -> u32 {
    // SAFETY: `page` is the console page mapped by the builder; `off` is one of the index
    // offsets inside it, 4-byte aligned.
    unsafe { core::ptr::read_volatile((page + off) as *const u32) }
}

/// Writes `bytes` to the console (dropped if there is none, or if the reader stays away).
pub fn write(bytes: &[u8]) {
    let Some((page, port)) = console() else {
        return;
    };
    let mut rest = bytes;
    while !rest.is_empty() {
        let cons = load(page, OUT_CONS);
        let prod = load(page, OUT_PROD);
        fence(Ordering::Acquire);
        let used = prod.wrapping_sub(cons);
        if used >= OUT_SIZE {
            // Full (or a reader's index we cannot trust): wait for room, bounded.
            hypercall::evtchn_send(port);
            if !waits() || !wait_for_reader(page, port, prod, ROOM_WAIT_NS) {
                return;
            }
            continue;
        }
        let room = (OUT_SIZE - used) as usize;
        let n = room.min(rest.len());
        for (i, &b) in rest[..n].iter().enumerate() {
            let at = (prod.wrapping_add(i as u32) % OUT_SIZE) as usize;
            // SAFETY: `at` < 2048, inside `out`.
            unsafe { core::ptr::write_volatile((page + OUT + at) as *mut u8, b) };
        }
        fence(Ordering::Release);
        // SAFETY: as in `load`.
        unsafe {
            core::ptr::write_volatile((page + OUT_PROD) as *mut u32, prod.wrapping_add(n as u32))
        };
        rest = &rest[n..];
    }
    hypercall::evtchn_send(port);
}

/// Waits until the reader has consumed everything written (so a guest that powers off
/// right after its last line does not take the line with it), at most `max_ns`.
pub fn flush(max_ns: u64) {
    if !waits() {
        return;
    }
    if let Some((page, port)) = console() {
        let prod = load(page, OUT_PROD);
        wait_for_reader(page, port, prod, max_ns);
    }
}

/// Blocks (SCHEDOP_poll on the console's event channel) until `out_cons` reaches `target`
/// or `max_ns` pass; `true` if it did.
fn wait_for_reader(page: usize, port: u32, target: u32, max_ns: u64) -> bool {
    let deadline = clock::now_ns().saturating_add(max_ns);
    loop {
        if target.wrapping_sub(load(page, OUT_CONS)) == 0 {
            return true;
        }
        let now = clock::now_ns();
        if now >= deadline {
            return false;
        }
        hypercall::poll(port, deadline.min(now + 10_000_000));
        clock::clear_pending(port);
    }
}

/// `core::fmt` output to the console.
pub struct Writer;

impl core::fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write(s.as_bytes());
        Ok(())
    }
}

/// Prints a formatted line on the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Writer, $($arg)*);
    }};
}
