#!/bin/sh
# check-rustc.sh RUSTC MAJOR.MINOR: fails unless RUSTC is at least that version.
set -eu
rustc=$1
want=$2
have=$("$rustc" --version | cut -d' ' -f2)
if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" != "$want" ]; then
    echo "Mayfly needs rustc >= $want; $rustc is $have" >&2
    exit 1
fi
echo "rustc $have (>= $want)"
