#!/usr/bin/env bash
# Assembles the Mayfly appliance's disk image the way Buildroot would, from this tree's own
# Buildroot files, with Debian's binaries standing in for what Buildroot compiles.
#
# From buildroot/ (used as they are): the rootfs overlay (inittab, fstab, init scripts,
# agent.toml, xl.conf), board/mayfly/post-build.sh, post-image.sh, genimage.cfg and
# grub.cfg, the GRUB module list of configs/mayfly_x86_64_defconfig.
#
# Stand-ins (what Buildroot would build; tests/appliance/README.md lists each difference):
#   Xen 4.17 hypervisor      Debian's xen-hypervisor-4.17-amd64, gunzipped (Buildroot: xen/xen)
#   Xen toolstack            Debian's xen-utils-4.17, copied to the paths Xen's own install
#                            uses (/usr/sbin, /usr/lib/xen/bin, /usr/lib)
#   Linux (dom0, domU)       Debian's 6.1 kernel, the ELF vmlinux inside its bzImage; its
#                            drivers are modules, loaded by the stand-in S01modules (the
#                            appliance kernel builds them in: board/mayfly/linux-xen.fragment)
#   BusyBox                  Debian's busybox-static
#   GRUB                     grub-mkimage of Debian's grub-efi-amd64-bin, with the
#                            defconfig's built-in modules and prefix /EFI/BOOT
#   skeleton, initscripts,   tests/appliance/standin/ (own minimal equivalents of rcS, rcK,
#   ifupdown-scripts         S40network, the udhcpc script, passwd; the skeleton's links)
#   kernel mounting the root standin/initramfs: Debian's kernel needs its NVMe and squashfs
#                            modules to mount root=PARTUUID=…; this initramfs loads them,
#                            mounts the root partition read-only and switches to it
#   Rust binaries            this workspace, cargo --release (the Buildroot packages' options)
#   support/scripts/genimage.sh  a few lines running genimage as Buildroot's script does
#
# Usage: tests/appliance/build-image.sh [OUT]    (default OUT: target/appliance)
# Writes OUT/images/mayfly-disk.img (and the other files post-image.sh writes) and
# OUT/target/ (dom0's root file system).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
OUT=${1:-target/appliance}
HERE=tests/appliance
BR=buildroot
BOARD=$BR/board/mayfly

ensure_appliance_packages

KVER=$(linux_version)
XEN_BIN=/usr/lib/xen-4.17/bin
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TARGET_DIR=$OUT/target
BINARIES_DIR=$OUT/images
BUILD_DIR=$OUT/build
rm -rf "$TARGET_DIR" "$BINARIES_DIR" "$BUILD_DIR"
mkdir -p "$TARGET_DIR" "$BINARIES_DIR" "$BUILD_DIR"

echo "==> Rust binaries (release, the Buildroot packages' cargo options)"
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo build --locked --release \
    -p dom0-agent --bin dom0-agent --bin mayfly-zygote -p mayfly --bin mayfly \
    -p mayfly-update --bin mayfly-update
# mayfly-domu-shim: static (its CARGO_ENV sets +crt-static for the target).
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --release --target x86_64-unknown-linux-gnu -p domu-shim --bin domu-shim
SHIM=target/x86_64-unknown-linux-gnu/release/domu-shim

echo "==> kernel ($KVER) and hypervisor"
# The uncompressed ELF vmlinux (BR2_LINUX_KERNEL_VMLINUX) from Debian's bzImage's xz payload.
offset=$(LC_ALL=C grep -m 1 -obUaP '\xfd7zXZ\x00' "/boot/vmlinuz-$KVER" | cut -d: -f1 || true)
[ -n "$offset" ] || { echo "no xz payload in /boot/vmlinuz-$KVER" >&2; exit 1; }
tail -c +"$((offset + 1))" "/boot/vmlinuz-$KVER" | xz -dc --single-stream >"$BUILD_DIR/vmlinux" 2>/dev/null || true
[ "$(head -c 4 "$BUILD_DIR/vmlinux" | tail -c 3)" = ELF ] || { echo "vmlinux is not an ELF file" >&2; exit 1; }
strip --strip-debug -o "$BUILD_DIR/vmlinux.stripped" "$BUILD_DIR/vmlinux"
gzip -dc /boot/xen-4.17-amd64.gz >"$BINARIES_DIR/xen"

