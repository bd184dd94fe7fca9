#!/bin/bash
# Runs in dom0 (tests/xen/lab/boot.sh --modules, with the patched
# xen-netback loaded by the lab's init).  Checks the Kemari netback gate
# (linux-patches/0010) on a PV domU with 2 vCPUs (2 netfront queues) and 32
# ICMP senders, each with one echo request in flight, then the attach mode's
# feature and checkpoint check (linux-patches/0011) and its exact re-issue.
#
# Usage: netgate-test.sh DOMU_KERNEL DOMU_RAMDISK
#   DOMU_RAMDISK: the ramdisk of make-domu.sh (domu-init, kemari_io=net32).
# Prints "RESULT <name> ok|FAIL|info <detail>" and "NETGATE-TEST PASS|FAIL".
set -u
KERNEL=${1:?DOMU_KERNEL}; RAMDISK=${2:?DOMU_RAMDISK}
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
NAME=kemari-netgate
LOG=/var/log/xen/console/guest-$NAME.log
FAILED=0
result() { echo "RESULT $*"; [ "$2" = ok ] || [ "$2" = info ] || FAILED=1; }
check() { local name=$1 detail=$2; shift 2
    if "$@"; then result "$name" ok "$detail"; else result "$name" FAIL "$detail"; fi; }
wait_for() { local end=$((SECONDS + $1)); shift   # seconds, not tries: dom0 is slow under TCG
    while [ $SECONDS -lt $end ]; do "$@" && return 0; sleep 0.5; done; "$@"; }
cleanup() { xl destroy $NAME 2>/dev/null; }
trap cleanup EXIT
finish() { [ $FAILED = 0 ] && echo "NETGATE-TEST PASS" || echo "NETGATE-TEST FAIL"; exit $FAILED; }

# The gate's read-out: "state ...", "negotiated k=v ...", "<q> k=v ..." lines.
gate() { cat "$G"; }
qfield() { # FIELD: "<queue> <value>" per queue (tx ring unless the field says rx_)
    gate | awk -v k="$1" '$1 ~ /^[0-9]+$/ {for (i = 2; i <= NF; i++) {
        n = index($i, "="); if (substr($i, 1, n - 1) == k) {v = substr($i, n + 1); sub(/^off:/, "", v); print $1, v}}}'; }
qsum() { qfield "$1" | awk '{s+=$2} END{print s+0}'; }
waiting() { # tx requests pushed and not consumed, per queue "<q> <n>"
    paste -d' ' <(qfield req_prod) <(qfield req_cons) | awk '{print $1, ($2-$4)%4294967296}'; }
wsum() { waiting | awk '{s+=$2} END{print s+0}'; }
irqs() { # "<queue> <interrupts>" for the vif's event channels (tx and rx), dom0's count
    grep -a "vif$DOMID\.0-q" /proc/interrupts | awk '{s=0; for(i=2;i<=NF;i++) if($i ~ /^[0-9]+$/) s+=$i; else break;
        q=$NF; sub(/.*-q/, "", q); sub(/-.*/, "", q); t[q]+=s} END{for(q in t) print q, t[q]}' | sort -n | tr '\n' ' '; }
peer_rx() { cat "/sys/class/net/vif$DOMID.0/statistics/rx_packets" 2>/dev/null || echo 0; }
in_echos() { awk '/^Icmp:/{if(!h){for(i=1;i<=NF;i++) c[$i]=i; h=1} else print $c["InEchos"]}' /proc/net/snmp; }
# Answered echoes only: a "fail" line is a ping's 120 s timeout ending (one
# lost before the gate was armed may end while it holds), not output let out.
lines() { grep -ac '^NET .* ok' "$LOG"; }
last_ok() { # "<sender> <last echo it was answered>"
    grep -ao 'NET [0-9]* [0-9]* ok' "$LOG" | awk '$3>m[$2]{m[$2]=$3} END{for(k in m) print k, m[k]}' | sort -n; }
senders_ok() { [ "$(last_ok | wc -l)" = 32 ]; }
fails() { grep -ac 'NET .* fail' "$LOG"; }
fe_errors() { grep -aicE 'netfront.*(bad|unexpected|disabl|error|fatal)|xen_netfront.*(error|fatal)' "$LOG"; }
advanced() { join <(echo "$1") <(last_ok) | awk '$3>$2' | wc -l; }
pin_neigh() { # dom0 knows the senders' addresses for good: an ARP probe of dom0's
    # held on the ring would keep an echo reply back and skew the counts
    local k
    for k in $(seq 0 31); do
        ip neigh replace 10.213.0.$((100 + k)) lladdr 00:16:3e:4b:4d:02 dev "vif$DOMID.0" nud permanent
    done; }

