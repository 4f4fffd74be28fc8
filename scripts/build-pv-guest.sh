#!/usr/bin/env bash
# Builds the Mayfly PV guest kernel (domu-shim/pv-guest) with the pinned toolchain only: a
# `#![no_std]` `#![no_main]` binary for the host target, linked freestanding with its own
# linker script. No other rustup target, no rust-src, no C compiler flags of our own.
#
#   - the target is named explicitly (--target), so RUSTFLAGS reach only the guest's crates,
#     never build scripts or proc-macros (serde_derive would crash linked freestanding);
#   - static relocation model, no PIE; `-nostartfiles -nostdlib -static`; link.ld places the
#     image at 0 with one PT_LOAD and a PT_NOTE for the Xen notes;
#   - its own target directory (target/pv-guest), so these flags never invalidate the
#     workspace's build.
#
# Usage: scripts/build-pv-guest.sh [OUT [CARGO-ARGS...]]   (default OUT:
#        target/pv-guest/mayfly-pv-guest; e.g. `OUT --features test-handlers`)
#        scripts/build-pv-guest.sh --check  (rustfmt --check and clippy -D warnings of the
#                                            guest crate, which the workspace's own lint
#                                            step does not reach)
# Checks the result: an x86_64 ELF executable with a PT_NOTE holding the Xen notes, loaded
# at 0, no dynamic section, and its size.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_build_tools # cc (the link driver) and readelf (the checks below)
OUT=${1:-target/pv-guest/mayfly-pv-guest}
# Further arguments go to cargo (e.g. --features test-handlers for the suite's guest).
EXTRA=("${@:2}")
CRATE=domu-shim/pv-guest
HOST=x86_64-unknown-linux-gnu
LD_SCRIPT=$(pwd)/$CRATE/link.ld

export RUSTFLAGS="-C relocation-model=static -C link-arg=-nostartfiles -C link-arg=-nostdlib \
-C link-arg=-static -C link-arg=-no-pie -C link-arg=-Wl,-T,$LD_SCRIPT \
-C link-arg=-Wl,--build-id=none -C link-arg=-Wl,-z,norelro -C link-arg=-Wl,--no-dynamic-linker"
export CARGO_TARGET_DIR=target/pv-guest CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
if [ "${1:-}" = --check ]; then
    cargo fmt --manifest-path "$CRATE/Cargo.toml" --check
    cargo clippy --locked --release --manifest-path "$CRATE/Cargo.toml" --target "$HOST" -- -D warnings
    cargo clippy --locked --release --manifest-path "$CRATE/Cargo.toml" --target "$HOST" \
        --all-features -- -D warnings
    exit
fi
cargo build --locked --release --manifest-path "$CRATE/Cargo.toml" --target "$HOST" "${EXTRA[@]}"
BIN=target/pv-guest/$HOST/release/mayfly-pv-guest

readelf -h "$BIN" | grep -q 'Type:.*EXEC' || { echo "$BIN: not a static executable" >&2; exit 1; }
readelf -l "$BIN" | grep -q 'NOTE' || { echo "$BIN: no PT_NOTE segment" >&2; exit 1; }
readelf -n "$BIN" | grep -q 'Xen' || { echo "$BIN: no Xen notes" >&2; exit 1; }
if readelf -d "$BIN" 2>/dev/null | grep -q 'Dynamic section at'; then
    echo "$BIN: has a dynamic section" >&2
    exit 1
fi
mkdir -p "$(dirname "$OUT")"
[ "$(realpath -m "$BIN")" = "$(realpath -m "$OUT")" ] || cp "$BIN" "$OUT"
echo "mayfly-pv-guest: $OUT, $(stat -c %s "$OUT") bytes"
