# Shared by the appliance boot tests (run.sh, update.sh): QEMU with OVMF on the image's disk,
# the console log, the test hook, the client API, the checks' counters. Sourced in the
# repository's top directory; then `appliance_setup` builds (or reuses) the image and
# prepares the run's disk.
# Environment: SKIP_BUILD=1, BOOT_TIMEOUT (one boot to a listening agent, default 600 s),
# API_PORT, CTRL_PORT and CONSOLE_PORT (host ports forwarded to 8450, 9999 and 9998, the test
# hook's relay to the admin console).
# shellcheck shell=bash

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600}
API_PORT=${API_PORT:-18460}
CTRL_PORT=${CTRL_PORT:-18469}
CONSOLE_PORT=${CONSOLE_PORT:-18468}
API=http://127.0.0.1:$API_PORT
# The emulated CPU: SMAP is hidden because dom0 crashes on its first iretq with it
# (../shared/notes/xen-in-qemu.md).
QEMU_CPU=${QEMU_CPU:-max,-smap}
# Extra QEMU arguments of the next boot.
EXTRA_QEMU=()
# The disk's controller (update.sh adds a second namespace holding its update medium).
# shellcheck disable=SC2054 # commas inside a QEMU option value
DISK_QEMU=(-device nvme,drive=disk0,serial=MAYFLY0001)

# prepare_disk: the disk as the server would have it: the image written to the drive, once.
# The EFI partition's grub.cfg is the tree's with test-only edits: the general profile boots
# (the production entries require an IOMMU and 4 GiB for dom0, which this emulated machine
# lacks), Xen gets bootscrub=0 (scrubbing 3 GiB under emulation costs minutes), and the
# stand-in initramfs that mounts the root partition (README.md) is loaded after the dom0
# kernel; expected-pcrs-a and -b are computed for it ($RUN/expected-pcrs). Everything else
# on the disk is as post-image.sh made it.
prepare_disk() {
    DISK=$RUN/disk.img
    cp --sparse=always "$OUT/images/mayfly-disk.img" "$DISK"
    GRUB_CFG=$RUN/grub.cfg
    sed -e 's/^set mayfly_profile="production"$/set mayfly_profile="general"/' \
        -e 's/^set timeout="3"$/set timeout="1"/' \
        -e '/^menuentry "Mayfly slot [ab] (general profile)"/,/^}/ s|^\(\tmultiboot2 /xen-[ab] .*\)$|\1 bootscrub=0|' \
        -e '/^menuentry "Mayfly slot [ab] (general profile)"/,/^}/ s|^\(\tmodule2 /vmlinux-[ab] .*\)$|\1\n\tmodule2 /standin-initramfs.cpio.gz|' \
        buildroot/board/mayfly/grub.cfg >"$GRUB_CFG"
    if ! grep -q '^set mayfly_profile="general"$' "$GRUB_CFG" ||
        [ "$(grep -c 'bootscrub=0' "$GRUB_CFG")" != 2 ] ||
        [ "$(grep -c 'module2 /standin-initramfs.cpio.gz' "$GRUB_CFG")" != 2 ]; then
        echo "FAILED: could not make the test grub.cfg from the tree's" >&2
        exit 1
    fi
    MTOOLS_SKIP_CHECK=1 mcopy -o -i "$DISK@@1M" "$GRUB_CFG" ::EFI/BOOT/grub.cfg
    MTOOLS_SKIP_CHECK=1 mcopy -o -i "$DISK@@1M" "$OUT/images/standin-initramfs.cpio.gz" ::standin-initramfs.cpio.gz
    # The expected PCRs of this grub.cfg, where the image keeps each slot's (an update
    # re-seals the signing key with them: dom0-agent reseal-switch).
    expected_pcrs "$GRUB_CFG" "$RUN/expected-pcrs"
    for slot in a b; do
        MTOOLS_SKIP_CHECK=1 mcopy -o -i "$DISK@@1M" "$RUN/expected-pcrs" "::expected-pcrs-$slot"
    done
    # The server's firmware variables and its TPM's state persist across its boots.
    OVMF_VARS=$RUN/OVMF_VARS.fd
    cp /usr/share/OVMF/OVMF_VARS_4M.fd "$OVMF_VARS"
    TPM_DIR=$RUN/tpm
}

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

qemu=
swtpm=
stop_qemu() {
    if [ -n "$qemu" ] && kill -0 "$qemu" 2>/dev/null; then
        kill -9 "$qemu" 2>/dev/null || true
        wait "$qemu" 2>/dev/null || true
    fi
    qemu=
    stop_swtpm
}
trap stop_qemu EXIT
# A command that fails outside any check (set -e) ends the test: say where, so the run does
# not just stop without its summary line.
trap 'echo "FAILED: the test script stopped at ${BASH_SOURCE[0]}:$LINENO (status $?)" >&2' ERR