[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd    # for <(...) on a bare devtmpfs
grep -q O /sys/module/xen_netback/taint || { result patched_netback FAIL "stock module"; finish; }

# 1. A PV domU, 2 vCPUs (so 2 netfront queues), a point-to-point vif, 32 senders.
echo 2 > /sys/module/xen_netback/parameters/max_queues
for f in /proc/sys/net/ipv6/conf/{default,all}/disable_ipv6; do [ -e $f ] && echo 1 > $f; done
install -m 755 "$(dirname "$0")/vif-kemari-test" /etc/xen/scripts/
cat > /tmp/$NAME.cfg <<CFG
name = "$NAME"
type = "pv"
kernel = "$KERNEL"
ramdisk = "$RAMDISK"
extra = "console=hvc0 quiet kemari_io=net32 ipv6.disable=1"
memory = 128
vcpus = 2
cpu_weight = 32     # dom0 (256) first: the 32 senders would starve the test under TCG
vif = [ "mac=00:16:3e:4b:4d:02,script=vif-kemari-test" ]
on_crash = "preserve"
CFG
E0=$(in_echos)
xl create /tmp/$NAME.cfg || { result xl_create FAIL; finish; }
DOMID=$(xl domid $NAME)
result booted_domid info "$DOMID"   # booted, not restored: see results.sh
G=/sys/bus/xen-backend/devices/vif-$DOMID-0/kemari_gate
BE=/local/domain/0/backend/vif/$DOMID/0; FE=/local/domain/$DOMID/device/vif/0
wait_for 60 ip link show "vif$DOMID.0" >/dev/null 2>&1; pin_neigh
wait_for 300 senders_ok
check senders_running "senders with an answered echo: $(last_ok | wc -l)/32" senders_ok
nq=$(xenstore-read $FE/multi-queue-num-queues 2>/dev/null || echo 1)
check two_queues "multi-queue-num-queues=$nq; $(grep -ao 'DOMU-MARKER net32.*' "$LOG" | head -1)" \
    [ "$nq" = 2 ]

# Today's series without 0010 stops here: no gate, nothing to hold the backend.
check gate_present "$G" [ -e "$G" ]
[ -e "$G" ] || finish
gate | sed 's/^/gate: /'

# 2. Armed: nothing beyond the limit is consumed, whatever the frontend pushes.
echo arm > "$G"
full() { [ "$(wsum)" -ge 32 ]; }
wait_for 200 full
w=$(waiting | tr '\n' ' ')
check depth32_held "tx requests pushed but not consumed per queue: $w" full
check both_queues_held "$w" [ "$(waiting | awk '$2>0' | wc -l)" -ge 2 ]
sleep 2    # the last pushes' notifications land
gate | sed 's/^/armed: /'
c0=$(qfield req_cons | tr '\n' ' '); i0=$(irqs); r0=$(peer_rx); e0=$(in_echos); l0=$(lines)
sleep 5
c1=$(qfield req_cons | tr '\n' ' '); i1=$(irqs); r1=$(peer_rx); e1=$(in_echos); l1=$(lines)
check req_cons_still "tx req_cons per queue $c0-> $c1" [ "$c0" = "$c1" ]
check irq_count_still "dom0 interrupts per queue (tx+rx channels) $i0-> $i1" [ "$i0" = "$i1" -a -n "$i0" ]
check peer_rx_still "dom0 vif rx_packets $r0 -> $r1" [ "$r0" = "$r1" ]
check peer_echos_still "dom0 InEchos $e0 -> $e1" [ "$e0" = "$e1" ]
check guest_blocked "guest NET ok lines $l0 -> $l1" [ "$l0" = "$l1" ]

# 3. Freeze drains: no consumed tx request unanswered; thaw.
echo freeze > "$G"; rc=$?
drained_frozen() { [ $rc = 0 ] && [ "$(qsum unanswered)" = 0 ] && gate | grep -q '^state frozen'; }
check freeze_drains "rc=$rc; $(gate | tr '\n' ';')" drained_frozen
echo thaw > "$G"

# 4. Commit the req_prods "of the checkpoint": exactly those packets leave, once.
ol=$(last_ok); r0=$(peer_rx); e0=$(in_echos); cons0=$(qsum req_cons)
commit=$(qfield req_prod | awk '{printf "%s:%s ", $1, $2}')
want=$(wsum)
echo "commit $commit" > "$G"; rc=$?
limit_reached() { [ "$(qfield limit)" = "$(qfield req_cons)" ] && [ "$(qsum unanswered)" = 0 ]; }
wait_for 60 limit_reached; sleep 2
got=$(( $(qsum req_cons) - cons0 )); rx=$(( $(peer_rx) - r0 ))
check commit_runs_each_once "rc=$rc committed '$commit': $want requests waiting, consumed $got, dom0 vif received $rx packets, InEchos +$(( $(in_echos) - e0 ))" \
    [ $rc = 0 -a "$got" = "$want" -a "$rx" = "$want" ]
wait_for 60 eval '[ "$(advanced "$ol")" -ge 1 ]'
check commit_completes "senders answered after the commit: $(advanced "$ol")/32" [ "$(advanced "$ol")" -ge 1 ]
echo "commit 0:$(( $(qfield req_prod | awk '$1==0{print $2}') + 100000 ))" > "$G" 2>/dev/null; rc=$?
check bad_commit_refused "rc=$rc" [ $rc != 0 ]
echo disarm > "$G"
ol=$(last_ok)
all_advanced() { [ "$(advanced "$ol")" = 32 ]; }
# About 0.5% of echo replies never come back, gate or no gate (lost_replies
# below): such a sender waits out its ping's 120 s before its next one.
RESUME_S=400
wait_for $RESUME_S all_advanced
check disarm_resumes "senders answered again: $(advanced "$ol")/32" all_advanced
stuck() { join <(echo "$1") <(last_ok) | awk '$3<=$2{print "sender", $1, "last answered", $2}' | tr '\n' ';'; }
all_advanced || result stuck_senders info "$(stuck "$ol")"

# 5. Attach mode.  Armed again so that the checkpoint has tx requests pushed
#    and not consumed on both queues; the guest paused (the tap's pause), the
#    gate frozen: nothing in flight, [rsp_prod, req_prod) is what is unanswered.
sleep 3
echo arm > "$G"
wait_for 200 full
xl pause $NAME
echo freeze > "$G"
gate | sed 's/^/checkpoint: /'
check checkpoint_drained "unanswered $(qsum unanswered), rsp_prod $(qfield rsp_prod | tr '\n' ' ')= req_cons $(qfield req_cons | tr '\n' ' ')" \
    [ "$(qsum unanswered)" = 0 -a "$(qfield rsp_prod)" = "$(qfield req_cons)" ]
NEG=$(gate | sed -n 's/^negotiated //p')
check negotiated_line "$NEG" [ -n "$NEG" ]
TXRSP=$(qfield rsp_prod); TXREQ=$(qfield req_prod); RXRSP=$(qfield rx_rsp_prod); RXREQ=$(qfield rx_req_prod)
unanswered=$(wsum)
ol=$(last_ok)
attach() { # extra xenstore key/value pairs: re-bind in attach mode with them
    echo "vif-$DOMID-0" > /sys/bus/xen-backend/drivers/vif/unbind
    xenstore-rm "$BE/kemari-negotiated" "$BE/kemari-checkpoint" "$BE/kemari-attach-error" \
        "$BE/kemari-attached" 2>/dev/null
    local kv=("$BE/kemari-attach" 1) q v
    for f in $NEG; do kv+=("$BE/kemari-negotiated/${f%%=*}" "${f#*=}"); done
    while read -r q v; do kv+=("$BE/kemari-checkpoint/queue-$q/tx-rsp-prod" "$v"
                              "$BE/kemari-checkpoint/queue-$q/pending" 0); done <<<"$TXRSP"
    while read -r q v; do kv+=("$BE/kemari-checkpoint/queue-$q/tx-req-prod" "$v"); done <<<"$TXREQ"
    while read -r q v; do kv+=("$BE/kemari-checkpoint/queue-$q/rx-rsp-prod" "$v"); done <<<"$RXRSP"
    while read -r q v; do kv+=("$BE/kemari-checkpoint/queue-$q/rx-req-prod" "$v"); done <<<"$RXREQ"
    xenstore-write "${kv[@]}" "$@"
    echo "vif-$DOMID-0" > /sys/bus/xen-backend/drivers/vif/bind
}
answered() { xenstore-read "$BE/kemari-attached" >/dev/null 2>&1 ||
             xenstore-read "$BE/kemari-attach-error" >/dev/null 2>&1; }
refused() { # NAME KEY VALUE: a re-bind with one wrong key is refused, naming it
    local key=$2 err
    attach "$BE/$key" "$3"
    wait_for 30 answered
    err=$(xenstore-read "$BE/kemari-attach-error" 2>/dev/null)
    check "$1" "$key=$3: kemari-attach-error='$err' kemari-attached='$(xenstore-read "$BE/kemari-attached" 2>/dev/null)'" \
        [ -n "$err" -a -z "$(xenstore-read "$BE/kemari-attached" 2>/dev/null)" ]
    case "$err" in *"${key##*/}"*) ;; *) result "$1_names_key" FAIL "'$err' does not name ${key##*/}" ;; esac
    check "$1_frontend_untold" "frontend state $(xenstore-read $FE/state), backend state $(xenstore-read $BE/state)" \
        [ "$(xenstore-read $FE/state)" = 4 -a "$(xenstore-read $BE/state)" = 4 ]
}
# 5a. A backend that negotiates differently from the primary refuses.
gso=$(echo "$NEG" | tr ' ' '\n' | sed -n 's/^feature-gso-tcpv4=//p')
refused attach_refuses_feature kemari-negotiated/feature-gso-tcpv4 $((1 - ${gso:-0}))
# 5b. Rings that are not the checkpoint's are refused.
q1req=$(echo "$TXREQ" | awk '$1==1{print $2}')
refused attach_refuses_ring kemari-checkpoint/queue-1/tx-req-prod $(( ${q1req:-0} + 1 ))
# 5c. The same features and rings: attached, exactly the unanswered requests re-issued.
attach
wait_for 30 answered
picked=$(xenstore-read "$BE/kemari-attached" 2>/dev/null)
check attach_exact "kemari-attached='$picked' (error '$(xenstore-read "$BE/kemari-attach-error" 2>/dev/null)'), unanswered at the checkpoint $unanswered" \
    [ "$picked" = "$unanswered" -a "$unanswered" -ge 32 ]
