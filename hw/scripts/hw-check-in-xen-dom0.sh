#!/usr/bin/env bash
# Runs `mayfly hw-check` inside a real Xen 4.17 PV dom0, booted under QEMU (TCG), and prints
# its table and JSON. A manual check until the Xen-in-QEMU suite (tests/) runs it; see
# hw/README.md for a recorded run.
#
# Uses Debian 12's Xen 4.17 and kernel, the way shared/notes/xen-in-qemu.md describes; installs
# them if missing. Needs root for apt. Takes about a minute. Usage:
#   hw/scripts/hw-check-in-xen-dom0.sh [PROFILE]      (default: general)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh

profile=${1:-general}
kernel_version=$(find /lib/modules -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n1)
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -f /boot/xen-4.17-amd64.gz ] || need+=(xen-hypervisor-4.17-amd64)
[ -n "$kernel_version" ] && [ -f "/boot/vmlinuz-$kernel_version" ] || need+=(linux-image-amd64)
[ -x /bin/busybox ] || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}"
    kernel_version=$(find /lib/modules -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)
fi

cargo build --quiet --release --locked -p mayfly
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,proc,sys,dev,lib64,lib/x86_64-linux-gnu}
cp /bin/busybox "$root/bin/"
for applet in sh mount modprobe reboot echo; do ln -s busybox "$root/bin/$applet"; done
cp "${CARGO_TARGET_DIR:-target}/release/mayfly" "$root/bin/"
for lib in $(ldd "$root/bin/mayfly" | grep -o '/lib[^ ]*'); do
    cp "$lib" "$root$lib"
done
modules=/lib/modules/$kernel_version
mkdir -p "$root$modules/kernel/drivers"
cp -a "$modules/kernel/drivers/xen" "$root$modules/kernel/drivers/"
cp "$modules/modules.dep" "$root$modules/"
cat >"$root/init" <<INIT
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe xen-evtchn
modprobe xen-privcmd
modprobe xenfs
mount -t xenfs xenfs /proc/xen
echo "=== hw-check table"
/bin/mayfly hw-check --profile $profile
echo "=== hw-check exit status: \$?"
/bin/mayfly hw-check --profile $profile --json
echo "=== hw-check end"
reboot -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd.gz"
zcat /boot/xen-4.17-amd64.gz >"$work/xen"

# The command lines of shared/notes/xen-in-qemu.md; dom0's includes the general profile's
# dom0 settings.
timeout 600 qemu-system-x86_64 -accel tcg -cpu max,-smap -m 2048 -smp 1 -nodefaults \
    -display none -no-reboot -monitor none -serial "file:$work/serial.log" \
    -kernel "$work/xen" \
    -append "console=com1 com1=115200,8n1 dom0_mem=512M,max:512M dom0_max_vcpus=1 bootscrub=0" \
    -initrd "/boot/vmlinuz-$kernel_version console=hvc0 earlyprintk=xen rdinit=/init,$work/initrd.gz"
sed -n '/^=== hw-check table/,/^=== hw-check end/p' "$work/serial.log" | tr -d '\r'
grep -q '"environment": "xen-dom0"' "$work/serial.log" || {
    echo "hw-check did not report a Xen dom0; serial log:" >&2
    tail -n 40 "$work/serial.log" >&2
    exit 1
}
