#!/usr/bin/env bash
# Runs `mayfly hw-check` inside a real Xen 4.17 PV dom0, booted under QEMU (TCG), and prints
# its table and JSON. A manual check until the Xen-in-QEMU suite (tests/) runs it; see
# hw/README.md for a recorded run.
#
# Uses Debian 12's Xen 4.17 and kernel, the way shared/notes/xen-in-qemu.md describes; installs
# them if missing. Needs root for apt. Takes about 20 s here. Usage:
#   hw/scripts/hw-check-in-xen-dom0.sh [PROFILE [sized]]      (default: general)
# Plain: the small machine and command lines of xen-in-qemu.md (the profile then fails on
# memory, CPUs and the Xen command line). "sized": QEMU gets the profile's memory (+2 GiB) and
# CPU count, Xen and dom0 boot with the profile's command lines (as the appliance's GRUB entry
# does) plus bootscrub=0; only practical for the general profile on a small machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh

profile=${1:-general}
sized=${2:-}
profile_file=hw/profiles/$profile.toml
[ -f "$profile_file" ] || { echo "no profile $profile_file" >&2; exit 2; }
# toml_value SECTION KEY: a value of the profile file (quotes removed).
toml_value() {
    awk -v section="[$1]" -v key="$2" '
        /^\[/ { in_section = ($0 == section) }
        in_section && $1 == key { sub(/^[^=]*= */, ""); gsub(/"/, ""); print; exit }
    ' "$profile_file"
}
if [ "$sized" = sized ]; then
    qemu_mem=$(($(toml_value requirements min_memory_mib) + 2048))
    qemu_smp=$(toml_value requirements min_logical_cpus)
    xen_cmdline="$(toml_value xen cmdline) bootscrub=0"
    dom0_cmdline=$(toml_value dom0 cmdline)
else
    qemu_mem=2048
    qemu_smp=1
    xen_cmdline="console=com1 com1=115200,8n1 dom0_mem=512M,max:512M dom0_max_vcpus=1 bootscrub=0"
    dom0_cmdline="console=hvc0 earlyprintk=xen"
fi
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
for applet in sh mount modprobe reboot echo mkdir sleep test; do ln -s busybox "$root/bin/$applet"; done
cp "${CARGO_TARGET_DIR:-target}/release/mayfly" "$root/bin/"
# xl (for Xen's physical view: `xl info`) and xenstored, which xl needs.
xen_bin=/usr/lib/xen-4.17/bin
cp "$xen_bin/xl" "$xen_bin/xenstored" "$root/bin/"
mkdir -p "$root/usr/lib/x86_64-linux-gnu" "$root/var/lib/xen" "$root/var/log" "$root/run"
for binary in "$root/bin/mayfly" "$root/bin/xl" "$root/bin/xenstored"; do
    for lib in $(ldd "$binary" | grep -o '/lib[^ ]*'); do
        cp -n "$lib" "$root$lib"
    done
done
# glibc's pthread_cancel needs libgcc_s beside it.
cp -n /lib/x86_64-linux-gnu/libgcc_s.so.1 "$root/lib/x86_64-linux-gnu/"
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
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/lib/xen
mount -t tmpfs tmpfs /var/log
mkdir -p /run/xenstored /var/lib/xenstored /var/run
xenstored --pid-file /run/xenstored.pid
tries=100
while [ ! -S /run/xenstored/socket ] && [ ! -S /var/run/xenstored/socket ] && [ \$tries -gt 0 ]; do
    sleep 0.1
    tries=\$((tries - 1))
done
echo "=== xl info"
xl info
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

timeout 600 qemu-system-x86_64 -accel tcg -cpu max,-smap -m "$qemu_mem" -smp "$qemu_smp" -nodefaults \
    -display none -no-reboot -monitor none -serial "file:$work/serial.log" \
    -kernel "$work/xen" \
    -append "$xen_cmdline" \
    -initrd "/boot/vmlinuz-$kernel_version $dom0_cmdline rdinit=/init,$work/initrd.gz"
sed -n '/^=== xl info/,/^=== hw-check end/p' "$work/serial.log" | tr -d '\r'
grep -q '"environment": "xen-dom0"' "$work/serial.log" || {
    echo "hw-check did not report a Xen dom0; serial log:" >&2
    tail -n 40 "$work/serial.log" >&2
    exit 1
}
