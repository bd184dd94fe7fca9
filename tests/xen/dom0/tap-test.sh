#!/bin/bash
# Runs in the lab's dom0 (boot.sh --run): start a domU with a disk and a vif,
# tap their event channels with XEN_DOMCTL_kemari, and check that the domU
# pauses on its next disk/net notification, with that port held, and that
# its I/O completes once the notification is released.
# Prints KEMARI-CHECK lines (from kemari-tap-test and from here).
set -u
. /kemari/lab/domu.sh
TYPE=${KEMARI_DOMU_TYPE:-pv}
check() { # NAME OK(0/1) DETAIL
    if [ "$2" = 0 ]; then echo "KEMARI-CHECK $1 PASS $3"; else echo "KEMARI-CHECK $1 FAIL $3"; FAILED=1; fi
}
FAILED=0

xl info | grep -E '^(xen_version|xen_extra|virt_caps)'
t0=$(date +%s.%N)
domu_start domu "$TYPE"; check domu_started $? "type=$TYPE"
echo "domU up in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N)-$t0}")s"
domu_wait_io domu 2 60; check domu_io_before $? "last_io=$(domu_last_io domu)"

# The frontends' event channels, as they published them in xenstore.
vbd=$(domu_port domu vbd/51712/event-channel)
vif_tx=$(domu_port domu vif/0/event-channel-tx || domu_port domu vif/0/event-channel)
vif_rx=$(domu_port domu vif/0/event-channel-rx || echo "$vif_tx")
console=$(xenstore-read "/local/domain/$(xl domid domu)/console/port")
echo "KEMARI-PORTS vbd=$vbd vif_tx=$vif_tx vif_rx=$vif_rx console=$console"
[ -n "$vbd" ] && [ -n "$vif_tx" ]; check frontend_ports $? "vbd=$vbd vif_tx=$vif_tx vif_rx=$vif_rx"

# While held: the round in progress must not complete (the guest is paused),
# and a toolstack unpause must not let it run (kemari-tap-test also checks
# that its vCPU got no CPU time meanwhile).
cat > /tmp/while-held <<'EOS'
#!/bin/bash
. /kemari/lab/domu.sh
a=$(domu_last_io domu)
xl unpause domu 2>/dev/null; u=$?
sleep 3; b=$(domu_last_io domu)
echo "while-held cycle=$1 io_before=$a io_after=$b xl_unpause_rc=$u"
echo "$a" > /tmp/held-at-$1
[ "$a" = "$b" ]
EOS
chmod +x /tmp/while-held

# A round makes several disk notifications (write, flush, read) before its
# ping, hence up to 16 hold/release cycles until a vif one has been held.
ports=(--port "vbd=$vbd" --port "vif-tx=$vif_tx")
[ "$vif_rx" != "$vif_tx" ] && ports+=(--port "vif-rx=$vif_rx")
# The grant references of the frontends' rings (grant state a checkpoint carries).
refs=(--ring-ref "vbd=$(domu_port domu vbd/51712/ring-ref)"
      --ring-ref "vif-tx=$(domu_port domu vif/0/tx-ring-ref)"
      --ring-ref "vif-rx=$(domu_port domu vif/0/rx-ring-ref)")
# A second domain, built but never started, stands in for the copy a
# secondary restores: ports and grants are restored into it.
# Its max_event_channels is the largest xl accepts: the tap's bitmaps must
# still be bounded by the event-channel ABI.
sed -e 's/^name = .*/name = "restored"/' -e '/^disk\|^vif/d' /tmp/domu.cfg > /tmp/restored.cfg
echo 'max_event_channels = 2147483647' >> /tmp/restored.cfg
xl create -p /tmp/restored.cfg >/dev/null; check restore_target_created $? "paused domain"
/kemari/files/kemari-tap-test --domid "$(xl domid domu)" "${ports[@]}" "${refs[@]}" \
    --restore-into "$(xl domid restored)" --while-held /tmp/while-held --max-cycles 16 \
    --notify "${KEMARI_NOTIFY:-port}"
tap_rc=$?
xl destroy restored

# After release and disarm, the round that was held completes, and later ones too.
last=$(ls /tmp/held-at-* 2>/dev/null | sort -t- -k3 -n | tail -1)
held_at=$(cat "$last" 2>/dev/null || echo 0)
domu_wait_io domu $((held_at + 1)) 30
check held_io_completed $? "round=$((held_at + 1)) $(grep -a "DOMU-IO $((held_at + 1)) " "$(domu_log domu)")"
n=$(domu_last_io domu)
domu_wait_io domu $((n + 2)) 30
check io_continues $? "round=$((n + 2))"
bad=$(grep -a 'DOMU-IO' "$(domu_log domu)" | awk '$2 > 2 && /fail/' | head -3)
[ -z "$bad" ]; check no_failed_io $? "rounds=$(domu_last_io domu) ${bad:+failed: $bad}"

# Patch 5's owner phase (one boot variant): several domains, a controller
# that dies, ADOPT.  Needs the domU above, running and disarmed.
owner_rc=0
if [ "${KEMARI_OWNER_PHASE:-0}" = 1 ]; then
    /kemari/files/owner-test.sh; owner_rc=$?
fi

xl list
xl dmesg | grep -i kemari | tail -5
xl destroy domu
exit $((tap_rc | FAILED | owner_rc))
