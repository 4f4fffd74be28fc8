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
# segments onto transparent huge pages (dom0-agent/sandbox-zygote/src/hugecode.rs).
# The path cargo reports (honours build.target-dir, --target, --profile in "$@").
built=$(cargo rustc --release --locked -p dom0-agent --bin mayfly-zygote \
    --message-format=json-render-diagnostics "$@" -- \
    -C target-feature=+crt-static \
    -C link-arg=-Wl,-z,max-page-size=0x200000 -C link-arg=-Wl,-z,separate-code |
    sed -n 's/.*"executable":"\([^"]*\/mayfly-zygote\)".*/\1/p' | tail -n 1)
fail() {
    echo "build-zygote.sh: ${built:-mayfly-zygote}: $*" >&2
    exit 1
}
if [ -z "$built" ] || [ ! -x "$built" ]; then fail "cargo reported no executable"; fi
# Captured first: a failing or missing readelf must not read as "no INTERP".
headers=$(LC_ALL=C readelf -lW "$built") || fail "readelf failed (binutils installed?)"
# A dynamically linked result would work but silently cost the difference above.
if grep -q 'INTERP' <<<"$headers"; then
    fail "dynamically linked; expected a static executable"
fi
grep -q 'Elf file type is DYN' <<<"$headers" || fail "not static-pie (image address would be fixed)"
# hugecode.rs moves nothing unless the segments are 2 MiB-aligned.
grep -Eq '^ +LOAD .* 0x200000$' <<<"$headers" || fail "segments not 2 MiB-aligned"
mkdir -p "$out_dir"
install -m 0755 "$built" "$out_dir/mayfly-zygote.tmp"
mv -f "$out_dir/mayfly-zygote.tmp" "$out_dir/mayfly-zygote"
echo "build-zygote.sh: $out_dir/mayfly-zygote (static)"
