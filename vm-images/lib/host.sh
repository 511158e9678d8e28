# shellcheck shell=bash
# Shell helpers for the host side: the VM test scripts in vm-images/ and the
# scripts in tools/. Source it (bash, set -euo pipefail in the caller):
#
#   . "$repo/vm-images/lib/host.sh"
#
# Messages name the script: set ME before sourcing (default: the script's
# file name without .sh).
#
#   now, since T0        wall clock (s.ns); seconds since T0, one decimal
#   die MSG...           "ME: error: MSG" on stderr, exit ${DIE_STATUS:-1}
#   free_port            a free TCP port on 127.0.0.1
#   toml_table NAME K=V...   a TOML table: [NAME] and one line per K=V
#   toml_node NAME ADDRESS DISK META-DISK [K=V...]   one [[node]] table
#                        (values: true, false and integers bare, the rest quoted)
#   vm_select_backend IMAGE   sets and exports VM_BACKEND (uml|qemu) and
#                        VM_BACKEND_REASON; VM_BACKEND=uml|qemu forces one
#   vm_scale SECONDS     SECONDS times the backend's slowness factor
#   vm_prepare_share DIR TEST    DIR/test.sh (from vm-images/tests/TEST) and
#                        DIR/lib-guest.sh
#   vm_guest_group PGID NAME     true while process group PGID holds guest NAME
#   vm_guest_pids NAME   host processes of guest NAME (pids; none once it is gone)
#   vm_kill_guest PGID   SIGKILL one guest's process group (never the caller's)
#   vm_cleanup_guests DIR NS     for each KEY of the caller's associative
#                        array pids (run-guest.sh pids): kill the guest group
#                        in DIR/KEY.pid and its run-guest.sh; delete NS
#   vm_two_guests NAME   sets work (a new folder .cache/vm/NAME.XXXXXX), common
#                        (work/common, with a fresh r0.secret), ns (a namespace
#                        with br0, tap-alpha and tap-beta); an EXIT trap runs
#                        vm_cleanup_guests (the caller declares pids: declare -A)
#   vm_netns_bridge NS TAP...    network namespace NS with a bridge br0 and
#                        the taps on it (the caller deletes NS)
ME=${ME:-$(basename "$0" .sh)}
VM_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
die() {
    echo "$ME: error: $*" >&2
    exit "${DIE_STATUS:-1}"
}
free_port() {
    /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- resource TOML -----------------------------------------------------------
toml_value() {
    case $1 in
        true | false) echo "$1" ;;
        *[!0-9]* | '') echo "\"$1\"" ;;
        *) echo "$1" ;;
    esac
}
toml_pairs() {
    local kv
    for kv in "$@"; do echo "${kv%%=*} = $(toml_value "${kv#*=}")"; done
}
toml_table() {
    local name=$1
    shift
    echo "[$name]"
    toml_pairs "$@"
    echo
}
toml_node() {
    local name=$1 address=$2 disk=$3 meta=$4
    shift 4
    echo "[[node]]"
    toml_pairs "name=$name" "address=$address" "disk=$disk" "meta-disk=$meta" "$@"
    echo
}

# --- VM backends ---------------------------------------------------------------
# UML is the fast path where it boots; QEMU with TCG (Debian's kernel, an
# emulated CPU) boots everywhere, about 5-10x slower. Whether UML boots is
# probed once per host kernel, CPU flags and UML version (a script-mode boot
# of IMAGE, a few seconds) and cached; a timed-out probe is not cached.
VM_CACHE=${VM_CACHE:-$(cd "$VM_LIB_DIR/../.." && pwd)/.cache/vm}

vm_uml_probe_key() {
    { uname -r; grep -m1 '^flags' /proc/cpuinfo; dpkg-query -W -f='${Version}\n' user-mode-linux 2>/dev/null;
      command -v linux.uml; } | sha256sum | cut -c1-16
}

# vm_uml_probe IMAGE: prints "ok SECONDS" or "fail WHAT-IT-SAID"; cached.
vm_uml_probe() {
    local image=$1 key file dir rc t0 said
    mkdir -p "$VM_CACHE"
    key=$(vm_uml_probe_key)
    file=$VM_CACHE/uml-probe-$key
    (
        flock -w 180 9 || { echo "fail could not lock $file.lock"; exit 0; }
        if [ -s "$file" ]; then sed 's/$/ (cached)/' "$file"; exit 0; fi
        if ! command -v linux.uml >/dev/null; then echo "fail linux.uml not installed"; exit 0; fi
        dir=$(mktemp -d "$VM_CACHE/uml-probe.XXXXXX")
        echo 'echo probe ok' >"$dir/probe.sh"
        t0=$(now)
        rc=0
        VM_BACKEND=uml VM_BACKEND_REASON=probe "$VM_LIB_DIR/../run-guest.sh" --image "$image" \
            --share "$dir" --test probe.sh --mode script --mem 256M --timeout 60 \
            --name "vm-uml-probe-$$" >"$dir/run.log" 2>&1 || rc=$?
        if [ "$rc" -eq 0 ] && grep -q 'probe ok' "$dir/guest.log" 2>/dev/null; then
            echo "ok $(since "$t0")s" | tee "$file"
        else
            # What the kernel said last: a panic or error line, else the tail.
            said=$(tr -d '\r' <"$dir/console.log" 2>/dev/null | grep -i 'panic\|fail\|error\|errno' | tail -n 3 | paste -sd'|' -) || true
            [ -n "$said" ] || said=$(tr -d '\r' <"$dir/console.log" 2>/dev/null | tail -n 3 | paste -sd'|' -) || true
            [ -n "$said" ] || said=$(tail -n 2 "$dir/run.log" | paste -sd'|' -) || true
            said="run-guest exit $rc: $said"
            if [ "$rc" -eq 124 ]; then echo "fail $said (timed out; not cached)"; else echo "fail $said" | tee "$file"; fi
        fi
        rm -rf "$dir"
    ) 9>"$file.lock"
}

vm_select_backend() {
    local image=$1 probe
    if [ -n "${VM_BACKEND:-}" ]; then
        case $VM_BACKEND in
            uml | qemu) ;;
            *) die "VM_BACKEND must be uml or qemu, not '$VM_BACKEND'" ;;
        esac
        VM_BACKEND_REASON=${VM_BACKEND_REASON:-forced by VM_BACKEND=$VM_BACKEND}
    else
        probe=$(vm_uml_probe "$image")
        case $probe in
            ok*) VM_BACKEND=uml VM_BACKEND_REASON="UML boots on this host (probe: ${probe#ok })" ;;
            *) VM_BACKEND=qemu VM_BACKEND_REASON="UML does not boot on this host (probe: ${probe#fail })" ;;
        esac
    fi
    export VM_BACKEND VM_BACKEND_REASON
    echo "$ME: backend $VM_BACKEND: $VM_BACKEND_REASON" >&2
}

