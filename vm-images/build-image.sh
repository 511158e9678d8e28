#!/bin/bash
# Build the guest root image for the VM tests (User-Mode Linux and QEMU).
#
#   vm-images/build-image.sh            build (or reuse) the image; print its path
#
# Two cached layers under $VM_CACHE (default: <repo>/.cache/vm):
#   base-<key>.tar   Debian bookworm root from mmdebstrap (minbase + packages.txt +
#                    linux-image-amd64), docs and locales stripped, UML kernel
#                    modules added. Next to it base-<key>.vmlinuz and
#                    base-<key>.initrd: Debian's kernel and a small initramfs
#                    (initramfs-tools, MODULES=list: virtio, 9p, ext4) taken out
#                    of the root for the QEMU backend, so the host needs no
#                    kernel package. Key: this script's base functions,
#                    packages.txt, the host's apt sources, the user-mode-linux
#                    package version.       (~4 min on a busy 2-core host)
#   image-<key>.img  ext4 image made with `mkfs.ext4 -d` (no loop mounts) from the
#                    base plus the nbd-mirror .deb (tools/build-deb.sh, installed
#                    with the guest's dpkg) and the guest helpers in
#                    vm-images/guest. Key: base key + the .deb + those files. (~10 s)
#   image-<key>.vmlinuz, image-<key>.initrd: hard links to the base's kernel
#                    files, so run-guest.sh finds them next to the image.
# A layer is rebuilt only when its key changes. Old layers are pruned.
#
# Environment:
#   VM_CACHE        cache directory
#   MIRRORD_BIN     mirrord to package (default: target/release, else target/debug)
#   MIRRORCTL_BIN   mirrorctl to package (same default)
#   MIRROR_DEB      a prebuilt nbd-mirror .deb to install instead
#   VM_NO_BINARIES  =1: build without the package, only the units (stand-in tests)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${VM_CACHE:-$repo/.cache/vm}
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=/etc/apt/sources.list

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- host tools -------------------------------------------------------------
ensure_host_tools() {
    local missing=()
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v linux.uml >/dev/null || missing+=(user-mode-linux)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    command -v sha256sum >/dev/null || missing+=(coreutils)
    # tools/build-deb.sh
    command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
    command -v strip >/dev/null || missing+=(binutils)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
        { timeout 300 apt-get update >&2 &&
          timeout 600 apt-get install -y --no-install-recommends "${missing[@]}" >&2; } ||
        die "could not install ${missing[*]}"
}

uml_kernel_release() {
    local d
    d=$(find /usr/lib/uml/modules -mindepth 1 -maxdepth 1 -type d | sort | tail -n 1)
    [ -n "$d" ] || die "no UML modules under /usr/lib/uml/modules"
    basename "$d"
}

# Debian's own kernel for the QEMU backend (its postinst builds the initramfs).
KERNEL_PACKAGES=linux-image-amd64,initramfs-tools

packages() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/packages.txt" | grep -v '^$' | paste -sd, -; }

find_bin() {
    local name=$1 explicit=$2
    if [ -n "$explicit" ]; then
        [ -x "$explicit" ] || die "$name: $explicit is not an executable"
        echo "$explicit"; return
    fi
    local p
    for p in "$repo/target/release/$name" "$repo/target/debug/$name"; do
        [ -x "$p" ] && { echo "$p"; return; }
    done
    die "$name not built (cargo build --release --bins), or set VM_NO_BINARIES=1"
}

# build_deb: the Debian package (tools/build-deb.sh) from the chosen binaries,
# or $MIRROR_DEB when set; prints its path. The package goes to
# $cache/deb, so a VM run leaves target/deb alone.
build_deb() {
    if [ -n "${MIRROR_DEB:-}" ]; then
        [ -f "$MIRROR_DEB" ] || die "MIRROR_DEB=$MIRROR_DEB is not a file"
        echo "$MIRROR_DEB"; return
    fi
    local mirrord mirrorctl out deb
    mirrord=$(find_bin mirrord "${MIRRORD_BIN:-}")
    mirrorctl=$(find_bin mirrorctl "${MIRRORCTL_BIN:-}")
    out=$(MIRRORD_BIN=$mirrord MIRRORCTL_BIN=$mirrorctl DEB_OUT="$cache/deb" \
        "$repo/tools/build-deb.sh" </dev/null) || die "tools/build-deb.sh failed"
    deb=$(printf '%s\n' "$out" | tail -n 1)
    [ -f "$deb" ] || die "tools/build-deb.sh printed no package path (got: $out)"
    log "package $deb ($(printf '%s\n' "$out" | head -n 1))"
    echo "$deb"
}

