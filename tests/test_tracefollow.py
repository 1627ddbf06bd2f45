"""Following channel traces without a lab: the live follower thread against LiveSession with
stand-in shells (>= 10 tc changes a second, the session's rate function, serialised with
re-plans, stopped cleanly, a closing session and a failing link), the experiment loop's hooks
(the follower stops on Ctrl-C and on errors: no thread left), the simulator following a trace
(an upload across a step, by hand; every policy sees the same channel) and the checker
(records/tracecheck.py). The follower against a real lab is in tests/test_trace_live.py."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until

from testbed.control.model import uplink_rate_bps
from testbed.errors import RunError
from testbed.inputs.experiment import load_experiment
from testbed.inputs.inventory import load_inventory
from testbed.lab.remote import Result
from testbed.live import loop, tracefollow
from testbed.live.session import LiveSession
from testbed.records import tracecheck
from testbed.sim.lab import SimLab
from testbed.sim.population import SimDevice, SimServer
from testbed.traces import Trace, load_trace

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/local.json"


def _trace(tmp_path: Path, step_s: float, seconds: float, name: str = "t.csv",
           values=(10.0, 14.0), loop_: bool = True) -> Trace:
    """A trace that alternates between two values every ``step_s``."""
    n = round(seconds / step_s)
    rows = [f"{i * step_s:.4f},{values[i % 2]}" for i in range(n)]
    path = tmp_path / name
    path.write_text("t_s,snr_db\n" + "\n".join(rows) + "\n")
    return load_trace(path, loop=loop_)


class FakeShell:
    """Stands in for a device's long-lived shell: records tc changes, answers tc show."""

    def __init__(self, node: str, delay_s: float = 0.004, fail: bool = False):
        self.node, self.delay_s, self.fail = node, delay_s, fail
        self.is_root = True
        self.changes: list[tuple[float, float]] = []
        self.rate: float | None = None
        self._lock = threading.Lock()
        self.busy = 0
        self.overlapped = False

    def run(self, argv, *, timeout_s=60.0, check=True, sudo=False, env=None, stdin=None):
        with self._lock:
            self.busy += 1
            self.overlapped |= self.busy > 1
        try:
            time.sleep(self.delay_s)
            if list(argv[:3]) == ["tc", "class", "change"]:
                if self.fail:
                    return Result(" ".join(argv), 1, "", "Cannot find device")
                self.rate = float(argv[argv.index("rate") + 1][:-3])
                self.changes.append((time.monotonic(), self.rate))
            out = ""
            if list(argv[:3]) == ["tc", "-s", "class"] and self.rate is not None:
                r = int(self.rate)
                out = (f"class htb 1:10 root prio 0 rate {r}bit ceil {r}bit burst 2b cburst 2b \n"
                       " Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0) \n")
            return Result(" ".join(argv), 0, out, "")
        finally:
            with self._lock:
                self.busy -= 1

    def close(self):
        pass


def _session(fail: set[str] = frozenset()) -> tuple[LiveSession, dict[str, FakeShell]]:
    session = LiveSession(load_inventory(ROOT / "inventory/local.yaml"))
    shells = {}
    for name in ("dev-a", "dev-b"):
        dev = session.devices[name]
        dev.runner = dev.shell = shells[name] = FakeShell(name, fail=name in fail)
        dev.share = 0.25
        dev.rate_bps = session.rate_bps(name)
    return session, shells


def _follow(session, traces, events, hz=None):
    t_start = time.monotonic()
    return tracefollow.start(session, traces, write=events.append, clock=time.monotonic,
                             t_start=t_start, policy="p", repeat=0, hz=hz), t_start


def _followers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "trace-follower"]


def _planners() -> list[threading.Thread]:
    """The live loop's planner threads (re-plans beside the round: live/loop.py)."""
    return [t for t in threading.enumerate() if t.name.startswith("planner")]


