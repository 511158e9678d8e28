#!/bin/bash
# Guest side of `make vm-restart` (restart.sh), systemd mode, one guest,
# standalone mirrord@r0 on the host's disk 1 (/dev/vm/disk1), the units as
# shipped: nbd-attach@r0 runs `mirrorctl attach r0 /dev/nbd0` (netlink, 4
# connections, request timeout 15 s). ext4 on /dev/nbd0 with a 16 MiB file
# written and synced first (known data). Then, for each case, fio writes
# 64 KiB blocks with O_DIRECT, an fsync every 8 and crc32c verify (backlog of
# 32 blocks, verify_fatal) while the event happens:
#
#   restart   systemctl restart mirrord@r0 (hand-over through the fd store)
#   upgrade   /usr/sbin/mirrord replaced by the host's second build
#             (share/mirrord-upgrade), then systemctl restart mirrord@r0
#   kill      kill -9 of mirrord (systemd restarts it; the agent reconnects)
#   agentkill kill -9 of the attach agent: systemd restarts it, the new one
#             adopts the device (same backend identifier) and changes nothing
#   stall     SIGSTOP of mirrord for 25 s, longer than the request timeout
#             (the kernel drops the sockets and sends the requests again on
#             new ones while mirrord still holds the first copies)
#
# Each case asserts: fio exits 0 without error; the kernel log has no I/O
# error, no journal abort, no ext4 error, no read-only remount; 4 connections back (kernel sockets on mirrord's socket and
# mirrord's nbd_clients); the agent kept its PID (a restart of mirrord did
# not stop it); mirrord's PID changed (except stall); after a kill the agent
# logged a reconnect; the known file reads back after dropping the caches;
# `e2fsck -fn` is clean after unmounting. Facts go to /mnt/host/facts, one
# "CASE key=value..." line each; a failed check is a "CASE FAIL: ..." line,
# and the script then exits 1.
#
# vm.cases=restart1,kill1,... (kernel command line) picks cases; the kind is
# the name without its trailing digits.
set -uo pipefail
# shellcheck source=vm-images/tests/lib-guest.sh
. /mnt/host/lib-guest.sh
M=/mnt/data
: >"$S/facts"
fails=0
case_name=setup

fact() { echo "$case_name $*" | tee -a "$S/facts"; }
bad() {
    fact "FAIL: $*"
    fails=$((fails + 1))
}
# The mirrord/agent helpers (mirrord_pid, agent_pid, agent_rounds, nbd_sockets,
# nbd_clients, all_connected, mirrord_event, kernel_errors) are in lib-guest.sh,
# shared with the two-host test's restart and kill -9.
attached() { [ -e /sys/block/nbd0/pid ] && [ "$(cat /sys/block/nbd0/size)" -gt 0 ]; }
agent_moved() { [ "$(agent_pid)" != "$old_agent" ] && [ "$(agent_pid)" != 0 ] && systemctl is-active --quiet "nbd-attach@$R.service"; }

setup() {
    mkdir -p /etc/nbd-mirror
    install -m 0644 "$S/$R.toml" "$CFG"
    create_md >/dev/null || die "create-md"
    systemctl enable "nbd-attach@$R.service" 2>/dev/null || die "enable nbd-attach@$R"
    systemctl start "mirrord@$R.service" "nbd-attach@$R.service" || die "start the units"
    wait_until "$(scaled 30)" attached || die "/dev/nbd0 not attached"
    wait_until "$(scaled 30)" all_connected || die "not $CONNS connections: $(nbd_sockets) sockets, $(nbd_clients) clients"
    fact "attached: $(journalctl -u "nbd-attach@$R" -o cat --no-pager | grep -m1 attached) backend=$(cat /sys/block/nbd0/backend)"
    mkfs.ext4 -q -F -E nodiscard "$DEV" || die "mkfs"
    mkdir -p "$M"
    mount "$DEV" "$M" || die "mount"
    head -c 16M /dev/urandom >"$M/known.bin"
    sync
    sha256sum "$M/known.bin" | cut -d' ' -f1 >/run/known.sha256
    # fio's file, laid out once here: a layout at the start of a case would put
    # the event in fio's layout phase, which its latency figures leave out.
    head -c 64M /dev/zero >"$M/load.bin"
    sync
}

