#!/usr/bin/env bash
# Runs Mayfly's whole test suite on a fresh Debian 12 machine with the Rust toolchain.
# Installs what it needs first (Debian packages through apt, cargo tools through cargo).
# Some tests mount a small tmpfs (full-disk behaviour): run as root, as CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_build_tools
ensure_siem_test_tools
ensure_failover_test_tools
ensure_tpm_test_tools
ensure_shellcheck
ensure_xen_configure_tools
ensure_xen_bindgen_tools
ensure_cargo_tool cargo-deny cargo-deny 0.20.2

step "format"                 cargo fmt --all --check
step "lints"                  cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
step "licences, bans, sources" cargo deny --locked check licenses bans sources
step "no new import circle inside a crate" python3 scripts/check-import-cycles.py
step "no long function on the transaction path" python3 scripts/check-function-length.py
step "xen bindings drift"     bindgen/xen-sys/check-drift.sh
# The Mayfly PV guest kernel: its own workspace and freestanding link, so the workspace's
# fmt/clippy/test steps do not reach it (its shared crates are tested above, std and no_std).
step "PV guest kernel: fmt, clippy" scripts/build-pv-guest.sh --check
step "PV guest kernel: build"  scripts/build-pv-guest.sh
step "no_std builds (ring, sdk, handlers, shim loop, names)" cargo clippy --locked \
    -p mayfly-ring -p mayfly-sdk -p mayfly-handlers -p domu-shim -p mayfly-names --no-default-features -- -D warnings
step "tests"                  cargo test --workspace --all-features --locked --lib --bins --tests
# The template `scripts/run.sh` runs: statically linked (a separate build step, see the
# script). The suites that start `dom0-agent serve` again, their domains forked from it.
step "static sandbox template"  scripts/build-zygote.sh target/zygote-static-test --all-features
step "serve suites on the static template" env MAYFLY_TEST_ZYGOTE="$PWD/target/zygote-static-test/mayfly-zygote" \
    cargo test --all-features --locked -p dom0-agent --test serve --test hostile
step "buildroot tree (references, shellcheck)" \
    cargo run --quiet --locked -p mayfly-br-check -- --shellcheck buildroot
# The expected-PCR replay against the PCR 8 extends of a real GRUB 2.06 boot (swtpm's log).
step "expected PCRs: replay of a recorded GRUB boot" \
    python3 buildroot/board/mayfly/expected-pcrs.py --check-vector \
    docs/vectors/grub-2.06-measured.cfg docs/vectors/grub-2.06-pcr8-events.hex
# Buildroot's own check-package and the savedefconfig round trip need a Buildroot source
# tree, which CI machines cannot fetch (buildroot/scripts/check-with-buildroot.sh says why):
# run when one is named.
if [ -n "${MAYFLY_BUILDROOT_DIR:-}" ]; then
    step "buildroot tree (Buildroot's check-package, savedefconfig)" \
        buildroot/scripts/check-with-buildroot.sh "$MAYFLY_BUILDROOT_DIR"
fi
step "Xen 4.17 source: board patches apply, configure leaves out python/pygrub/hvmloader" \
    buildroot/scripts/check-xen-source.sh
step "vendored crates match buildroot/vendor.pin" bash -c \
    'buildroot/scripts/vendor-crates.sh vendor target/mayfly-vendor &&
     buildroot/scripts/vendor-crates.sh verify target/mayfly-vendor'
step "benchmarks (smoke)"     cargo test --workspace --all-features --locked --benches
for smoke in domu-shim/*/fuzz/smoke.sh; do
    [ -x "$smoke" ] || continue
    step "fuzz smoke: ${smoke%/fuzz/smoke.sh}" "$smoke"
done
# The sandbox's cgroup v2 path on Debian's own kernel under QEMU TCG (no Xen, no systemd, only
# cgroup2 mounted): limits, the clones' and demoted groups, cleanup. Installs its own packages.
step "cgroup v2 on a real kernel" tests/cgroup-v2/run.sh
# Xen 4.17 under QEMU TCG: the guest transport, the dom0 overlay, and transactions through the
# agent's Xen backend. Installs its own Debian packages.
step "Xen-in-QEMU suite"      tests/xen-qemu/run.sh
# The appliance image, assembled from the Buildroot tree with Debian's binaries standing in,
# booted under QEMU with OVMF: power cut and clean shutdown; the TPM-sealed signing key (a
# changed command line and a copied disk refused, attestation from the host), five boots:
# ~27 min at load average 15 (tests/appliance/README.md). Installs its own Debian packages.
step "appliance boot test"    tests/appliance/run.sh
# The signed A/B update on the same image (its own disk; about as long as the boot test).
step "appliance update test"  env SKIP_BUILD=1 tests/appliance/update.sh
echo "all checks passed"
