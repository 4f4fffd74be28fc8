#!/usr/bin/env bash
# Produces and checks the vendored crates the appliance's Rust packages build from offline.
#
#   vendor-crates.sh vendor DIR   cargo vendor the workspace's crates.io dependencies into DIR
#                                 (needs crates.io, or a cargo cache holding every crate)
#   vendor-crates.sh pin DIR      write buildroot/vendor.pin from DIR and Cargo.lock
#   vendor-crates.sh verify DIR   check DIR and Cargo.lock against buildroot/vendor.pin
#                                 (the mayfly-vendor package runs this before any build)
#   vendor-crates.sh check-lock   check only that the pin was made from today's Cargo.lock
#
# The pin holds two SHA-256 digests: of Cargo.lock, and of the vendored tree (every file's
# path and SHA-256, sorted; see tree_digest). Cargo.lock already pins each crate's version and
# the checksum of its .crate archive; the tree digest also pins the unpacked files, which
# cargo's own .cargo-checksum.json check alone cannot (a tampered file with a rewritten
# checksum file passes it).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
pin_file="$repo/buildroot/vendor.pin"

die() {
    echo "vendor-crates.sh: $*" >&2
    exit 1
}

lock_digest() {
    sha256sum "$repo/Cargo.lock" | cut -d' ' -f1
}

# SHA-256 over "<sha256>  ./<path>" lines of every file under $1, in byte order of the path.
tree_digest() {
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) |
        sha256sum | cut -d' ' -f1
}

pinned() {
    [ -f "$pin_file" ] || die "no $pin_file: run '$0 vendor DIR' and '$0 pin DIR'"
    awk -v key="$1" '$1 == key { print $2 }' "$pin_file"
}

check_lock() {
    local want have
    want=$(pinned cargo-lock-sha256)
    have=$(lock_digest)
    [ "$want" = "$have" ] ||
        die "Cargo.lock changed since the pin was made (pinned $want, now $have): run '$0 vendor DIR' then '$0 pin DIR' on a connected machine and commit buildroot/vendor.pin"
}

[ $# -ge 1 ] || die "usage: $0 vendor DIR | pin DIR | verify DIR | check-lock"
command=$1
shift
case "$command" in
vendor)
    [ $# -eq 1 ] || die "usage: $0 vendor DIR"
    rm -rf "$1"
    cargo vendor --quiet --locked --versioned-dirs --manifest-path "$repo/Cargo.toml" "$1" >/dev/null
    echo "vendored into $1 (tree sha256 $(tree_digest "$1"))"
    ;;
pin)
    { [ $# -eq 1 ] && [ -d "$1" ]; } || die "usage: $0 pin DIR (a directory made by '$0 vendor')"
    {
        echo "# Written by buildroot/scripts/vendor-crates.sh pin; checked by its verify."
        echo "cargo-lock-sha256 $(lock_digest)"
        echo "vendor-tree-sha256 $(tree_digest "$1")"
        echo "cargo-version $(cargo --version | cut -d' ' -f2)"
    } >"$pin_file"
    echo "wrote $pin_file"
    ;;
verify)
    { [ $# -eq 1 ] && [ -d "$1" ]; } || die "usage: $0 verify DIR"
    check_lock
    want=$(pinned vendor-tree-sha256)
    have=$(tree_digest "$1")
    [ "$want" = "$have" ] ||
        die "vendored tree $1 does not match the pin (pinned $want, found $have)"
    echo "vendored crates in $1 match buildroot/vendor.pin"
    ;;
check-lock)
    check_lock
    echo "buildroot/vendor.pin was made from the current Cargo.lock"
    ;;
*)
    die "unknown command $command"
    ;;
esac
