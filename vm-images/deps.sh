#!/bin/bash
# Host packages the VM tests need (make vm-deps; every vm-* target runs it).
# Idempotent: asks dpkg first, runs apt-get (update, then install) only for
# what is missing. --check: list what is missing, install nothing (exit 1).
set -euo pipefail

PACKAGES=(
    user-mode-linux   # linux.uml and its modules (nbd, ocfs2, o2cb, configfs)
    qemu-system-x86   # the QEMU/TCG backend where UML does not boot (AMX hosts)
    mmdebstrap        # builds the guest root from the host's apt sources
    e2fsprogs         # mkfs.ext4 -d makes the image without loop mounts
    iproute2          # ip netns / bridge / tuntap for the two-host link
    jq                # reads the guests' status JSON on the host
    procps            # ps/pgrep: process-group bookkeeping of guests
    coreutils         # timeout, numfmt, sha256sum
    util-linux        # mount helpers used while building
    dpkg-dev          # dpkg-shlibdeps: tools/build-deb.sh packages mirrord for the image
    binutils          # strip, for the same package
)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "vm-deps: all ${#PACKAGES[@]} packages present"
    exit 0
fi
if [ "${1:-}" = --check ]; then
    echo "vm-deps: missing: ${missing[*]}" >&2
    exit 1
fi
echo "vm-deps: installing ${missing[*]}"
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
export DEBIAN_FRONTEND=noninteractive
timeout 300 "${SUDO[@]}" apt-get update -qq
timeout 900 "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "vm-deps: done"
