#!/usr/bin/env bash
# Regenerates src/generated/ from Debian 12's Xen 4.17 headers with Debian 12's bindgen.
#
#   bindgen/xen-sys/generate.sh [OUT_DIR]     (default: bindgen/xen-sys/src/generated)
#
# Needs: bindgen 0.60.1 (Debian package `bindgen`), libclang-dev, libxen-dev 4.17 and the
# workspace's pinned rustfmt (run from inside the repository). The output is checked in;
# check-drift.sh regenerates it into a temporary directory and fails on any difference.
#
# Layout of the output (see README.md):
#   types.rs            every type, constant and macro value the functions below need,
#                       with bindgen's layout tests;
#   <library>.rs        one struct per library in bindgen's dynamic-loading form: the
#                       library's functions as fields, resolved with libloading at run time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/src/generated}
want_bindgen="bindgen 0.60.1"
have_bindgen=$(bindgen --version 2>/dev/null || true)
if [ "$have_bindgen" != "$want_bindgen" ]; then
    echo "generate.sh: need $want_bindgen (Debian 12 package 'bindgen'), found '${have_bindgen:-none}'" >&2
    exit 2
fi
for h in xenctrl.h xenguest.h xengnttab.h xenevtchn.h xenforeignmemory.h xentoollog.h; do
    [ -f "/usr/include/$h" ] || { echo "generate.sh: /usr/include/$h missing (apt-get install libxen-dev)" >&2; exit 2; }
done
mkdir -p "$out"
cd "$here"

# Functions of each library, by name prefix. libxenguest's functions share libxenctrl's
# "xc_" prefix, so they are told apart by header instead.
ctrl_fns='xc_.*'
guest_file='.*/xenguest\.h'
gnttab_fns='(xengnttab|xengntshr)_.*'
evtchn_fns='xenevtchn_.*'
fmem_fns='xenforeignmemory_.*'
toollog_fns='(xtl|xentoollog)_.*'
all_fns="(xc|xengnttab|xengntshr|xenevtchn|xenforeignmemory|xtl|xentoollog)_.*"
# Constants the wrapper uses (version query, domain info flags, shutdown reasons, ...).
vars='(XEN|XENVER|XC|XENEVTCHN|XENGNTTAB|XENFOREIGNMEMORY|XTL|DOMID|SHUTDOWN|GNTTAB|GTF|_XEN_DOMINF)_.*'

common=(--no-doc-comments --rust-target 1.47 --default-enum-style consts)

# Types: everything the functions reach (functions themselves blocked).
bindgen "${common[@]}" wrapper.h \
    --allowlist-function "$all_fns" --blocklist-function '.*' \
    --allowlist-var "$vars" \
    -o "$out/types.rs"

# lib_run <file> <struct> <bindgen selection args...>
lib_run() {
    local file=$1 name=$2
    shift 2
    bindgen "${common[@]}" wrapper.h --no-layout-tests \
        --dynamic-loading "$name" --blocklist-type '.*' "$@" -o "$out/$file"
}
lib_run xenctrl.rs XenCtrl --allowlist-function "$ctrl_fns" --blocklist-file "$guest_file"
lib_run xenguest.rs XenGuest --allowlist-file "$guest_file" --blocklist-item '[A-Z_][A-Za-z0-9_]*'
lib_run xengnttab.rs XenGnttab --allowlist-function "$gnttab_fns"
lib_run xenevtchn.rs XenEvtchn --allowlist-function "$evtchn_fns"
lib_run xenforeignmemory.rs XenForeignMemory --allowlist-function "$fmem_fns"
lib_run xentoollog.rs XenToolLog --allowlist-function "$toollog_fns"
