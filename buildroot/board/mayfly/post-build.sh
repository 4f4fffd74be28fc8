#!/bin/sh
# Buildroot post-build script (BR2_ROOTFS_POST_BUILD_SCRIPT), run with the target directory
# as $1 after the packages and the overlay are installed. Fails the build if dom0's root file
# system lacks a part the appliance cannot run without, and records what the image is.
set -eu

TARGET_DIR=$1
BOARD_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$BOARD_DIR/../../.." && pwd)

missing=""
need() {
    [ -e "$TARGET_DIR/$1" ] || missing="$missing $1"
}
# From the Mayfly packages.
need usr/sbin/dom0-agent
need usr/bin/mayfly
need usr/sbin/mayfly-update
need usr/share/mayfly/template/vmlinux
need usr/share/mayfly/template/initramfs.cpio.gz
# From mayfly-xen-dist.
need usr/sbin/xl
need usr/sbin/xenstored
need usr/sbin/xenconsoled
# From the dom0 overlay (board/mayfly/rootfs-overlay; see README.md).
need etc/mayfly/agent.toml
need etc/xen/xl.conf
if [ -n "$missing" ]; then
    echo "post-build.sh: dom0 root file system lacks:$missing" >&2
    exit 1
fi
if ! ls "$TARGET_DIR"/etc/init.d/S* >/dev/null 2>&1; then
    echo "post-build.sh: no start scripts in /etc/init.d (the dom0 overlay is missing)" >&2
    exit 1
fi

# The root file system is read-only (a squashfs): every directory written at run time is a
# mount point of /etc/fstab's bounded tmpfs mounts or the ledger's partition (label
# MAYFLY-DATA, on /var/lib/mayfly). Buildroot's skeleton links /var/log to /tmp; the
# appliance gives the logs their own tmpfs, so that full logs cannot fill /tmp.
if [ -L "$TARGET_DIR/var/log" ]; then
    rm "$TARGET_DIR/var/log"
fi
mkdir -p "$TARGET_DIR/var/lib/mayfly" "$TARGET_DIR/var/lib/xen" "$TARGET_DIR/var/lib/xenstored" \
    "$TARGET_DIR/var/log"

# The vendor's update key, pinned in the image: `mayfly-update install` accepts only bundles
# it signed (docs/formats.md, "Update bundle"). MAYFLY_UPDATE_KEY names its public half (64
# hex digits, as `mayfly-update keygen` writes STEM.pub).
if [ -z "${MAYFLY_UPDATE_KEY:-}" ] || [ ! -r "$MAYFLY_UPDATE_KEY" ]; then
    echo "post-build.sh: set MAYFLY_UPDATE_KEY to the vendor's update public key (STEM.pub)" >&2
    exit 1
fi
if ! grep -qxE '[0-9a-f]{64}' "$MAYFLY_UPDATE_KEY"; then
    echo "post-build.sh: $MAYFLY_UPDATE_KEY is not 64 lower-case hex digits" >&2
    exit 1
fi
install -m 0644 "$MAYFLY_UPDATE_KEY" "$TARGET_DIR/etc/mayfly/update-key.pub"

# The admins whose signed commands the agent's console obeys (docs/console.md): an update is
# installed by `update.install` signed by MAYFLY_ADMIN_QUORUM (default 2) of them.
# MAYFLY_ADMIN_KEYS names a file with one public key (64 hex digits, `mayfly admin keygen`'s
# STEM.pub) a line; they become agent.toml's [console] section. Without it the console is
# off and updates can only be installed by root on the appliance (`mayfly-update install`).
if [ -n "${MAYFLY_ADMIN_KEYS:-}" ]; then
    if [ ! -r "$MAYFLY_ADMIN_KEYS" ] || ! grep -qxE '[0-9a-f]{64}' "$MAYFLY_ADMIN_KEYS" ||
        grep -vqxE '[0-9a-f]{64}' "$MAYFLY_ADMIN_KEYS"; then
        echo "post-build.sh: $MAYFLY_ADMIN_KEYS must hold one admin public key (64 lower-case hex digits) a line" >&2
        exit 1
    fi
    if grep -q '^\[console\]' "$TARGET_DIR/etc/mayfly/agent.toml"; then
        echo "post-build.sh: agent.toml already has a [console] section; MAYFLY_ADMIN_KEYS would repeat it" >&2
        exit 1
    fi
    quorum=${MAYFLY_ADMIN_QUORUM:-2}
    case $quorum in
        '' | *[!0-9]*) echo "post-build.sh: admin quorum '$quorum' is not a number" >&2; exit 1 ;;
    esac
    keys=$(sed 's/.*/"&"/' "$MAYFLY_ADMIN_KEYS" | paste -sd, -)
    printf '\n# The admins (post-build.sh, from MAYFLY_ADMIN_KEYS).\n[console]\nadmin_keys = [%s]\nquorum = %s\n' \
        "$keys" "$quorum" >>"$TARGET_DIR/etc/mayfly/agent.toml"
else
    echo "post-build.sh: no MAYFLY_ADMIN_KEYS: the admin console is off; updates only by root (mayfly-update install)" >&2
fi

# The image version: update bundles must be newer (rollback protection). From
# MAYFLY_IMAGE_VERSION, else board/mayfly/image-version.
version=${MAYFLY_IMAGE_VERSION:-$(cat "$BOARD_DIR/image-version")}
case $version in
    '' | *[!0-9]*) echo "post-build.sh: image version '$version' is not a number" >&2; exit 1 ;;
esac

# What this image is built from.
revision=$(git -C "$REPO_DIR" describe --always --dirty 2>/dev/null || echo unknown)
{
    echo "image_version=$version"
    echo "mayfly_revision=$revision"
    echo "source_date_epoch=${SOURCE_DATE_EPOCH:-unset}"
} >"$TARGET_DIR/etc/mayfly/image-info"
