#!/usr/bin/env bash
# Resync benchmark: two release mirrord processes on loopback.
#
#   1. Full resync of a RESYNC_BENCH_SIZE (2 GiB) file-backed disk holding
#      random data, timed from `primary --force` on alpha (the link is up:
#      the resync starts at once) until both disks are up to date; beside it,
#      a plain TCP copy of the same file on this machine (a python sender and
#      receiver on loopback, 1 MiB writes into a sparse file, fsync at the
#      end), and the ratio of the two throughputs.
#   2. Incremental resync: alpha disconnects, writes 1% of the 4 KiB blocks
#      (scattered, python3-libnbd), reconnects: bytes the resync moved
#      (status "sync" counters) against the bytes changed.
#   3. Checksum resync of nearly equal disks: beta is stopped, one byte is
#      flipped in RESYNC_BENCH_PLANT (100) blocks of its file, beta restarts;
#      `verify` counts the differing blocks, then `resync --full --checksum`
#      on alpha: bytes moved against the device size.
#   4. An application during a full resync: fio (4 KiB random writes, QD16,
#      ioengine=nbd) on the primary, and `resync --full` right after fio is
#      launched; fio counts RESYNC_BENCH_APP_SECONDS after its start-up and a
#      0.5 s ramp (default: step 1's time less the ramp, at least 1 s: the
#      resync must outlast fio, and while fio writes the adaptive pace holds it
#      to a quarter of its idle rate, so it takes more than twice step 1's
#      time); once in sync, the same fio again. The resync's rate from its
#      start to fio's end (status done_bytes) against its rate in step 1.
#
# The resync pace is the default (sync.rate = "auto", adaptive); checksum is
# off except for step 3's explicit --checksum. Three ratios with their targets
# (issue 21): full resync / TCP copy >= 0.9x; the application's IOPS during
# the resync / in sync >= 0.7x; the resync's rate during the application /
# idle >= 10%.
# Output on stdout and in target/bench/resync-results.md.
#
# Environment: RESYNC_BENCH_SIZE (2G), RESYNC_BENCH_PLANT (100),
# RESYNC_BENCH_APP_SECONDS, RESYNC_BENCH_RATE (sync.rate, "auto"), RESYNC_BENCH_KEEP
# (keep the disk images in target/bench/resync-work),
# BENCH_OUT (target/bench), MIRRORD_BIN / MIRRORCTL_BIN (target/release/...).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${BENCH_OUT:-$ROOT/target/bench}
SIZE=${RESYNC_BENCH_SIZE:-2G}
PLANT=${RESYNC_BENCH_PLANT:-100}
APP_SECS=${RESYNC_BENCH_APP_SECONDS:-}
RATE=${RESYNC_BENCH_RATE:-auto}
MIRRORD=${MIRRORD_BIN:-$ROOT/target/release/mirrord}
MIRRORCTL=${MIRRORCTL_BIN:-$ROOT/target/release/mirrorctl}
PY=/usr/bin/python3
WORK=$OUT/resync-work
RESULTS=$OUT/resync-results.md
PIDS=(0 0)
NAMES=(alpha beta)

ME=resync-bench
# shellcheck source=vm-images/lib/host.sh
. "$ROOT/vm-images/lib/host.sh"
log() { echo "resync-bench: $*" >&2; }

for b in "$MIRRORD" "$MIRRORCTL"; do
    [[ -x $b ]] || die "$b missing: run \`make build\` first"
done
$PY -c 'import nbd' 2>/dev/null || die "python3-libnbd missing: run tools/install-deps.sh"
fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd' || die "fio with the nbd engine missing: run tools/install-deps.sh"

bytes=$($PY -c '
import sys
s = sys.argv[1].upper()
m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
print(int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s))' "$SIZE")
(( bytes % 4096 == 0 )) || die "RESYNC_BENCH_SIZE must be a multiple of 4 KiB"

