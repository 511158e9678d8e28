#!/usr/bin/python3
"""Large TRIM and WRITE_ZEROES requests (issue 18), then writes that must
complete and read back.

usage: large_trim.py whole URI
         TRIM of the whole device in requests of at most 4 GiB - 4 KiB
       large_trim.py edges URI
         one TRIM of 4 GiB - 4 KiB, one TRIM and one WRITE_ZEROES of
         4 GiB - 1 (the largest length NBD carries; unaligned end)
Both then write 64 KiB blocks spread over the device, flush, and read them
back. Prints one JSON line: seconds per large request, and in all.
"""
import json
import os
import sys
import time

import nbd

KIB = 1024
GIB = 1024 * 1024 * 1024
LARGEST_ALIGNED = 4 * GIB - 4 * KIB


def timed(what, fn):
    t = time.monotonic()
    fn()
    return {"op": what, "seconds": round(time.monotonic() - t, 3)}


def whole(h, size):
    done = []
    off = 0
    while off < size:
        n = min(LARGEST_ALIGNED, size - off)
        done.append(timed(f"trim {off}+{n}", lambda: h.trim(n, off)))
        off += n
    return done


def edges(h, size):
    big = 4 * GIB - 1
    if size < big + 8 * KIB:
        sys.exit(f"export too small ({size})")
    # A pattern at the byte after the unaligned zeroed range must survive it.
    tail = os.urandom(4 * KIB)
    h.pwrite(tail, 8 * KIB + big)
    done = [
        timed("trim 0+4GiB-4KiB", lambda: h.trim(LARGEST_ALIGNED, 0)),
        timed("trim 4KiB+4GiB-1", lambda: h.trim(big, 4 * KIB)),
        timed("write_zeroes 8KiB+4GiB-1", lambda: h.zero(big, 8 * KIB)),
    ]
    if h.pread(4 * KIB, 8 * KIB + big) != tail:
        sys.exit("WRITE_ZEROES of 4 GiB - 1 changed the data after its end")
    if h.pread(64 * KIB, 1 * GIB) != bytes(64 * KIB):
        sys.exit("a zeroed range does not read as zeros")
    return done


def writes_after(h, size):
    """Writes 64 KiB blocks spread over the device and reads them back."""
    blocks = {}
    step = max(size // 16, 64 * KIB) // (64 * KIB) * (64 * KIB)
    for off in range(0, size - 64 * KIB + 1, step):
        data = os.urandom(64 * KIB)
        h.pwrite(data, off)
        blocks[off] = data
    h.flush()
    for off, data in blocks.items():
        if h.pread(len(data), off) != data:
            sys.exit(f"block at {off} did not read back")
    return len(blocks)


def main():
    mode, uri = sys.argv[1], sys.argv[2]
    h = nbd.NBD()
    h.connect_uri(uri)
    if not h.can_trim() or not h.can_zero():
        sys.exit("server does not advertise TRIM and WRITE_ZEROES")
    size = h.get_size()
    t = time.monotonic()
    if mode == "whole":
        done = whole(h, size)
    elif mode == "edges":
        done = edges(h, size)
    else:
        sys.exit(f"unknown mode {mode}")
    total = round(time.monotonic() - t, 3)
    n = writes_after(h, size)
    h.shutdown()
    print(json.dumps({"mode": mode, "requests": done, "seconds": total, "writes": n}))


if __name__ == "__main__":
    main()
