#!/bin/bash
# SKELETON. Runs inside each of the two guests of two-host.sh (systemd mode).
# Kernel command line: vm.node=alpha|beta, vm.common=HOSTPATH (folder both
# guests mount for the config and for barriers), vm.ip=ADDR/PREFIX.
set -euo pipefail
S=/mnt/host
C=/mnt/common
R=r0
CFG=/etc/nbd-mirror/$R.toml
DEV=/dev/nbd0
node='' common='' ip=''
for arg in $(cat /proc/cmdline); do
    case $arg in
        vm.node=*) node=${arg#*=} ;;
        vm.common=*) common=${arg#*=} ;;
        vm.ip=*) ip=${arg#*=} ;;
    esac
done
[ -n "$node" ] && [ -n "$common" ] && [ -n "$ip" ] || { echo "vm.node, vm.common, vm.ip required"; exit 2; }
other=alpha
[ "$node" = alpha ] && other=beta
: >"$S/result"

now() { date +%s.%N; }
step() {
    local name=$1 t0 rc
    shift
    echo "=== step $name: $*"
    t0=$(now)
    set +e
    (set -e; "$@")
    rc=$?
    set -e
    if [ $rc -ne 0 ]; then
        echo "FAIL $name (exit $rc)" | tee -a "$S/result"
        journalctl --no-pager -o short-monotonic -u "mirrord@$R" -u "nbd-attach@$R" >"$S/journal.log" 2>&1 || true
        dmesg >"$S/dmesg.log" 2>&1 || true
        : >"$C/$node.failed"
        exit 1
    fi
    echo "ok $name $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')" | tee -a "$S/result"
}
# Both guests reach NAME, or the first one waits up to 180 s (or until the
# other reports a failure).
barrier() {
    local name=$1
    : >"$C/$node.$name"
    for _ in $(seq 360); do
        [ -e "$C/$other.$name" ] && return 0
        [ -e "$C/$other.failed" ] && { echo "$other failed"; return 1; }
        sleep 0.5
    done
    echo "barrier $name: $other did not arrive"
    return 1
}

setup() {
    mkdir -p "$C"
    mount -t hostfs -o "$common" none "$C"
    hostname "$node"
    echo "$node" >/etc/hostname
    # UML names vector NICs vec0, vec1, ...
    ip link set vec0 up
    ip addr add "$ip" dev vec0
    install -m 0644 "$C/$R.toml" "$CFG"
    install -m 0600 "$C/$R.secret" "/etc/nbd-mirror/$R.secret"
    echo "MIRROR_NODE=$node" >"/etc/nbd-mirror/$R.env"
}
ping_peer() {
    local peer_ip=10.99.0.1
    [ "$node" = alpha ] && peer_ip=10.99.0.2
    ping -c 3 -W 2 "$peer_ip"
}
create_md() { mirrorctl --config "$CFG" create-md; }
start_daemon() {
    systemctl start "mirrord@$R.service"
    systemctl is-active --quiet "mirrord@$R.service"
}
initial_sync() {
    # Both disks are fresh: alpha is made the source, beta syncs from it.
    if [ "$node" = alpha ]; then mirrorctl --config "$CFG" primary --force; fi
    mirrorctl --config "$CFG" wait-sync --timeout 240
    mirrorctl --config "$CFG" status --json | tee "$S/status-synced.json"
}
attach() {
    systemctl start "nbd-attach@$R.service"
    [ "$(cat /sys/block/nbd0/size)" -gt 0 ]
}
o2cb_start() {
    modprobe -a configfs ocfs2_nodemanager ocfs2_dlm ocfs2_stack_o2cb ocfs2_dlmfs ocfs2
    mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
    mkdir -p /dlm /etc/ocfs2
    mountpoint -q /dlm || mount -t ocfs2_dlmfs none /dlm
    cat >/etc/ocfs2/cluster.conf <<'EOF'
cluster:
	node_count = 2
	heartbeat_mode = local
	name = vmc

node:
	ip_port = 7777
	ip_address = 10.99.0.1
	number = 0
	name = alpha
	cluster = vmc

node:
	ip_port = 7777
	ip_address = 10.99.0.2
	number = 1
	name = beta
	cluster = vmc
EOF
    o2cb register-cluster vmc
}
mkfs_ocfs2() {
    [ "$node" = alpha ] || return 0
    mkfs.ocfs2 -q -F -N 2 -b 4K -C 64K -L vmocfs --cluster-stack=o2cb --cluster-name=vmc "$DEV"
}
mount_ocfs2() {
    mkdir -p /mnt/ocfs2
    mount -t ocfs2 "$DEV" /mnt/ocfs2
}
write_own() {
    head -c 16M /dev/urandom >"/mnt/ocfs2/$node.bin"
    sync
    sha256sum "/mnt/ocfs2/$node.bin" | cut -d' ' -f1 >"$C/$node.sha256"
}
read_other() {
    local got
    got=$(sha256sum "/mnt/ocfs2/$other.bin" | cut -d' ' -f1)
    echo "$other.bin: $got, expected $(cat "$C/$other.sha256")"
    [ "$got" = "$(cat "$C/$other.sha256")" ]
}
teardown() {
    umount /mnt/ocfs2
    systemctl stop "nbd-attach@$R.service"
    systemctl stop "mirrord@$R.service"
    [ "$(systemctl show -p Result --value "mirrord@$R.service")" = success ]
}

echo "node $node ($ip), peer $other"
step setup setup
step ping ping_peer
step create-md create_md
step start start_daemon
step b-started barrier started
step initial-sync initial_sync
step attach attach
step o2cb o2cb_start
step mkfs mkfs_ocfs2
step b-mkfs barrier mkfs
step mount mount_ocfs2
step write write_own
step b-written barrier written
step read-other read_other
step b-read barrier read
step teardown teardown
echo "TWO-HOST PASSED"
