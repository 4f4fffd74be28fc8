#!/usr/bin/env bash
# The host-side HTTP phase of the Xen-in-QEMU suite against the agent serving the Mayfly PV
# guest kernel (`serve --backend xen --xen-guest mayfly`: every domain built in-process, no
# xl, no xenstore). Run by run.sh while dom0 waits on its control port.
#
# Usage: tests/xen-qemu/agent-mayfly.sh HOST:PORT [SUSTAIN_S]
# Checks: kv put and get; open_account and transfer; 50 transactions in 50 distinct domains;
# two domains built from the same image draw different random tokens (the clone hazard);
# the hostile guests of the guest's test.* handlers (a ring violation -> 500, recorded and
# audited; an event-channel flood; grant and event-channel operations naming dom0 and other
# domains, all refused by Xen; two guests spinning for ever, ended by the transaction
# timeout, while 8 honest transactions commit beside them);
# 4 concurrent clients moving money between 4 accounts (TRANSFERS each) with the bank's total
# unchanged; no domain in use afterwards. Measures: build -> Ready is dom0's side; here the
# sustained fresh-domain-per-transaction rate over SUSTAIN_S seconds (default 60) with 4
# clients putting kv keys, the Linux guest's workload too (`mayfly_sustained_tx_s=`). Exit 1
# on any failure.
set -euo pipefail
API=http://$1
SUSTAIN_S=${2:-60}
failures=0
fail() { echo "FAIL (agent-mayfly): $*"; failures=$((failures + 1)); }
pass() { echo "ok:   (agent-mayfly) $*"; }
# shellcheck source=tests/xen-qemu/http.sh
source "$(dirname "$0")/http.sh"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

health=
for _ in $(seq 1 240); do
    health=$(curl -sS --max-time 10 "$API/v1/health" 2>/dev/null || true)
    echo "$health" | grep -qE '"ready":[1-9]' && break
    sleep 0.5
done
echo "health: $health"
echo "$health" | grep -q '"backend":"xen"' || fail "backend is not xen: $health"

domains=()
committed() { case $1 in 200*'"status":"committed"'*) return 0 ;; *) return 1 ;; esac; }
r=$(post '{"handler":"kv","payload":{"op":"put","key":"kv/pv","value":"x"}}')
echo "put: $r"
if committed "$r"; then pass "kv put committed"; else fail "kv put: $r"; fi
domains+=("$(echo "$r" | json_field domain_id)")
r=$(post '{"handler":"kv","payload":{"op":"get","key":"kv/pv"}}')
echo "get: $r"
case $r in 200*'"value":"x"'*) pass "kv get sees the committed put" ;; *) fail "kv get: $r" ;; esac
domains+=("$(echo "$r" | json_field domain_id)")
total=0
for name in pva pvb pvc pvd; do
    r=$(post "{\"handler\":\"open_account\",\"payload\":{\"name\":\"$name\",\"balance\":1000}}")
    committed "$r" || fail "open_account $name: $r"
    domains+=("$(echo "$r" | json_field domain_id)")
    total=$((total + 1000))
done
pass "open_account x4 committed"
r=$(post '{"handler":"transfer","payload":{"from":"pva","to":"pvb","amount":10}}')
echo "transfer: $r"
if committed "$r" && echo "$r" | grep -q '"balance":990'; then pass "transfer committed"; else fail "transfer: $r"; fi
domains+=("$(echo "$r" | json_field domain_id)")

# 50 transactions, each in its own fresh domain.
for i in $(seq 1 50); do
    r=$(post "{\"handler\":\"kv\",\"payload\":{\"op\":\"put\",\"key\":\"kv/pv$i\",\"value\":\"$i\"}}" no-wait)
    committed "$r" || fail "kv put $i: $r"
    domains+=("$(echo "$r" | json_field domain_id)")
done
n=$(printf '%s\n' "${domains[@]}" | grep -c . | tr -d ' ')
distinct=$(printf '%s\n' "${domains[@]}" | grep . | sort -u | wc -l | tr -d ' ')
if [ "$n" -ge 57 ] && [ "$n" = "$distinct" ]; then
    pass "$n transactions in $distinct distinct domains (50 in a row among them)"
else
    fail "domain ids repeat or are missing: $n transactions, $distinct distinct"
fi

