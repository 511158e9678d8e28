#!/usr/bin/env bash
# Builds the Debian package from the release binaries (make build) with
# dpkg-deb from a staged tree: no cargo-deb to install in every fresh CI run,
# and every path is visible here.
#
#   tools/build-deb.sh       -> target/deb/nbd-mirror_VERSION_ARCH.deb (path printed last)
#
# BIN (default target/release) holds mirrord and mirrorctl (MIRRORD_BIN,
# MIRRORCTL_BIN name them one by one, as for the tests and the VM image);
# DEB_OUT (default target/deb) is where the package goes. The layout follows docs/OPERATIONS.md:
#   /usr/sbin/mirrord, /usr/sbin/mirrorctl
#   /lib/systemd/system/mirrord@.service, nbd-attach@.service
#   /etc/nbd-mirror/                 configs, secrets (the operator's)
#   /usr/lib/nbd-mirror/             handlers (the operator's; empty)
#   /var/lib/nbd-mirror/             the unit's StateDirectory
#   /usr/share/man/man8/mirrord.8.gz, mirrorctl.8.gz, man5/nbd-mirror.toml.5.gz
#   /usr/share/bash-completion/completions/, zsh/vendor-completions/, fish/vendor_completions.d/
#   /usr/share/doc/nbd-mirror/       README, OPERATIONS, INTERFACE, examples/r0.toml
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ME=build-deb
# shellcheck source=vm-images/lib/host.sh
. vm-images/lib/host.sh
umask 022

BIN=${BIN:-target/release}
MIRRORD=${MIRRORD_BIN:-$BIN/mirrord}
MIRRORCTL=${MIRRORCTL_BIN:-$BIN/mirrorctl}
OUT=${DEB_OUT:-target/deb}
PKG=nbd-mirror
MAINTAINER="nbd-mirror developers <nbd-mirror@example.org>"

for tool in "$MIRRORD" "$MIRRORCTL"; do
    [ -x "$tool" ] || die "$tool missing (run make build)"
done
for cmd in dpkg-deb dpkg-shlibdeps strip gzip; do
    command -v "$cmd" >/dev/null || die "$cmd missing (apt-get install dpkg-dev binutils)"
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || die "no version in Cargo.toml"
arch=$(dpkg --print-architecture)
# Dates and the changelog line come from the commit, so two builds of one
# commit give the same files.
if commit=$(git rev-parse --short=12 HEAD 2>/dev/null); then
    epoch=$(git log -1 --format=%ct HEAD)
else
    commit=unknown
    epoch=$(date +%s)
fi
export SOURCE_DATE_EPOCH=$epoch

stage=$OUT/stage
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"

d() { install -d -m 0755 "$stage/$1"; }
f() { install -D -m "$1" "$2" "$stage/$3"; }
gz() { gzip -9 -n -c "$1" > "$stage/$2"; chmod 0644 "$stage/$2"; }

# Binaries, stripped (the release profile keeps line tables for backtraces).
f 0755 "$MIRRORD" usr/sbin/mirrord
f 0755 "$MIRRORCTL" usr/sbin/mirrorctl
for b in mirrord mirrorctl; do
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/sbin/$b"
done

for u in tools/systemd/*.service; do
    f 0644 "$u" "lib/systemd/system/$(basename "$u")"
done

d etc/nbd-mirror
d usr/lib/nbd-mirror
d var/lib/nbd-mirror

d usr/share/man/man8
d usr/share/man/man5
gz man/mirrord.8 usr/share/man/man8/mirrord.8.gz
gz man/mirrorctl.8 usr/share/man/man8/mirrorctl.8.gz
gz man/nbd-mirror.toml.5 usr/share/man/man5/nbd-mirror.toml.5.gz

for b in mirrord mirrorctl; do
    f 0644 "completions/$b.bash" "usr/share/bash-completion/completions/$b"
    f 0644 "completions/_$b" "usr/share/zsh/vendor-completions/_$b"
    f 0644 "completions/$b.fish" "usr/share/fish/vendor_completions.d/$b.fish"
done

doc=usr/share/doc/$PKG
f 0644 packaging/deb/copyright "$doc/copyright"
f 0644 README.md "$doc/README.md"
f 0644 docs/OPERATIONS.md "$doc/OPERATIONS.md"
f 0644 docs/INTERFACE.md "$doc/INTERFACE.md"
f 0644 examples/r0.toml "$doc/examples/r0.toml"
{
    echo "$PKG ($version) unstable; urgency=medium"
    echo
    echo "  * Built from the nbd-mirror tree at commit $commit."
    echo
    echo " -- $MAINTAINER  $(date -u -R -d "@$epoch")"
} > "$OUT/changelog"
gz "$OUT/changelog" "$doc/changelog.gz"

f 0755 packaging/deb/postinst DEBIAN/postinst
f 0755 packaging/deb/postrm DEBIAN/postrm

# Depends from the binaries' shared libraries (dpkg-shlibdeps wants a
# debian/control beside it).
shlib_dir=$(mktemp -d)
trap 'rm -rf "$shlib_dir"' EXIT
mkdir -p "$shlib_dir/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$PKG" "$PKG" > "$shlib_dir/debian/control"
stage_abs=$(cd "$stage" && pwd)
depends=$(cd "$shlib_dir" && dpkg-shlibdeps -O "$stage_abs/usr/sbin/mirrord" "$stage_abs/usr/sbin/mirrorctl" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || die "dpkg-shlibdeps found no dependencies"

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@DEPENDS@/$depends/" -e "s/@MAINTAINER@/$MAINTAINER/" \
    packaging/deb/control.in > "$stage/DEBIAN/control"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
    xargs -0 md5sum) > "$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/md5sums"

# Every file's time is the commit's, for a reproducible package.
find "$stage" -exec touch -h -d "@$epoch" {} +
deb=$OUT/${PKG}_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$ME: $(dpkg-deb -f "$deb" Package Version Architecture Depends | tr '\n' ' ')"
echo "$deb"
