#!/usr/bin/env bash
# Checks package/mayfly-xen-dist against Xen 4.17's real source, as Buildroot would use it,
# without compiling anything:
#   1. the source tarball: the one the package pins (.mk and .hash), else, when Debian's
#      archive no longer serves it, the newest 4.17 one it does serve (said so loudly);
#      fetched with `apt-get source --download-only` from Debian's deb-src lists, kept apart
#      from the system's (nothing of the machine's apt configuration changes);
#   2. the board's patches (board/mayfly/patches/mayfly-xen-dist/*.patch, in order) apply
#      with the options of Buildroot's support/scripts/apply-patches.sh (patch -g0 -p1 -E
#      -N -t), without a reject or fuzz;
#   3. configure with the package's MAYFLY_XEN_DIST_CONF_OPTS (read from the .mk) succeeds
#      (skipped with --no-configure or when its build dependencies are missing; the
#      missing ones are named);
#   4. after configure, the tools' build list (tools/Makefile's SUBDIRS-y, as make computes
#      it) has no python, pygrub or firmware (hvmloader): what the patch is for.
#
# Usage: buildroot/scripts/check-xen-source.sh [--no-configure] [TARBALL]
#   TARBALL: a xen_*.orig.tar.xz already at hand (nothing is downloaded).
# Needs apt-get, patch, tar, xz; configure needs gcc, make, python3, flex, bison, pkg-config,
# iasl (acpica-tools), uuid-dev, libyajl-dev, zlib1g-dev, libncurses-dev, liblzma-dev,
# libzstd-dev (scripts/lib.sh's ensure_xen_configure_tools installs them; under CI=true a
# missing one is a failure, elsewhere configure is skipped and says so).
# Exit 0 when every check ran and passed; 1 on a failure; the last line is the summary.
set -euo pipefail
EXT=$(cd "$(dirname "$0")/.." && pwd)
PKG=$EXT/package/mayfly-xen-dist
PATCHES=$EXT/board/mayfly/patches/mayfly-xen-dist
configure=1
if [ "${1:-}" = --no-configure ]; then
    configure=0
    shift
fi
WORK=$(mktemp -d /tmp/mayfly-xen-source.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
failures=0
ok() { echo "ok: $*"; }
bad() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

version=$(sed -n 's/^MAYFLY_XEN_DIST_VERSION = //p' "$PKG/mayfly-xen-dist.mk")
pinned_tarball=xen_$version.orig.tar.xz
pinned_sha=$(awk -v f="$pinned_tarball" '$1 == "sha256" && $3 == f { print $2 }' "$PKG/mayfly-xen-dist.hash")
if [ -z "$version" ] || [ -z "$pinned_sha" ]; then
    echo "check-xen-source: no version or hash in $PKG" >&2
    exit 1
fi

echo "==> source tarball"
tarball=${1:-}
if [ -z "$tarball" ]; then
    # Debian's deb-src lists in a directory of our own: the machine's apt state is not touched.
    mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/dl"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    {
        echo "deb-src [signed-by=$keyring] http://deb.debian.org/debian bookworm main"
        echo "deb-src [signed-by=$keyring] http://deb.debian.org/debian-security bookworm-security main"
    } >"$WORK/apt/sources.list"
    apt_opts=(-o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Etc::SourceList=$WORK/apt/sources.list"
        -o "Dir::Etc::SourceParts=$WORK/apt/none" -o "Dir::Cache=$WORK/apt/cache"
        -o "APT::Sandbox::User=root")
    apt-get "${apt_opts[@]}" -qq update >"$WORK/apt-update.log" 2>&1 || {
        cat "$WORK/apt-update.log" >&2
        echo "check-xen-source: apt-get update of the deb-src lists failed" >&2
        exit 1
    }
    mapfile -t versions < <(apt-cache "${apt_opts[@]}" showsrc xen | sed -n 's/^Version: //p' |
        grep '^4\.17\.' | sort -rV)
    fetched=
    for v in "${versions[@]}"; do
        case $v in
            "$version"-*) ;;
            *) continue ;;
        esac
        if (cd "$WORK/dl" && apt-get "${apt_opts[@]}" -qq source --download-only "xen=$v" >/dev/null 2>&1); then
            fetched=$v
        fi
        break
    done
    if [ -z "$fetched" ]; then
        echo "NOTE: Debian's archive does not serve the pinned $pinned_tarball (any more);"
        echo "NOTE: checking against the newest Xen 4.17 source it serves instead."
        for v in "${versions[@]}"; do
            if (cd "$WORK/dl" && apt-get "${apt_opts[@]}" -qq source --download-only "xen=$v" >/dev/null 2>&1); then
                fetched=$v
                break
            fi
        done
    fi
    [ -n "$fetched" ] || {
        echo "check-xen-source: no Xen 4.17 source could be downloaded (${versions[*]:-none listed})" >&2
        exit 1
    }
    tarball=$(ls "$WORK"/dl/xen_*.orig.tar.xz)
    echo "source: Debian's xen $fetched"
