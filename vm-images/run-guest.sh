#!/bin/bash
# Boot one guest from the image built by build-image.sh, run a test script
# from a host folder inside it, and return when it powers off. Two backends,
# one interface (see README.md, "Runner"):
#   uml   User-Mode Linux (Debian's linux.uml): ~2 s to a script; does not
#         boot on hosts whose CPU has AMX ("ptrace set fp regs failed")
#   qemu  QEMU with TCG (emulated CPU, no KVM) and Debian's own kernel and
#         initramfs from the image build: boots on every host, ~5-10x slower
# The backend is VM_BACKEND when set (uml|qemu), else UML when a probe boot
# of it works on this host (cached), else QEMU; the log says which and why.
#
#   run-guest.sh --share DIR --test NAME [options]
#
#   --share DIR       host folder mounted in the guest at /mnt/host (UML hostfs,
#                     QEMU 9p); NAME is a script in it; the guest writes DIR/rc
#                     (the script's exit status) and DIR/guest.log (its output)
#   --test NAME       script to run, relative to DIR
#   --image IMG       root image (default: build-image.sh output); QEMU takes
#                     the kernel and initrd next to it (IMG minus .img plus
#                     .vmlinuz / .initrd)
#   --mode M          systemd (default; vm-test.service runs the script, then
#                     a clean systemd poweroff) | script (tiny PID 1, fastest)
#   --disk FILE       extra block device, repeatable. The guest sees disk N
#                     (1, 2, ...) as /dev/vm/diskN (a link vm-run makes to
#                     /dev/ubdb... under UML, /dev/vdb... under QEMU)
#   --tap IF[,MAC]    network card on host tap IF, repeatable. The guest's
#                     NIC N (0, 1, ...) is vecN (UML, vec transport, gro=1) or
#                     ethN (QEMU, virtio-net); vm_nic N in lib-guest.sh names
#                     it. The tap must already exist, normally inside a
#                     network namespace the test created.
#   --mount DIR:GUESTDIR  another host folder, mounted at GUESTDIR before the
#                     test runs; repeatable
#   --mem SIZE        guest memory (default 768M)
#   --timeout S       hard limit for the whole guest run (default 300)
#   --console FILE    kernel/systemd console output (default DIR/console.log)
#   --name ID         guest name (default vm-PID); vm.name=ID is on the
#                     guest's kernel command line, so `ps` shows its processes
#   --append ARG      extra kernel command line word (e.g. vm.node=alpha), repeatable;
#                     the guest test reads it from /proc/cmdline
#   --pid-file FILE   once the guest runs, write the id of its process group
#                     there (UML: the kernel's pid, it calls setsid() and its
#                     helpers and user-space processes are in its group; QEMU:
#                     qemu's pid, started under setsid): `kill -KILL -- -ID`
#                     powers the guest off abruptly. A guest killed that way
#                     exits 137 here
#
# The guest also gets vm.backend=uml|qemu and vm.slow=FACTOR (how much slower
# than UML; lib-guest.sh's `scaled` multiplies time limits by it).
#
# Exit status: the test's own exit status from DIR/rc when the guest
# finished in time; 124 on timeout; 137 when the guest was killed
# (--pid-file user, or timeout's -k); 125 when the guest produced no rc;
# 2 on a usage or setup error.
# The root image is never written: each run writes to its own copy-on-write
# layer (UML: a COW file; QEMU: snapshot=on).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ME=run-guest DIE_STATUS=2
# shellcheck source=vm-images/lib/host.sh
. "$here/lib/host.sh"

share='' test='' image='' mode=systemd mem=768M tmo=300 console='' name="vm-$$" pidfile=''
disks=() tap_ifs=() tap_macs=() mounts=() extra=()
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || die "$1 needs a value"
    case $1 in
        --share) share=$2 ;;
        --test) test=$2 ;;
        --image) image=$2 ;;
        --mode) mode=$2 ;;
        --disk) disks+=("$2") ;;
        --tap)
            tap_ifs+=("${2%%,*}")
            if [[ $2 == *,* ]]; then tap_macs+=(",mac=${2#*,}"); else tap_macs+=(""); fi
            ;;
        --mount) mounts+=("$2") ;;
        --mem) mem=$2 ;;
        --timeout) tmo=$2 ;;
        --console) console=$2 ;;
        --name) name=$2 ;;
        --append) extra+=("$2") ;;
        --pid-file) pidfile=$2 ;;
        *) die "unknown argument $1" ;;
    esac
    shift 2
