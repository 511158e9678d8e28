#!/usr/bin/python3
"""NBD_CMD_WRITE_ZEROES with and without NO_HOLE (and with FUA), aligned
and unaligned: zeroed ranges read as zero, neighbours keep their data.

usage: write_zeroes.py URI
"""
import random
import sys

import nbd

MIB = 1024 * 1024


def main():
    uri = sys.argv[1]
    h = nbd.NBD()
    h.connect_uri(uri)
    if not h.can_zero():
        sys.exit("server does not advertise NBD_FLAG_SEND_WRITE_ZEROES")
    size = h.get_size()
    base = 2 * MIB
    span = 4 * MIB
    if size < base + span:
        sys.exit(f"export too small ({size})")
    min_block = max(h.get_block_size(nbd.SIZE_MINIMUM), 1)
    rng = random.Random(3)
    expect = bytearray(rng.randbytes(span))
    h.pwrite(bytes(expect), base)

    cases = [
        (0, MIB, 0),                                  # aligned, may punch a hole
        (MIB + 4096, 512 * 1024, nbd.CMD_FLAG_NO_HOLE),
        (2 * MIB, 64 * 1024, nbd.CMD_FLAG_FUA if h.can_fua() else 0),
    ]
    if min_block == 1:
        cases.append((3 * MIB + 1001, 3001, 0))       # unaligned both ends
    for rel, length, flags in cases:
        h.zero(length, base + rel, flags)
        expect[rel:rel + length] = bytes(length)
    h.flush()
    got = h.pread(span, base)
    if got != bytes(expect):
        first = next(i for i in range(span) if got[i] != expect[i])
        sys.exit(f"mismatch at export offset {base + first}: got {got[first]:#x} want {expect[first]:#x}")
    # A fresh connection sees the same.
    h2 = nbd.NBD()
    h2.connect_uri(uri)
    if h2.pread(span, base) != bytes(expect):
        sys.exit("a second connection reads different data after write-zeroes")
    h.shutdown()
    h2.shutdown()
    print(f"ok: {len(cases)} write-zeroes ranges verified")


if __name__ == "__main__":
    main()
