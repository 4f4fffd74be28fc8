#!/bin/sh
# Buildroot post-image script (BR2_ROOTFS_POST_IMAGE_SCRIPT), run in Buildroot's top
# directory with the images directory as $1. It
#   1. lays out the EFI system partition: GRUB's grub.cfg, Xen, the dom0 kernel (the same
#      stripped vmlinux as the domU template's); dom0's root file system (rootfs.squashfs)
#      gets its own partition;
#   2. builds the disk image with genimage (board/mayfly/genimage.cfg);
#   3. writes SHA256SUMS of every boot artefact, the root file system and the disk image,
#      and MEASUREMENTS with the digests GRUB extends into PCR 9 when it loads them (GRUB
#      does not load the root file system: its digest is in the signed SHA256SUMS only);
#   4. signs SHA256SUMS with Ed25519 if MAYFLY_SIGNING_KEY names a PEM private key
#      (SHA256SUMS.sig, raw 64-byte signature; public key in signing-key.pub.pem). With
#      MAYFLY_REQUIRE_SIGNATURE=1 an unsigned build fails.
set -eu

BINARIES_DIR=$1
BOARD_DIR=$(cd "$(dirname "$0")" && pwd)
: "${TARGET_DIR:?post-image.sh runs under Buildroot, which sets TARGET_DIR}"
: "${HOST_DIR:?post-image.sh runs under Buildroot, which sets HOST_DIR}"
# The build's own openssl, not the build host's: host-openssl is built because the defconfig
# sets BR2_LINUX_KERNEL_NEEDS_HOST_OPENSSL (the kernel's module signing needs it too).
OPENSSL=$HOST_DIR/bin/openssl

install -D -m 0644 "$BOARD_DIR/grub.cfg" "$BINARIES_DIR/efi-part/EFI/BOOT/grub.cfg"
cp "$TARGET_DIR/usr/share/mayfly/template/vmlinux" "$BINARIES_DIR/vmlinux.stripped"

support/scripts/genimage.sh -c "$BOARD_DIR/genimage.cfg"

cd "$BINARIES_DIR"
sha256sum efi-part/EFI/BOOT/bootx64.efi efi-part/EFI/BOOT/grub.cfg xen vmlinux.stripped \
    rootfs.squashfs mayfly-disk.img >SHA256SUMS
{
    echo "# Files GRUB measures into PCR 9 (SHA-256 of the file as loaded), in load order for"
    echo "# the default entry. Compare with the TPM event log on the appliance:"
    echo "#   tpm2_eventlog /sys/kernel/security/tpm0/binary_bios_measurements"
    echo "# PCR 8 holds the GRUB commands run; PCR 4 the Authenticode digest of bootx64.efi"
    echo "# (not a plain SHA-256; compute it with a PE hashing tool)."
    echo "# The root file system (rootfs.squashfs, partition root-a) is not loaded by GRUB and"
    echo "# not measured; its digest is in SHA256SUMS."
    sha256sum efi-part/EFI/BOOT/grub.cfg xen vmlinux.stripped
} >MEASUREMENTS

if [ -n "${MAYFLY_SIGNING_KEY:-}" ]; then
    [ -x "$OPENSSL" ] || { echo "post-image.sh: $OPENSSL is missing (host-openssl)" >&2; exit 1; }
    "$OPENSSL" pkeyutl -sign -rawin -inkey "$MAYFLY_SIGNING_KEY" -in SHA256SUMS -out SHA256SUMS.sig
    "$OPENSSL" pkey -in "$MAYFLY_SIGNING_KEY" -pubout -out signing-key.pub.pem
    echo "post-image.sh: SHA256SUMS signed (SHA256SUMS.sig)"
elif [ "${MAYFLY_REQUIRE_SIGNATURE:-0}" = 1 ]; then
    echo "post-image.sh: MAYFLY_REQUIRE_SIGNATURE=1 but MAYFLY_SIGNING_KEY is not set" >&2
    exit 1
else
    echo "post-image.sh: SHA256SUMS left unsigned (set MAYFLY_SIGNING_KEY to sign)"
fi