done
[ -n "$share" ] && [ -d "$share" ] || die "--share DIR (an existing folder) is required"
[ -n "$test" ] && [ -f "$share/$test" ] || die "--test NAME must name a file in $share"
share=$(cd "$share" && pwd)
[ -n "$image" ] || image=$("$here/build-image.sh")
[ -f "$image" ] || die "image $image not found"
image=$(readlink -f "$image")
console=${console:-$share/console.log}
case $mode in systemd | script) ;; *) die "--mode must be systemd or script" ;; esac
[ ${#disks[@]} -le 6 ] || die "at most 6 disks"
for i in "${!disks[@]}"; do
    [ -e "${disks[i]}" ] || die "disk ${disks[i]} not found"
    disks[i]=$(readlink -f "${disks[i]}")
done

vm_select_backend "$image"
backend=$VM_BACKEND
slow=$(vm_slow_factor)

rundir=$(mktemp -d "${TMPDIR:-/tmp}/vm-$name.XXXXXX")
trap 'rm -rf "$rundir"' EXIT

# Kernel command line words both backends share.
cmdline=("vm.name=$name" "vm.backend=$backend" "vm.slow=$slow" "vm.test=$test" "vm.timeout=$tmo")
case $mode in
    systemd) cmdline+=(systemd.unit=multi-user.target systemd.show_status=1) ;;
    script) cmdline+=(init=/usr/local/sbin/vm-init) ;;
esac

# Guest memory: UML keeps it in a file under TMPDIR, /dev/shm keeps that in
# RAM (falls back to the run folder when /dev/shm is too small).
uml_memdir() {
    local mem_mb shm_mb
    mem_mb=$(numfmt --from=iec "${mem%B}" 2>/dev/null | awk '{ printf "%d", $1 / 1048576 }')
    shm_mb=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')
    if [ -n "$shm_mb" ] && [ -n "$mem_mb" ] && [ "$shm_mb" -gt "$((mem_mb + 256))" ]; then
        echo /dev/shm
    else
        echo "$rundir"
    fi
}

# await_group PIDFILE: once the guest's main process wrote its pid to
# PIDFILE and leads its process group, that group's id in $guestpg (empty
# when the guest ended first or after 60 s).
await_group() {
    local p
    guestpg=''
    for _ in $(seq 600); do
        if [ -s "$1" ]; then
            p=$(tr -dc 0-9 <"$1")
            if [ -n "$p" ] && [ "$(ps -o pgid= -p "$p" 2>/dev/null | tr -d ' ')" = "$p" ]; then guestpg=$p; return; fi
        fi
        kill -0 "$tpid" 2>/dev/null || return
        sleep 0.1
    done
}

# start_uml: linux.uml in the background (timeout's pid in $tpid); the
# guest's process group id in $guestpg once the kernel runs.
start_uml() {
    command -v linux.uml >/dev/null || die "linux.uml not found (vm-images/deps.sh installs user-mode-linux)"
    local args i
    # shellcheck disable=SC2054 # commas belong to UML options
    args=(mem="$mem" "ubd0=$rundir/root.cow,$image" root=/dev/ubda rw
          con=null con0=null,fd:1 ssl=null "umid=$name" "uml_dir=$rundir" "vm.share=$share")
    for i in "${!disks[@]}"; do args+=("ubd$((i + 1))=${disks[i]}"); done
    for i in "${!tap_ifs[@]}"; do
        args+=("vec$i:transport=tap,ifname=${tap_ifs[i]},depth=128,gro=1${tap_macs[i]}")
    done
    i=1
    for m in "${mounts[@]}"; do
        args+=("vm.mount$i=$(cd "${m%%:*}" && pwd):${m#*:}")
        i=$((i + 1))
    done
    args+=("${cmdline[@]}" "${extra[@]}")
    # The guest's own timeout (vm.timeout) fires first; this one catches a
    # hung kernel (e.g. NBD I/O stuck in D state) 30 s later.
    TMPDIR=$(uml_memdir) timeout -k 10 "$((tmo + 30))" linux.uml "${args[@]}" \
        </dev/null >"$console" 2>&1 &
    tpid=$!
    # The UML kernel calls setsid(): it leads its own session and process
    # group, which holds its helpers and the host processes that carry the
    # guest's user space (not timeout's). It writes its pid to
    # UML_DIR/UMID/pid early in boot.
    await_group "$rundir/$name/pid"
}

