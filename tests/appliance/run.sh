#!/usr/bin/env bash
# The appliance boot test: builds the disk image from the Buildroot tree's own files with
# Debian's binaries standing in for Buildroot's (build-image.sh), then boots it under QEMU
# TCG as a server would: UEFI (OVMF) -> GRUB (EFI/BOOT/bootx64.efi on the GPT disk's EFI
# partition) -> Xen (multiboot2) -> dom0 (BusyBox init, the overlay's init scripts) -> the
# agent with the Xen backend, its ledger on the ext4 partition labelled MAYFLY-DATA, serving
# the client API on the management network (DHCP on an e1000 NIC; QEMU forwards the API
# port to the host). The disk is an NVMe drive.
#
# Five boots (after a short boot 0 that only checks GRUB is locked). The agent's signing key
# is sealed to the TPM (swtpm; its state kept across the server's boots):
#   1. cold boot: the key is created and sealed; transactions committed (signed by it);
#      health and `mayfly hw-check` inside say tpm; `mayfly admin attest` from the host
#      verifies against the expected PCRs, a quote altered on its way is refused; the data
#      partition, network and listeners as configured; no console login; then a power cut
#   2. every transaction acknowledged before the cut is there, `dom0-agent verify` passes;
#      more transactions; then a clean shutdown (rcK, unmount, reboot; QEMU exits)
#   3. dom0's command line changed on the EFI partition (as an attacker would): PCR 8
#      changes, the agent refuses to sign and says why; the ledger still verifies
#   4. the original grub.cfg again: the key unseals, the agent signs again, every
#      acknowledged transaction is there, `verify` passes, the refused boot is audited
#      (key.unavailable_earlier); clean shutdown
#   5. a copy of the disk on a second machine (fresh swtpm, fresh firmware variables): the
#      agent refuses to sign (the sealed key belongs to another TPM)
#
# Usage: tests/appliance/run.sh [OUT]    (default OUT: target/appliance)
# Environment:
#   SKIP_BUILD=1         reuse the image in OUT/images
#   BOOT_TIMEOUT=S       limit for one boot to reach a listening agent (default 600 s)
#   API_PORT, CTRL_PORT, CONSOLE_PORT  host ports forwarded to 8450 (API), 9999 (test
#                        hook) and 9998 (the hook's relay to the admin console)
# Writes OUT/run/serial-<boot>.log. The last line is the summary; exit 1 on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/appliance/lib.sh
source tests/appliance/lib.sh
appliance_setup "${1:-target/appliance}" run

# ---- Boot 0: GRUB is locked. Keys typed on the serial console from power-on ('c', GRUB's
# command line) must get GRUB's login prompt, not a GRUB shell. Nothing else of this boot is
# used (QEMU is killed at the prompt).
LOG=$RUN/serial-grub.log
: >"$LOG"
qemu-system-x86_64 \
    -accel tcg -machine q35 -cpu "$QEMU_CPU" -m 3072 -smp 2 \
    -nodefaults -display none -no-reboot -monitor none \
    -chardev "socket,id=ser0,path=$RUN/serial.sock,server=on,wait=off,logfile=$LOG" \
    -serial chardev:ser0 \
    -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
    -drive "if=pflash,format=raw,file=$OVMF_VARS" \
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

# clean_shutdown: through the hook (rcK stops the agent, file systems are unmounted); QEMU
# exits (-no-reboot).
clean_shutdown() {
    local out deadline
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
        stop_swtpm
        if grep -qa 'S50mayfly-agent: stopped' "$LOG"; then
            pass "clean shutdown: the agent was stopped, QEMU exited"
        else
            fail "clean shutdown: no 'S50mayfly-agent: stopped' on the console"
        fi
    fi
}

