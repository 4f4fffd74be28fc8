#!/usr/bin/env bash
# Runs the Mayfly appliance on its embedded default: `dom0-agent serve` on the sandbox
# backend (a paused zygote, one copy-on-write clone per transaction, confined by namespaces,
# seccomp and rlimits; process isolation, not a VM), with the client API on 127.0.0.1:8450
# and the ledger in ./mayfly-data. It prints how to send a transaction with curl.
# Needs root (namespaces, chroot, dropping clones to uid 65534). Stop with Ctrl-C.
# Extra arguments go to `dom0-agent serve` (see `--help`); the template is the static build
# made here (`--zygote`, see scripts/build-zygote.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_build_tools
command -v curl >/dev/null || apt_install curl
cargo build --release --locked -p dom0-agent
# The sandbox template, statically linked: cheaper to fork per transaction (see the script).
zygote_dir=${CARGO_TARGET_DIR:-target}/zygote-static
scripts/build-zygote.sh "$zygote_dir"
data_dir=${MAYFLY_DATA_DIR:-./mayfly-data}
agent=${CARGO_TARGET_DIR:-target}/release/dom0-agent
if [ "$(id -u)" -eq 0 ]; then
    exec "$agent" serve --data-dir "$data_dir" --zygote "$zygote_dir/mayfly-zygote" "$@"
else
    exec sudo "$agent" serve --data-dir "$data_dir" --zygote "$zygote_dir/mayfly-zygote" "$@"
fi