# How much slower than UML a guest runs: time limits in the tests scale by it.
vm_slow_factor() {
    case ${VM_BACKEND:-uml} in
        qemu) echo "${VM_SLOW:-4}" ;;
        *) echo "${VM_SLOW:-1}" ;;
    esac
}
vm_scale() { echo $(($1 * $(vm_slow_factor))); }

vm_prepare_share() {
    local dir=$1 test=$2
    mkdir -p "$dir"
    cp "$VM_LIB_DIR/../tests/$test" "$dir/test.sh"
    cp "$VM_LIB_DIR/../tests/lib-guest.sh" "$dir/lib-guest.sh"
}

# Every guest's kernel command line carries vm.name=NAME (UML: one argument
# of each of its processes; QEMU: inside -append), which identifies its host
# processes.
vm_guest_group() {
    local pg=$1 name=$2
    # (awk reads all of ps's output: grep -q would end the pipe early, and
    # under pipefail ps's SIGPIPE would turn a match into a failure.)
    ps -eo pgid=,args= | awk -v g="$pg" -v u="vm.name=$name " '$1 == g && index($0 " ", u) { f = 1 } END { exit !f }'
}
vm_guest_pids() {
    ps -eo pid=,args= | awk -v u="vm.name=$1 " 'index($0 " ", u) && !/awk/ { print $1 }'
}

# The guests of a multi-guest test talk over a bridge inside a namespace the
# test creates, so no guest reaches an address outside it.
vm_netns_bridge() {
    local ns=$1 tap
    shift
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" link set br0 up
    for tap in "$@"; do
        ip -n "$ns" tuntap add dev "$tap" mode tap
        ip -n "$ns" link set "$tap" master br0
        ip -n "$ns" link set "$tap" up
    done
}

# vm_kill_guest PGID: SIGKILL the process group of one guest (run-guest.sh's
# --pid-file), never the caller's own group.
vm_kill_guest() {
    local pg=$1
    [[ $pg =~ ^[0-9]+$ ]] && [ "$pg" -gt 1 ] || return 0
    [ "$pg" != "$(ps -o pgid= $$ | tr -d ' ')" ] || return 0
    kill -KILL -- "-$pg" 2>/dev/null || true
}
# Kill only the guests the caller started, then delete the namespace. Only
# guests still in pids: a finished guest's group id may have been reused.
# shellcheck disable=SC2154 # pids: the caller's
vm_cleanup_guests() {
    local dir=$1 ns=$2 k
    for k in "${!pids[@]}"; do
        vm_kill_guest "$(cat "$dir/$k.pid" 2>/dev/null)"
        kill "${pids[$k]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
}

# shellcheck disable=SC2034 # work, ns, common: for the caller
vm_two_guests() {
    mkdir -p "$VM_CACHE"
    work=$(mktemp -d "$VM_CACHE/$1.XXXXXX")
    ns="nbdm-$1-$$"
    common=$work/common
    trap 'vm_cleanup_guests "$work" "$ns"' EXIT
    vm_netns_bridge "$ns" tap-alpha tap-beta
    mkdir -p "$common"
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$common/r0.secret"
}