def test_the_follower_applies_ten_or_more_changes_a_second_and_stops_cleanly(tmp_path):
    session, shells = _session()
    traces = {"dev-a": _trace(tmp_path, 0.1, 10), "dev-b": _trace(tmp_path, 0.05, 10, "b.csv")}
    assert tracefollow.follow_hz(traces) == pytest.approx(20)   # the faster trace's rate
    events: list[dict] = []
    t0 = time.monotonic()
    follower, _ = _follow(session, traces, events)
    assert follower.alive and session.rate_listener is not None
    time.sleep(2.0)
    follower.stop()
    took = time.monotonic() - t0
    assert _followers() == [] and not follower.alive and session.rate_listener is None
    for name, per_s in (("dev-a", 10), ("dev-b", 20)):
        n = len(shells[name].changes)
        print(f"\n{name}: {n} tc changes in {took:.2f} s ({n / took:.1f}/s)")
        assert n >= 0.8 * per_s * took
    assert events[0]["start"] and events[0]["trace_s"] == 0.0
    changes = [c for e in events for c in e["changes"] if not e.get("start")]
    assert len(changes) == sum(len(s.changes) for s in shells.values())
    band = session.channel.bandwidth_hz
    for c in changes:
        # what tc got is the session's rate function of the share held and the trace's SNR
        trace = traces[c["device"]]
        assert c["rate_bps"] == pytest.approx(uplink_rate_bps(0.25, band, c["snr_db"]), rel=1e-6)
        assert c["snr_db"] in trace.snr_db
    # the SNR each tick applied is the trace's at that instant (the tick's trace time)
    for e in events[1:]:
        for c in e["changes"]:
            assert c["snr_db"] == traces[c["device"]].snr_at(e["trace_s"])
    assert all(e["type"] == "trace" and e["policy"] == "p" for e in events)
    assert len(events) <= 20 * took + 3                        # at most one event a tick
    follower.stop()                                            # twice is fine
    session.close()


def test_the_follower_and_replans_never_leave_a_stale_rate(tmp_path):
    session, shells = _session()
    traces = {"dev-a": _trace(tmp_path, 0.05, 10)}
    events: list[dict] = []
    follower, _ = _follow(session, traces, events)
    rng = np.random.default_rng(1)
    for _ in range(40):                                         # re-plans meanwhile
        share = float(rng.uniform(0.05, 0.9))
        session.set_shares({"dev-a": share, "dev-b": 1 - share})
        time.sleep(0.01)
    follower.stop()
    assert not shells["dev-a"].overlapped                       # one tc change at a time
    dev = session.devices["dev-a"]
    assert shells["dev-a"].rate == pytest.approx(session.rate_bps("dev-a"), abs=1)
    assert dev.rate_bps == pytest.approx(shells["dev-a"].rate, abs=1)
    # the re-plans' changes of the traced device are recorded too, each with its time
    recorded = [c["rate_bps"] for e in events for c in e["changes"]]
    assert len(recorded) >= len(shells["dev-a"].changes)
    assert "dev-b" not in {c["device"] for e in events for c in e["changes"]}   # not traced
    session.close()


def test_a_change_reports_the_snr_its_rate_was_computed_from():
    """The follower thread writes a device's next SNR outside the link lock while a re-plan's
    change of that link may be running: the change must report the SNR its rate came from (a
    CI run recorded a re-plan's rate with the follower's newer SNR, 1898 bit/s that no share
    explained). The interleaving is forced here: the stand-in shell writes the new SNR while
    ``tc`` runs, as the follower's thread would (a real race cannot be hit on demand)."""
    session, shells = _session()
    heard: list[tuple[str, float, float]] = []
    session.rate_listener = lambda name, snr, rate: heard.append((name, snr, rate))
    shell = shells["dev-a"]
    plain = shell.run

    def run(argv, **kw):
        res = plain(argv, **kw)
        if list(argv[:3]) == ["tc", "class", "change"]:
            session.devices["dev-a"].snr_db = 0.0        # the follower's next sample
        return res
    shell.run = run
    session.devices["dev-a"].snr_db = 12.0
    session.set_shares({"dev-a": 0.47})
    band = session.channel.bandwidth_hz
    ((name, snr, rate),) = heard
    assert (name, snr) == ("dev-a", 12.0)
    assert rate == pytest.approx(uplink_rate_bps(0.47, band, 12.0))
    assert shell.rate == pytest.approx(rate, abs=1)                # tc holds whole bit/s
    session.close()


def test_a_closing_session_ends_the_follower_and_a_failing_link_is_said(tmp_path):
    session, shells = _session(fail={"dev-b"})
    traces = {"dev-a": _trace(tmp_path, 0.05, 10), "dev-b": _trace(tmp_path, 0.05, 10, "b.csv")}
    events: list[dict] = []
    follower, _ = _follow(session, traces, events)
    assert wait_until(lambda: len(shells["dev-a"].changes) >= 5, timeout_s=30)
    errors = [e for e in events if e.get("errors")]
    assert len(errors) == 1 and "dev-b" in errors[0]["errors"]   # said once, then not followed
    assert "dev-b" in follower.failed
    problems = session.close()                                  # Ctrl-C: the links are cleared
    assert problems == [] or all("closing" not in p for p in problems)
    assert wait_until(lambda: not follower.alive, timeout_s=30)  # tc work refused: it ended
    follower.stop()
    assert _followers() == []


