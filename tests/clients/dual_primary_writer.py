#!/usr/bin/python3
"""Writes tagged blocks to overlapping slots through one NBD connection.

    dual_primary_writer.py URI WRITER_ID SLOTS SLOT_SIZE SECONDS QD SEED MAX_WRITES

Every write fills one whole slot. Each 512-byte sector of it starts with a
header (b"DPW1", writer id, sequence number, slot, sector index) and is
filled after the header with a byte derived from (writer, seq), so a reader
can tell which write each sector came from. Runs for SECONDS (or MAX_WRITES
writes), QD writes in flight, then flushes. Prints one JSON object:
{"acked": [[slot, seq], ...], "errors": N}.
"""

import json
import random
import struct
import sys
import time

import nbd

HDR = struct.Struct(">4sIQII")


def payload(writer, seq, slot, size):
    fill = bytes([(writer * 131 + seq * 7) % 251 + 1])
    sectors = []
    for i in range(size // 512):
        h = HDR.pack(b"DPW1", writer, seq, slot, i)
        sectors.append(h + fill * (512 - len(h)))
    return b"".join(sectors)


def main():
    uri, writer, slots, slot_size, seconds, qd, seed, max_writes = sys.argv[1:9]
    writer, slots, slot_size, qd, seed, max_writes = map(int, (writer, slots, slot_size, qd, seed, max_writes))
    seconds = float(seconds)
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    acked = []
    errors = 0
    inflight = {}
    seq = 0
    deadline = time.monotonic() + seconds

    def done(cookie_seq, slot, err):
        nonlocal errors
        inflight.pop(cookie_seq, None)
        if err.value != 0:
            errors += 1
        else:
            acked.append([slot, cookie_seq])
        return 1

    while (time.monotonic() < deadline and seq < max_writes) or h.aio_in_flight() > 0:
        while time.monotonic() < deadline and seq < max_writes and h.aio_in_flight() < qd:
            seq += 1
            slot = rng.randrange(slots)
            buf = nbd.Buffer.from_bytearray(bytearray(payload(writer, seq, slot, slot_size)))
            s = seq
            h.aio_pwrite(buf, slot * slot_size,
                         completion=lambda err, s=s, slot=slot: done(s, slot, err))
            inflight[s] = buf
        h.poll(-1)
    h.flush()
    h.shutdown()
    print(json.dumps({"acked": acked, "errors": errors}))


if __name__ == "__main__":
    main()
