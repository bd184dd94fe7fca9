#!/bin/bash
# Runs in dom0 (tests/xen/lab/boot.sh --modules, with the patched
# xen-blkback loaded by the lab's init).  Checks the Kemari backend gate
# (linux-patches/0004, linux-patches/backend-gate.md) on a PV domU with
# 2 vCPUs (2 blkif queues) doing disk I/O at queue depth 32, then the
# attach mode's exact re-issue after out-of-order completion.
#
# Usage: gate-test.sh DOMU_KERNEL DOMU_RAMDISK [SCSI_MODULES_DIR]
#   DOMU_RAMDISK: the ramdisk of make-domu.sh.  SCSI_MODULES_DIR holds the
#   kernel's scsi_debug.ko, sd_mod.ko and their dependencies, with "order"
#   listing them in load order: the domU's disk is then a scsi_debug disk
#   whose commands take a random 0-4 ms, so blkback answers out of order
#   (a loop device completes in order).  Without it: a loop device.
# Prints "RESULT <name> ok|FAIL|info <detail>" and "GATE-TEST PASS|FAIL".
set -u
KERNEL=${1:?DOMU_KERNEL}; RAMDISK=${2:?DOMU_RAMDISK}; SCSI=${3:-}
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
NAME=kemari-gate
LOG=/var/log/xen/console/guest-$NAME.log
FAILED=0
result() { echo "RESULT $*"; [ "$2" = ok ] || [ "$2" = info ] || FAILED=1; }
check() { local name=$1 detail=$2; shift 2
    if "$@"; then result "$name" ok "$detail"; else result "$name" FAIL "$detail"; fi; }
wait_for() { local t=$1; shift
    for _ in $(seq 1 $((t * 2))); do "$@" && return 0; sleep 0.5; done; return 1; }
cleanup() { xl destroy $NAME 2>/dev/null; case ${LOOP:-} in /dev/loop*) losetup -d "$LOOP" ;; esac 2>/dev/null; }
trap cleanup EXIT
finish() { [ $FAILED = 0 ] && echo "GATE-TEST PASS" || echo "GATE-TEST FAIL"; exit $FAILED; }

# The gate's read-out: "queue-<n> key=value ..." lines.
gate() { cat "$G"; }
qfield() { # FIELD: "<queue> <value>" per queue
    gate | sed -n "s/^queue-\([0-9]*\) .* $1=\([0-9]*\).*/\1 \2/p"; }
qsum() { qfield "$1" | awk '{s+=$2} END{print s+0}'; }
waiting() { # requests pushed and not consumed, per queue "<q> <n>"
    paste -d' ' <(qfield req_prod) <(qfield req_cons) | awk '{print $1, ($2-$4)%4294967296}'; }
stats() { # every request the backend consumed (its own per-type counters)
    local d=/sys/bus/xen-backend/devices/vbd-$DOMID-51712/statistics
    echo $(( $(cat $d/rd_req) + $(cat $d/wr_req) + $(cat $d/f_req) + $(cat $d/ds_req) )); }
irqs() { grep -a blkif-backend /proc/interrupts |
    awk '{for(i=2;i<=NF;i++) if($i ~ /^[0-9]+$/) s+=$i; else break} END{print s+0}'; }
disk() { awk '{print $1, $5}' "/sys/block/$(basename "$LOOP")/stat"; }  # reads writes
lines() { grep -ac '^DEPTH ' "$LOG"; }
last_ok() { # "<worker> <last iteration the guest was told ok>"
    grep -ao 'DEPTH [0-9]* [0-9]* ok' "$LOG" | awk '$3>m[$2]{m[$2]=$3} END{for(k in m) print k, m[k]}' | sort -n; }
workers_ok() { [ "$(last_ok | wc -l)" = 32 ]; }
bad() { grep -ac 'DEPTH .* BAD' "$LOG"; }
fe_errors() { grep -aicE 'blkfront.*(bad|unexpected|disabl|error)|xvda.*error|I/O error' "$LOG"; }

