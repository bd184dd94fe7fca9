# Helpers for dom0 test scripts (/kemari/run): start the lab's standard
# domU -- the Debian 6.1 kernel with a busybox initramfs, a 16 MiB
# loop-backed disk (xvda) and a vif routed to dom0 (10.213.N.1 <-> .2, N=0
# unless given) -- and follow its console.  Source it: . /kemari/lab/domu.sh
DOMU_DIR=/kemari/domu

domu_log() { echo "/var/log/xen/console/guest-$1.log"; }

# domu_start NAME [pv|pvh] [N]: create the domU (its vif on 10.213.N.0/24,
# N=0..9) and wait for DOMU-READY.
domu_start() {
    local name=$1 type=${2:-pv} net=${3:-0} img=/tmp/$1.img dev i
    truncate -s 16M "$img"
    dev=$(losetup -f --show "$img") || return 1
    cat > "/tmp/$name.cfg" <<CFG
name = "$name"
type = "$type"
kernel = "$DOMU_DIR/vmlinuz"
ramdisk = "$DOMU_DIR/initrd.cpio.gz"
extra = "console=hvc0 quiet kemari_ip=10.213.$net.2"
memory = 128
vcpus = 1
on_crash = "preserve"
disk = [ "format=raw, vdev=xvda, access=rw, backendtype=phy, script=/kemari/lab/hotplug-block, target=$dev" ]
vif = [ "mac=00:16:3e:4b:0$net:02, ip=10.213.$net.2, script=/kemari/lab/hotplug-vif" ]
CFG
    xl create "/tmp/$name.cfg" || return 1
    for i in $(seq 1 240); do
        grep -q DOMU-READY "$(domu_log "$name")" 2>/dev/null && return 0
        sleep 0.5
    done
    echo "domU $name did not become ready"; tail -20 "$(domu_log "$name")"
    return 1
}

# domu_last_io NAME: the number of the domU's last completed I/O round.
domu_last_io() {
    grep -ao 'DOMU-IO [0-9]*' "$(domu_log "$1")" 2>/dev/null | awk '{n=$2} END{print n+0}'
}

# domu_wait_io NAME N [TIMEOUT]: wait until round N completed with disk=ok net=ok.
domu_wait_io() {
    local i
    for i in $(seq 1 $((${3:-60} * 2))); do
        grep -aq "DOMU-IO $2 disk=ok net=ok" "$(domu_log "$1")" 2>/dev/null && return 0
        [ "$(domu_last_io "$1")" -gt "$2" ] && break
        sleep 0.5
    done
    return 1
}

# domu_port NAME XENSTORE-SUBPATH: an event-channel port from the frontend's xenstore dir.
domu_port() {
    local domid
    domid=$(xl domid "$1") && xenstore-read "/local/domain/$domid/device/$2"
}