# The clone hazard: two fresh domains from the same image draw different tokens.
t1=$(post '{"handler":"token","payload":{"bytes":16}}')
t2=$(post '{"handler":"token","payload":{"bytes":16}}')
k1=$(echo "$t1" | json_field token)
k2=$(echo "$t2" | json_field token)
d1=$(echo "$t1" | json_field domain_id)
d2=$(echo "$t2" | json_field domain_id)
echo "tokens: $k1 (domain $d1) $k2 (domain $d2)"
if [ "${#k1}" = 32 ] && [ "${#k2}" = 32 ] && [ "$k1" != "$k2" ] && [ "$d1" != "$d2" ]; then
    pass "two domains from the same image drew different random tokens"
else
    fail "tokens: $t1 | $t2"
fi

# Hostile guests (the guest's test.* handlers).
audit_before=$(curl -sS --max-time 10 "$API/v1/health" | json_field audit_seq || true)
r=$(post '{"handler":"test.bad_ring","payload":null}')
echo "bad_ring: $r"
case $r in 500*) pass "ring written outside the protocol: 500" ;; *) fail "test.bad_ring: $r" ;; esac
tx=$(echo "$r" | json_field tx_id)
shown=$(curl -sS --max-time 10 "$API/v1/transactions/$tx" || true)
if echo "$shown" | grep -qiE 'violation|protocol'; then
    pass "recorded as a protocol violation"
else
    fail "test.bad_ring not recorded as a protocol violation: $shown"
fi
audit=$(curl -sS --max-time 10 "$API/v1/health" | json_field audit_seq || true)
if [ "${audit:-0}" -gt "${audit_before:-0}" ]; then pass "violation audited (audit_seq ${audit_before} -> ${audit})"; else fail "violation not audited"; fi
r=$(post '{"handler":"test.evtchn_flood","payload":null}')
echo "evtchn_flood: $r"
# A guest that rings its event channel without publishing requests costs the agent a bounded
# number of wake-ups (docs/formats.md §2.2): the transaction ends as a doorbell flood, a
# protocol violation, and the agent goes on serving.
case $r in
500*'doorbell flood'*) pass "event-channel flood: ended as a doorbell flood (500) after a bounded number of wake-ups" ;;
*) fail "test.evtchn_flood: $r" ;;
esac
r=$(post '{"handler":"kv","payload":{"op":"put","key":"kv/after-flood","value":"ok"}}')
if committed "$r"; then pass "the agent kept serving after the flood"; else fail "after the flood: $r"; fi
r=$(post '{"handler":"test.foreign_ops","payload":null}')
echo "foreign_ops: $r"
# (The agent re-encodes the result: its keys come sorted, so each is looked for alone.)
allowed=0
for k in granted bound allocated setup; do
    v=$(echo "$r" | json_field "$k")
    [ "$v" = 0 ] || allowed=$((allowed + 1))
done
tried=$(echo "$r" | json_field tried)
live=$(echo "$r" | json_field live_named)
# What Xen answered, per operation (result code: count): the evidence that live domains
# were named (alloc_unbound: EPERM -1 for an existing domain, ESRCH -3 for none).
answers=$(echo "$r" | grep -oE '"(map|bind|alloc|setup)_rc":\{[^}]*\}' | tr '\n' ' ')
echo "foreign_ops answers: $answers"
if committed "$r" && [ "$allowed" = 0 ] && [ "${tried:-0}" -gt 1000 ] && [ "${live:-0}" -ge 1 ]; then
    pass "grant/event-channel operations naming dom0 and $live other live domain(s) (a sweep of domids 1..1024): all $tried refused by Xen ($answers)"
else
    fail "test.foreign_ops: $r"
fi
r=$(post '{"handler":"kv","payload":{"op":"get","key":"kv/pv"}}')
case $r in 200*'"value":"x"'*) pass "the agent and ledger serve as before after the foreign operations" ;; *) fail "kv get after test.foreign_ops: $r" ;; esac
# Two guests spinning for ever beside honest transactions: each spinner weighs less than
# dom0 in the credit scheduler ([xen] guest_weight, 128 against dom0's 256 by default; no
# cap: credit2's caps crash Xen 4.17), so the agent and honest guests keep running; the
# agent's transaction timeout (tx_timeout_ms, 60 s in the shipped agent.toml) ends the
# spinners.
spin_from=$(date +%s)
spinners=()
for s in 1 2; do
    post '{"handler":"test.spin","payload":null}' no-wait >"$WORK/spin-$s" 2>/dev/null &
    spinners+=($!)
