#!/usr/bin/python3
"""The kernel's own cost of what a replicated 1 MiB write needs beyond a single
node's, measured with no nbd-mirror code (issue 21's 1M CPU target).

Three transfers of 1 MiB messages between two processes on this machine, each
written into a file's page cache at a rotating offset:

  unix-splice  a unix socket, the receiver splices socket -> pipe -> file: what
               the single node does with a large NBD WRITE (its whole work);
  tcp-recv     loopback TCP, the sender send()s, the receiver recv()s into a
               buffer and pwrite()s it: the peer link as nbd-mirror runs it;
  tcp-splice   loopback TCP, the receiver splices socket -> pipe -> file: the
               peer link with the copy out of the socket saved.

For each: CPU per MiB of the receiver and of the sender (getrusage; loopback
TCP's receive processing runs in the sender's softirq, so it is charged to the
sender), medians over ROUNDS. The floor under the pair's CPU per MiB is then
single + TCP sender + TCP receiver (the primary must at least do the single
node's work, send every MiB on the peer link, and the peer must take it in and
write it), and the floor ratio is that over single.

usage: loopback_floor.py DIR [MIB] [ROUNDS]
  DIR: where the scratch file goes (256 MiB, removed after); MIB per transfer
  (default 2048); ROUNDS (default 3). Prints a markdown table and a last line
  "floor-ratio R" (R = the pair's floor / the single node, tcp-recv path).
"""
import fcntl
import os
import resource
import socket
import statistics
import sys
import time

MIB = 1 << 20
REGION = 256  # MiB of the scratch file, reused in turn
PIPE_SIZE = MIB


def cpu_self():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def connected_pair(kind):
    if kind == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    tx = socket.create_connection(lst.getsockname())
    tx.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rx, _ = lst.accept()
    lst.close()
    return rx, tx


def send_all(tx, mib):
    buf = memoryview(b"x" * MIB)
    for _ in range(mib):
        tx.sendall(buf)


def receive_copy(rx, fd, mib):
    buf = bytearray(MIB)
    view = memoryview(buf)
    for i in range(mib):
        got = 0
        while got < MIB:
            n = rx.recv_into(view[got:], MIB - got)
            if n == 0:
                raise RuntimeError("sender closed early")
            got += n
        off = (i % REGION) * MIB
        done = 0
        while done < MIB:
            done += os.pwrite(fd, view[done:], off + done)


def receive_splice(rx, fd, mib):
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        for i in range(mib):
            base = (i % REGION) * MIB
            got = 0
            while got < MIB:
                n = os.splice(rx.fileno(), w, MIB - got, flags=os.SPLICE_F_MOVE)
                if n == 0:
                    raise RuntimeError("sender closed early")
                left = n
                while left:
                    m = os.splice(r, fd, left, offset_dst=base + got + (n - left),
                                  flags=os.SPLICE_F_MOVE)
                    left -= m
                got += n
    finally:
        os.close(r)
        os.close(w)


def one(kind, receive, path, mib):
    """(receiver µs per MiB, sender µs per MiB, MiB/s) of one transfer."""
    rx, tx = connected_pair(kind)
    before_children = cpu_children()
    pid = os.fork()
    if pid == 0:
        rx.close()
        try:
            send_all(tx, mib)
        finally:
            os._exit(0)
    tx.close()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, REGION * MIB)
    start, start_cpu = time.monotonic(), cpu_self()
    try:
        receive(rx, fd, mib)
    finally:
        os.close(fd)
        rx.close()
    rx_cpu, secs = cpu_self() - start_cpu, time.monotonic() - start
    os.waitpid(pid, 0)
    tx_cpu = cpu_children() - before_children
    return rx_cpu * 1e6 / mib, tx_cpu * 1e6 / mib, mib / secs


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = os.path.join(sys.argv[1], "loopback-floor.scratch")
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    cases = [("unix-splice", "unix", receive_splice),
             ("tcp-recv", "tcp", receive_copy),
             ("tcp-splice", "tcp", receive_splice)]
    got = {name: [] for name, _, _ in cases}
    try:
        for _ in range(rounds):
            for name, kind, receive in cases:
                got[name].append(one(kind, receive, path, mib))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    med = {name: tuple(statistics.median(r[i] for r in runs) for i in range(3))
           for name, runs in got.items()}
    print(f"{mib} MiB per transfer, {rounds} rounds, medians (lowest–highest):")
    print()
    print("| transfer | receiver µs/MiB | sender µs/MiB | MiB/s |")
    print("|---|---:|---:|---:|")
    for name, runs in got.items():
        cells = []
        for i in range(3):
            vals = [r[i] for r in runs]
            cells.append(f"{statistics.median(vals):,.0f} ({min(vals):,.0f}–{max(vals):,.0f})")
        print(f"| {name} | {' | '.join(cells)} |")
    single = med["unix-splice"][0]
    tcp_rx, tcp_tx, _ = med["tcp-recv"]
    floor = single + tcp_tx + tcp_rx
    print()
    print(f"floor: single {single:,.0f} + TCP send {tcp_tx:,.0f} + peer receive {tcp_rx:,.0f}"
          f" = {floor:,.0f} µs/MiB")
    print(f"floor-ratio {floor / single:.2f}")


if __name__ == "__main__":
    main()
