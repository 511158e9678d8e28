#!/bin/bash
# make bench-vm: nbd-mirror side by side with DRBD 8.4 in the same two guests
# (UML where it boots, else QEMU/TCG; VM_BACKEND forces one). A benchmark,
# not a test: not in make test or CI; the figures are printed, never asserted.
#
# alpha and beta each get two disks of the same size (files of zeros,
# VM_BENCH_DISK_SIZE, default 1G): disk 1 for mirrord@r0 (protocol C, default
# settings, /dev/nbd0 on alpha through nbd-attach@r0 as shipped), disk 2 for
# DRBD (the guest kernel's DRBD 8.4 module, drbd-utils' drbdadm, protocol C,
# DRBD's defaults, /dev/drbd0 on alpha). Both replicate over the same guest
# link and each first does a full initial sync alpha -> beta (timed). Then
# alpha runs fio (libaio, direct=1, a 2 s ramp, VM_BENCH_SECONDS per job,
# default 15) on /dev/drbd0 and /dev/nbd0 in turns, the order alternating
# every round, VM_BENCH_ROUNDS rounds (default 3):
#
#   seq1m        1 MiB sequential writes, QD 8
#   rand4k-qd1   4 KiB random writes, QD 1
#   rand4k-qd16  4 KiB random writes, QD 16
#
# Before each job both guests write back their page caches (sync). Around
# each job the host reads both guests' CPU time (utime+stime of their host
# processes), so the table also gives the host CPU each guest used.
# The table (medians over the rounds, the nbd-mirror/DRBD ratio, ranges, host
# CPU) is printed and written to .cache/vm/bench-vm-results.md. Under QEMU/TCG
# the CPU is emulated: the ratio is printed with that caveat.
#
# Network: a namespace created here with a bridge and one tap per guest
# (10.99.0.1, 10.99.0.2); deleted on exit. VM_KEEP=1 keeps the work folder
# (fio JSON per job, guest logs, CPU readings). VM_BENCH_MIRROR_TOML: TOML
# appended to nbd-mirror's config for a comparison run (e.g. "[nbd]
# busy-poll-us = 0"); the table then says that nbd-mirror was not at its
# defaults.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
ME=bench-vm
# shellcheck source=vm-images/lib/host.sh
. "$here/lib/host.sh"
say() { echo "bench-vm: $(date +%H:%M:%S) $*"; }
fail() {
    say "FAIL: $*" >&2
    cat "${common:-/nonexistent}"/*.figures 2>/dev/null >&2 || true
    [ -n "${work:-}" ] && say "logs in $work" >&2
    exit 1
}

disk_size=${VM_BENCH_DISK_SIZE:-1G}
rounds=${VM_BENCH_ROUNDS:-3}
seconds=${VM_BENCH_SECONDS:-15}
[[ $rounds =~ ^[0-9]+$ && $seconds =~ ^[0-9]+$ && $rounds -gt 0 && $seconds -gt 0 ]] ||
    fail "VM_BENCH_ROUNDS and VM_BENCH_SECONDS must be whole numbers above 0"
t_all=$(now)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
# What a system call costs here (as the guest measures it in itself).
t=$(now)
dd if=/dev/zero of=/dev/null bs=1 count=50000 status=none
host_syscall=$(awk -v a="$t" -v b="$(now)" 'BEGIN { printf "%.1f µs", (b - a) * 1e6 / 100000 }')
image=$("$here/build-image.sh")
vm_select_backend "$image"
declare -A pids=()
# The work and common folders, the network namespace, the guests killed on exit.
vm_two_guests bench-vm
{
    toml_table resource name=r0 protocol=C shared-secret-file=/etc/nbd-mirror/r0.secret
    toml_node alpha 10.99.0.1:7789 /dev/vm/disk1 internal
    toml_node beta 10.99.0.2:7789 /dev/vm/disk1 internal
    # Not the defaults: for a comparison run only (printed with the table).
    [ -z "${VM_BENCH_MIRROR_TOML:-}" ] || printf '%s\n' "$VM_BENCH_MIRROR_TOML"
} >"$common/r0.toml"
# Written out (zeros), not sparse: nbd-mirror's checksummed initial sync
# skips blocks that are equal and leaves beta's file sparse, DRBD's writes
# every block; allocating on the host during the runs would tilt the result.
disk_bytes=$(numfmt --from=iec "$disk_size") || fail "VM_BENCH_DISK_SIZE=$disk_size is not a size"
for n in alpha beta; do
    for f in "$work/$n-mirror.img" "$work/$n-drbd.img"; do
        head -c "$disk_bytes" /dev/zero >"$f"
    done
done

for n in alpha beta; do
    i=1
    [ "$n" = beta ] && i=2
    vm_prepare_share "$work/$n" bench-guest.sh
    ip netns exec "$ns" "$here/run-guest.sh" --image "$image" --share "$work/$n" \
        --test test.sh --disk "$work/$n-mirror.img" --disk "$work/$n-drbd.img" \
        --tap "tap-$n,52:54:00:99:00:0$i" --mount "$common:/mnt/common" \
        --append "vm.node=$n" --append "vm.ip=10.99.0.$i/24" \
        --append "vm.rounds=$rounds" --append "vm.seconds=$seconds" \
        --pid-file "$work/$n.pid" --mode systemd --mem 768M \
        --timeout "$(vm_scale $((1200 + rounds * 6 * (seconds + 20))))" --name "vm-bench-$n-$$" \
        >"$work/$n.run.log" 2>&1 &
    pids[$n]=$!
    say "booted $n (run-guest pid ${pids[$n]})"
done

# CPU time (clock ticks) of guest NAME's host processes, children included.
guest_ticks() {
    local pid sum=0 f
    for pid in $(vm_guest_pids "$1"); do
        f=$(cut -d')' -f2- "/proc/$pid/stat" 2>/dev/null) || continue
        # After "pid (comm)": field 12-15 of the rest are utime stime cutime cstime.
        sum=$((sum + $(echo "$f" | awk '{ print $12 + $13 + $14 + $15 }')))
    done
    echo "$sum"
}
# Answer alpha's marks (mark.ID -> ack.ID) with both guests' CPU time until
# alpha's guest ends.
: >"$work/cpu.log"
while kill -0 "${pids[alpha]}" 2>/dev/null; do
    for f in "$common"/mark.*; do
        [ -e "$f" ] || continue
        id=${f#"$common"/mark.}
        [ -e "$common/ack.$id" ] && continue
        echo "$id $(now) $(guest_ticks "vm-bench-alpha-$$") $(guest_ticks "vm-bench-beta-$$")" >>"$work/cpu.log"
        : >"$common/ack.$id"
    done
    sleep 0.2
done
rc_a=0 rc_b=0
wait "${pids[alpha]}" || rc_a=$?
unset "pids[alpha]"
wait "${pids[beta]}" || rc_b=$?
unset "pids[beta]"
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
for n in alpha beta; do echo "--- $n:"; cat "$work/$n/result" 2>/dev/null || true; done
[ "$rc_a" -eq 0 ] || { tail -n 40 "$work/alpha/guest.log" >&2; fail "alpha exited $rc_a"; }
[ "$rc_b" -eq 0 ] || { tail -n 40 "$work/beta/guest.log" >&2; fail "beta exited $rc_b"; }
grep -q '^BENCH DONE$' "$work/alpha/guest.log" || fail "alpha did not finish"
res=$work/alpha/results.tsv
[ "$(wc -l <"$res")" -eq $((rounds * 6)) ] || fail "expected $((rounds * 6)) fio results in $res"

# --- the table -----------------------------------------------------------------
hz=$(getconf CLK_TCK)
# rows.tsv, one row per job: workload device figure latency_us cpu_alpha% cpu_beta% cost
# (figure: MiB/s for seq1m, else IOPS; cpu: % of one host CPU over the job; cost:
# host CPU of both guests per MiB (ms) for seq1m, per write (µs) for the others).
awk -v hz="$hz" 'NR == FNR { split($1, p, "."); id = p[1] "." p[2] "." p[3]
        if (p[4] == "start") { t[id] = $2; a[id] = $3; b[id] = $4 }
        else if (id in t) { w = $2 - t[id]; ca[id] = ($3 - a[id]) * 100 / hz / w; cb[id] = ($4 - b[id]) * 100 / hz / w }
        next }
    { id = $1 "." $2 "." $3; if (!(id in ca)) { ca[id] = cb[id] = "-" }
      if ($2 == "seq1m") { f = $5 / 1048576; k = 1000 } else { f = $4; k = 1000000 }
      cost = (ca[id] == "-" || f == 0) ? "-" : (ca[id] + cb[id]) / 100 / f * k
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", $2, $3, f, $6 / 1000, ca[id], cb[id], cost }' \
    "$work/cpu.log" FS='\t' "$res" >"$work/rows.tsv"
median() { sort -g | awk '$1 != "-" { v[++n] = $1 } END { if (n == 0) print "-"; else if (n % 2) print v[(n + 1) / 2]; else print (v[n / 2] + v[n / 2 + 1]) / 2 }'; }
# col WORKLOAD DEVICE COLUMN: that column of each round's row.
col() { awk -F'\t' -v w="$1" -v d="$2" -v c="$3" '$1 == w && $2 == d { print $c }' "$work/rows.tsv"; }
med() { col "$@" | median | awk '{ if ($1 == "-") print "-"; else printf "%.0f\n", $1 }'; }
range() { col "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f-%.0f", lo, hi }'; }
caveat=
[ "$VM_BACKEND" = qemu ] && caveat=" CAVEAT: QEMU with TCG emulates the CPU; both systems run several times slower than on real hardware and the ratio mostly measures emulated CPU cost, not the network or the disks."
out=$repo/.cache/vm/bench-vm-results.md
{
    echo "bench-vm $(date -u +'%Y-%m-%d %H:%M UTC'): backend $VM_BACKEND ($VM_BACKEND_REASON).$caveat"
    echo "$rounds rounds, order alternating, ${seconds} s per job after a 2 s ramp; disks $disk_size per system per guest (files of zeros); guests 768M, systemd."
    echo "host: $(nproc) CPUs, Linux $(uname -r); load average at the start $load_start, at the end $load_end."
    [ -z "${VM_BENCH_MIRROR_TOML:-}" ] || echo "nbd-mirror NOT at its defaults: VM_BENCH_MIRROR_TOML='$(printf '%s' "$VM_BENCH_MIRROR_TOML" | tr '\n' ' ')'."
    echo "host system call cost: $host_syscall (the guests' below)."
    sed 's/^/guest /' "$common"/*.figures
    echo
    echo "| workload | DRBD 8.4 | nbd-mirror | nbd-mirror / DRBD | rounds DRBD / nbd-mirror | mean latency µs DRBD / nbd-mirror | host CPU % alpha+beta DRBD / nbd-mirror | host CPU per MiB (ms) or per write (µs) DRBD / nbd-mirror |"
    echo "|---|---:|---:|---:|---|---:|---:|---:|"
    for w in seq1m rand4k-qd1 rand4k-qd16; do
        unit=IOPS
        [ "$w" = seq1m ] && unit=MiB/s
        d=$(col "$w" drbd 3 | median)
        m=$(col "$w" nbd 3 | median)
        ratio=$(awk -v a="$m" -v b="$d" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
        printf '| %s | %.0f %s | %.0f %s | **%s** | %s / %s | %s / %s | %s+%s / %s+%s | %s / %s |\n' \
            "$w" "$d" "$unit" "$m" "$unit" "$ratio" "$(range "$w" drbd 3)" "$(range "$w" nbd 3)" \
            "$(med "$w" drbd 4)" "$(med "$w" nbd 4)" "$(med "$w" drbd 5)" "$(med "$w" drbd 6)" \
            "$(med "$w" nbd 5)" "$(med "$w" nbd 6)" "$(med "$w" drbd 7)" "$(med "$w" nbd 7)"
    done
} >"$out"
echo
cat "$out"
say "done in $(since "$t_all")s (table also in $out)"
if [ "${VM_KEEP:-0}" = 1 ]; then say "kept $work"; else rm -rf "$work"; fi
