#!/bin/sh
# Buildroot post-image script (BR2_ROOTFS_POST_IMAGE_SCRIPT), run in Buildroot's top
# directory with the images directory as $1. It
#   1. lays out the EFI system partition: GRUB's grub.cfg and grubenv (the A/B boot state:
#      slot a committed, no trial), each slot's Xen and dom0 kernel (the same stripped
#      vmlinux as the domU template's) and expected PCR values; dom0's root file system
#      (rootfs.squashfs) goes to both root partitions;
#   2. builds the disk image with genimage (board/mayfly/genimage.cfg);
#   3. writes expected-pcrs (the PCR 8 and 9 values GRUB's tpm module gives, per A/B state;
#      GRUB does not load the root file system: its digest is in the signed SHA256SUMS only)
#      and SHA256SUMS of every boot artefact, the root file system and the disk image;
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
# GRUB's environment block (what `grub-editenv grubenv set mayfly_slot=a mayfly_try=
# mayfly_tries=0` writes): exactly 1024 bytes, padded with '#'. GRUB's save_env rewrites it
# in place, so it must exist at that size.
env_vars='# GRUB Environment Block
mayfly_slot=a
mayfly_try=
mayfly_tries=0
'
{
    printf '%s' "$env_vars"
    head -c $((1024 - ${#env_vars})) /dev/zero | tr '\0' '#'
} >"$BINARIES_DIR/efi-part/EFI/BOOT/grubenv"
[ "$(wc -c <"$BINARIES_DIR/efi-part/EFI/BOOT/grubenv")" = 1024 ] ||
    { echo "post-image.sh: grubenv is not 1024 bytes" >&2; exit 1; }

# expected-pcrs: the PCR 8 and PCR 9 values GRUB's measurements give for each A/B state
# (docs/formats.md, "Expected PCRs"), replayed from grub.cfg and the files it loads. Made
# before the disk image because each slot carries it on the EFI partition
# (expected-pcrs-<slot>); an update bundle carries its own.
python3 "$BOARD_DIR/expected-pcrs.py" "$BINARIES_DIR/efi-part/EFI/BOOT/grub.cfg" \
    --file /xen-a="$BINARIES_DIR/xen" --file /xen-b="$BINARIES_DIR/xen" \
    --file /vmlinux-a="$BINARIES_DIR/vmlinux.stripped" \
    --file /vmlinux-b="$BINARIES_DIR/vmlinux.stripped" >"$BINARIES_DIR/expected-pcrs"

support/scripts/genimage.sh -c "$BOARD_DIR/genimage.cfg"

cd "$BINARIES_DIR"
sha256sum efi-part/EFI/BOOT/bootx64.efi efi-part/EFI/BOOT/grub.cfg xen vmlinux.stripped \
    rootfs.squashfs expected-pcrs mayfly-disk.img >SHA256SUMS

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
