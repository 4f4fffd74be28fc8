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
