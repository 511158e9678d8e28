#!/bin/bash
# make vm-smoke: one guest (UML or QEMU, see run-guest.sh) under systemd.
# mirrord@r0 serves a 1 GiB disk (a host file, the guest's /dev/vm/disk1;
# standalone single-[[node]]
# config), nbd-attach@r0 attaches /dev/nbd0 with nbd-client -C 4, then fio
# with crc32c verify, an ext4 file round trip, a daemon restart and a clean
# stop. The guest writes per-step results to the share; this script asserts
# them. Exit 0 only when every step passed and the guest powered off cleanly.
#
# Environment:
#   VM_SMOKE_SERVER  mirrord (default when target/*/mirrord runs) | standin
#                    (nbdkit in the same unit shape, for developing the harness)
#   VM_SMOKE_KEEP    =1: keep the work folder (logs, share) after success
#   VM_TIMEOUT       guest time limit in seconds (default 300, x4 under QEMU)
#   VM_BACKEND       uml | qemu: force a backend (default: UML where it boots)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
ME=vm-smoke
# shellcheck source=vm-images/lib/host.sh
. "$here/lib/host.sh"
fail() { echo "vm-smoke: FAIL: $*" >&2; echo "vm-smoke: logs in $work" >&2; exit 1; }

t_all=$(now)
server=${VM_SMOKE_SERVER:-}
if [ -z "$server" ]; then
    server=standin
    for p in "$repo/target/release/mirrord" "$repo/target/debug/mirrord"; do
        if [ -x "$p" ] && timeout 10 "$p" --help >/dev/null 2>&1; then server=mirrord; break; fi
    done
fi
case $server in
    mirrord) export VM_NO_BINARIES=0 ;;
    standin) export VM_NO_BINARIES=1 ;;
    *) echo "vm-smoke: VM_SMOKE_SERVER must be mirrord or standin" >&2; exit 2 ;;
esac
echo "vm-smoke: server: $server"

t=$(now)
image=$("$here/build-image.sh")
t_image=$(since "$t")
vm_select_backend "$image"

mkdir -p "$repo/.cache/vm"
work=$(mktemp -d "$repo/.cache/vm/smoke.XXXXXX")
share=$work/share
mkdir -p "$share"
truncate -s 1G "$work/disk0.img"
vm_prepare_share "$share" smoke-guest.sh
[ "$server" = standin ] && : >"$share/standin"
{
    echo "# Standalone resource: a single [[node]], no peer link."
    toml_table resource name=r0 run-dir=/run/nbd-mirror
    toml_table nbd listen=unix:/run/nbd-mirror/r0.nbd
    toml_node vmguest 127.0.0.1:7789 /dev/vm/disk1 internal
} >"$share/r0.toml"

t=$(now)
set +e
"$here/run-guest.sh" --image "$image" --share "$share" --test test.sh --disk "$work/disk0.img" \
    --mode systemd --mem 768M --timeout "${VM_TIMEOUT:-$(vm_scale 300)}" --name vm-smoke-$$
rc=$?
set -e
t_guest=$(since "$t")

echo "--- guest result:"
cat "$share/result" 2>/dev/null || true
[ $rc -eq 0 ] || { tail -n 40 "$share/guest.log" 2>/dev/null || true; fail "guest test exited $rc"; }
expected="package config create-md start up-to-date attach multi-conn status fio-seq-1M fio-rand-4k fs-write fs-check stop reattach fs-check-after-restart crash-restart fs-check-after-crash"
for s in $expected; do
    grep -q "^ok $s " "$share/result" || fail "step $s did not pass"
done
grep -q '^SMOKE PASSED$' "$share/guest.log" || fail "guest log lacks SMOKE PASSED"

# Clean systemd poweroff with mirrord@r0 and nbd-attach@r0 still running:
# both must stop, the device detached before the daemon stops.
console=$(sed -e 's/\x1b\[[0-9;]*m//g' "$share/console.log" | sed -n '/^vm-run: test.sh exited/,$p')
grep -q 'reboot: System halted\|reboot: Power down' <<<"$console" || fail "guest did not power off cleanly"
detach=$(grep -n 'Stopped nbd-attach@r0' <<<"$console" | head -n 1 | cut -d: -f1)
daemon=$(grep -n 'Stopped mirrord@r0' <<<"$console" | head -n 1 | cut -d: -f1)
[ -n "$detach" ] && [ -n "$daemon" ] || fail "shutdown did not stop nbd-attach@r0 and mirrord@r0"
[ "$detach" -lt "$daemon" ] || fail "mirrord@r0 stopped before /dev/nbd0 was detached"
if grep -q 'Failed to stop\|FAILED' <<<"$console"; then fail "a unit failed (see $share/console.log)"; fi

echo "vm-smoke: PASS (server $server, backend $VM_BACKEND; image ${t_image}s, guest ${t_guest}s, total $(since "$t_all")s)"
if [ "${VM_SMOKE_KEEP:-0}" = 1 ]; then echo "vm-smoke: kept $work"; else rm -rf "$work"; fi
