"""A simulated lab: the live loop's lab interface, on virtual devices, in simulated time.

``SimLab`` implements what ``live.loop.ExperimentLoop`` asks of a lab (the methods of
``live.session.LiveSession`` it calls: ``open``, ``set_shares``, ``set_snr``,
``reset_channels``, ``start_sequence``, ``round``, ``last_tokens``, ``remove_device``,
``add_device``, ``models``, ``node_facts``, ``close``, and ``devices`` with each device's
``active``, ``snr_db``, ``share`` and ``rate_bps``), so the experiment loop, the controller, the
estimator and the re-planner run unchanged; only the lab behind them is virtual. Its ``clock``
is simulated time: the loop and the event writer read it, nothing sleeps, a round advances it
by the round's simulated duration.

One round, vectorised over the devices that draft (numpy), from each device's ``SimDevice``
(``sim.population``: the profile's measurements, or a drawn population):

- drafting: ``round_base_s + per_token_s * L`` plus a normal residual with the profile's
  measured spread at that length (``draft.grid``'s ``sd_s``, linear in L between the measured
  lengths: the same numbers the controller's tail model plans with; clipped so that drafting
  takes at least ``per_token_s * L / 2``);
- acceptance: replayed when the profile has the prompt's teacher-forced answer (a profiled
  device, a greedy workload): a draft of L tokens at answer position p accepts the run of the
  draft model's agreements with the target from p, at most L (exactly what greedy speculative
  decoding accepts), and the answer ends where the target's ended. Otherwise sampled token by
  token: position i accepted with the device's rate for its current task (the profile's
  per-workload rate) shaped by the profile's per-position rates; the draft stops at the first
  rejection. Either way the device gains the accepted tokens plus the server's one;
- upload: ``header_bits + bits_per_draft_token * L`` at the device's rate (its band share on
  its SNR, as ``LiveSession.rate_bps``), times a factor drawn from the profile's measured
  upload time over the model (mean and spread);
- the round waits for the last drafting device, then one verification of the whole batch (the
  server's cost line: the profile's fit, the inventory's emulation, or a given one), the
  downlink, and the orchestration overhead (normal, the profile's ``round_overhead`` spread).

Channel traces (an experiment's ``devices.NAME.link.trace``): the loop's ``tracefollow.start``
calls ``follow_traces``; from then on a traced device's upload takes the time its bits need at
the rate that follows the trace over the upload's own interval (``Trace.send_time``: the rate,
its band share on the trace's SNR at each instant, integrated from the upload's start; the
upload factor scales the bits), so an upload that spans a fade is slowed by it in proportion.
Its ``snr_db`` and ``rate_bps`` are the trace's at each round's end, and every step of the
trace within a round is recorded as a ``trace`` event at its simulated time, as the live
follower records the ``tc`` changes it makes.

Devices that do not draft (L = 0) get the server's token each round, as in the live lab.
Prompts end after ``max_tokens`` (no end-of-generation token: text is not generated).
Deterministic for a seed: every random draw comes from one ``numpy`` generator, in the
loop's order.

Limits: sampled acceptance is independent from token to token (real text has easy and hard
stretches: runs of acceptances are correlated), so its variance over rounds is lower than live;
replayed answers carry that correlation but only for the prompts the profile measured;
a prefill costs the profile's mean for the task (no spread; none for a profile made before
prefills were measured), and a traced link keeps its rate during a prefill; a device never
fails unless the experiment says it leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from testbed.channel import MAX_DRAFT_LEN
from testbed.control.model import uplink_rate_bps
from testbed.control.problem import sd_at
from testbed.errors import RunError
from testbed.inputs.prompts import prompt_key
from testbed.live.rounds import DeviceStep, Round, ServerStep, Verdict
from testbed.sim.population import SimDevice, SimServer

MIN_RATE_BPS = 100.0          # as the live shaper: tc cannot hold less


@dataclass
class SimDeviceState:
    """The loop-visible state of one virtual device (as ``live.session.DeviceState``)."""

    spec: SimDevice
    snr_db: float
    share: float = 0.0
    rate_bps: float | None = None
    active: bool = True
    generated: int = 0
    task: str | None = None
    trace: np.ndarray | None = None       # the current prompt's teacher-forced agreements
    trace_ends: bool = False              # the target's answer ended there (end of text)
    info: dict = field(default_factory=dict)


class SimLab:
    """See the module docstring."""

    simulated = True
    # The loop's re-plans beside the round are decided at once, not on a thread: on this
    # virtual clock a decision is ready when the round ends either way (live/loop.py).
    plan_inline = True

    def __init__(self, devices: list[SimDevice], server: SimServer, *, bandwidth_hz: float,
                 header_bits: float, bits_per_draft_token: float, prompt_tasks: Mapping[str, str],
                 seed: int = 0, upload_factor: tuple[float, float] = (1.0, 0.0)):
        self.devices: dict[str, SimDeviceState] = {
            d.name: SimDeviceState(d, snr_db=d.snr_db) for d in devices}
        self.server = server
        self.bandwidth_hz = float(bandwidth_hz)
        self.header_bits = float(header_bits)
        self.bits_per_draft_token = float(bits_per_draft_token)
        self.prompt_tasks = dict(prompt_tasks)
        self.upload_factor = upload_factor
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self._round = 0
        self._traces: dict = {}                # device -> channel trace (follow_traces)
        self._trace_t0 = 0.0                   # the lab time of the traces' time 0
        self._trace_rec = None                 # tracefollow.TraceRecorder
        self._index = {name: i for i, name in enumerate(self.devices)}
        # Per-device parameters as arrays, indexed like ``self.devices``.
        specs = [d.spec for d in self.devices.values()]
        self._base = np.array([s.round_base_s for s in specs])
        self._draft_base = np.array([s.draft_base_s for s in specs])
        self._tau = np.array([s.per_token_s for s in specs])
        # drafting's sd at each length 0..MAX_DRAFT_LEN (the profile's per-length spread)
        self._sd = np.array([sd_at(s.draft_sd_grid, np.arange(MAX_DRAFT_LEN + 1))
                             for s in specs]).reshape(len(specs), MAX_DRAFT_LEN + 1)
        lmax = max([len(s.position_shape) for s in specs] + [1])
        shape = np.ones((len(specs), lmax))
        for i, s in enumerate(specs):
            shape[i, :len(s.position_shape)] = s.position_shape
        self._shape = shape
        self._replays = any(s.traces for s in specs)   # some device replays answers

    # -- the clock -----------------------------------------------------------------------------

    def clock(self) -> float:
        """Simulated seconds since the lab opened (the loop's and the event writer's clock)."""
        return self.now

    # -- set-up and records -------------------------------------------------------------------

    def open(self) -> "SimLab":
        return self

    def close(self) -> list[str]:
        return []

    def models(self) -> dict[str, dict]:
        """The model file each virtual node stands for (as the profile recorded it)."""
        out = {"server": {"path": self.server.model_path, "sha256": self.server.model_sha256,
                          "simulated": True}}
        for name, dev in self.devices.items():
            out[name] = {"path": dev.spec.model_path, "sha256": dev.spec.model_sha256,
                         "simulated": True}
        return out

    def node_facts(self) -> dict[str, dict]:
        return {}

    # -- control ------------------------------------------------------------------------------

    def _rate(self, dev: SimDeviceState) -> float:
        share = min(1.0, max(0.0, dev.share))
        return max(uplink_rate_bps(share, self.bandwidth_hz, dev.snr_db), MIN_RATE_BPS)

    def _change(self, name: str, read_back: dict | None, **values: float) -> None:
        """Set the device's share or SNR; its rate follows at once (as ``tc class change``)."""
        dev = self.devices[name]
        for key, value in values.items():
            setattr(dev, key, float(value))
        dev.rate_bps = self._rate(dev)
        if read_back is not None:
            read_back[name] = dev.rate_bps
        if name in self._traces:
            self._trace_rec.change(name, dev.snr_db, dev.rate_bps, at=self.now)

    def set_shares(self, shares: Mapping[str, float], *, read_back: dict | None = None) -> float:
        for name, share in shares.items():
            self._change(name, read_back, share=share)
        return 0.0

    def set_snr(self, name: str, snr_db: float, *, read_back: dict | None = None) -> float:
        self._change(name, read_back, snr_db=snr_db)
        return 0.0

    def reset_channels(self) -> None:
        for dev in self.devices.values():
            dev.snr_db = dev.spec.snr_db

    # -- channel traces (live/tracefollow.py does this live) ----------------------------------

    def follow_traces(self, traces: Mapping, t0: float, recorder) -> "_SimTraces":
        """Traced devices follow their traces from lab time ``t0`` (module docstring)."""
        self._traces = {n: tr for n, tr in traces.items() if n in self.devices}
        self._trace_t0, self._trace_rec = float(t0), recorder
        for name in self._traces:
            dev = self.devices[name]
            recorder.change(name, dev.snr_db, dev.rate_bps or self._rate(dev), at=t0)
        recorder.flush(0.0, at=t0, start=True)
        return _SimTraces(self)

    def _trace_rate(self, dev: SimDeviceState):
        share = min(1.0, max(0.0, dev.share))
        return lambda snr: max(uplink_rate_bps(share, self.bandwidth_hz, snr), MIN_RATE_BPS)

    def _traced_uploads(self, drafting: list[str], upload_s: np.ndarray, bits: np.ndarray,
                        start_s: np.ndarray) -> np.ndarray:
        """Upload times of traced devices: ``bits`` from ``start_s`` into the round at the
        rate that follows the trace (``Trace.send_time``)."""
        out = upload_s.copy()
        for j, n in enumerate(drafting):
            trace = self._traces.get(n)
            if trace is not None:
                tau = self.now - self._trace_t0 + float(start_s[j])
                out[j] = trace.send_time(float(bits[j]), tau, self._trace_rate(self.devices[n]))
        return out

    def _trace_round_end(self, start: float) -> None:
        """The traces' steps within the round just simulated, recorded at their times; each
        traced device's SNR and rate are the trace's at the round's end."""
        t0, rec = self._trace_t0, self._trace_rec
        for n, trace in self._traces.items():
            dev = self.devices[n]
            rate_of = self._trace_rate(dev)
            for tau, snr in trace.changes(start - t0, self.now - t0):
                rec.change(n, snr, rate_of(snr), at=t0 + tau)
            dev.snr_db = trace.snr_at(self.now - t0)
            dev.rate_bps = rate_of(dev.snr_db)
        rec.flush(self.now - t0, at=self.now)

    def start_sequence(self, name: str, prompt: str, *, sampling: Mapping | None = None,
                       seed: int | None = None) -> float:
        """A new prompt: the device's task is its prompt set's (acceptance follows it). The
        prefill costs the profile's measured mean for the task (its ``prefill`` block: the
        slower of the device's and the server's side), on the clock, as live: the loop starts
        prompts between rounds, one device after another."""
        dev = self.devices[name]
        dev.task = self.prompt_tasks.get(prompt, dev.task)
        dev.generated = 0
        dev.trace, dev.trace_ends = dev.spec.traces.get(prompt_key(prompt), (None, False))
        prefill_s = float(dev.spec.prefill_by_task.get(dev.task, dev.spec.prefill_s))
        self.now += prefill_s
        return prefill_s

    def begin_sequence(self, name: str, prompt: str, *, sampling: Mapping | None = None,
                       seed: int | None = None) -> tuple[str, float, float]:
        """``start_sequence`` beside the rounds that follow (``prefill: overlap``): the clock
        does not stop; the prefill is ready at now + its cost."""
        start = self.now
        prefill_s = self.start_sequence(name, prompt, sampling=sampling, seed=seed)
        self.now = start
        return name, prefill_s, start + prefill_s

    def end_sequence(self, pending: tuple[str, float, float]) -> tuple[float, float]:
        """Wait for a ``begin_sequence``: (its prefill, the time waited for it now)."""
        _, prefill_s, ready = pending
        waited = max(0.0, ready - self.now)
        self.now += waited
        return prefill_s, waited

    def last_tokens(self, name: str) -> int:
        return self.devices[name].generated

    def remove_device(self, name: str) -> float:
        self.devices[name].active = False
        return 0.0

    def add_device(self, name: str) -> float:
        self.devices[name].active = True
        return 0.0

    def active(self) -> list[str]:
        return [n for n, d in self.devices.items() if d.active]

    # -- one round ----------------------------------------------------------------------------

    def _ends(self, name: str, gained: int) -> bool:
        """Whether the round's tokens reach the end of the target's replayed answer (its
        end-of-text token: the loop then starts the next prompt, as live)."""
        dev = self.devices[name]
        return bool(dev.trace_ends and dev.trace is not None
                    and dev.generated + gained >= len(dev.trace))

    def _acceptance(self, names: list[str]) -> np.ndarray:
        out = np.empty(len(names))
        for j, n in enumerate(names):
            spec = self.devices[n].spec
            out[j] = spec.acceptance_by_task.get(self.devices[n].task, spec.acceptance)
        return out

    def round(self, lengths: Mapping[str, int], *, timeout_s: float = 120.0,
              keep_going: bool = False) -> Round:
        rid = self._round
        self._round += 1
        active = [n for n in lengths if n in self.devices and self.devices[n].active]
        drafting = [n for n in active if int(lengths.get(n, 0)) > 0]
        rng = self.rng
        steps: dict[str, DeviceStep] = {}
        verdicts: dict[str, Verdict] = {}
        n_tokens = 0
        slowest = 0.0
        if drafting:
            idx = np.array([self._index[n] for n in drafting])
            L = np.array([int(lengths[n]) for n in drafting])
            lmax = int(L.max())
            drafted = self._tau[idx] * L
            noise = rng.normal(0.0, 1.0, len(idx)) * self._sd[idx, L]
            draft_s = self._draft_base[idx] + np.maximum(drafted + noise, drafted / 2)
            ready_extra = self._base[idx] - self._draft_base[idx]      # verdict + dispatch
            bits = self.header_bits + self.bits_per_draft_token * L
            rates = np.array([self.devices[n].rate_bps or self._rate(self.devices[n])
                              for n in drafting])
            mean, sd = self.upload_factor
            factor = np.maximum(mean + sd * rng.normal(0.0, 1.0, len(idx)), 0.5)
            upload_s = bits / rates * factor
            if self._traces:     # traced links: the rate follows the trace during the upload
                upload_s = self._traced_uploads(drafting, upload_s, bits * factor,
                                                ready_extra + draft_s)
            # token by token: position i accepted with alpha * shape_i, up to the first miss
            alpha = self._acceptance(drafting)
            width = self._shape.shape[1]
            shape = self._shape[idx][:, :lmax] if lmax <= width else np.hstack(
                [self._shape[idx], np.ones((len(idx), lmax - width))])
            p = np.clip(alpha[:, None] * shape, 0.0, 1.0)
            hit = rng.random((len(idx), lmax)) < p
            hit &= np.arange(lmax)[None, :] < L[:, None]
            accepted = np.cumprod(hit, axis=1).sum(axis=1)
            for j, n in enumerate(drafting if self._replays else ()):   # replayed answers
                dev = self.devices[n]     # (after the draw: the random stream is the same)
                if dev.trace is not None and dev.generated < len(dev.trace):
                    window = dev.trace[dev.generated:dev.generated + int(L[j])]
                    if not window.all():
                        accepted[j] = int(np.argmin(window))
                    elif len(window) == int(L[j]) or dev.trace_ends:
                        accepted[j] = len(window)
                    # else the draft runs past a measured answer cut at its max_tokens:
                    # the sampled value stands
            ready = ready_extra + draft_s + upload_s
            slowest = float(ready.max())
            for j, n in enumerate(drafting):
                k = int(L[j])
                a = int(accepted[j])
                steps[n] = DeviceStep(n, 0.0, float(draft_s[j]), float(upload_s[j]), k,
                                      int(bits[j] // 8), int(bits[j] // 8),
                                      bits=float(bits[j]))
                verdicts[n] = Verdict(k, a, 0, (0,) * (a + 1), self._ends(n, a + 1))
                n_tokens += k + 1
        for n in active:
            if n not in verdicts:
                steps[n] = DeviceStep(n, 0.0, 0.0, 0.0, 0, 0, 0)
                verdicts[n] = Verdict(0, 0, 0, (0,), self._ends(n, 1))
                n_tokens += 1
        if not active:
            raise RunError(f"round {rid}: no device is active")
        verify_s = self.server.verify_s(n_tokens)
        overhead = max(-self.server.downlink_s,
                       float(rng.normal(0.0, self.server.overhead_sd_s)))
        round_s = slowest + verify_s + self.server.downlink_s + overhead
        self.now += round_s
        if self._traces:
            self._trace_round_end(self.now - round_s)
        for n in active:
            self.devices[n].generated += len(verdicts[n].tokens)
        ver = ServerStep(rid, verdicts, slowest, n_tokens, 1, verify_s, None,
                         self.server.downlink_s)
        return Round(rid, round_s, steps, ver, tuple(active), {})


class _SimTraces:
    """What ``SimLab.follow_traces`` returns: ``stop()`` ends following (as the live
    ``TraceFollower.stop``)."""

    def __init__(self, lab: SimLab):
        self.lab = lab

    def stop(self) -> None:
        lab = self.lab
        if lab._trace_rec is not None:
            lab._trace_rec.flush(lab.now - lab._trace_t0, at=lab.now)
        lab._traces, lab._trace_rec = {}, None
