#!/usr/bin/env bash
# Installs the Debian packages the integration tests, benchmarks and the demo
# drive. Idempotent and quick when everything is present: it asks dpkg first
# and runs apt-get (update + install) only for what is missing.
#
#   tools/install-deps.sh                  # tests + bench (what `make test` needs)
#   tools/install-deps.sh demo             # only what tools/demo.sh needs (`make demo`)
#   tools/install-deps.sh --check [demo]   # exit 1 listing what is missing, install nothing
set -euo pipefail

usage() {
    echo "usage: $0 [--check] [demo]" >&2
    exit 2
}

check=false
set_name=all
for arg in "$@"; do
    case $arg in
        --check) check=true ;;
        demo) set_name=demo ;;
        *) usage ;;
    esac
done

if [ "$set_name" = demo ]; then
    PACKAGES=(
        libnbd-bin    # nbdcopy writes the demo's data through NBD
        python3       # /usr/bin/python3: a free port, reading status --json
    )
else
    PACKAGES=(
        qemu-utils        # qemu-io, qemu-img, qemu-nbd
        libnbd-bin        # nbdinfo, nbdcopy, nbdsh
        python3-libnbd    # python client scripts in tests/clients (Debian's /usr/bin/python3)
        python3           # /usr/bin/python3 itself
        nbdkit            # reference server for tools/bench
        fio               # fio with the nbd engine (tests, bench)
        nbd-server        # reference server for tools/bench
        nbd-client        # kernel client (vm tests)
        procps            # pgrep/ps used by scripts
        man-db            # man --warnings -l: the pages in man/ render cleanly (tests/cli_docs.rs)
        groff-base        # groff -ww, the same check
        prometheus        # promtool and a Prometheus server for tests/metrics.rs
    )
fi

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: all ${#PACKAGES[@]} packages present ($set_name)"
    exit 0
fi

if $check; then
    echo "install-deps: missing ($set_name): ${missing[*]}" >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"

if [ "$set_name" = demo ]; then
    echo "install-deps: done"
    exit 0
fi

# nbd-server's and prometheus's packages start system services we do not want
# (tests/metrics.rs starts its own Prometheus on a free loopback port).
for unit in nbd-server prometheus; do
    if systemctl is-active --quiet "$unit" 2>/dev/null; then
        "${SUDO[@]}" systemctl stop "$unit" || true
    fi
done

/usr/bin/python3 -c 'import nbd' || {
    echo "install-deps: /usr/bin/python3 cannot import nbd after installing python3-libnbd" >&2
    exit 1
}
echo "install-deps: done"
