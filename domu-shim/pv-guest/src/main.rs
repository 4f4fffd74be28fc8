//! `mayfly-pv-guest`: Mayfly's own Xen PV guest kernel.
//!
//! A freestanding x86_64 PV kernel — no Linux, no libc, only the pinned toolchain's prebuilt
//! `core` and `alloc` — that carries the same SDK and handlers (`mayfly-sdk`,
//! `mayfly-handlers`, built `no_std`) and the same ring code (`mayfly-ring`, `no_std`) as the
//! sandbox and the Linux PV guest.
//!
//! Modules:
//! - [`boot`]: `_start`, the kernel stack, the hypercall page and the Xen ELF notes;
//! - [`hypercall`]: hypercalls through that page (sched_op, event_channel_op,
//!   update_va_mapping);
//! - [`start_info`]: the copy of what the builder handed us;
//! - [`clock`]: the shared-info page: Xen system time, event mask, pending bits;
//! - [`console`]: output on the PV console ring;
//! - [`memory`]: the free pages after the boot elements (the heap) and the ring window;
//! - [`heap`]: the heap behind `alloc`;
//! - [`ring`]: the granted ring pages and the interdomain event channel, as the
//!   `mayfly-ring` traits;
//! - `domid` (test builds): the guest's own domid, learned from Xen;
//! - `boot_fault` (feature `boot-faults`, the suite's faulty image only): a guest that
//!   hangs, crashes or spins before its `Ready`, chosen by its domid;
//! - [`rt`]: `memcpy` & co., the unwinding stubs and the panic handler (a panic prints its
//!   message and crashes the domain: `SCHEDOP_shutdown(SHUTDOWN_crash)`).
//!
//! `unsafe` lives here (with the ring crate, xen-sys and mayfly-xen): this crate *is* the
//! guest's hypercall layer. Every block says why it is sound (`// SAFETY:`).
//!
//! Build: `scripts/build-pv-guest.sh` (release, LTO, `link.ld`).
//!
//! What it does: check `start_info`, map shared info (Xen's clock, the event mask), find the
//! console, then
//! - **with a boot module** (the agent's boot info, `docs/formats.md` §2.6): decode it, map
//!   the granted ring pages, bind the event channel, and run the shim's transaction loop
//!   (`domu_shim::try_run`, `no_std`) with the example handlers: `Ready`, `Start`, the
//!   handler's database calls, `Commit`/`Abort`. It powers off when the transaction ended
//!   and crashes itself (`SHUTDOWN_crash`) on any failure; the console never waits for a
//!   reader here;
//! - **without one** (booted by `xl` in the Xen-in-QEMU suite): a self-test — the shared
//!   `kv` and bank handlers on the SDK's in-memory database — printed on the console, then
//!   power-off.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod boot;
#[cfg(feature = "boot-faults")]
pub mod boot_fault;
pub mod clock;
pub mod console;
#[cfg(any(feature = "test-handlers", feature = "boot-faults"))]
pub mod domid;
pub mod heap;
pub mod hypercall;
pub mod memory;
pub mod ring;
pub mod rt;
pub mod start_info;
#[cfg(feature = "test-handlers")]
pub mod test_handlers;

use alloc::vec;
use alloc::vec::Vec;

use mayfly_ring::bootinfo::{self, BootInfo};
use start_info::StartInfo;

#[global_allocator]
static HEAP: heap::Bump = heap::Bump::new();

/// The magic prefix of a 64-bit PV `start_info`.
const MAGIC_PREFIX: &str = "xen-3.0-x86_64";

/// Called by `_start` with the address of `start_info`.
#[no_mangle]
pub extern "C" fn kernel_main(start_info_addr: usize) -> ! {
    if start_info_addr == 0 {
        hypercall::shutdown(hypercall::SHUTDOWN_CRASH);
    }
    let si = StartInfo::read(start_info_addr);
    if clock::init(si.shared_info).is_err() {
        hypercall::shutdown(hypercall::SHUTDOWN_CRASH);
    }
    mayfly_ring::time::set_clock(clock::now_ns);
    if let Some(pfn) = si.pfn_of(si.console_mfn) {
        console::init((pfn * 4096) as usize, si.console_evtchn);
    }
    let layout =
        memory::setup(&si, ring::WINDOW_PAGES).unwrap_or_else(|e| panic!("memory layout: {e}"));
    // SAFETY: `memory::setup` found these pages free and mapped read-write; only the heap
    // uses them from now on.
    unsafe { HEAP.init(layout.heap_start, layout.heap_end) };
    let booted = clock::now_ns();
    println!(
        "mayfly-pv-guest: booted: {} ({} pages, cmdline {:?}); heap {:#x}..{:#x} ({} KiB), \
         ring window {:#x}",
        si.magic_str(),
        si.nr_pages,
        si.cmd_line_str(),
        layout.heap_start,
        layout.heap_end,
        HEAP.size() / 1024,
        layout.window
    );
    if !si.magic_str().starts_with(MAGIC_PREFIX) {
        panic!(
            "start_info magic {:?} is not {MAGIC_PREFIX}",
            si.magic_str()
        );
    }
    if si.mod_len != 0 {
        console::never_wait();
        transaction(&si, layout.window)
    }
    self_test();
    println!(
        "mayfly-pv-guest: self-test passed in {} us, heap used {} bytes",
        (clock::now_ns() - booted) / 1000,
        HEAP.used()
    );
    println!("mayfly-pv-guest: powering off");
    console::flush(2_000_000_000);
    hypercall::shutdown(hypercall::SHUTDOWN_POWEROFF)
}

