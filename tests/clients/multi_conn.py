#!/usr/bin/python3
"""Multi-connection consistency: write on one connection, flush on a
second, read on a third; the read must see the write. The server must
advertise NBD_FLAG_CAN_MULTI_CONN.

usage: multi_conn.py URI [ROUNDS]
"""
import random
import sys

import nbd

CHUNK = 1024 * 1024


def main():
    uri = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    hs = []
    for _ in range(3):
        h = nbd.NBD()
        h.connect_uri(uri)
        hs.append(h)
    for i, h in enumerate(hs):
        if not h.can_multi_conn():
            sys.exit(f"connection {i}: server does not advertise NBD_FLAG_CAN_MULTI_CONN")
    writer, flusher, reader = hs
    size = writer.get_size()
    rng = random.Random(7)
    for n in range(rounds):
        off = rng.randrange(0, size // CHUNK) * CHUNK
        data = rng.randbytes(CHUNK)
        writer.pwrite(data, off)
        flusher.flush()
        got = reader.pread(CHUNK, off)
        if got != data:
            sys.exit(f"round {n}: reader did not see the write at {off} after a flush on another connection")
        # And with FUA instead of a flush, when offered.
        if writer.can_fua():
            data2 = rng.randbytes(4096)
            writer.pwrite(data2, off, nbd.CMD_FLAG_FUA)
            if reader.pread(4096, off) != data2:
                sys.exit(f"round {n}: reader did not see a FUA write at {off}")
    for h in hs:
        h.shutdown()
    print(f"ok: {rounds} rounds across 3 connections")


if __name__ == "__main__":
    main()