stop_node() {
    local i=$1 pid=${PIDS[$1]} n
    [[ $pid != 0 ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((n = 0; n < 300; n++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    PIDS[i]=0
}

cleanup() {
    stop_node 0
    stop_node 1
    # The images are large; RESYNC_BENCH_KEEP=1 keeps them (logs always stay).
    [[ -n ${RESYNC_BENCH_KEEP:-} ]] || rm -f "$WORK"/*.img
}
trap cleanup EXIT

ctl() { # node-index args...
    local i=$1
    shift
    "$MIRRORCTL" --config "$WORK/r0.toml" --node "${NAMES[$i]}" "$@"
}

start_node() {
    local i=$1 n
    "$MIRRORD" --config "$WORK/r0.toml" --node "${NAMES[$i]}" \
        >>"$WORK/${NAMES[$i]}.log" 2>&1 &
    PIDS[i]=$!
    for ((n = 0; n < 300; n++)); do
        ctl "$i" status --json >/dev/null 2>&1 && return 0
        kill -0 "${PIDS[$i]}" 2>/dev/null || die "${NAMES[$i]} exited; see $WORK/${NAMES[$i]}.log"
        sleep 0.1
    done
    die "${NAMES[$i]} did not start"
}

# status field via python: st NODE EXPR (EXPR over the parsed status `s`)
st() {
    ctl "$1" status --json | $PY -c "import json, sys; s = json.load(sys.stdin); print($2)"
}

secs() { $PY -c "print(f'{$2 - $1:.2f}')"; }
mibps() { $PY -c "print(f'{$1 / ($3 - $2) / 1048576:.0f}')"; }

wait_sync() {
    ctl 0 wait-sync --timeout 900 >/dev/null
    ctl 1 wait-sync --timeout 60 >/dev/null
}

rm -rf "$WORK"
mkdir -p "$WORK/alpha-run" "$WORK/beta-run"
printf 'resync-bench-secret-0123456789\n' >"$WORK/r0.secret"
chmod 600 "$WORK/r0.secret"

log "writing $SIZE of random data for alpha"
head -c "$bytes" /dev/urandom >"$WORK/alpha.img"
truncate -s "$bytes" "$WORK/beta.img"
sync -f "$WORK/alpha.img"

{
    toml_table resource name=r0 protocol=C shared-secret-file="$WORK/r0.secret"
    toml_table sync rate="$RATE" checksum=false
    toml_node alpha "127.0.0.1:$(free_port)" "$WORK/alpha.img" "$WORK/alpha.md" \
        run-dir="$WORK/alpha-run" nbd-listen="unix:$WORK/alpha-run/r0.nbd"
    toml_node beta "127.0.0.1:$(free_port)" "$WORK/beta.img" "$WORK/beta.md" \
        run-dir="$WORK/beta-run" nbd-listen="unix:$WORK/beta-run/r0.nbd"
} >"$WORK/r0.toml"

ctl 0 create-md >/dev/null
ctl 1 create-md >/dev/null
start_node 0
start_node 1
for ((n = 0; n < 300; n++)); do
    [[ $(st 1 's["peer"]["connection"]') == connected ]] && break
    sleep 0.1
done

# 1. Full resync.
log "full resync of $SIZE"
t0=$(now)
ctl 0 primary --force >/dev/null
wait_sync
t1=$(now)
full_t0=$t0
full_t1=$t1
full_secs=$(secs "$t0" "$t1")
full_rate=$(mibps "$bytes" "$t0" "$t1")
full_sent=$(st 0 's["sync"]["bytes_sent"]')
cmp -s "$WORK/alpha.img" "$WORK/beta.img" || die "disks differ after the full resync"

log "plain TCP copy of the same $SIZE"
truncate -s "$bytes" "$WORK/tcp-copy.img"
tcp_port=$(free_port)
tcp_out=$($PY - "$WORK/alpha.img" "$WORK/tcp-copy.img" "$tcp_port" <<'EOF'
import os, socket, sys, threading, time
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
CHUNK = 1 << 20
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(1)
result = {}

def receive():
    conn, _ = srv.accept()
    fd = os.open(dst, os.O_WRONLY)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    off = 0
    while True:
        n = conn.recv_into(view)
        if n == 0:
            break
        os.pwrite(fd, view[:n], off)
        off += n
    os.fsync(fd)
    os.close(fd)
    result["bytes"] = off
    result["end"] = time.monotonic()

t = threading.Thread(target=receive)
t.start()
start = time.monotonic()
with socket.create_connection(("127.0.0.1", port)) as s, open(src, "rb") as f:
    while True:
        block = f.read(CHUNK)
        if not block:
            break
        s.sendall(block)
t.join()
print(result["bytes"], f"{result['end'] - start:.3f}")
EOF
)
read -r tcp_bytes tcp_secs <<<"$tcp_out"
(( tcp_bytes == bytes )) || die "tcp copy moved $tcp_bytes bytes"
cmp -s "$WORK/alpha.img" "$WORK/tcp-copy.img" || die "tcp copy differs"
rm -f "$WORK/tcp-copy.img"
tcp_rate=$($PY -c "print(f'{$bytes / $tcp_secs / 1048576:.0f}')")
ratio=$($PY -c "print(f'{($bytes / ($t1 - $t0)) / ($bytes / $tcp_secs):.2f}')")

# 2. Incremental resync of 1% of the blocks.
blocks=$((bytes / 4096))
changed=$(((blocks + 99) / 100))
log "incremental: $changed scattered blocks written on alpha while disconnected"
ctl 0 disconnect >/dev/null
sent0=$(st 0 's["sync"]["bytes_sent"]')
$PY - "nbd+unix:///r0?socket=$WORK/alpha-run/r0.nbd" "$blocks" "$changed" <<'EOF'
import os, random, sys
import nbd
uri, blocks, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(4)
for b in rng.sample(range(blocks), n):
    h.pwrite(os.urandom(4096), b * 4096)
h.flush()
h.shutdown()
EOF
oos=$(st 0 's["out_of_sync_bytes"]')
t0=$(now)
ctl 0 connect >/dev/null
wait_sync
t1=$(now)
inc_secs=$(secs "$t0" "$t1")
inc_sent=$(($(st 0 's["sync"]["bytes_sent"]') - sent0))
inc_changed=$((changed * 4096))
cmp -s "$WORK/alpha.img" "$WORK/beta.img" || die "disks differ after the incremental resync"

# 3. Checksum resync of nearly equal disks.
log "checksum: $PLANT blocks planted different on beta's disk"
stop_node 1
$PY - "$WORK/beta.img" "$blocks" "$PLANT" <<'EOF'
import os, random, sys
path, blocks, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
for b in random.Random(9).sample(range(blocks), n):
    off = b * 4096 + 100
    old = os.pread(fd, 1, off)
    os.pwrite(fd, bytes([old[0] ^ 0x5A]), off)
os.fsync(fd)
os.close(fd)
EOF
start_node 1
wait_sync
t0=$(now)
ctl 0 verify --wait >/dev/null
t1=$(now)
verify_secs=$(secs "$t0" "$t1")
found=$(st 0 's["sync"]["last_verify_differing_blocks"]')
sent0=$(st 0 's["sync"]["bytes_sent"]')
equal0=$(st 0 's["sync"]["blocks_equal"]')
t0=$(now)
ctl 0 resync --full --checksum --wait >/dev/null
wait_sync
t1=$(now)
sum_secs=$(secs "$t0" "$t1")
sum_sent=$(($(st 0 's["sync"]["bytes_sent"]') - sent0))
sum_equal=$(($(st 0 's["sync"]["blocks_equal"]') - equal0))
cmp -s "$WORK/alpha.img" "$WORK/beta.img" || die "disks differ after the checksum resync"

# 4. An application during a full resync, which must outlast fio. fio starts first: its
# start-up and a ramp of APP_RAMP_MS are not counted, and the resync starts right after fio
# is launched, so the counted window lies inside the resync (held to a quarter of its idle
# rate while fio writes, it outlasts a window as long as step 1).
URI="nbd+unix:///r0?socket=$WORK/alpha-run/r0.nbd"
APP_RAMP_MS=500
app_iops() { # name: fio 4 KiB random writes QD16 on alpha; prints the IOPS
    fio --name="$1" --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 \
        --size="$bytes" --time_based=1 --ramp_time="$APP_RAMP_MS"ms --runtime="$APP_MS"ms \
        --norandommap=1 --randrepeat=0 \
        --output-format=json --output="$WORK/fio-$1.json" >"$WORK/fio-$1.log" 2>&1 ||
        die "fio $1 failed; see $WORK/fio-$1.log"
    $PY -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' \
        "$WORK/fio-$1.json"
}
[[ -n $APP_SECS ]] || APP_SECS=$($PY -c "print(round(max(1.0, ($full_t1 - $full_t0) - $APP_RAMP_MS / 1000), 1))")
APP_MS=$($PY -c "print(int(float('$APP_SECS') * 1000))")
log "application: fio randwrite 4k QD16 for ${APP_SECS}s (after a ${APP_RAMP_MS} ms ramp) during a full resync"
app_iops during-resync >"$WORK/iops-during" &
fio_pid=$!
ctl 0 resync --full >/dev/null
a0=$(now)
wait "$fio_pid" || die "fio during the resync failed; see $WORK/fio-during-resync.log"
a1=$(now)
iops_resync=$(cat "$WORK/iops-during")
during=$(st 0 's["resync"] and s["resync"]["done_bytes"]')
[[ $during != None ]] || die "the resync ended during fio: raise RESYNC_BENCH_SIZE or lower RESYNC_BENCH_APP_SECONDS"
pace=$(st 0 's["resync"].get("pace")')
during_rate=$(mibps "$during" "$a0" "$a1")
wait_sync
cmp -s "$WORK/alpha.img" "$WORK/beta.img" || die "disks differ after the resync under application writes"
log "application: the same for ${APP_SECS}s in sync"
iops_sync=$(app_iops in-sync)
app_ratio=$($PY -c "print(f'{$iops_resync / $iops_sync:.2f}')")
floor_pct=$($PY -c "print(f'{100 * $during / ($a1 - $a0) / ($bytes / ($full_t1 - $full_t0)):.0f}')")
verdict() { $PY -c "print('met' if $1 >= $2 else 'NOT met')"; }

cores=$(nproc)
{
    echo "# Resync benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $cores cores, loopback, release build)"
    echo
    echo "| what | bytes moved | time (s) | throughput (MiB/s) |"
    echo "|---|---|---|---|"
    echo "| full resync, $SIZE | $full_sent | $full_secs | $full_rate |"
    echo "| plain TCP copy, same file | $tcp_bytes | $tcp_secs | $tcp_rate |"
    echo "| incremental, $changed blocks changed ($inc_changed bytes) | $inc_sent | $inc_secs | |"
    echo "| online verify, $PLANT blocks planted | (checksums only) | $verify_secs | |"
    echo "| checksum resync --full, $PLANT blocks differ | $sum_sent | $sum_secs | |"
    echo "| full resync while fio writes (${APP_SECS} s window) | $during | $(secs "$a0" "$a1") | $during_rate |"
    echo
    echo "| application: fio randwrite 4 KiB QD16, ${APP_SECS} s | IOPS |"
    echo "|---|---|"
    echo "| pair in sync | $iops_sync |"
    echo "| during a full resync | $iops_resync |"
    echo
    echo "- sync.rate = \"$RATE\"; the sync source's pace at the end of the fio window: $pace"
    echo "- full resync / TCP copy throughput: **${ratio}x** (target >= 0.9x: $(verdict "$ratio" 0.9))"
    echo "- application IOPS during the resync / in sync: **${app_ratio}x** (target >= 0.7x: $(verdict "$app_ratio" 0.7))"
    echo "- resync rate during the application / idle (step 1): **${floor_pct}%** (target >= 10%: $(verdict "$floor_pct" 10)); the resync rate counts from its start to the end of fio"
    echo "- incremental: moved $inc_sent bytes for $inc_changed changed ($(
        $PY -c "print(f'{$inc_sent / $inc_changed:.3f}')")x); alpha had $oos bytes out of sync"
    echo "- verify found $found differing blocks; checksum resync moved $sum_sent bytes of $bytes" \
        "($(
            $PY -c "print(f'{100 * $sum_sent / $bytes:.4f}')")% of the device), $sum_equal blocks found equal"
} | tee "$RESULTS"
