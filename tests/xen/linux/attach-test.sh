#!/bin/bash
# Runs in dom0 (toolstack up: xenstored, xenconsoled with --log=guest).
# Loads the patched xen-blkback/xen-netback, starts a PV domU with a vbd and a
# vif, checks disk and network I/O flow through them, then exercises the
# Kemari attach path: with the domU paused the backends are unbound, the domU
# runs a while with nobody serving its rings (its requests pile up
# unanswered), the backends are re-bound with kemari-attach=1 and the domU's
# I/O must continue without its frontends leaving Connected.
#
# Usage: attach-test.sh MODDIR DOMU_KERNEL DOMU_RAMDISK
#   MODDIR holds xen-blkback.ko and xen-netback.ko (build-modules.sh).
#   Set KEMARI_EXPECT=stock to run the same steps with Debian's modules as a
#   control: I/O also resumes there (Xen marks a newly bound interdomain port
#   pending, and Linux 6.1 re-attaches rings on re-bind), but the re-bound
#   backends publish InitWait to the Connected frontends first.
# Prints "RESULT <name> ok|FAIL <detail>" lines and finally
# "ATTACH-TEST PASS" or "ATTACH-TEST FAIL".
set -u
MODDIR=${1:?MODDIR}; KERNEL=${2:?DOMU_KERNEL}; RAMDISK=${3:?DOMU_RAMDISK}
HERE=$(cd "$(dirname "$0")" && pwd)
EXPECT=${KEMARI_EXPECT:-patched}
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
LOG=/var/log/xen/console/guest-kemari-attach.log
. "$HERE/results.sh"
last() { # highest <n> of "DOMU-IO <n> ok" / "DOMU-NET <n> ok" lines
    grep -ao "$1 [0-9]* ok" "$LOG" 2>/dev/null | awk '$2>m{m=$2} END{print m+0}'
}
gt() { [ "$(last "$1")" -gt "$2" ]; }
cleanup() {
    for p in "${WATCHERS[@]}"; do kill "$p" 2>/dev/null; done
    xl destroy kemari-attach 2>/dev/null
    [ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null
}
trap cleanup EXIT

# 1. Modules: the patched backends replace Debian's.
KV=$(uname -r)
insmod "/lib/modules/$KV/kernel/drivers/block/loop.ko" 2>/dev/null
for m in xen-blkback xen-netback; do
    rmmod "$m" 2>/dev/null
    if [ "$EXPECT" = stock ]; then
        f=$(find "/lib/modules/$KV/kernel/drivers" -name "$m.ko" | head -1)
    else
        f=$MODDIR/$m.ko
    fi
    insmod "$f" || { result "load_$m" FAIL "insmod $f"; continue; }
    # Out-of-tree modules taint the kernel with O; Debian's own do not.
    taint=$(cat "/sys/module/${m//-/_}/taint")
    if [ "$EXPECT" = stock ]; then
        check "load_$m" "taint='$taint' file=$f" [ -z "$taint" ]
    else
        check "load_$m" "taint='$taint' file=$f" [ -n "$(echo "$taint" | grep O)" ]
    fi
done

# 2. A PV domU with a 16 MiB file-backed disk and a point-to-point vif.
dd if=/dev/zero of=/root/kemari-disk.img bs=1M count=16 2>/dev/null
LOOP=$(losetup -f --show /root/kemari-disk.img) || { result losetup FAIL; exit 1; }
install -m 755 "$HERE/vif-kemari-test" "$HERE/block-kemari-test" /etc/xen/scripts/
cat > /tmp/kemari-attach.cfg <<CFG
name = "kemari-attach"
type = "pv"
kernel = "$KERNEL"
ramdisk = "$RAMDISK"
extra = "console=hvc0 quiet"
memory = 128
vcpus = 1
disk = [ "format=raw,vdev=xvda,access=rw,script=block-kemari-test,target=$LOOP" ]
vif = [ "mac=00:16:3e:4b:4d:01,script=vif-kemari-test" ]
on_crash = "preserve"
CFG
t0=$(date +%s)
xl create /tmp/kemari-attach.cfg || { result xl_create FAIL; echo "ATTACH-TEST FAIL"; exit 1; }
DOMID=$(xl domid kemari-attach)
result booted_domid info "$DOMID"   # booted, not restored: see results.sh
FE_VBD=/local/domain/$DOMID/device/vbd/51712; BE_VBD=/local/domain/0/backend/vbd/$DOMID/51712
FE_VIF=/local/domain/$DOMID/device/vif/0;     BE_VIF=/local/domain/0/backend/vif/$DOMID/0
wait_for 240 gt DOMU-IO 3 && wait_for 60 gt DOMU-NET 3
io=$(last DOMU-IO); net=$(last DOMU-NET)
check normal_io "disk ops=$io net ops=$net after $(( $(date +%s) - t0 ))s" \
    [ "$io" -gt 3 -a "$net" -gt 3 ]
check frontends_connected "vbd=$(xenstore-read "$FE_VBD/state") vif=$(xenstore-read "$FE_VIF/state")" \
    [ "$(xenstore-read "$FE_VBD/state")$(xenstore-read "$FE_VIF/state")" = 44 ]
grep -a 'DOMU-IO .* BAD' "$LOG" | head -3

# 3. Take the backends away under the running domU.
state_watch "$FE_VBD/state" /tmp/fe-vbd.states
state_watch "$FE_VIF/state" /tmp/fe-vif.states
state_watch "$BE_VBD/state" /tmp/be-vbd.states
state_watch "$BE_VIF/state" /tmp/be-vif.states
sleep 2
xl pause kemari-attach
echo "vbd-$DOMID-51712" > /sys/bus/xen-backend/drivers/vbd/unbind
echo "vif-$DOMID-0" > /sys/bus/xen-backend/drivers/vif/unbind
check unbound "no backend bound" [ ! -e "/sys/bus/xen-backend/devices/vbd-$DOMID-51712/driver" ]
xl unpause kemari-attach
sleep 6    # the domU issues disk and net requests that nobody serves
xl pause kemari-attach
io0=$(last DOMU-IO); net0=$(last DOMU-NET)
echo "ring vbd while unbound: $(xenstore-read "$FE_VBD/ring-ref") evtchn $(xenstore-read "$FE_VBD/event-channel")"

# 4. Re-create them in Kemari attach mode.
xenstore-write "$BE_VBD/kemari-attach" 1 "$BE_VIF/kemari-attach" 1
ta=$(date +%s%N)
echo "vbd-$DOMID-51712" > /sys/bus/xen-backend/drivers/vbd/bind
echo "vif-$DOMID-0" > /sys/bus/xen-backend/drivers/vif/bind
# The toolstack's part for the new vif net device (what the hotplug script does).
wait_for 20 ip link show "vif$DOMID.0" >/dev/null 2>&1
vif="vif$DOMID.0" XENBUS_PATH="backend/vif/$DOMID/0" /etc/xen/scripts/vif-kemari-test online
if [ "$EXPECT" != stock ]; then
    wait_for 20 xenstore-read "$BE_VBD/kemari-attached" >/dev/null 2>&1
    wait_for 20 xenstore-read "$BE_VIF/kemari-attached" >/dev/null 2>&1
    pick=$(xenstore-read "$BE_VBD/kemari-attached" 2>/dev/null)
    check attach_vbd "kemari-attached=$pick (unanswered requests picked up)" [ -n "$pick" ]
    check attach_vif "kemari-attached=$(xenstore-read "$BE_VIF/kemari-attached" 2>/dev/null)" \
        xenstore-read "$BE_VIF/kemari-attached"
    echo "attach took $(( ($(date +%s%N) - ta) / 1000000 )) ms"
fi
xl unpause kemari-attach

# 5. The domU's I/O must go on (or, with Debian's modules, the disk hangs).
wait_for 90 gt DOMU-IO $((io0 + 3)) && wait_for 60 gt DOMU-NET $((net0 + 3))
io=$(last DOMU-IO); net=$(last DOMU-NET)
check io_continues "disk ops $io0 -> $io, net ops $net0 -> $net" \
    [ "$io" -gt $((io0 + 3)) -a "$net" -gt $((net0 + 3)) ]
bad=$(grep -ac 'DOMU-IO .* BAD' "$LOG")
check data_intact "BAD reads=$bad" [ "$bad" = 0 ]
sleep 1
fe=$(sort -u /tmp/fe-vbd.states /tmp/fe-vif.states | tr '\n' ' ')
check frontends_stayed_connected "frontend states seen: ${fe:-none}" [ "$(echo $fe)" = 4 ]
be=$(cat /tmp/be-vbd.states /tmp/be-vif.states | sort -u | tr '\n' ' ')
if [ "$EXPECT" = stock ]; then
    echo "RESULT stock_backend_states info ${be:-none} (2 = InitWait published)"
else
    check no_initwait "backend states seen: ${be:-none}" [ "$(echo $be)" = 4 ]
fi

# 6. The secondary host's case: the backend devices are destroyed (their
#    xenstore directories removed) and created afresh by the toolstack, in
#    one transaction each, in attach mode (state 1 = Initialising).
for p in "${WATCHERS[@]}"; do kill "$p" 2>/dev/null; done
WATCHERS=()
for n in fe-vbd fe-vif be-vbd be-vif; do rm -f "/tmp/$n.states2"; done
state_watch "$FE_VBD/state" /tmp/fe-vbd.states2
state_watch "$FE_VIF/state" /tmp/fe-vif.states2
state_watch "$BE_VBD/state" /tmp/be-vbd.states2
state_watch "$BE_VIF/state" /tmp/be-vif.states2
snapshot() { # backend dir -> path/value lines, without the run-time keys
    local k
    for k in $(xenstore-list "$1"); do
        case $k in state|hotplug-status|kemari-attach|kemari-attached) ;;
        *) printf '%s\n%s\n' "$1/$k" "$(xenstore-read "$1/$k")" ;;
        esac
    done
}
sleep 2
xl pause kemari-attach
mapfile -t VBD_KEYS < <(snapshot "$BE_VBD")
mapfile -t VIF_KEYS < <(snapshot "$BE_VIF")
echo "vbd-$DOMID-51712" > /sys/bus/xen-backend/drivers/vbd/unbind
echo "vif-$DOMID-0" > /sys/bus/xen-backend/drivers/vif/unbind
xenstore-rm "$BE_VBD"; xenstore-rm "$BE_VIF"
gone() { [ ! -e "/sys/bus/xen-backend/devices/vbd-$DOMID-51712" ] &&
         [ ! -e "/sys/bus/xen-backend/devices/vif-$DOMID-0" ]; }