# -- the loop's hooks, with a lab whose rounds take real time -------------------------------------

class ThreadedLab(SimLab):
    """A simulated lab on the real clock and without ``follow_traces``: the loop then starts
    the live follower thread on it (as on a LiveSession)."""

    follow_traces = None
    plan_inline = False            # on the real clock: re-plans beside the round on a thread

    def __init__(self, *args, stop_at: int | None = None, error: BaseException | None = None,
                 **kw):
        super().__init__(*args, **kw)
        self.rate_listener = None
        self.stop_at, self.error, self.rounds = stop_at, error, 0
        self.t0 = time.monotonic()

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def set_snrs(self, snrs, *, read_back=None):
        for name, snr in snrs.items():
            self.set_snr(name, snr, read_back=read_back)
        return 0.0

    def _change(self, name, read_back, **values):
        before = self.devices[name].rate_bps
        super()._change(name, read_back, **values)
        after = self.devices[name].rate_bps
        if self.rate_listener is not None and after != before:
            self.rate_listener(name, self.devices[name].snr_db, after)

    def round(self, lengths, **kw):
        self.rounds += 1
        if self.stop_at is not None and self.rounds >= self.stop_at:
            raise self.error
        time.sleep(0.05)
        return super().round(lengths, **kw)


def _experiment(tmp_path: Path, rounds: int = 6) -> Path:
    _trace(tmp_path, 0.05, 4, "a.csv", values=(20.0, 5.0))
    path = tmp_path / "exp.yaml"
    path.write_text(f"""
schema: testbed.experiment/1
name: traced
inventory: {ROOT / 'inventory/local.yaml'}
profile: {PROFILE}
seed: 9
policies: [multispin-heterogeneous, agnostic-fixed]
per_policy: {{rounds: {rounds}}}
warmup_rounds: 1
channel: {{bandwidth_hz: 10000}}
workloads:
  default: {{prompts: {ROOT / 'experiments/prompts/chat.yaml'}, max_tokens: 40}}
devices:
  dev-a: {{link: {{trace: a.csv}}}}
replan: {{interval_rounds: 1}}     # a re-plan beside every round: the planner thread works
""")
    return path


def _threaded(tmp_path: Path, **kw):
    from testbed.sim.run import prepare
    exp = load_experiment(_experiment(tmp_path))
    profile = json.loads(PROFILE.read_text())
    exp, profile, lab = prepare(exp, profile)
    fake = ThreadedLab([d.spec for d in lab.devices.values()], lab.server,
                       bandwidth_hz=lab.bandwidth_hz, header_bits=lab.header_bits,
                       bits_per_draft_token=lab.bits_per_draft_token,
                       prompt_tasks=lab.prompt_tasks, seed=1, **kw)
    return exp, profile, fake


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def test_the_loop_runs_the_follower_per_policy_and_stops_it(tmp_path):
    exp, profile, lab = _threaded(tmp_path)
    run, code = loop.run(exp, profile, tmp_path / "runs", lab=lab)
    assert code == loop.EXIT_OK and _followers() == [] and _planners() == []
    events = _events(run)
    ends = {e["policy"]: e["t"] for e in events if e["type"] == "policy_end"}
    starts = [e for e in events if e["type"] == "trace" and e.get("start")]
    assert [e["policy"] for e in starts] == list(exp.policies)   # one follower per policy
    for e in events:
        if e["type"] == "trace":
            assert e["t"] <= ends[e["policy"]] + 1e-6            # none after its policy ended
    # each policy's traced link starts on the trace's first sample (20 dB)
    for s in starts:
        assert s["changes"][0]["device"] == "dev-a" and s["changes"][0]["snr_db"] == 20.0


@pytest.mark.parametrize("error,code", [(KeyboardInterrupt(), loop.EXIT_INTERRUPTED),
                                        (RuntimeError("boom"), None)])
def test_ctrl_c_and_errors_stop_the_follower(tmp_path, error, code):
    exp, profile, lab = _threaded(tmp_path, stop_at=5, error=error)
    if code is None:
        with pytest.raises(RunError, match="boom"):
            loop.run(exp, profile, tmp_path / "runs", lab=lab)
        (run,) = (tmp_path / "runs").iterdir()
    else:
        run, got = loop.run(exp, profile, tmp_path / "runs", lab=lab)
        assert got == code
    assert _followers() == [] and lab.rate_listener is None
    assert _planners() == []                  # nor a planner thread, with a re-plan in flight
    events = _events(run)
    assert any(e["type"] == "trace" for e in events)
    end = [i for i, e in enumerate(events) if e["type"] == "run_end"]
    assert end and all(e["type"] != "trace" for e in events[end[0]:])


