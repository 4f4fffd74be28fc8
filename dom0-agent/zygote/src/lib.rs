//! The sandbox template, as its own small executable `mayfly-zygote`.
//!
//! The sandbox backend spawns it with a fresh `exec` (so it holds none of the agent's
//! memory, keys included); it loads the handlers once and forks a copy-on-write clone per
//! transaction; each clone runs the guest runtime `domu-shim` over its ring, exactly as a
//! Xen domU's `/init` would.
//!
//! It is a separate executable, not a subcommand of `dom0-agent`, because every clone
//! inherits the template's address space and pays for it: `fork` copies the page-table
//! entries of every private page the template has written (in a position-independent
//! executable that includes its relocated read-only data), the clone faults in the code it
//! runs, and `exit` tears all of it down again. The agent's binary carries the ledger, the
//! HTTP server, the console, the SIEM exporter and the Xen bindings — none of which a guest
//! runs. This one carries the shim, the handlers and the zygote loop (a tenth of the code),
//! built by the `dom0-agent` package as its `mayfly-zygote` binary and installed beside
//! `dom0-agent`. It also keeps the agent's code out of every guest's address space.
//! `scripts/build-zygote.sh` links it statically (static-pie), which `scripts/run.sh` uses:
//! no dynamic loader, libc or libgcc_s mappings to copy and tear down per clone. Cargo's own
//! build of it is dynamically linked and works the same. `BENCHMARKS.md` has the measured
//! differences.
//!
//! ```text
//!  dom0-agent serve ── fork+exec ──▶ mayfly-zygote  (control socket fd in MAYFLY_SANDBOX_CONTROL_FD)
//!                                      └─ fork per transaction ──▶ clone: domu_shim::run(ring)
//! ```

use std::os::fd::AsFd;
use std::process::ExitCode;

use mayfly_ring::{EventFdNotifier, MmapMem};
use mayfly_sandbox_zygote::ChildRing;
use mayfly_sdk::Registry;

/// Exit status of a clone whose ring could not be mapped.
const MAP_FAILED: i32 = 3;

/// Exit status when the zygote was not started by the sandbox backend.
const NOT_SPAWNED: u8 = 2;

/// The handlers built into the template.
pub fn registry() -> Registry {
    mayfly_handlers::registry()
}

/// Every handler name the template answers to, announced to the agent in the zygote's
/// `Ready` (the agent refuses others up front). The very list each clone's shim announces in
/// its ring `Ready` (`domu_shim::announced_handlers` of the same registry and the shim's
/// default configuration, which `domu_shim::run` uses): the agent checks the two agree.
pub fn handler_names() -> Vec<String> {
    domu_shim::announced_handlers(&registry(), &domu_shim::Config::default())
}

fn clone_main(registry: &mut Registry, ring: ChildRing) -> i32 {
    let Ok(mem) = MmapMem::from_fd(ring.ring.as_fd(), ring.ring_len) else {
        return MAP_FAILED;
    };
    drop(ring.ring);
    let notifier = EventFdNotifier::from_fds(ring.signal, ring.wait);
    domu_shim::run(mem, &notifier, registry)
}

/// The template's state, built once before any clone: the handlers, plus everything that is
/// lazily initialised on first use and would otherwise be redone in every clone (the
/// ChaCha20 backend probes the CPU with `cpuid`, which traps to the hypervisor in a VM).
fn template() -> Registry {
    let mut warm = mayfly_sdk::HandlerRng::from_seed([0; 32]);
    std::hint::black_box(warm.next_u64());
    registry()
}

/// Runs the zygote; never returns on success.
pub fn run() -> ExitCode {
    match mayfly_sandbox_zygote::zygote::control_fd_from_env() {
        Ok(control) => {
            mayfly_sandbox_zygote::zygote_main_with(control, handler_names(), template, clone_main)
        }
        Err(e) => {
            eprintln!(
                "mayfly-zygote: {e}\n(this is the sandbox backend's template process; \
                 `dom0-agent serve` starts it, it is not run by hand)"
            );
            ExitCode::from(NOT_SPAWNED)
        }
    }
}
