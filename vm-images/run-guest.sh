#!/bin/bash
# Boot one User-Mode Linux guest from the image built by build-image.sh, run a
# test script from a host folder inside it, and return when it powers off.
#
#   run-guest.sh --share DIR --test NAME [options]
#
#   --share DIR       host folder mounted in the guest at /mnt/host (hostfs);
#                     NAME is a script in it; the guest writes DIR/rc (the
#                     script's exit status) and DIR/guest.log (its output)
#   --test NAME       script to run, relative to DIR
#   --image IMG       root image (default: build-image.sh output)
#   --mode M          systemd (default; vm-test.service runs the script, then
#                     a clean systemd poweroff) | script (tiny PID 1, ~2 s boot)
#   --disk FILE       extra block device, repeatable: /dev/ubdb, /dev/ubdc, ...
#   --tap IF[,MAC]    network card on host tap IF (vec0 transport, gro=1);
#                     repeatable: eth0, eth1, ... The tap must already exist,
#                     normally inside a network namespace the test created.
#   --mem SIZE        guest memory (default 768M)
#   --timeout S       hard limit for the whole guest run (default 300)
#   --console FILE    kernel/systemd console output (default DIR/console.log)
#   --name ID         UML instance id (default vm-PID)
#   --append ARG      extra kernel command line word (e.g. vm.node=alpha), repeatable;
#                     the guest test reads it from /proc/cmdline
#   --pid-file FILE   once the UML kernel runs, write the id of the guest's
#                     process group there (the UML kernel's pid: it calls
#                     setsid(), and its helpers and the guest's user-space
#                     processes are in its group): `kill -KILL -- -ID` powers
#                     the guest off abruptly (killing the kernel's pid alone
#                     leaves the rest running). A guest killed that way exits
#                     137 here
#
# Exit status: the test's own exit status from DIR/rc when the guest
# finished in time; 124 on timeout; 137 when the UML process was killed
# (--pid-file user, or timeout's -k); 125 when the guest produced no rc.
# The root image is never written: each run gets a fresh copy-on-write file.
#
# Runner choice: UML boots in about 2 s and costs about 150 MB per guest;
# QEMU/TCG with a Debian kernel takes about 14 s to boot and about 500 MB
# (measured, see VM-NOTES), so UML is the runner here.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
share='' test='' image='' mode=systemd mem=768M tmo=300 console='' name="vm-$$" pidfile=''
disks=() taps=() extra=()

die() { echo "run-guest: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --share) share=$2; shift 2 ;;
        --test) test=$2; shift 2 ;;
        --image) image=$2; shift 2 ;;
        --mode) mode=$2; shift 2 ;;
        --disk) disks+=("$2"); shift 2 ;;
        --tap) taps+=("$2"); shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --timeout) tmo=$2; shift 2 ;;
        --console) console=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --append) extra+=("$2"); shift 2 ;;
        --pid-file) pidfile=$2; shift 2 ;;
        *) die "unknown argument $1" ;;
    esac
done
[ -n "$share" ] && [ -d "$share" ] || die "--share DIR (an existing folder) is required"
[ -n "$test" ] && [ -f "$share/$test" ] || die "--test NAME must name a file in $share"
share=$(cd "$share" && pwd)
[ -n "$image" ] || image=$("$here/build-image.sh")
[ -f "$image" ] || die "image $image not found"
image=$(readlink -f "$image")
console=${console:-$share/console.log}
command -v linux.uml >/dev/null || die "linux.uml not found (apt-get install user-mode-linux)"

rundir=$(mktemp -d "${TMPDIR:-/tmp}/uml-$name.XXXXXX")
trap 'rm -rf "$rundir"' EXIT

# shellcheck disable=SC2054 # commas belong to UML options
args=(mem="$mem" "ubd0=$rundir/root.cow,$image" root=/dev/ubda rw
      con=null con0=null,fd:1 ssl=null "umid=$name" "uml_dir=$rundir"
      "vm.share=$share" "vm.test=$test" "vm.timeout=$tmo")
