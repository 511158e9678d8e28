#!/bin/bash
# Guest side of `make vm-restart` (restart.sh), systemd mode, one guest,
# standalone mirrord@r0 on the host's disk 1 (/dev/vm/disk1). What does a file system on /dev/nbd0
# see when mirrord restarts or stalls under load, with Debian 12's
# nbd-client 3.24 and kernel 6.1? Each scenario: fresh ext4 on /dev/nbd0, a
# 16 MiB file written and synced (acknowledged data), fio writing 64 KiB
# blocks with an fsync every 8 (psync) to a second file, then the event;
# then the observations go to /mnt/host/facts (one "SCENARIO key=value" line
# each) and the kernel log of the scenario to /mnt/host/dmesg-SCENARIO.log.
#
#   unit-restart    the units as shipped (nbd-attach@: netlink, -C 4, -t 90);
#                   `systemctl restart mirrord@r0`
#   ioctl-persist   nbd-client -L -p -t 30 (ioctl mode, persist) as its own
#                   transient unit, not bound to mirrord@; `systemctl restart
#                   mirrord@r0`
#   stall-C4        nbd-attach@ without -t (NBD_OPTS="-b 4096"); mirrord
#                   SIGSTOPped for 45 s (a daemon
#                   that holds requests longer than 30 s, e.g. waiting on its
#                   peer or a slow disk), then SIGCONT; besides fio, a loop of
#                   4 KiB O_DIRECT reads of /dev/nbd0
#   stall-C4-t90    the same with the units as shipped (-t 90)
#
# After each event: is /dev/nbd0 still connected, did fio get errors, what
# did the kernel log (I/O errors, journal abort, read-only remount), does the
# acknowledged file read back after the daemon is up again (reattached and
# the file system repaired if needed). The script fails only when the
# harness itself breaks (a step it needs does not work) or acknowledged data
# is lost; the facts are what it reports.
set -uo pipefail
# shellcheck source=vm-images/tests/lib-guest.sh
. /mnt/host/lib-guest.sh
COLLECT_UNITS=nbd-persist
M=/mnt/data
: >"$S/facts"