done
# Both must be running (in use) before the honest transactions start (bounded: 60 s).
for _ in $(seq 1 120); do
    curl -sS --max-time 10 "$API/v1/health" 2>/dev/null | grep -qE '"in_use":([2-9]|[1-9][0-9])' && break
    sleep 0.5
done
spinning() { kill -0 "${spinners[0]}" 2>/dev/null && kill -0 "${spinners[1]}" 2>/dev/null; }
beside=0
honest_ms=()
if spinning; then
    for i in $(seq 1 8); do
        r=$(post "{\"handler\":\"kv\",\"payload\":{\"op\":\"put\",\"key\":\"kv/beside-spin$i\",\"value\":\"$i\"}}" no-wait 2>"$WORK/honest-ms")
        if committed "$r" && spinning; then
            beside=$((beside + 1))
            honest_ms+=("$(sed -n 's/^agent_tx_ms=//p' "$WORK/honest-ms")")
        else
            fail "honest kv put $i beside two spinning guests: $r (spinners still running: $(spinning && echo yes || echo no))"
            break
        fi
    done
else
    fail "the two test.spin transactions were not both running: $(cat "$WORK"/spin-* | tr '\n' '|')"
fi
median_ms=$(printf '%s\n' "${honest_ms[@]}" | grep . | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }')
echo "beside_spin_committed=$beside beside_spin_median_ms=${median_ms:-n/a}"
if [ "$beside" = 8 ]; then
    pass "two guests spinning for ever: 8 honest transactions committed while both spun (median ${median_ms} ms)"
fi
wait "${spinners[@]}" || true
spun=$(($(date +%s) - spin_from))
for s in 1 2; do
    r=$(cat "$WORK/spin-$s")
    echo "spin $s: $r"
    case $r in
        500*) [ "$spun" -ge 30 ] || fail "test.spin $s failed after only $spun s: $r" ;;
        *) fail "test.spin $s: $r" ;;
    esac
done
case "$(cat "$WORK"/spin-*)" in
    *500*500*) [ "$spun" -ge 30 ] && pass "guests spinning for ever: ended by the transaction timeout (500 after $spun s)" ;;
esac
r=$(post '{"handler":"kv","payload":{"op":"get","key":"kv/pv"}}')
case $r in 200*'"value":"x"'*) pass "the agent still serves after the hostile guests" ;; *) fail "kv get after the hostile guests: $r" ;; esac

# 4 concurrent clients, each moving money around the 4 accounts (TRANSFERS each, default 6):
# every transfer runs in a fresh domain; conflicts abort (never lose or make money). Bounded
# by count, not time: the throughput is measured on kv puts below, as on the Linux guest.
TRANSFERS=${TRANSFERS:-6}
client() {
    local c=$1 i from to r
    local names=(pva pvb pvc pvd)
    for ((i = 0; i < TRANSFERS; i++)); do
        from=${names[$(((c + i) % 4))]}
        to=${names[$(((c + i + 1) % 4))]}
        r=$(post "{\"handler\":\"transfer\",\"payload\":{\"from\":\"$from\",\"to\":\"$to\",\"amount\":1}}" no-wait 2>/dev/null)
        echo "${r%% *} $(echo "$r" | json_field status)" >>"$WORK/transfer-$c"
    done
}
for c in 0 1 2 3; do client "$c" & done
wait
done_transfers=$(cat "$WORK"/transfer-* | grep -c '^200 committed' || true)
all_transfers=$(cat "$WORK"/transfer-* | grep -c . || true)
[ "$done_transfers" -ge 4 ] || fail "4 concurrent clients committed only $done_transfers transfers: $(cat "$WORK"/transfer-* | sort | uniq -c | tr '\n' ' ')"
sum=0
for name in pva pvb pvc pvd; do
    r=$(post "{\"handler\":\"balance\",\"payload\":{\"name\":\"$name\"}}")
    b=$(echo "$r" | grep -oE '"balance":[0-9]+' | head -n 1 | cut -d: -f2)
    [ -n "$b" ] || fail "balance $name: $r"
    sum=$((sum + ${b:-0}))
done
if [ "$sum" = "$total" ]; then
    pass "4 concurrent clients: $done_transfers transfers committed ($all_transfers answered), the bank's total is still $total"
else
    fail "the bank's total is $sum, expected $total"