# Beside fio, a ticker: 4 KiB O_DIRECT+O_DSYNC writes one after another, each
# completion's time on a line; the longest gap is the pause a writer saw,
# independent of how fio accounts its requests.
start_ticker() {
    (
        for _ in $(seq 100000); do
            dd if=/dev/zero of="$M/tick" bs=4k count=1 oflag=direct,dsync conv=notrunc status=none 2>>"$S/ticker-$case_name.err" || echo "ERROR" >>"$S/ticker-$case_name.txt"
            date +%s.%N >>"$S/ticker-$case_name.txt"
            sleep 0.05
        done
    ) &
    ticker_pid=$!
}
ticker_gap() {
    awk '/ERROR/ { e++ } /^[0-9]/ { if (p) { g = $1 - p; if (g > m) m = g }; p = $1 } END { printf "max_gap_ms=%d ticks=%d ticker_errors=%d", m * 1000, NR, e }' "$S/ticker-$case_name.txt"
}

# fio in the background for $1 seconds; its JSON goes to the share.
start_fio() {
    timeout $(($1 + 120)) fio --name=w --filename="$M/load.bin" --rw=write --bs=64k --size=64M \
        --time_based --runtime="$1" --ioengine=psync --direct=1 --fsync=8 \
        --verify=crc32c --verify_backlog=32 --verify_fatal=1 \
        --output-format=json --output="$S/fio-$case_name.json" >/dev/null 2>"$S/fio-$case_name.err" &
    fio_pid=$!
}

check_case() {
    local kind=$1 m0=$2 a0=$3 r0=$4 rc=$5 k ms
    # fio: exit status, its own error count, the longest write and fsync.
    local ferr wmax smax rmax j=$S/fio-$case_name.json
    ferr=$(jq -r '.jobs[0].error' "$j" 2>/dev/null || echo "?")
    wmax=$(jq -r '(.jobs[0].write.lat_ns.max // 0) / 1e6 | floor' "$j" 2>/dev/null || echo "?")
    smax=$(jq -r '(.jobs[0].sync.lat_ns.max // 0) / 1e6 | floor' "$j" 2>/dev/null || echo "?")
    # The verify backlog's reads: the request in flight at the event may be one of them.
    rmax=$(jq -r '(.jobs[0].read.lat_ns.max // 0) / 1e6 | floor' "$j" 2>/dev/null || echo "?")
    fact "fio: exit=$rc error=$ferr writes=$(jq -r '.jobs[0].write.total_ios' "$j" 2>/dev/null) verify_reads=$(jq -r '.jobs[0].read.total_ios' "$j" 2>/dev/null) max_write_ms=$wmax max_fsync_ms=$smax max_read_ms=$rmax"
    [ "$rc" -eq 0 ] && [ "$ferr" = 0 ] || bad "fio exit $rc error $ferr: $(head -c 300 "$S/fio-$case_name.err" | tr '\n' '|')"
    # Kernel log.
    k=$(dmesg)
    echo "$k" >"$S/dmesg-$case_name.log"
    local io jab ext ro dead tmo rcv
    io=$(grep -c 'I/O error' <<<"$k")
    jab=$(grep -c 'Aborting journal' <<<"$k")
    ext=$(grep -c 'EXT4-fs error' <<<"$k")
    ro=$(grep -c 'read-only' <<<"$k")
    dead=$(grep -c 'Dead connection' <<<"$k")
    tmo=$(grep -c 'Connection timed out' <<<"$k")
    rcv=$(grep -c 'Receive control failed' <<<"$k")
    # "Dead connection, failed to find a fallback" is logged whenever a request finds no
    # live socket; it then waits for the dead-connection timeout: a fact, not an error.
    fact "kernel: io_errors=$io journal_aborts=$jab ext4_errors=$ext read_only=$ro no_live_socket=$dead timed_out_retrying=$tmo receive_failed=$rcv"
    [ $((io + jab + ext + ro)) -eq 0 ] || bad "kernel log: $(kernel_errors 'Aborting journal|EXT4-fs error|read-only' <<<"$k" | head -n 3 | tr '\n' '|')"
    # Connections.
    ms=$(now)
    wait_until "$(scaled 30)" all_connected
    fact "connections: kernel_sockets=$(nbd_sockets) mirrord_nbd_clients=$(nbd_clients) waited=$(since "$ms")s agent_rounds=$r0->$(agent_rounds) mirrord_pid=$m0->$(mirrord_pid) agent_pid=$a0->$(agent_pid)"
    all_connected || bad "not all $CONNS connections back: $(nbd_sockets) sockets, $(nbd_clients) clients"
    if [ "$kind" = agentkill ]; then
        [ "$(agent_pid)" != "$a0" ] || bad "the agent kept PID $a0 after kill -9"
        journalctl -u "nbd-attach@$R" -o cat --no-pager | grep -q 'adopting it' || bad "the new agent did not adopt the device"
    else
        [ "$(agent_pid)" = "$a0" ] || bad "the agent was restarted ($a0 -> $(agent_pid)): the mirrord restart reached nbd-attach@"
    fi
    if [ "$kind" = stall ] || [ "$kind" = agentkill ]; then
        [ "$(mirrord_pid)" = "$m0" ] || bad "mirrord changed PID during a stall"
    else
        [ "$(mirrord_pid)" != "$m0" ] || bad "mirrord kept PID $m0"
    fi
    if [ "$kind" = kill ] || [ "$kind" = stall ]; then
        [ "$(agent_rounds)" -gt "$r0" ] || bad "the agent logged no reconnect"
    fi
    if [ "$kind" = upgrade ]; then
        local want got
        want=$(sha256sum "$S/mirrord-upgrade" | cut -d' ' -f1)
        got=$(sha256sum "/proc/$(mirrord_pid)/exe" | cut -d' ' -f1)
        fact "upgrade: running binary sha256 ${got:0:16} (upgrade ${want:0:16})"
        [ "$got" = "$want" ] || bad "the running mirrord is not the upgrade"
    fi
    # Known data, from the device (caches dropped).
    sync
    echo 3 >/proc/sys/vm/drop_caches
    [ "$(sha256sum "$M/known.bin" | cut -d' ' -f1)" = "$(cat /run/known.sha256)" ] || bad "known data changed"
    # The file system itself.
    umount "$M" || bad "umount"
    e2fsck -fn "$DEV" >"$S/fsck-$case_name.txt" 2>&1
    local frc=$?
    fact "e2fsck -fn: exit $frc"
    [ $frc -eq 0 ] || bad "e2fsck -fn exit $frc: $(tail -n 3 "$S/fsck-$case_name.txt" | tr '\n' '|')"
    mount "$DEV" "$M" || die "$case_name: cannot mount again"
}

