#!/usr/bin/env bash
# The appliance boot test: builds the disk image from the Buildroot tree's own files with
# Debian's binaries standing in for Buildroot's (build-image.sh), then boots it under QEMU
# TCG as a server would: UEFI (OVMF) -> GRUB (EFI/BOOT/bootx64.efi on the GPT disk's EFI
# partition) -> Xen (multiboot2) -> dom0 (BusyBox init, the overlay's init scripts) -> the
# agent with the Xen backend, its ledger on the ext4 partition labelled MAYFLY-DATA, serving
# the client API on the management network (DHCP on an e1000 NIC; QEMU forwards the API
# port to the host). The disk is an NVMe drive.
#
# Three boots of the same disk (after a short boot 0 that only checks GRUB is locked):
#   1. cold boot: transactions committed; `mayfly hw-check` inside; the data partition,
#      network and listeners as configured; no console login; then a power cut (QEMU killed)
#   2. every transaction acknowledged before the cut is there, `dom0-agent verify` passes;
#      more transactions; then a clean shutdown (rcK, unmount, reboot; QEMU exits)
#   3. every acknowledged transaction of both boots is there, `dom0-agent verify` passes
#
# Usage: tests/appliance/run.sh [OUT]    (default OUT: target/appliance)
# Environment:
#   SKIP_BUILD=1         reuse the image in OUT/images
#   BOOT_TIMEOUT=S       limit for one boot to reach a listening agent (default 600 s)
#   API_PORT, CTRL_PORT  host ports forwarded to 8450 (API) and 9999 (test hook)
# Writes OUT/run/serial-<boot>.log. The last line is the summary; exit 1 on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
OUT=${1:-target/appliance}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600}
API_PORT=${API_PORT:-18460}
CTRL_PORT=${CTRL_PORT:-18469}
started=$(date +%s)

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    tests/appliance/build-image.sh "$OUT"
else
    ensure_appliance_packages
fi
OUT=$(cd "$OUT" && pwd)
RUN=$OUT/run
rm -rf "$RUN"
mkdir -p "$RUN"
API=http://127.0.0.1:$API_PORT

for port in "$API_PORT" "$CTRL_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "FAILED: 127.0.0.1:$port is in use (set API_PORT / CTRL_PORT)" >&2
        exit 1
    fi
done

failures=0
checks=0
fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
    checks=$((checks + 1))
}
pass() {
    echo "ok:   $*"
    checks=$((checks + 1))
}

# The disk as the server would have it: the image written to the drive, once. The EFI
# partition's grub.cfg is the tree's with two test-only edits: the default entry is the
# general profile (the production entry requires an IOMMU and 4 GiB for dom0, which this
# emulated machine lacks), and Xen gets bootscrub=0 (scrubbing 3 GiB under emulation costs
# minutes). Everything else on the disk is as post-image.sh made it.
DISK=$RUN/disk.img
cp --sparse=always "$OUT/images/mayfly-disk.img" "$DISK"
GRUB_CFG=$RUN/grub.cfg
# A third, for the stand-in kernel: the stand-in initramfs that mounts the root partition
# (tests/appliance/README.md) is loaded after the dom0 kernel.
sed -e 's/^set default="0"$/set default="1"/' -e 's/^set timeout="3"$/set timeout="1"/' \
    -e '/^menuentry "Mayfly (general profile)"/,/^}/ s|^\(\tmultiboot2 /xen .*\)$|\1 bootscrub=0|' \
    -e '/^menuentry "Mayfly (general profile)"/,/^}/ s|^\(\tmodule2 /vmlinux .*\)$|\1\n\tmodule2 /standin-initramfs.cpio.gz|' \
    buildroot/board/mayfly/grub.cfg >"$GRUB_CFG"
if ! grep -q 'set default="1"' "$GRUB_CFG" || ! grep -q 'bootscrub=0' "$GRUB_CFG" ||
    ! grep -q 'module2 /standin-initramfs.cpio.gz' "$GRUB_CFG"; then
    echo "FAILED: could not make the test grub.cfg from the tree's" >&2
    exit 1
fi
MTOOLS_SKIP_CHECK=1 mcopy -o -i "$DISK@@1M" "$GRUB_CFG" ::EFI/BOOT/grub.cfg
MTOOLS_SKIP_CHECK=1 mcopy -o -i "$DISK@@1M" "$OUT/images/standin-initramfs.cpio.gz" ::standin-initramfs.cpio.gz
# The server's firmware variables persist across its boots.
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$RUN/OVMF_VARS.fd"

