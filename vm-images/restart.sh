#!/bin/bash
# make vm-restart: restart, upgrade, kill -9 and stall mirrord under a mounted
# ext4 on /dev/nbd0 while fio writes, with the units as shipped (mirrord@r0,
# nbd-attach@r0 running `mirrorctl attach`). One guest (UML or QEMU, see
# run-guest.sh) under systemd, standalone mirrord@r0 on a 1 GiB disk; the
# guest (tests/restart-guest.sh) runs the cases and asserts, per case: fio
# without error, no I/O error or journal abort in the kernel log, 4
# connections back, e2fsck -fn clean, the known file intact. It records one
# line of facts per observation in share/facts, which this script prints.
# Exit 0 only when every case ran and passed every check: an I/O error fails it.
#
# Environment:
#   VM_RESTART_CASES      comma-separated cases (default
#                         restart1,restart2,restart3,upgrade1,kill1,kill2,kill3,stall1,agentkill1;
#                         the kind is the name without its digits)
#   MIRRORD_UPGRADE_BIN   the "new" mirrord of the upgrade case (default: the build
#                         the image does not hold, target/debug or target/release;
#                         if that is missing or the same file, a copy of the image's
#                         binary with bytes appended)
#   VM_KEEP=1             keep the work folder (dmesg, fio JSON, fsck output, agent log)
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

# The upgrade's binary: another build than the image's (build-image.sh picks
# MIRRORD_BIN, else target/release, else target/debug).
if [ -n "${MIRRORD_BIN:-}" ]; then
    in_image=$MIRRORD_BIN
elif [ -x "$repo/target/release/mirrord" ]; then
    in_image=$repo/target/release/mirrord
else
    in_image=$repo/target/debug/mirrord
fi
upgrade=${MIRRORD_UPGRADE_BIN:-}
if [ -z "$upgrade" ]; then
    for b in "$repo/target/debug/mirrord" "$repo/target/release/mirrord"; do
        [ -x "$b" ] && ! cmp -s "$b" "$in_image" && { upgrade=$b; break; }
    done
fi
if [ -n "$upgrade" ]; then
    cp "$upgrade" "$share/mirrord-upgrade"
    echo "vm-restart: upgrade case installs $upgrade (image holds $in_image)"
else
    cp "$in_image" "$share/mirrord-upgrade"
    printf '\nnbd-mirror upgrade marker %s\n' "$(date +%s)" >>"$share/mirrord-upgrade"
    echo "vm-restart: upgrade case installs a copy of $in_image with bytes appended (no second build found)"
fi

cases=${VM_RESTART_CASES:-restart1,restart2,restart3,upgrade1,kill1,kill2,kill3,stall1,agentkill1}
t=$(now)
set +e
"$here/run-guest.sh" --image "$image" --share "$share" --test test.sh --disk "$work/disk0.img" \
    --mode systemd --mem 768M --timeout "${VM_TIMEOUT:-$(vm_scale 900)}" --name "vm-restart-$$" \
    --append "vm.cases=$cases"
rc=$?
set -e
t_guest=$(since "$t")
echo "--- facts (guest, mirrorctl attach, backend $VM_BACKEND, kernel 6.1):"
cat "$share/facts" 2>/dev/null || true
[ $rc -eq 0 ] || { tail -n 30 "$share/guest.log" 2>/dev/null || true; fail "guest test exited $rc"; }
grep -q '^RESTART CASES DONE failures=0$' "$share/guest.log" || fail "guest did not finish every case"
! grep -q ' FAIL: ' "$share/facts" || fail "a check failed (facts above)"
for c in ${cases//,/ }; do
    grep -q "^$c e2fsck -fn: exit 0" "$share/facts" || fail "case $c did not finish"
done
pauses=$(awk '/ (fio|ticker): / { for (i = 1; i <= NF; i++) if ($i ~ /^max_(write|fsync|read|gap)_ms=/) { split($i, kv, "="); k = $1; sub(/[0-9]+$/, "", k); if (kv[2] > m[k]) m[k] = kv[2] } }
    END { for (k in m) printf "%s %s ms; ", k, m[k] }' "$share/facts")
echo "vm-restart: longest single write, fsync or verify read per kind: $pauses"
echo "vm-restart: PASS (backend $VM_BACKEND; image ${t_image}s, guest ${t_guest}s, total $(since "$t_all")s)"
if [ "${VM_KEEP:-0}" = 1 ]; then echo "vm-restart: kept $work"; else rm -rf "$work"; fi
