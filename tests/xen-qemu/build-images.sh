#!/usr/bin/env bash
# Builds everything the Xen-in-QEMU suite boots, from Debian packages and this workspace:
#
#   OUT/xen                     the hypervisor (gunzipped /boot/xen-4.17-amd64.gz)
#   OUT/vmlinux                 dom0 and domU kernel: the uncompressed ELF inside Debian's bzImage
#   OUT/mayfly-pv-guest         the Mayfly PV guest kernel (scripts/build-pv-guest.sh)
#   OUT/mayfly-pv-guest-faults  the same with boot faults (by domid: hang, crash or spin
#                               before Ready), for the agent's boot-fault phase
#   OUT/domu-initramfs.cpio     the domU template: domu-shim (static, test-handlers) as /init,
#                               the two modules it loads, /etc/mayfly/modules
#   OUT/dom0-initramfs.cpio     dom0: busybox, the Xen toolstack with its shared-library
#                               closure (and libgcc_s), modules, dom0-agent (test-handlers), xen-ring-peer,
#                               domu-shim, the Buildroot rootfs overlay verbatim, the test /init
#                               and scenario, and the domU templates (Linux and Mayfly PV
#                               guest) under /usr/share/mayfly
#
# Usage: tests/xen-qemu/build-images.sh [OUT]   (default OUT: target/xen-qemu)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
OUT=${1:-target/xen-qemu}
HERE=tests/xen-qemu
OVERLAY=buildroot/board/mayfly/rootfs-overlay

ensure_xen_qemu_packages

KVER=$(linux_version)
XEN_BIN=/usr/lib/xen-4.17/bin
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

echo "==> hypervisor and kernel ($KVER)"
gzip -dc /boot/xen-4.17-amd64.gz >"$OUT/xen.tmp" && mv "$OUT/xen.tmp" "$OUT/xen"
# The bzImage holds an xz stream (magic FD 37 7A 58 5A 00); decompressing it once here saves
# ~5 s of emulated decompression per dom0 boot and per domU create.
offset=$(LC_ALL=C grep -m 1 -obUaP '\xfd7zXZ\x00' "/boot/vmlinuz-$KVER" | cut -d: -f1 || true)
[ -n "$offset" ] || { echo "no xz payload in /boot/vmlinuz-$KVER" >&2; exit 1; }
tail -c +"$((offset + 1))" "/boot/vmlinuz-$KVER" >"$OUT/vmlinux.xz"
xz -dc --single-stream "$OUT/vmlinux.xz" >"$OUT/vmlinux.tmp"
rm -f "$OUT/vmlinux.xz"
[ "$(head -c 4 "$OUT/vmlinux.tmp" | tail -c 3)" = ELF ] || { echo "vmlinux is not an ELF file" >&2; exit 1; }
mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"

echo "==> Rust binaries"
# The shim is /init of a domU with nothing else in it: link it statically.
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --release --target x86_64-unknown-linux-gnu \
    -p domu-shim --features test-handlers
SHIM=target/x86_64-unknown-linux-gnu/release/domu-shim
# The agent admits the template's test.* handler names only with the same feature.
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo build --locked --release \
    -p dom0-agent --bin dom0-agent --features dom0-agent/test-handlers \
    -p mayfly-xen-peer --bin xen-ring-peer \
    -p mayfly --bin mayfly
AGENT=target/release/dom0-agent
PEER=target/release/xen-ring-peer
# The Mayfly PV guest kernel: freestanding, its own workspace and link (see the script).
# With its hostile test.* handlers, like the Linux template's shim.
scripts/build-pv-guest.sh "$OUT/mayfly-pv-guest" --features test-handlers
# A faulty image for the boot-fault phase (src/boot_fault.rs): never shipped.
scripts/build-pv-guest.sh "$OUT/mayfly-pv-guest-faults" --features boot-faults

# module_path <name>: the installed kernel module file <name>.ko.
module_path() {
    find "/lib/modules/$KVER/kernel" -name "$1.ko" -print -quit
}

# cpio_dir <dir> <file>: an uncompressed newc archive of <dir>, owned by root.
cpio_dir() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$2.tmp"
    mv "$2.tmp" "$2"
}

echo "==> domU template initramfs"
DOMU=$OUT/domu-root
rm -rf "$DOMU"
mkdir -p "$DOMU"/{dev,proc,etc/mayfly,lib/modules}
install -s -m 0755 "$SHIM" "$DOMU/init"
: >"$DOMU/etc/mayfly/modules"
for m in xen-evtchn xen-gntdev; do
    src=$(module_path "$m")
    [ -n "$src" ] || { echo "module $m not found" >&2; exit 1; }
    install -m 0644 "$src" "$DOMU/lib/modules/"
    echo "/lib/modules/$m.ko" >>"$DOMU/etc/mayfly/modules"
done
cpio_dir "$DOMU" "$OUT/domu-initramfs.cpio"

