#!/bin/bash
# Build (or reuse) the patched hypervisor.  The build directory is keyed by a
# hash of the patch series and of this script, so changing a patch rebuilds
# and an unchanged series is reused.  Prints the build directory; the
# hypervisor is DIR/xen/xen (multiboot ELF) and DIR/xen/xen-syms.
set -euo pipefail
. "$(dirname "$0")/common.sh"

ensure_pkgs /usr/bin/flex:flex /usr/bin/bison:bison /usr/bin/checkpolicy:checkpolicy \
    /usr/bin/gcc:build-essential /usr/bin/python3:python3
OUT=$KEMARI_XEN_CACHE/xen-build-$(series_hash)
mkdir -p "$KEMARI_XEN_CACHE"
exec 9> "$KEMARI_XEN_CACHE/.build-xen.lock"
flock 9   # concurrent callers wait for one build
if [ -f "$OUT/.complete" ]; then
    echo "$OUT"
    exit 0
fi

rm -rf "$OUT" && mkdir -p "$(dirname "$OUT")"
"$LAB_DIR/xen-source.sh" "$OUT" >&2
"$LAB_DIR/apply-series.sh" "$OUT" >&2

# Debian's hypervisor configuration, plus shadow paging (log-dirty for PV
# guests) and XSM/FLASK so the FLASK hook and policy are compiled and checked;
# the dummy XSM policy stays the default at run time.
cp "$OUT/debian/xen-kconfig" "$OUT/xen/.config"
cat >> "$OUT/xen/.config" <<'CFG'
CONFIG_SHADOW_PAGING=y
CONFIG_XSM=y
CONFIG_XSM_FLASK=y
CONFIG_XSM_FLASK_POLICY=y
CONFIG_XSM_DUMMY_DEFAULT=y
CFG
make -C "$OUT/xen" olddefconfig > "$OUT/build.log" 2>&1
for c in SHADOW_PAGING XSM_FLASK XSM_FLASK_POLICY; do
    grep -q "^CONFIG_$c=y" "$OUT/xen/.config" || die "CONFIG_$c did not stick"
done
log "building the hypervisor in $OUT (log: $OUT/build.log)"
nice -n 10 make -C "$OUT/xen" -j2 >> "$OUT/build.log" 2>&1 ||
    { tail -30 "$OUT/build.log" >&2; die "hypervisor build failed"; }
touch "$OUT/.complete"
# Keep the three most recent builds (other series may be in use elsewhere).
ls -dt "$KEMARI_XEN_CACHE"/xen-build-* | tail -n +4 | xargs -r rm -rf
echo "$OUT"
