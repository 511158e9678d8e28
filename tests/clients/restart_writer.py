#!/usr/bin/python3
"""Writes and reads with verification while mirrord is restarted under it.

usage: restart_writer.py URI STOPFILE MAX_SECONDS

CONNECTIONS handles (one thread each), each with IN_FLIGHT asynchronous
commands at all times on its own slots: writes of data derived from (slot,
generation), and reads of slots whose last write was acknowledged, checked
on arrival. Runs until STOPFILE exists (exit 1 if it never does within
MAX_SECONDS), lets the commands in flight finish, then reads every slot back.
Any failed command, wrong data, or a command unanswered for COMMAND_LIMIT
seconds is an error (a request lost across a restart would hang; one answered
twice breaks libnbd's connection). Prints one JSON line of counts and the
longest time a command waited (the pause a restart caused).
Runs with Debian's /usr/bin/python3, which has python3-libnbd.
"""
import json
import os
import random
import sys
import threading
import time

import nbd

CONNECTIONS = 2
IN_FLIGHT = 8
CHUNK = 64 * 1024
SLOTS_PER_CONN = 128
COMMAND_LIMIT = 60


def data(slot, gen):
    return random.Random(slot * 1_000_003 + gen).randbytes(CHUNK)


class Worker:
    def __init__(self, uri, index, stopfile, deadline):
        self.uri = uri
        self.base = index * SLOTS_PER_CONN
        self.stopfile = stopfile
        self.deadline = deadline
        self.rng = random.Random(index)
        self.acked = {}       # slot -> generation last acknowledged
        self.busy = {}        # cookie -> (kind, slot, gen, buf, issued)
        self.gen = 0
        self.writes = self.reads = 0
        self.max_wait = 0.0
        self.error = None

    def issue(self, h):
        free = [s for s in range(self.base, self.base + SLOTS_PER_CONN)
                if not any(b[1] == s for b in self.busy.values())]
        slot = self.rng.choice(free)
        if slot in self.acked and self.rng.random() < 0.3:
            buf = nbd.Buffer(CHUNK)
            c = h.aio_pread(buf, slot * CHUNK)
            self.busy[c] = ("read", slot, self.acked[slot], buf, time.monotonic())
        else:
            self.gen += 1
            buf = nbd.Buffer.from_bytearray(bytearray(data(slot, self.gen)))
            c = h.aio_pwrite(buf, slot * CHUNK)
            self.busy[c] = ("write", slot, self.gen, buf, time.monotonic())

    def retire(self, h):
        now = time.monotonic()
        for c in list(self.busy):
            kind, slot, gen, buf, issued = self.busy[c]
            if now - issued > COMMAND_LIMIT:
                raise RuntimeError(f"{kind} of slot {slot} unanswered for {COMMAND_LIMIT}s")
            if not h.aio_command_completed(c):  # raises nbd.Error if it failed
                continue
            del self.busy[c]
            self.max_wait = max(self.max_wait, now - issued)
            if kind == "write":
                self.acked[slot] = gen
                self.writes += 1
            else:
                if bytes(buf.to_bytearray()) != data(slot, gen):
                    raise RuntimeError(f"slot {slot}: read does not match acknowledged write {gen}")
                self.reads += 1

    def run(self):
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not os.path.exists(self.stopfile):
                if time.monotonic() > self.deadline:
                    raise RuntimeError("the stop file never appeared")
                while len(self.busy) < IN_FLIGHT:
                    self.issue(h)
                h.poll(100)
                self.retire(h)
            while self.busy:
                h.poll(100)
                self.retire(h)
            for slot, gen in sorted(self.acked.items()):
                if h.pread(CHUNK, slot * CHUNK) != data(slot, gen):
                    raise RuntimeError(f"slot {slot}: acknowledged write {gen} does not read back")
            h.shutdown()
        except (nbd.Error, RuntimeError) as e:
            self.error = f"connection {self.base // SLOTS_PER_CONN}: {e}"


def main():
    uri, stopfile, max_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    deadline = time.monotonic() + max_seconds
    workers = [Worker(uri, i, stopfile, deadline) for i in range(CONNECTIONS)]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {
        "writes": sum(w.writes for w in workers),
        "reads": sum(w.reads for w in workers),
        "slots_verified": sum(len(w.acked) for w in workers),
        "max_wait_ms": round(max(w.max_wait for w in workers) * 1000, 1),
        "errors": [w.error for w in workers if w.error],
    }
    print(json.dumps(out))
    if out["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
