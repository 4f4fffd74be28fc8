#!/usr/bin/env bash
# Builds and briefly runs every mayfly-ring fuzz target. Exits non-zero if a target crashes
# (the crashing input is left in fuzz/artifacts/<target>/).
#
#   domu-shim/ring/fuzz/smoke.sh            # 30 s per target
#   FUZZ_SECONDS=300 domu-shim/ring/fuzz/smoke.sh
#
# The toolchain is pinned stable; cargo fuzz passes nightly-only -Z flags (sanitizers,
# coverage instrumentation), which RUSTC_BOOTSTRAP=1 lets the stable compiler accept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
docs="$here/../../../docs/formats.md"
seconds="${FUZZ_SECONDS:-30}"
cd "$here"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --version 0.13.2
fi

export RUSTC_BOOTSTRAP=1

# Seed the decoder with the documented test vectors (hex before '|' in each block that
# follows a '<!-- vector: NAME -->' marker).
mkdir -p corpus/decode corpus/backend
if [[ -f "$docs" ]]; then
    name="" hex=""
    while IFS= read -r line; do
        if [[ "$line" =~ ^\<\!--\ vector:\ ([a-z0-9-]+)\ --\>$ ]]; then
            name="${BASH_REMATCH[1]}" hex=""
            read -r _fence
            continue
        fi
        [[ -z "$name" ]] && continue
        if [[ "$line" == '```'* ]]; then
            printf '%b' "$(sed 's/../\\x&/g' <<<"$hex")" >"corpus/decode/vector-$name"
            name=""
            continue
        fi
        data="${line%%|*}"
        hex+="${data//[[:space:]]/}"
    done <"$docs"
fi

for target in $(cargo fuzz list); do
    echo "smoke.sh: fuzzing $target for ${seconds}s" >&2
    cargo fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1
done
echo "smoke.sh: no crash" >&2