qemu=
stop_qemu() {
    if [ -n "$qemu" ] && kill -0 "$qemu" 2>/dev/null; then
        kill -9 "$qemu" 2>/dev/null || true
        wait "$qemu" 2>/dev/null || true
    fi
    qemu=
}
trap stop_qemu EXIT

# boot <name>: starts QEMU on the disk in the background; console in $RUN/serial-<name>.log.
boot() {
    LOG=$RUN/serial-$1.log
    : >"$LOG"
    boot_started=$(date +%s)
    qemu-system-x86_64 \
        -accel tcg -machine q35 -cpu max,-smap -m 3072 -smp 2 \
        -nodefaults -display none -no-reboot -monitor none -serial "file:$LOG" \
        -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
        -drive "if=pflash,format=raw,file=$RUN/OVMF_VARS.fd" \
        -drive "if=none,id=disk0,format=raw,file=$DISK" \
        -device nvme,drive=disk0,serial=MAYFLY0001 \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$API_PORT-:8450,hostfwd=tcp:127.0.0.1:$CTRL_PORT-:9999" \
        -device virtio-net-pci,netdev=n0 &
    qemu=$!
}

# wait_line <regex> <seconds>: polls the console until a line matches; fails early if QEMU
# exits.
wait_line() {
    local deadline=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        grep -qaE "$1" "$LOG" && return 0
        kill -0 "$qemu" 2>/dev/null || { grep -qaE "$1" "$LOG"; return; }
        sleep 1
    done
    return 1
}

# hook <command>: runs one test-hook command in the appliance; prints its output.
hook() {
    local out
    out=$( (exec 3<>"/dev/tcp/127.0.0.1/$CTRL_PORT" && echo "$1" >&3 && timeout 330 cat <&3) 2>/dev/null || true)
    printf '%s\n' "$out" | tr -d '\r'
}

# health: GET /v1/health.
health() { curl -sS --max-time 10 "$API/v1/health" 2>/dev/null || true; }

# wait_ready <seconds>: until the pool has a ready domain.
wait_ready() {
    local deadline=$(($(date +%s) + $1))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        health | grep -qE '"ready":[1-9]' && return 0
        sleep 2
    done
    return 1
}

# up <name>: boots and waits for the agent's API; records the boot time.
up() {
    boot "$1"
    if ! wait_line 'S50mayfly-agent: listening on port 8450' "$BOOT_TIMEOUT"; then
        fail "boot $1: the agent did not listen within ${BOOT_TIMEOUT}s (console: $LOG)"
        grep -aE 'S[0-9]{2}[a-z-]*:|Kernel panic|\(XEN\) .*(Panic|FATAL)' "$LOG" | tail -n 15 | sed 's/^/    /'
        return 1
    fi
    pass "boot $1: OVMF -> GRUB -> Xen -> dom0 -> agent listening in $(($(date +%s) - boot_started))s"
    # The start-up said nothing went wrong (a read-only root makes a missed writable path loud).
    local errors
    errors=$(tr -d '\r' <"$LOG" | grep -aE "can't create|Read-only file system|^S[0-9]{2}[a-z-]*: .*(failed|cannot|refusing)|insmod .* failed|FAIL$" || true)
    if [ -z "$errors" ]; then
        pass "boot $1: no start-up errors on the console"
    else
        fail "boot $1: start-up errors: $(printf '%s' "$errors" | tr '\n' '|')"
    fi
    if wait_ready 300; then
        pass "boot $1: the pool has a ready domain after $(($(date +%s) - boot_started))s"
    else
        fail "boot $1: no ready domain within 300 s: $(health)"
    fi
}

json_field() { grep -oE "\"$1\":(\"[^\"]*\"|[0-9]+)" | head -n 1 | cut -d: -f2- | tr -d '"' || true; }

# commit <key> <value>: a kv put through the API; on a 200 "committed" records the tx id
# and the key in $RUN/acked (an acknowledged transaction).
commit() {
    local r code tx deadline=$(($(date +%s) + 240))
    while :; do
        r=$(curl -sS --max-time 180 -w '\n%{http_code}' -H 'Content-Type: application/json' \
            -X POST "$API/v1/transactions" \
            -d "{\"handler\":\"kv\",\"payload\":{\"op\":\"put\",\"key\":\"$1\",\"value\":\"$2\"}}" 2>&1 || true)
        code=$(printf '%s\n' "$r" | tail -n 1)
        [ "$code" = 503 ] && [ "$(date +%s)" -lt "$deadline" ] && { sleep 2; continue; }
        break
    done
    tx=$(printf '%s\n' "$r" | head -n 1 | json_field tx_id)
    if [ "$code" = 200 ] && printf '%s' "$r" | grep -q '"status":"committed"' && [ -n "$tx" ]; then
        echo "$tx $1 $2" >>"$RUN/acked"
        pass "committed $1=$2 (tx $tx)"
    else
        fail "kv put $1: $(printf '%s' "$r" | tr '\n' ' ')"
    fi
}

