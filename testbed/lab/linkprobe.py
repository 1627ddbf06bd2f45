"""Measure a link for real: a TCP sink on the server, a sender on a device, bytes over time.

Used by the lab's tests and ``bench/emulated_lab.py`` to check that a shaped uplink carries its
configured rate. ``Sink`` listens on (host, port) on this machine (the server's address, in the
root namespace) and keeps one ``Flow`` per sending address; ``SENDER`` is the program a device
runs through its runner (over SSH: inside its namespace and CPU quota) to send for a while with
a small send buffer, so that little is still queued when it stops; ``send_from`` runs it.

A flow's ``rate_bps`` counts payload bytes after the first arrival, over the time from the first
to the last arrival: TCP/IP/Ethernet headers (66 of 1514 bytes per full frame) are not counted,
so it reads about 4% below the tc rate, which counts whole frames.

Limits: IPv4, TCP, one flow per sending address at a time.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

# A device sends to HOST:PORT for SECONDS with a small send buffer (so little is still queued
# when it stops), then closes. Runs inside the device's namespace through its SSH runner.
SENDER = """
import socket, sys, time
host, port, seconds, total = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
s.connect((host, port))
buf, sent, end = b"x" * 16384, 0, time.monotonic() + seconds
while time.monotonic() < end and (total <= 0 or sent < total):
    sent += s.send(buf if total <= 0 else buf[:max(1, min(len(buf), total - sent))])
s.close()
print(sent)
"""


@dataclass
class Flow:
    first_t: float | None = None
    first_bytes: int = 0
    last_t: float | None = None
    nbytes: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def rate_bps(self) -> float:
        """Bytes after the first arrival over the time from first to last arrival."""
        span = (self.last_t or 0) - (self.first_t or 0)
        return (self.nbytes - self.first_bytes) * 8 / span if span > 0 else float("nan")

    @property
    def seconds(self) -> float:
        return (self.last_t or 0) - (self.first_t or 0)


class Sink:
    """TCP receiver on (host, port) in the root namespace; one Flow per sending address."""

    def __init__(self, host: str, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.flows: dict[str, Flow] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def flow(self, peer: str) -> Flow:
        with self.lock:
            return self.flows.setdefault(peer, Flow())

    def reset(self) -> None:
        with self.lock:
            self.flows.clear()

    def _accept(self) -> None:
        while True:
            try:
                conn, (peer, _) = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn, self.flow(peer)), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, flow: Flow) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                now = time.monotonic()
                if not data:
                    break
                if flow.first_t is None:
                    flow.first_t, flow.first_bytes = now, len(data)
                flow.last_t = now
                flow.nbytes += len(data)
        flow.done.set()

    def close(self) -> None:
        self.sock.close()


def send_from(runner, node, host: str, port: int, seconds: float, total: int = 0) -> int:
    """Run SENDER on ``node`` (its venv's python) for ``seconds`` or ``total`` bytes; bytes sent."""
    res = runner.run([node.python_bin, "-c", SENDER, host, str(port), str(seconds), str(total)],
                     timeout_s=seconds + 60)
    return int(res.stdout.split()[-1])
