"""The draft-upload data path over real TCP sockets on loopback (unshaped here; the shaped
behaviour is tested with the emulated lab in test_lab*.py / the end-to-end test)."""

from __future__ import annotations

import threading

import pytest

from testbed.errors import RemoteError
from testbed.live.datapath import DRAFT, END, UploadClient, UploadReceiver, frame


@pytest.fixture
def receiver():
    r = UploadReceiver("127.0.0.1", 0)
    yield r
    r.close()


def test_frame_is_length_prefixed():
    f = frame(1, 7, "dev-a", b"xyz")
    assert int.from_bytes(f[:4], "big") == len(f) - 4


def test_uploads_from_several_devices_are_collected_by_round(receiver):
    clients = [UploadClient(f"dev-{i}", "127.0.0.1", receiver.port) for i in range(3)]
    sent = {}

    def go(c, i):
        sent[c.name] = c.send(5, bytes([i]) * (100 + i))

    threads = [threading.Thread(target=go, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    got = receiver.wait_for(5, [c.name for c in clients], timeout_s=10)
    for t in threads:
        t.join()
    for i, c in enumerate(clients):
        assert got[c.name].payload == bytes([i]) * (100 + i)
        # the DRAFT frame and its END trailer, as both ends counted them
        want = len(frame(DRAFT, 5, c.name, bytes([i]) * (100 + i))) + len(frame(END, 5, c.name))
        assert got[c.name].wire_bytes == sent[c.name].wire_bytes == want
        assert sent[c.name].upload_s > 0
        c.close()
    # popped: a second wait for the same round times out
    with pytest.raises(RemoteError, match="no upload from dev-0"):
        receiver.wait_for(5, ["dev-0"], timeout_s=0.05)


def test_bulk_and_ping(receiver):
    c = UploadClient("dev-x", "127.0.0.1", receiver.port)
    up = c.bulk(2_000_000)
    assert up.payload_bytes == 2_000_000 and up.upload_s > 0
    assert c.ping() > 0
    c.close()


def test_unreachable_server_is_a_remote_error():
    c = UploadClient("dev-y", "127.0.0.1", 1, timeout_s=2)
    with pytest.raises(RemoteError, match="dev-y: data path: cannot connect"):
        c.send(0, b"x")