# start_qemu: qemu-system-x86_64 (TCG) under setsid in the background; the
# same $tpid and $guestpg as start_uml.
start_qemu() {
    command -v qemu-system-x86_64 >/dev/null ||
        die "qemu-system-x86_64 not found (vm-images/deps.sh installs qemu-system-x86)"
    local kernel=${image%.img}.vmlinuz initrd=${image%.img}.initrd args i
    [ -f "$kernel" ] && [ -f "$initrd" ] || die "no $kernel / $initrd next to the image (rebuild it: build-image.sh)"
    # shellcheck disable=SC2054 # commas belong to QEMU options
    args=(-name "$name" -machine pc,accel=tcg -smp "${VM_QEMU_SMP:-1}" -m "$mem"
          -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot
          -pidfile "$rundir/qemu.pid"
          -kernel "$kernel" -initrd "$initrd"
          # The root disk is the first virtio disk (vda): devices are created in
          # command line order.
          -drive "file=$image,format=raw,if=none,id=root,snapshot=on,cache=unsafe"
          -device virtio-blk-pci,drive=root,serial=root
          -virtfs "local,path=$share,mount_tag=vmshare,security_model=none,multidevs=remap"
          -device virtio-rng-pci)
    for i in "${!disks[@]}"; do
        args+=(-drive "file=${disks[i]},format=raw,if=none,id=disk$((i + 1)),cache=writeback"
               -device "virtio-blk-pci,drive=disk$((i + 1)),serial=disk$((i + 1))")
    done
    # romfile=: no iPXE option ROM (the kernel is booted directly).
    for i in "${!tap_ifs[@]}"; do
        args+=(-netdev "tap,id=net$i,ifname=${tap_ifs[i]},script=no,downscript=no"
               -device "virtio-net-pci,netdev=net$i,romfile=${tap_macs[i]}")
    done
    local words=(root=/dev/vda rw console=ttyS0 panic=1 net.ifnames=0 "vm.share=vmshare")
    i=1
    for m in "${mounts[@]}"; do
        args+=(-virtfs "local,path=$(cd "${m%%:*}" && pwd),mount_tag=vmmount$i,security_model=none,multidevs=remap")
        words+=("vm.mount$i=vmmount$i:${m#*:}")
        i=$((i + 1))
    done
    words+=("${cmdline[@]}" "${extra[@]}")
    args+=(-append "${words[*]}")
    # setsid: qemu leads its own process group, as the UML kernel does.
    TMPDIR=$rundir timeout -k 10 "$((tmo + 30))" setsid qemu-system-x86_64 "${args[@]}" \
        </dev/null >"$console" 2>&1 &
    tpid=$!
    await_group "$rundir/qemu.pid"
}

# Kill the guest's process group, only while it still holds this guest's
# processes (ids get reused).
kill_guest_group() {
    [ -n "$guestpg" ] || return 0
    if vm_guest_group "$guestpg" "$name"; then kill -KILL -- "-$guestpg" 2>/dev/null || true; fi
}

rm -f "$share/rc" "$share/guest.log"
echo "run-guest: guest $name: backend $backend ($VM_BACKEND_REASON), mode $mode, timeout ${tmo}s" >&2
start=$(now)
set +e
"start_$backend"
trap 'kill_guest_group; rm -rf "$rundir"' EXIT
if [ -n "$pidfile" ]; then
    rm -f "$pidfile"
    [ -n "$guestpg" ] && echo "$guestpg" >"$pidfile"
fi
wait "$tpid"
guest_rc=$?
# A guest killed by SIGKILL (power cut) leaves its exit status to timeout;
# a guest that powered off has no processes left. Either way: none may stay.
kill_guest_group
set -e
secs=$(since "$start")
if [ $guest_rc -eq 124 ]; then
    echo "run-guest: guest $name ($backend) timed out after ${secs}s (console: $console)" >&2
    exit 124
fi
if [ $guest_rc -eq 137 ]; then
    echo "run-guest: guest $name ($backend) was killed (SIGKILL: power cut or timeout -k) after ${secs}s (console: $console)" >&2
    exit 137
fi
if [ ! -f "$share/rc" ]; then
    # Never a silent skip: name every backend tried and what it said.
    echo "run-guest: guest $name produced no result. Backends tried on this host:" >&2
    case $VM_BACKEND_REASON in
        "UML does not boot"*) echo "run-guest:   uml: $VM_BACKEND_REASON" >&2 ;;
    esac
    echo "run-guest:   $backend: exited $guest_rc after ${secs}s; console $console ends:" >&2
    tr -d '\r' <"$console" 2>/dev/null | tail -n 8 | sed 's/^/run-guest:     /' >&2 || true
    exit 125
fi
rc=$(cat "$share/rc")
echo "run-guest: guest $name ($backend): test $test exited $rc, guest ran ${secs}s" >&2
[[ $rc =~ ^[0-9]+$ ]] || exit 125
exit "$rc"