# check_acked <boot>: every acknowledged transaction is committed in the ledger, and a kv
# get sees its value.
check_acked() {
    local n=0 bad=0 tx key value r
    while read -r tx key value; do
        n=$((n + 1))
        r=$(curl -sS --max-time 30 "$API/v1/transactions/$tx" 2>&1 || true)
        if ! printf '%s' "$r" | grep -q '"status":"committed"'; then
            fail "boot $1: acknowledged tx $tx ($key) not committed: $r"
            bad=$((bad + 1))
        fi
    done <"$RUN/acked"
    if [ "$bad" = 0 ] && [ "$n" -gt 0 ]; then
        pass "boot $1: all $n acknowledged transactions are in the ledger"
    fi
    if [ "$n" = 0 ]; then
        fail "boot $1: no acknowledged transaction to look for"
        return
    fi
    # The last value of the last key, read through a transaction.
    read -r tx key value < <(tail -n 1 "$RUN/acked") || true
    wait_ready 300 || true
    r=$(curl -sS --max-time 180 -H 'Content-Type: application/json' -X POST "$API/v1/transactions" \
        -d "{\"handler\":\"kv\",\"payload\":{\"op\":\"get\",\"key\":\"$key\"}}" 2>&1 || true)
    if printf '%s' "$r" | grep -q "\"value\":\"$value\""; then
        pass "boot $1: a kv get reads $key=$value"
    else
        fail "boot $1: kv get $key: $r"
    fi
}

verify() {
    local out
    out=$(hook verify)
    if printf '%s\n' "$out" | grep -qx 'rc=0'; then
        pass "boot $1: dom0-agent verify passes"
    else
        fail "boot $1: dom0-agent verify: $(printf '%s' "$out" | tr '\n' '|')"
    fi
}

# ---- Boot 0: GRUB is locked. Keys typed on the serial console from power-on ('c', GRUB's
# command line) must get GRUB's login prompt, not a GRUB shell. Nothing else of this boot is
# used (QEMU is killed at the prompt).
LOG=$RUN/serial-grub.log
: >"$LOG"
qemu-system-x86_64 \
    -accel tcg -machine q35 -cpu max,-smap -m 3072 -smp 2 \
    -nodefaults -display none -no-reboot -monitor none \
    -chardev "socket,id=ser0,path=$RUN/serial.sock,server=on,wait=off,logfile=$LOG" \
    -serial chardev:ser0 \
    -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
    -drive "if=pflash,format=raw,file=$RUN/OVMF_VARS.fd" \
    -drive "if=none,id=disk0,format=raw,file=$DISK,readonly=on" \
    -device nvme,drive=disk0,serial=MAYFLY0001 &
qemu=$!
# Types 'c' every 0.3 s until GRUB answers with its login prompt or its shell (180 s at most).
/usr/bin/python3 - "$RUN/serial.sock" "$LOG" <<'PY' || true
import socket, sys, time
sock_path, log = sys.argv[1], sys.argv[2]
deadline = time.time() + 180
s = None
while time.time() < deadline:
    if s is None:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock_path)
            s.setblocking(False)
        except OSError:
            s = None
            time.sleep(0.3)
            continue
    try:
        s.sendall(b"c")
        s.recv(65536)
    except BlockingIOError:
        pass
    except OSError:
        break
    text = open(log, "rb").read()
    if b"Enter username" in text or b"grub>" in text:
        break
    time.sleep(0.3)
PY
stop_qemu
if grep -qa 'Enter username' "$LOG" && ! grep -qa 'grub>' "$LOG"; then
    pass "GRUB is locked: its command line asks for a superuser (there is none), no GRUB shell"
else
    fail "GRUB lock: no login prompt for the command line (console: $LOG)"
fi

