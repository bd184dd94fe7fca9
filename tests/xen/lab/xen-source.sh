#!/bin/bash
# Unpack Debian's xen source package ($XEN_SRC_VERSION, bookworm main, with
# Debian's own patches applied) into DEST.  The download is cached.
# Usage: xen-source.sh DEST
set -euo pipefail
. "$(dirname "$0")/common.sh"

DEST=${1:?usage: xen-source.sh DEST}
ensure_pkgs /usr/bin/dpkg-source:dpkg-dev /usr/bin/xz:xz-utils
SRC=$KEMARI_XEN_CACHE/src
DSC=$SRC/xen_$XEN_SRC_VERSION.dsc
if [ ! -f "$DSC" ]; then
    apt_private
    mkdir -p "$SRC"
    log "apt-get source xen=$XEN_SRC_VERSION"
    (cd "$SRC" && apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root -q \
        source --download-only "xen=$XEN_SRC_VERSION" >/dev/null)
fi
[ -e "$DEST" ] && die "$DEST already exists"
# The .dsc was verified by apt through the signed Sources index.
dpkg-source -q --no-copy -x "$DSC" "$DEST" >/dev/null 2>&1 || die "dpkg-source -x failed"