run_case() {
    case_name=$1
    local kind=${1%%[0-9]*} m0 a0 r0 t0 rc out
    echo "=== $(ts) case $case_name ($kind)"
    dmesg -C
    m0=$(mirrord_pid)
    a0=$(agent_pid)
    r0=$(agent_rounds)
    rm -f "$S/ticker-$case_name.txt"
    start_fio 30
    start_ticker
    sleep 5
    t0=$(now)
    case $kind in
        restart | kill) out=$(mirrord_event "$kind") || bad "$out" ;;
        upgrade)
            install -m 0755 "$S/mirrord-upgrade" /usr/sbin/mirrord.new && mv /usr/sbin/mirrord.new /usr/sbin/mirrord
            out=$(mirrord_event restart) || bad "$out"
            ;;
        agentkill)
            # The agent itself crashes: systemd restarts it and it adopts the device.
            kill -9 "$a0"
            old_agent=$a0
            wait_until "$(scaled 30)" agent_moved || bad "the agent was not restarted"
            ;;
        stall)
            kill -STOP "$m0"
            sleep 25
            kill -CONT "$m0"
            ;;
        *) die "unknown case kind $kind" ;;
    esac
    fact "event: $kind done in $(since "$t0")s"
    wait "$fio_pid"
    rc=$?
    kill "$ticker_pid" 2>/dev/null
    wait "$ticker_pid" 2>/dev/null
    fact "ticker: $(ticker_gap)"
    ! grep -q ERROR "$S/ticker-$case_name.txt" || bad "a ticker write failed: $(head -c 200 "$S/ticker-$case_name.err")"
    check_case "$kind" "$m0" "$a0" "$r0" "$rc"
}

cases=$(cmdline_arg cases || echo restart1,restart2,restart3,upgrade1,kill1,kill2,kill3,stall1,agentkill1)
echo "guest kernel $(uname -r); cases $cases"
setup
for c in ${cases//,/ }; do
    run_case "$c"
done
case_name=end
umount "$M" 2>/dev/null
collect_logs
journalctl -u "nbd-attach@$R" -o short-monotonic --no-pager >"$S/agent.log" 2>&1
fact "failures=$fails"
echo "RESTART CASES DONE failures=$fails"
[ "$fails" -eq 0 ]
