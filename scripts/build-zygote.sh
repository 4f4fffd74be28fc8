#!/usr/bin/env bash
# Builds the sandbox template executable `mayfly-zygote` statically linked (static-pie: its
# image is still placed at a random address at each start), and installs it as
# OUT_DIR/mayfly-zygote.
#
#   scripts/build-zygote.sh OUT_DIR [cargo options, e.g. --features test-handlers]
#
# Why: every sandbox clone is a fork of this process, so its address space is paid for per
# transaction (fork copies the page-table entries of its written pages, the clone faults in
# the code it runs, exit tears it all down). Linked statically it has no dynamic loader, no
# separately mapped libc and libgcc_s: ~10-20 % less CPU per transaction (BENCHMARKS.md).
# Its segments are aligned to 2 MiB so that the zygote can put its code and read-only data
# on transparent huge pages, which clones then neither fault in nor unmap one by one.
# (Not position-independent was measured too: no better within noise, and it would give up
# the randomised image address, so it is not used.) Cargo cannot link one binary of a package statically and
# another dynamically (dom0-agent must stay dynamic: it loads Xen's libraries with dlopen),
# so this is a separate step; `cargo build` alone gives a working, dynamically linked
# mayfly-zygote beside dom0-agent. `serve --zygote OUT_DIR/mayfly-zygote` selects this one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: $0 OUT_DIR [cargo options]" >&2
    exit 2
fi
out_dir=$1
shift
# 2 MiB-aligned segments, code apart from data: the zygote then moves its read-only
# segments onto transparent huge pages (dom0-agent/sandbox/src/hugecode.rs).
cargo rustc --release --locked -p dom0-agent --bin mayfly-zygote "$@" -- \
    -C target-feature=+crt-static \
    -C link-arg=-Wl,-z,max-page-size=0x200000 -C link-arg=-Wl,-z,separate-code
built=${CARGO_TARGET_DIR:-target}/release/mayfly-zygote
# A dynamically linked result would work but silently cost the difference above.
if readelf -lW "$built" | grep -q 'INTERP'; then
    echo "build-zygote.sh: $built is dynamically linked; expected a static executable" >&2
    exit 1
fi
mkdir -p "$out_dir"
install -m 0755 "$built" "$out_dir/mayfly-zygote.tmp"
mv -f "$out_dir/mayfly-zygote.tmp" "$out_dir/mayfly-zygote"
echo "build-zygote.sh: $out_dir/mayfly-zygote (static)"
