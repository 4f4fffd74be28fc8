# shellcheck shell=bash
# HTTP helpers of the Xen-in-QEMU suite's host-side phases (sourced; set API first).
# Every wait is bounded.

# wait_ready: polls /v1/health (at most 180 s) until the pool has a ready domain, so that
# each transaction (and its agent_tx_ms) is a hand-out from the pool, not a wait for a
# domain to boot.
wait_ready() {
    local deadline=$(($(date +%s) + 180))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        curl -sS --max-time 10 "$API/v1/health" 2>/dev/null | grep -qE '"ready":[1-9]' && return 0
        sleep 1
    done
    return 1
}

# post <json> [no-wait]: waits for a ready domain (unless no-wait), then prints "<status>
# <body>". A 503 (no ready domain yet) is retried as its Retry-After says, for at most
# 180 s. Each call uses its own body file, so concurrent callers do not mix answers.
post() {
    local deadline=$(($(date +%s) + 180)) code out body
    body=$(mktemp)
    [ "${2:-}" = no-wait ] || wait_ready || echo "no ready domain within 180 s" >&2
    while :; do
        out=$(curl -sS --max-time 180 -o "$body" -w '%{http_code} %{time_total}' \
            -H 'Content-Type: application/json' -X POST "$API/v1/transactions" -d "$1" ||
            echo "000 0")
        code=${out%% *}
        if [ "$code" != 503 ] || [ "$(date +%s)" -ge "$deadline" ]; then break; fi
        sleep 0.2
    done
    # Latency of the answered attempt (to stderr: the caller captures stdout).
    [ "$code" = 200 ] && echo "agent_tx_ms=$(echo "${out#* }" | awk '{ printf "%.1f", $1 * 1000 }')" >&2
    echo "$code $(cat "$body" 2>/dev/null)"
    rm -f "$body"
}

# json_field <name>: the first "name":value of the JSON on stdin (string or number), or nothing.
json_field() {
    grep -oE "\"$1\":(\"[^\"]*\"|[0-9]+)" | head -n 1 | cut -d: -f2- | tr -d '"'
    return 0
}

# sustain_kv <seconds> <dir> <key-prefix>: the sustained workload both guests are measured
# with (the same handler on both sides, so the ratio compares guests, not workloads): 4
# clients, each putting its own fresh kv keys back to back for <seconds>, every put a fresh
# domain. Each answer's "<code> <status>" goes to <dir>/client-<c>. Prints
# "<committed> <answered> <elapsed seconds>" when the last client returned.
sustain_kv() {
    local seconds=$1 dir=$2 prefix=$3 started elapsed c
    kv_client() {
        local c=$1 end=$(($(date +%s) + seconds)) i=0 r
        while [ "$(date +%s)" -lt "$end" ]; do
            r=$(post "{\"handler\":\"kv\",\"payload\":{\"op\":\"put\",\"key\":\"kv/$prefix$c-$i\",\"value\":\"x\"}}" no-wait 2>/dev/null)
            echo "${r%% *} $(echo "$r" | json_field status)" >>"$dir/client-$c"
            i=$((i + 1))
        done
    }
    started=$(date +%s.%N)
    for c in 0 1 2 3; do kv_client "$c" & done
    wait
    elapsed=$(echo "$started $(date +%s.%N)" | awk '{ printf "%.1f", $2 - $1 }')
    echo "$(cat "$dir"/client-* 2>/dev/null | grep -c '^200 committed' || true)" \
        "$(cat "$dir"/client-* 2>/dev/null | grep -c . || true)" "$elapsed"
}
