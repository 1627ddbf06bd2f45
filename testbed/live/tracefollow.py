"""Trace-driven channels in a run: the shaper follows each traced device's SNR trace, and the
records say what it applied.

An experiment's ``devices.NAME.link.trace`` (``inputs/experiment.py``, ``testbed/traces.py``)
makes that device's true uplink SNR a function of time. The experiment loop calls, per policy
(and repeat):

- ``hold_start(session, traces)`` at the policy's start, after ``reset_channels``: every traced
  device's SNR is its trace's first sample, so the first plan's ``tc`` rates, the prefills and
  the warm-up rounds see it;
- ``start(...)`` when the policy starts measuring (the clock of its scheduled events): the
  trace's time 0. On a live lab it starts a ``TraceFollower``: a thread that, ``hz`` times a
  second (at least 10; faster when a trace is sampled faster, at most 50), sets every traced
  device's SNR to its trace's value at that instant with ``LiveSession.set_snrs``: the session
  recomputes the device's rate from its current band share and that SNR with the one rate
  function (``LiveSession.rate_bps``) and applies it with ``tc class change`` through the
  device's long-lived shell, in parallel, serialised per device with the re-plans' changes
  (the session's link locks). A lab with its own ``follow_traces`` (``sim.lab.SimLab``) follows
  in simulated time instead;
- ``stop()`` on the returned follower at the policy's end, and from the run's ``finally`` on
  Ctrl-C or an error: the thread is told to stop and joined; no thread outlives its policy.

The controller is not told (as with ``snr_db`` events): it sees uploads slow down or speed up,
and its estimator and re-planner react.

Records: ``TraceRecorder`` writes one ``trace`` event per follower tick in which some traced
device's ``tc`` rate changed (a change made by the follower, or by a re-plan or the policy's
start: the session's ``rate_listener`` reports every one, with its time), plus one at the start
with the rates in force::

    {"type": "trace", "t": 31.52, "policy": "...", "repeat": 0, "trace_s": 3.5,
     "applied_s": 0.012,
     "changes": [{"device": "dev-a", "t": 31.51, "snr_db": 7.12, "rate_bps": 2345.6}]}

``t`` of a change is when its ``tc`` command returned (run clock); ``trace_s`` is the trace time
of the tick; ``applied_s`` how long the tick's changes took. ``errors`` (device -> why) appears
when a device's link could not be changed; that device is not followed further (the loop loses
it at its next round). ``records/tracecheck.py`` compares these rates with the uploads'
measured rates. Volume: at most ``hz`` events a second, each with the changed devices.

Limits: every change is a ``tc`` process on the device, run in the device's own CPU budget (its
cgroup in the emulated lab): measured here about 2 ms of CPU per change and 4 ms per tick
(median) over the long-lived shell; with ``sudo -n`` on a real device more. A traced device
drafts a little slower (10 changes a second: about 6% of a 0.35-core device). A trace sampled
faster than 50 Hz is followed at 50 Hz. A tick that comes late (a busy machine) is skipped,
not made up; the events show the ticks that happened.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from testbed.errors import RunError
from testbed.traces import Trace

_log = logging.getLogger(__name__)

DEFAULT_HZ = 10.0
MAX_HZ = 50.0
JOIN_TIMEOUT_S = 30.0


def hold_start(session, traces: Mapping[str, Trace]) -> None:
    """Traced devices' SNR := their trace's first sample (state only; the next ``set_shares``
    applies it)."""
    for name, trace in traces.items():
        if name in session.devices:
            session.devices[name].snr_db = trace.snr_at(0.0)


def follow_hz(traces: Mapping[str, Trace]) -> float:
    """Ticks a second: ``DEFAULT_HZ``, or the fastest trace's sample rate up to ``MAX_HZ``."""
    fastest = DEFAULT_HZ
    for tr in traces.values():
        step = float(min(tr.times[1:] - tr.times[:-1]))
        if step > 0:
            fastest = max(fastest, 1.0 / step)
    return min(MAX_HZ, fastest)