# -- the simulator ------------------------------------------------------------------------------

def test_a_simulated_upload_across_a_step_takes_the_integrated_time(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("t_s,snr_db\n0,10\n0.2,0\n")                # 10 dB, then 0 dB from 0.2 s
    trace = load_trace(path, loop=False)
    dev = SimDevice(name="a", template="a", draft_base_s=0.01, round_base_s=0.02,
                    per_token_s=0.03, resid_sd_s=0.0, acceptance=1.0, snr_db=30.0)
    server = SimServer(verify_base_s=0.4, verify_per_token_s=0.001, downlink_s=0.004)
    lab = SimLab([dev], server, bandwidth_hz=2000, header_bits=500, bits_per_draft_token=48,
                 prompt_tasks={}, seed=3)
    tracefollow.hold_start(lab, {"a": trace})
    assert lab.devices["a"].snr_db == 10.0
    lab.set_shares({"a": 1.0})
    recorded: list[dict] = []
    rec = tracefollow.TraceRecorder(recorded.append, lab.clock, 0.0, "p", 0, ["a"])
    handle = lab.follow_traces({"a": trace}, lab.clock(), rec)
    out = lab.round({"a": 4})
    start = 0.02 + 0.03 * 4                                      # verdict + draft: 0.14 s
    r10, r0 = uplink_rate_bps(1, 2000, 10.0), uplink_rate_bps(1, 2000, 0.0)
    bits = 500 + 48 * 4
    at_10 = r10 * (0.2 - start)                                  # bits sent before the step
    assert out.steps["a"].upload_s == pytest.approx((0.2 - start) + (bits - at_10) / r0)
    assert lab.devices["a"].snr_db == 0.0 and lab.devices["a"].rate_bps == pytest.approx(r0)
    step = [c for e in recorded for c in e["changes"] if not e.get("start")]
    assert step == [{"device": "a", "t": 0.2, "snr_db": 0.0, "rate_bps": round(r0, 1)}]
    handle.stop()
    lab.round({"a": 4})                                          # no longer followed
    assert lab._traces == {}


def test_simulated_runs_follow_the_trace_the_same_in_every_policy(tmp_path):
    from testbed.sim.run import prepare
    exp = load_experiment(_experiment(tmp_path, rounds=30))
    profile = json.loads(PROFILE.read_text())
    exp, profile, lab = prepare(exp, profile, timing_noise=0.0)
    run, code = loop.run(exp, profile, tmp_path / "runs", lab=lab)
    assert code == loop.EXIT_OK
    events = _events(run)
    steps: dict[str, list[tuple[float, float]]] = {}        # policy -> (t from start, snr)
    for e in events:
        if e["type"] == "trace":
            if e.get("start"):
                t0 = e["t"]
            seq = steps.setdefault(e["policy"], [])
            for c in e["changes"]:
                if not seq or c["snr_db"] != seq[-1][1]:        # SNR steps (not share moves)
                    seq.append((round(c["t"] - t0, 6), c["snr_db"]))
    a, b = steps.values()
    end = min(a[-1][0], b[-1][0])
    assert end > 2 and len(a) > 20
    # the same SNR steps at the same times from each policy's start (rates differ: shares do)
    assert [x for x in a if x[0] <= end] == [x for x in b if x[0] <= end]
    # the controller is not told: the plans' SNR stays the inventory's
    plans = [e["plan"] for e in events if e["type"] == "policy_start"]
    for d in (d for p in plans for d in p["devices"] if d["name"] == "dev-a"):
        assert d["uplink_bps"] == pytest.approx(uplink_rate_bps(d["bandwidth_share"], 10_000,
                                                                22.0))
    # without timing noise, every upload's measured rate is the implied one over the profile's
    # upload factor (the simulator's model of the data path)
    result = tracecheck.check(events)
    factor = lab.upload_factor[0]
    assert result["overall"]["checked"] >= 20
    assert result["overall"]["within_share"] == 1.0
    assert result["overall"]["median_ratio"] == pytest.approx(1 / factor, rel=1e-3)


def test_the_checker_by_hand():
    events = [
        {"type": "trace", "t": 0.0, "policy": "p", "repeat": 0, "trace_s": 0.0, "start": True,
         "changes": [{"device": "a", "t": 0.0, "snr_db": 10, "rate_bps": 1000.0}]},
        {"type": "trace", "t": 2.0, "policy": "p", "repeat": 0, "trace_s": 2.0,
         "changes": [{"device": "a", "t": 2.0, "snr_db": 0, "rate_bps": 500.0}]},
        # upload 0.5..1.0 s at 1000 bit/s: 500 bits measured in 0.5 s -> exact
        {"type": "round", "t": 1.2, "policy": "p", "repeat": 0, "round": 0, "round_s": 1.0,
         "devices": [{"name": "a", "n_drafted": 4, "draft_s": 0.3, "upload_s": 0.5,
                      "upload_bits": 500.0}]},
        # upload 1.5..2.5 s: half at 1000, half at 500 -> implied 750; measured 800 (+6.7%)
        {"type": "round", "t": 2.7, "policy": "p", "repeat": 0, "round": 1, "round_s": 1.5,
         "devices": [{"name": "a", "n_drafted": 4, "draft_s": 0.3, "upload_s": 1.0,
                      "upload_bits": 800.0}, {"name": "b", "n_drafted": 4, "draft_s": 0.1,
                                              "upload_s": 0.2, "upload_bits": 100.0}]},
        # a short upload (20 ms) is not checked; a warm-up round not at all
        {"type": "round", "t": 3.0, "policy": "p", "repeat": 0, "round": 2, "round_s": 0.2,
         "devices": [{"name": "a", "n_drafted": 1, "draft_s": 0.1, "upload_s": 0.02,
                      "upload_bits": 30.0}]},
        {"type": "round", "t": 3.5, "policy": "p", "repeat": 0, "round": 3, "round_s": 0.2,
         "warmup": True, "devices": [{"name": "a", "n_drafted": 1, "draft_s": 0.1,
                                      "upload_s": 0.1, "upload_bits": 1.0}]},
    ]
    r = tracecheck.check(events, model="fluid")
    ups = r["uploads"]
    assert [u["round"] for u in ups] == [0, 1, 2]               # b is not traced
    assert ups[0]["implied_bps"] == pytest.approx(1000) and ups[0]["ratio"] == pytest.approx(1)
    assert ups[0]["steps"] == 0
    assert ups[1]["implied_bps"] == pytest.approx(750) and ups[1]["steps"] == 1
    assert ups[1]["ratio"] == pytest.approx(800 / 750) and ups[1]["within"]
    assert not ups[2]["checked"] and ups[2]["within"] is None
    d = r["overall"]
    assert (d["uploads"], d["checked"], d["within"], d["steady"], d["across"]) == (3, 2, 2, 1, 1)
    assert tracecheck.check(events, model="fluid", tolerance=0.05)["overall"]["within"] == 1
    # htb's way (the default for a live run): a frame is charged at the rate in force when it
    # leaves; the 100-byte draft of round 1 leaves at 1.5 s, at 1000 bit/s
    r = tracecheck.check(events)
    assert r["model"] == "packet" and r["uploads"][1]["implied_bps"] == pytest.approx(1000)
    assert not r["uploads"][1]["within"] and r["uploads"][1]["other_within"]
    assert r["overall"]["within"] == 1 and r["overall"]["other_within_share"] == 1.0
    # a 3000-byte upload from 1.9 s: a full frame at 1000 bit/s (12.1 s), the rest at 500
    big = dict(events[3], devices=[dict(events[3]["devices"][0], draft_s=0.7,
                                        upload_bits=24000.0, upload_s=30.0)])
    (u,) = tracecheck.check(events[:2] + [big])["uploads"]
    took = 1514 * 8 / 1000 + (3000 - 1514) * 8 / 500
    assert u["packet_bps"] == pytest.approx(24000 / took)
    with pytest.raises(ValueError, match="model"):
        tracecheck.check(events, model="ideal")
    from rich.console import Console
    console = Console(width=160, record=True)
    console.print(tracecheck.table(r))
    assert "within 10%" in console.export_text()


def test_events_of_a_run_without_traces_check_nothing():
    assert tracecheck.check([{"type": "round", "t": 1, "round_s": 1, "policy": "p",
                              "devices": [{"name": "a", "n_drafted": 1, "upload_s": 1,
                                           "upload_bits": 1}]}])["uploads"] == []


def test_dataclass_replace_keeps_traces(tmp_path):
    exp = load_experiment(_experiment(tmp_path))
    assert set(dataclasses.replace(exp, seed=1).traces) == {"dev-a"}
