#!/usr/bin/env bash
# The HTTP half of the Xen-in-QEMU suite: transactions through the agent's client API in
# dom0 (forwarded to the host by QEMU's user-mode network). Run by run.sh while dom0 waits.
#
# Usage: tests/xen-qemu/agent-phase.sh HOST:PORT
# Checks: committed results; a read sees the earlier write; every transaction ran in its
# own domain; a protocol-violating guest (test.bad_index) fails the transaction (500) and is
# audited; the pool has no domain in use afterwards. Exit 1 on any failure.
set -euo pipefail
API=http://$1
failures=0
fail() { echo "FAIL (agent): $*"; failures=$((failures + 1)); }
pass() { echo "ok:   (agent) $*"; }
# shellcheck source=tests/xen-qemu/http.sh
source "$(dirname "$0")/http.sh"

# The agent is listening; wait (bounded) until its pool has a ready domain.
for _ in $(seq 1 240); do
    health=$(curl -sS --max-time 10 "$API/v1/health" 2>/dev/null || true)
    echo "$health" | grep -qE '"ready":[1-9]' && break
    sleep 1
done
echo "health: $health"
echo "$health" | grep -q '"backend":"xen"' || fail "backend is not xen: $health"

domains=()
r=$(post '{"handler":"kv","payload":{"op":"put","key":"kv/a","value":"1"}}')
echo "put: $r"
case $r in 200*'"status":"committed"'*) pass "kv put committed" ;; *) fail "kv put: $r" ;; esac
domains+=("$(echo "$r" | json_field domain_id)")
r=$(post '{"handler":"kv","payload":{"op":"get","key":"kv/a"}}')
echo "get: $r"
case $r in 200*'"value":"1"'*) pass "kv get sees the committed put" ;; *) fail "kv get: $r" ;; esac
domains+=("$(echo "$r" | json_field domain_id)")
for i in 1 2 3; do
    r=$(post "{\"handler\":\"kv\",\"payload\":{\"op\":\"put\",\"key\":\"kv/n$i\",\"value\":\"$i\"}}")
    case $r in 200*) ;; *) fail "kv put $i: $r" ;; esac
    domains+=("$(echo "$r" | json_field domain_id)")
done
audit_before=$(curl -sS --max-time 10 "$API/v1/health" | json_field audit_seq || true)
r=$(post '{"handler":"test.bad_index","payload":null}')
echo "violation: $r"
case $r in 500*) pass "protocol-violating guest: transaction failed (500)" ;; *) fail "test.bad_index: $r" ;; esac
bad=$(echo "$r" | json_field domain_id)
[ -n "$bad" ] && domains+=("$bad")
tx=$(echo "$r" | json_field tx_id)
shown=$(curl -sS --max-time 10 "$API/v1/transactions/$tx" || true)
echo "violation record: $shown"
if echo "$shown" | grep -qiE 'violation|protocol'; then
    pass "the failure is recorded as a protocol violation"
else
    fail "transaction $tx not recorded as a protocol violation: $shown"
fi
uniq_count=$(printf '%s\n' "${domains[@]}" | grep -c . | tr -d ' ')
distinct=$(printf '%s\n' "${domains[@]}" | grep . | sort -u | wc -l | tr -d ' ')
if [ "$uniq_count" -ge 5 ] && [ "$uniq_count" = "$distinct" ]; then
    pass "$uniq_count transactions in $distinct distinct domains (${domains[*]})"
else
    fail "domain ids: ${domains[*]}"
fi
# Sustained fresh-domain-per-transaction rate on the Linux guest, the baseline of the Mayfly
# guest's (agent-mayfly.sh, the same workload: http.sh's sustain_kv, 4 clients, kv puts) for
# SUSTAIN_S seconds (default 60; 0 skips).
SUSTAIN_S=${SUSTAIN_S:-60}
if [ "$SUSTAIN_S" -gt 0 ]; then
    WORK=$(mktemp -d)
    read -r done_tx all_tx elapsed < <(sustain_kv "$SUSTAIN_S" "$WORK" s)
    echo "linux_sustained_tx_s=$(echo "$done_tx $elapsed" | awk '{ printf "%.3f", $1 / $2 }') committed=$done_tx answered=$all_tx seconds=$elapsed clients=4 workload=kv-put"
    rm -rf "$WORK"
fi
# The agent answers, then destroys the domain: poll (bounded) until none is in use.
for _ in $(seq 1 60); do
    health=$(curl -sS --max-time 10 "$API/v1/health" || true)
    echo "$health" | grep -q '"in_use":0' && break
    sleep 0.5
done
echo "health after: $health"
echo "$health" | grep -q '"in_use":0' || fail "domains still in use: $health"
audit=$(echo "$health" | json_field audit_seq)
if [ "${audit:-0}" -gt "${audit_before:-0}" ]; then
    pass "audited: audit_seq ${audit_before:-?} -> $audit across the violation"
else
    fail "no audit record for the violation (audit_seq ${audit_before:-?} -> ${audit:-?})"
fi
# Every domain the pool created is either still pooled or destroyed: none is kept around
# (the suite's policy destroys, rather than quarantines, a violating domain).
created=$(echo "$health" | json_field created)
destroyed=$(echo "$health" | json_field destroyed)
ready=$(echo "$health" | json_field ready)
in_use=$(echo "$health" | json_field in_use)
if [ "${destroyed:-0}" -ge 6 ] && [ "$((created - destroyed))" = "$((ready + in_use))" ]; then
    pass "pool: created $created, destroyed $destroyed, ready $ready, in use $in_use (violating domain destroyed)"
else
    fail "pool counters: $health"
fi
[ "$failures" -eq 0 ]