fi

# The sustained rate: the same workload as the Linux guest's (http.sh's sustain_kv: 4
# clients, kv puts, SUSTAIN_S seconds), so the ratio compares guests, not workloads.
# Where the time goes: the agent's own counters (GET /metrics) before and after the run.
scrape() { curl -sS --max-time 20 "$API/metrics" >"$WORK/metrics-$1" 2>/dev/null || : >"$WORK/metrics-$1"; }
scrape before
mkdir -p "$WORK/kv"
read -r done_tx all_tx elapsed < <(sustain_kv "$SUSTAIN_S" "$WORK/kv" s)
scrape after
# breakdown: per phase (build, boot, wait, in_use, destroy) and per step of the builds, the
# number of times and the mean in ms over the run; the API's whole transactions, the ledger's group commits; the
# outcomes and domains; dom0's CPU time (Xen's count, all of dom0) against the wall time.
# (Both scrapes or none: a missing one would make every difference meaningless.)
[ -s "$WORK/metrics-before" ] && [ -s "$WORK/metrics-after" ] && awk -v wall="$elapsed" '
    FNR == 1 { f++ }
    /^#/ { next }
    { v[f, $1] = $2; names[$1] = 1 }
    END {
        for (n in names) d[n] = v[2, n] - v[1, n]
        split("build boot wait in_use destroy", ph, " ")
        for (i = 1; i <= 5; i++) {
            c = d["mayfly_xen_phase_seconds_count{phase=\"" ph[i] "\"}"]
            s = d["mayfly_xen_phase_seconds_sum{phase=\"" ph[i] "\"}"]
            printf "mayfly_phase %s n=%d total_s=%.2f mean_ms=%.1f\n", ph[i], c, s, (c ? 1000 * s / c : 0)
        }
        b = d["mayfly_xen_build_step_seconds_count"]
        split("create boot_info setup populate load boot release", st, " ")
        for (i = 1; i <= 7; i++) {
            s = d["mayfly_xen_build_step_seconds_sum{step=\"" st[i] "\"}"]
            printf "mayfly_phase build_step_%s n=%d total_s=%.2f mean_ms=%.1f\n", st[i], b, s, (b ? 1000 * s / b : 0)
        }
        c = d["mayfly_api_transaction_seconds_count"]; s = d["mayfly_api_transaction_seconds_sum"]
        printf "mayfly_phase api_transaction n=%d total_s=%.2f mean_ms=%.1f\n", c, s, (c ? 1000 * s / c : 0)
        c = d["mayfly_ledger_commit_seconds_count"]; s = d["mayfly_ledger_commit_seconds_sum"]
        printf "mayfly_phase ledger_group_commit n=%d total_s=%.2f mean_ms=%.1f\n", c, s, (c ? 1000 * s / c : 0)
        out = ""
        for (n in names) if (n ~ /^mayfly_api_transactions_total|^mayfly_pool_domains_total/ && d[n] != 0) out = out " " n "=" d[n]
        print "mayfly_counts" out
        cpu = d["mayfly_xen_dom0_cpu_seconds_total"]
        printf "mayfly_dom0_cpu cpu_s=%.2f wall_s=%.1f busy_pct=%.0f\n", cpu, wall, (wall ? 100 * cpu / wall : 0)
    }' "$WORK/metrics-before" "$WORK/metrics-after" ||
    echo "mayfly_phase: GET /metrics not read before and after the run: no breakdown"

rate=$(echo "$done_tx $elapsed" | awk '{ printf "%.2f", $1 / $2 }')
echo "mayfly_sustained_tx_s=$rate committed=$done_tx answered=$all_tx seconds=$elapsed clients=4 workload=kv-put"
[ "$done_tx" -ge 4 ] || fail "4 concurrent clients committed only $done_tx kv puts: $(cat "$WORK"/kv/client-* | sort | uniq -c | tr '\n' ' ')"
# The agent answers, then destroys the domain: the last one may still be in use for a
# moment. Poll (bounded) until none is.
for _ in $(seq 1 60); do
    health=$(curl -sS --max-time 10 "$API/v1/health" || true)
    echo "$health" | grep -q '"in_use":0' && break
    sleep 0.5
done
echo "health after: $health"
echo "$health" | grep -q '"in_use":0' || fail "domains still in use 30 s after the last answer: $health"
[ "$failures" -eq 0 ]