/// Serves one transaction over the ring the boot module names, then powers off.
fn transaction(si: &StartInfo, window: usize) -> ! {
    let len = usize::try_from(si.mod_len).unwrap_or(usize::MAX);
    if len > bootinfo::MAX_LEN {
        panic!("boot module of {len} bytes exceeds {}", bootinfo::MAX_LEN);
    }
    // A private copy before decoding (the builder wrote it; we still check every field).
    let mut raw = vec![0u8; len];
    let base = si.module_va() as usize;
    for (i, b) in raw.iter_mut().enumerate() {
        // SAFETY: the builder mapped the module, mod_len bytes at module_va(), inside our
        // initial mapping; `i < len`.
        *b = unsafe { core::ptr::read_volatile((base + i) as *const u8) };
    }
    let info = BootInfo::decode(&raw).unwrap_or_else(|e| panic!("boot info refused: {e}"));
    #[cfg(feature = "boot-faults")]
    boot_fault::maybe_fault();
    let mem = ring::map(&info, window).unwrap_or_else(|e| panic!("ring: {e}"));
    let notifier = ring::EvtchnNotifier::bind(info.backend_domid, info.event_channel)
        .unwrap_or_else(|e| panic!("ring: {e}"));
    println!(
        "mayfly-pv-guest: ring: {} pages from domain {}, port {} (local {})",
        info.grant_refs.len(),
        info.backend_domid,
        info.event_channel,
        notifier.port()
    );
    ring::set_ports(notifier.port(), info.event_channel);
    #[allow(unused_mut)]
    let mut registry = mayfly_handlers::registry();
    #[cfg(feature = "test-handlers")]
    test_handlers::register(&mut registry);
    match domu_shim::try_run(mem, &notifier, &registry, &domu_shim::Config::default()) {
        Ok(outcome) => {
            println!("mayfly-pv-guest: transaction ended: {outcome:?}");
            hypercall::shutdown(hypercall::SHUTDOWN_POWEROFF)
        }
        Err(e) => {
            println!("mayfly-pv-guest: {}", domu_shim::error_chain(&e));
            hypercall::shutdown(hypercall::SHUTDOWN_CRASH)
        }
    }
}

/// Runs the shared `kv` and bank handlers on the SDK's in-memory database: the same handler
/// source the sandbox and the Linux guest run, compiled `no_std` into this kernel.
fn self_test() {
    let registry = mayfly_handlers::registry();
    let mut db = mayfly_sdk::MemDb::new();
    let run = |db: &mut mayfly_sdk::MemDb, name: &str, payload: &[u8]| -> Vec<u8> {
        let handler = registry
            .get(name)
            .unwrap_or_else(|| panic!("handler {name} missing"));
        let mut ctx = mayfly_sdk::Ctx::new(db, [1; 16], [2; 32]);
        handler(&mut ctx, payload).unwrap_or_else(|e| panic!("{name} failed: {e}"))
    };
    run(&mut db, "kv", br#"{"op":"put","key":"k","value":"v"}"#);
    let got = run(&mut db, "kv", br#"{"op":"get","key":"k"}"#);
    println!(
        "mayfly-pv-guest: kv get -> {}",
        core::str::from_utf8(&got).unwrap_or("?")
    );
    run(
        &mut db,
        "open_account",
        br#"{"name":"alice","balance":100}"#,
    );
    run(&mut db, "open_account", br#"{"name":"bob","balance":5}"#);
    let t = run(
        &mut db,
        "transfer",
        br#"{"from":"alice","to":"bob","amount":30}"#,
    );
    println!(
        "mayfly-pv-guest: transfer -> {}",
        core::str::from_utf8(&t).unwrap_or("?")
    );
}