# stop_swtpm: ends this test's swtpm (if QEMU's exit has not ended it already).
stop_swtpm() {
    if [ -n "$swtpm" ] && kill -0 "$swtpm" 2>/dev/null; then
        kill "$swtpm" 2>/dev/null || true
    fi
    if [ -n "$swtpm" ]; then
        wait "$swtpm" 2>/dev/null || true
    fi
    swtpm=
}

# start_swtpm: the server's TPM 2.0 (Debian's swtpm, state in $TPM_DIR; its PCRs reset at
# each power-on), serving QEMU on $RUN/swtpm.sock; it ends when QEMU disconnects.
start_swtpm() {
    stop_swtpm
    mkdir -p "$TPM_DIR"
    rm -f "$RUN/swtpm.sock"
    swtpm socket --tpm2 --tpmstate "dir=$TPM_DIR" --ctrl "type=unixio,path=$RUN/swtpm.sock" \
        --terminate --log "file=$RUN/swtpm.log" &
    swtpm=$!
    local tries=100
    while [ ! -S "$RUN/swtpm.sock" ] && [ "$tries" -gt 0 ]; do
        sleep 0.1
        tries=$((tries - 1))
    done
    [ -S "$RUN/swtpm.sock" ] || { echo "FAILED: swtpm did not start (log: $RUN/swtpm.log)" >&2; exit 1; }
}

# boot <name>: starts QEMU on $DISK in the background, with $OVMF_VARS and a TPM (swtpm,
# state in $TPM_DIR); console in $RUN/serial-<name>.log.
boot() {
    LOG=$RUN/serial-$1.log
    : >"$LOG"
    boot_started=$(date +%s)
    start_swtpm
    qemu-system-x86_64 \
        -accel tcg -machine q35 -cpu "$QEMU_CPU" -m 3072 -smp 2 \
        -nodefaults -display none -no-reboot -monitor none -serial "file:$LOG" \
        -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
        -drive "if=pflash,format=raw,file=$OVMF_VARS" \
        -drive "if=none,id=disk0,format=raw,file=$DISK" "${DISK_QEMU[@]}" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$API_PORT-:8450,hostfwd=tcp:127.0.0.1:$CTRL_PORT-:9999,hostfwd=tcp:127.0.0.1:$CONSOLE_PORT-:9998" \
        -device virtio-net-pci,netdev=n0 \
        -chardev "socket,id=chrtpm,path=$RUN/swtpm.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm \
        -device tpm-tis,tpmdev=tpm0 "${EXTRA_QEMU[@]}" &
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
    # The test hook (S99) starts after the agent (S50) and the update check (S60): a command
    # sent before its nc listens reaches a closed port (QEMU's forward accepts, then closes:
    # no answer, and the command never ran). Since the agent waits for its first Xen guest's
    # Ready before it listens, S50 ends late and S99 can start after the pool is ready; its
    # console line comes before nc listens. So: ask `ping` until it answers.
    if hook_answers 300; then
        pass "boot $1: the test hook answers after $(($(date +%s) - boot_started))s"
    else
        fail "boot $1: the test hook did not answer within 300 s (console: $LOG)"
    fi
}

# hook_answers <seconds>: until the test hook answers `ping`.
hook_answers() {
    local deadline=$(($(date +%s) + $1))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        case "$(hook ping)" in *pong*rc=0*) return 0 ;; esac
        kill -0 "$qemu" 2>/dev/null || return 1
        sleep 2
    done
    return 1
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
    if [ -z "$out" ]; then
        # No answer at all: the hook's BusyBox shell died (README.md, the emulation fault),
        # not verify. Asked once more; an answer other than rc=0 still fails.
        echo "note: boot $1: the test hook gave no answer to verify; asking again" >&2
        out=$(hook verify)
    fi
    if printf '%s\n' "$out" | grep -qx 'rc=0'; then
        pass "boot $1: dom0-agent verify passes"
    else
        fail "boot $1: dom0-agent verify: $(printf '%s' "$out" | tr '\n' '|')"
    fi
}

# appliance_setup <OUT> <run directory name>: sets started, OUT (absolute) and RUN
# (OUT/<name>, made afresh); builds the image into OUT unless SKIP_BUILD=1; checks the
# forwarded ports are free; prepares the run's disk.
appliance_setup() {
    started=$(date +%s)
    OUT=$1
    if [ "${SKIP_BUILD:-0}" != 1 ]; then
        tests/appliance/build-image.sh "$OUT"
    else
        ensure_appliance_packages
    fi
    OUT=$(cd "$OUT" && pwd)
    RUN=$OUT/$2
    rm -rf "$RUN"
    mkdir -p "$RUN"
    ports_free
    prepare_disk
}

