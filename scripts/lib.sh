# Helpers shared by scripts/run.sh and scripts/test.sh.

# Runs a named step; stops the script with a clear line if it fails.
step() {
    local name=$1
    shift
    echo "==> $name: $*"
    if ! "$@"; then
        echo "FAILED: $name" >&2
        exit 1
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    echo "==> installing Debian packages: $*"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# A C compiler for LMDB and ring; mount for the tmpfs tests.
ensure_build_tools() {
    local missing=()
    # cc for LMDB and ring; c++ for libFuzzer (cargo-fuzz).
    { command -v cc && command -v c++; } >/dev/null || missing+=(build-essential)
    command -v mount >/dev/null || missing+=(mount)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# rsyslog (with its GnuTLS driver) and the openssl CLI for the SIEM export tests, which start
# their own rsyslogd on loopback (never the system's) with certificates made at test time.
# Installing the package on a machine without systemd does not start a system rsyslogd.
ensure_siem_test_tools() {
    local missing=()
    [ -x /usr/sbin/rsyslogd ] || missing+=(rsyslog)
    compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null || missing+=(rsyslog-gnutls)
    command -v openssl >/dev/null || missing+=(openssl)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# The shell linter for the Buildroot tree check (buildroot/check).
ensure_shellcheck() {
    command -v shellcheck >/dev/null || apt_install shellcheck
}

# ensure_cargo_tool <command> <crate> <version>
ensure_cargo_tool() {
    if ! command -v "$1" >/dev/null; then
        echo "==> installing $2 $3 with cargo"
        cargo install --locked "$2" --version "$3"
    fi
}

# Everything the Xen-in-QEMU suite boots or builds its images from (Debian 12 packages):
# Xen 4.17 and its toolstack, the xenstore tools, QEMU, Debian's kernel, a static busybox.
ensure_xen_qemu_packages() {
    local missing=()
    [ -e /boot/xen-4.17-amd64.gz ] || missing+=(xen-hypervisor-4.17-amd64)
    [ -x /usr/lib/xen-4.17/bin/xl ] || missing+=(xen-utils-4.17)
    command -v xenstore-write >/dev/null || missing+=(xenstore-utils)
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    [ -n "$(linux_version)" ] || missing+=(linux-image-amd64)
    [ -x /bin/busybox ] && /bin/busybox --list | grep -qx ip || missing+=(busybox-static)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v xz >/dev/null || missing+=(xz-utils)
    command -v curl >/dev/null || missing+=(curl)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# The newest installed Debian kernel version that has modules (e.g. 6.1.0-56-amd64).
linux_version() {
    local v
    for v in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|.*/vmlinuz-||' | sort -V -r); do
        if [ -d "/lib/modules/$v/kernel/drivers/xen" ]; then
            echo "$v"
            return
        fi
    done
}

# bindgen (Debian 12's 0.60.1), libclang and the Xen 4.17 headers, for the bindings' drift
# check (bindgen/xen-sys/check-drift.sh). The Xen libraries themselves are only loaded at run
# time, by `dom0-agent serve --backend xen`.
ensure_xen_bindgen_tools() {
    local missing=()
    command -v bindgen >/dev/null || missing+=(bindgen)
    [ -f /usr/include/xenctrl.h ] || missing+=(libxen-dev)
    compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null || missing+=(libclang-dev)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# What the appliance boot test (tests/appliance) needs on top of the Xen-in-QEMU packages:
# UEFI firmware for QEMU, GRUB's x86_64-efi modules (grub-mkimage stands in for Buildroot's
# GRUB build), genimage with the tools it runs for the vfat and ext4 partitions. Each check
# tests for the very file the build uses.
ensure_appliance_packages() {
    ensure_xen_qemu_packages
    local missing=()
    [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] && [ -f /usr/share/OVMF/OVMF_VARS_4M.fd ] || missing+=(ovmf)
    [ -f /usr/lib/grub/x86_64-efi/multiboot2.mod ] || missing+=(grub-efi-amd64-bin)
    command -v grub-mkimage >/dev/null || missing+=(grub-common)
    command -v genimage >/dev/null || missing+=(genimage)
    command -v mcopy >/dev/null || missing+=(mtools)
    [ -x /usr/sbin/mkdosfs ] || missing+=(dosfstools)
    [ -x /usr/sbin/mke2fs ] || missing+=(e2fsprogs)
    command -v mksquashfs >/dev/null || missing+=(squashfs-tools)
    [ -x /usr/bin/openssl ] || missing+=(openssl)
    # Types on GRUB's serial console (tests/appliance/run.sh, boot 0).
    [ -x /usr/bin/python3 ] || missing+=(python3)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}
