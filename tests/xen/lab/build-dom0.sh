#!/bin/bash
# Build (or reuse) the Debian dom0 pieces: the 6.1 kernel and a base initramfs
# holding a debootstrapped bookworm with xen-utils-4.17 (4.17.5 from bookworm
# main, the same release as the patched hypervisor).
# Prints the directory holding kernel/ (unpacked linux-image), rootfs/ and
# base.cpio: $KEMARI_XEN_CACHE/dom0-<kver>-<hash of the package list>/.
set -euo pipefail
. "$(dirname "$0")/common.sh"

ensure_pkgs /usr/sbin/debootstrap:debootstrap /usr/bin/cpio:cpio /sbin/depmod:kmod \
    /usr/share/keyrings/debian-archive-keyring.gpg:debian-archive-keyring
KV=$(kernel_version)
[ -n "$KV" ] || die "cannot find the Debian 6.1 kernel version (apt-get update?)"
PKGS=xen-utils-4.17,xenstore-utils,busybox,kmod,iproute2,procps,util-linux
OUT=$KEMARI_XEN_CACHE/dom0-$KV-$(echo "$PKGS" | sha256sum | cut -c1-8)
mkdir -p "$OUT"
exec 9> "$OUT/.lock"
flock 9   # concurrent callers wait for one build

# 1. The kernel package, unpacked (vmlinuz + modules for dom0 and the domU).
if [ ! -f "$OUT/kernel/boot/vmlinuz-$KV" ]; then
    log "fetching linux-image-$KV"
    rm -rf "$OUT/kernel" "$OUT/debs" && mkdir -p "$OUT/debs"
    (cd "$OUT/debs" && apt-get download -q "linux-image-$KV" >/dev/null)
    dpkg -x "$OUT"/debs/linux-image-"$KV"_*.deb "$OUT/kernel"
    rm -rf "$OUT/debs"
fi

# 2. The dom0 root file system.
if [ ! -f "$OUT/rootfs/.complete" ]; then
    log "debootstrap bookworm ($PKGS)"
    rm -rf "$OUT/rootfs"
    nice -n 10 debootstrap --variant=minbase --include="$PKGS" bookworm "$OUT/rootfs" \
        "$(apt_mirror)" > "$OUT/debootstrap.log" 2>&1 ||
        { tail -20 "$OUT/debootstrap.log" >&2; die "debootstrap failed"; }
    touch "$OUT/rootfs/.complete"
fi

# 3. The base initramfs: the root fs minus what a test never uses, plus the
#    kernel's Xen, block, loop and network modules (an uncompressed cpio:
#    gunzip is slow under TCG).
STAMP=$OUT/base.cpio.$(sha256sum "$0" | cut -c1-8)   # repack when this script changes
if [ ! -f "$STAMP" ]; then
    log "packing the base dom0 initramfs"
    T=$OUT/base.tmp
    rm -rf "$T" && cp -a "$OUT/rootfs" "$T"
    (cd "$T" && rm -rf usr/share/doc usr/share/man usr/share/locale usr/share/info \
        usr/share/zoneinfo var/cache/apt/* var/lib/apt/lists/* usr/lib/udev/hwdb.bin \
        usr/lib/xen-4.17/boot usr/lib/x86_64-linux-gnu/gconv lib/modules)
    M=lib/modules/$KV/kernel
    for m in drivers/xen drivers/block/loop.ko drivers/block/xen-blkback \
             drivers/block/xen-blkfront.ko drivers/net/xen-netback drivers/net/xen-netfront.ko; do
        mkdir -p "$T/$(dirname "$M/$m")"
        cp -a "$OUT/kernel/$M/$m" "$T/$M/$m"
    done
    cp "$OUT/kernel/lib/modules/$KV/modules.order" "$OUT/kernel/lib/modules/$KV/modules.builtin" \
        "$T/lib/modules/$KV/"
    depmod -b "$T" "$KV"
    cp "$OUT/kernel/boot/vmlinuz-$KV" "$T/boot/vmlinuz"
    (cd "$T" && find . | cpio -o -H newc 2>/dev/null > "$OUT/base.cpio.tmp")
    mv "$OUT/base.cpio.tmp" "$OUT/base.cpio"
    rm -rf "$T" "$OUT"/base.cpio.????????
    touch "$STAMP"
fi
echo "$OUT"
