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

# What this image is built from.
revision=$(git -C "$REPO_DIR" describe --always --dirty 2>/dev/null || echo unknown)
{
    echo "mayfly_revision=$revision"
    echo "source_date_epoch=${SOURCE_DATE_EPOCH:-unset}"
} >"$TARGET_DIR/etc/mayfly/image-info"
