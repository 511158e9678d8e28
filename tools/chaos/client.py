#!/usr/bin/python3
"""The chaos workload: random writes, FUA writes, write-zeroes, trims, reads
and flushes through NBD (libnbd), to whichever node serves the export.

    client.py --uris URI[,URI...] --log FILE --run RUN --seed SEED [--qd N]

It tries the URIs in turn until one completes the handshake (only the
primary does), issues operations with up to QD in flight, and when the
connection dies, marks everything in flight as unanswered and tries again.
It never has two operations on the same block in flight, so the order it
issued operations on a block is the order they were served in.

Every operation is logged before it is issued ("I seq kind first count"),
every answer after it arrived ("A seq" acknowledged, "E seq why" failed or
unanswered); the log is fsynced at least every 50 ms and before exit, so an
"A" line in the log always follows a real acknowledgement. Reads are checked
at once against the rule in model.py ("V ..." lines are violations).

SIGTERM: stop issuing, wait (bounded by --drain-seconds) for what is in
flight, flush, write a summary line "S {...}" and exit 0; exit 3 if requests
were still unanswered at the drain deadline (the server hung), 4 on a read
violation.
"""

import argparse
import json
import os
import random
import signal
import sys
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model  # noqa: E402
from model import BLOCK, DATA_KINDS, FLUSH, FUA_WRITE, READ, TRIM, WRITE, ZEROES  # noqa: E402

stop_requested = False


def on_term(_sig, _frm):
    global stop_requested
    stop_requested = True


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1 << 16)
        self.last_sync = time.monotonic()

    def line(self, s):
        self.f.write(s + "\n")

    def sync(self, force=False):
        now = time.monotonic()
        if force or now - self.last_sync >= 0.05:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.last_sync = now

    def close(self):
        self.sync(True)
        self.f.close()


