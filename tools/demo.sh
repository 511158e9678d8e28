#!/usr/bin/env bash
# The two-node demo: two mirrord processes on this machine with file-backed
# disks on loopback, data written through NBD on node alpha, both backing
# files shown identical, both nodes' status printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ME=demo
# shellcheck source=vm-images/lib/host.sh
. vm-images/lib/host.sh

BIN=${BIN:-target/release}
MIRRORD=$BIN/mirrord
MIRRORCTL=$BIN/mirrorctl
SIZE_MIB=${DEMO_SIZE_MIB:-256}
DATA_MIB=${DEMO_DATA_MIB:-64}

for tool in "$MIRRORD" "$MIRRORCTL"; do
    [ -x "$tool" ] || { echo "demo: $tool missing (run make build)" >&2; exit 1; }
done
command -v nbdcopy >/dev/null || { echo "demo: nbdcopy missing (run tools/install-deps.sh demo, or make demo)" >&2; exit 1; }

DIR=$(mktemp -d /tmp/nbd-mirror-demo.XXXXXX)
PA=$(free_port); PB=$(free_port)
# The config is written below; with a path, gen-secret does not read it.
"$MIRRORCTL" --config "$DIR/r0.toml" gen-secret "$DIR/r0.secret"

{
    toml_table resource name=r0 protocol=C shared-secret-file="$DIR/r0.secret"
    toml_table sync rate=1GiB
    toml_node alpha "127.0.0.1:$PA" "$DIR/alpha.img" internal run-dir="$DIR/run-alpha"
    toml_node beta "127.0.0.1:$PB" "$DIR/beta.img" internal run-dir="$DIR/run-beta"
} > "$DIR/r0.toml"

step() { printf '\n==> %s\n' "$*"; }
ctl() { "$MIRRORCTL" --config "$DIR/r0.toml" --node "$@"; }

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

step "config $DIR/r0.toml: two nodes, alpha on 127.0.0.1:$PA, beta on 127.0.0.1:$PB, ${SIZE_MIB} MiB file-backed disks"
truncate -s "${SIZE_MIB}M" "$DIR/alpha.img" "$DIR/beta.img"
ctl alpha create-md
ctl beta create-md

step "starting mirrord on both nodes (logs in $DIR/*.log)"
"$MIRRORD" --config "$DIR/r0.toml" --node alpha 2> "$DIR/alpha.log" & pids+=($!)
"$MIRRORD" --config "$DIR/r0.toml" --node beta 2> "$DIR/beta.log" & pids+=($!)
for n in alpha beta; do
    for _ in $(seq 100); do [ -S "$DIR/run-$n/r0.ctl" ] && break; sleep 0.1; done
done
ctl alpha wait-sync --timeout 1 >/dev/null 2>&1 || true
sleep 1

step "initial sync: alpha's data wins (mirrorctl primary --force), full resync to beta"
ctl alpha primary --force
ctl alpha wait-sync --timeout 60

step "writing ${DATA_MIB} MiB of random data through NBD on alpha (nbdcopy)"
head -c "$((DATA_MIB << 20))" /dev/urandom > "$DIR/data.bin"
nbdcopy "$DIR/data.bin" "nbd+unix:///r0?socket=$DIR/run-alpha/r0.nbd"
ctl alpha wait-sync --timeout 30

step "comparing both backing files (data areas; the metadata at the end names each node)"
size=$(ctl alpha status --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["size_bytes"])')
a=$(head -c "$size" "$DIR/alpha.img" | sha256sum | cut -d' ' -f1)
b=$(head -c "$size" "$DIR/beta.img" | sha256sum | cut -d' ' -f1)
d=$(cat "$DIR/data.bin" <(head -c "$((size - (DATA_MIB << 20)))" /dev/zero) | sha256sum | cut -d' ' -f1)
echo "alpha data area sha256: $a"
echo "beta  data area sha256: $b"
echo "written data (+zeros)  : $d"
if [ "$a" = "$b" ] && [ "$a" = "$d" ]; then
    echo "both copies are byte-identical and hold the written data"
else
    echo "MISMATCH" >&2
    exit 1
fi

step "status"
ctl alpha status
ctl beta status
echo
ctl alpha status --json

step "stopping both daemons (SIGTERM)"
cleanup
pids=()
echo "done; files kept in $DIR"
