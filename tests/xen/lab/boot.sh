#!/bin/bash
# Boot the patched Xen with a Debian 6.1 dom0 under QEMU (TCG), run a test
# script in dom0 and exit with its status.  See tests/xen/README.md.
#
# usage: boot.sh [--run SCRIPT] [--modules DIR] [--files DIR] [--timeout SEC]
#                [--log FILE] [--cmdline ARGS]
#   --run SCRIPT   executable run in dom0 as /kemari/run (cwd /kemari) once the
#                  toolstack is up; its exit status is boot.sh's.
#   --modules DIR  *.ko copied to /kemari/modules; xen-blkback.ko and
#                  xen-netback.ko replace the stock backends, others are
#                  insmod-ed after them.
#   --files DIR    copied to /kemari/files (helper binaries, data).
#   --timeout SEC  kill QEMU after this long (default 900); exit 124.
#   --log FILE     serial console log (default: the cache's logs/ directory).
#   --env K=V      exported to the run script (repeatable).
#   --cmdline ARGS extra hypervisor command line arguments.
set -euo pipefail
. "$(dirname "$0")/common.sh"

RUN="" MODULES="" FILES="" TIMEOUT=900 LOG="" XEN_ARGS="" ENVS=()
while [ $# -gt 0 ]; do
    case $1 in
    --run) RUN=$2; shift ;;
    --modules) MODULES=$2; shift ;;
    --files) FILES=$2; shift ;;
    --timeout) TIMEOUT=$2; shift ;;
    --log) LOG=$2; shift ;;
    --cmdline) XEN_ARGS=$2; shift ;;
    --env) ENVS+=("$2"); shift ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
    esac
    shift
done

ensure_pkgs /usr/bin/qemu-system-x86_64:qemu-system-x86 /bin/busybox:busybox-static \
    /usr/bin/cpio:cpio
XEN_BUILD=$("$LAB_DIR/build-xen.sh")
DOM0=$("$LAB_DIR/build-dom0.sh")
KV=$(basename "$DOM0" | sed 's/^dom0-\(.*\)-[0-9a-f]*$/\1/')

WORK=$(mktemp -d /tmp/kemari-xenlab.XXXXXX)
QPID=""
cleanup() {
    [ -n "$QPID" ] && kill "$QPID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The domU initramfs: static busybox, the frontends, our init.
D=$WORK/domu
mkdir -p "$D/bin" "$D/lib" "$D/proc" "$D/sys" "$D/dev"
cp /bin/busybox "$D/bin/"
for a in sh mount insmod ip ping dd grep echo sleep cat; do ln -s busybox "$D/bin/$a"; done
M=$DOM0/kernel/lib/modules/$KV/kernel/drivers
cp "$M/block/xen-blkfront.ko" "$M/net/xen-netfront.ko" "$D/lib/"
cp "$XEN_TESTS_DIR/domu/init" "$D/init"
# The overlay for dom0: everything under /kemari.
O=$WORK/overlay/kemari
mkdir -p "$O/domu" "$O/lab" "$O/modules" "$O/files"
(cd "$D" && find . | cpio -o -H newc 2>/dev/null) | gzip -1 > "$O/domu/initrd.cpio.gz"
cp "$DOM0/kernel/boot/vmlinuz-$KV" "$O/domu/vmlinuz"
cp "$LAB_DIR/hotplug-block" "$LAB_DIR/hotplug-vif" "$LAB_DIR/domu.sh" "$O/lab/"
[ -n "$MODULES" ] && cp "$MODULES"/*.ko "$O/modules/"
[ -n "$FILES" ] && cp -a "$FILES"/. "$O/files/"
[ -n "$RUN" ] && install -m 755 "$RUN" "$O/run"
for e in "${ENVS[@]}"; do printf 'export %q\n' "$e"; done > "$O/env"
cp "$LAB_DIR/dom0-init" "$WORK/overlay/init"
(cd "$WORK/overlay" && find . | cpio -o -H newc 2>/dev/null) > "$WORK/overlay.cpio"
# The kernel unpacks concatenated cpio archives in order: the overlay wins.
cat "$DOM0/base.cpio" "$WORK/overlay.cpio" > "$WORK/dom0.cpio"

mkdir -p "$KEMARI_XEN_CACHE/logs"
find "$KEMARI_XEN_CACHE/logs" -name '*.log' -mtime +7 -delete   # keep a week of logs
LOG=${LOG:-$KEMARI_XEN_CACHE/logs/boot-$(date +%Y%m%d-%H%M%S)-$$.log}
log "booting $XEN_BUILD/xen/xen (log: $LOG)"
START=$(date +%s)
# NOT -cpu max: with SMAP emulated, PV dom0 crashes in create_bounce_frame.
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -m 2048 -smp 2 \
    -cpu qemu64,+svm,+npt -display none -monitor none -serial stdio -no-reboot \
    -kernel "$XEN_BUILD/xen/xen" \
    -append "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 loglvl=all guest_loglvl=all noreboot $XEN_ARGS" \
    -initrd "$DOM0/kernel/boot/vmlinuz-$KV console=hvc0 earlyprintk=xen,$WORK/dom0.cpio" \
    < /dev/null > "$LOG" 2>&1 &
QPID=$!
tail -n +1 --pid="$QPID" -f "$LOG" 2>/dev/null |
    grep -a --line-buffered -E 'MARKER|KEMARI-|DOMU-|RESULT|FAIL|\(XEN\).*(kemari|Panic|FATAL)' || true
wait "$QPID" && qrc=0 || qrc=$?
QPID=""
ELAPSED=$(($(date +%s) - START))
[ "$qrc" = 124 ] && { log "TIMEOUT after ${ELAPSED}s"; exit 124; }
rc=$(grep -ao 'MARKER-RUN-EXIT rc=[0-9]*' "$LOG" | tail -1 | sed 's/.*rc=//')
[ -n "$rc" ] || { log "dom0 never reported (qemu rc=$qrc, ${ELAPSED}s)"; exit 125; }
log "dom0 run script exit $rc after ${ELAPSED}s"
exit "$rc"
