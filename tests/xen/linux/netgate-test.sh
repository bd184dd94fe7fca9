#!/bin/bash
# /kemari/run for tests/xen/lab/boot.sh: the netback gate (linux-patches/0010)
# on one PV domU that pings dom0 once a second.  Prints RESULT lines and
# NETGATE-TEST PASS|FAIL for test_linux_patches.py.
. /kemari/lab/domu.sh
fail=0
result() { echo "RESULT $1 $2 $3"; [ "$2" = ok ] || fail=1; }
field() { sed -n "s/^$1 .*$2=\([0-9]*\).*/\1/p" "$G/kemari_gate"; }   # queue, key
check() { if eval "$2"; then result "$1" ok "$3"; else result "$1" FAIL "$3"; fi; }
domu_start g pv && domu_wait_io g 2 400 || { echo "NETGATE-TEST FAIL no domU I/O"; exit 1; }
G=$(ls -d /sys/bus/xen-backend/devices/vif-*-0 | head -1)
[ -e "$G/kemari_gate" ] || { echo "NETGATE-TEST FAIL no $G/kemari_gate"; exit 1; }

echo arm > "$G/kemari_gate"; c0=$(field 0 req_cons)
sleep 8   # the domU pushes a ping a second
c1=$(field 0 req_cons); p1=$(field 0 req_prod)
check armed_tx_bounded '[ "$c0" = "$c1" ] && [ "$p1" -gt "$c1" ]' "req_cons $c0->$c1 req_prod=$p1"
echo freeze > "$G/kemari_gate"; rc=$?
check freeze "[ $rc = 0 ] && grep -q 'state frozen' $G/kemari_gate" "rc=$rc"
sleep 3
check frozen_tx_bounded '[ "$(field 0 req_cons)" = "$c1" ]' "req_cons=$(field 0 req_cons)"
echo thaw > "$G/kemari_gate"
check thawed_still_bounded '[ "$(field 0 req_cons)" = "$c1" ]' "req_cons=$(field 0 req_cons)"
echo "commit 0:$p1" > "$G/kemari_gate"; rc=$?
sleep 2
check commit_up_to_limit "[ $rc = 0 ] && [ \"\$(field 0 req_cons)\" = $p1 ]" "limit=$p1 req_cons=$(field 0 req_cons)"
echo "commit 0:$((p1 + 100000))" > "$G/kemari_gate" 2>/dev/null; rc=$?
check bad_commit_refused "[ $rc != 0 ]" "rc=$rc"
echo disarm > "$G/kemari_gate"
n=$(domu_last_io g)
check io_resumes "domu_wait_io g $((n + 3)) 120" "$(tr '\n' ' ' < "$G/kemari_gate")"
[ $fail = 0 ] && echo "NETGATE-TEST PASS" || echo "NETGATE-TEST FAIL"
