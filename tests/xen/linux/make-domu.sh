#!/bin/bash
# Build the attach test's domU initramfs: static busybox, the Debian
# kernel's PV frontends and domu-init.
# Usage: make-domu.sh MODULES_DIR OUT.cpio.gz
#   MODULES_DIR is the unpacked kernel's lib/modules/<version> (the domU runs
#   the same Debian kernel as dom0).
set -euo pipefail
MODS=${1:?MODULES_DIR}; OUT=$(realpath -m "${2:?OUT.cpio.gz}")
HERE=$(cd "$(dirname "$0")" && pwd)
BB=/bin/busybox
if ! file -L "$BB" 2>/dev/null | grep -q 'statically linked' || ! command -v cpio >/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends busybox-static file cpio >/dev/null
fi
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
mkdir -p "$T"/{bin,lib,proc,sys,dev,tmp}
cp "$BB" "$T/bin/busybox"
for a in sh mount cat echo sleep head dd printf ip ping insmod seq grep ls arp; do ln -s busybox "$T/bin/$a"; done
cp "$MODS/kernel/drivers/block/xen-blkfront.ko" "$MODS/kernel/drivers/net/xen-netfront.ko" "$T/lib/"
install -m 755 "$HERE/domu-init" "$T/init"
(cd "$T" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$OUT.tmp")
mv "$OUT.tmp" "$OUT"
