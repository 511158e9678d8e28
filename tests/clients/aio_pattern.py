#!/usr/bin/python3
"""64 asynchronous writes in flight at once (random data, random sizes and
non-overlapping offsets, some with FUA), then 64 asynchronous reads of the
same ranges on a fresh connection; every byte must match.

usage: aio_pattern.py URI [SEED]      (exit 0 = all verified)
Runs with Debian's /usr/bin/python3, which has python3-libnbd.
"""
import random
import sys
import time

import nbd

IN_FLIGHT = 64
SLOT = 256 * 1024          # each command stays inside its own slot
DEADLINE_SECONDS = 120


def wait_all(h, cookies, what):
    """Polls until every cookie has retired; raises on any failed command."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    pending = set(cookies)
    while pending:
        if time.monotonic() > deadline:
            sys.exit(f"{what}: {len(pending)} commands still pending after {DEADLINE_SECONDS}s")
        h.poll(1000)
        for c in list(pending):
            # aio_command_completed raises nbd.Error if the command failed.
            if h.aio_command_completed(c):
                pending.discard(c)


def main():
    uri = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rng = random.Random(seed)

    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    min_block = max(h.get_block_size(nbd.SIZE_MINIMUM), 1)
    slots = size // SLOT
    if slots < IN_FLIGHT:
        sys.exit(f"export of {size} bytes is too small for {IN_FLIGHT} slots of {SLOT}")

    plan = []  # (offset, data)
    for slot in rng.sample(range(slots), IN_FLIGHT):
        length = rng.randrange(1, SLOT // min_block) * min_block
        start = rng.randrange(0, (SLOT - length) // min_block + 1) * min_block
        plan.append((slot * SLOT + start, rng.randbytes(length)))

    can_fua = h.can_fua()
    cookies = []
    max_in_flight = 0
    for i, (off, data) in enumerate(plan):
        flags = nbd.CMD_FLAG_FUA if (can_fua and i % 4 == 0) else 0
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        cookies.append(h.aio_pwrite(buf, off, flags=flags))
        max_in_flight = max(max_in_flight, h.aio_in_flight())
    if max_in_flight < IN_FLIGHT:
        sys.exit(f"only {max_in_flight} writes were in flight at once, wanted {IN_FLIGHT}")
    wait_all(h, cookies, "writes")
    h.flush()
    h.shutdown()

    r = nbd.NBD()
    r.connect_uri(uri)
    bufs = []
    for off, data in plan:
        buf = nbd.Buffer(len(data))
        bufs.append((off, data, buf, r.aio_pread(buf, off)))
    if r.aio_in_flight() < IN_FLIGHT:
        sys.exit(f"only {r.aio_in_flight()} reads in flight, wanted {IN_FLIGHT}")
    wait_all(r, [b[3] for b in bufs], "reads")
    bad = 0
    for off, data, buf, _ in bufs:
        got = bytes(buf.to_bytearray())
        if got != data:
            bad += 1
            first = next(i for i in range(len(data)) if got[i] != data[i])
            print(f"MISMATCH at offset {off} len {len(data)}: first differing byte +{first}")
    r.shutdown()
    if bad:
        sys.exit(f"{bad} of {IN_FLIGHT} ranges read back wrong")
    print(f"ok: {IN_FLIGHT} async writes (max in flight {max_in_flight}) and reads verified")


if __name__ == "__main__":
    main()
