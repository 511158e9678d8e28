#!/bin/bash
# Guest side of the two-host test (two-host.sh, `make vm-two-host`), systemd mode.
# Kernel command line:
#   vm.node=alpha|beta   this node (alpha is o2cb node 0 and the initial sync source)
#   vm.ip=ADDR/PREFIX    address on the guest link (NIC 0: vm_nic 0)
#   vm.phase=first|rejoin
#   vm.delay_ms=MS, vm.delay_secs=S  the dm-delay phase: beta's backing disk
#                        answers every I/O MS ms late for S s while both write
#       first:  alpha runs the whole test in one boot; beta runs up to the
#               power cut (the host SIGKILLs its guest)
#       rejoin: beta's second boot on the same disk: resync, remount, checks
# /mnt/common: a host folder both guests mount (run-guest.sh --mount): config,
# secret, barriers, checksums, markers for the host.
#
# Every step appends "ok NAME SECONDS" or "FAIL NAME" to /mnt/host/result; the
# first failure ends the script (non-zero) and leaves a "NODE.failed" marker
# in the common folder so the other guest stops waiting.
set -euo pipefail
# shellcheck source=vm-images/tests/lib-guest.sh
. /mnt/host/lib-guest.sh
C=/mnt/common
M=/mnt/ocfs2
node=$(cmdline_arg node || true)
ip=$(cmdline_arg ip || true)
phase=$(cmdline_arg phase || echo first)
delay_ms=$(cmdline_arg delay_ms || echo 300)
delay_secs=$(cmdline_arg delay_secs || echo 25)
[ -n "$node" ] && [ -n "$ip" ] && mountpoint -q "$C" || { echo "vm.node, vm.ip and /mnt/common required"; exit 2; }
other=alpha peer_ip=10.99.0.1
[ "$node" = alpha ] && other=beta peer_ip=10.99.0.2
: >"$S/result"

# A failed step tells the other guest to stop waiting.
on_step_fail() { : >"$C/$node.failed"; }
# status_is JQ-FILTER: the daemon's status --json satisfies the filter.
status_is() { ctl status --json | jq -e "$1" >/dev/null; }

