#!/bin/bash
# SKELETON (not in vm-test yet): two UML guests, alpha and beta, each with its
# own 1 GiB disk, mirrord@r0 mirroring between them (dual primary), each
# attaching /dev/nbd0 and mounting one OCFS2 file system; each guest writes a
# file and reads the other's. Needs mirrord's peer link; until that works the
# guests stop at the sync step and this script fails there.
#
# Network: a namespace created here (ip netns), a bridge and one tap per guest
# inside it; the guests use 10.99.0.1 and 10.99.0.2 on that bridge only. No
# address outside the namespace is used. The namespace is deleted on exit.
#
# Environment: VM_TIMEOUT (per guest, default 420), VM_SMOKE_KEEP=1 keeps logs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
fail() { echo "vm-two-host: FAIL: $*" >&2; echo "vm-two-host: logs in $work" >&2; exit 1; }

t_all=$(now)
image=$("$here/build-image.sh")
mkdir -p "$repo/.cache/vm"
work=$(mktemp -d "$repo/.cache/vm/two-host.XXXXXX")
ns="nbdm-vm-$$"

cleanup() {
    local pid
    for pid in ${guest_pids:-}; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT

# --- network namespace with a bridge and two taps ----------------------------
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" link set br0 up
for n in alpha beta; do
    ip -n "$ns" tuntap add dev "tap-$n" mode tap
    ip -n "$ns" link set "tap-$n" master br0
    ip -n "$ns" link set "tap-$n" up
done

# --- shared config and per-guest shares --------------------------------------
common=$work/common
mkdir -p "$common"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$common/r0.secret"
cat >"$common/r0.toml" <<'EOF'
[resource]
name = "r0"
protocol = "C"
allow-two-primaries = true
auto-promote = true
shared-secret-file = "/etc/nbd-mirror/r0.secret"

[split-brain]
after-sb-0pri = "discard-zero-changes"
after-sb-1pri = "discard-secondary"
after-sb-2pri = "disconnect"

[[node]]
name = "alpha"
address = "10.99.0.1:7789"
disk = "/dev/ubdb"
meta-disk = "internal"

[[node]]
name = "beta"
address = "10.99.0.2:7789"
disk = "/dev/ubdb"
meta-disk = "internal"
EOF
cp "$here/tests/two-host-guest.sh" "$common/test.sh"

guest_pids=
i=1
for n in alpha beta; do
    mkdir -p "$work/$n"
    cp "$common/test.sh" "$work/$n/test.sh"
    truncate -s 1G "$work/$n/disk0.img"
    ip netns exec "$ns" "$here/run-guest.sh" --image "$image" --share "$work/$n" \
        --test test.sh --disk "$work/$n/disk0.img" --tap "tap-$n,52:54:00:99:00:0$i" \
        --append "vm.node=$n" --append "vm.common=$common" --append "vm.ip=10.99.0.$i/24" \
        --mode systemd --mem 1024M --timeout "${VM_TIMEOUT:-420}" --name "vm-$n-$$" \
        >"$work/$n.run.log" 2>&1 &
    guest_pids="$guest_pids $!"
    i=$((i + 1))
done

rcs=()
for pid in $guest_pids; do
    set +e; wait "$pid"; rcs+=($?); set -e
done
guest_pids=
for n in alpha beta; do
    echo "--- $n:"; cat "$work/$n/result" 2>/dev/null || true; cat "$work/$n.run.log"
done
[ "${rcs[0]}" -eq 0 ] || fail "alpha exited ${rcs[0]}"
[ "${rcs[1]}" -eq 0 ] || fail "beta exited ${rcs[1]}"
for n in alpha beta; do
    grep -q '^TWO-HOST PASSED$' "$work/$n/guest.log" || fail "$n did not pass"
done
echo "vm-two-host: PASS (total $(since "$t_all")s)"
if [ "${VM_SMOKE_KEEP:-0}" = 1 ]; then echo "vm-two-host: kept $work"; else rm -rf "$work"; fi
