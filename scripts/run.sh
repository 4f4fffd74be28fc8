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
# On a pure cgroup v2 host run by systemd (a stock Debian 12), the agent puts its clones in a
# cgroup of their own under its own cgroup, which the kernel allows only in a cgroup that
# holds no other process and has the cpu, memory and pids controllers delegated: a login
# session's scope has neither. So there it runs in a transient scope of its own with
# Delegate=yes, as a service would (dom0-agent/sandbox/README.md). Elsewhere (cgroup v1 or
# hybrid hosts, containers without systemd) it runs as it is.
launch=()
if [ -f /sys/fs/cgroup/cgroup.controllers ] && [ -d /run/systemd/system ] &&
    command -v systemd-run >/dev/null; then
    launch=(systemd-run --scope --quiet --unit "mayfly-agent-$$" -p Delegate=yes --)
fi
[ "$(id -u)" -eq 0 ] || launch=(sudo "${launch[@]}")
exec "${launch[@]}" "$agent" serve --data-dir "$data_dir" --zygote "$zygote_dir/mayfly-zygote" "$@"