# --- setup ------------------------------------------------------------------
# mirrord's backing disk is /dev/mapper/r0-disk, a device-mapper device over
# the guest's disk 1: a linear map, whose table beta swaps for dm-delay (every
# I/O answered MS ms late) and back while mirrord runs (dmsetup suspend waits
# for the I/O in flight; nothing is failed).
DM=r0-disk
dm_table() {
    local dev sectors
    dev=$(vm_disk 1)
    sectors=$(blockdev --getsz "$dev")
    if [ "$1" = 0 ]; then echo "0 $sectors linear $dev 0"; else echo "0 $sectors delay $dev 0 $1"; fi
}
dm_setup() {
    command -v dmsetup >/dev/null || { echo "no dmsetup in the image"; return 1; }
    modprobe -a dm-mod dm-delay
    dmsetup create "$DM" --table "$(dm_table 0)"
    udevadm settle || true
    [ -b "/dev/mapper/$DM" ]
}
# dm_delay MS: every I/O of the backing disk MS ms late from now (0: none).
dm_delay() {
    dmsetup suspend "$DM"
    dmsetup load "$DM" --table "$(dm_table "$1")"
    dmsetup resume "$DM"
    echo "$(ts) $DM: $(dmsetup table "$DM")"
}
# Requests the kernel's NBD client timed out in this boot (the attach agent
# replaces the socket the kernel gave up; the request is sent again).
nbd_timeouts() { dmesg | grep -c 'nbd0: Connection timed out' || true; }
# I/O errors the kernel reported on the device in this boot.
nbd_io_errors() { dmesg | grep -c 'I/O error, dev nbd0' || true; }
# kernel_client: this boot's request timeouts, I/O errors and connections
# left, for the host's check ("TIMEOUTS CONNECTIONS IO_ERRORS" in the common
# folder).
kernel_client() {
    local n clients io
    n=$(nbd_timeouts)
    io=$(nbd_io_errors)
    clients=$(ctl status --json | jq .nbd_clients)
    figure "kernel NBD client ($phase boot): $n request timeouts, $io I/O errors, $clients of 4 connections left"
    echo "$n $clients $io" >"$C/$node-$phase.kclient"
}
setup() {
    node_setup "$ip"
    dm_setup
    # mirrord's log streams to the share as it happens, so a power cut keeps it.
    journalctl --no-pager -f -o short-monotonic -u "mirrord@$R" -u "nbd-attach@$R" \
        >>"$S/mirrord-live.log" 2>&1 &
}
# The other guest may still be booting (boot times differ by tens of
# seconds under QEMU): wait for its first answer.
ping_peer() {
    wait_until "$(scaled 60)" ping -c 1 -W 2 "$peer_ip" >/dev/null
    ping -c 3 -W 2 "$peer_ip"
}
create_md_dump() { create_md; ctl dump-md >"$S/dump-md-created.json"; }
start_daemon_status() {
    start_daemon
    ctl status --json | tee "$S/status-started.json"
}
# Two fresh nodes are both inconsistent: alpha's data is made the one that
# wins (as drbdadm primary --force), a full sync to beta follows.
initial_sync() {
    jq -e '.disk == "inconsistent"' "$S/status-started.json" >/dev/null
    # mirrorctl refuses while the peer link is still in its handshake ("try
    # again in a moment"), which a slow (TCG) guest can still be in here.
    if [ "$node" = alpha ]; then wait_until "$(scaled 30)" ctl primary --force; fi
    local t0
    t0=$(now)
    ctl wait-sync --timeout "$(scaled 900)"
    ctl status --json | tee "$S/status-synced.json"
    if [ "$node" = alpha ]; then figure "initial full sync of $(jq .size_bytes "$S/status-synced.json") bytes: $(since "$t0")s, link drops $(link_drops)"; fi
    jq -e '.disk == "up-to-date" and .out_of_sync_bytes == 0 and .peer.connection == "connected"
           and .peer.disk == "up-to-date"' "$S/status-synced.json" >/dev/null
}
attach_primary() {
    attach
    local bytes
    bytes=$(( $(cat /sys/block/nbd0/size) * 512 ))
    ctl status --json | tee "$S/status-attached.json"
    # auto-promote made this node primary; the export is the whole data area.
    jq -e --argjson b "$bytes" '.role == "primary" and .size_bytes == $b' "$S/status-attached.json" >/dev/null
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
    # Shorter than the defaults (31 -> 60 s, 30 s) so a dead node is declared
    # dead sooner; the same on both nodes (o2net checks). The heartbeat write
    # timeout equals the dead time (30 s), well above mirrord's peer timeout.
    # Both scale with the backend's slowness (x4 under QEMU: a TCG guest on a
    # busy host can get no CPU for tens of seconds).
    local c=/sys/kernel/config/cluster/vmc
    echo "$(scaled 16)" >"$c/heartbeat/dead_threshold"
    echo 2000 >"$c/keepalive_delay_ms"
    echo 2000 >"$c/reconnect_delay_ms"
    echo "$(scaled 15)000" >"$c/idle_timeout_ms"
    grep -H . "$c/heartbeat/dead_threshold" "$c/idle_timeout_ms"
}
# A replicated discard of a bounded range completes and keeps the peer link.
discard_range() {
    [ "$node" = alpha ] || return 0
    local t0
    t0=$(now)
    timeout "$(scaled 60)" blkdiscard -o 0 -l 16M "$DEV"
    echo "blkdiscard 16 MiB: $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')s"
    ctl status --json | tee "$S/status-discarded.json"
    jq -e '.peer.connection == "connected" and .out_of_sync_bytes == 0' "$S/status-discarded.json" >/dev/null
}
# mkfs.ocfs2 with its defaults: it discards the whole device first (TRIMs of
# up to 4 GiB - 4 KiB from the kernel, which mirrord applies in 64 MiB pieces
# on both disks). The peer link must stay up throughout: no drop, no split
# brain, nothing out of sync.
mkfs_ocfs2() {
    [ "$node" = alpha ] || return 0
    local t0 drops0 drops secs kt0
    drops0=$(link_drops)
    kt0=$(nbd_timeouts)
    t0=$(now)
    timeout "$(scaled 900)" mkfs.ocfs2 -q -F -N 2 -b 4K -C 64K -L vmocfs --cluster-stack=o2cb --cluster-name=vmc "$DEV"
    secs=$(since "$t0")
    drops=$(( $(link_drops) - drops0 ))
    ctl status --json | tee "$S/status-mkfs.json"
    figure "mkfs.ocfs2 (default discard) of $(jq .size_bytes "$S/status-mkfs.json") bytes: ${secs}s, link drops $drops," \
        "peer $(jq -r .peer.connection "$S/status-mkfs.json"), out of sync $(jq .out_of_sync_bytes "$S/status-mkfs.json") bytes," \
        "split brain $(jq .split_brain "$S/status-mkfs.json"); kernel request timeouts $(( $(nbd_timeouts) - kt0 ))," \
        "NBD connections $(jq .nbd_clients "$S/status-mkfs.json")"
    [ "$drops" -eq 0 ]
    jq -e '.peer.connection == "connected" and .peer.replication == "established"
           and .out_of_sync_bytes == 0 and .split_brain == false' "$S/status-mkfs.json" >/dev/null
    # Every TRIM of mkfs's discard is answered within the kernel's request
    # timeout (mirrord's TRIM budget, docs/ARCHITECTURE.md).
    [ "$(( $(nbd_timeouts) - kt0 ))" -eq 0 ]
}
# barrier=1: OCFS2 mounts without barriers by default, and then its fsync
# sends no FLUSH to the device: fsync'd writes finished in 45 ms while the
# peer's disk took 300 ms per I/O (dm-delay), i.e. before they were durable
# on either disk. With barriers each fsync flushes both disks.
mount_ocfs2() {
    mkdir -p "$M"
    mount -t ocfs2 -o barrier=1 "$DEV" "$M"
    grep " $M ocfs2 " /proc/mounts | grep -q barrier=1
    if [ "$node" = alpha ] && [ "$phase" = first ]; then mkdir -p "$M/shared" "$M/during"; fi
}
# sha256 of every regular file under the mount, sorted by path.
manifest() { (cd "$M" && find . -type f -print0 | sort -z | xargs -0r sha256sum); }

