#!/bin/bash
# Guest side of the side-by-side benchmark with DRBD (bench-vm.sh, `make
# bench-vm`), systemd mode. Two guests, alpha (primary, runs fio) and beta
# (secondary), each with two disks of the same size:
#   disk 1: nbd-mirror's disk (mirrord@r0, internal metadata), /dev/nbd0 on
#           alpha through nbd-attach@r0 (the units and defaults as shipped)
#   disk 2: DRBD's disk (the kernel's DRBD 8.4 module, drbdadm from
#           drbd-utils), /dev/drbd0 on alpha
# Both replicate over the same guest link, protocol C, default settings
# otherwise; each does a full initial sync alpha -> beta first (timed), so the
# backing disks are in the same state on both sides.
#
# Kernel command line:
#   vm.node=alpha|beta, vm.ip=ADDR/PREFIX (NIC 0)
#   vm.rounds=N          alternating rounds (default 3)
#   vm.seconds=S         fio time per job (default 15, after a 2 s ramp)
# /mnt/common: a host folder both guests mount: configs, barriers, and the
# marks the host answers with its CPU readings (mark.ID -> ack.ID).
#
# alpha writes one line per fio job to /mnt/host/results.tsv:
#   round  workload  device  iops  bw_bytes  clat_mean_ns  clat_p99_ns
# Each step appends "ok NAME SECONDS" or "FAIL NAME" to /mnt/host/result; the
# first failure ends the script and leaves NODE.failed in the common folder.
set -euo pipefail
# shellcheck source=vm-images/tests/lib-guest.sh
. /mnt/host/lib-guest.sh
C=/mnt/common
node=$(cmdline_arg node || true)
ip=$(cmdline_arg ip || true)
rounds=$(cmdline_arg rounds || echo 3)
seconds=$(cmdline_arg seconds || echo 15)
[ -n "$node" ] && [ -n "$ip" ] && mountpoint -q "$C" || { echo "vm.node, vm.ip and /mnt/common required"; exit 2; }
[[ $rounds =~ ^[0-9]+$ && $seconds =~ ^[0-9]+$ ]] || { echo "vm.rounds and vm.seconds must be whole numbers"; exit 2; }
other=alpha peer_ip=10.99.0.1
[ "$node" = alpha ] && other=beta peer_ip=10.99.0.2
DRBD_RES=r1
DRBD_DEV=/dev/drbd0
: >"$S/result"

on_step_fail() { : >"$C/$node.failed"; }
# drbd_field NAME: a field of resource r1's line in /proc/drbd (cs, ro, ds).
drbd_field() { awk -v f="$1:" '$1 == "0:" { for (i = 2; i <= NF; i++) if (index($i, f) == 1) print substr($i, length(f) + 1) }' /proc/drbd; }
drbd_is() { [ "$(drbd_field "$1")" = "$2" ]; }

# --- setup ------------------------------------------------------------------
setup() {
    node_setup "$ip"
    # DRBD: drbd-utils' global_common.conf replaced by a plain one (no usage
    # count: the guests reach no other address); the resource with DRBD's
    # defaults except protocol C (also 8.4's default) written out.
    local disk
    disk=$(readlink -f "$(vm_disk 2)")
    [ -b "$disk" ]
    printf 'global { usage-count no; }\ncommon { }\n' >/etc/drbd.d/global_common.conf
    cat >"/etc/drbd.d/$DRBD_RES.res" <<EOF
resource $DRBD_RES {
    net { protocol C; }
    device $DRBD_DEV minor 0;
    disk $disk;
    meta-disk internal;
    on alpha { address 10.99.0.1:7790; }
    on beta { address 10.99.0.2:7790; }
}
EOF
    modprobe drbd
    head -n 1 /proc/drbd
    grep -q '^version: 8\.4\.' /proc/drbd
    drbdadm --version | head -n 3 || true
}
ping_peer() {
    wait_until "$(scaled 60)" ping -c 1 -W 2 "$peer_ip" >/dev/null
    ping -c 3 -W 2 "$peer_ip"
}

# --- nbd-mirror ---------------------------------------------------------------
mirror_start() {
    create_md
    start_daemon
    ctl status --json | tee "$S/status-started.json"
    jq -e '.disk == "inconsistent"' "$S/status-started.json" >/dev/null
}
# alpha's data wins (primary --force); a full sync to beta, timed.
mirror_sync() {
    [ "$node" = alpha ] || return 0
    wait_until "$(scaled 30)" ctl primary --force
    local t0
    t0=$(now)
    ctl wait-sync --timeout "$(scaled 900)"
    ctl status --json | tee "$S/status-synced.json"
    figure "nbd-mirror initial full sync of $(jq .size_bytes "$S/status-synced.json") bytes: $(since "$t0")s"
    jq -e '.disk == "up-to-date" and .peer.disk == "up-to-date" and .out_of_sync_bytes == 0' \
        "$S/status-synced.json" >/dev/null
}
mirror_attach() {
    [ "$node" = alpha ] || return 0
    attach
    ctl status --json | tee "$S/status-attached.json"
    jq -e '.role == "primary" and .peer.connection == "connected"' "$S/status-attached.json" >/dev/null
}