wait_for 20 gone
check destroyed "vbd and vif backend devices and directories removed" gone
xl unpause kemari-attach
sleep 6    # requests pile up again, with no backend device at all
xl pause kemari-attach
io0=$(last DOMU-IO); net0=$(last DOMU-NET)
ta=$(date +%s%N)
xenstore-write "${VBD_KEYS[@]}" "$BE_VBD/state" 1 "$BE_VBD/kemari-attach" 1
xenstore-chmod -r "$BE_VBD" n0 "r$DOMID"
xenstore-write "${VIF_KEYS[@]}" "$BE_VIF/state" 1 "$BE_VIF/kemari-attach" 1
xenstore-chmod -r "$BE_VIF" n0 "r$DOMID"
wait_for 20 ip link show "vif$DOMID.0" >/dev/null 2>&1
vif="vif$DOMID.0" XENBUS_PATH="backend/vif/$DOMID/0" /etc/xen/scripts/vif-kemari-test online
if [ "$EXPECT" != stock ]; then
    wait_for 20 xenstore-read "$BE_VBD/kemari-attached" >/dev/null 2>&1
    wait_for 20 xenstore-read "$BE_VIF/kemari-attached" >/dev/null 2>&1
    check recreate_attach "vbd kemari-attached=$(xenstore-read "$BE_VBD/kemari-attached" \
        2>/dev/null) vif kemari-attached=$(xenstore-read "$BE_VIF/kemari-attached" 2>/dev/null)" \
        xenstore-read "$BE_VBD/kemari-attached" "$BE_VIF/kemari-attached"
    echo "re-creation took $(( ($(date +%s%N) - ta) / 1000000 )) ms"
