"""What the chaos client writes and what the checker accepts (stdlib only).

Shared by client.py (which writes blocks and checks its own reads online) and
chaos.py (which checks both backing files after a trial).

Every block the client writes is self-describing: a 32-byte header
(magic, run id, operation sequence number, block index) followed by
SHAKE-128 of that header, so any 4 KiB block read back can be attributed to
exactly one write, or recognised as zeros, or as garbage.

The acceptance rule, per block, folding that block's operations in issue
order (the client never has two operations on one block in flight, so issue
order is the order the server served them in):

    S := {ZERO}                         the backing files start as zeros
    acknowledged write / FUA write w:   S := {w}
    acknowledged write-zeroes:          S := {ZERO}
    acknowledged trim:                  S := S | {ZERO}   (trimmed data is undefined:
                                                           old contents or zeros)
    failed or unanswered operation o:   S := S | contents(o)   (it may or may not
                                                           have reached a disk)

and the block on each disk (and every online read of it) must hold a member
of S. An acknowledgement is final: nothing issued before it may show up
afterwards, and nothing it wrote may be lost.
"""

import hashlib
import struct

BLOCK = 4096
MAGIC = b"CHAOSBLK"
HDR = struct.Struct("<8sQQQ")
ZERO = 0  # the "sequence number" of zeros (never used by an operation)
ZERO_BLOCK = bytes(BLOCK)

# Operation kinds as logged.
WRITE = "W"
FUA_WRITE = "U"
ZEROES = "Z"
TRIM = "T"
READ = "R"
FLUSH = "F"
DATA_KINDS = (WRITE, FUA_WRITE, ZEROES, TRIM)


def block_payload(run, seq, block):
    h = HDR.pack(MAGIC, run, seq, block)
    return h + hashlib.shake_128(h).digest(BLOCK - len(h))


def payload(run, seq, first, count):
    return b"".join(block_payload(run, seq, b) for b in range(first, first + count))


def identify(run, block, data):
    """ZERO, the sequence number of the write whose data this is, or an error string."""
    if data == ZERO_BLOCK:
        return ZERO
    magic, r, seq, b = HDR.unpack_from(data)
    if magic != MAGIC:
        return "garbage (no block header)"
    if r != run:
        return f"a block of another run ({r})"
    if b != block:
        return f"the data of block {b} (write {seq}) at block {block}"
    if data != block_payload(run, seq, block):
        return f"a torn or corrupted copy of write {seq}"
    return seq


def contents(kind, seq, prev):
    """The contents an operation may leave in a block, given the set before it."""
    if kind in (WRITE, FUA_WRITE):
        return {seq}
    if kind == ZEROES:
        return {ZERO}
    if kind == TRIM:
        return set(prev) | {ZERO}
    raise ValueError(kind)


def fold(state, kind, seq, acked):
    """The acceptable set of one block after one operation on it."""
    c = contents(kind, seq, state)
    if acked:
        return c
    return set(state) | c


def describe(s):
    return "{" + ", ".join("zeros" if x == ZERO else f"write {x}" for x in sorted(s)) + "}"
