#!/bin/bash
# Build Debian's xen-blkback.ko and xen-netback.ko with linux-patches/series
# applied, as out-of-tree modules for the Debian 6.1 kernel the mirror serves.
#
# Usage: build-modules.sh OUTDIR
#   OUTDIR gets xen-blkback.ko, xen-netback.ko and build-info (kernel ABI,
#   package version, series hash).
# Environment:
#   KEMARI_LINUX_ABI   pin the kernel ABI (e.g. 6.1.0-50); default: what
#                      linux-image-amd64 depends on in the mirror's index
#   KEMARI_TEST_CACHE  cache root (default /var/cache/kemari-test)
#   KEMARI_LINUX_PATCHES  patch directory (default: the repository's linux-patches)
#
# Debian packages are fetched with apt-get download through private apt
# directories that read the machine's own sources (/etc/apt/sources.list.d):
# nothing is installed from them.  Only the two driver directories are taken
# out of linux-source-6.1; the headers come from linux-headers-*.
set -euo pipefail

OUT=${1:?usage: build-modules.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
PATCHES=${KEMARI_LINUX_PATCHES:-$REPO/linux-patches}
CACHE=${KEMARI_TEST_CACHE:-/var/cache/kemari-test}/linux
DRIVERS=(drivers/block/xen-blkback drivers/net/xen-netback)
log() { echo "[build-modules $(date +%T)] $*" >&2; }
die() { echo "[build-modules] ERROR: $*" >&2; exit 1; }

# Install Debian packages (waiting for another apt/dpkg run to finish).
apt_install() {
    log "installing $*"
    apt-get -o DPkg::Lock::Timeout=600 update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
            --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
}

# Host tools (command:package): the kernel was built with gcc-12.
missing=()
for t in gcc-12:gcc-12 make:make xz:xz-utils modinfo:kmod patch:patch sha256sum:coreutils \
         tar:tar dpkg:dpkg apt-get:apt; do
    command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# Private apt state, reading the machine's own mirror configuration.
APT=$CACHE/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
exec 9> "$CACHE/.lock"
flock 9   # concurrent callers (other test runs sharing the cache) wait for one build
AOPT=(-o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache"
      -o Dir::State::status=/var/lib/dpkg/status -o APT::Sandbox::User=root)
update_lists() {
    log "apt-get update (private lists)"
    apt-get "${AOPT[@]}" update -qq || die "apt-get update failed"
}
[ -n "$(find "$APT/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null)" ] || update_lists

ABI=${KEMARI_LINUX_ABI:-}
if [ -z "$ABI" ]; then
    ABI=$(apt-cache "${AOPT[@]}" depends linux-image-amd64 \
          | sed -n 's/^ *Depends: linux-image-\(6\.1\.0-[0-9]*\)-amd64$/\1/p' | head -1)
    [ -n "$ABI" ] || die "cannot find the kernel linux-image-amd64 depends on"
fi
KREL=$ABI-amd64
# A kernel newer than the private lists (the caller read fresher ones): refresh them.
apt-cache "${AOPT[@]}" show "linux-image-$KREL" >/dev/null 2>&1 || update_lists

# A consistent package set from what the mirror serves today.  The kernel
# image fixes the version; the headers and the source must be that same
# version; linux-kbuild-6.1 and the -common headers are whatever the headers
# package depends on (Debian only requires kbuild >= the headers' version,
# and the mirror may carry a newer revision of it only).
served() {  # PKG: every version the mirror's binary indexes hold
    apt-cache "${AOPT[@]}" madison "$1" | awk -F'|' '/Packages/{gsub(/ /, "", $2); print $2}' | sort -u
}
satisfying() {  # PKG [OP VERSION]: the newest served version of PKG that satisfies OP VERSION
    local v best=""
    for v in $(served "$1"); do
        [ -z "${2:-}" ] || dpkg --compare-versions "$v" "$2" "$3" || continue
        [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best" && best=$v
    done
    echo "$best"
}
unserved() {  # PKG NEED: die naming the package, the version needed and what is served
    die "the mirror cannot serve a consistent set for kernel $KREL: $1 $2 is needed, served: $(served "$1" | tr '\n' ' ')"
}
PKGVER=$(apt-cache "${AOPT[@]}" show --no-all-versions "linux-image-$KREL" 2>/dev/null \
         | sed -n 's/^Version: //p' | head -1) || true
[ -n "$PKGVER" ] || die "linux-image-$KREL is not in the mirror's index (linux-image-amd64 served: $(served linux-image-amd64 | tr '\n' ' '))"
for p in "linux-headers-$KREL" linux-source-6.1; do
    [[ " $(served "$p" | tr '\n' ' ') " == *" $PKGVER "* ]] || unserved "$p" "= $PKGVER"
done
# "linux-kbuild-6.1 (>= 6.1.192-2)" -> "linux-kbuild-6.1 ge 6.1.192-2"; unversioned: the name only.
SET=("linux-source-6.1=$PKGVER" "linux-headers-$KREL=$PKGVER")
while read -r name op ver; do
    case $name in linux-headers-*-common|linux-kbuild-*) ;; *) continue ;; esac
    case $op in '>=') op=ge ;; '<=') op=le ;; '=') op=eq ;; '>>') op=gt ;; '<<') op=lt ;; esac
    v=$(satisfying "$name" ${op:+"$op" "$ver"})
    [ -n "$v" ] || unserved "$name" "${op:+$op $ver} (a dependency of linux-headers-$KREL $PKGVER)"
    SET+=("$name=$v")
    case $name in linux-kbuild-*) KBUILD=$name=$v ;; esac