# --- base layer ---------------------------------------------------------------
# Modules the QEMU guest's initramfs loads before it mounts the root (Debian's
# 6.1 kernel builds these as modules): virtio bus, disks, network, the 9p host
# share, ext4.
INITRD_MODULES="virtio_pci virtio_blk virtio_net virtio_console 9pnet_virtio 9p ext4 crc32c_generic"

# Written before the kernel package is installed, so its postinst builds the
# small initramfs right away: only the listed modules (MODULES=list), no
# resume device, and nbd-client's hooks diverted (they add the nbd module,
# nbd-client and every network driver to the initrd; the guests attach NBD
# devices after boot). The diverted names end in "~vm": mkinitramfs skips
# hook files whose names have characters other than letters, digits, ._-.
initramfs_setup_hook() {
    local root=$1 f
    mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
    printf 'MODULES=list\nRESUME=none\nCOMPRESS=zstd\n' >"$root/etc/initramfs-tools/conf.d/vm.conf"
    printf '%s\n' $INITRD_MODULES >"$root/usr/share/initramfs-tools/modules.d/vm"
    for f in hooks/nbd hooks/nbd-client scripts/local-top/nbd; do
        chroot "$root" dpkg-divert --quiet --local --rename \
            --divert "/usr/share/initramfs-tools/$f~vm" --add "/usr/share/initramfs-tools/$f"
    done
}