# --- DRBD ---------------------------------------------------------------------
drbd_start() {
    drbdadm create-md --force "$DRBD_RES" </dev/null
    drbdadm up "$DRBD_RES"
    cat /proc/drbd
}
drbd_sync() {
    [ "$node" = alpha ] || return 0
    wait_until "$(scaled 60)" drbd_is cs Connected
    drbdadm primary --force "$DRBD_RES"
    local t0 bytes
    t0=$(now)
    wait_until "$(scaled 900)" drbd_is ds UpToDate/UpToDate
    bytes=$(blockdev --getsize64 "$DRBD_DEV")
    figure "DRBD initial full sync of $bytes bytes: $(since "$t0")s"
    cat /proc/drbd
    drbd_is ro Primary/Secondary
}

# --- the benchmark (alpha) ------------------------------------------------------
# host_mark ID: the host records both guests' CPU time under ID and answers.
host_mark() {
    : >"$C/mark.$1"
    wait_until 20 test -e "$C/ack.$1" || echo "$(ts) no answer from the host for mark $1"
}
# settle: both nodes write back what their page caches hold (nbd-mirror's
# backing disks are buffered), so one job's writeback does not fall into the next.
settle() {
    sync
    : >"$C/settle.$1"
    wait_for "settled.$1" 60
}
# fio_job NAME DEVICE RW BS QD OUT
fio_job() {
    fio --name="$1" --filename="$2" --rw="$3" --bs="$4" --iodepth="$5" \
        --ioengine=libaio --direct=1 --runtime="$seconds" --time_based --ramp_time=2 \
        --randrepeat=0 --output-format=json --output="$6"
}
WORKLOADS="seq1m:write:1M:8 rand4k-qd1:randwrite:4k:1 rand4k-qd16:randwrite:4k:16"
bench() {
    [ "$node" = alpha ] || return 0
    local r w name rw bs qd devs dev label out id
    mkdir -p "$S/fio"
    : >"$S/results.tsv"
    link_drops >/run/drops-before
    for r in $(seq "$rounds"); do
        for w in $WORKLOADS; do
            IFS=: read -r name rw bs qd <<<"$w"
            # Alternate which device goes first.
            if [ $((r % 2)) = 1 ]; then devs="drbd nbd"; else devs="nbd drbd"; fi
            for label in $devs; do
                dev=$DRBD_DEV
                [ "$label" = nbd ] && dev=$DEV
                id="$r.$name.$label"
                out="$S/fio/$id.json"
                settle "$id"
                host_mark "$id.start"
                fio_job "$name" "$dev" "$rw" "$bs" "$qd" "$out"
                host_mark "$id.end"
                jq -r --arg r "$r" --arg w "$name" --arg d "$label" \
                    '.jobs[0].write | [$r, $w, $d, .iops, .bw_bytes, .clat_ns.mean,
                      (.clat_ns.percentile["99.000000"] // 0)] | @tsv' "$out" | tee -a "$S/results.tsv"
                jq -e '.jobs[0].error == 0 and .jobs[0].write.io_bytes > 0' "$out" >/dev/null
            done
        done
    done
}
# After the runs: both replications still connected. A link drop during
# the runs is a figure (the table's host prints it), not a failure.
check_links() {
    local drops
    drops=$(($(link_drops) - $(cat /run/drops-before)))
    ctl status --json | tee "$S/status-after.json"
    cat /proc/drbd
    figure "during the runs: nbd-mirror link drops $drops (before them: $(cat /run/drops-before)), peer" \
        "$(jq -r .peer.connection "$S/status-after.json"); DRBD at the end $(drbd_field cs) $(drbd_field ro) $(drbd_field ds)"
    jq -e '.peer.connection == "connected" and .out_of_sync_bytes == 0' "$S/status-after.json" >/dev/null
    drbd_is cs Connected
}
# What a system call costs in this guest (UML runs the guest's processes
# under ptrace: a userspace daemon pays for that, an in-kernel one does not).
syscall_cost() {
    [ "$node" = alpha ] || return 0
    local t0 n=50000
    t0=$(now)
    dd if=/dev/zero of=/dev/null bs=1 count=$n status=none
    figure "system call cost: $(awk -v a="$t0" -v b="$(now)" -v n=$n 'BEGIN { printf "%.1f", (b - a) * 1e6 / (2 * n) }') µs" \
        "(dd bs=1: $n reads and $n writes)"
}
# beta: answer alpha's settle requests (settle.ID -> settled.ID) until alpha
# is done or failed.
answer_settles() {
    local f id
    for f in "$C"/settle.*; do
        [ -e "$f" ] || continue
        id=${f#"$C"/settle.}
        [ -e "$C/settled.$id" ] && continue
        sync
        : >"$C/settled.$id"
    done
    [ -e "$C/alpha.done" ] || [ -e "$C/alpha.failed" ]
}
serve_settles() {
    [ "$node" = beta ] || return 0
    wait_until "$(scaled 3600)" answer_settles
    [ -e "$C/alpha.done" ]
}
stop_all() {
    if [ "$node" = alpha ]; then
        systemctl stop "nbd-attach@$R.service"
        drbdadm secondary "$DRBD_RES"
    fi
    drbdadm down "$DRBD_RES"
    systemctl stop "mirrord@$R.service"
}

step setup setup
step ping ping_peer
step syscall-cost syscall_cost
step mirror-start mirror_start
step mirror-sync mirror_sync
step drbd-start drbd_start
step drbd-sync drbd_sync
step attach-nbd mirror_attach
barrier ready 1800
step bench bench
step serve-settles serve_settles
if [ "$node" = alpha ]; then
    step check-links check_links
    : >"$C/alpha.done"
fi
step stop stop_all
echo "BENCH DONE"