[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd    # for <(...) on a bare devtmpfs
grep -q O /sys/module/xen_blkback/taint || { result patched_blkback FAIL "stock module"; finish; }

# 1. A PV domU, 2 vCPUs, a 16 MiB disk, 32 workers.
if [ -n "$SCSI" ]; then
    for m in $(cat "$SCSI/order"); do insmod "$SCSI/$m" || echo "insmod $m failed"; done
    insmod "$SCSI/scsi_debug.ko" dev_size_mb=16 num_tgts=1 max_luns=1 random=1 ndelay=4000000
    wait_for 30 ls /sys/bus/pseudo/drivers/scsi_debug/adapter0/host*/target*/*/block/ >/dev/null 2>&1
    LOOP=/dev/$(ls /sys/bus/pseudo/drivers/scsi_debug/adapter0/host*/target*/*/block/ | head -1)
    [ -b "$LOOP" ] || mknod "$LOOP" b $(tr ':' ' ' < /sys/block/$(basename "$LOOP")/dev)
else
    truncate -s 16M /root/gate.img
    LOOP=$(losetup -f --show /root/gate.img)
fi
result disk info "$LOOP"
[ -b "$LOOP" ] || { result disk FAIL "no disk"; finish; }
install -m 755 "$(dirname "$0")/block-kemari-test" /etc/xen/scripts/
cat > /tmp/$NAME.cfg <<CFG
name = "$NAME"
type = "pv"
kernel = "$KERNEL"
ramdisk = "$RAMDISK"
extra = "console=hvc0 quiet kemari_io=depth32"
memory = 128
vcpus = 2
cpu_weight = 32     # dom0 (256) first: the 32 workers would starve the test under TCG
disk = [ "format=raw,vdev=xvda,access=rw,script=block-kemari-test,target=$LOOP" ]
on_crash = "preserve"
CFG
xl create /tmp/$NAME.cfg || { result xl_create FAIL; finish; }
DOMID=$(xl domid $NAME)
result booted_domid info "$DOMID"   # booted, not restored: see results.sh
G=/sys/bus/xen-backend/devices/vbd-$DOMID-51712/kemari_gate
BE=/local/domain/0/backend/vbd/$DOMID/51712; FE=/local/domain/$DOMID/device/vbd/51712
wait_for 300 workers_ok
check workers_running "workers with a completed round: $(last_ok | wc -l)/32" workers_ok
nq=$(xenstore-read $FE/multi-queue-num-queues 2>/dev/null || echo 1)
check two_queues "multi-queue-num-queues=$nq; $(head -2 $G | tr '\n' ';')" \
    [ "$nq" = 2 -a "$(qfield req_cons | wc -l)" = 2 ]

# Today's series without 0004 stops here: no gate, nothing to hold the backend.
check gate_present "$G" [ -e "$G" ]
[ -e "$G" ] || finish

# 2. Armed: nothing beyond the limit is consumed, whatever the frontend pushes.
echo arm > "$G"
full() { [ "$(waiting | awk '{s+=$2} END{print s}')" = 32 ]; }
wait_for 120 full
w=$(waiting | tr '\n' ' ')
check depth32_held "requests pushed but not consumed per queue: $w" full
check both_queues_held "$w" [ "$(waiting | awk '$2>0' | wc -l)" -ge 2 ]
gate | sed 's/^/gate: /'
c0=$(qfield req_cons | tr '\n' ' '); s0=$(stats); i0=$(irqs); d0=$(disk); l0=$(lines)
sleep 5
c1=$(qfield req_cons | tr '\n' ' '); s1=$(stats); i1=$(irqs); d1=$(disk); l1=$(lines)
check req_cons_still "req_cons $c0-> $c1" [ "$c0" = "$c1" ]
check backend_consumed_nothing "backend requests $s0 -> $s1" [ "$s0" = "$s1" ]
check irq_count_still "blkif-backend interrupts $i0 -> $i1" [ "$i0" = "$i1" ]
check disk_still "disk reads/writes $d0 -> $d1" [ "$d0" = "$d1" ]
check guest_blocked "guest I/O lines $l0 -> $l1" [ "$l0" = "$l1" ]

# 3. Freeze/thaw: frozen, nothing is in flight and nothing pending.
echo freeze > "$G"
check freeze_drains "inflight $(qsum inflight), pending '$(gate | grep -o 'pending=.*' | tr '\n' ' ')'" \
    [ "$(qsum inflight)" = 0 -a -z "$(gate | grep -o 'pending=[0-9].*')" ]
echo thaw > "$G"

# 4. Commit the req_prods "of the checkpoint": exactly those requests run, once.
before=$(stats); ol=$(last_ok)
commit=$(qfield req_prod | awk '{printf "%s:%s ", $1, $2}')
want=$(waiting | awk '{s+=$2} END{print s}')
echo "commit $commit" > "$G"
limit_reached() { [ "$(qfield limit)" = "$(qfield req_cons)" ] && [ "$(qsum inflight)" = 0 ]; }
wait_for 60 limit_reached && wait_for 60 full
got=$(( $(stats) - before ))
check commit_runs_each_once "committed '$commit': $want requests waiting, backend ran $got" \
    [ "$got" = "$want" ]
adv=$(join <(echo "$ol") <(last_ok) | awk '$3>$2' | wc -l)
check commit_completes "workers that completed a request after the commit: $adv/32" \
    [ "$adv" -ge 1 ]
echo disarm > "$G"
ol=$(last_ok)
all_advanced() { [ "$(join <(echo "$ol") <(last_ok) | awk '$3>$2' | wc -l)" = 32 ]; }
wait_for 120 all_advanced
check disarm_resumes "workers that completed another round: $(join <(echo "$ol") <(last_ok) | awk '$3>$2' | wc -l)/32" all_advanced

# 5. Attach mode after out-of-order completion.  Armed again, so that the
#    checkpoint has requests pushed and not consumed; the guest paused (the
#    tap's pause), the gate frozen: the checkpoint's rings have no request
#    in flight, so [rsp_prod, req_prod) is exactly what is unanswered.
sleep 3
echo arm > "$G"
wait_for 120 full
xl pause $NAME
echo freeze > "$G"
gate | sed 's/^/checkpoint: /'
ooo=$(qsum out_of_order)
check out_of_order_seen "answers given out of order so far: $ooo" [ "$ooo" -gt 0 ]
drained() { paste -d' ' <(qfield rsp_prod_pvt) <(qfield req_cons) | awk '$2!=$4{x=1} END{exit x}'; }
check checkpoint_drained "rsp_prod_pvt = req_cons on every queue, inflight $(qsum inflight)" drained
cons_ck=$(qsum req_cons); stats_ck=$(stats)
check exactly_once_so_far "requests consumed (sum of req_cons) $cons_ck, backend ran $stats_ck" \
    [ "$cons_ck" = "$stats_ck" ]
NEG=$(gate | sed -n 's/^negotiated //p')
RSP=$(qfield rsp_prod_pvt); REQ=$(qfield req_prod)
unanswered=$(paste -d' ' <(echo "$REQ") <(echo "$RSP") | awk '{s+=($2-$4)%4294967296} END{print s}')
ol=$(last_ok)
attach() { # extra xenstore key/value pairs: re-bind in attach mode with them
    echo "vbd-$DOMID-51712" > /sys/bus/xen-backend/drivers/vbd/unbind
    xenstore-rm "$BE/kemari-negotiated" "$BE/kemari-checkpoint" "$BE/kemari-attach-error" \
        "$BE/kemari-attached" 2>/dev/null
    local kv=("$BE/kemari-attach" 1) q
    for f in $NEG; do kv+=("$BE/kemari-negotiated/${f%%=*}" "${f#*=}"); done
    while read -r q v; do kv+=("$BE/kemari-checkpoint/queue-$q/rsp-prod" "$v"); done <<<"$RSP"
    while read -r q v; do kv+=("$BE/kemari-checkpoint/queue-$q/req-prod" "$v"
                              "$BE/kemari-checkpoint/queue-$q/pending" ""); done <<<"$REQ"
    xenstore-write "${kv[@]}" "$@"
    echo "vbd-$DOMID-51712" > /sys/bus/xen-backend/drivers/vbd/bind
}
answered() { xenstore-read "$BE/kemari-attached" >/dev/null 2>&1 ||
             xenstore-read "$BE/kemari-attach-error" >/dev/null 2>&1; }
# 5a. A backend that negotiates differently from the primary refuses.
attach "$BE/kemari-negotiated/feature-max-indirect-segments" 32
wait_for 30 answered
err=$(xenstore-read "$BE/kemari-attach-error" 2>/dev/null)
check attach_refuses_mismatch "kemari-attach-error='$err'" \
    [ -n "$err" -a -z "$(xenstore-read "$BE/kemari-attached" 2>/dev/null)" ]
check frontend_untold "frontend state $(xenstore-read $FE/state)" [ "$(xenstore-read $FE/state)" = 4 ]
# 5b. The same features: attached, exactly the unanswered requests re-issued.
attach
wait_for 30 answered
picked=$(xenstore-read "$BE/kemari-attached" 2>/dev/null)
check attach_exact "kemari-attached='$picked' (error '$(xenstore-read "$BE/kemari-attach-error" 2>/dev/null)'), unanswered at the checkpoint $unanswered" \
    [ "$picked" = "$unanswered" -a "$unanswered" = 32 ]
xl unpause $NAME
wait_for 120 all_advanced
check io_after_attach "workers that completed another round: $(join <(echo "$ol") <(last_ok) | awk '$3>$2' | wc -l)/32" all_advanced
xl pause $NAME
echo freeze > "$G"
cons=$(qsum req_cons); ran=$(stats)
check exactly_once_after_attach "requests consumed since the checkpoint $((cons - cons_ck)), the new backend ran $ran" \
    [ "$((cons - cons_ck))" = "$ran" ]
# What the disk holds is what the guest was told, or the next write.
told() { last_ok | while read -r k i; do
        d=$(dd if="$LOOP" bs=4096 skip=$((k * 8)) count=1 iflag=direct 2>/dev/null | head -c 12)
        n=$(printf 'w%02d-' "$k"); v=${d#"$n"}; v=$((10#${v:-0}))
        [ "$v" = "$i" ] || [ "$v" = $((i + 1)) ] || echo "worker $k told $i disk '$d'"
    done; }
mism=$(told)
check disk_as_told "${mism:-each worker block holds its last acknowledged write or the next}" [ -z "$mism" ]
check no_bad_reads "BAD reads=$(bad)" [ "$(bad)" = 0 ]
check frontend_no_errors "blkfront errors in the guest log: $(fe_errors)" [ "$(fe_errors)" = 0 ]
check frontend_stayed_connected "state $(xenstore-read $FE/state)" [ "$(xenstore-read $FE/state)" = 4 ]
echo thaw > "$G"
echo "---- dom0 kernel log"
dmesg | grep -aE 'kemari|unanswered|blkback' | tail -8
echo "---- guest console tail"
tail -3 "$LOG"
finish