# --- cross reads and concurrent writes ----------------------------------------
write_own() {
    head -c 16M /dev/urandom >"$M/$node.bin"
    sync
    sha256sum "$M/$node.bin" | cut -d' ' -f1 >"$C/$node.sha256"
}
read_other() {
    local got want
    got=$(sha256sum "$M/$other.bin" | cut -d' ' -f1)
    want=$(cat "$C/$other.sha256")
    echo "$other.bin: $got, expected $want"
    [ "$got" = "$want" ]
}
# Both nodes write 40 files each into the same directory at the same time.
concurrent_write() {
    local i size
    : >"$S/conc-own.sha256"
    for i in $(seq -w 1 40); do
        size=$(( (RANDOM % 32 + 1) * 64 ))K
        head -c "$size" /dev/urandom >"$M/shared/$node-$i"
        (cd "$M" && sha256sum "./shared/$node-$i") >>"$S/conc-own.sha256"
    done
    sync
    cp "$S/conc-own.sha256" "$C/$node.conc-own.sha256"
}
concurrent_check() {
    local n
    (cd "$M" && find ./shared -type f -print0 | sort -z | xargs -0r sha256sum) >"$C/$node.conc-manifest"
    n=$(wc -l <"$C/$node.conc-manifest")
    echo "$n files in shared/"
    [ "$n" -eq 80 ]
    # This node sees exactly what each writer recorded when writing.
    sort "$C/alpha.conc-own.sha256" "$C/beta.conc-own.sha256" | diff - <(sort "$C/$node.conc-manifest")
}
concurrent_compare() { diff "$C/alpha.conc-manifest" "$C/beta.conc-manifest"; }

