#!/usr/bin/env bash
# lintian on the package tools/build-deb.sh made (installs lintian with apt
# when it is missing). Fails on any error; warnings and notes are printed
# (docs/PACKAGING.md lists the ones we keep, and why).
#
#   tools/check-deb.sh [DEB]     default: the newest target/deb/nbd-mirror_*.deb
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ME=check-deb
# shellcheck source=vm-images/lib/host.sh
. vm-images/lib/host.sh

deb=${1:-$(ls -t target/deb/nbd-mirror_*.deb 2>/dev/null | head -n 1)}
[ -n "$deb" ] && [ -f "$deb" ] || die "no package: run make deb"

if ! command -v lintian >/dev/null; then
    echo "$ME: installing lintian"
    SUDO=()
    [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends lintian >/dev/null
fi

echo "$ME: lintian $deb"
# --fail-on error: warnings are reported, not fatal.
lintian --fail-on error --display-info --tag-display-limit 0 "$deb"
echo "$ME: no lintian errors"

# What an operator gets: the files of docs/OPERATIONS.md's layout, binaries
# that run, man pages that render without a warning.
x=$(mktemp -d)
trap 'rm -rf "$x"' EXIT
dpkg-deb -x "$deb" "$x"
for p in usr/sbin/mirrord usr/sbin/mirrorctl \
    lib/systemd/system/mirrord@.service lib/systemd/system/nbd-attach@.service \
    usr/share/man/man8/mirrord.8.gz usr/share/man/man8/mirrorctl.8.gz \
    usr/share/man/man5/nbd-mirror.toml.5.gz \
    usr/share/bash-completion/completions/mirrorctl usr/share/zsh/vendor-completions/_mirrorctl \
    usr/share/fish/vendor_completions.d/mirrorctl.fish \
    usr/share/doc/nbd-mirror/examples/r0.toml usr/share/doc/nbd-mirror/copyright \
    etc/nbd-mirror var/lib/nbd-mirror; do
    [ -e "$x/$p" ] || die "the package lacks /$p"
done
version=$(dpkg-deb -f "$deb" Version)
for b in mirrord mirrorctl; do
    got=$("$x/usr/sbin/$b" --version) || die "$b --version failed"
    [ "$got" = "$b $version" ] || die "$b --version says '$got', the package is $version"
done
for page in "$x"/usr/share/man/man*/*.gz; do
    warnings=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
    [ -z "$warnings" ] || die "man --warnings -l $(basename "$page"): $warnings"
done
echo "$ME: layout, binaries and man pages checked"
