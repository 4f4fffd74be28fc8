#!/usr/bin/env bash
# Runs the Mayfly appliance on its embedded default. Until the transaction service lands,
# that is the ledger demo: bank transfers from several threads, each a durable, signed,
# hash-chained checkpoint, then a full verification of both chains.
# Extra arguments go to `dom0-agent demo` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_build_tools
cargo build --release --locked -p dom0-agent
data_dir=${MAYFLY_DATA_DIR:-./mayfly-data}
./target/release/dom0-agent demo --data-dir "$data_dir" "$@"
echo
echo "Verify the ledger yourself:  ./target/release/dom0-agent verify --data-dir $data_dir"
echo "Its public key:              ./target/release/dom0-agent export-key --data-dir $data_dir"