# --- a slow peer disk (dm-delay on beta) while both write ---------------------
# timed_writes TAG SECONDS: fsync'd 64 KiB files under delay/ for SECONDS (at
# most 2000), each write's time in S/TAG.times ("N MICROSECONDS"), and
# "COUNT MEDIAN MAX" (seconds) in S/TAG.summary. One process per write (fork
# is slow in UML guests): bash's EPOCHREALTIME for the clock, dd for the write.
timed_writes() {
    local tag=$1 secs=$2 i=0 t0 t1 end f
    mkdir -p "$M/delay"
    : >"$S/$tag.times"
    end=$((${EPOCHREALTIME/./} + secs * 1000000))
    while [ "${EPOCHREALTIME/./}" -lt "$end" ] && [ $i -lt 2000 ]; do
        i=$((i + 1))
        printf -v f 'delay/%s-%s-%04d' "$node" "$tag" "$i"
        t0=${EPOCHREALTIME/./}
        dd if=/dev/urandom of="$M/$f" bs=64K count=1 iflag=fullblock conv=fsync status=none ||
            { echo "$(ts) write $i ($f) failed"; return 1; }
        t1=${EPOCHREALTIME/./}
        echo "$i $((t1 - t0))" >>"$S/$tag.times"
    done
    (cd "$M" && sha256sum "delay/$node-$tag-"*) >>"$S/delay-own.sha256"
    sort -n -k2 "$S/$tag.times" |
        awk '{ t[NR] = $2 / 1e6 } END { printf "%d %.3f %.3f\n", NR, t[int((NR + 1) / 2)], t[NR] }' >"$S/$tag.summary"
    cat "$S/$tag.summary"
}
# Baseline: the same writes without the delay.
delay_base() {
    : >"$S/delay-own.sha256"
    timed_writes base 8
}
delay_on() {
    [ "$node" = beta ] || return 0
    dm_delay "$delay_ms"
}
delay_off() {
    [ "$node" = beta ] || return 0
    dm_delay 0
}
# Both write while beta's disk is slow: the writes slow down (each fsync
# waits for a flush on beta's disk), the link stays up.
delay_write() {
    local n med max bn bmed
    link_drops >/run/drops-before
    timed_writes delayed "$delay_secs"
    read -r n med max <"$S/delayed.summary"
    read -r bn bmed _ <"$S/base.summary"
    figure "dm-delay ${delay_ms} ms per I/O on beta's disk for ${delay_secs}s: $n writes of 64 KiB (fsync'd)," \
        "median ${med}s, longest ${max}s; without the delay $bn writes in 8s, median ${bmed}s"
    [ "$n" -gt 0 ]
    # Slower than without the delay, and at least the delay itself.
    awk -v m="$med" -v b="$bmed" -v d="$delay_ms" 'BEGIN { exit !(m > b && m >= d / 1000) }'
}
# After the delay: no link drop during it, still connected and replicating,
# no split brain, and nothing marked out of sync on either node (every write
# both acknowledged is on both disks); each node reads the other's files.
delay_check() {
    local drops
    drops=$(( $(link_drops) - $(cat /run/drops-before) ))
    ctl status --json | tee "$S/status-delay.json"
    figure "after the delay: link drops $drops, peer $(jq -r .peer.connection "$S/status-delay.json")" \
        "($(jq -r .peer.replication "$S/status-delay.json")), out of sync $(jq .out_of_sync_bytes "$S/status-delay.json") bytes," \
        "split brain $(jq .split_brain "$S/status-delay.json")"
    [ "$drops" -eq 0 ]
    jq -e '.peer.connection == "connected" and .peer.replication == "established"
           and .out_of_sync_bytes == 0 and .split_brain == false and .disk == "up-to-date"
           and .peer.disk == "up-to-date"' "$S/status-delay.json" >/dev/null
    cp "$S/delay-own.sha256" "$C/$node.delay-own.sha256"
}
delay_read_other() { (cd "$M" && sha256sum --quiet -c "$C/$other.delay-own.sha256"); }