# ---- Boot 1: cold start.
: >"$RUN/acked"
if up cold; then
    h=$(health)
    if printf '%s' "$h" | grep -q '"backend":"xen"'; then pass "health: Xen backend"; else fail "health: $h"; fi
    if grep -qa 'S50mayfly-agent: /dev/nvme0n1p3 (LABEL=MAYFLY-DATA) mounted on /var/lib/mayfly' "$LOG"; then
        pass "the data partition was found by its label on the NVMe drive and mounted"
    else
        fail "the data partition: $(grep -a 'S50mayfly-agent' "$LOG" | tr -d '\r' | tr '\n' '|')"
    fi
    mounts=$(hook mounts)
    if printf '%s\n' "$mounts" | grep -qE '^/dev/nvme0n1p3 /var/lib/mayfly ext4 rw'; then
        pass "/var/lib/mayfly is the ext4 partition, read-write"
    else
        fail "mounts: $(printf '%s' "$mounts" | tr '\n' '|')"
    fi
    # Read-only root: the squashfs of partition root-a; the only block device mounted
    # read-write is the data partition; logs on a bounded tmpfs.
    if printf '%s\n' "$mounts" | grep -qE '^/dev/nvme0n1p2 / squashfs ro[ ,]' &&
        [ "$(printf '%s\n' "$mounts" | grep -E '^/dev/' | grep -cE ' rw[ ,]')" = 1 ] &&
        printf '%s\n' "$mounts" | grep -qE '^tmpfs /var/log tmpfs rw,.*size=32768k'; then
        pass "root is the read-only squashfs of root-a; only the data partition is mounted read-write; /var/log is a 32 MiB tmpfs"
    else
        fail "read-only root: $(printf '%s' "$mounts" | tr '\n' '|')"
    fi
    rw=$(hook rootwrite)
    if printf '%s\n' "$rw" | grep -q 'Read-only file system' && printf '%s\n' "$rw" | grep -qx 'rc=1'; then
        pass "writing to the root file system fails (read-only)"
    else
        fail "write to /: $(printf '%s' "$rw" | tr '\n' '|')"
    fi
    for i in 1 2 3; do commit "kv/cold-$i" "v$i"; done
    hw=$(hook hwcheck)
    if printf '%s\n' "$hw" | grep -qE '^rc=[01]$' &&
        printf '%s' "$hw" | grep -qE '"environment": *"xen-dom0"' &&
        printf '%s' "$hw" | grep -qE '"xen_version": *"4\.17' &&
        printf '%s' "$hw" | grep -qE '"nr_cpus": *[1-9]'; then
        pass "mayfly hw-check inside reports the host (Xen 4.17 dom0, physinfo)"
    else
        fail "mayfly hw-check: ${hw:0:800}"
    fi
    # Listeners: the configured API port and the test image's hook, nothing else.
    tcp=$(hook listeners)
    ports=$(printf '%s\n' "$tcp" | awk '$4 == "0A" { split($2, a, ":"); print a[2] }' | sort -u | tr '\n' ' ')
    if [ "$ports" = "2102 270F " ]; then
        pass "listening TCP ports: 8450 (agent.toml's listen) and 9999 (the test hook) only"
    else
        fail "listening TCP ports (hex): $ports"
    fi
    ps=$(hook processes)
    if printf '%s\n' "$ps" | grep -qE 'getty|login|-sh$'; then
        fail "a console login or shell runs: $(printf '%s' "$ps" | grep -E 'getty|login|-sh$' | tr '\n' '|')"
    elif printf '%s\n' "$ps" | grep -q 'dom0-agent serve'; then
        pass "no getty, login or shell on any console"
    else
        fail "process list: $(printf '%s' "$ps" | tr '\n' '|')"
    fi
    echo "==> power cut (QEMU killed)"
    stop_qemu
fi

# ---- Boot 2: after the power cut.
if up after-power-cut; then
    check_acked after-power-cut
    verify after-power-cut
    for i in 1 2; do commit "kv/warm-$i" "w$i"; done
    echo "==> clean shutdown"
    out=$(hook shutdown)
    printf '%s\n' "$out" | grep -q 'shutting down' || fail "shutdown command: $out"
    deadline=$(($(date +%s) + 180))
    while kill -0 "$qemu" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done
    if kill -0 "$qemu" 2>/dev/null; then
        fail "the appliance did not shut down within 180 s"
        stop_qemu
    else
        wait "$qemu" 2>/dev/null || true
        qemu=
        if grep -qa 'S50mayfly-agent: stopped' "$LOG"; then
            pass "clean shutdown: the agent was stopped, QEMU exited"
        else
            fail "clean shutdown: no 'S50mayfly-agent: stopped' on the console"
        fi
    fi
fi

# ---- Boot 3: after the clean shutdown.
if up after-shutdown; then
    check_acked after-shutdown
    verify after-shutdown
    stop_qemu
fi
trap - EXIT

elapsed=$(($(date +%s) - started))
if [ "$failures" -gt 0 ]; then
    echo "appliance boot test: $((checks - failures)) passed, $failures failed (${elapsed}s; consoles in $RUN)"
    exit 1
fi
echo "appliance boot test: $checks passed, 0 failed (${elapsed}s)"
