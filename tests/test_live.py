"""LiveSession pieces that need no running lab: the gate between tc work and ``close``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from testbed.errors import RunError
from testbed.inputs.inventory import load_inventory
from testbed.live.session import LiveSession

ROOT = Path(__file__).resolve().parent.parent


def test_close_waits_for_tc_work_in_flight_and_refuses_new_work():
    # The race this guards: Ctrl-C lands while shaping jobs are still being submitted; a job
    # that started after close() listed the shaped devices used to leave its qdisc behind.
    lab = LiveSession(load_inventory(ROOT / "inventory" / "local.yaml"))
    entered, release = threading.Event(), threading.Event()

    def in_flight():
        with lab._tc_work():
            entered.set()
            release.wait(30)

    worker = threading.Thread(target=in_flight)
    worker.start()
    assert entered.wait(30)
    problems: list = []
    closer = threading.Thread(target=lambda: problems.extend(lab.close()))
    closer.start()
    deadline = time.monotonic() + 30
    with lab._tc_gate:                      # close() has begun once the gate says so
        while not lab._closing and time.monotonic() < deadline:
            lab._tc_gate.wait(0.05)
    assert lab._closing
    with pytest.raises(RunError, match="closing"):
        with lab._tc_work():                # new tc work is refused from now on
            pass
    assert closer.is_alive()                # and close() is still waiting for the job in flight
    release.set()
    worker.join(30)
    closer.join(30)
    assert not closer.is_alive() and problems == []