fact() { echo "$scen $*" | tee -a "$S/facts"; }
conns() { ss -xH state connected src "/run/nbd-mirror/$R.nbd" 2>/dev/null | wc -l; }
connected() { [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" -gt 0 ] && nbd-client -c "$DEV" >/dev/null 2>&1; }
detach_all() {
    mountpoint -q "$M" && { umount "$M" || umount -l "$M"; }
    systemctl stop nbd-persist.service 2>/dev/null || true
    systemctl reset-failed nbd-persist.service 2>/dev/null || true
    systemctl stop "nbd-attach@$R.service" 2>/dev/null || true
    nbd-client -d "$DEV" >/dev/null 2>&1 || true
    wait_until "$(scaled 20)" sh -c '! nbd-client -c /dev/nbd0 >/dev/null 2>&1' || true
}
attach_units() {
    systemctl start "mirrord@$R.service" "nbd-attach@$R.service" || return 1
    wait_until "$(scaled 30)" connected
}
attach_persist() {
    systemctl start "mirrord@$R.service" || return 1
    modprobe nbd
    udevadm settle --timeout=30 || true
    # -n: stays in the foreground, so the unit (and its journal) is the client.
    systemd-run --unit=nbd-persist --collect -p Type=exec \
        /usr/sbin/nbd-client -unix "/run/nbd-mirror/$R.nbd" "$DEV" -N "$R" -b 4096 -L -p -t 30 -n || return 1
    wait_until "$(scaled 30)" connected
}
prepare_fs() {
    mkfs.ext4 -q -F -E nodiscard "$DEV" || return 1
    mkdir -p "$M"
    mount "$DEV" "$M" || return 1
    head -c 16M /dev/urandom >"$M/acked.bin"
    sync
    sha256sum "$M/acked.bin" | cut -d' ' -f1 >/run/acked.sha256
}
start_load() {
    rm -f "$S/fio-$scen.txt"
    timeout 150 fio --name=load --directory="$M" --rw=write --bs=64k --size=256M --time_based \
        --runtime="$1" --ioengine=psync --fsync=8 --output="$S/fio-$scen.txt" >/dev/null 2>&1 &
    fio_pid=$!
    sleep 4
}
# Observations after the event.
observe() {
    local wait_s=$1 t0 rc fio_err k
    t0=$(now)
    # Until fio ends or wait_s passes.
    for _ in $(seq $((wait_s * 2))); do kill -0 "$fio_pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$fio_pid" 2>/dev/null && { kill "$fio_pid"; sleep 1; }
    wait "$fio_pid"
    rc=$?
    fio_err=$(grep -o 'err= *[0-9]*' "$S/fio-$scen.txt" 2>/dev/null | head -n 1 | tr -d ' ')
    fact "fio_exit=$rc fio_${fio_err:-err=?} fio_first_error=\"$(grep -m1 -o 'io_u error.*' "$S/fio-$scen.txt" 2>/dev/null | cut -c1-90)\""
    fact "kernel_connections=$(conns) nbd0_sectors=$(cat /sys/block/nbd0/size 2>/dev/null) nbd_client_pids=\"$(pgrep -d, -x nbd-client || true)\""
    k=$(dmesg)
    echo "$k" >"$S/dmesg-$scen.log"
    fact "dmesg_io_errors=$(grep -c 'I/O error, dev nbd0' <<<"$k") dmesg_conn_timed_out=$(grep -c 'Connection timed out' <<<"$k") dmesg_dead_conn=$(grep -c 'Dead connection' <<<"$k") dmesg_receive_failed=$(grep -c 'Receive control failed' <<<"$k") journal_aborted=$(grep -c 'Aborting journal' <<<"$k") remount_ro=$(grep -c 'Remounting filesystem read-only' <<<"$k")"
    fact "fs_writable_after=$(touch "$M/after" 2>/dev/null && sync -f "$M/after" 2>/dev/null && echo yes || echo no) mount_opts=$(awk -v m="$M" '$2 == m { print $4 }' /proc/mounts | cut -d, -f1) observed_for=$(since "$t0")s"
}
# The daemon is up again: reattach if needed, repair, the acknowledged file.
recheck() {
    local fsck_rc got how=units
    mountpoint -q "$M" && { umount "$M" || umount -l "$M"; }
    if ! connected || [ "$(conns)" -eq 0 ]; then
        detach_all
        if [ "$1" = persist ]; then attach_persist; else attach_units; fi || die "$scen: cannot attach again"
        how=reattached
    fi
    e2fsck -fn "$DEV" >"$S/fsck-n-$scen.txt" 2>&1
    fsck_rc=$?
    e2fsck -fy "$DEV" >"$S/fsck-y-$scen.txt" 2>&1
    mount "$DEV" "$M" || die "$scen: cannot mount after repair"
    got=$(sha256sum "$M/acked.bin" | cut -d' ' -f1)
    fact "after: device=$how fsck_n_exit=$fsck_rc acked_file=$([ "$got" = "$(cat /run/acked.sha256)" ] && echo intact || echo CHANGED)"
    [ "$got" = "$(cat /run/acked.sha256)" ] || { collect_logs; echo "$(ts) acknowledged data lost in $scen"; exit 1; }
    umount "$M"
}

scenario() {
    scen=$1
    echo "=== $(ts) scenario $scen"
    detach_all
    rm -f /etc/nbd-mirror/$R.attach
    dmesg -C
    case $scen in
        unit-restart | stall-C4-t90) attach_units || die "$scen: attach" ;;
        stall-C4)
            echo 'NBD_OPTS="-b 4096"' >/etc/nbd-mirror/$R.attach
            attach_units || die "$scen: attach" ;;
        ioctl-persist) attach_persist || die "$scen: attach" ;;
    esac
    fact "before: kernel_connections=$(conns) attach=\"$(ps -o args= -C nbd-client | head -n 1)\""
    prepare_fs || die "$scen: mkfs/mount"
    local old t0
    old=$(systemctl show -p MainPID --value "mirrord@$R.service")
    case $scen in
        unit-restart | ioctl-persist)
            start_load 25
            t0=$(now)
            systemctl restart "mirrord@$R.service"
            fact "restart: systemctl_exit=$? took=$(since "$t0")s mirrord_pid=$old->$(systemctl show -p MainPID --value "mirrord@$R.service") nbd_attach=$(systemctl is-active "nbd-attach@$R.service")"
            observe 40
            ;;
        stall-C4 | stall-C4-t90)
            start_load 60
            # Small O_DIRECT reads of the raw device beside fio: a read
            # request is sent whole at once, so it sits in flight waiting
            # for its reply (a write whose send blocks on a full socket
            # buffer holds the request's lock, and the kernel only re-arms
            # its timer for it).
            (while :; do dd if="$DEV" of=/dev/null bs=4k count=1 skip=$((RANDOM % 4096)) iflag=direct status=none 2>>"$S/reads-$scen.err" || echo "$(ts) read failed" >>"$S/reads-$scen.err"; sleep 0.2; done) &
            local rpid=$!
            sleep 1
            systemctl kill -s SIGSTOP "mirrord@$R.service"
            sleep 45
            systemctl kill -s SIGCONT "mirrord@$R.service"
            sleep 5
            kill "$rpid"
            wait "$rpid" 2>/dev/null
            fact "stall: SIGSTOP 45s then SIGCONT; mirrord_pid=$old->$(systemctl show -p MainPID --value "mirrord@$R.service") raw_read_failures=$(grep -c 'read failed' "$S/reads-$scen.err" 2>/dev/null)"
            observe 30
            ;;
    esac
    if [ "$scen" = ioctl-persist ]; then
        fact "persist_client: $(systemctl show -p ActiveState -p Result -p ExecMainStatus nbd-persist.service 2>/dev/null | tr '\n' ' ') log=\"$(journalctl -u nbd-persist --no-pager -o cat 2>/dev/null | tail -n 4 | tr '\n' '|')\""
        recheck persist
    else
        recheck units
    fi
}

mkdir -p /etc/nbd-mirror
install -m 0644 "$S/$R.toml" "$CFG"
create_md >/dev/null || die "create-md"
systemctl start "mirrord@$R.service" || die "start mirrord@$R"
echo "guest kernel $(uname -r), $(nbd-client -h 2>&1 | head -n 1)"
scenarios="unit-restart ioctl-persist stall-C4 stall-C4-t90"
for arg in $(cat /proc/cmdline); do
    case $arg in vm.scenarios=*) scenarios=$(tr , ' ' <<<"${arg#*=}") ;; esac
done
for s in $scenarios; do
    scenario "$s"
done
detach_all
collect_logs
echo "RESTART FACTS COLLECTED"