done < <(apt-cache "${AOPT[@]}" show "linux-headers-$KREL=$PKGVER" | sed -n 's/^Depends: //p' \
         | head -1 | tr ',' '\n' | sed 's/[()]//g')
[ -n "${KBUILD:-}" ] || die "linux-headers-$KREL $PKGVER depends on no linux-kbuild package"
log "kernel $KREL: ${SET[*]}"

# The kbuild tools (modpost, objtool) are unpacked, not installed: install
# the libraries they link against (linux-kbuild's own Depends).
libs=$(apt-cache "${AOPT[@]}" show "$KBUILD" | sed -n 's/^Depends: //p' | head -1 \
       | tr ',' '\n' | sed 's/[(|].*//; s/ //g')
missing=()
for l in $libs; do
    dpkg-query -W -f='${Status}' "$l" 2>/dev/null | grep -q 'ok installed' || missing+=("$l")
done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# Pristine inputs for this package set: debs, headers tree, driver sources.
V=$CACHE/$PKGVER+kbuild-${KBUILD#*=}
if [ ! -f "$V/ready" ]; then
    rm -rf "$V" && mkdir -p "$V/debs" "$V/root" "$V/src"
    (cd "$V/debs" && apt-get "${AOPT[@]}" download -q "${SET[@]}" >/dev/null) \
        || die "apt-get download ${SET[*]} failed"
    for d in "$V"/debs/linux-headers-*.deb "$V"/debs/linux-kbuild-*.deb; do
        dpkg -x "$d" "$V/root"
    done
    # The flavour Makefile includes the common one by absolute path.
    echo "include $V/root/usr/src/linux-headers-$ABI-common/Makefile" \
        > "$V/root/usr/src/linux-headers-$KREL/Makefile"
    dpkg --fsys-tarfile "$V"/debs/linux-source-6.1_*.deb \
        | tar -xO ./usr/src/linux-source-6.1.tar.xz \
        | xz -dc | tar -x -C "$V/src" --strip-components=1 \
            "${DRIVERS[@]/#/linux-source-6.1/}"
    rm -f "$V"/debs/linux-source-6.1_*.deb   # 140 MB, only two directories were needed
    touch "$V/ready"
fi
KDIR=$V/root/usr/src/linux-headers-$KREL

# One build directory per (package version, series, patches, this script).
KEY=$( { echo "${SET[*]}"; cat "$PATCHES/series"; \
         while read -r p; do [ -n "$p" ] && cat "$PATCHES/$p"; done < "$PATCHES/series"; \
         cat "$0"; } | sha256sum | cut -c1-16)
B=$CACHE/build-$PKGVER-$KEY
if [ ! -f "$B/done" ]; then
    rm -rf "$B" && mkdir -p "$B"
    trap '[ -f "$B/done" ] || rm -rf "$B"' EXIT   # no half-built cache entry
    cp -a "$V/src/drivers" "$B/"
    while read -r p; do
        [ -z "$p" ] && continue
        log "applying $p"
        (cd "$B" && patch -p1 --fuzz=0 --no-backup-if-mismatch -s < "$PATCHES/$p") \
            || die "$p does not apply cleanly to linux $PKGVER"
    done < "$PATCHES/series"
    log "building in $B"
    nice -n 10 make -s -C "$KDIR" M="$B/drivers/block/xen-blkback" \
        CONFIG_XEN_BLKDEV_BACKEND=m -j2 modules >"$B/build.log" 2>&1 \
        || { cat "$B/build.log" >&2; die "xen-blkback build failed"; }
    nice -n 10 make -s -C "$KDIR" M="$B/drivers/net/xen-netback" \
        CONFIG_XEN_NETDEV_BACKEND=m -j2 modules >>"$B/build.log" 2>&1 \
        || { cat "$B/build.log" >&2; die "xen-netback build failed"; }
    if grep -E 'warning:|error:' "$B/build.log" >&2; then
        die "compiler warnings (see above)"
    fi
    touch "$B/done"
else
    log "cached build $B"
fi

mkdir -p "$OUT"
cp "$B/drivers/block/xen-blkback/xen-blkback.ko" "$B/drivers/net/xen-netback/xen-netback.ko" "$OUT/"
for m in xen-blkback xen-netback; do
    vm=$(modinfo -F vermagic "$OUT/$m.ko")
    case "$vm" in
        "$KREL "*) ;;
        *) die "$m.ko vermagic '$vm' does not match $KREL" ;;
    esac
done
printf 'kernel=%s\npackage_version=%s\nseries_key=%s\n' "$KREL" "$PKGVER" "$KEY" > "$OUT/build-info"
log "done: $OUT/xen-blkback.ko $OUT/xen-netback.ko ($KREL)"
