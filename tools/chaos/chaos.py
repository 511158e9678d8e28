#!/usr/bin/python3
"""Real-process chaos trials for nbd-mirror (`make chaos`).

    chaos.py [--trials N] [--seed S] [--chaos-seconds T] [--timeout SECONDS] [--keep]
    chaos.py --check DIR          re-run the final check on a kept trial directory

Each trial, from one seed (trial i of a run with base seed S uses seed S+i):

1. Two mirrord processes (release build) on loopback, file-backed 64 MiB
   disks, protocol C, auto-promote off, allow-two-primaries off. Each node
   dials its peer through a LinkProxy (linkproxy.py), so the driver can cut
   the link; the two nodes' config files are the same resource config except
   for the peer's address (the proxy's port). Metadata is created, one node
   is forced primary, and the initial full sync is waited for.
2. client.py writes random blocks (plain, FUA, write-zeroes, trims), reads and
   flushes through NBD to whichever node serves the export, logging every
   issued operation and every answer, fsynced.
3. For --chaos-seconds, faults from the seeded schedule: kill -9 of the
   primary, the secondary or both (restarted after a random downtime), a clean
   SIGTERM restart, link partitions (reset, blackhole, one-way), an operator
   `mirrorctl disconnect` / `connect`, `mirrorctl invalidate` on the
   secondary. The pair is left to reconnect and resync on its own.
4. The driver plays the cluster manager of a DRBD single-primary
   deployment (Pacemaker with resource-level fencing, auto-promote off): it
   promotes a node only when it knows that node holds every acknowledged
   write. A node is such a "holder" when it was the primary, or when it was
   seen connected, established and up to date with no out-of-sync blocks on
   either side while the primary was up, and since then neither a fault was
   injected that could separate it from the primary, nor did the primary's
   event log record a disconnect (or a split brain, a sync decision, a disk
   failure, a fence-peer call) after that observation. When the primary dies,
   a surviving holder is promoted at once (failover); otherwise the driver
   waits for the dead primary to restart and promotes it again. Promoting a
   node that missed writes (a survivor of a partition) is exactly the
   operator error DRBD's fencing exists to prevent; it would lose
   acknowledged writes by design, so the driver never does it.
5. Heal: partitions lifted, dead nodes restarted, `mirrorctl connect`, the
   client stopped (its in-flight requests must all be answered within 20 s),
   `mirrorctl wait-sync`, `mirrorctl status --json` on both nodes must say
   connected, established, both up to date, nothing out of sync, no split
   brain. Both daemons are stopped with SIGTERM (exit 0 expected), then,
   outside the daemons:
   - both backing files' data areas must be byte-identical;
   - every block of each file must hold what the client's log allows
     (model.py: the last acknowledged write to the block, or one of the
     operations issued after it that were never acknowledged, which may or
     may not have landed; zeros if nothing was acknowledged);
   - no online read returned data the same rule forbids;
   - no daemon exited unexpectedly, panicked, or hung.

Faults are process kills and link cuts, never power loss: the page cache
survives, so every acknowledged write must survive, flushed or not (FLUSH and
FUA only add durability against power loss, which this harness cannot
inject; the simulator covers that). A failing trial prints its seed, a
replay command and keeps its directory (configs, daemon logs, client log,
driver timeline, backing files).
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import model  # noqa: E402
from linkproxy import LinkProxy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = "/usr/bin/python3"
NODES = ("alpha", "beta")
EXPORT = "r0"
DISK_BYTES = 64 << 20
# Events in the primary's log after which its peer may miss acknowledged writes.
FENCING_EVENTS = ("peer-disconnected", "split-brain", "sync-decision", "disk-failed",
                  "fence-peer", "resync-started", "connect-refused")


class TrialFailed(Exception):
    pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def ctl_request(path, req, timeout=5.0):
    """One JSON request on the control socket; the first response line as a dict."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while b"\n" not in buf:
            d = s.recv(65536)
            if not d:
                break
            buf += d
        return json.loads(buf.split(b"\n", 1)[0])
    finally:
        s.close()