# ---- Boot 1: cold start.
: >"$RUN/acked"
if up cold; then
    h=$(health)
    if printf '%s' "$h" | grep -q '"backend":"xen"'; then pass "health: Xen backend"; else fail "health: $h"; fi
    if grep -qa 'S50mayfly-agent: /dev/nvme0n1p4 (LABEL=MAYFLY-DATA) mounted on /var/lib/mayfly' "$LOG"; then
        pass "the data partition was found by its label on the NVMe drive and mounted"
    else
        fail "the data partition: $(grep -a 'S50mayfly-agent' "$LOG" | tr -d '\r' | tr '\n' '|')"
    fi
    mounts=$(hook mounts)
    if printf '%s\n' "$mounts" | grep -qE '^/dev/nvme0n1p4 /var/lib/mayfly ext4 rw'; then
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
    key_is_tpm cold
    for i in 1 2 3; do commit "kv/cold-$i" "v$i"; done
    # Measured boot: PCRs 8 and 9 as GRUB left them equal the values computed from grub.cfg
    # and the files it loads (state: slot a committed, no trial; prepare_disk computed them).
    want=$(pcrs_expected "$RUN/expected-pcrs" 'slot=a try=- tries=0')
    have=$(pcrs_read)
    if [ -n "$want" ] && [ "$have" = "$want" ]; then
        pass "measured boot: PCR 8 and PCR 9 read in dom0 equal the computed expected values"
    else
        fail "measured boot: PCRs in dom0 '$have', expected '$want' (events: expected-pcrs.py --events)"
    fi
    # Attestation from the host, through the console (the hook relays it).
    attest cold "$RUN/expected-pcrs" 'slot=a try=- tries=0'
    hw=$(hook hwcheck)
    if printf '%s\n' "$hw" | grep -qE '^rc=[01]$' &&
        printf '%s' "$hw" | grep -qE '"environment": *"xen-dom0"' &&
        printf '%s' "$hw" | grep -qE '"xen_version": *"4\.17' &&
        printf '%s' "$hw" | grep -qE '"nr_cpus": *[1-9]'; then
        pass "mayfly hw-check inside reports the host (Xen 4.17 dom0, physinfo)"
    else
        fail "mayfly hw-check: ${hw:0:800}"
    fi
    # Listeners: the configured API port, the test image's hook and its console relay, and
    # the console on loopback (the test image's /etc/default/mayfly-agent), nothing else.
    tcp=$(hook listeners)
    ports=$(printf '%s\n' "$tcp" | awk '$4 == "0A" { split($2, a, ":"); print a[2] }' | sort -u | tr '\n' ' ')
    console=$(printf '%s\n' "$tcp" | awk '$4 == "0A" { split($2, a, ":"); if (a[2] == "2103") print a[1] }' | sort -u | tr '\n' ' ')
    if [ "$ports" = "2102 2103 270E 270F " ] && [ "$console" = "0100007F " ]; then
        pass "listening TCP ports: 8450 (agent.toml's listen), 9999 and 9998 (the test hook and its console relay), 8451 on 127.0.0.1 only (the test's console)"
    else
        fail "listening TCP ports (hex): $ports; the console's address: $console"
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
    clean_shutdown
fi

# ---- Boot 3: after the clean shutdown, with dom0's kernel command line changed on the EFI
# partition (one word added, as an attacker with the disk would): PCR 8 must differ from the
# original's expected value and equal the value computed for the changed grub.cfg, and the
# agent must refuse to sign, naming PCR 8. The ledger itself is intact (verify, read-only).
sed 's|^\(\tmodule2 /vmlinux-a .*\)$|\1 mayfly.test=changed|' "$GRUB_CFG" >"$RUN/grub-changed.cfg"
MTOOLS_SKIP_CHECK=1 mcopy -o -i "$DISK@@1M" "$RUN/grub-changed.cfg" ::EFI/BOOT/grub.cfg
expected_pcrs "$RUN/grub-changed.cfg" "$RUN/expected-pcrs-changed"
if up_refused changed-cmdline 'boot chain differs .*: PCR 8 now'; then
    have=$(pcrs_read)
    want=$(pcrs_expected "$RUN/expected-pcrs-changed" 'slot=a try=- tries=0')
    orig=$(pcrs_expected "$RUN/expected-pcrs" 'slot=a try=- tries=0')
    if [ -n "$want" ] && [ "$have" = "$want" ] && [ "${have%% *}" != "${orig%% *}" ]; then
        pass "measured boot: a changed dom0 command line gives another PCR 8, the one computed for it"
    else
        fail "measured boot, changed command line: PCRs '$have', expected '$want', original '$orig'"
    fi
    verify changed-cmdline
fi
stop_qemu

# ---- Boot 4: the original grub.cfg again: the key unseals, the agent signs again, and the
# refused boot is in the audit chain.
MTOOLS_SKIP_CHECK=1 mcopy -o -i "$DISK@@1M" "$GRUB_CFG" ::EFI/BOOT/grub.cfg
if up original-again; then
    key_is_tpm original-again
    check_acked original-again
    commit kv/again-1 a1
    verify original-again
    refusal=$(audit_field key.unavailable_earlier detail)
    if printf '%s\n' "$refusal" | grep -q 'PCR 8 now'; then
        pass "boot original-again: the refused boot is audited: key.unavailable_earlier ($(printf '%s' "$refusal" | grep -o 'the boot chain differs[^;|]*' | head -n 1 | cut -c1-80)…)"
    else
        fail "boot original-again: no key.unavailable_earlier naming PCR 8 in the audit chain: '$refusal'"
    fi
    clean_shutdown
fi
stop_qemu

# ---- Boot 5: the disk (its data partition with the sealed key) copied to a second machine
# with its own TPM (a fresh swtpm) and firmware variables: the agent must refuse to sign.
cp --sparse=always "$DISK" "$RUN/disk-copy.img"
DISK=$RUN/disk-copy.img
TPM_DIR=$RUN/tpm-second-machine
OVMF_VARS=$RUN/OVMF_VARS-second-machine.fd
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$OVMF_VARS"
up_refused second-machine 'does not belong to this TPM' || true
stop_qemu
rm -f "$RUN/disk-copy.img"
trap - EXIT

summary "appliance boot test"
