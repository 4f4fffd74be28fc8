#!/usr/bin/env bash
# The sandbox's cgroup v2 path on a real pure-v2 kernel: boots Debian's own kernel (no Xen)
# under QEMU TCG with a small initramfs — the static busybox, the release `dom0-agent` and the
# static sandbox template (both with the test handlers), a permissive test policy — in which
# only cgroup2 is mounted at /sys/fs/cgroup and no systemd runs (the guest's /init,
# tests/cgroup-v2/init, puts the agent in a delegated cgroup the way systemd's Delegate=yes
# does). The guest prints one "CGV2: PASS|FAIL <check>" line per check; this script fails on
# any FAIL, on a missing check, and on a timeout.
#
# Usage: tests/cgroup-v2/run.sh [OUT]     (default OUT: target/cgroup-v2)
# Environment:
#   SKIP_BUILD=1     reuse OUT/initramfs.cpio
#   BUILD_ONLY=1     build OUT/initramfs.cpio and stop (then boot it with SKIP_BUILD=1)
#   QEMU_TIMEOUT=S   hard limit on the QEMU run (default 600 s)
#   QEMU_SMP=N       emulated CPUs (default 2)
# Where other QEMU runs share the machine, boot under their lock: BUILD_ONLY=1 first, then
#   SKIP_BUILD=1 flock /work/qemu.lock tests/cgroup-v2/run.sh
# Writes OUT/serial.log (the whole console).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
OUT=${1:-target/cgroup-v2}
QEMU_TIMEOUT=${QEMU_TIMEOUT:-600}
HERE=tests/cgroup-v2
# The checks the guest must report, each exactly once (a check that is never reached fails).
EXPECTED_CHECKS=48

ensure_cgroup_v2_test_packages
KVER=$(linux_version)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "==> Rust binaries (test handlers)"
    CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo build --locked --release \
        -p dom0-agent --bin dom0-agent --features dom0-agent/test-handlers
    scripts/build-zygote.sh "$OUT/zygote" --features test-handlers
    AGENT=target/release/dom0-agent

    echo "==> initramfs"
    ROOT=$OUT/root
    rm -rf "$ROOT"
    mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,usr/lib/mayfly,dev,proc,sys,run,tmp,var/lib,etc/mayfly-test/policy,root}
    install -m 0755 /bin/busybox "$ROOT/bin/busybox"
    for applet in $(/bin/busybox --list-full); do
        [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
    done
    install -s -m 0755 "$AGENT" "$ROOT/usr/bin/dom0-agent"
    install -s -m 0755 "$OUT/zygote/mayfly-zygote" "$ROOT/usr/lib/mayfly/mayfly-zygote"
    # The agent's shared-library closure (the static zygote has none).
    install_library_closure "$ROOT" "$AGENT"
    # The agent tests' permissive policy: every handler (the test.* ones too) allowed,
    # domain misbehaviour aborts and destroys.
    printf '%s\n' '[engine]' 'unlisted_handler = "allow"' 'domain_default = "abort"' \
        >"$ROOT/etc/mayfly-test/policy/allow.toml"
    echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
    install -m 0755 "$HERE/init" "$ROOT/init"
    (cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
        >"$OUT/initramfs.cpio.tmp"
    mv "$OUT/initramfs.cpio.tmp" "$OUT/initramfs.cpio"
    rm -rf "$ROOT"
fi
if [ "${BUILD_ONLY:-0}" = 1 ]; then
    ls -l "$OUT/initramfs.cpio"
    exit 0
fi

LOG=$OUT/serial.log
: >"$LOG"
echo "==> booting Debian's kernel $KVER under QEMU TCG (limit ${QEMU_TIMEOUT}s; console: $LOG)"
rc=0
timeout --kill-after=10 "$QEMU_TIMEOUT" qemu-system-x86_64 \
    -accel tcg -cpu max -m 1024 -smp "${QEMU_SMP:-2}" -nodefaults -display none -no-reboot \
    -monitor none -serial "file:$LOG" \
    -kernel "/boot/vmlinuz-$KVER" -initrd "$OUT/initramfs.cpio" \
    -append "console=ttyS0 panic=-1 rdinit=/init" || rc=$?

grep -a '^CGV2' "$LOG" | tr -d '\r' || true
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "FAILED: QEMU still running after ${QEMU_TIMEOUT}s (console: $LOG)" >&2
    exit 1
fi
done_line=$(grep -a '^CGV2: DONE ' "$LOG" | tr -d '\r' | tail -n 1)
if [ -z "$done_line" ]; then
    echo "FAILED: the guest did not finish its checks (QEMU exit $rc; console: $LOG)" >&2
    exit 1
fi
fails=$(grep -ac '^CGV2: FAIL ' "$LOG" || true)
checks=$(grep -aE '^CGV2: (PASS|FAIL) ' "$LOG" | tr -d '\r' | sed -E 's/^CGV2: (PASS|FAIL) ([^ :]+).*/\2/' | sort)
distinct=$(uniq <<<"$checks" | grep -c . || true)
total=$(grep -c . <<<"$checks" || true)
if [ "$fails" -gt 0 ]; then
    echo "FAILED: $fails of $total cgroup v2 checks failed (console: $LOG)" >&2
    exit 1
fi
if [ "$total" -ne "$EXPECTED_CHECKS" ] || [ "$distinct" -ne "$EXPECTED_CHECKS" ]; then
    echo "FAILED: $total checks ($distinct distinct) reported, $EXPECTED_CHECKS expected (console: $LOG)" >&2
    exit 1
fi
echo "cgroup v2: all $total checks passed"