class Node:
    def __init__(self, trial, name):
        self.t = trial
        self.name = name
        self.config = os.path.join(trial.dir, f"{name}.toml")
        self.log = os.path.join(trial.dir, f"{name}.log")
        self.run_dir = os.path.join(trial.dir, f"{name}-run")
        self.disk = os.path.join(trial.dir, f"{name}.img")
        self.ctl_path = os.path.join(self.run_dir, f"{EXPORT}.ctl")
        self.nbd_path = os.path.join(self.run_dir, f"{EXPORT}.nbd")
        self.proc = None
        self.starts = 0
        self.restart_at = None

    @property
    def uri(self):
        return f"nbd+unix:///{EXPORT}?socket={self.nbd_path}"

    def alive(self):
        return self.proc is not None

    def start(self):
        assert self.proc is None
        self.starts += 1
        with open(self.log, "a") as f:
            f.write(f"==== chaos driver: start #{self.starts} at t={self.t.now():.3f}\n")
            f.flush()
            self.proc = subprocess.Popen(
                [self.t.mirrord, "--config", self.config, "--node", self.name],
                stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True)
        self.restart_at = None

    def kill9(self):
        if self.proc is None:
            return
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def term(self, timeout=30.0):
        """SIGTERM and wait; returns the exit code (None: did not exit in time, killed)."""
        if self.proc is None:
            return 0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            rc = None
        self.proc = None
        took = time.monotonic() - t0
        if took > 5:
            # Not a failure (mirrord bounds its drain at 20 s), but worth knowing.
            self.t.slow_stops.append(f"{self.name} {took:.0f}s")
            self.t.note(f"slow stop: {self.name} took {took:.1f} s to exit on SIGTERM")
        return rc

    def status(self, timeout=3.0):
        """The status dict from the control socket, or None if it does not answer."""
        try:
            r = ctl_request(self.ctl_path, {"cmd": "status"}, timeout)
        except (OSError, ValueError):
            return None
        return r.get("status") if r.get("ok") else None

    def mirrorctl(self, *args, timeout=30.0):
        try:
            p = subprocess.run([self.t.mirrorctl, "--config", self.config, "--node", self.name, *args],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TrialFailed(f"hang: `mirrorctl {' '.join(args)}` on {self.name} did not return in {timeout:.0f} s")
        return p.returncode, (p.stdout + p.stderr).strip()

    def log_size(self):
        try:
            return os.path.getsize(self.log)
        except OSError:
            return 0

    def events_since(self, offset):
        """Event names (and peer-state disks) the node logged after byte `offset` of its log."""
        out = []
        with open(self.log, "rb") as f:
            f.seek(offset)
            for raw in f:
                line = raw.decode("utf-8", "replace")
                i = line.find("nbd_mirror::events: ")
                if i < 0:
                    continue
                try:
                    ev = json.loads(line[i + len("nbd_mirror::events: "):])
                except ValueError:
                    continue
                out.append(ev)
        return out


class Trial:
    def __init__(self, seed, args):
        self.seed = seed
        self.args = args
        self.rng = random.Random(seed)
        self.mirrord = os.path.join(args.bin_dir, "mirrord")
        self.mirrorctl = os.path.join(args.bin_dir, "mirrorctl")
        self.dir = tempfile.mkdtemp(prefix=f"nbdm-chaos-{seed}-", dir=args.workdir)
        self.t0 = time.monotonic()
        self.chaos_t0 = 0.0
        self.deadline = self.t0 + args.trial_timeout
        self.timeline = open(os.path.join(self.dir, "driver.log"), "w", buffering=1)
        self.nodes = {n: Node(self, n) for n in NODES}
        self.proxies = {}
        self.client = None
        self.client_log = os.path.join(self.dir, "client.log")
        self.primary = None  # name of the node the driver made primary
        self.holders = set()  # nodes known to hold every acknowledged write
        self.insync_mark = {}  # node -> (primary name, primary's log offset) when seen in sync
        self.partition = (0, "up")
        self.disconnected = set()
        self.events = []  # (time, fn, label)
        self.faults = []
        self.failovers = 0
        self.last_observe = 0.0
        self.last_promote_try = 0.0
        self.last_refusal = None
        self.slow_stops = []
        self.notes = []
        # The run id tags every block the client writes.
        self.run_id = self.rng.getrandbits(63)

    def now(self):
        return time.monotonic() - self.t0

    def ctime(self):
        """Seconds since the chaos phase began (the schedule's clock)."""
        return self.now() - self.chaos_t0

    def note(self, msg):
        self.timeline.write(f"{self.now():8.3f} {msg}\n")

    def check_deadline(self, what):
        if time.monotonic() > self.deadline:
            raise TrialFailed(f"hang: trial exceeded {self.args.trial_timeout:.0f} s ({what})")

    def peer_of(self, name):
        return NODES[1] if name == NODES[0] else NODES[0]

    # ----- setup -----

    def setup(self):
        rng = self.rng
        self.params = {
            "engine": rng.choice(["uring", "threads"]),
            "checksum": rng.choice([True, False]),
            "rate": rng.choice(["32MiB", "128MiB", "1GiB", "auto", "auto"]),
            "qd": rng.choice([1, 2, 4, 8, 16]),
            "first_primary": rng.choice(NODES),
        }
        self.note(f"seed {self.seed} params {json.dumps(self.params)}")
        secret = os.path.join(self.dir, "r0.secret")
        with open(secret, "w") as f:
            f.write("chaos-secret-%016x\n" % rng.getrandbits(64))
        os.chmod(secret, 0o600)
        listen = {n: free_port() for n in NODES}
        # proxies[n] forwards to node n's peer-link port; the other node dials it.
        for n in NODES:
            self.proxies[n] = LinkProxy(listen[n], name=f"to-{n}")
        for me in NODES:
            node = self.nodes[me]
            os.makedirs(node.run_dir, exist_ok=True)
            with open(node.disk, "wb") as f:
                f.truncate(DISK_BYTES)
            parts = [
                "# written by tools/chaos/chaos.py; the peer's address is the driver's link proxy",
                "[resource]",
                f'name = "{EXPORT}"',
                'protocol = "C"',
                "allow-two-primaries = false",
                "auto-promote = false",
                f'shared-secret-file = "{secret}"',
                "",
                "[disk]",
                f'engine = "{self.params["engine"]}"',
                "",
                "[sync]",
                f'rate = "{self.params["rate"]}"',
                f'checksum = {"true" if self.params["checksum"] else "false"}',
                "",
                "[net]",
                'ping-interval = "1s"',
                'ping-timeout = "1s"',
                'timeout = "1s"',
                "ko-count = 4",
                'connect-retry = "500ms"',
                "# the link proxy is a relay: both nodes opt out of binding the connection",
                "insecure-allow-relay = true",
            ]
            for n in NODES:
                port = listen[n] if n == me else self.proxies[n].port
                parts += ["", "[[node]]", f'name = "{n}"', f'address = "127.0.0.1:{port}"',
                          f'disk = "{self.nodes[n].disk}"', 'meta-disk = "internal"',
                          f'run-dir = "{self.nodes[n].run_dir}"']
            with open(node.config, "w") as f:
                f.write("\n".join(parts) + "\n")
            rc, out = node.mirrorctl("create-md")
            if rc != 0:
                raise TrialFailed(f"create-md on {me} failed: {out}")
        for n in self.nodes.values():
            n.start()
        for n in self.nodes.values():
            self.wait_up(n, 10)
        first = self.nodes[self.params["first_primary"]]
        # The initial sync: the first primary's data wins.
        for _ in range(50):
            rc, out = first.mirrorctl("primary", "--force")
            if rc == 0:
                break
            time.sleep(0.1)
        else:
            raise TrialFailed(f"primary --force on {first.name} failed: {out}")
        self.primary = first.name
        rc, out = first.mirrorctl("wait-sync", "--timeout", "30", timeout=40)
        if rc != 0:
            raise TrialFailed(f"initial sync did not finish: {out}")
        self.holders = {first.name}
        self.observe(force=True)
        self.note(f"initial sync done; primary {self.primary}, holders {sorted(self.holders)}")

    def wait_up(self, node, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.check_exits()
            if node.status(1.0) is not None:
                return
            time.sleep(0.05)
        raise TrialFailed(f"hang: {node.name} did not answer on its control socket within {seconds} s of starting")

    # ----- the client -----

    def start_client(self):
        uris = ",".join(self.nodes[n].uri for n in NODES)
        self.client_out = open(os.path.join(self.dir, "client.out"), "w")
        self.client = subprocess.Popen(
            [PYTHON, os.path.join(HERE, "client.py"), "--uris", uris, "--log", self.client_log,
             "--run", str(self.run_id), "--seed", str(self.seed), "--qd", str(self.params["qd"]),
             "--drain-seconds", "20", "--max-seconds", str(self.args.trial_timeout)],
            stdin=subprocess.DEVNULL, stdout=self.client_out, stderr=subprocess.STDOUT)
        self.note(f"client started (qd {self.params['qd']})")

    def stop_client(self):
        if self.client is None:
            return
        self.client.send_signal(signal.SIGTERM)
        try:
            rc = self.client.wait(30)
        except subprocess.TimeoutExpired:
            self.client.kill()
            self.client.wait()
            raise TrialFailed("hang: the client did not stop within 30 s of SIGTERM")
        self.client_out.close()
        self.note(f"client stopped, exit {rc}")
        self.client = None
        if rc == 3:
            stuck = [ln for ln in open(self.client_log) if ln.startswith("H ")]
            raise TrialFailed(f"hang: {stuck[-1].strip() if stuck else 'requests unanswered'}")
        if rc == 4:
            raise TrialFailed("a read returned data older than an acknowledged write: "
                              + first_lines(self.client_log, "V ", 3))
        if rc != 0:
            raise TrialFailed(f"the client failed (exit {rc}): {tail(os.path.join(self.dir, 'client.out'), 5)}")

    # ----- cluster manager -----

    def check_exits(self):
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is not None:
                rc = n.proc.returncode
                n.proc = None
                raise TrialFailed(f"crash: mirrord {n.name} exited on its own (exit {rc}): {tail(n.log, 5)}")
        if self.client is not None and self.client.poll() is not None:
            rc = self.client.returncode
            if rc == 4:
                raise TrialFailed("a read returned data older than an acknowledged write: "
                                  + first_lines(self.client_log, "V ", 3))
            raise TrialFailed(f"the client exited early (exit {rc}): {tail(os.path.join(self.dir, 'client.out'), 5)}")

    def fence(self, name, why):
        if name in self.holders:
            self.holders.discard(name)
            self.note(f"fence {name}: {why}; holders {sorted(self.holders)}")

    def observe(self, force=False):
        """Marks the secondary a holder when both sides say they are in sync."""
        if not force and time.monotonic() - self.last_observe < 0.25:
            return
        self.last_observe = time.monotonic()
        if self.primary is None:
            return
        p = self.nodes[self.primary]
        s = self.nodes[self.peer_of(self.primary)]
        if not p.alive() or not s.alive() or s.name in self.holders:
            return
        if self.partition[1] != "up" or self.disconnected:
            return  # sound either way (the log would show a separation), but say nothing while cut
        mark = p.log_size()
        ps, ss = p.status(), s.status()
        if ps is None or ss is None:
            return
        if in_sync(ps, want_role="primary") and in_sync(ss):
            self.holders.add(s.name)
            self.insync_mark[s.name] = (p.name, mark)
            self.note(f"{s.name} seen in sync with primary {p.name} (log offset {mark}); holders {sorted(self.holders)}")

    def revalidate(self, name):
        """Before promoting `name` in place of the dead primary: did the primary log a separation?"""
        mark = self.insync_mark.get(name)
        if mark is None:
            self.fence(name, "never seen in sync")
            return
        pname, offset = mark
        for ev in self.nodes[pname].events_since(offset):
            e = ev.get("event")
            if e in FENCING_EVENTS or (e == "peer-state" and ev.get("disk") != "up-to-date"):
                self.fence(name, f"{pname}'s log shows {e} after it was seen in sync")
                return

    def manage(self):
        self.check_exits()
        now = self.now()
        for n in self.nodes.values():
            if n.proc is None and n.restart_at is not None and now >= n.restart_at:
                self.note(f"restart {n.name}")
                n.start()
        cur = self.nodes[self.primary] if self.primary else None
        if cur is not None and not cur.alive():
            # The primary is dead: fail over to a surviving holder, if any.
            other = self.nodes[self.peer_of(cur.name)]
            if self.args.unsafe_failover and other.alive():
                # Self-test of the checker: fail over with no fencing at all.
                self.holders.add(other.name)
            if other.alive() and other.name in self.holders:
                if not self.args.unsafe_failover:
                    self.revalidate(other.name)
                if other.name in self.holders and self.promote(other):
                    self.failovers += 1
                    return
        if cur is not None and cur.alive():
            st = cur.status(1.0)
            if st is not None and st.get("role") != "primary" and cur.name in self.holders:
                self.promote(cur)  # restarted: primary again
        self.observe()

    def promote(self, node):
        if time.monotonic() - self.last_promote_try < 0.2:
            return False
        self.last_promote_try = time.monotonic()
        rc, out = node.mirrorctl("primary")
        if rc != 0:
            self.note(f"primary on {node.name} refused: {out}")
            self.last_refusal = f"{node.name}: {out}"
            return False
        old = self.primary
        self.primary = node.name
        # Writes from now on are acknowledged by this node; the other one holds
        # them only once it is seen in sync again.
        for n in NODES:
            if n != node.name:
                self.fence(n, f"{node.name} promoted")
        self.note(f"promoted {node.name} (was {old}); holders {sorted(self.holders)}")
        return True

    # ----- faults -----

    def schedule(self):
        rng = self.rng
        T = self.args.chaos_seconds
        kinds = [("kill-primary", 4), ("kill-secondary", 3), ("kill-both", 1), ("term-primary", 1),
                 ("term-secondary", 1), ("partition-reset", 2), ("partition-blackhole", 3),
                 ("partition-oneway", 2), ("disconnect", 1), ("invalidate", 1)]
        total = sum(w for _, w in kinds)
        n = rng.randint(2, 5)
        for _ in range(n):
            at = rng.uniform(0.3, max(0.5, T - 1.0))
            r = rng.uniform(0, total)
            for kind, w in kinds:
                r -= w
                if r <= 0:
                    break
            a = rng.uniform(0.2, 2.5)
            b = rng.uniform(0.0, 0.4)
            c = rng.choice(NODES)
            d = rng.choice(NODES)  # one-way partitions: the sender whose bytes stall
            self.faults.append((at, kind, a, b, c, d))
        self.faults.sort()
        for f in self.faults:
            self.events.append((f[0], f, f[1]))

    def run_event(self, f):
        at, kind, a, b, c, d = f
        prim = self.primary
        sec = self.peer_of(prim) if prim else None
        if kind in ("kill-primary", "kill-secondary", "term-primary", "term-secondary"):
            target = prim if kind in ("kill-primary", "term-primary") else sec
            node = self.nodes[target]
            if not node.alive():
                self.note(f"{kind}: {target} already down, skipped")
                return
            if target != self.primary:
                self.fence(target, kind)
            if kind.startswith("kill"):
                node.kill9()
                self.note(f"{kind}: kill -9 {target}; restart in {a:.2f} s")
            else:
                rc = node.term(30)
                self.note(f"{kind}: SIGTERM {target} -> exit {rc}; restart in {a:.2f} s")
                if rc != 0:
                    raise TrialFailed(f"mirrord {target} did not stop cleanly on SIGTERM (exit {rc}): {tail(node.log, 5)}")
            node.restart_at = self.now() + a
        elif kind == "kill-both":
            first = self.nodes[c]
            second = self.nodes[self.peer_of(c)]
            for n in (first, second):
                if n.alive():
                    if n.name != self.primary:
                        self.fence(n.name, kind)
                    n.kill9()
            first.restart_at = self.now() + a
            second.restart_at = self.now() + a + b
            self.note(f"kill-both: kill -9 {first.name} then {second.name}; restarts in {a:.2f} / {a + b:.2f} s")
        elif kind.startswith("partition"):
            mode = {"partition-reset": "reset", "partition-blackhole": "blackhole"}.get(kind)
            if mode is None:
                # One way: bytes from node d to its peer stall, the other direction flows.
                mode = f"{d} to {self.peer_of(d)} stalled"
            pid = self.partition[0] + 1
            self.partition = (pid, mode)
            if sec:
                self.fence(sec, kind)
            for target, p in self.proxies.items():
                if kind != "partition-oneway":
                    p.set_mode(mode)
                else:
                    # proxies[target] carries target's peer -> target as a2b (the peer dialed),
                    # target -> peer as b2a (on connections the peer dialed).
                    p.set_mode("oneway-a2b" if target != d else "oneway-b2a")
            self.note(f"{kind}: link {mode} for {a:.2f} s")
            self.events.append((self.ctime() + a, ("heal", pid), "heal"))
        elif kind == "disconnect":
            node = self.nodes[c]
            if not node.alive():
                self.note(f"disconnect: {c} is down, skipped")
                return
            if sec:
                self.fence(sec, kind)
            rc, out = node.mirrorctl("disconnect")
            self.note(f"disconnect on {c}: rc {rc} {out}; connect in {a:.2f} s")
            self.disconnected.add(c)
            self.events.append((self.ctime() + a, ("connect", c), "connect"))
        elif kind == "invalidate":
            if not sec or not self.nodes[sec].alive():
                self.note("invalidate: no live secondary, skipped")
                return
            self.fence(sec, kind)
            rc, out = self.nodes[sec].mirrorctl("invalidate")
            self.note(f"invalidate on {sec}: rc {rc} {out}")

    def run_followup(self, ev):
        what = ev[0]
        if what == "heal":
            if self.partition[0] == ev[1]:
                self.heal_link()
        elif what == "connect":
            self.reconnect(ev[1])

    def heal_link(self):
        if self.partition[1] != "up":
            self.partition = (self.partition[0], "up")
            for p in self.proxies.values():
                p.set_mode("up")
            self.note("link healed")

    def reconnect(self, name):
        if name in self.disconnected:
            node = self.nodes[name]
            if node.alive():
                rc, out = node.mirrorctl("connect")
                self.note(f"connect on {name}: rc {rc} {out}")
            self.disconnected.discard(name)

    def chaos(self):
        self.schedule()
        self.note("schedule: " + "; ".join(f"{f[0]:.2f} {f[1]}" for f in self.faults))
        end = time.monotonic() + self.args.chaos_seconds
        while time.monotonic() < end:
            self.check_deadline("chaos phase")
            now = self.ctime()
            due = [e for e in self.events if e[0] <= now]
            self.events = [e for e in self.events if e[0] > now]
            for at, f, label in sorted(due, key=lambda e: e[0]):
                if label in ("heal", "connect"):
                    self.run_followup(f)
                else:
                    self.run_event(f)
            self.manage()
            time.sleep(0.05)

    # ----- heal and check -----

    def heal(self):
        self.note("heal: link up, dead nodes restarted, connect")
        self.events = []
        self.heal_link()
        for n in self.nodes.values():
            if not n.alive():
                n.restart_at = self.now()
        self.manage()
        for n in self.nodes.values():
            self.wait_up(n, 10)
        for name in list(self.disconnected):
            self.reconnect(name)
        # The cluster manager must be able to restore a primary now that both
        # nodes run: the one it made primary last holds every acknowledged write.
        end = time.monotonic() + 15
        while True:
            self.manage()
            p = self.nodes[self.primary]
            st = p.status(1.0)
            if st and st.get("role") == "primary":
                break
            if time.monotonic() > end:
                raise TrialFailed(f"hang: {p.name} could not be made primary within 15 s of healing "
                                  f"(last refusal: {self.last_refusal}); status: {self.status_line()}")
            time.sleep(0.1)
        time.sleep(self.rng.uniform(0, 0.5))
        self.stop_client()
        for n in self.nodes.values():
            rc, out = n.mirrorctl("connect")
            self.note(f"connect on {n.name}: rc {rc} {out}")
        sync_start = time.monotonic()
        rc, out = self.nodes[self.primary or NODES[0]].mirrorctl("wait-sync", "--timeout", "40", timeout=50)
        self.note(f"wait-sync: rc {rc} {out} ({time.monotonic() - sync_start:.2f} s)")
        self.check_exits()
        if rc != 0:
            raise TrialFailed(f"no sync within 40 s after healing: {out}; status: {self.status_line()}")
        # Both nodes must say so (poll briefly: the secondary may learn the last state a moment later).
        end = time.monotonic() + 10
        while True:
            sts = {}
            for n in self.nodes.values():
                rc, out = n.mirrorctl("status", "--json")
                try:
                    sts[n.name] = json.loads(out) if rc == 0 else None
                except ValueError:
                    sts[n.name] = None
            if all(s is not None and in_sync(s) for s in sts.values()):
                break
            if time.monotonic() > end:
                raise TrialFailed(f"not in sync on both nodes after wait-sync: {self.status_line(sts)}")
            time.sleep(0.2)
        self.final_status = sts
        with open(os.path.join(self.dir, "final-status.json"), "w") as f:
            json.dump(sts, f, indent=1)
        self.size = sts[NODES[0]]["size_bytes"]
        self.note(f"both up to date: {self.status_line(sts)}")
        for n in self.nodes.values():
            rc = n.term(30)
            self.note(f"SIGTERM {n.name}: exit {rc}")
            if rc != 0:
                raise TrialFailed(f"mirrord {n.name} did not stop cleanly on SIGTERM (exit {rc}): {tail(n.log, 5)}")

    def status_line(self, sts=None):
        if sts is None:
            sts = {n.name: n.status(2.0) for n in self.nodes.values()}
        parts = []
        for name, s in sts.items():
            if s is None:
                parts.append(f"{name}: no answer")
                continue
            peer = s.get("peer") or {}
            parts.append(f"{name}: {s.get('role')}/{s.get('disk')} oos {s.get('out_of_sync_bytes')} "
                         f"peer {peer.get('connection')}/{peer.get('replication')}/{peer.get('disk')}"
                         f"{' SPLIT-BRAIN' if s.get('split_brain') else ''}")
        return "; ".join(parts)

    def cleanup(self):
        for p in self.proxies.values():
            self.note("proxy " + p.stats())
        if self.client is not None:
            self.client.kill()
            self.client.wait()
            self.client = None
        for n in self.nodes.values():
            if n.proc is not None:
                n.kill9()
        for p in self.proxies.values():
            p.close()
        self.timeline.close()

    def run(self):
        self.setup()
        self.start_client()
        self.chaos_t0 = self.now()
        self.chaos()
        self.heal()
        errors = check_dir(self.dir, self.size)
        for n in self.nodes.values():
            with open(n.log, errors="replace") as f:
                for line in f:
                    if "panicked" in line:
                        errors.insert(0, f"panic in {n.name}: {line.strip()}")
                        break
        if errors:
            raise TrialFailed("; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))


def in_sync(s, want_role=None):
    peer = s.get("peer") or {}
    return (s.get("disk") == "up-to-date" and s.get("out_of_sync_bytes") == 0
            and not s.get("split_brain") and s.get("resync") is None
            and peer.get("connection") == "connected" and peer.get("replication") == "established"
            and peer.get("disk") == "up-to-date"
            and (want_role is None or s.get("role") == want_role))


def tail(path, n):
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return "(no output)"
    return " | ".join(lines[-n:])


def first_lines(path, prefix, n):
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(prefix):
                out.append(line.strip())
                if len(out) >= n:
                    break
    return " | ".join(out)


def parse_client_log(path):
    """(run id, ops by block in issue order, acked writes, summary)."""
    run = None
    issued = {}
    outcome = {}
    order = []
    summary = None
    ended = False
    with open(path) as f:
        for line in f:
            if line.startswith("# {"):
                run = json.loads(line[2:])["run"]
                continue
            parts = line.split()
            if not parts:
                continue
            tag = parts[0]
            if tag == "I":
                seq, kind, first, count = int(parts[1]), parts[2], int(parts[3]), int(parts[4])
                issued[seq] = (kind, first, count)
                order.append(seq)
            elif tag == "A":
                outcome[int(parts[1])] = True
            elif tag == "E":
                outcome.setdefault(int(parts[1]), False)
            elif tag == "S":
                summary = json.loads(line[2:])
            elif tag == "X":
                ended = True
    return run, issued, outcome, order, summary, ended


def check_dir(d, size):
    """The final check of one trial directory; returns a list of errors."""
    errors = []
    log = os.path.join(d, "client.log")
    run, issued, outcome, order, summary, ended = parse_client_log(log)
    if not ended:
        errors.append("the client log has no end marker (client did not exit cleanly)")
    blocks = size // model.BLOCK
    state = {}
    for seq in order:
        kind, first, count = issued[seq]
        if kind not in model.DATA_KINDS:
            continue
        ok = outcome.get(seq, False)
        for b in range(first, first + count):
            state[b] = model.fold(state.get(b, {model.ZERO}), kind, seq, ok)
    images = {}
    for n in NODES:
        with open(os.path.join(d, f"{n}.img"), "rb") as f:
            images[n] = f.read(size)
        if len(images[n]) != size:
            errors.append(f"{n}.img is shorter than the data area ({len(images[n])} < {size})")
            return errors
    a, b = images[NODES[0]], images[NODES[1]]
    if a != b:
        diff = [i for i in range(blocks) if a[i * model.BLOCK:(i + 1) * model.BLOCK] != b[i * model.BLOCK:(i + 1) * model.BLOCK]]
        errors.append(f"divergent disks: {len(diff)} blocks differ, first at blocks {diff[:8]}")
    for n in NODES:
        img = images[n]
        bad = 0
        for blk in range(blocks):
            data = img[blk * model.BLOCK:(blk + 1) * model.BLOCK]
            want = state.get(blk, {model.ZERO})
            if blk not in state and data == model.ZERO_BLOCK:
                continue
            got = model.identify(run, blk, data)
            if got not in want:
                bad += 1
                if bad <= 3:
                    what = got if isinstance(got, str) else model.describe({got})
                    hist = block_history(blk, order, issued, outcome)
                    errors.append(f"{n}.img block {blk} holds {what}, must hold one of {model.describe(want)}"
                                  f" (history: {hist})")
        if bad > 3:
            errors.append(f"{n}.img: {bad} blocks wrong in all")
    if summary is not None and summary.get("acked", 0) == 0:
        errors.append("the client got no write acknowledged in the whole trial (no primary served it)")
    if summary and summary.get("violations"):
        errors.append(f"{summary['violations']} online read violations: {first_lines(log, 'V ', 2)}")
    return errors


def block_history(blk, order, issued, outcome):
    h = []
    for seq in order:
        kind, first, count = issued[seq]
        if kind in model.DATA_KINDS and first <= blk < first + count:
            h.append(f"{kind}{seq}{'+' if outcome.get(seq) else '?'}")
    return " ".join(h[-8:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None, help="base seed (trial i uses SEED+i); random if absent")
    ap.add_argument("--chaos-seconds", type=float, default=6.0)
    ap.add_argument("--trial-timeout", type=float, default=120.0, help="hard limit per trial")
    ap.add_argument("--timeout", type=float, default=None,
                    help="overall limit in seconds (default 60 + 30 per trial)")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--keep", action="store_true", help="keep every trial's directory")
    ap.add_argument("--unsafe-failover", action="store_true",
                    help="self-test of the checker: promote the survivor even when it may have missed "
                         "writes (the operator error fencing prevents); trials are expected to fail")
    ap.add_argument("--check", metavar="DIR", help="only re-run the final check on a kept trial directory")
    args = ap.parse_args()

    if args.check:
        # The data area size as the daemons reported it at the end of the trial.
        path = os.path.join(args.check, "final-status.json")
        if not os.path.exists(path):
            print(f"chaos: {path} missing: the trial failed before its final check", file=sys.stderr)
            return 2
        with open(path) as f:
            size = json.load(f)[NODES[0]]["size_bytes"]
        errs = check_dir(args.check, size)
        print("\n".join(errs) if errs else "ok")
        return 1 if errs else 0

    def on_term(_sig, _frm):
        raise KeyboardInterrupt("SIGTERM")  # trial cleanup (daemons, client, proxies) runs on the way out

    signal.signal(signal.SIGTERM, on_term)
    for tool in ("mirrord", "mirrorctl"):
        if not os.access(os.path.join(args.bin_dir, tool), os.X_OK):
            print(f"chaos: {args.bin_dir}/{tool} missing (run make build)", file=sys.stderr)
            return 2
    base = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1 << 40)
    budget = args.timeout if args.timeout is not None else 60 + 30 * args.trials
    started = time.monotonic()
    print(f"chaos: {args.trials} trials, base seed {base}, {args.chaos_seconds:.0f} s of faults each, "
          f"overall limit {budget:.0f} s", flush=True)
    passed = failed = 0
    failures = []
    for i in range(args.trials):
        left = budget - (time.monotonic() - started)
        if left <= 0:
            print(f"chaos: overall time limit of {budget:.0f} s reached after {i} trials", flush=True)
            failed += args.trials - i
            failures.append(("timeout", None, f"{args.trials - i} trials not run: overall limit reached"))
            break
        args.trial_timeout = min(args.trial_timeout, max(left, 1.0))
        seed = base + i
        t = Trial(seed, args)
        t0 = time.monotonic()
        try:
            t.run()
            ok, why = True, ""
        except TrialFailed as e:
            ok, why = False, str(e)
            if why.startswith("hang"):
                # Liveness failures depend on time; say how busy the machine was.
                why += " (load average %.1f %.1f %.1f)" % os.getloadavg()
        except Exception as e:  # a driver bug is a failure too, never a pass
            import traceback
            ok, why = False, f"driver error: {e!r}\n{traceback.format_exc()}"
        finally:
            t.cleanup()
        dt = time.monotonic() - t0
        faults = ",".join(f[1] for f in t.faults)
        if ok:
            passed += 1
            stats = client_summary(t.client_log)
            print(f"trial {i + 1}/{args.trials} seed {seed}: ok {dt:.1f}s [{faults}] "
                  f"failovers {t.failovers}, {stats}"
                  + (f"; slow SIGTERM stops: {', '.join(t.slow_stops)}" if t.slow_stops else ""), flush=True)
            if not args.keep:
                shutil.rmtree(t.dir, ignore_errors=True)
        else:
            failed += 1
            with open(os.path.join(t.dir, "FAILED"), "w") as f:
                f.write(why + "\n")
            print(f"trial {i + 1}/{args.trials} seed {seed}: FAIL {dt:.1f}s [{faults}]: {why}", flush=True)
            print(f"  replay: make chaos TRIALS=1 SEED={seed}    (kept: {t.dir})", flush=True)
            failures.append((seed, t.dir, why))
    wall = time.monotonic() - started
    print(f"chaos: wall time {wall:.0f} s, base seed {base}")
    for seed, d, why in failures:
        print(f"  FAILED seed {seed}: {why.splitlines()[0][:300]}" + (f" (kept {d})" if d else ""))
    print(f"chaos: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def client_summary(path):
    try:
        _, _, _, _, s, _ = parse_client_log(path)
    except OSError:
        return ""
    if not s:
        return ""
    return (f"{s['acked']} acked, {s['failed']} failed, {s['lost']} lost, {s['reads_ok']} reads, "
            f"{s['flushes_acked']} flushes, {s['connections']} connections")


if __name__ == "__main__":
    sys.exit(main())