fi
xl unpause kemari-attach
wait_for 90 gt DOMU-IO $((io0 + 3)) && wait_for 60 gt DOMU-NET $((net0 + 3))
io=$(last DOMU-IO); net=$(last DOMU-NET)
check recreate_io_continues "disk ops $io0 -> $io, net ops $net0 -> $net" \
    [ "$io" -gt $((io0 + 3)) -a "$net" -gt $((net0 + 3)) ]
bad=$(grep -ac 'DOMU-IO .* BAD' "$LOG")
check recreate_data_intact "BAD reads=$bad" [ "$bad" = 0 ]
sleep 1
fe=$(sort -u /tmp/fe-vbd.states2 /tmp/fe-vif.states2 | tr '\n' ' ')
check recreate_frontends_stayed_connected "frontend states seen: ${fe:-none}" [ "$(echo $fe)" = 4 ]
be=$(sort -u /tmp/be-vbd.states2 /tmp/be-vif.states2 | tr '\n' ' ')
if [ "$EXPECT" = stock ]; then
    echo "RESULT stock_recreate_backend_states info ${be:-none} (2 = InitWait published)"
else
    # gone (removed), 1 (written by the toolstack), 4; never 2 (InitWait).
    check recreate_no_initwait "backend states seen: ${be:-none}" \
        [ -z "$(echo "$be" | tr ' ' '\n' | grep -vxE 'gone|1|4|')" ]
fi

echo "---- dom0 kernel log"
dmesg | grep -aE 'kemari|unanswered|blkback|vif' | tail -12
echo "---- domU console tail"
tail -4 "$LOG"
[ $FAILED = 0 ] && echo "ATTACH-TEST PASS" || echo "ATTACH-TEST FAIL"
