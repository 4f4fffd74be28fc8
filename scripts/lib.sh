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

# What every build and test needs. Each check tests for the file its package provides and the
# build actually uses (a command on PATH, a header, a library as its loader looks for it).
ensure_build_tools() {
    local missing=()
    # cc for LMDB and ring; c++ for libFuzzer (cargo-fuzz); the C library's headers, which a
    # compiler alone does not bring (gcc only recommends libc6-dev).
    { command -v cc && command -v c++; } >/dev/null || missing+=(build-essential)
    [ -f /usr/include/stdio.h ] || missing+=(libc6-dev)
    # cargo fetches crates over HTTPS and checks the server against this bundle.
    [ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
    # mount/umount for the ledger's full-disk (tmpfs) tests.
    { command -v mount && command -v umount; } >/dev/null || missing+=(mount)
    # readelf checks the PV guest kernel's image (scripts/build-pv-guest.sh).
    command -v readelf >/dev/null || missing+=(binutils)
    # test.sh's own checks (import circles, function length, vectors) run `python3` from PATH.
    command -v python3 >/dev/null || missing+=(python3)
    # The TPM crate (tss-esapi) links tpm2-tss's ESAPI, found through pkg-config; the TCTI
    # modules it loads at run time (device, swtpm) come with the same -dev package.
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    compgen -G "/usr/lib/*/pkgconfig/tss2-esys.pc" >/dev/null || missing+=(libtss2-dev)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# Debian's software TPM for the sealed-key and attestation tests (each test starts its own
# swtpm on loopback).
ensure_tpm_test_tools() {
    command -v swtpm >/dev/null || apt_install swtpm
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

# iproute2's `ip` for the failover tests that cut a network between primary and standby
# (network namespaces and a veth pair; agent/tests/failover.rs). Debian puts it in /usr/sbin
# (/sbin on a system without the merged /usr).
ensure_failover_test_tools() {
    [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || apt_install iproute2
}

# What buildroot/scripts/check-xen-source.sh needs to run Xen 4.17's configure with the
# package's options (nothing is compiled): each check names the file configure looks for.
ensure_xen_configure_tools() {
    local missing=()
    command -v patch >/dev/null || missing+=(patch)
    command -v xz >/dev/null || missing+=(xz-utils)
    command -v flex >/dev/null || missing+=(flex)
    command -v bison >/dev/null || missing+=(bison)
    # tools/configure requires iasl (libacpi) whatever the firmware options.
    command -v iasl >/dev/null || missing+=(acpica-tools)
    [ -f /usr/include/uuid/uuid.h ] || missing+=(uuid-dev)
    [ -f /usr/include/yajl/yajl_version.h ] || missing+=(libyajl-dev)
    [ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
    [ -f /usr/include/ncurses.h ] || missing+=(libncurses-dev)
    [ -f /usr/include/lzma.h ] || missing+=(liblzma-dev)
    [ -f /usr/include/zstd.h ] || missing+=(libzstd-dev)
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
    # Run natively (Buildroot cross-compiles and skips this), tools/configure checks Python's
    # development files through Debian's /usr/bin/python3, which check-xen-source.sh names as
    # PYTHON: distutils.sysconfig (python3-distutils), then Python.h in its INCLUDEPY and
    # python3-config (python3-dev). A python3 earlier on PATH (pyenv) is not what is checked.
    if [ -x /usr/bin/python3 ]; then
        /usr/bin/python3 -c 'import distutils.sysconfig' 2>/dev/null || missing+=(python3-distutils)
        local include_py
        include_py=$(/usr/bin/python3 -c 'import sysconfig; print(sysconfig.get_config_var("INCLUDEPY"))')
        { [ -f "$include_py/Python.h" ] && [ -x /usr/bin/python3-config ]; } || missing+=(python3-dev)
    else
        missing+=(python3 python3-distutils python3-dev)
    fi
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# The shell linter for the Buildroot tree check (buildroot/check).
ensure_shellcheck() {
    command -v shellcheck >/dev/null || apt_install shellcheck
}

# ensure_cargo_tool <command> <crate> <version>: installs the crate unless <command> on PATH
# already says it is that version (another version may not read this tree's configuration).
ensure_cargo_tool() {
    local have
    have=$("$1" --version 2>/dev/null || true)
    if [ "${have##* }" != "$3" ]; then
        echo "==> installing $2 $3 with cargo (found: ${have:-none})"
        cargo install --locked --force "$2" --version "$3"
    fi
}

# have_static_busybox <applet>...: /bin/busybox is Debian's static build and has the applets.
# An initramfs gets /bin/busybox without its libraries: it must be the static build, i.e. the
# file must belong to busybox-static (Debian's dynamic `busybox` installs the same path). The
# static binary itself contains the string "ld-linux-x86-64" (an applet's text), so grepping
# it for the loader reinstalled the package on every run.
have_static_busybox() {
    local applets applet
    [ -x /bin/busybox ] || return 1
    dpkg-query -S /bin/busybox 2>/dev/null | grep -q '^busybox-static:' || return 1
    applets=$(/bin/busybox --list)
    for applet in "$@"; do
        grep -qx "$applet" <<<"$applets" || return 1
    done
}

# install_library_closure <root> <file>...: copies the shared-library closure of the files
# (a file that is itself a .so counts too), libgcc_s (loaded for unwinding) and the loader
# into <root> at the paths the loader expects.
install_library_closure() {
    local root=$1 f lib libs
    shift
    libs=$(for f in "$@"; do
        echo "$f" | grep -q '\.so' && echo "$f"
        ldd "$f" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' || true
    done | sort -u)
    for lib in $libs $(find /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu -name 'libgcc_s.so.1' -print -quit); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    # Debian's merged /usr: the loader is asked for as /lib64/ld-linux-x86-64.so.2.
    [ -e "$root/lib64/ld-linux-x86-64.so.2" ] || {
        mkdir -p "$root/lib64"
        cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
    }
}

# What the cgroup v2 test (tests/cgroup-v2/run.sh) boots: Debian's kernel (no Xen) under QEMU
# with an initramfs of the static busybox (its init uses the applets named below) and the
# agent. Each check is for the file the test uses.
ensure_cgroup_v2_test_packages() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    { [ -n "$(linux_version)" ] && [ -f "/boot/vmlinuz-$(linux_version)" ]; } ||
        missing+=(linux-image-amd64)
    have_static_busybox wget timeout awk sed tr grep find readlink mount ip poweroff nproc ||
        missing+=(busybox-static)
    command -v cpio >/dev/null || missing+=(cpio)
    # The agent's shared-library closure is read with ldd (libc-bin).
    command -v ldd >/dev/null || missing+=(libc-bin)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# Everything the Xen-in-QEMU suite boots or builds its images from (Debian 12 packages):
# Xen 4.17 and its toolstack, the xenstore tools, QEMU, Debian's kernel, a static busybox.
ensure_xen_qemu_packages() {
    local missing=()
    [ -e /boot/xen-4.17-amd64.gz ] || missing+=(xen-hypervisor-4.17-amd64)
    [ -x /usr/lib/xen-4.17/bin/xl ] || missing+=(xen-utils-4.17)
    { command -v xenstore-write && command -v xenstore-read && command -v xenstore-ls; } \
        >/dev/null || missing+=(xenstore-utils)
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    [ -n "$(linux_version)" ] || missing+=(linux-image-amd64)
    have_static_busybox ip || missing+=(busybox-static)
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
#
# Debian's bindgen loads libclang at run time (clang-sys): it looks for libclang.so,
# libclang.so.*, libclang-<version>.so and libclang-<version>.so.* under /usr/lib. Only those
# files count here: libclang-cpp.so.14 (the C++ library, pulled in by other packages) is not
# libclang and bindgen fails with "Unable to find libclang" beside it. libclang also needs its
# own builtin headers (stddef.h, stdint.h... under lib/clang/<version>/include) to parse the
# Xen headers. libclang-dev brings both (libclang1-14, libclang-common-14-dev).
have_libclang() {
    compgen -G "/usr/lib/llvm-*/lib/libclang.so" ||
        compgen -G "/usr/lib/llvm-*/lib/libclang.so.[0-9]*" ||
        compgen -G "/usr/lib/*-linux-gnu/libclang-[0-9]*.so*"
}
ensure_xen_bindgen_tools() {
    local missing=()
    [ "$(bindgen --version 2>/dev/null)" = "bindgen 0.60.1" ] || missing+=(bindgen)
    [ -f /usr/include/xenctrl.h ] || missing+=(libxen-dev)
    have_libclang >/dev/null || missing+=(libclang-dev)
    compgen -G "/usr/lib/llvm-*/lib/clang/*/include/stddef.h" >/dev/null || missing+=(libclang-dev)
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
    # Types on GRUB's serial console (tests/appliance/run.sh, boot 0); runs
    # buildroot/board/mayfly/expected-pcrs.py.
    [ -x /usr/bin/python3 ] || missing+=(python3)
    # The TPM the boot tests attach to QEMU, and tpm2_pcrread in dom0 (tpm2-tools' multi-call
    # binary and the device TCTI it loads at run time).
    [ -x /usr/bin/swtpm ] || missing+=(swtpm)
    [ -x /usr/bin/tpm2 ] || missing+=(tpm2-tools)
    [ -e /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 ] || missing+=(libtss2-tcti-device0)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}
