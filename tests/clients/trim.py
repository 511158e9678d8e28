#!/usr/bin/python3
"""Fill [OFFSET, OFFSET+LEN) with data and flush (fill), or trim it and
flush (trim). Used with `nbdinfo --map` by the block-status test.

usage: trim.py fill|trim URI OFFSET LEN
"""
import os
import sys

import nbd


def main():
    mode, uri, off, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    h = nbd.NBD()
    h.connect_uri(uri)
    if mode == "fill":
        step = 1024 * 1024
        for o in range(off, off + length, step):
            n = min(step, off + length - o)
            h.pwrite(os.urandom(n), o)
    elif mode == "trim":
        if not h.can_trim():
            sys.exit("server does not advertise NBD_FLAG_SEND_TRIM")
        h.trim(length, off)
    else:
        sys.exit(f"unknown mode {mode}")
    h.flush()
    h.shutdown()
    print(f"ok: {mode} {off}+{length}")


if __name__ == "__main__":
    main()