# --- a restart and a kill -9 of one host's mirrord while both write -----------
# The writes are timed_writes' (fsync'd 64 KiB files under delay/, each timed;
# the longest is the pause a writer saw). EV_NODE's mirrord is restarted
# (systemctl restart: hand-over through the fd store) or killed (kill -9:
# systemd restarts it, the attach agent reconnects) 5 s in. The other host's
# mirrord loses its peer for the moment (a pause within reconnect-grace).
# Fails on any failed write, any I/O error, OCFS2 error or abort, heartbeat
# write timeout, fencing or node-down in the kernel log, fewer than CONNS
# connections afterwards, a restarted agent, a split brain or anything out
# of sync once the resync is done. Known data: each host then reads back the
# other's files, written before and during the event (ev_read_other).
ev_kernel_bad='OCFS2: ERROR|OCFS2: abort|read-only|aborted journal|very sorry to be fencing|Heartbeat write timeout|fencing this node|Node [0-9]+/[0-9]+ down|Begin replay journal|Begin recovery on domain|No longer connected to node'
mirrord_event_phase() {
    local kind=$1 ev_node=$2 secs=$3 k0 m0 a0 rounds0 drops0 t0 wpid wrc=0 evt=- out n med max k problems=
    k0=$(dmesg | wc -l)
    m0=$(mirrord_pid)
    a0=$(agent_pid)
    rounds0=$(agent_rounds)
    drops0=$(link_drops)
    timed_writes "ev-$kind" "$secs" >"$S/ev-$kind.writer.log" 2>&1 &
    wpid=$!
    if [ "$node" = "$ev_node" ]; then
        sleep 5
        t0=$(now)
        echo "$(ts) $kind of mirrord (PID $m0)"
        out=$(mirrord_event "$kind") || problems+="; $out"
        evt=$(since "$t0")
        echo "$(ts) $kind done in ${evt}s, mirrord PID $(mirrord_pid)"
    fi
    wait "$wpid" || wrc=$?
    cat "$S/ev-$kind.writer.log"
    [ "$wrc" -eq 0 ] || problems+="; the writer failed (exit $wrc): $(grep -m1 failed "$S/ev-$kind.writer.log")"
    # The kernel log since the phase began.
    dmesg | tail -n "+$((k0 + 1))" >"$S/dmesg-ev-$kind.log"
    k=$S/dmesg-ev-$kind.log
    if kernel_errors "$ev_kernel_bad" <"$k" >"$S/ev-$kind.kernel-bad"; then
        problems+="; kernel log: $(head -n 3 "$S/ev-$kind.kernel-bad" | tr '\n' '|')"
    fi
    # Every connection back, then the pair in sync again.
    wait_until "$(scaled 30)" all_connected || problems+="; $(nbd_sockets) sockets, $(nbd_clients) of $CONNS clients"
    ctl wait-sync --timeout "$(scaled 120)" || problems+="; wait-sync failed"
    ctl status --json >"$S/status-ev-$kind.json"
    jq -e '.peer.connection == "connected" and .peer.replication == "established"
           and .out_of_sync_bytes == 0 and .split_brain == false and .disk == "up-to-date"
           and .peer.disk == "up-to-date"' "$S/status-ev-$kind.json" >/dev/null ||
        problems+="; status: $(jq -c '{disk, out_of_sync_bytes, split_brain, peer}' "$S/status-ev-$kind.json")"
    [ "$(agent_pid)" = "$a0" ] || problems+="; the agent was restarted ($a0 -> $(agent_pid))"
    if [ "$node" = "$ev_node" ]; then
        [ "$(mirrord_pid)" != "$m0" ] || problems+="; mirrord kept PID $m0"
        if [ "$kind" = kill ] && [ "$(agent_rounds)" -le "$rounds0" ]; then problems+="; the agent logged no reconnect"; fi
    else
        [ "$(mirrord_pid)" = "$m0" ] || problems+="; the other host's mirrord changed PID ($m0 -> $(mirrord_pid))"
    fi
    read -r n med max <"$S/ev-$kind.summary" || { n=0 med=- max=-; }
    echo "$max" >"$C/$node.ev-$kind.pause"
    figure "$kind of $ev_node's mirrord (event ${evt}s) while both write: $n writes of 64 KiB (fsync'd) in ${secs}s," \
        "median ${med}s, longest pause ${max}s; link drops $(($(link_drops) - drops0)), kernel request timeouts" \
        "$(grep -c 'Connection timed out' "$k" || true), hb write hung $(grep -c 'hb write hung' "$k" || true)," \
        "agent reconnects $((rounds0)) -> $(agent_rounds), $(nbd_sockets) sockets / $(nbd_clients) of $CONNS clients," \
        "out of sync $(jq .out_of_sync_bytes "$S/status-ev-$kind.json"), split brain $(jq .split_brain "$S/status-ev-$kind.json")"
    journalctl --no-pager -o short-monotonic -u "mirrord@$R" -u "nbd-attach@$R" >"$S/journal-ev-$kind.log" 2>&1 || true
    cp "$S/delay-own.sha256" "$C/$node.delay-own.sha256"
    [ -z "$problems" ] || { echo "$kind: FAILED${problems}"; return 1; }
}
# Known data after an event: from the device (caches dropped), this host's
# files and the other's, written before (the 16 MiB files, the concurrent
# writers', the timed writes) and during it.
ev_read_other() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    (cd "$M" && sha256sum --quiet -c "$C/alpha.delay-own.sha256" "$C/beta.delay-own.sha256" \
        "$C/alpha.conc-own.sha256" "$C/beta.conc-own.sha256")
    [ "$(sha256sum "$M/alpha.bin" | cut -d' ' -f1)" = "$(cat "$C/alpha.sha256")" ]
    [ "$(sha256sum "$M/beta.bin" | cut -d' ' -f1)" = "$(cat "$C/beta.sha256")" ]
    echo "$(cat "$C"/*.delay-own.sha256 | wc -l) timed-write files and the earlier files read back"
}

