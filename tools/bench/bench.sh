#!/usr/bin/env bash
# Benchmarks mirrord against reference NBD servers with fio's nbd engine.
#
# The same prefilled image file is served, one server after another, by
#   mirrord     (release build, one node standalone, external metadata so
#                the export is exactly the file; direct-io off)
#   qemu-nbd    (default writeback cache: the host page cache)
#   nbdkit      (file plugin, default cache: the host page cache)
#   nbd-server  (config file in the work dir; buffered I/O)
# and fio also runs on the plain file (psync, page cache kept) as the ceiling.
# Every server listens on a unix socket; fio connects with ioengine=nbd.
#
# Jobs (each BENCH_SECONDS, default 10, after a 1 s ramp):
#   4K random write QD32, 4K random read QD32 (IOPS),
#   1M sequential write QD8, 1M sequential read QD8 (MiB/s),
#   4K random write QD1 (mean latency, usec, lower is better).
# A row listed in ROW_JOBS runs only the jobs given there.
#
# Also measured, at the start and the end: a 4 KiB TCP ping-pong on loopback
# (the floor under the replicated rows' trip to the peer) and the machine's
# load average and CPU pressure.
#
# CPU rows: mirrord-bp0 and mirrord-pair-c-bp0 are the single node and the
# pair with `[nbd] busy-poll-us = 0` on every node, so a spin waiting for the
# client's next request is not counted as work; they run the write jobs only
# (ROW_JOBS) and give the pair's CPU cost against the single node (issue 21).
# The report ends with the targets of issue 21 and how far each figure is
# from its target.
#
# Every job starts after a sync, so no job runs beside the writeback of the one
# before it.
#
# Rounds: every server runs every job BENCH_ROUNDS times (default 3), the
# server order rotated by one each round so no server always follows the same
# one; the tables give the median of the rounds, and a second table the
# spread (lowest and highest) so the run-to-run noise is visible.
#
# CPU: during each job (after fio's ramp) the servers' CPU time (utime+stime
# of every pid in PIDS, all threads) and the machine's busy time (/proc/stat)
# are sampled; the report gives CPU per operation for the server (each
# process) and for fio, the whole machine's busy CPU per operation less
# fio's own (loopback softirq work is charged to whichever process happens
# to be running, so per-process figures alone can mislead; the machine
# figure also counts other jobs on the machine), and how busy the CPUs were. A row whose CPUs are saturated is CPU-bound:
# its throughput is the CPU count divided by the CPU spent per operation.
#
# Output: a table on stdout and in target/bench/results.md; fio JSON per
# server, job and round in target/bench/raw/SERVER/JOB.rN.json, and the CPU
# samples in JOB.rN.cpu.
#
# Environment:
#   BENCH_SECONDS  seconds per job (10)
#   BENCH_ROUNDS   rounds (3)
#   BENCH_SIZE     image size, fio size syntax (1G)
#   BENCH_SERVERS  which rows, in order ("file mirrord qemu-nbd nbdkit nbd-server")
#   BENCH_JOBS     only these jobs (names as in JOBS below; default: all)
#   BENCH_OUT      output dir (target/bench)
#   MIRRORD_BIN / MIRRORCTL_BIN   binaries (target/release/...)
#
# Adding a row: write start_server_NAME (dashes become underscores) that
# starts the server(s) for "$IMG", appends every pid to PIDS and sets URI
# (or FIO_TARGET), then add NAME to ROLE below and to BENCH_SERVERS.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ME=bench
# shellcheck source=vm-images/lib/host.sh
. "$ROOT/vm-images/lib/host.sh"
JOB_SECONDS=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE=${BENCH_SIZE:-1G}
SERVERS=${BENCH_SERVERS:-"file mirrord mirrord-bp0 mirrord-pair-c mirrord-pair-c-bp0 mirrord-pair-tls qemu-nbd nbdkit nbd-server"}
OUT=${BENCH_OUT:-$ROOT/target/bench}
MIRRORD=${MIRRORD_BIN:-$ROOT/target/release/mirrord}
MIRRORCTL=${MIRRORCTL_BIN:-$ROOT/target/release/mirrorctl}
PY=/usr/bin/python3

# ceiling: not NBD; subject: ours (gets ratio rows); reference: others;
# variant: ours with other settings, for the CPU and target tables only.
declare -A ROLE=(
    [file]=ceiling
    [mirrord]=subject
    [mirrord-bp0]=variant
    [mirrord-pair-c-bp0]=variant
    [mirrord-pair-c]=subject
    [mirrord-pair-tls]=subject
    [qemu-nbd]=reference
    [nbdkit]=reference
    [nbd-server]=reference
)

