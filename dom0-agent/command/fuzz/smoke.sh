#!/usr/bin/env bash
# Builds and briefly runs the mayfly-command fuzz target, seeded with the published
# vectors. Exits non-zero on a crash (the input is left in fuzz/artifacts/envelope/).
#
#   dom0-agent/command/fuzz/smoke.sh            # 30 s
#   FUZZ_SECONDS=300 dom0-agent/command/fuzz/smoke.sh
#
# As for mayfly-ring: RUSTC_BOOTSTRAP=1 lets the pinned stable compiler accept the -Z
# flags cargo fuzz passes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
vectors="$here/../../../docs/vectors"
seconds="${FUZZ_SECONDS:-30}"
cd "$here"
export RUSTC_BOOTSTRAP=1
mkdir -p corpus/envelope
for f in "$vectors"/command-*.hex; do
    xxd -r -p "$f" >"corpus/envelope/$(basename "$f" .hex)"
done
cargo fuzz run envelope corpus/envelope -- -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1
echo "smoke.sh: no crash" >&2
