# shellcheck shell=bash
# Shell helpers for the guest side of the VM tests. The host copies this
# file into the share next to the test (vm_prepare_share in lib/host.sh);
# a test sources it with
#
#   . /mnt/host/lib-guest.sh
#
# Names the tests share: S (the share, /mnt/host), R (resource, default r0),
# CFG (/etc/nbd-mirror/R.toml), DEV (/dev/nbd0).
#
#   now, since T0, ts      wall clock (s.ns); seconds since T0; HH:MM:SS.mmm
#   die MSG...             "HARNESS FAILURE: MSG", collect_logs, exit 1
#   ctl ARGS...            mirrorctl --config CFG ARGS
#   cmdline_arg NAME       the value of vm.NAME= on the kernel command line
#   vm_disk N, vm_nic N    the host's Nth --disk (/dev/vm/diskN) and Nth
#                          --tap NIC (vecN under UML, ethN under QEMU)
#   scaled SECONDS         SECONDS times the backend's slowness (vm.slow)
#   wait_until SECONDS CMD...  until CMD succeeds (every 0.5 s)
#   step NAME CMD...       runs CMD with errexit; "ok NAME SECS" or
#                          "FAIL NAME" in S/result; a failure collects the
#                          logs, runs on_step_fail (if the test defines it)
#                          and exits 1
#   collect_logs           journal of the units, kernel log, status JSON into S
#   create_md              mirrorctl create-md
#   start_daemon           systemctl start mirrord@R (returns at READY=1); active
#   attach                 systemctl start nbd-attach@R; both active; DEV has a size
#
# mirrord and the attach agent under restarts and crashes (vm-restart,
# vm-two-host); CONNS is the agent's --connections (4, as shipped):
#   mirrord_pid, agent_pid the units' main PIDs (0: not running)
#   agent_rounds           reconnects the agent logged ("reconfigured with
#                          fresh connections") since the boot
#   nbd_sockets, nbd_clients   kernel sockets on mirrord's NBD socket;
#                          mirrord's nbd_clients
#   all_connected          both are CONNS
#   mirrord_event KIND     restart: systemctl restart mirrord@R; kill: kill -9
#                          of mirrord, returns when systemd has started a new
#                          one and it answers (fails otherwise)
#   kernel_errors [ERE]    kernel log lines (from stdin) naming an I/O error
#                          or matching ERE
#   link_drops             peer-link drops since mirrord@R started (journal)
# Tests with two guests set C (the folder both mount), node and other:
#   node_setup ADDR/PREFIX host name, NIC 0's address, config and secret from C
#   wait_for FILE SECONDS  until C/FILE exists (SECONDS scaled); gives up
#                          early when C/OTHER.failed appears
#   barrier NAME [SECONDS] both guests reach NAME
#   figure TEXT...         "NODE: TEXT" to C/NODE.figures (the host prints it)
# shellcheck disable=SC2034 # used by the tests that source this file
{
    S=/mnt/host
    R=${R:-r0}
    CFG=/etc/nbd-mirror/$R.toml
    DEV=/dev/nbd0
    CONNS=4
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
ts() { date +%H:%M:%S.%3N; }
die() {
    echo "$(ts) HARNESS FAILURE: $*"
    collect_logs
    exit 1
}
ctl() { mirrorctl --config "$CFG" "$@"; }

cmdline_arg() {
    local arg
    for arg in $(cat /proc/cmdline); do
        case $arg in "vm.$1="*) echo "${arg#*=}"; return 0 ;; esac
    done
    return 1
}
vm_disk() { echo "/dev/vm/disk$1"; }
vm_nic() {
    local n
    for n in "vec$1" "eth$1"; do
        [ -e "/sys/class/net/$n" ] && { echo "$n"; return 0; }
    done
    echo "vm_nic: no network card $1" >&2
    return 1
}
scaled() { echo $(($1 * $(cmdline_arg slow || echo 1))); }
wait_until() {
    local secs=$1
    shift
    for _ in $(seq $((secs * 2))); do "$@" && return 0; sleep 0.5; done
    return 1
}

step() {
    local name=$1 t0 rc
    shift
    echo "=== $(ts) step $name: $*"
    t0=$(now)
    # errexit inside the step: its first failing command fails the step.
    set +e
    (set -e; "$@")
    rc=$?
    set -e
    if [ $rc -ne 0 ]; then
        echo "FAIL $name (exit $rc)" | tee -a "$S/result"
        collect_logs
        if declare -F on_step_fail >/dev/null; then on_step_fail; fi
        exit 1
    fi
    echo "ok $name $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')" | tee -a "$S/result"
}

