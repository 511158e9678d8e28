#!/usr/bin/python3
"""A fault-injecting TCP proxy for tests of the peer link (loopback only).

    faultproxy.py LISTEN_PORT TARGET_PORT [--corrupt-at N] [--direction a2b|b2a]

Forwards every connection accepted on 127.0.0.1:LISTEN_PORT to
127.0.0.1:TARGET_PORT. With --corrupt-at N, the byte at stream offset N of
the first connection, in the chosen direction (a2b: client to target), has
one bit flipped, once; everything else passes through unchanged. It prints
"corrupted offset N" on stdout when it does, and "listening" when ready.
"""

import argparse
import socket
import sys
import threading


def pump(src, dst, corrupt_at, flag, lock):
    seen = 0
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if corrupt_at is not None:
                with lock:
                    todo = not flag["done"]
                    if todo and seen <= corrupt_at < seen + len(data):
                        i = corrupt_at - seen
                        data = data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]
                        flag["done"] = True
                        print(f"corrupted offset {corrupt_at}", flush=True)
            seen += len(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("listen_port", type=int)
    ap.add_argument("target_port", type=int)
    ap.add_argument("--corrupt-at", type=int)
    ap.add_argument("--direction", choices=["a2b", "b2a"], default="a2b")
    ap.add_argument("--max-connections", type=int, default=1000)
    args = ap.parse_args()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", args.listen_port))
    ls.listen(16)
    print("listening", flush=True)
    flag = {"done": False}
    lock = threading.Lock()
    served = 0
    for _ in range(args.max_connections):
        a, _ = ls.accept()
        try:
            b = socket.create_connection(("127.0.0.1", args.target_port), timeout=5)
            b.settimeout(None)
        except OSError:
            # Target not up yet: refuse this one, keep serving.
            a.close()
            continue
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = served == 0
        served += 1
        c_a2b = args.corrupt_at if first and args.direction == "a2b" else None
        c_b2a = args.corrupt_at if first and args.direction == "b2a" else None
        threading.Thread(target=pump, args=(a, b, c_a2b, flag, lock), daemon=True).start()
        threading.Thread(target=pump, args=(b, a, c_b2a, flag, lock), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
