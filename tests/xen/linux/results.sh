# Shared by the dom0 scripts here (source it): how a script reports.
#   result NAME ok|FAIL|info DETAIL...   one "RESULT ..." line; FAIL sets FAILED=1
#   check NAME DETAIL COMMAND...         result ok if COMMAND succeeds, else FAIL
#   wait_for SECONDS COMMAND...          poll COMMAND once a second
#   state_watch NODE FILE                log a xenstore node's value after each
#                                        change (the watcher's PID in WATCHERS)
# A script names each domain it booted (rather than restored) with
# "RESULT booted_domid info N": under TCG's emulated SVM such a PVH guest
# now and then triple-faults by itself, and the test runner boots the lab
# again once when one of them did and the script failed
# (boot_attach_test in test_linux_patches.py).
FAILED=0
WATCHERS=()
result() {
    echo "RESULT $*"
    [ "$2" = ok ] || [ "$2" = info ] || FAILED=1
}
check() {
    local name=$1 detail=$2; shift 2
    if "$@"; then result "$name" ok "$detail"; else result "$name" FAIL "$detail"; fi
}
wait_for() {
    local t=$1; shift
    for _ in $(seq 1 "$t"); do "$@" && return 0; sleep 1; done
    return 1
}
state_watch() {
    local node=$1
    xenstore-watch "$node" > >(while read -r _; do
        xenstore-read "$node" 2>/dev/null || echo gone; done > "$2") 2>/dev/null &
    WATCHERS+=($!)
}
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd    # for >(...) on a bare devtmpfs