class TraceRecorder:
    """Collects rate changes of traced devices and writes them as ``trace`` events (module
    docstring). Thread-safe. ``clock`` is the loop's clock, ``t_start`` its value at the run's
    time 0; ``write`` an ``EventWriter.write``."""

    def __init__(self, write: Callable[[dict], None], clock: Callable[[], float],
                 t_start: float, policy: str, repeat: int, devices):
        self.write = write
        self.clock = clock
        self.t_start = t_start
        self.policy = policy
        self.repeat = repeat
        self.devices = set(devices)
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        self.events = 0
        self.changes = 0

    def change(self, name: str, snr_db: float, rate_bps: float | None,
               at: float | None = None) -> None:
        """A traced device's link now runs at ``rate_bps`` (``at``: on ``clock``; None: now)."""
        if name not in self.devices or rate_bps is None:
            return
        t = (self.clock() if at is None else at) - self.t_start
        with self._lock:
            self._pending.append({"device": name, "t": round(t, 6),
                                  "snr_db": round(float(snr_db), 3),
                                  "rate_bps": round(float(rate_bps), 1)})

    def listener(self, name: str, snr_db: float, rate_bps: float) -> None:
        """``LiveSession.rate_listener``: every change the session makes."""
        self.change(name, snr_db, rate_bps)

    def flush(self, trace_s: float, *, applied_s: float | None = None,
              errors: Mapping[str, str] | None = None, at: float | None = None,
              start: bool = False) -> None:
        """Write the changes gathered since the last flush as one event (none: nothing)."""
        with self._lock:
            changes, self._pending = self._pending, []
        if not changes and not errors:
            return
        t = (self.clock() if at is None else at) - self.t_start
        event = {"type": "trace", "t": round(t, 6), "policy": self.policy,
                 "repeat": self.repeat, "trace_s": round(float(trace_s), 6)}
        if start:
            event["start"] = True
        if applied_s is not None:
            event["applied_s"] = round(float(applied_s), 6)
        event["changes"] = changes
        if errors:
            event["errors"] = dict(errors)
        self.write(event)
        self.events += 1
        self.changes += len(changes)


class TraceFollower:
    """The live follower: a thread that keeps the traced devices' ``tc`` rates on their traces
    (module docstring). ``start()`` returns self; ``stop()`` is safe to call twice."""

    def __init__(self, session, traces: Mapping[str, Trace], recorder: TraceRecorder,
                 clock: Callable[[], float], t0: float, hz: float | None = None):
        self.session = session
        self.traces = dict(traces)
        self.recorder = recorder
        self.clock = clock
        self.t0 = t0
        self.hz = float(hz) if hz else follow_hz(traces)
        self.period = 1.0 / self.hz
        self.ticks = 0
        self.skipped = 0
        self.failed: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TraceFollower:
        session = self.session
        for name in self.traces:              # the rates in force as the trace starts
            dev = session.devices.get(name)
            if dev is not None and dev.rate_bps is not None:
                self.recorder.change(name, dev.snr_db, dev.rate_bps, at=self.t0)
        self.recorder.flush(0.0, at=self.t0, start=True)
        session.rate_listener = self.recorder.listener
        self._thread = threading.Thread(target=self._run, name="trace-follower", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        k = 0
        while True:
            due = self.t0 + k * self.period
            wait = due - self.clock()
            if wait > 0 and self._stop.wait(wait):
                return
            if self._stop.is_set():
                return
            now = self.clock()
            tau = max(now - self.t0, k * self.period)    # never a sample early
            snrs = {n: tr.snr_at(tau) for n, tr in self.traces.items()
                    if n not in self.failed and n in self.session.devices}
            errors: dict[str, str] = {}
            t_a = self.clock()
            try:
                self.session.set_snrs(snrs)
            except RunError as exc:
                failed = getattr(exc, "failed", None)
                if not failed:                # the session is closing: nothing more to do
                    _log.debug("trace follower stops: %s", exc)
                    self.recorder.flush(tau)
                    return
                errors = {n: str(why) for n, why in failed.items()}
                self.failed.update(errors)
            except Exception as exc:  # noqa: BLE001 - say it in the records, then stop
                self.recorder.flush(tau, errors={"*": f"{type(exc).__name__}: {exc}"[:300]})
                _log.warning("trace follower failed: %s", exc)
                return
            self.recorder.flush(tau, applied_s=self.clock() - t_a, errors=errors or None)
            self.ticks += 1
            k += 1
            late = int((self.clock() - self.t0) / self.period) + 1   # the next tick not past
            if late > k:
                self.skipped += late - k
                k = late

    def stop(self) -> None:
        """Stop the thread and wait for it; the session no longer reports to the recorder."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():             # a tc command hung: its own timeout ends it
                _log.warning("trace follower still running after %.0f s", JOIN_TIMEOUT_S)
        if getattr(self.session, "rate_listener", None) == self.recorder.listener:
            self.session.rate_listener = None
        self.recorder.flush(max(0.0, self.clock() - self.t0))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def start(session, traces: Mapping[str, Trace], *, write: Callable[[dict], None],
          clock: Callable[[], float], t_start: float, policy: str, repeat: int = 0,
          hz: float | None = None):
    """Start following ``traces`` now (the trace's time 0 is ``clock()``); returns an object
    with ``stop()``. A lab with ``follow_traces`` (the simulator) follows them itself."""
    names = [n for n in traces if n in session.devices]
    recorder = TraceRecorder(write, clock, t_start, policy, repeat, names)
    own = {n: traces[n] for n in names}
    t0 = clock()
    follow = getattr(session, "follow_traces", None)
    if follow is not None:
        return follow(own, t0, recorder)
    return TraceFollower(session, own, recorder, clock, t0, hz).start()