echo "==> dom0 initramfs"
ROOT=$OUT/dom0-root
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,var/log,var/lib,etc,lib/modules/"$KVER",root}
ln -s ../run "$ROOT/var/run"
install -m 0755 /bin/busybox "$ROOT/bin/busybox"
for applet in $(/bin/busybox --list-full); do
    [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
# Toolstack binaries on PATH (the appliance installs them in /usr/sbin too).
for b in xl xenstored xen-init-dom0 xenconsoled xenconsole libxl-save-helper; do
    install -m 0755 "$XEN_BIN/$b" "$ROOT/usr/sbin/$b"
done
mkdir -p "$ROOT$XEN_BIN"
install -m 0755 "$XEN_BIN/libxl-save-helper" "$ROOT$XEN_BIN/"
# S20xen runs xen-init-dom0 where Xen's own install puts it (LIBEXEC_BIN).
install -D -m 0755 "$XEN_BIN/xen-init-dom0" "$ROOT/usr/lib/xen/bin/xen-init-dom0"
for b in xenstore-write xenstore-read xenstore-ls; do
    install -m 0755 "$(command -v "$b")" "$ROOT/usr/bin/$b"
done
install -s -m 0755 "$AGENT" "$ROOT/usr/bin/dom0-agent"
install -s -m 0755 "$PEER" "$ROOT/usr/bin/xen-ring-peer"
install -s -m 0755 target/release/mayfly "$ROOT/usr/bin/mayfly"
install -s -m 0755 "$SHIM" "$ROOT/usr/bin/domu-shim"
# Shared-library closure of every dynamic binary, at the paths the loader expects.
# The agent loads libxenctrl, libxengnttab and libxenevtchn at run time (dlopen by soname).
# (The loader cache is read whole into a variable: an `awk … exit` on the pipe would kill
# ldconfig with SIGPIPE now and then, and with pipefail and set -e end this script silently.)
ld_cache=$(ldconfig -p)
dlopened=$(for so in libxenctrl.so.4.17 libxengnttab.so.1 libxenevtchn.so.1; do
    awk -v so="$so" '$1 == so && /x86-64/ && !found { print $NF; found = 1 }' <<<"$ld_cache"
done)
# shellcheck disable=SC2086 # $dlopened: one path per line
install_library_closure "$ROOT" "$ROOT"/usr/sbin/* "$ROOT"/usr/bin/* "$ROOT$XEN_BIN"/* $dlopened
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs e1000; do
    src=$(module_path "$m")
    [ -n "$src" ] || { echo "module $m not found" >&2; exit 1; }
    install -m 0644 "$src" "$ROOT/lib/modules/$KVER/"
done
(cd "$ROOT/lib/modules/$KVER" && for f in *.ko; do echo "$f:"; done) >"$ROOT/lib/modules/$KVER/modules.dep"
cp "/lib/modules/$KVER/modules.builtin" "$ROOT/lib/modules/$KVER/"
# The Buildroot overlay, verbatim (the suite checks the booted copies byte for byte).
cp -a "$OVERLAY/." "$ROOT/"
# The domU template, where the agent's Xen backend and the peer look for it.
mkdir -p "$ROOT/usr/share/mayfly/template"
cp "$OUT/vmlinux" "$ROOT/usr/share/mayfly/template/vmlinux"
install -m 0644 "$OUT/mayfly-pv-guest" "$ROOT/usr/share/mayfly/template/mayfly-pv-guest"
install -m 0644 "$OUT/mayfly-pv-guest-faults" "$ROOT/usr/share/mayfly/template/mayfly-pv-guest-faults"
# gzip'd as on the appliance (the domU kernel unpacks 1.8 MiB in a fraction of a second).
gzip -9 -n -c "$OUT/domu-initramfs.cpio" >"$ROOT/usr/share/mayfly/template/initramfs.cpio.gz"
# The test's own /init and scenario.
install -m 0755 "$HERE/dom0/init" "$ROOT/init"
mkdir -p "$ROOT/mayfly-test"
install -m 0755 "$HERE/dom0/scenario.sh" "$ROOT/mayfly-test/scenario.sh"
install -m 0644 "$HERE/dom0/domu.cfg" "$ROOT/mayfly-test/domu.cfg"
install -m 0644 "$HERE/dom0/pv-guest.cfg" "$ROOT/mayfly-test/pv-guest.cfg"
(cd "$OVERLAY" && find . -type f | LC_ALL=C sort | sed 's|^\./|/|') >"$ROOT/mayfly-test/overlay-files"
# Test-only agent flags: the suite's policy bundle (admits test.bad_index).
mkdir -p "$ROOT/mayfly-test/policy" "$ROOT/etc/default"
install -m 0644 "$HERE"/dom0/policy/*.toml "$ROOT/mayfly-test/policy/"
# No data partition in this suite: the ledger stays in dom0's RAM root. No TPM either (this
# suite is about Xen; the appliance boot test attaches swtpm and checks the sealed key): the
# file key, over the shipped agent.toml's [key] source = "tpm".
printf '%s\n' 'DOM0_AGENT_ARGS="--policy /mayfly-test/policy --key-source file"' \
    'MAYFLY_DATA_REQUIRED=0' >"$ROOT/etc/default/mayfly-agent"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
cpio_dir "$ROOT" "$OUT/dom0-initramfs.cpio"

ls -l "$OUT"/xen "$OUT"/vmlinux "$OUT"/*.cpio
