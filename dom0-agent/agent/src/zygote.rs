//! `dom0-agent sandbox-zygote`: the sandbox template. Started by the sandbox backend with a
//! fresh `exec` (so it holds none of the agent's memory, keys included), it loads the
//! handlers once and forks a copy-on-write clone per transaction; each clone runs the guest
//! runtime `domu-shim` over its ring, exactly as a Xen domU's `/init` would.

use std::os::fd::AsFd;
use std::process::ExitCode;

use mayfly_ring::{EventFdNotifier, MmapMem};
use mayfly_sandbox::ChildRing;
use mayfly_sdk::Registry;

/// Exit status of a clone whose ring could not be mapped.
const MAP_FAILED: i32 = 3;

/// The handlers built into the template.
pub fn registry() -> Registry {
    mayfly_handlers::registry()
}

/// Every handler name the template answers to (the executor refuses others up front).
pub fn handler_names() -> Vec<String> {
    #[cfg_attr(not(feature = "test-handlers"), allow(unused_mut))]
    let mut names: Vec<String> = registry().names().map(str::to_owned).collect();
    #[cfg(feature = "test-handlers")]
    names.extend(
        domu_shim::test_handlers::TEST_HANDLERS
            .iter()
            .map(|(n, _)| (*n).to_owned()),
    );
    names
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
    match mayfly_sandbox::zygote::control_fd_from_env() {
        Ok(control) => mayfly_sandbox::zygote_main_with(control, template, clone_main),
        Err(e) => {
            eprintln!("dom0-agent sandbox-zygote: {e}");
            ExitCode::from(2)
        }
    }
}
