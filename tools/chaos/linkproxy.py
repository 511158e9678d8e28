"""A controllable TCP proxy for the peer link (threads, loopback only).

Each node dials its peer through one of these, so the driver can cut the
link in the ways a network does:

- up:        bytes flow.
- reset:     every connection is closed at once and new ones are closed as
             soon as they are accepted (a peer that resets connections).
- blackhole: nothing moves in either direction; connections stay open and
             new ones are accepted and held (a pulled cable: TCP stalls,
             the daemons only notice through their ping timeout). Healing
             lets held bytes through, as TCP retransmission would.
- oneway-a2b / oneway-b2a: only one direction stalls (dialer to target, or
             back).

Stalled directions stop reading, so the kernel buffers fill and the sender
blocks, like a real stalled TCP flow.
"""

import socket
import threading

MODES = ("up", "reset", "blackhole", "oneway-a2b", "oneway-b2a")


class LinkProxy:
    def __init__(self, target_port, name="proxy"):
        self.target_port = target_port
        self.name = name
        self.mode = "up"
        self.cv = threading.Condition()
        self.conns = set()
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.port = self.ls.getsockname()[1]
        self.closed = False
        self.accepted = 0
        self.forwarded = {"a2b": 0, "b2a": 0}
        threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True).start()

    def _flows(self, direction):
        m = self.mode
        if m in ("blackhole", "reset"):
            return False
        if m == "oneway-a2b":
            return direction != "a2b"
        if m == "oneway-b2a":
            return direction != "b2a"
        return True

    def stats(self):
        return (f"{self.name}: mode {self.mode}, {self.accepted} accepted, {len(self.conns)} open, "
                f"forwarded {self.forwarded['a2b']} bytes to and {self.forwarded['b2a']} from the target")

    def set_mode(self, mode):
        assert mode in MODES, mode
        with self.cv:
            self.mode = mode
            if mode == "reset":
                for a, b in list(self.conns):
                    _kill(a)
                    _kill(b)
                self.conns.clear()
            self.cv.notify_all()

    def close(self):
        self.closed = True
        with self.cv:
            for a, b in list(self.conns):
                _kill(a)
                _kill(b)
            self.conns.clear()
            self.cv.notify_all()
        try:
            self.ls.close()
        except OSError:
            pass

    def _accept_loop(self):
        while not self.closed:
            try:
                a, _ = self.ls.accept()
            except OSError:
                return
            self.accepted += 1
            with self.cv:
                if self.mode == "reset" or self.closed:
                    _kill(a)
                    continue
            try:
                b = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                b.settimeout(None)
            except OSError:
                _kill(a)
                continue
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (a, b)
            with self.cv:
                if self.mode == "reset" or self.closed:
                    _kill(a)
                    _kill(b)
                    continue
                self.conns.add(pair)
            threading.Thread(target=self._pump, args=(a, b, "a2b", pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, "b2a", pair), daemon=True).start()

    def _pump(self, src, dst, direction, pair):
        try:
            while True:
                with self.cv:
                    while not self._flows(direction) and pair in self.conns:
                        self.cv.wait()
                    if pair not in self.conns:
                        return
                data = src.recv(1 << 16)
                if not data:
                    break
                with self.cv:
                    # Stalled while this chunk was being read: hold it until the link heals.
                    while not self._flows(direction) and pair in self.conns:
                        self.cv.wait()
                    if pair not in self.conns:
                        return
                dst.sendall(data)
                self.forwarded[direction] += len(data)
        except OSError:
            pass
        finally:
            with self.cv:
                self.conns.discard(pair)
                self.cv.notify_all()
            _kill(src)
            _kill(dst)


def _kill(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
