#!/bin/bash
# Runs inside the guest (systemd mode) from the host share /mnt/host.
# mirrord@r0 on the host's disk 1 (/dev/vm/disk1), nbd-attach@r0 -> /dev/nbd0 (nbd-client -C 4),
# fio with crc32c verify, ext4 file round trip, daemon restart, clean stop.
# Every step appends "ok NAME SECONDS" or "FAIL NAME" to /mnt/host/result;
# the first failure ends the script with a non-zero status.
set -euo pipefail
# shellcheck source=vm-images/tests/lib-guest.sh
. /mnt/host/lib-guest.sh
: >"$S/result"

install_config() {
    install -m 0644 "$S/$R.toml" "$CFG"
    if [ -f "$S/standin" ]; then
        # Development stand-in: nbdkit serves the disk in place of mirrord,
        # with the same unit, socket path and export name.
        mkdir -p /etc/systemd/system/mirrord@.service.d
        cat >/etc/systemd/system/mirrord@.service.d/standin.conf <<'UNIT'
[Service]
Type=exec
ExecStartPre=
ExecStartPre=/bin/rm -f /run/nbd-mirror/%i.nbd
ExecStart=
ExecStart=/usr/bin/nbdkit --foreground --unix /run/nbd-mirror/%i.nbd --exportname %i --threads 16 file /dev/vm/disk1
ExecStartPost=/bin/sh -c 'for i in $(seq 100); do [ -S /run/nbd-mirror/%i.nbd ] && exit 0; sleep 0.1; done; exit 1'
UNIT
        # No mirrorctl either: the stock nbd-client attaches, as the drop-in in
        # nbd-attach@.service's comment describes.
        mkdir -p /etc/systemd/system/nbd-attach@.service.d
        cat >/etc/systemd/system/nbd-attach@.service.d/standin.conf <<'UNIT'
[Service]
Type=oneshot
RemainAfterExit=yes
Restart=no
ExecStart=
ExecStart=/usr/sbin/nbd-client -unix /run/nbd-mirror/%i.nbd /dev/nbd0 -N %i -C 4 -b 4096 -t 90
ExecStop=/usr/sbin/nbd-client -d /dev/nbd0
UNIT
        systemctl daemon-reload
    fi
}
installed_package() {
    # The image installs mirrord from the .deb (build-image.sh); the stand-in image
    # has only the units, where the package puts them. Either way no copy in
    # /etc/systemd/system shadows them.
    local u
    for u in mirrord@.service nbd-attach@.service; do
        [ -f "/lib/systemd/system/$u" ] || { echo "/lib/systemd/system/$u missing"; return 1; }
        [ ! -e "/etc/systemd/system/$u" ] || { echo "/etc/systemd/system/$u shadows the packaged unit"; return 1; }
    done
    [ -f "$S/standin" ] && return 0
    local status version
    status=$(dpkg-query -W -f='${Status}' nbd-mirror)
    version=$(dpkg-query -W -f='${Version}' nbd-mirror)
    echo "nbd-mirror package: $status, version $version"
    [ "$status" = "install ok installed" ]
    dpkg -L nbd-mirror | grep -x /usr/sbin/mirrord
    [ "$(/usr/sbin/mirrord --version)" = "mirrord $version" ]
    [ "$(/usr/sbin/mirrorctl --version)" = "mirrorctl $version" ]
}
create_md_unless_standin() {
    [ -f "$S/standin" ] && return 0
    create_md
}
start_daemon_socket() {
    start_daemon
    [ -S "/run/nbd-mirror/$R.nbd" ]
}
initial_primary() {
    # A standalone node's fresh metadata is up to date. Were it inconsistent,
    # this node would be forced to be the data source, as with
    # `drbdadm primary --force`. The role itself follows auto-promote: primary
    # once the NBD client connects (checked in the status step).
    [ -f "$S/standin" ] && return 0
    local st
    mirrorctl --config "$CFG" status --json | tee "$S/status-initial.json"
    st=$(jq -r .disk "$S/status-initial.json")
    if [ "$st" != up-to-date ]; then
        mirrorctl --config "$CFG" primary --force
    fi
    mirrorctl --config "$CFG" status --json | tee "$S/status-primary.json"
    jq -e '.disk == "up-to-date"' "$S/status-primary.json" >/dev/null
}
multi_conn() {
    # Server ends of the kernel's NBD connections, one per -C.
    local n
    n=$(ss -xH state connected src "/run/nbd-mirror/$R.nbd" | wc -l)
    echo "connections to /run/nbd-mirror/$R.nbd: $n"
    [ "$n" -eq 4 ]
}
status_json() {
    [ -f "$S/standin" ] && return 0
    mirrorctl --config "$CFG" status --json | tee "$S/status.json"
    # One client attached with four connections: mirrord may count either.
    # The size mirrord reports is the size the kernel attached (internal
    # metadata makes it smaller than the 1 GiB disk).
    local bytes
    bytes=$(( $(cat /sys/block/nbd0/size) * 512 ))
    jq -e --argjson b "$bytes" '.role == "primary" and .disk == "up-to-date" and .size_bytes == $b
           and (.nbd_clients == 1 or .nbd_clients == 4)' "$S/status.json" >/dev/null
}
fio_verify() {
    local name=$1 rw=$2 bs=$3 size=$4 depth=$5
    fio --name="$name" --filename="$DEV" --rw="$rw" --bs="$bs" --size="$size" \
        --ioengine=libaio --direct=1 --iodepth="$depth" \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=1024 \
        --output-format=normal --output="$S/fio-$name.txt"
    cat "$S/fio-$name.txt"
    ! grep -qi 'verify.*bad\|err= *[1-9]' "$S/fio-$name.txt"
}
fs_write() {
    mkfs.ext4 -q -F "$DEV"
    mkdir -p /mnt/data
    mount "$DEV" /mnt/data
    head -c 48M /dev/urandom >/mnt/data/blob
    sha256sum /mnt/data/blob | cut -d' ' -f1 >"$S/blob.sha256"
    umount /mnt/data
}
fs_check() {
    mount "$DEV" /mnt/data
    local got
    got=$(sha256sum /mnt/data/blob | cut -d' ' -f1)
    echo "blob sha256 $got, expected $(cat "$S/blob.sha256")"
    [ "$got" = "$(cat "$S/blob.sha256")" ]
    umount /mnt/data
}
fs_check_unless_standin() {
    [ -f "$S/standin" ] && return 0
    fs_check
}
stop_all() {
    systemctl stop "nbd-attach@$R.service"
    if nbd-client -c "$DEV"; then echo "$DEV still connected"; return 1; fi
    systemctl stop "mirrord@$R.service"
    local result status
    result=$(systemctl show -p Result --value "mirrord@$R.service")
    status=$(systemctl show -p ExecMainStatus --value "mirrord@$R.service")
    echo "mirrord@$R stopped: Result=$result ExecMainStatus=$status"
    [ "$result" = success ] && [ "$status" = 0 ]
}
crash_restart() {
    # mirrord dies (SIGKILL): systemd restarts mirrord (Restart=on-failure)
    # despite its stale sockets, and nbd-attach@ (mirrorctl attach) keeps or
    # attaches the device again. The stand-in's stock nbd-client does not
    # reconnect: skipped there (and the check after it).
    [ -f "$S/standin" ] && return 0
    systemctl enable "nbd-attach@$R.service"
    local old pid i
    old=$(systemctl show -p MainPID --value "mirrord@$R.service")
    systemctl kill -s SIGKILL "mirrord@$R.service"
    for i in $(seq "$(scaled 120)"); do
        pid=$(systemctl show -p MainPID --value "mirrord@$R.service")
        if [ "$pid" != 0 ] && [ "$pid" != "$old" ] &&
            systemctl is-active --quiet "mirrord@$R.service" &&
            systemctl is-active --quiet "nbd-attach@$R.service"; then
            echo "mirrord restarted: pid $old -> $pid after ~$((i / 2))s; nbd-attach active"
            [ "$(cat /sys/block/nbd0/size)" -gt 0 ]
            return 0
        fi
        sleep 0.5
    done
    systemctl status --no-pager "mirrord@$R.service" "nbd-attach@$R.service" || true
    return 1
}

echo "guest kernel $(uname -r), mode: $([ -f "$S/standin" ] && echo stand-in nbdkit || echo mirrord)"
step package installed_package
step config install_config
step create-md create_md_unless_standin
step start start_daemon_socket
step up-to-date initial_primary
step attach attach
step multi-conn multi_conn
step status status_json
step fio-seq-1M fio_verify seq write 1M 128M 8
step fio-rand-4k fio_verify rand randwrite 4k 32M 16
step fs-write fs_write
step fs-check fs_check
step stop stop_all
step reattach attach
step fs-check-after-restart fs_check
step crash-restart crash_restart
step fs-check-after-crash fs_check_unless_standin
collect_logs
# mirrord@ and nbd-attach@ stay up: the systemd poweroff that follows must
# detach /dev/nbd0 before it stops mirrord (the host checks the console).
echo "SMOKE PASSED"