# Debian's kernel modules, less the hardware a virtio guest never has (GPU,
# sound, media, wireless, USB, real NICs...): about 300 MB less.
trim_kernel_modules() {
    local root=$1 d kver
    for d in "$root"/lib/modules/*/kernel; do
        kver=$(basename "$(dirname "$d")")
        rm -rf "$d/sound" "$d/net/wireless" "$d/net/mac80211" "$d/net/bluetooth"
        find "$d/drivers" -mindepth 1 -maxdepth 1 \
            ! -name block ! -name md ! -name virtio ! -name char ! -name net -exec rm -rf {} +
        find "$d/drivers/net" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
        chroot "$root" depmod -a "$kver"
    done
}

build_base() {
    local out=$1 kver=$2 t0 tmp stem
    t0=$(now)
    tmp="$out.tmp.$$"
    stem=${out%.tar}
    log "mmdebstrap bookworm minbase + $(packages),$KERNEL_PACKAGES"
    # --dpkgopt path-exclude keeps docs, man pages and locales out of the root.
    timeout 1200 mmdebstrap --mode=root --variant=minbase --format=tar \
        --include="$(packages),$KERNEL_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --essential-hook="$(declare -f initramfs_setup_hook); INITRD_MODULES='$INITRD_MODULES'; initramfs_setup_hook \"\$1\"" \
        --customize-hook="$(declare -f trim_kernel_modules); trim_kernel_modules \"\$1\"" \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/debconf/*-old' \
        --customize-hook="mkdir -p \"\$1\"/lib/modules && cp -a /usr/lib/uml/modules/$kver \"\$1\"/lib/modules/" \
        bookworm "$tmp" "$sources" >&2 || { rm -f "$tmp"; die "mmdebstrap failed"; }
    # Debian's kernel and its initramfs, for the QEMU backend.
    extract_kernel "$tmp" "$stem" || { rm -f "$tmp"; die "no kernel or initrd in the base root"; }
    mv "$tmp" "$out"
    log "base root built in $(elapsed "$t0") s ($(du -h "$out" | cut -f1); kernel $(du -h "$stem.vmlinuz" | cut -f1), initrd $(du -h "$stem.initrd" | cut -f1))"
}

# extract_kernel TAR STEM: boot/vmlinuz-* and boot/initrd.img-* out of the
# root tar into STEM.vmlinuz and STEM.initrd.
extract_kernel() {
    local tar=$1 stem=$2 dir v i
    dir=$(mktemp -d "$cache/boot.XXXXXX")
    tar -C "$dir" -xf "$tar" --wildcards './boot/vmlinuz-*' './boot/initrd.img-*' || { rm -rf "$dir"; return 1; }
    v=$(find "$dir/boot" -name 'vmlinuz-*' | sort | tail -n 1)
    i=$(find "$dir/boot" -name 'initrd.img-*' | sort | tail -n 1)
    [ -n "$v" ] && [ -n "$i" ] || { rm -rf "$dir"; return 1; }
    mv "$v" "$stem.vmlinuz"
    mv "$i" "$stem.initrd"
    rm -rf "$dir"
}

# --- image layer --------------------------------------------------------------
# Guest configuration that does not depend on the packages: console, mounts,
# units to mask (nothing periodic or network-waiting in a test guest).
configure_root() {
    local root=$1
    echo vmguest >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 vmguest\n' >"$root/etc/hosts"
    # /dev/root: UML's ubda and QEMU's vda alike (no udev link needed).
    printf '/dev/root / ext4 rw,noatime 0 0\n' >"$root/etc/fstab"
    : >"$root/etc/machine-id"
    passwd -R "$root" -d root >/dev/null 2>&1 || sed -i 's/^root:[^:]*:/root::/' "$root/etc/shadow"
    mkdir -p "$root/mnt/host" "$root/etc/nbd-mirror" "$root/var/lib/nbd-mirror"
    local u
    for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
             fstrim.timer dpkg-db-backup.timer systemd-timesyncd.service \
             getty.target getty-static.service getty@tty1.service serial-getty@ttyS0.service \
             systemd-networkd-wait-online.service console-getty.service \
             o2cb.service ocfs2.service nbd.service \
             systemd-tmpfiles-clean.timer systemd-journal-flush.service systemd-update-utmp.service \
             systemd-update-utmp-runlevel.service ldconfig.service systemd-hwdb-update.service \
             systemd-random-seed.service systemd-pstore.service systemd-firstboot.service \
             systemd-machine-id-commit.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
             dev-hugepages.mount dev-mqueue.mount sys-fs-fuse-connections.mount sys-kernel-tracing.mount \
             modprobe@drm.service modprobe@efi_pstore.service modprobe@fuse.service \
             systemd-pcrphase.service systemd-pcrphase-sysinit.service systemd-sysusers.service \
             systemd-udev-trigger.service systemd-user-sessions.service; do
        ln -sf /dev/null "$root/etc/systemd/system/$u"
    done
    # Generators run on every boot and reload; a test guest needs only fstab's.
    mkdir -p "$root/etc/systemd/system-generators"
    for u in systemd-cryptsetup-generator systemd-getty-generator systemd-gpt-auto-generator \
             systemd-hibernate-resume-generator systemd-integritysetup-generator \
             systemd-rc-local-generator systemd-system-update-generator systemd-sysv-generator \
             systemd-veritysetup-generator; do
        ln -sf /dev/null "$root/etc/systemd/system-generators/$u"
    done
    # The journal stays in memory; the test copies what it needs to the share.
    mkdir -p "$root/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\nForwardToConsole=no\n' \
        >"$root/etc/systemd/journald.conf.d/vm.conf"
}

install_payload() {
    local root=$1
    install -m 0755 "$here/guest/vm-init" "$root/usr/local/sbin/vm-init"
    install -m 0755 "$here/guest/vm-run" "$root/usr/local/sbin/vm-run"
    install -m 0644 "$here/guest/vm-test.service" "$root/etc/systemd/system/vm-test.service"
    mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
    ln -sf /etc/systemd/system/vm-test.service "$root/etc/systemd/system/multi-user.target.wants/vm-test.service"
    if [ -n "$DEB" ]; then
        # The package as users get it, installed by the guest's own dpkg
        # (registered, maintainer scripts run; postinst skips daemon-reload
        # without a running systemd): binaries in /usr/sbin, units in
        # /lib/systemd/system. The base's path-exclude rules keep its docs
        # and man pages out, as for every other package.
        install -m 0644 "$DEB" "$root/tmp/nbd-mirror.deb"
        chroot "$root" dpkg -i /tmp/nbd-mirror.deb >&2 || die "dpkg -i $DEB in the guest root failed"
        rm -f "$root/tmp/nbd-mirror.deb"
        if [ ! -x "$root/usr/sbin/mirrord" ] || [ ! -f "$root/lib/systemd/system/mirrord@.service" ]; then
            die "$DEB did not install /usr/sbin/mirrord and mirrord@.service"
        fi
    else
        # Stand-in runs (VM_NO_BINARIES=1): no package, only the units, where
        # the package would put them.
        local f
        for f in "$repo"/tools/systemd/*.service; do
            install -m 0644 "$f" "$root/lib/systemd/system/$(basename "$f")"
        done
    fi
}

build_image() {
    local base=$1 out=$2 t0 root tmp size_mb
    t0=$(now)
    root=$(mktemp -d "$cache/root.XXXXXX")
    tmp="$out.tmp.$$"
    # shellcheck disable=SC2064
    trap "rm -rf '$root' '$tmp'" EXIT
    tar -C "$root" --numeric-owner -xpf "$base"
    # The kernel and initramfs are used from outside the image (next to it).
    rm -rf "${root:?}"/boot/*
    configure_root "$root"
    install_payload "$root"
    # Used space plus 256 MiB of room for logs and test files (runs use a COW
    # overlay, so the image itself is never written).
    size_mb=$(( $(du -sm "$root" | cut -f1) + 256 ))
    mkfs.ext4 -q -F -L vmroot -d "$root" "$tmp" "${size_mb}M" >&2 || die "mkfs.ext4 -d failed"
    ln -f "${base%.tar}.vmlinuz" "${out%.img}.vmlinuz"
    ln -f "${base%.tar}.initrd" "${out%.img}.initrd"
    mv "$tmp" "$out"
    rm -rf "$root"
    trap - EXIT
    log "image built in $(elapsed "$t0") s (${size_mb} MiB)"
}

# prune_layers KIND EXT CURRENT KEEP: delete all but CURRENT and the KEEP
# newest other KIND-*EXT files, with their .vmlinuz/.initrd.
prune_layers() {
    local kind=$1 ext=$2 current=$3 keep=$4 f
    find "$cache" -maxdepth 1 -name "$kind-*$ext" ! -name "$(basename "$current")" -printf '%T@ %p\n' |
        sort -rn | tail -n +$((keep + 1)) | cut -d' ' -f2- |
        while read -r f; do rm -f "$f" "${f%"$ext"}.vmlinuz" "${f%"$ext"}.initrd"; done
}

main() {
    local t0 kver base_key base image_key image
    t0=$(now)
    ensure_host_tools
    mkdir -p "$cache"
    kver=$(uml_kernel_release)
    # The base key covers the code that builds the base, not the whole script.
    base_key=$( { declare -f build_base packages initramfs_setup_hook trim_kernel_modules extract_kernel;
                  echo "$KERNEL_PACKAGES $INITRD_MODULES"; cat "$here/packages.txt" "$sources";
                  dpkg-query -W -f='${Version}\n' user-mode-linux; echo "$kver"; } |
                sha256sum | cut -c1-16)
    base="$cache/base-$base_key.tar"
    if [ -f "$base" ] && [ -f "${base%.tar}.vmlinuz" ] && [ -f "${base%.tar}.initrd" ]; then
        log "base root cached: $base"
    else
        build_base "$base" "$kver"
    fi

    DEB=
    if [ "${VM_NO_BINARIES:-0}" != 1 ]; then
        DEB=$(build_deb)
    fi
    # With the package, its hash covers the binaries and the units; without
    # it (stand-in), the units are hashed directly.
    image_key=$( { echo "$base_key"; echo "nobin=${VM_NO_BINARIES:-0}";
                   declare -f configure_root install_payload build_image;
                   cat "$here"/guest/*;
                   if [ -n "$DEB" ]; then cat "$DEB"; else cat "$repo"/tools/systemd/*.service; fi; } |
                 sha256sum | cut -c1-16)
    image="$cache/image-$image_key.img"
    if [ -f "$image" ] && [ -f "${image%.img}.vmlinuz" ] && [ -f "${image%.img}.initrd" ]; then
        log "image cached: $image"
    else
        build_image "$base" "$image"
    fi

    # Keep the current layers and at most the two newest others of each kind.
    # (A layer's kernel files go with it.)
    prune_layers image .img "$image" 2
    prune_layers base .tar "$base" 1
    ln -sfn "$(basename "$image")" "$cache/current.img"
    log "done in $(elapsed "$t0") s"
    echo "$image"
}

main "$@"