class Client:
    def __init__(self, args):
        self.uris = args.uris.split(",")
        self.run = args.run
        self.rng = random.Random(args.seed)
        self.qd = args.qd
        self.log = Log(args.log)
        self.h = None
        self.conn_no = 0
        self.seq = 0
        self.inflight = {}  # seq -> (kind, first, count, buf)
        self.busy = {}  # block -> seq
        self.state = {}  # block -> set of acceptable contents (absent: {ZERO})
        self.blocks = 0
        self.hot = []
        self.stats = {k: 0 for k in ("acked", "failed", "lost", "reads_ok", "violations",
                                     "flushes_acked", "connections", "issued")}
        self.next_uri = 0

    # ----- connection -----

    def try_connect(self):
        uri = self.uris[self.next_uri % len(self.uris)]
        self.next_uri += 1
        h = nbd.NBD()
        try:
            h.aio_connect_uri(uri)
            deadline = time.monotonic() + 3.0
            while not h.aio_is_ready():
                if h.aio_is_dead() or h.aio_is_closed() or time.monotonic() > deadline:
                    return False
                h.poll(100)
        except nbd.Error:
            return False
        size = h.get_size()
        if self.blocks == 0:
            self.blocks = size // BLOCK
            # A few hot regions (overwritten often) spread over the whole disk.
            self.hot = [self.rng.randrange(self.blocks - 16) for _ in range(48)]
        elif size // BLOCK != self.blocks:
            self.log.line(f"# size changed: {size}")
        self.h = h
        self.can_fua = h.can_fua()
        self.can_trim = h.can_trim()
        self.can_zero = h.can_zero()
        self.conn_no += 1
        self.stats["connections"] += 1
        self.log.line(f"C {self.conn_no} {uri}")
        return True

    def connection_lost(self, why):
        for seq in sorted(self.inflight):
            self.finish(seq, False, "lost")
            self.stats["lost"] += 1
        self.log.line(f"D {self.conn_no} {why}")
        self.log.sync(True)
        try:
            self.h.close()
        except (nbd.Error, AttributeError):
            pass
        self.h = None

    # ----- operations -----

    def pick_range(self):
        r = self.rng.random()
        count = 1 if r < 0.6 else (self.rng.randint(2, 4) if r < 0.85 else self.rng.randint(5, 16))
        for _ in range(8):
            if self.rng.random() < 0.6:
                first = self.rng.choice(self.hot) + self.rng.randrange(16)
            else:
                first = self.rng.randrange(self.blocks)
            count = min(count, self.blocks - first)
            if all(b not in self.busy for b in range(first, first + count)):
                return first, count
        return None

    def issue(self):
        h = self.h
        r = self.rng.random()
        if r < 0.05:
            kind = FLUSH
        elif r < 0.18:
            kind = READ
        elif r < 0.23 and self.can_zero:
            kind = ZEROES
        elif r < 0.27 and self.can_trim:
            kind = TRIM
        elif r < 0.35 and self.can_fua:
            kind = FUA_WRITE
        else:
            kind = WRITE
        self.seq += 1
        seq = self.seq
        if kind == FLUSH:
            first, count = 0, 0
        else:
            rng = self.pick_range()
            if rng is None:
                return False
            first, count = rng
        self.log.line(f"I {seq} {kind} {first} {count}")
        self.stats["issued"] += 1
        off, length = first * BLOCK, count * BLOCK
        cb = lambda err, seq=seq: self.completed(seq, err)  # noqa: E731
        buf = None
        if kind in (WRITE, FUA_WRITE):
            buf = nbd.Buffer.from_bytearray(bytearray(model.payload(self.run, seq, first, count)))
            flags = nbd.CMD_FLAG_FUA if kind == FUA_WRITE else 0
            self.inflight[seq] = (kind, first, count, buf)
            h.aio_pwrite(buf, off, completion=cb, flags=flags)
        elif kind == READ:
            buf = nbd.Buffer(length)
            self.inflight[seq] = (kind, first, count, buf)
            h.aio_pread(buf, off, completion=cb)
        elif kind == ZEROES:
            self.inflight[seq] = (kind, first, count, None)
            h.aio_zero(length, off, completion=cb)
        elif kind == TRIM:
            self.inflight[seq] = (kind, first, count, None)
            h.aio_trim(length, off, completion=cb)
        else:
            self.inflight[seq] = (kind, 0, 0, None)
            h.aio_flush(completion=cb)
        for b in range(first, first + count):
            self.busy[b] = seq
        return True

    def completed(self, seq, err):
        ok = err.value == 0
        if seq in self.inflight:
            self.finish(seq, ok, "" if ok else f"errno {err.value}")
        return 1

    def finish(self, seq, ok, why):
        kind, first, count, buf = self.inflight.pop(seq)
        for b in range(first, first + count):
            if self.busy.get(b) == seq:
                del self.busy[b]
        if kind == READ:
            if ok:
                self.check_read(seq, first, count, buf.to_bytearray())
            else:
                self.log.line(f"E {seq} {why}")
            return
        if ok:
            self.log.line(f"A {seq}")
            self.stats["flushes_acked" if kind == FLUSH else "acked"] += 1
        else:
            self.log.line(f"E {seq} {why}")
            self.stats["failed"] += 1
        if kind in DATA_KINDS:
            for b in range(first, first + count):
                self.state[b] = model.fold(self.state.get(b, {model.ZERO}), kind, seq, ok)

    def check_read(self, seq, first, count, data):
        self.stats["reads_ok"] += 1
        for i in range(count):
            b = first + i
            got = model.identify(self.run, b, bytes(data[i * BLOCK:(i + 1) * BLOCK]))
            want = self.state.get(b, {model.ZERO})
            if got not in want:
                self.stats["violations"] += 1
                self.log.line(f"V {seq} {b} read returned {got if isinstance(got, str) else model.describe({got})}"
                              f" but block {b} must hold one of {model.describe(want)}")
                self.log.sync(True)

    # ----- main loop -----

    def run_loop(self, drain_seconds, max_seconds):
        hard_deadline = time.monotonic() + max_seconds
        drain_deadline = None
        while True:
            now = time.monotonic()
            if (stop_requested or now > hard_deadline) and drain_deadline is None:
                drain_deadline = now + drain_seconds
                self.log.line("# stop requested")
            if self.h is None:
                if drain_deadline is not None:
                    break
                if not self.try_connect():
                    time.sleep(0.05)
                    continue
            if drain_deadline is None:
                try:
                    while len(self.inflight) < self.qd:
                        if not self.issue():
                            break
                except nbd.Error as e:
                    # Not queued: the op stays in flight until connection_lost fails it.
                    self.connection_lost(f"issue: {e}")
                    continue
            elif not self.inflight:
                break
            elif now > drain_deadline:
                break
            try:
                self.h.poll(100)
                dead = self.h.aio_is_dead() or self.h.aio_is_closed()
                why = "connection dead"
            except nbd.Error as e:
                dead, why = True, f"poll: {e}"
            if dead:
                self.connection_lost(why)
            self.log.sync()
        stuck = len(self.inflight)
        if stuck:
            self.log.line(f"H {stuck} requests unanswered {drain_seconds}s after the stop: "
                          + " ".join(str(s) for s in sorted(self.inflight)))
            for seq in sorted(self.inflight):
                self.log.line(f"E {seq} abandoned")
        elif self.h is not None:
            try:
                self.h.flush()
                self.log.line("# final flush done")
            except nbd.Error as e:
                self.log.line(f"# final flush failed: {e}")
            try:
                self.h.shutdown()
            except nbd.Error:
                pass
        self.log.line("S " + json.dumps(self.stats))
        self.log.line("X")
        self.log.close()
        print(json.dumps(self.stats), flush=True)
        if self.stats["violations"]:
            return 4
        return 3 if stuck else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--uris", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--run", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--qd", type=int, default=8)
    ap.add_argument("--drain-seconds", type=float, default=20.0)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    c = Client(args)
    c.log.line("# " + json.dumps({"run": args.run, "seed": args.seed, "qd": args.qd, "block": BLOCK}))
    sys.exit(c.run_loop(args.drain_seconds, args.max_seconds))


if __name__ == "__main__":
    main()
