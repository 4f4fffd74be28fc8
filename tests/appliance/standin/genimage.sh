#!/usr/bin/env bash
# Stand-in for Buildroot's support/scripts/genimage.sh: runs genimage on the images
# directory with an empty root path, as Buildroot's does.
set -euo pipefail
if [ "${1:-}" != -c ] || [ -z "${2:-}" ]; then
    echo "usage: $0 -c GENIMAGE_CONFIG_FILE" >&2
    exit 1
fi
: "${BUILD_DIR:?}" "${BINARIES_DIR:?}"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
rm -rf "$BUILD_DIR/genimage.tmp"
genimage --rootpath "$root" --tmppath "$BUILD_DIR/genimage.tmp" --inputpath "$BINARIES_DIR" \
    --outputpath "$BINARIES_DIR" --config "$2"