fi
sha=$(sha256sum "$tarball" | cut -d' ' -f1)
if [ "$(basename "$tarball")" = "$pinned_tarball" ]; then
    if [ "$sha" = "$pinned_sha" ]; then
        ok "$pinned_tarball has the SHA-256 the package pins"
    else
        bad "$pinned_tarball has SHA-256 $sha, the package pins $pinned_sha"
    fi
else
    echo "NOTE: $(basename "$tarball") is not the pinned $pinned_tarball: patches and configure are checked on it"
fi
mkdir -p "$WORK/src"
tar -C "$WORK/src" -xf "$tarball"
src=$(find "$WORK/src" -mindepth 1 -maxdepth 1 -type d | head -n 1)

echo "==> board patches, applied as Buildroot's apply-patches.sh does"
shopt -s nullglob
patches=("$PATCHES"/*.patch)
[ "${#patches[@]}" -gt 0 ] || bad "no patch in $PATCHES"
for p in "${patches[@]}"; do
    if out=$(patch -g0 -p1 -E -N -t --no-backup-if-mismatch -d "$src" <"$p" 2>&1); then
        if printf '%s\n' "$out" | grep -qiE 'fuzz|offset'; then
            bad "$(basename "$p") applies only with fuzz or offset: $(printf '%s' "$out" | tr '\n' '|')"
        else
            ok "$(basename "$p") applies cleanly"
        fi
    else
        bad "$(basename "$p") does not apply: $(printf '%s' "$out" | tr '\n' '|')"
    fi
done
if [ -n "$(find "$src" -name '*.rej' -print -quit)" ]; then
    bad "rejects left: $(find "$src" -name '*.rej' | tr '\n' ' ')"
fi

# SUBDIRS-y of tools/Makefile as make computes it (needs config/Tools.mk: after configure).
tool_subdirs() {
    # shellcheck disable=SC2016 # $(SUBDIRS-y) is make's, not the shell's
    make -s -C "$src/tools" --no-print-directory \
        --eval 'mayfly-print-subdirs: ; @echo $(SUBDIRS-y)' mayfly-print-subdirs
}

if [ "$configure" = 1 ]; then
    echo "==> configure with MAYFLY_XEN_DIST_CONF_OPTS"
    missing=
    for tool in gcc make python3 flex bison pkg-config iasl; do
        command -v "$tool" >/dev/null || missing="$missing $tool"
    done
    for pc in uuid yajl zlib ncurses liblzma libzstd; do
        pkg-config --exists "$pc" 2>/dev/null || missing="$missing $pc(pkg-config)"
    done
    if [ -n "$missing" ] && [ -n "${CI:-}" ]; then
        # CI installs them (scripts/lib.sh, ensure_xen_configure_tools): a skip would hide that.
        bad "configure: missing build dependencies:$missing"
        configure=0
    elif [ -n "$missing" ]; then
        echo "SKIP: configure: missing build dependencies:$missing"
        configure=0
    fi
fi
if [ "$configure" = 1 ]; then
    # The options as the .mk lists them (one a line after `MAYFLY_XEN_DIST_CONF_OPTS = \`).
    mapfile -t opts < <(sed -n '/^MAYFLY_XEN_DIST_CONF_OPTS = /,/^$/p' "$PKG/mayfly-xen-dist.mk" |
        grep -oE -- '--[a-z0-9-]+(=[^ \\]+)?')
    [ "${#opts[@]}" -ge 5 ] || bad "could not read MAYFLY_XEN_DIST_CONF_OPTS (${opts[*]:-none})"
    if (cd "$src" && PYTHON=python3 ./configure --prefix=/usr "${opts[@]}") >"$WORK/configure.log" 2>&1; then
        ok "configure ${opts[*]}"
        subdirs=$(tool_subdirs)
        echo "tools built: $subdirs"
        for unwanted in python pygrub firmware; do
            if printf ' %s ' "$subdirs" | grep -q " $unwanted "; then
                bad "tools/$unwanted is still built"
            else
                ok "tools/$unwanted is not built"
            fi
        done
        # What dom0 needs stays: the libraries, xl, xenstored, xenconsoled, the hotplug
        # scripts and xen-init-dom0 (helpers).
        for wanted in libs xl xenstore console hotplug helpers; do
            if printf ' %s ' "$subdirs" | grep -q " $wanted "; then
                ok "tools/$wanted is built"
            else
                bad "tools/$wanted is no longer built"
            fi
        done
    else
        tail -n 20 "$WORK/configure.log"
        bad "configure with the package's options failed"
    fi
else
    echo "==> (configure not run: the build list is checked in tools/Makefile's text)"
    for unwanted in python pygrub firmware; do
        if grep -qE "^SUBDIRS-.*\+= *$unwanted\$" "$src/tools/Makefile"; then
            bad "tools/Makefile still builds $unwanted"
        else
            ok "tools/Makefile does not build $unwanted"
        fi
    done
fi

if [ "$failures" = 0 ]; then
    echo "xen source check: all passed"
else
    echo "xen source check: $failures failed"
    exit 1
fi
