#!/usr/bin/env bash
# Regenerates the bindings into a temporary directory and fails if they differ from the
# checked-in src/generated/ (the headers, bindgen or the generator changed without the
# output being committed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$here/generate.sh" "$tmp"
if ! diff -ru "$here/src/generated" "$tmp"; then
    echo "check-drift.sh: the checked-in bindings differ from freshly generated ones;" >&2
    echo "  run bindgen/xen-sys/generate.sh and commit src/generated/" >&2
    exit 1
fi
echo "bindings match the headers"