# --- power cut of beta (alpha's side) -----------------------------------------
# Writer on alpha: one 64 KiB file at a time under during/, fsync'd, its
# sha256 and completion time recorded, about 10 a second, until the stop file
# appears (at most 3000 files, 190 MiB).
writer() {
    local i=0 f
    : >"$S/during.sha256"
    : >"$S/during.times"
    while [ ! -e /run/writer.stop ] && [ $i -lt 3000 ]; do
        i=$((i + 1))
        f=$(printf 'during/alpha-%04d' "$i")
        head -c 64K /dev/urandom >/run/writer.buf
        dd if=/run/writer.buf of="$M/$f" bs=64K conv=fsync status=none
        (cd /run && sha256sum writer.buf) | sed "s|writer.buf|./$f|" >>"$S/during.sha256"
        echo "$i $(date +%s.%N)" >>"$S/during.times"
        sleep 0.1
    done
}
start_writer() {
    wait_for beta.crash-ready 300
    rm -f /run/writer.stop
    writer >"$S/writer.log" 2>&1 &
    echo $! >/run/writer.pid
    sleep 3
    [ "$(wc -l <"$S/during.sha256")" -gt 0 ]
    : >"$C/alpha.writing"
}
# The host kills beta; alpha's mirrord notices the peer is gone, OCFS2 on
# alpha declares beta dead and recovers its journal, and the writer goes on.
write_while_down() {
    wait_for host.beta-killed 120
    local t_kill i n0 n
    t_kill=$(cat "$C/host.beta-killed")
    for i in $(seq "$(scaled 120)"); do
        status_is '.peer.connection != "connected"' && break
        sleep 0.5
    done
    ctl status --json | tee "$S/status-peer-lost.json"
    jq -e '.peer.connection != "connected" and .role == "primary" and .disk == "up-to-date"' \
        "$S/status-peer-lost.json" >/dev/null
    echo "$(ts) mirrord: peer lost, $(awk -v a="$t_kill" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')s after the kill"
    # 40 more files completed after the kill (waits out OCFS2's recovery).
    n0=$(awk -v k="$t_kill" '$2 <= k' "$S/during.times" | wc -l)
    for i in $(seq "$(scaled 240)"); do
        n=$(wc -l <"$S/during.times")
        [ "$n" -ge $((n0 + 40)) ] && break
        kill -0 "$(cat /run/writer.pid)" || { echo "writer died"; return 1; }
        sleep 0.5
    done
    echo "files before the kill: $n0, now: $n"
    [ "$n" -ge $((n0 + 40)) ]
    # The longest pause between two completed files: OCFS2 recovery + mirrord.
    awk 'NR > 1 { d = $2 - p; if (d > m) m = d } { p = $2 } END { printf "longest write pause %.1fs\n", m }' \
        "$S/during.times" | tee "$S/write-pause.txt"
    # What alpha wrote since is marked out of sync for beta.
    ctl status --json | tee "$S/status-while-down.json"
    jq -e '.peer.connection != "connected" and .out_of_sync_bytes > 0' "$S/status-while-down.json" >/dev/null
    : >"$C/alpha.wrote-while-down"
}
# The writer keeps going while beta boots and its mirrord connects and
# resyncs; it stops once beta reports its daemon connected.
stop_writer() {
    wait_for beta.connected 300
    sleep 2
    : >/run/writer.stop
    local pid i
    pid=$(cat /run/writer.pid)
    for i in $(seq "$(scaled 120)"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then echo "writer did not stop"; return 1; fi
    sync
    echo "writer wrote $(wc -l <"$S/during.sha256") files"
    # alpha reads back what it wrote.
    (cd "$M" && sha256sum --quiet -c "$S/during.sha256")
    cp "$S/during.sha256" "$C/alpha.during.sha256"
}
alpha_manifest() {
    ctl wait-sync --timeout "$(scaled 300)"
    ctl status --json | tee "$S/status-resynced.json"
    manifest >"$C/alpha.manifest"
    echo "$(wc -l <"$C/alpha.manifest") files"
    : >"$C/alpha.manifest-done"
}
read_beta_after() {
    wait_for beta.after-written 300
    local got want
    got=$(sha256sum "$M/beta-after.bin" | cut -d' ' -f1)
    want=$(cat "$C/beta-after.sha256")
    echo "beta-after.bin: $got, expected $want"
    [ "$got" = "$want" ]
}

# --- beta: first boot ends in a power cut ---------------------------------------
wait_for_power_cut() {
    kernel_client
    ctl status --json >"$S/status-before-cut.json"
    sync
    : >"$C/beta.crash-ready"
    echo "$(ts) beta: waiting to be killed by the host"
    sleep "$(scaled 600)"
    echo "beta was not killed"
    return 1
}

# --- beta: second boot ------------------------------------------------------------
rejoin_start() {
    ctl dump-md | tee "$S/dump-md-after-crash.json"
    systemctl start "mirrord@$R.service"
    local i
    for i in $(seq "$(scaled 120)"); do
        status_is '.peer.connection == "connected"' && break
        sleep 0.5
    done
    ctl status --json | tee "$S/status-reconnected.json"
    jq -e '.peer.connection == "connected"' "$S/status-reconnected.json" >/dev/null
    : >"$C/beta.connected"
}
# beta missed alpha's writes (and was a crashed primary): it must be the
# resync target. Then both disks are up to date.
rejoin_sync() {
    ctl wait-sync --timeout "$(scaled 300)"
    ctl status --json | tee "$S/status-resynced.json"
    jq -e '.disk == "up-to-date" and .out_of_sync_bytes == 0 and .peer.disk == "up-to-date"' \
        "$S/status-resynced.json" >/dev/null
    journalctl --no-pager -o short-monotonic -u "mirrord@$R" | grep -i 'sync\|resync\|crash\|source\|target' |
        tee "$S/resync-lines.log" || true
}
rejoin_compare() {
    wait_for alpha.manifest-done 300
    manifest >"$S/beta.manifest"
    echo "$(wc -l <"$S/beta.manifest") files on beta, $(wc -l <"$C/alpha.manifest") on alpha"
    diff "$C/alpha.manifest" "$S/beta.manifest"
    # Every file alpha wrote while beta was down is there, unchanged.
    (cd "$M" && sha256sum --quiet -c "$C/alpha.during.sha256")
    (cd "$M" && sha256sum --quiet -c "$C/alpha.conc-own.sha256")
    (cd "$M" && sha256sum --quiet -c "$C/beta.conc-own.sha256")
    [ "$(sha256sum "$M/alpha.bin" | cut -d' ' -f1)" = "$(cat "$C/alpha.sha256")" ]
    [ "$(sha256sum "$M/beta.bin" | cut -d' ' -f1)" = "$(cat "$C/beta.sha256")" ]
}
write_beta_after() {
    head -c 8M /dev/urandom >"$M/beta-after.bin"
    sync
    sha256sum "$M/beta-after.bin" | cut -d' ' -f1 >"$C/beta-after.sha256"
    : >"$C/beta.after-written"
}

# --- both: check and shut down -------------------------------------------------
unmount_ocfs2() { umount "$M"; }
fsck_check() {
    # -n: read-only, answer no; -f: full check even if marked clean.
    fsck.ocfs2 -fn "$DEV" 2>&1 | tee "$S/fsck.log"
    [ "${PIPESTATUS[0]}" -eq 0 ]
}
final_status() {
    ctl wait-sync --timeout "$(scaled 120)"
    ctl status --json | tee "$C/$node.status-final.json"
    jq -e '.disk == "up-to-date" and .peer.disk == "up-to-date" and .out_of_sync_bytes == 0' \
        "$C/$node.status-final.json" >/dev/null
}
detach() {
    systemctl stop "nbd-attach@$R.service"
    if nbd-client -c "$DEV"; then echo "$DEV still connected"; return 1; fi
}
stop_daemon() {
    systemctl stop "mirrord@$R.service"
    local result status
    result=$(systemctl show -p Result --value "mirrord@$R.service")
    status=$(systemctl show -p ExecMainStatus --value "mirrord@$R.service")
    echo "mirrord@$R stopped: Result=$result ExecMainStatus=$status"
    [ "$result" = success ] && [ "$status" = 0 ]
    ctl dump-md >"$C/$node.dump-md-final.json"
}

echo "node $node ($ip), peer $other, phase $phase"
if [ "$phase" = first ]; then
    step setup setup
    step ping ping_peer
    step create-md create_md_dump
    step start start_daemon_status
    step b-started barrier started
    step initial-sync initial_sync
    step b-synced barrier synced
    step attach attach_primary
    step o2cb o2cb_start
    step discard discard_range
    step mkfs mkfs_ocfs2
    step b-mkfs barrier mkfs
    step mount mount_ocfs2
    step b-mounted barrier mounted
    step write write_own
    step b-written barrier written
    step read-other read_other
    step b-conc-start barrier conc-start
    step conc-write concurrent_write
    step b-conc-written barrier conc-written
    step conc-check concurrent_check
    step b-conc-checked barrier conc-checked
    step conc-compare concurrent_compare
    step b-delay-base barrier delay-base
    step delay-base delay_base
    step delay-on delay_on
    step b-delay-on barrier delay-on
    step delay-write delay_write
    step b-delay-written barrier delay-written
    step delay-off delay_off
    step b-delay-off barrier delay-off
    step delay-check delay_check
    step b-delay-checked barrier delay-checked
    step delay-read-other delay_read_other
    step b-ev-restart barrier ev-restart
    step ev-restart mirrord_event_phase restart alpha 25
    step b-ev-restart-done barrier ev-restart-done 300
    step ev-restart-read ev_read_other
    step b-ev-kill barrier ev-kill
    step ev-kill mirrord_event_phase kill beta 45
    step b-ev-kill-done barrier ev-kill-done 300
    step ev-kill-read ev_read_other
    if [ "$node" = beta ]; then
        step power-cut wait_for_power_cut
        exit 1
    fi
    step writer-start start_writer
    step write-while-down write_while_down
    step writer-stop stop_writer
    step manifest alpha_manifest
    step read-beta-after read_beta_after
else
    step setup setup
    step ping ping_peer
    step rejoin-start rejoin_start
    step rejoin-sync rejoin_sync
    step attach attach_primary
    step o2cb o2cb_start
    step mount mount_ocfs2
    step compare rejoin_compare
    step write-after write_beta_after
fi
step b-checked barrier checked 300
step umount unmount_ocfs2
step b-unmounted barrier unmounted
if [ "$node" = alpha ]; then step fsck fsck_check; fi
step b-fsck-alpha barrier fsck-alpha 300
if [ "$node" = beta ]; then step fsck fsck_check; fi
step b-fsck-beta barrier fsck-beta 300
step final-status final_status
step kernel-client kernel_client
step b-final barrier final
step detach detach
step b-detached barrier detached
step stop stop_daemon
collect_logs
echo "TWO-HOST PASSED"