# name -> fio arguments
declare -A JOBS=(
    [randwrite-4k-qd32]="--rw=randwrite --bs=4k --iodepth=32"
    [randread-4k-qd32]="--rw=randread --bs=4k --iodepth=32"
    [seqwrite-1m-qd8]="--rw=write --bs=1m --iodepth=8"
    [seqread-1m-qd8]="--rw=read --bs=1m --iodepth=8"
    [lat-4k-qd1]="--rw=randwrite --bs=4k --iodepth=1"
)
JOB_ORDER="seqwrite-1m-qd8 randwrite-4k-qd32 lat-4k-qd1 seqread-1m-qd8 randread-4k-qd32"
# BENCH_JOBS: run only these jobs (an A/B of a few rows); the report reads n/a elsewhere.
ONLY_JOBS=${BENCH_JOBS:-}
# Rows that run only some of the jobs (the busy-poll-off CPU rows: writes only).
declare -A ROW_JOBS=(
    [mirrord-bp0]="seqwrite-1m-qd8 randwrite-4k-qd32"
    [mirrord-pair-c-bp0]="seqwrite-1m-qd8 randwrite-4k-qd32"
)

WORK=$OUT/work
RAW=$OUT/raw
RESULTS=$OUT/results.md
IMG=$WORK/disk.img
PIDS=()
URI=""
FIO_TARGET=()

log() { echo "bench: $*" >&2; }

stop_servers() {
    local pid i
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 200; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ignored SIGTERM for 20 s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    PIDS=()
}
trap stop_servers EXIT

# Waits (bounded) until $URI answers an NBD handshake.
wait_nbd() {
    local i pid
    for ((i = 0; i < 300; i++)); do
        if nbdinfo --size "$URI" >/dev/null 2>&1; then
            return 0
        fi
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || { log "server pid $pid exited"; return 1; }
        done
        sleep 0.1
    done
    log "no NBD handshake on $URI within 30 s"
    return 1
}

start_server_file() {
    # psync on the page cache is the fastest way to this file here (io_uring
    # and libaio are slower for buffered I/O); invalidate=0 keeps the cache
    # warm like the servers see it. iodepth means nothing to psync.
    FIO_TARGET=(--ioengine=psync --invalidate=0 --filename="$IMG")
}

start_server_mirrord() {
    start_single mirrord ""
}

# The single node with `[nbd] busy-poll-us = 0`: its CPU is work, not spin.
start_server_mirrord_bp0() {
    start_single mirrord-bp0 busy-poll-us=0
}

# One mirrord standalone; $1 is the row (for its ERROR file), $2 extra [nbd] keys.
start_single() {
    local row=$1 nbd_keys=$2
    [ -x "$MIRRORD" ] || { echo "$MIRRORD not built (make build)" >"$RAW/$row/ERROR"; return 1; }
    local dir=$WORK/mirrord
    rm -rf "$dir"
    mkdir -p "$dir/run"
    echo "bench-secret" >"$dir/secret"
    chmod 600 "$dir/secret"
    {
        toml_table resource name=r0 shared-secret-file="$dir/secret" run-dir="$dir/run"
        # shellcheck disable=SC2086 # one K=V word per key
        toml_table nbd listen="unix:$dir/run/r0.nbd" $nbd_keys
        toml_node bench "127.0.0.1:$(free_port)" "$IMG" "$dir/r0.md"
    } >"$dir/r0.toml"
    if ! "$MIRRORCTL" --config "$dir/r0.toml" --node bench create-md --force >"$dir/create-md.log" 2>&1; then
        { echo "create-md failed:"; tail -5 "$dir/create-md.log"; } >"$RAW/$row/ERROR"
        return 1
    fi
    "$MIRRORD" --config "$dir/r0.toml" --node bench >"$dir/mirrord.log" 2>&1 &
    PIDS+=($!)
    URI="nbd+unix:///r0?socket=$dir/run/r0.nbd"
}

# Two mirrord nodes on loopback, protocol C: fio writes through node a, and
# every write is on both disks before its ack (b's disk is a copy of the image).
start_server_mirrord_pair_c() {
    start_pair mirrord-pair-c ""
}

