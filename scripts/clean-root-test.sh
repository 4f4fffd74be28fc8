#!/usr/bin/env bash
# Runs the test suite (or any command) in a fresh Debian 12 root that holds nothing but a
# minimal Debian and the Rust toolchain: the proof that `scripts/test.sh` installs everything
# it needs on a fresh machine. Needs root (debootstrap, chroot, bind mounts) and Debian's
# archive (apt); installs debootstrap on the host if it is missing.
#
#   scripts/clean-root-test.sh [--root DIR] [--keep] [--rev REV] [-- COMMAND...]
#
#   --root DIR   where the Debian root is made (default /var/tmp/mayfly-clean-root). A fresh
#                root is made for every run: DIR/base is debootstrapped once and kept, and each
#                run copies it to DIR/run, so nothing installed by an earlier run remains.
#   --keep       keep DIR/run afterwards (to look at what the run installed or built)
#   --rev REV    test the committed tree REV (`git archive`, copied into the root) instead of
#                the working tree as it is (bind-mounted: edits during the run are seen)
#   COMMAND      what to run inside, from the repository (default: ./scripts/test.sh), e.g.
#                `-- bash -c 'source scripts/lib.sh; ensure_xen_bindgen_tools;
#                bindgen/xen-sys/check-drift.sh'`
#
# Inside the root: the repository is bind-mounted at /src, with an empty directory of the root
# mounted over its target/ (everything is built afresh, and the host's build is left alone); the
# host's rustup home is bind-mounted read-only at the same path inside (rustup's toolchain
# links are absolute) and the host's cargo binaries (rustup's proxies) read-only at
# /opt/host-cargo-bin, last on PATH; CARGO_HOME inside the root starts empty (its bin/ first
# on PATH), so every crate is fetched and every cargo tool installed again. /proc, /sys (with the cgroup mounts), /dev and /dev/pts come from the host;
# a private mount namespace drops every mount when the run ends. Besides the toolchain, only
# /etc/resolv.conf and the CA certificates the host's administrator added
# (/usr/local/share/ca-certificates, for networks that intercept TLS) are copied in.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=/var/tmp/mayfly-clean-root
keep=0
rev=
while [ $# -gt 0 ]; do
    case $1 in
    --root) root=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --rev) rev=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--root DIR] [--keep] [--rev REV] [-- COMMAND...]" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || set -- ./scripts/test.sh
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
rustup_home=$(realpath "${RUSTUP_HOME:-$HOME/.rustup}")
cargo_bin=$(realpath "${CARGO_HOME:-$HOME/.cargo}")/bin
[ -d "$rustup_home/toolchains" ] && [ -x "$cargo_bin/cargo" ] ||
    { echo "$0: no rustup toolchain at $rustup_home / $cargo_bin" >&2; exit 2; }
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null || {
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
}
mkdir -p "$root"
# A fresh target/ for the whole suite (clippy, debug tests, release benches, the static
# template) takes well over 20 GB; a run on a fuller disk ends in "No space left on device".
free_gb=$(df --output=avail -BG "$root" | tail -1 | tr -dc 0-9)
if [ "${free_gb:-0}" -lt 30 ]; then
    echo "warning: only ${free_gb} GB free under $root; the whole suite needs about 30 GB" >&2
fi
if [ ! -e "$root/base/.complete" ]; then
    rm -rf "$root/base"
    echo "==> debootstrap --variant=minbase bookworm $root/base ($mirror)"
    debootstrap --variant=minbase bookworm "$root/base" "$mirror"
    touch "$root/base/.complete"
fi
rm -rf "$root/run"
echo "==> fresh copy of the base root: $root/run"
cp -a "$root/base" "$root/run"
rm -f "$root/run/.complete"
cp /etc/resolv.conf "$root/run/etc/resolv.conf"
# CA certificates the host's administrator added (a network that intercepts TLS, such as a
# company proxy): ca-certificates, once test.sh installs it, trusts them in the root too.
if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
    mkdir -p "$root/run/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$root/run/usr/local/share/ca-certificates/"
fi
mkdir -p "$root/run/src" "$root/run/$rustup_home" "$root/run/opt/host-cargo-bin" \
    "$root/run/$cargo_bin" \
    "$root/run/var/mayfly-target"

if [ -n "$rev" ]; then
    echo "==> the tree of $(git -C "$repo" rev-parse --short "$rev") copied to /src"
    git -C "$repo" archive "$rev" | tar -x -C "$root/run/src"
    repo=$root/run/src
fi

cleanup() {
    if [ "$keep" -eq 0 ]; then rm -rf "$root/run"; fi
}
trap cleanup EXIT

echo "==> running in $root/run: $*"
# shellcheck disable=SC2016 # expanded inside the namespace
unshare --mount --propagation private -- bash -euo pipefail -c '
    r=$1 repo=$2 rustup_home=$3 cargo_bin=$4
    shift 4
    # The root must be a mount point of its own: the sandbox'"'"'s zygote remounts "/" private
    # (MS_REC|MS_PRIVATE), which fails with EINVAL on a plain chroot directory.
    mount --bind "$r" "$r"
    mount -t proc proc "$r/proc"
    mount --rbind /sys "$r/sys"
    mount --rbind /dev "$r/dev"
    [ "$repo" = "$r/src" ] || mount --bind "$repo" "$r/src"
    mkdir -p "$r/src/target"
    mount --bind "$r/var/mayfly-target" "$r/src/target"
    mount --bind "$rustup_home" "$r/$rustup_home"
    mount -o remount,bind,ro "$r/$rustup_home"
    mount --bind "$cargo_bin" "$r/opt/host-cargo-bin"
    mount -o remount,bind,ro "$r/opt/host-cargo-bin"
    mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
    exec chroot "$r" /usr/bin/env -i \
        HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 \
        PATH="$cargo_bin":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/host-cargo-bin \
        RUSTUP_HOME="$rustup_home" CARGO_HOME="$(dirname "$cargo_bin")" \
        bash -c "cd /src && exec \"\$@\"" run "$@"
' clean-root "$root/run" "$repo" "$rustup_home" "$cargo_bin" "$@"
