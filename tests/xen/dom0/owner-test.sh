#!/bin/bash
# The owner phase (Xen patch 5), run by tap-test.sh in the same boot once its
# own checks are done, with the domU `domu` running and its tap disarmed:
#  1. one controller serves two protected domains (domu and a second domU),
#     one notification port each, GET_HELD polled as well;
#  2. the controller is SIGKILLed with a hold pending: the domU stays paused
#     with its notification held, `xl unpause` does not run it; a new
#     controller ADOPTs the tap, releases, serves on;
#  3. that controller is SIGKILLed while the domU runs armed: its next
#     notification is held with nobody told, it stays paused until a third
#     controller ADOPTs, releases and disarms.
# Then both domUs' I/O carries on with no failure.
set -u
. /kemari/lab/domu.sh
BIN=/kemari/files/kemari-owner-test
check() { # NAME OK(0/1) DETAIL
    if [ "$2" = 0 ]; then echo "KEMARI-CHECK $1 PASS $3"; else echo "KEMARI-CHECK $1 FAIL $3"; FAILED=1; fi
}
FAILED=0

ports_of() { # NAME: --port arguments for its vbd and vif channels
    local tx rx
    tx=$(domu_port "$1" vif/0/event-channel-tx || domu_port "$1" vif/0/event-channel)
    rx=$(domu_port "$1" vif/0/event-channel-rx || echo "$tx")
    echo "--port vbd=$(domu_port "$1" vbd/51712/event-channel) --port vif-tx=$tx --port vif-rx=$rx"
}

# A controller that is to die: start it, wait for the state file it writes.
start_doomed() { # STATE ARGS...
    local state=$1 i; shift
    rm -f "$state"
    "$BIN" "$@" &
    DOOMED=$!
    for i in $(seq 1 240); do
        [ -s "$state" ] && return 0
        kill -0 "$DOOMED" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}

kill_doomed() {
    kill -KILL "$DOOMED"
    wait "$DOOMED" 2>/dev/null
}

domu_start domu2 pv 1; check owner.domu2_started $? "second protected domain"
domu_wait_io domu2 2 60; check owner.domu2_io $? "last_io=$(domu_last_io domu2)"
A=$(xl domid domu); B=$(xl domid domu2)
PA=$(ports_of domu); PB=$(ports_of domu2)

# 1. One dispatcher, two domains.
a0=$(domu_last_io domu); b0=$(domu_last_io domu2)
# shellcheck disable=SC2086
"$BIN" dispatch --dom "$A" $PA --dom "$B" $PB --holds 3
check owner.dispatch_rc $? "dispatcher exit"
domu_wait_io domu $((a0 + 2)) 60; check owner.dispatch_io.domu $? "from=$a0 now=$(domu_last_io domu)"
domu_wait_io domu2 $((b0 + 2)) 60; check owner.dispatch_io.domu2 $? "from=$b0 now=$(domu_last_io domu2)"

# 2. The controller dies with a hold pending.
# shellcheck disable=SC2086
start_doomed /tmp/owner1 hold --dom "$A" $PA --state /tmp/owner1; check owner.doomed_held $? "state=$(cat /tmp/owner1 2>/dev/null)"
kill_doomed
a=$(domu_last_io domu)
xl unpause domu 2>/dev/null
sleep 3
b=$(domu_last_io domu)
[ "$a" = "$b" ]; check owner.dead_hold_stalls $? "io_before=$a io_after=$b (xl unpause tried)"
# shellcheck disable=SC2086
start_doomed /tmp/owner2 adopt --dom "$A" $PA --state /tmp/owner1 --tag adopt1 \
    --cycles 2 --then-state /tmp/owner2
check owner.adopter_ready $? "state=$(cat /tmp/owner2 2>/dev/null)"
domu_wait_io domu $((a + 1)) 60; check owner.adopted_io $? "round=$((a + 1)) completed under the new owner"

# 3. The new controller, serving on, dies (most likely while the domU runs
# armed, else with a hold pending: the outcome must be the same).
kill_doomed
# shellcheck disable=SC2086
"$BIN" adopt --dom "$A" $PA --state /tmp/owner2 --tag adopt2 --wait-held 60 \
    --cycles 1 --disarm
check owner.adopt2_rc $? "third controller"

n=$(domu_last_io domu); m=$(domu_last_io domu2)
domu_wait_io domu $((n + 2)) 60; check owner.io_continues.domu $? "round=$((n + 2))"
domu_wait_io domu2 $((m + 2)) 60; check owner.io_continues.domu2 $? "round=$((m + 2))"
for d in domu domu2; do
    bad=$(grep -a 'DOMU-IO' "$(domu_log $d)" | awk '$2 > 2 && /fail/' | head -3)
    [ -z "$bad" ]; check "owner.no_failed_io.$d" $? "rounds=$(domu_last_io $d) ${bad:+failed: $bad}"
done
xl destroy domu2
exit $FAILED