# The same pair with `[nbd] busy-poll-us = 0` on both nodes (the CPU row).
start_server_mirrord_pair_c_bp0() {
    start_pair mirrord-pair-c-bp0 "" busy-poll-us=0
}

# The same pair with [tls] on the peer link (certificates from a throwaway CA).
start_server_mirrord_pair_tls() {
    command -v openssl >/dev/null || { echo "openssl missing" >"$RAW/mirrord-pair-tls/ERROR"; return 1; }
    start_pair mirrord-pair-tls tls
}

# Two mirrord on loopback, protocol C, node a primary after the initial sync; with TLS
# if $2 is "tls". $1 is the row (for its ERROR file); $3 extra [nbd] keys.
start_pair() {
    local row=$1 tls=$2 nbd_keys=${3:-} dir=$WORK/pair n
    [ -x "$MIRRORD" ] || { echo "$MIRRORD not built (make build)" >"$RAW/$row/ERROR"; return 1; }
    rm -rf "$dir"
    mkdir -p "$dir/run-a" "$dir/run-b"
    echo "bench-secret" >"$dir/secret"
    chmod 600 "$dir/secret"
    cp --sparse=always "$IMG" "$dir/b.img"
    local -A certs=([a]="" [b]="")
    if [ "$tls" = tls ]; then
        if ! make_certs "$dir" >"$dir/certs.log" 2>&1; then
            echo "certificates: $(tail -n 3 "$dir/certs.log")" >"$RAW/$row/ERROR"
            return 1
        fi
        for n in a b; do
            certs[$n]="tls-cert=$dir/$n.crt tls-key=$dir/$n.key"
        done
    fi
    {
        toml_table resource name=r0 protocol=C shared-secret-file="$dir/secret"
        toml_table sync rate=4GiB
        [ "$tls" = tls ] && toml_table tls ca="$dir/ca.pem"
        # shellcheck disable=SC2086 # one K=V word per key
        [ -n "$nbd_keys" ] && toml_table nbd $nbd_keys
        # shellcheck disable=SC2086 # one K=V word per key
        toml_node a "127.0.0.1:$(free_port)" "$IMG" "$dir/a.md" run-dir="$dir/run-a" ${certs[a]}
        # shellcheck disable=SC2086
        toml_node b "127.0.0.1:$(free_port)" "$dir/b.img" "$dir/b.md" run-dir="$dir/run-b" ${certs[b]}
    } >"$dir/r0.toml"
    for n in a b; do
        if ! "$MIRRORCTL" --config "$dir/r0.toml" --node "$n" create-md --force >"$dir/create-md-$n.log" 2>&1; then
            echo "create-md $n failed" >"$RAW/$row/ERROR"
            return 1
        fi
        "$MIRRORD" --config "$dir/r0.toml" --node "$n" >"$dir/mirrord-$n.log" 2>&1 &
        PIDS+=($!)
    done
    sleep 1
    if ! "$MIRRORCTL" --config "$dir/r0.toml" --node a primary --force >"$dir/primary.log" 2>&1 ||
        ! "$MIRRORCTL" --config "$dir/r0.toml" --node a wait-sync --timeout 120 >"$dir/sync.log" 2>&1; then
        echo "initial sync did not finish" >"$RAW/$row/ERROR"
        return 1
    fi
    URI="nbd+unix:///r0?socket=$dir/run-a/r0.nbd"
}

# A CA and a certificate for nodes a and b (DNS name = node name) in $1.
make_certs() {
    local dir=$1 n
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench-ca -keyout "$dir/ca.key" -out "$dir/ca.pem"
    for n in a b; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$n" \
            -addext "subjectAltName=DNS:$n" -keyout "$dir/$n.key" -out "$dir/$n.csr"
        openssl x509 -req -in "$dir/$n.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -days 2 \
            -copy_extensions copy -out "$dir/$n.crt"
    done
}

start_server_qemu_nbd() {
    local sock=$WORK/qemu-nbd.sock
    rm -f "$sock"
    qemu-nbd -f raw -x r0 -k "$sock" --shared=16 --persistent --discard=unmap "$IMG" >"$WORK/qemu-nbd.log" 2>&1 &
    PIDS+=($!)
    URI="nbd+unix:///r0?socket=$sock"
}

start_server_nbdkit() {
    local sock=$WORK/nbdkit.sock
    rm -f "$sock"
    nbdkit -f -U "$sock" file "$IMG" >"$WORK/nbdkit.log" 2>&1 &
    PIDS+=($!)
    URI="nbd+unix:///r0?socket=$sock"
}