# Extra units to include in journal.log: COLLECT_UNITS (e.g. "nbd-persist").
collect_logs() {
    local u units=(-u "mirrord@$R" -u "nbd-attach@$R")
    for u in ${COLLECT_UNITS:-}; do units+=(-u "$u"); done
    journalctl --no-pager -o short-monotonic "${units[@]}" >"$S/journal.log" 2>&1 || true
    journalctl --no-pager -o short-monotonic -k >"$S/kernel.log" 2>&1 || dmesg >"$S/kernel.log" 2>&1 || true
    dmesg >"$S/dmesg.log" 2>&1 || true
    ctl status --json >"$S/status-at-exit.json" 2>&1 || true
}

create_md() { ctl create-md; }
start_daemon() {
    systemctl start "mirrord@$R.service"
    systemctl is-active --quiet "mirrord@$R.service"
}
attach() {
    systemctl start "nbd-attach@$R.service"
    systemctl is-active --quiet "mirrord@$R.service"
    systemctl is-active --quiet "nbd-attach@$R.service"
    local size
    size=$(cat /sys/block/nbd0/size)
    echo "nbd0: $((size * 512)) bytes"
    [ "$size" -gt 0 ]
}

mirrord_pid() { systemctl show -p MainPID --value "mirrord@$R.service"; }
agent_pid() { systemctl show -p MainPID --value "nbd-attach@$R.service"; }
agent_rounds() { journalctl -u "nbd-attach@$R" -o cat --no-pager 2>/dev/null | grep -c 'reconfigured with fresh connections' || true; }
nbd_sockets() { ss -xH state connected src "/run/nbd-mirror/$R.nbd" 2>/dev/null | wc -l; }
nbd_clients() { ctl status --json 2>/dev/null | jq -r '.nbd_clients // 0' 2>/dev/null || echo 0; }
all_connected() { [ "$(nbd_sockets)" -eq "$CONNS" ] && [ "$(nbd_clients)" = "$CONNS" ]; }
mirrord_answers() { [ "$(mirrord_pid)" != 0 ] && ctl status --json >/dev/null 2>&1; }
mirrord_moved() { [ "$(mirrord_pid)" != "$1" ] && [ "$(mirrord_pid)" != 0 ]; }
mirrord_event() {
    local pid
    pid=$(mirrord_pid)
    case $1 in
        restart) systemctl restart "mirrord@$R.service" || { echo "systemctl restart exit $?"; return 1; } ;;
        kill)
            kill -9 "$pid"
            wait_until "$(scaled 30)" mirrord_moved "$pid" || { echo "mirrord not restarted after kill -9"; return 1; }
            wait_until "$(scaled 30)" mirrord_answers || { echo "mirrord not answering after the kill"; return 1; }
            ;;
        *) echo "mirrord_event: unknown kind $1"; return 1 ;;
    esac
}
kernel_errors() { grep -E "I/O error${1:+|$1}"; }
# Times the peer link dropped since mirrord started (each drop of a connected
# session is one peer-disconnected event, a pause within the grace included).
link_drops() {
    journalctl --no-pager -o cat -u "mirrord@$R" | grep -c '"event":"peer-disconnected"' || true
}

# --- two guests ---------------------------------------------------------------
# shellcheck disable=SC2154 # C, node and other: set by the two-guest tests
{
# node_setup ADDR/PREFIX: host name NODE, the address on NIC 0, the config,
# secret and MIRROR_NODE from C.
node_setup() {
    local nic
    nic=$(vm_nic 0)
    hostname "$node"
    echo "$node" >/etc/hostname
    ip link set "$nic" up
    ip addr add "$1" dev "$nic"
    # Twice, about 650 MB into the 4 GiB initial sync (about when the
    # target's page cache would have filled the guest's 768 MB), the target's
    # UML network card died for good (README, "A UML guest's network can
    # die"): keep a free reserve for the kernel's atomic allocations and
    # little dirty data. Two runs since did not see it.
    sysctl -qw vm.min_free_kbytes=49152 vm.dirty_background_bytes=16777216 vm.dirty_bytes=67108864
    install -m 0644 "$C/$R.toml" "$CFG"
    install -m 0600 "$C/$R.secret" "/etc/nbd-mirror/$R.secret"
    printf 'MIRROR_NODE=%s\nRUST_LOG=info\n' "$node" >"/etc/nbd-mirror/$R.env"
}
wait_for() {
    local f=$1 secs
    secs=$(scaled "${2:-180}")
    for _ in $(seq $((secs * 2))); do
        [ -e "$C/$f" ] && return 0
        [ -e "$C/$other.failed" ] && { echo "$other failed"; return 1; }
        sleep 0.5
    done
    echo "$(ts) waited ${secs}s for $f"
    return 1
}
# The first guest to reach NAME waits for the other.
barrier() { : >"$C/$node.$1"; wait_for "$other.$1" "${2:-180}"; }
figure() { echo "$node: $*" | tee -a "$C/$node.figures"; }
}
