#!/usr/bin/python3
"""Sequential write workload for the SIGTERM test.

write URI ACKLOG: writes CHUNK-sized blocks i = 0, 1, 2, ... at offset
  (i * CHUNK) % size with data derived from i, appending "i" to ACKLOG after
  each write is acknowledged, until the server goes away (or MAX_WRITES).
verify URI ACKLOG: for every offset, the last acknowledged block must be
  there, except that the one write that may have been in flight (the one
  after the last acknowledged) may have landed instead.
"""
import random
import sys

import nbd

CHUNK = 256 * 1024
MAX_WRITES = 200000


def block(i):
    return random.Random(i).randbytes(CHUNK)


def write(uri, acklog):
    h = nbd.NBD()
    h.connect_uri(uri)
    slots = h.get_size() // CHUNK
    with open(acklog, "w") as log:
        for i in range(MAX_WRITES):
            try:
                h.pwrite(block(i), (i % slots) * CHUNK)
            except nbd.Error as e:
                print(f"write {i} ended by the server: {e}")
                return
            log.write(f"{i}\n")
            log.flush()
    print(f"all {MAX_WRITES} writes acknowledged; the server was never stopped")


def verify(uri, acklog):
    with open(acklog) as f:
        acked = [int(line) for line in f if line.strip()]
    if not acked:
        sys.exit("no acknowledged writes to verify")
    h = nbd.NBD()
    h.connect_uri(uri)
    slots = h.get_size() // CHUNK
    last = acked[-1]
    latest = {}
    for i in acked:
        latest[i % slots] = i
    maybe = last + 1  # may or may not have reached the disk
    bad = 0
    for slot, i in sorted(latest.items()):
        got = h.pread(CHUNK, slot * CHUNK)
        if got == block(i):
            continue
        if slot == maybe % slots and got == block(maybe):
            continue
        bad += 1
        print(f"slot {slot}: acknowledged write {i} is not on disk")
    h.shutdown()
    if bad:
        sys.exit(f"{bad} acknowledged writes lost (of {len(latest)} slots checked, {len(acked)} acks)")
    print(f"ok: {len(acked)} acknowledged writes, {len(latest)} slots verified")


def main():
    mode, uri, acklog = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "write":
        write(uri, acklog)
    elif mode == "verify":
        verify(uri, acklog)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