start_server_nbd_server() {
    local sock=$WORK/nbd-server.sock pidfile=$WORK/nbd-server.pid i
    rm -f "$sock" "$pidfile"
    cat >"$WORK/nbd-server.conf" <<EOF
[generic]
    unixsock = $sock
    allowlist = true
[r0]
    exportname = $IMG
    flush = true
    fua = true
    trim = true
EOF
    # nbd-server daemonizes; take its pid from the pid file.
    nbd-server -C "$WORK/nbd-server.conf" -p "$pidfile" >"$WORK/nbd-server.log" 2>&1
    for ((i = 0; i < 100; i++)); do
        [ -s "$pidfile" ] && break
        sleep 0.1
    done
    [ -s "$pidfile" ] || { echo "nbd-server wrote no pid file" >"$RAW/nbd-server/ERROR"; return 1; }
    PIDS+=("$(cat "$pidfile")")
    URI="nbd+unix:///r0?socket=$sock"
}

# The floor under a replicated write's trip to the peer: a 4 KiB TCP ping-pong
# on loopback (fio's net engine, pingpong=1), no NBD, no disk. On a VM a
# wake-up of an idle vCPU can cost tens of microseconds, and this shows it.
# $1 names the sample (start, end); fio JSON in $RAW/tcp-floor/$1.json.
tcp_floor() {
    local port secs=3 dir=$RAW/tcp-floor
    mkdir -p "$dir"
    port=$(free_port)
    fio --name=rx --ioengine=net --protocol=tcp --listen --port="$port" --rw=read --bs=4k \
        --size=100g --time_based=1 --runtime=$((secs + 3)) --pingpong=1 \
        --output-format=json --output="$dir/$1-rx.json" >/dev/null 2>&1 &
    local rx=$!
    sleep 0.5
    fio --name=tx --ioengine=net --protocol=tcp --port="$port" --hostname=127.0.0.1 --rw=write \
        --bs=4k --size=100g --time_based=1 --runtime="$secs" --pingpong=1 \
        --output-format=json --output="$dir/$1.json" >/dev/null 2>&1 ||
        log "tcp floor ($1): fio failed"
    kill "$rx" 2>/dev/null || true
    wait "$rx" 2>/dev/null || true
}

# One line on how busy the machine is (other jobs skew every number).
load_line() {
    echo "load average $(cut -d' ' -f1-3 /proc/loadavg), CPU pressure $(awk '/^some/ {print $3}' /proc/pressure/cpu 2>/dev/null || echo n/a)"
}

# utime+stime (clock ticks, all threads) of each server pid, space-separated
# in PIDS order (0 for a pid already gone); empty if there are none.
server_ticks() {
    local pid out=()
    for pid in "${PIDS[@]}"; do
        out+=("$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)")
    done
    echo "${out[*]}"
}

# Busy and total clock ticks of the whole machine: "busy total".
machine_ticks() {
    awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat
}

# $1 server, $2 job, $3 round. fio JSON in JOB.rN.json; CPU samples over the
# measured window (after the ramp) in JOB.rN.cpu as
#   "server_seconds machine_busy_fraction window_seconds machine_busy_seconds
#    [seconds per pid...]"
# (the per-pid seconds in PIDS order: node a, then b, for the pair).
run_job() {
    local server=$1 job=$2 round=$3 base=$RAW/$1/$2.r$3 fio_pid s0 s1 m0 m1 t0 t1
    # The job before may have left up to the whole image dirty; its writeback would
    # otherwise run (and take a CPU) during this job, for whichever server comes next.
    sync
    # shellcheck disable=SC2086 # JOBS values are word lists on purpose
    fio --name="$job" "${FIO_TARGET[@]}" ${JOBS[$job]} \
        --size="$SIZE" --time_based=1 --runtime="$JOB_SECONDS" --ramp_time=1 \
        --norandommap=1 --randrepeat=0 \
        --output-format=json --output="$base.json" >"$base.log" 2>&1 &
    fio_pid=$!
    sleep 1
    s0=$(server_ticks)
    m0=$(machine_ticks)
    t0=$(date +%s.%N)
    wait "$fio_pid" || log "$server $job: fio failed (see $base.log)"
    s1=$(server_ticks)
    m1=$(machine_ticks)
    t1=$(date +%s.%N)
    awk -v s0="$s0" -v s1="$s1" -v m0="$m0" -v m1="$m1" -v t0="$t0" -v t1="$t1" \
        -v hz="$(getconf CLK_TCK)" 'BEGIN {
            split(m0, a, " "); split(m1, b, " ");
            busy = (b[2] > a[2]) ? (b[1] - a[1]) / (b[2] - a[2]) : 0;
            n = split(s0, p0, " "); split(s1, p1, " "); total = 0; each = "";
            for (i = 1; i <= n; i++) {
                d = (p1[i] - p0[i]) / hz; total += d; each = each sprintf(" %.3f", d) }
            printf "%.3f %.3f %.3f %.3f%s\n", total, busy, t1 - t0, (b[1] - a[1]) / hz, each }' >"$base.cpu"
}