letters=(b c d e f g h)
i=0
for d in "${disks[@]}"; do
    [ -e "$d" ] || die "disk $d not found"
    [ $i -lt ${#letters[@]} ] || die "too many disks"
    args+=("ubd$((i + 1))=$(readlink -f "$d")")
    i=$((i + 1))
done
i=0
for t in "${taps[@]}"; do
    ifname=${t%%,*}
    mac=
    [ "$ifname" != "$t" ] && mac=",mac=${t#*,}"
    args+=("vec$i:transport=tap,ifname=$ifname,depth=128,gro=1$mac")
    i=$((i + 1))
done
args+=("${extra[@]}")
case $mode in
    systemd) args+=(systemd.unit=multi-user.target systemd.show_status=1) ;;
    script) args+=(init=/usr/local/sbin/vm-init) ;;
    *) die "--mode must be systemd or script" ;;
esac

rm -f "$share/rc" "$share/guest.log"
start=$(date +%s.%N)
set +e
# UML puts guest memory in a file under TMPDIR; /dev/shm keeps it in RAM.
# The guest's own timeout (vm.timeout) fires first; this one catches a hung
# kernel (e.g. NBD I/O stuck in D state) 30 s later.
memdir=/dev/shm
mem_mb=$(numfmt --from=iec "${mem%B}" 2>/dev/null | awk '{ printf "%d", $1 / 1048576 }')
shm_mb=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')
[ -n "$shm_mb" ] && [ -n "$mem_mb" ] && [ "$shm_mb" -gt "$((mem_mb + 256))" ] || memdir=$rundir
TMPDIR=$memdir timeout -k 10 "$((tmo + 30))" linux.uml "${args[@]}" \
    </dev/null >"$console" 2>&1 &
tpid=$!
# The UML kernel calls setsid(): it leads its own session and process group,
# and its helpers and the host processes that carry the guest's user space
# are in that group (not in timeout's). It writes its pid to UML_DIR/UMID/pid
# early in boot. That group is what a power cut kills (--pid-file), and what
# is killed here whenever the run ends, so no guest process outlives it.
umlpg=''
for _ in $(seq 600); do
    if [ -s "$rundir/$name/pid" ]; then
        p=$(tr -dc 0-9 <"$rundir/$name/pid")
        if [ -n "$p" ] && [ "$(ps -o pgid= -p "$p" 2>/dev/null | tr -d ' ')" = "$p" ]; then umlpg=$p; break; fi
    fi
    kill -0 "$tpid" 2>/dev/null || break
    sleep 0.1
done
kill_uml_group() {
    [ -n "$umlpg" ] || return 0
    # Only while the group still holds this guest's processes (ids get reused).
    # (awk reads all of ps's output: grep -q would end the pipe early, and
    # under pipefail ps's SIGPIPE would turn a match into a failure.)
    if ps -eo pgid=,args= | awk -v g="$umlpg" -v u="umid=$name " '$1 == g && index($0 " ", u) { f = 1 } END { exit !f }'; then
        kill -KILL -- "-$umlpg" 2>/dev/null || true
    fi
}
trap 'kill_uml_group; rm -rf "$rundir"' EXIT
if [ -n "$pidfile" ]; then
    rm -f "$pidfile"
    [ -n "$umlpg" ] && echo "$umlpg" >"$pidfile"
fi
wait "$tpid"
uml_rc=$?
# A kernel killed by SIGKILL (power cut) leaves its exit status to timeout;
# a guest that powered off has no processes left. Either way: none may stay.
kill_uml_group
set -e
secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
if [ $uml_rc -eq 124 ]; then
    echo "run-guest: guest $name timed out after ${secs}s (console: $console)" >&2
    exit 124
fi
if [ $uml_rc -eq 137 ]; then
    echo "run-guest: guest $name was killed (SIGKILL: power cut or timeout -k) after ${secs}s (console: $console)" >&2
    exit 137
fi
if [ ! -f "$share/rc" ]; then
    echo "run-guest: guest $name exited ($uml_rc) after ${secs}s without a result (console: $console)" >&2
    exit 125
fi
rc=$(cat "$share/rc")
echo "run-guest: guest $name: test $test exited $rc, guest ran ${secs}s" >&2
[[ $rc =~ ^[0-9]+$ ]] || exit 125
exit "$rc"
