"""The draft-upload data path: devices send drafts to the server over TCP, through the shaped link.

Only this traffic goes to the server's data port, so ``tc`` classifies exactly it into each
device's shaped class; Ray's control traffic and SSH stay in the unshaped class.

Why a trailer. A token bucket (htb, tbf) charges a packet when it leaves: after an idle gap the
first packet of an upload leaves at once, whatever the rate, and a payload that fits in one
packet would cross a 50 kbit/s share as fast as an unshaped link. In an FDMA sub-band the payload
arrives when its last bit has been transmitted, ``bytes / rate`` after the start. So every upload
is followed by a 1-byte trailer frame (its own TCP segment: TCP_NODELAY, separate ``send``):
the shaper holds the trailer until the payload's bits have been paid for, and the server counts
the upload as arrived when the trailer arrives. With the shaped class's burst near zero
(``shaping.py``), the measured upload time is ``wire bytes of the payload / rate`` (plus the
trailer's own header when the bucket was already empty), as the model says. This holds when
the payload has left the socket before the trailer is written, as a draft of one segment does.
A payload of several segments whose last one still waits in the socket (the shaper holds the
earlier ones) gets the trailer merged into that last segment by TCP, and arrives one segment's
time early (measured: 2.8 kB at 45 kbit/s in 0.27 s instead of 0.53 s). The profiler sizes its
bulk transfers in whole segments (``mss()``) so that the trailer stays a segment of its own.

Wire format, every frame: ``u32 length`` (of the rest) ``u8 type`` ``u32 round`` ``u16 name
length`` ``name`` ``body``. Types: DRAFT (body = the engine's payload), END (trailer, empty body),
BULK (link measurement: body = filler bytes), PING. The server answers END and PING with one ACK
byte on the same connection (the downlink is not shaped).

Sizes on the wire: ``wire_bytes`` (a transfer plus one TCP/IP/Ethernet header per segment),
``trailer_bytes`` and ``metered_bits`` (what the shaper meters for one upload: the unit of the
profile's ``header_bits`` and ``bits_per_draft_token`` and of every link-rate estimate).

Main types: ``UploadReceiver`` (server: a thread that accepts connections, reassembles uploads,
``wait_for(round, names)``), ``UploadClient`` (device: ``send(round, payload) -> Upload``,
``bulk(nbytes)``, ``ping()``).

Limits: one upload in flight per device; IPv4; no authentication (the lab network is trusted).
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from dataclasses import dataclass

from testbed.errors import RemoteError

DRAFT, END, BULK, PING = 1, 2, 3, 4
ACK = b"\x06"
_HEAD = struct.Struct("!IBIH")        # length, type, round, name length
_MAX_FRAME = 64 * 1024 * 1024


FRAME_OVERHEAD_BYTES = 66       # per TCP segment on the wire: Ethernet 14 + IPv4 20 + TCP 32
MSS_BYTES = 1448                # TCP payload per segment on a 1500-byte MTU with timestamps


def wire_bytes(app_bytes: int, mss: int = MSS_BYTES) -> int:
    """Bytes on the wire for ``app_bytes`` sent in one go over TCP (headers per segment)."""
    return app_bytes + max(1, math.ceil(app_bytes / mss)) * FRAME_OVERHEAD_BYTES


def trailer_bytes(name: str) -> int:
    """The END frame of device ``name`` (counted in a step's ``wire_bytes``)."""
    return len(frame(END, 0, name))


def metered_bits(name: str, step_wire_bytes: int) -> float:
    """Bits the shaper meters for one upload of device ``name`` whose step reported
    ``step_wire_bytes`` (trailer frame included): the unit of the profile's ``header_bits`` and
    ``bits_per_draft_token``, so the one every estimate of a link rate must use too."""
    return 8.0 * wire_bytes(step_wire_bytes - trailer_bytes(name))


def frame(kind: int, round_id: int, name: str, body: bytes = b"") -> bytes:
    """Encode one frame (pure)."""
    raw = name.encode()
    length = _HEAD.size - 4 + len(raw) + len(body)
    return _HEAD.pack(length, kind, round_id, len(raw)) + raw + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[int, int, str, bytes]:
    head = _recv_exact(sock, _HEAD.size)
    length, kind, round_id, name_len = _HEAD.unpack(head)
    if length > _MAX_FRAME or length < _HEAD.size - 4 + name_len:
        raise ConnectionError(f"bad frame length {length}")
    rest = _recv_exact(sock, length - (_HEAD.size - 4))
    return kind, round_id, rest[:name_len].decode(), rest[name_len:]


@dataclass(frozen=True)
class Arrival:
    """A complete upload as the server saw it."""

    name: str
    round_id: int
    payload: bytes
    wire_bytes: int          # frame bytes of the upload, trailer included (TCP/IP headers not)
    first_byte_t: float      # server monotonic clock
    arrived_t: float         # when the trailer arrived (server monotonic clock)


@dataclass(frozen=True)
class Upload:
    """What a device measured for one upload (device clock)."""

    round_id: int
    payload_bytes: int
    wire_bytes: int
    upload_s: float          # send start to ACK (trailer delivered) on the device's clock


class UploadReceiver:
    """Server side: accepts device connections on ``host:port`` and collects uploads by round."""

    def __init__(self, host: str, port: int, *, backlog: int = 64):
        self.host, self.port = host, port
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise RemoteError(f"data path: cannot listen on {host}:{port}: {exc}") from None
        self._sock.listen(backlog)
        self.port = self._sock.getsockname()[1]
        self._cond = threading.Condition()
        self._arrivals: dict[tuple[int, str], Arrival] = {}
        self._conns: list[socket.socket] = []
        self._abandoned: set[str] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="upload-accept",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="upload-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        pending: dict[str, tuple[int, int, bytes, int, float]] = {}
        try:
            while True:
                kind, round_id, name, body = read_frame(conn)
                now = time.monotonic()
                size = _HEAD.size + len(name.encode()) + len(body)
                if kind in (DRAFT, BULK):
                    pending[name] = (kind, round_id, body, size, now)
                elif kind == END:
                    what, rid, payload, wire, first = pending.pop(
                        name, (DRAFT, round_id, b"", 0, now))
                    if what == DRAFT:  # bulk transfers are timed by the device alone
                        arrival = Arrival(name, rid, payload, wire + size, first, now)
                        with self._cond:
                            self._arrivals[(rid, name)] = arrival
                            self._cond.notify_all()
                    conn.sendall(ACK)
                elif kind == PING:
                    conn.sendall(ACK)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()

    def wait_for(self, round_id: int, names: list[str] | tuple[str, ...],
                 timeout_s: float) -> dict[str, Arrival]:
        """Block until every named device's upload of ``round_id`` has arrived; pop and return
        them. A device given up on (``abandon``) is no longer waited for and is left out of the
        result. Raises RemoteError naming the missing devices at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                missing = [n for n in names if (round_id, n) not in self._arrivals
                           and n not in self._abandoned]
                if not missing:
                    return {n: self._arrivals.pop((round_id, n)) for n in names
                            if (round_id, n) in self._arrivals}
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteError(f"data path: round {round_id}: no upload from "
                                      f"{', '.join(missing)} within {timeout_s:g} s")
                self._cond.wait(left)

    def abandon(self, name: str) -> None:
        """Stop waiting for ``name`` (a device that failed mid-round); ``readmit`` undoes it."""
        with self._cond:
            self._abandoned.add(name)
            self._cond.notify_all()

    def readmit(self, name: str) -> None:
        with self._cond:
            self._abandoned.discard(name)

    def discard_before(self, round_id: int) -> None:
        """Drop uploads of older rounds (a device that left mid-round)."""
        with self._cond:
            for key in [k for k in self._arrivals if k[0] < round_id]:
                del self._arrivals[key]

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            with self._cond:
                for c in self._conns:
                    try:
                        c.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    c.close()
                self._conns.clear()


class UploadClient:
    """Device side: one persistent TCP connection to the server's data port."""

    def __init__(self, name: str, server_host: str, port: int, *, timeout_s: float = 60.0):
        self.name = name
        self.server = (server_host, port)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                sock = socket.create_connection(self.server, timeout=self.timeout_s)
            except OSError as exc:
                raise RemoteError(f"{self.name}: data path: cannot connect to "
                                  f"{self.server[0]}:{self.server[1]}: {exc}") from None
            # NODELAY: each frame leaves as its own segment, so the trailer is a packet of its
            # own that the shaper holds until the payload's bits are paid for.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def _send_and_ack(self, kind: int, round_id: int, body: bytes) -> tuple[int, float]:
        sock = self._connect()
        head = frame(kind, round_id, self.name, body)
        tail = frame(END, round_id, self.name)
        t0 = time.monotonic()
        try:
            sock.sendall(head)
            sock.sendall(tail)
            if _recv_exact(sock, 1) != ACK:
                raise ConnectionError("bad acknowledgement")
        except OSError as exc:
            self.close()
            raise RemoteError(f"{self.name}: data path: upload of round {round_id} failed: "
                              f"{exc}") from None
        return len(head) + len(tail), time.monotonic() - t0

    def send(self, round_id: int, payload: bytes) -> Upload:
        wire, upload_s = self._send_and_ack(DRAFT, round_id, payload)
        return Upload(round_id, len(payload), wire, upload_s)

    def bulk(self, nbytes: int, round_id: int = 0) -> Upload:
        """Send ``nbytes`` of filler through the data path (link-rate measurement)."""
        wire, upload_s = self._send_and_ack(BULK, round_id, bytes(nbytes))
        return Upload(round_id, nbytes, wire, upload_s)

    def mss(self) -> int:
        """The connection's TCP maximum segment size (payload bytes per segment)."""
        return int(self._connect().getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))

    def ping(self) -> float:
        """Round-trip time of a tiny frame (seconds)."""
        sock = self._connect()
        t0 = time.monotonic()
        try:
            sock.sendall(frame(PING, 0, self.name))
            _recv_exact(sock, 1)
        except OSError as exc:
            self.close()
            raise RemoteError(f"{self.name}: data path: ping failed: {exc}") from None
        return time.monotonic() - t0

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
