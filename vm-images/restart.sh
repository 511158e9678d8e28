#!/bin/bash
# make vm-restart: what a mounted file system on /dev/nbd0 sees when mirrord
# restarts or stalls under load (Debian 12: nbd-client 3.24, kernel 6.1).
# One guest (UML or QEMU, see run-guest.sh) under systemd, standalone mirrord@r0 on a 1 GiB disk; the
# guest (tests/restart-guest.sh) runs the scenarios and records one line of
# facts per observation in share/facts, which this script prints. Exit 0
# when every scenario ran and acknowledged data survived; the facts
# themselves (I/O errors, reconnects) are reported, not asserted.
#
# Environment:
#   VM_RESTART_SCENARIOS  comma-separated subset of
#                         unit-restart,ioctl-persist,stall-C4,stall-C4-t90
#   VM_KEEP=1             keep the work folder (dmesg, fio, fsck output)
#   VM_TIMEOUT            guest time limit in seconds (default 900, x4 under QEMU)
#   VM_BACKEND            uml | qemu: force a backend (default: UML where it boots)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
ME=vm-restart
# shellcheck source=vm-images/lib/host.sh
. "$here/lib/host.sh"
fail() { echo "vm-restart: FAIL: $*" >&2; echo "vm-restart: logs in $work" >&2; exit 1; }

t_all=$(now)
t=$(now)
image=$("$here/build-image.sh")
t_image=$(since "$t")
vm_select_backend "$image"
mkdir -p "$repo/.cache/vm"
work=$(mktemp -d "$repo/.cache/vm/restart.XXXXXX")
share=$work/share
mkdir -p "$share"
truncate -s 1G "$work/disk0.img"
vm_prepare_share "$share" restart-guest.sh
{
    echo "# Standalone resource: a single [[node]], no peer link."
    toml_table resource name=r0
    toml_node vmguest 127.0.0.1:7789 /dev/vm/disk1 internal
} >"$share/r0.toml"

scen=${VM_RESTART_SCENARIOS:-unit-restart,ioctl-persist,stall-C4,stall-C4-t90}
t=$(now)
set +e
"$here/run-guest.sh" --image "$image" --share "$share" --test test.sh --disk "$work/disk0.img" \
    --mode systemd --mem 768M --timeout "${VM_TIMEOUT:-$(vm_scale 900)}" --name "vm-restart-$$" \
    --append "vm.scenarios=$scen"
rc=$?
set -e
t_guest=$(since "$t")
echo "--- facts (guest, nbd-client 3.24, backend $VM_BACKEND, kernel 6.1):"
cat "$share/facts" 2>/dev/null || true
[ $rc -eq 0 ] || { tail -n 30 "$share/guest.log" 2>/dev/null || true; fail "guest test exited $rc"; }
grep -q '^RESTART FACTS COLLECTED$' "$share/guest.log" || fail "guest did not finish"
for s in ${scen//,/ }; do
    grep -q "^$s after: .*acked_file=intact" "$share/facts" || fail "scenario $s did not finish"
done
echo "vm-restart: PASS (facts collected, backend $VM_BACKEND; image ${t_image}s, guest ${t_guest}s, total $(since "$t_all")s)"
if [ "${VM_KEEP:-0}" = 1 ]; then echo "vm-restart: kept $work"; else rm -rf "$work"; fi
