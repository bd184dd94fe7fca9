#!/bin/bash
# Runs in dom0 (tests/xen/lab/boot.sh --modules, with the patched
# xen-netback loaded by the lab's init).  Checks the Kemari netback gate
# (linux-patches/0010) on a PV domU with 2 vCPUs (2 netfront queues) and 32
# ICMP senders, each with one echo request in flight, then the attach mode's
# feature and checkpoint check (linux-patches/0011) and its exact re-issue.
# echo-listener.py (next to this script) logs each echo request dom0
# receives, so that a request that came twice is named, not just counted.
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
LPID=""    # echo-listener.py
cleanup() { xl destroy $NAME 2>/dev/null; [ -z "$LPID" ] || kill "$LPID" 2>/dev/null; }
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
# The listener's file: "<s since its start> <source> <ICMP id> <seq>" per echo request.
heard() { wc -l < "$ECHOES"; }
since_start() { awk -v n="$EPOCHREALTIME" -v s="$LSTART" 'BEGIN{printf "%.3f", n - s}'; }
caught_up() { # the listener has written each echo request InEchos counted (CU_HEARD, CU_ECHOS)
    CU_HEARD=$(heard); CU_ECHOS=$(( $(in_echos) - E0 )); [ "$CU_HEARD" = "$CU_ECHOS" ]; }
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
# Each echo request dom0 receives, by source, ICMP id and sequence, with the
# kernel's receive time (echo-listener.py): InEchos alone is a total, which
# cannot tell a request that came twice from a "NET" line the guest's console
# log lost, nor which sender's held request the attach failed to re-issue.
ECHOES=/tmp/$NAME.echoes
: > "$ECHOES"
python3 "$(dirname "$0")/echo-listener.py" 10.213.0.1 "$ECHOES" > "$ECHOES.start" 2>&1 &
LPID=$!
wait_for 60 grep -q '^start ' "$ECHOES.start"
LSTART=$(sed -n 's/^start //p' "$ECHOES.start")
[ -n "$LSTART" ] || { result echo_listener FAIL "$(cat "$ECHOES.start")"; finish; }
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
# What is committed and what should leave, from one read of req_prod: the
# guest may push more meanwhile (a sender whose ping timed out).
prods=$(qfield req_prod)
commit=$(awk '{printf "%s:%s ", $1, $2}' <<<"$prods")
want=$(paste -d' ' <(echo "$prods") <(qfield req_cons) | awk '{s += ($2 - $4) % 4294967296} END {print s + 0}')
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
T_ARM=$(since_start)
echo arm > "$G"
wait_for 200 full
xl pause $NAME
echo freeze > "$G"
gate | sed 's/^/checkpoint: /'
# Nothing reaches dom0 now until the attach re-issues the held requests: what
# the listener writes from here on is the re-issue and what follows it.
wait_for 30 caught_up; H_CKPT=$(heard); T_CKPT=$(since_start)
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
T_UNPAUSE=$(since_start); H_UNPAUSE=$(heard)
xl unpause $NAME
wait_for $RESUME_S all_advanced
check io_after_attach "senders answered again: $(advanced "$ol")/32" all_advanced
all_advanced || result stuck_senders_after_attach info "$(stuck "$ol")"
# Each sender's request held on the ring at the checkpoint reached dom0, and
# soon: within 60 s of the unpause.  Its first request after the checkpoint
# is the held one if it came while the guest was still paused (the re-issue
# leaves as the vif goes up), or less than 110 s after the arm: a sender
# sends nothing else until its held ping is answered or has waited 120 s
# (the guest's clock runs on while it is paused), and it pushed that ping
# after the arm (or just before).  A time from the unpause alone would not
# do: the ring may take up to 120 s to fill (a sender waiting out a lost
# reply; seen: 119 s from the arm to the checkpoint), so a ping held early
# can time out right after the unpause.
reissued() { # per sender "<source> <s from the unpause to its first request after the checkpoint> ok|late", or "<source> none missing"
    tail -n +$((H_CKPT + 1)) "$ECHOES" | awk -v u="$T_UNPAUSE" -v a="$T_ARM" '!($2 in f) {f[$2] = $1}
        END {for (k = 0; k < 32; k++) {s = "10.213.0." (100 + k)
             if (!(s in f)) {print s, "none missing"; continue}
             t = f[s] - u; held = (t < 0 || f[s] < a + 110)
             printf "%s %.1f %s\n", s, t, ((held && t <= 60) ? "ok" : "late")}}'; }
RE=$(reissued)
on_time=$(awk '$3 == "ok"' <<<"$RE" | wc -l)
paused=$(awk '$3 == "ok" && $2 < 0' <<<"$RE" | wc -l)
last=$(awk '$2 != "none"' <<<"$RE" | sort -k2,2g | tail -1 | cut -d' ' -f2)
others=$(awk '$3 != "ok" {printf "%s %s; ", $1, $2}' <<<"$RE")
check reissued_delivered "senders whose held request reached dom0 after the attach: $on_time/32 ($paused before the unpause; the last at ${last:-?} s from it; listener's s: arm $T_ARM, checkpoint $T_CKPT, unpause $T_UNPAUSE; its lines then $H_CKPT, $H_UNPAUSE)${others:+; late or missing: $others}" \
    [ "$on_time" = 32 ]
# 6. Each echo request reached dom0 exactly once over the whole run (both
#    backends): no (source, ICMP id, sequence) twice in the listener's file.
#    busybox ping sends one request per ping, its id the ping's pid (the
#    guest, a few thousand forks a run, reuses none), so a repeat is a
#    request that came twice.  The listener must also have missed nothing
#    dom0 counted in InEchos.
#    Then the guest's console against dom0's count, for the record: dom0
#    stops answering, each sender then has exactly one request out, consumed
#    and unanswered, so dom0 has received every ping the guest finished
#    (answered, or failed after 120 s) plus 32.  Only as exact as the log:
#    the kernel prints its messages on hvc0 past the tty (whatever "quiet"
#    lets through), so one can land in the middle of a sender's line.
echo 1 > /proc/sys/net/ipv4/icmp_echo_ignore_all
echoes_sent() { grep -aoE 'NET [0-9]+ [0-9]+ (ok|fail)' "$LOG" | wc -l; }
settled() { [ "$(( $(in_echos) - E0 ))" = "$(( $(echoes_sent) + 33 ))" ]; }
sleep 5; wait_for 90 settled
wait_for 30 caught_up
check listener_saw_all "echo requests the listener wrote $CU_HEARD, dom0 InEchos since the domU started $CU_ECHOS (its CPU time: $(ps -o times= -p "$LPID" | tr -d ' ') s)" \
    [ "$CU_HEARD" = "$CU_ECHOS" ]
kill "$LPID"; wait "$LPID" 2>/dev/null; LPID=""
dups() { # "<source> id <id> seq <seq>: <n> times, at <s> ..." for each request received more than once
    awk '{k = $2 " id " $3 " seq " $4; n[k]++; t[k] = t[k] " " $1}
         END {for (k in n) if (n[k] > 1) print k ": " n[k] " times, at" t[k] " s"}' "$ECHOES" | sort; }
D=$(dups)
check each_echo_once "echo requests dom0 received $(heard) from $(awk '{print $2}' "$ECHOES" | sort -u | wc -l) sources, more than once: $(grep -c . <<<"$D")${D:+ ($(head -5 <<<"$D" | tr '\n' ';'))} (listener's s: arm $T_ARM, checkpoint $T_CKPT, unpause $T_UNPAUSE)" \
    [ -z "$D" ]
total=$(( $(in_echos) - E0 )); sent=$(echoes_sent)
clean_log() { tr -d '\r' < "$LOG"; }
odd_net() { clean_log | grep -a NET | grep -avxE 'NET [0-9]+ [0-9]+ (ok|fail)'; }
kernel_lines() { clean_log | grep -aE '\[ *[0-9]+\.[0-9]+\]'; }
off=$((total - sent - 33))
result echo_count info "dom0 InEchos since the domU started $total, pings the guest finished $sent + 32 out + 1 (the first, learning the MAC): off by $off; guest console: $(odd_net | wc -l) NET lines off the pattern, $(kernel_lines | wc -l) kernel lines"
if [ "$off" != 0 ]; then
    # Which sender, and what the console made of its line: each source's
    # requests at dom0 against its sender's NET lines (+1 out; 10.213.0.2
    # is the first ping), then the NET lines off the pattern and whatever
    # the kernel printed on the console.
    join -a1 -a2 -e0 -o 0,1.2,2.2 \
        <(awk '{n[$2]++} END {for (s in n) print s, n[s]}' "$ECHOES" | sort -k1,1) \
        <(grep -aoE 'NET [0-9]+ [0-9]+ (ok|fail)' "$LOG" |
          awk '{n["10.213.0." (100 + $2)]++} END {for (s in n) print s, n[s]}' | sort -k1,1) |
        awk '$2 != $3 + 1 {print "echo_count: " $1 ": dom0 received " $2 " requests, the sender printed " $3 " NET lines (+1 out)"}'
    odd_net | head -20 | sed 's/^/echo_count: NET line off the pattern: /'
    kernel_lines | head -40 | sed 's/^/echo_count: kernel line: /'
fi
result lost_replies info "pings with no reply in 120 s: $(fails)"
echo 0 > /proc/sys/net/ipv4/icmp_echo_ignore_all
check frontend_no_errors "netfront errors in the guest log: $(fe_errors)" [ "$(fe_errors)" = 0 ]
check frontend_stayed_connected "state $(xenstore-read $FE/state)" [ "$(xenstore-read $FE/state)" = 4 ]
echo "---- dom0 kernel log"
dmesg | grep -aE 'kemari|unanswered|vif' | tail -10
echo "---- guest console tail"
tail -3 "$LOG"
finish
