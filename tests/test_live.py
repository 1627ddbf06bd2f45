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


def test_the_session_turns_shares_and_snr_into_rates_with_the_controllers_function():
    """The one place a share becomes a tc rate: the Shannon rate of that share of the band on
    the device's true channel (the function the controller plans with), at least what tc can
    hold. Before ``open`` no device has a shell, so nothing is applied: only the state moves."""
    from testbed.control.model import uplink_rate_bps
    from testbed.lab.shaping import MIN_RATE_BPS
    inv = load_inventory(ROOT / "inventory" / "local.yaml")
    session = LiveSession(inv)
    band = inv.channel.bandwidth_hz
    assert session.rate_bps("dev-a", 0.5) == pytest.approx(uplink_rate_bps(0.5, band, 22.0))
    session.set_shares({"dev-a": 0.25, "dev-d": 0.0})
    assert session.devices["dev-a"].share == 0.25
    assert session.rate_bps("dev-a") == pytest.approx(uplink_rate_bps(0.25, band, 22.0))
    assert session.rate_bps("dev-d") == MIN_RATE_BPS             # no share: tc's floor
    session.set_snr("dev-a", -5.0)                               # the channel collapses
    assert session.rate_bps("dev-a") == pytest.approx(uplink_rate_bps(0.25, band, -5.0))
    assert session.devices["dev-a"].rate_bps is None             # nothing applied without a shell
    session.close()


def test_link_share_is_the_planned_share_or_an_equal_one_when_not_drafting():
    from testbed.control.problem import DevicePlan, Plan
    from testbed.live.loop import link_share
    plan = Plan("multispin-heterogeneous", 1.0, 10.0, (
        DevicePlan("a", 4, 0.7, 70_000.0, 3.0), DevicePlan("b", 0, 0.0, 0.0, 1.0),
        DevicePlan("c", 2, 0.3, 30_000.0, 2.0)))
    assert [link_share(plan, n) for n in ("a", "b", "c", "zz")] == [0.7, 1 / 3, 0.3, 1 / 3]
