#!/usr/bin/env bash
# Checks this BR2_EXTERNAL tree with Buildroot's own tools, given a Buildroot source tree
# (release 2026.05.1; nothing is downloaded and nothing is built):
#   1. utils/check-package over every file of the tree (but check/, a Rust crate): no warning;
#   2. `make mayfly_x86_64_defconfig`: every setting of the defconfig survives into .config;
#   3. `make savedefconfig` gives back exactly the defconfig's settings (comments and order
#      aside), so the file is what Buildroot itself would write;
#   4. asking for the agent on another architecture (aarch64) gives no Kconfig warning (the
#      agent selects mayfly-xen-dist, which is x86_64 only).
#
# Usage: buildroot/scripts/check-with-buildroot.sh BUILDROOT_DIR [OUT]
# Needs python3 with the `magic` module and flake8 (Debian: python3-magic, flake8), a C
# compiler (Kconfig's conf), make.
#
# Why CI does not run it: Buildroot's source is not on the CI machines and cannot be fetched
# there (they reach package registries only, and Buildroot is on none), and its code may not
# be copied into this repository. scripts/test.sh runs this script when MAYFLY_BUILDROOT_DIR
# names a Buildroot tree; the static checks CI always runs are br-check's (buildroot/check).
set -euo pipefail
BR=${1:?usage: $0 BUILDROOT_DIR [OUT]}
BR=$(cd "$BR" && pwd)
EXT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${2:-$(mktemp -d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ ! -x "$BR/utils/check-package" ] || [ ! -f "$BR/Makefile" ]; then
    echo "check-with-buildroot: $BR is not a Buildroot source tree" >&2
    exit 1
fi
# Debian's python3, where python3-magic and flake8 are installed (PATH may name another).
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
failures=0

echo "==> check-package"
mapfile -t files < <(cd "$EXT" && find . -path ./check -prune -o -type f -print | LC_ALL=C sort)
if (cd "$EXT" && "$PY" "$BR/utils/check-package" -b "${files[@]}") >"$OUT/check-package.log" 2>&1 &&
    grep -q '^0 warnings generated$' "$OUT/check-package.log"; then
    echo "ok: check-package: $(grep 'lines processed' "$OUT/check-package.log"), 0 warnings"
else
    cat "$OUT/check-package.log"
    echo "FAIL: check-package"
    failures=$((failures + 1))
fi

echo "==> defconfig"
settings() { grep -E '^(BR2_[A-Z0-9_]+=|# BR2_[A-Z0-9_]+ is not set$)' "$1" | LC_ALL=C sort; }
if ! make -C "$BR" O="$OUT/output" BR2_EXTERNAL="$EXT" mayfly_x86_64_defconfig >"$OUT/defconfig.log" 2>&1; then
    tail -n 20 "$OUT/defconfig.log"
    echo "FAIL: make mayfly_x86_64_defconfig"
    exit 1
fi
if grep -i 'warning' "$OUT/defconfig.log"; then
    echo "FAIL: Kconfig warnings"
    failures=$((failures + 1))
fi
dropped=$(settings "$EXT/configs/mayfly_x86_64_defconfig" | while read -r line; do
    grep -qxF "$line" "$OUT/output/.config" || echo "$line"
done)
if [ -n "$dropped" ]; then
    echo "FAIL: settings of the defconfig not in .config:"
    echo "$dropped"
    failures=$((failures + 1))
else
    echo "ok: every setting of the defconfig is in .config"
fi
make -C "$BR" O="$OUT/output" savedefconfig BR2_DEFCONFIG="$OUT/saved_defconfig" >"$OUT/savedefconfig.log" 2>&1
if diff -u <(settings "$EXT/configs/mayfly_x86_64_defconfig") <(settings "$OUT/saved_defconfig"); then
    echo "ok: savedefconfig gives back the defconfig's settings"
else
    echo "FAIL: savedefconfig differs from configs/mayfly_x86_64_defconfig (above)"
    failures=$((failures + 1))
fi

echo "==> another architecture"
printf 'BR2_aarch64=y\nBR2_PACKAGE_MAYFLY_DOM0_AGENT=y\nBR2_PACKAGE_MAYFLY_CLI=y\n' >"$OUT/aarch64_defconfig"
make -C "$BR" O="$OUT/aarch64" BR2_EXTERNAL="$EXT" defconfig BR2_DEFCONFIG="$OUT/aarch64_defconfig" \
    >"$OUT/aarch64.log" 2>&1 || { tail -n 20 "$OUT/aarch64.log"; failures=$((failures + 1)); }
if grep -i 'warning' "$OUT/aarch64.log"; then
    echo "FAIL: Kconfig warnings for aarch64 with the agent asked for"
    failures=$((failures + 1))
else
    echo "ok: no Kconfig warning on aarch64"
fi

[ "$failures" -eq 0 ] || { echo "check-with-buildroot: $failures failure(s)"; exit 1; }
echo "check-with-buildroot: passed"