# The toolstack's part for the new vif net device (what the hotplug script does).
wait_for 20 ip link show "vif$DOMID.0" >/dev/null 2>&1
# dom0's address first: the vif going up lets NAPI send the 32 re-issued
# requests to dom0 at once, and an echo arriving before the address is lost.
ip addr add 10.213.0.1/24 dev "vif$DOMID.0"
ip link set "vif$DOMID.0" up
pin_neigh
xenstore-write "$BE/hotplug-status" connected
xl unpause $NAME
wait_for $RESUME_S all_advanced
check io_after_attach "senders answered again: $(advanced "$ol")/32" all_advanced
all_advanced || result stuck_senders_after_attach info "$(stuck "$ol")"
# 6. Each echo request reached dom0 exactly once over the whole run (both
#    backends).  dom0 stops answering: each sender then has exactly one
#    request out, consumed and unanswered, so dom0 has received every ping
#    the guest finished (answered, or failed after 120 s) plus 32.
echo 1 > /proc/sys/net/ipv4/icmp_echo_ignore_all
echoes_sent() { grep -aoE 'NET [0-9]+ [0-9]+ (ok|fail)' "$LOG" | wc -l; }
settled() { [ "$(( $(in_echos) - E0 ))" = "$(( $(echoes_sent) + 33 ))" ]; }
sleep 5; wait_for 90 settled
sent=$(echoes_sent)
check each_echo_once "dom0 InEchos since the domU started $(( $(in_echos) - E0 )), pings the guest finished $sent + 32 out + 1 (the first, learning the MAC)" \
    [ "$(( $(in_echos) - E0 ))" = "$((sent + 33))" ]
result lost_replies info "pings with no reply in 120 s: $(fails)"
echo 0 > /proc/sys/net/ipv4/icmp_echo_ignore_all
check frontend_no_errors "netfront errors in the guest log: $(fe_errors)" [ "$(fe_errors)" = 0 ]
check frontend_stayed_connected "state $(xenstore-read $FE/state)" [ "$(xenstore-read $FE/state)" = 4 ]
echo "---- dom0 kernel log"
dmesg | grep -aE 'kemari|unanswered|vif' | tail -10
echo "---- guest console tail"
tail -3 "$LOG"
finish