# ports_free: the forwarded host ports are not taken.
ports_free() {
    local port
    for port in "$API_PORT" "$CTRL_PORT" "$CONSOLE_PORT"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "FAILED: 127.0.0.1:$port is in use (set API_PORT / CTRL_PORT)" >&2
            exit 1
        fi
    done
}

# expected_pcrs <grub.cfg> <out>: the expected PCR 8/9 values (buildroot/board/mayfly/
# expected-pcrs.py, as post-image.sh computes them) for the test's grub.cfg, whose general
# entries also load the stand-in initramfs (measured like any module2 file, with an empty
# module command line).
expected_pcrs() {
    python3 buildroot/board/mayfly/expected-pcrs.py "$1" \
        --file /xen-a="$OUT/images/xen" --file /xen-b="$OUT/images/xen" \
        --file /vmlinux-a="$OUT/images/vmlinux.stripped" \
        --file /vmlinux-b="$OUT/images/vmlinux.stripped" \
        --file /standin-initramfs.cpio.gz="$OUT/images/standin-initramfs.cpio.gz" >"$2"
}

# pcrs_read: PCR 8 and 9 read in dom0, as "pcr8=<hex> pcr9=<hex>" (lower case).
pcrs_read() {
    local out
    out=$(hook pcrs)
    if [ -z "$out" ]; then
        # No answer at all: the hook's BusyBox shell died (README.md, the emulation fault), not
        # tpm2_pcrread. Asked once more; any answer is then judged as it is.
        echo "note: the test hook gave no answer to pcrs; asking again" >&2
        out=$(hook pcrs)
    fi
    printf '%s\n' "$out" | awk '$1 == "8" && $2 == ":" { p8 = tolower(substr($3, 3)) }
        $1 == "9" && $2 == ":" { p9 = tolower(substr($3, 3)) }
        END { if (p8 != "" && p9 != "") printf "pcr8=%s pcr9=%s\n", p8, p9 }'
}

# pcrs_expected <file> <state>: "pcr8=… pcr9=…" of the line for <state> (e.g.
# "slot=a try=- tries=0").
pcrs_expected() {
    grep "^state $2 " "$1" | grep -oE 'pcr8=[0-9a-f]{64} pcr9=[0-9a-f]{64}'
}

# summary <name>: the last line, with the time since appliance_setup; exit 1 on any failure.
summary() {
    local elapsed=$(($(date +%s) - started))
    if [ "$failures" -gt 0 ]; then
        echo "$1: $((checks - failures)) passed, $failures failed (${elapsed}s; consoles in $RUN)"
        exit 1
    fi
    echo "$1: $checks passed, 0 failed (${elapsed}s)"
}

# ---- The TPM-sealed signing key ([key] source = "tpm" in the image's agent.toml).

# up_refused <name> <reason regex>: boots; the agent must refuse to sign: S50mayfly-agent
# reports exit code 5, and the agent's own error (shown on the console from its log) matches
# <reason regex>. Nothing listens on the API. Checks the boot's PCRs are readable too (the
# hook runs without the agent).
up_refused() {
    boot "$1"
    if ! wait_line 'S50mayfly-agent: (dom0-agent refused to sign|listening on port 8450)' "$BOOT_TIMEOUT"; then
        fail "boot $1: the agent neither refused nor listened within ${BOOT_TIMEOUT}s (console: $LOG)"
        return 1
    fi
    if grep -qa 'S50mayfly-agent: listening on port 8450' "$LOG"; then
        fail "boot $1: the agent started (it must refuse to sign): $(health)"
        return 1
    fi
    # S50 prints the agent log's last lines right after its own line.
    wait_line 'dom0-agent: error: refusing to sign' 30 || true
    local why
    why=$(tr -d '\r' <"$LOG" | grep -a 'dom0-agent: error: refusing to sign' | head -n 1)
    if grep -qa 'S50mayfly-agent: dom0-agent refused to sign (exit code 5)' "$LOG" &&
        printf '%s\n' "$why" | grep -qE "$2"; then
        pass "boot $1: the agent refuses to sign (exit code 5) and says why: ${why#*refusing to sign: }"
    else
        fail "boot $1: no refusal for /$2/ on the console: $(grep -aE 'S50mayfly-agent|dom0-agent: error' "$LOG" | tr -d '\r' | tr '\n' '|')"
    fi
    local h
    h=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "$API/v1/health" 2>/dev/null || true)
    if [ "$h" = 000 ]; then
        pass "boot $1: nothing serves the client API"
    else
        fail "boot $1: the client API answered $h"
    fi
    # The rest of the boot (the update's boot check, then the test hook) goes on without the
    # agent: the checks that follow talk to the hook.
    wait_line 'MAYFLY-HOOK: listening' 300 || fail "boot $1: the test hook did not start (console: $LOG)"
}