# module_path <name>: the installed kernel module file <name>.ko.
module_path() {
    find "/lib/modules/$KVER/kernel" -name "$1.ko" -print -quit
}

echo "==> domU template (package mayfly-domu-template)"
DOMU=$BUILD_DIR/domu-root
mkdir -p "$DOMU"/{dev,proc,sys,tmp,etc/mayfly,lib/modules}
install -s -m 0755 "$SHIM" "$DOMU/init"
# Stand-in only: Debian's kernel has the two Xen device drivers the shim needs as modules.
: >"$DOMU/etc/mayfly/modules"
for m in xen-evtchn xen-gntdev; do
    install -m 0644 "$(module_path "$m")" "$DOMU/lib/modules/"
    echo "/lib/modules/$m.ko" >>"$DOMU/etc/mayfly/modules"
done
(cd "$DOMU" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
    gzip -9 -n >"$BUILD_DIR/initramfs.cpio.gz"
TEMPLATE=$TARGET_DIR/usr/share/mayfly/template
install -D -m 0644 "$BUILD_DIR/vmlinux.stripped" "$TEMPLATE/vmlinux"
install -D -m 0644 "$BUILD_DIR/initramfs.cpio.gz" "$TEMPLATE/initramfs.cpio.gz"
(cd "$TEMPLATE" && sha256sum vmlinux initramfs.cpio.gz >SHA256SUMS)

echo "==> dom0 root file system"
T=$TARGET_DIR
# Skeleton (Buildroot's skeleton-init-sysv, merged /usr off): directories and links.
mkdir -p "$T"/{bin,sbin,usr/bin,usr/sbin,usr/lib,lib,dev,proc,sys,run,tmp,root,etc/init.d,var/lib,var/log,mnt}
ln -s ../run "$T/var/run"
ln -s ../run/lock "$T/var/lock"
ln -s ../tmp "$T/var/log"
ln -s ../run/resolv.conf "$T/etc/resolv.conf"
ln -s ../proc/self/mounts "$T/etc/mtab"
mkdir -p "$T/lib64"
# BusyBox (busybox-static), its applets linked as Buildroot's busybox install does.
install -m 0755 /bin/busybox "$T/bin/busybox"
for applet in $(/bin/busybox --list-full); do
    [ -e "$T/$applet" ] || ln -s /bin/busybox "$T/$applet"
done
# The stand-ins for Buildroot's skeleton, initscripts, ifupdown-scripts and busybox's udhcpc
# script (tests/appliance/standin/).
cp -a "$HERE/standin/root/." "$T/"
chmod 0600 "$T/etc/shadow" # git keeps no modes but the executable bit
echo mayfly >"$T/etc/hostname"
# Stand-in only: Debian's BusyBox runs udhcpc's script from /etc/udhcpc (Buildroot's from
# /usr/share/udhcpc).
mkdir -p "$T/etc/udhcpc"
ln -s /usr/share/udhcpc/default.script "$T/etc/udhcpc/default.script"
# Debian's kernel modules the appliance kernel builds in: the Xen devices, NVMe, ext4, the
# NICs, with their dependencies in load order.
mkdir -p "$T/lib/modules/$KVER"
: >"$T/etc/standin-modules"
# vfat and its code pages: the EFI partition (mayfly-update).
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs nvme ext4 vfat nls_cp437 nls_iso8859-1 \
    nls_ascii e1000 virtio_pci virtio_net; do
    for ko in $(modprobe -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'); do
        name=$(basename "$ko")
        grep -qx "$name" "$T/etc/standin-modules" && continue
        install -m 0644 "$ko" "$T/lib/modules/$KVER/$name"
        echo "$name" >>"$T/etc/standin-modules"
    done
done
cp "/lib/modules/$KVER/modules.builtin" "$T/lib/modules/$KVER/"
# Xen's toolstack (package mayfly-xen-dist): binaries where Xen's `make dist-tools` installs
# them with Buildroot's configure (prefix /usr, libexecdir /usr/lib).
for b in xl xenstored xenconsoled xenconsole; do
    install -m 0755 "$XEN_BIN/$b" "$T/usr/sbin/$b"
done
install -D -m 0755 "$XEN_BIN/xen-init-dom0" "$T/usr/lib/xen/bin/xen-init-dom0"
install -D -m 0755 "$XEN_BIN/libxl-save-helper" "$T/usr/lib/xen/bin/libxl-save-helper"
# Stand-in only: Debian's libxl runs the helper from its own libexec directory.
install -D -m 0755 "$XEN_BIN/libxl-save-helper" "$T$XEN_BIN/libxl-save-helper"
# The Mayfly packages.
install -s -m 0755 target/release/dom0-agent "$T/usr/sbin/dom0-agent"
install -s -m 0755 target/release/mayfly-zygote "$T/usr/sbin/mayfly-zygote"
install -s -m 0755 target/release/mayfly "$T/usr/bin/mayfly"
install -s -m 0755 target/release/mayfly-update "$T/usr/sbin/mayfly-update"
# tpm2-tools (BR2_PACKAGE_TPM2_TOOLS): Debian's multi-call binary and its tpm2_pcrread link.
install -m 0755 /usr/bin/tpm2 "$T/usr/bin/tpm2"
ln -s tpm2 "$T/usr/bin/tpm2_pcrread"
# Shared libraries of every dynamic binary (and those the agent dlopens). Stand-in only:
# Debian's loader searches its multiarch directories, not /usr/lib, so the libraries keep
# Debian's paths (Buildroot installs them in /usr/lib).
ld_cache=$(ldconfig -p)
dlopened=$(for so in libxenctrl.so.4.17 libxengnttab.so.1 libxenevtchn.so.1 libtss2-tcti-device.so.0; do
    awk -v so="$so" '$1 == so && /x86-64/ && !found { print $NF; found = 1 }' <<<"$ld_cache"
done)
libs=$(for f in "$T"/usr/sbin/* "$T"/usr/bin/mayfly "$T"/usr/bin/tpm2 "$T"/usr/lib/xen/bin/* $dlopened; do
    case $f in *.so*) echo "$f" ;; esac
    ldd "$f" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' || true
done | sort -u)
gcc_s=$(find /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu -name 'libgcc_s.so.1' -print -quit)
for lib in $libs $gcc_s; do
    mkdir -p "$T$(dirname "$lib")"
    cp -L "$lib" "$T$lib"
done
[ -e "$T/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$T/lib64/"
# The board's overlay (BR2_ROOTFS_OVERLAY).
cp -a "$BOARD/rootfs-overlay/." "$T/"
# Test-only additions, named in the README: the control hook the host drives the test
# through, and its /etc/init.d script.
install -D -m 0755 "$HERE/hook/S99mayfly-test-hook" "$T/etc/init.d/S99mayfly-test-hook"
# And the console also on loopback TCP, which the hook relays to the host: the test runs
# `mayfly admin attest` and `audit export` from the host, signed by one of the two throw-away
# admins below (the appliance itself ships no admin keys).
mkdir -p "$T/etc/default"
cat >"$T/etc/default/mayfly-agent" <<EOF
# TEST IMAGE ONLY (tests/appliance/build-image.sh): the console on loopback TCP (relayed to
# the host by S99mayfly-test-hook).
DOM0_AGENT_ARGS="--console-tcp 127.0.0.1:8451"
EOF
# post-build.sh (BR2_ROOTFS_POST_BUILD_SCRIPT), as Buildroot runs it, with a throw-away
# vendor update key (the update test signs its bundles with its private half) and two
# throw-away admins, quorum 2 (the update test signs its `update.install` commands with them).
target/release/mayfly-update keygen "$BUILD_DIR/test-update-key" >/dev/null
rm -f "$BUILD_DIR"/test-admin-[12].key "$BUILD_DIR"/test-admin-[12].pub
for n in 1 2; do
    target/release/mayfly admin keygen --out "$BUILD_DIR/test-admin-$n" >/dev/null 2>&1
done
cat "$BUILD_DIR/test-admin-1.pub" "$BUILD_DIR/test-admin-2.pub" >"$BUILD_DIR/test-admins"
MAYFLY_UPDATE_KEY=$BUILD_DIR/test-update-key.pub MAYFLY_ADMIN_KEYS=$BUILD_DIR/test-admins \
    MAYFLY_IMAGE_VERSION=1 "$BOARD/post-build.sh" "$T"

echo "==> rootfs.squashfs (BR2_TARGET_ROOTFS_SQUASHFS, gzip)"
mksquashfs "$T" "$BINARIES_DIR/rootfs.squashfs" -noappend -all-root -comp gzip -quiet

echo "==> stand-in initramfs (mounts the root partition with Debian's modular kernel)"
INITRD=$BUILD_DIR/standin-initramfs
mkdir -p "$INITRD"/{bin,dev,proc,sys,newroot,modules}
install -m 0755 /bin/busybox "$INITRD/bin/busybox"
for applet in sh mount umount insmod cat tr dd od readlink basename dirname sleep mkdir \
    switch_root reboot echo; do
    ln -s busybox "$INITRD/bin/$applet"
done
install -m 0755 "$HERE/standin/initramfs/init" "$INITRD/init"
: >"$INITRD/modules/order"
for m in nvme squashfs; do
    for ko in $(modprobe -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'); do
        name=$(basename "$ko")
        grep -qx "$name" "$INITRD/modules/order" && continue
        install -m 0644 "$ko" "$INITRD/modules/$name"
        echo "$name" >>"$INITRD/modules/order"
    done
done
(cd "$INITRD" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
    gzip -6 -n >"$BINARIES_DIR/standin-initramfs.cpio.gz"

echo "==> GRUB (x86_64-efi, the defconfig's built-in modules)"
modules=$(sed -n 's/^BR2_TARGET_GRUB2_BUILTIN_MODULES_EFI="\(.*\)"$/\1/p' "$BR/configs/mayfly_x86_64_defconfig")
[ -n "$modules" ] || { echo "no BR2_TARGET_GRUB2_BUILTIN_MODULES_EFI in the defconfig" >&2; exit 1; }
mkdir -p "$BINARIES_DIR/efi-part/EFI/BOOT"
# shellcheck disable=SC2086 # a list of module names
grub-mkimage -d /usr/lib/grub/x86_64-efi -O x86_64-efi -o "$BINARIES_DIR/efi-part/EFI/BOOT/bootx64.efi" \
    -p /EFI/BOOT $modules

echo "==> post-image.sh (BR2_ROOTFS_POST_IMAGE_SCRIPT)"
# Buildroot runs it in its top directory; support/scripts/genimage.sh is the stand-in.
TOPDIR=$BUILD_DIR/buildroot-top
mkdir -p "$TOPDIR/support/scripts"
install -m 0755 "$HERE/standin/genimage.sh" "$TOPDIR/support/scripts/genimage.sh"
BOARD_ABS=$(cd "$BOARD" && pwd)
# HOST_DIR: Buildroot's host tools; post-image.sh signs with its openssl (Debian's here).
HOST_DIR=$BUILD_DIR/host
mkdir -p "$HOST_DIR/bin"
ln -s /usr/bin/openssl "$HOST_DIR/bin/openssl"
export TARGET_DIR BINARIES_DIR BUILD_DIR HOST_DIR
# A throw-away release key, so that the signing path runs too.
openssl genpkey -algorithm ed25519 -out "$BUILD_DIR/test-release-key.pem" 2>/dev/null
(cd "$TOPDIR" && MAYFLY_SIGNING_KEY=$BUILD_DIR/test-release-key.pem MAYFLY_REQUIRE_SIGNATURE=1 \
    "$BOARD_ABS/post-image.sh" "$BINARIES_DIR")
# The check README.md tells the installer to run.
(cd "$BINARIES_DIR" &&
    openssl pkeyutl -verify -rawin -pubin -inkey signing-key.pub.pem -in SHA256SUMS \
        -sigfile SHA256SUMS.sig >/dev/null &&
    sha256sum --quiet -c SHA256SUMS) || { echo "the signed SHA256SUMS does not verify" >&2; exit 1; }
ls -l "$BINARIES_DIR"