main() {
    command -v fio >/dev/null || { log "fio missing: run tools/install-deps.sh"; exit 1; }
    mkdir -p "$WORK"
    rm -rf "$RAW"
    mkdir -p "$RAW"

    log "prefilling $IMG ($SIZE) so reads hit allocated data"
    rm -f "$IMG"
    fio --name=prefill --ioengine=io_uring --filename="$IMG" --rw=write --bs=1m --iodepth=8 \
        --size="$SIZE" --output="$WORK/prefill.log" >/dev/null
    sync

    local server fn job roles=() load_start load_end
    load_start=$(load_line)
    log "machine: $load_start"
    tcp_floor start
    if [[ " $SERVERS " == *" mirrord-pair-c-bp0 "* ]]; then
        # The floor under the pair's CPU per MiB: the kernel's own cost of the transfer.
        log "loopback floor (tools/bench/loopback_floor.py)"
        "$PY" "$ROOT/tools/bench/loopback_floor.py" "$WORK" 1024 3 >"$RAW/loopback-floor.md" 2>&1 ||
            log "loopback floor: failed (see $RAW/loopback-floor.md)"
    fi

    local order=() round i n
    read -r -a order <<<"$SERVERS"
    n=${#order[@]}
    for server in "${order[@]}"; do
        [ -n "${ROLE[$server]:-}" ] || { log "unknown server $server (add it to ROLE)"; exit 2; }
        roles+=("$server:${ROLE[$server]}")
        mkdir -p "$RAW/$server"
    done
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < n; i++)); do
            server=${order[$(((i + round - 1) % n))]}
            fn="start_server_${server//-/_}"
            URI=""
            FIO_TARGET=()
            sync
            log "== round $round/$ROUNDS: $server"
            if ! "$fn"; then
                log "$server: could not start; its row will read n/a"
                [ -e "$RAW/$server/ERROR" ] || echo "did not start" >"$RAW/$server/ERROR"
                stop_servers
                continue
            fi
            if [ -n "$URI" ]; then
                if ! wait_nbd; then
                    echo "no NBD handshake within 30 s" >"$RAW/$server/ERROR"
                    stop_servers
                    continue
                fi
                FIO_TARGET=(--ioengine=nbd --uri="$URI")
            fi
            for job in ${ROW_JOBS[$server]:-$JOB_ORDER}; do
                if [ -n "$ONLY_JOBS" ] && [[ " $ONLY_JOBS " != *" $job "* ]]; then
                    continue
                fi
                log "$server: $job (${JOB_SECONDS}s)"
                run_job "$server" "$job" "$round"
            done
            stop_servers
        done
    done

    tcp_floor end
    load_end=$(load_line)
    {
        echo "# nbd-mirror benchmark"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs; $(uname -sr); image $SIZE (prefilled);"
        echo "$ROUNDS rounds (server order rotated each round; medians below), $JOB_SECONDS s per job after 1 s ramp; fio $(fio --version) ioengine=nbd (libnbd) over unix sockets;"
        echo "the ceiling row is fio psync on the plain file (page cache). All servers use the host page cache"
        echo "(mirrord direct-io off, qemu-nbd default writeback cache, nbdkit file default, nbd-server buffered)."
        echo "Servers: $(qemu-nbd --version | head -1); nbdkit $(nbdkit --version | awk '{print $2}');"
        echo "nbd-server $(nbd-server -V 2>&1 | awk '/version/ {print $NF}'); mirrord from $MIRRORD."
        echo "Machine at the start: $load_start; at the end: $load_end."
        echo
    } >"$RESULTS"
    "$PY" "$ROOT/tools/bench/fio_report.py" "$RAW" "$RESULTS" "$ROUNDS" "${roles[@]}"
    log "results in $RESULTS, fio JSON in $RAW"
}

main "$@"