# key_is_tpm <boot>: GET /v1/health's key section and `mayfly hw-check` inside both say the
# ledger's key is the TPM-sealed one.
key_is_tpm() {
    local h hw
    h=$(health)
    if printf '%s' "$h" | grep -qE '"key":\{[^}]*"source":"tpm"' &&
        printf '%s' "$h" | grep -qE '"key":\{[^}]*"sealed_file":"signing.sealed'; then
        pass "boot $1: health says the key source is tpm ($(printf '%s' "$h" | grep -oE '"key":\{[^}]*\}'))"
    else
        fail "boot $1: health key section: $(printf '%s' "$h" | grep -oE '"key":\{[^}]*\}' || printf '%s' "$h")"
    fi
    hw=$(hook hwcheck)
    if printf '%s' "$hw" | tr -d '\n ' | grep -qE '"key_source":\{[^}]*"source":"tpm"'; then
        pass "boot $1: mayfly hw-check inside says the key source is tpm"
    else
        fail "boot $1: hw-check key_source: $(printf '%s' "$hw" | tr -d '\n' | grep -oE '"key_source":[^}]*\}' || printf '%s' "${hw:0:400}")"
    fi
}

# admin <mayfly admin arguments>: the host's `mayfly admin`, signed by the test image's first
# admin (one signature: read-only commands), through the hook's console relay. Needs
# APPLIANCE_ID.
admin() {
    local op=$1
    shift
    target/release/mayfly admin "$op" --key "$OUT/build/test-admin-1.key" \
        --tcp "127.0.0.1:$CONSOLE_PORT" --appliance "$APPLIANCE_ID" "$@"
}

# audit_field <event> <field>: the field of every audit record <event> (exported from the
# host through the console), one a line.
audit_field() {
    rm -f "$RUN/audit.jsonl"
    admin audit export --out "$RUN/audit.jsonl" >/dev/null 2>&1 || true
    [ -s "$RUN/audit.jsonl" ] && python3 tests/appliance/console.py audit-field "$RUN/audit.jsonl" "$1" "$2"
}

# attest <boot> <expected-pcrs file> <state>: `mayfly admin attest` from the host: the quote
# verifies against the file's state with the attestation key pinned from the first tpm.quote
# audit record (provisioning); then one quote changed on its way (console.py tamper) is
# refused.
attest() {
    local out rc ak
    APPLIANCE_ID=$(python3 tests/appliance/console.py hello "$CONSOLE_PORT" 2>&1) || {
        fail "boot $1: the console relay: $APPLIANCE_ID"
        return 1
    }
    ak=$(audit_field tpm.quote ak | head -n 1)
    if [ "${#ak}" != 130 ]; then
        fail "boot $1: no attestation key in a tpm.quote audit record ('$ak')"
        return 1
    fi
    pass "boot $1: the boot's tpm.quote audit record names the attestation key (pinned: ${ak:0:16}…)"
    rc=0
    out=$(admin attest --expected-pcrs "$2" --ak "$ak" 2>&1) || rc=$?
    if [ "$rc" = 0 ] && printf '%s\n' "$out" | grep -qF "(state $3" &&
        printf '%s\n' "$out" | grep -qE '^  PCR 7 = [0-9a-f]{64} \(attested'; then
        pass "boot $1: mayfly admin attest from the host verifies against the expected PCRs ($3)"
    else
        fail "boot $1: attest (rc $rc): $(printf '%s' "$out" | tr '\n' '|')"
    fi
    # A quote changed on its way: one connection through a relay that alters it.
    local relay_port=$((CONSOLE_PORT - 10)) relay
    rm -f "$RUN/tamper.ready"
    python3 tests/appliance/console.py tamper "$CONSOLE_PORT" "$relay_port" "$RUN/tamper.ready" \
        >"$RUN/tamper.out" 2>&1 &
    relay=$!
    local tries=100
    while [ ! -e "$RUN/tamper.ready" ] && [ "$tries" -gt 0 ]; do sleep 0.1; tries=$((tries - 1)); done
    rc=0
    out=$(target/release/mayfly admin attest --key "$OUT/build/test-admin-1.key" \
        --tcp "127.0.0.1:$relay_port" --appliance "$APPLIANCE_ID" \
        --expected-pcrs "$2" --ak "$ak" 2>&1) || rc=$?
    wait "$relay" 2>/dev/null || true
    if [ "$rc" = 1 ] && grep -q 'changed the quote' "$RUN/tamper.out" &&
        printf '%s\n' "$out" | grep -q 'NOT ATTESTED'; then
        pass "boot $1: a quote altered on its way is refused: $(printf '%s' "$out" | grep 'NOT ATTESTED' | head -n 1)"
    else
        fail "boot $1: tampered attest (rc $rc, relay: $(cat "$RUN/tamper.out")): $(printf '%s' "$out" | tr '\n' '|')"
    fi
}
