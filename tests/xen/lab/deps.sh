#!/bin/bash
# Install every Debian package the Xen lab needs (idempotent; apt-get update
# first when something is missing).  The other lab scripts install their own
# subset; this is the one-stop list, also used before building dom0 tools.
set -euo pipefail
. "$(dirname "$0")/common.sh"

ensure_pkgs \
    /usr/bin/qemu-system-x86_64:qemu-system-x86 \
    /usr/sbin/debootstrap:debootstrap \
    /usr/bin/cpio:cpio \
    /sbin/depmod:kmod \
    /bin/busybox:busybox-static \
    /usr/bin/flex:flex \
    /usr/bin/bison:bison \
    /usr/bin/checkpolicy:checkpolicy \
    /usr/bin/dpkg-source:dpkg-dev \
    /usr/bin/xz:xz-utils \
    /usr/bin/gcc:build-essential \
    /usr/bin/make:make \
    /usr/bin/python3:python3 \
    /usr/include/xenctrl.h:libxen-dev \
    /usr/share/keyrings/debian-archive-keyring.gpg:debian-archive-keyring
