"""Online estimates of the model's parameters from observed rounds (used by the live runner).

Every round each drafting device reports how many tokens it drafted and how many the verifier
accepted, how long drafting took, and how many bits its upload carried in how many seconds on
its band share. The ``Estimator`` folds these into exponentially weighted estimates, ``ewma`` being the weight of
the newest round (the experiment's ``replan.ewma``):

- acceptance, pooled and per draft position. Under the contract's i.i.d. model a round with L
  drafted and A accepted is A successes and, when A < L, one failure (positions after the first
  rejection are never tried), so the estimate is a ratio of decayed counts (the maximum
  likelihood estimate for geometric prefixes); per position i the same counts are kept for the
  rounds that reached i;
- drafting time t0 + tau*L, by exponentially weighted least squares over (L, seconds);
- the full-band rate R = bits / (seconds * share), with bits in the problem's own unit (what
  the shaper meters: ``live.datapath.metered_bits``; docs/controller.md says why), as an
  EWMA of per-round values started at the prior's rate (with its own weight ``rate_ewma``
  when given: upload times are far less noisy than acceptance), and from it the SNR the model
  uses (R = B log2(1 + SNR)).

The problem's values are the prior. For acceptance and the time fits they count as
``prior_weight`` observations that never decay (1 % of one round by default, against about
1/ewma rounds of data), which keeps every estimate defined (a device that never drafts keeps
its prior; a fit of t0 and tau from one draft length keeps the prior's slope) at the cost of a
bias of about that size. Without any data an estimate is exactly the prior. A round in which a
device does not draft still ages its acceptance evidence: a device left out after bad rounds
drifts back to its prior over a few 1/ewma rounds and is tried again, rather than never. ``problem()``
returns the problem with the current estimates. ``restart_acceptance`` starts a device's
acceptance again from a new prior when its workload changes (the runner passes the profile's
acceptance for the new workload). Deterministic, no I/O; observations are plain data, so tests
script them.

Limits: acceptance by position is reported, but the model (and so the planner) uses the pooled
value. The server's verification cost and the downlink are not estimated: the problem's (the
profile's fit over a grid of batch sizes) are kept, because every round of one plan has the
same batch size, which cannot separate the base cost from the per-token cost
(docs/controller.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from testbed.control.problem import Device, Problem


@dataclass(frozen=True)
class RoundObservation:
    """What one device reported for one round."""

    device: str
    draft_len: int                  # tokens drafted (0: the device did not draft)
    accepted: int                   # of them accepted (the longest agreeing prefix)
    draft_s: float | None = None    # seconds spent drafting
    upload_bits: float | None = None  # bits on the wire, in the problem's unit (metered_bits)
    upload_s: float | None = None   # seconds the upload took
    share: float | None = None      # band share in force during the upload


@dataclass(frozen=True)
class DeviceEstimate:
    name: str
    acceptance: float
    draft_base_s: float
    draft_per_token_s: float
    rate_bps: float                 # full-band uplink rate
    snr_db: float
    rounds: int                     # rounds observed
    position_cells: Sequence = ()   # decayed (accepted, reached) per position (not changed)
    prior: tuple = (0.0, 1.0)       # (alpha0, prior weight) the ratios are shrunk towards

    @property
    def acceptance_by_position(self) -> tuple[float, ...]:
        """P(accept position i | reached i), i = 0.. (computed when asked: the controller
        does not use it, and at K = 1,000 it cost a tenth of a simulated run)."""
        return tuple(_ratio(c, *self.prior) for c in self.position_cells)


class _LineFit:
    """Exponentially weighted least squares of y = a + b*x, shrunk towards a prior line.

    The fitted line always passes through the weighted mean of the observations; its slope is
    the data's, pulled towards the prior slope by ``prior_weight`` observations' worth of
    spread, so that with a single x (one draft length in force) the prior slope is kept and
    the intercept absorbs the difference. Without observations: the prior line.
    """

    def __init__(self, a: float, b: float, xs: tuple[float, float], prior_weight: float):
        self.a0, self.b0 = a, b
        self.kappa = prior_weight * ((xs[1] - xs[0]) / 2.0) ** 2
        self.sums = [0.0] * 5           # w, wx, wy, wxx, wxy of the observations

    def add(self, x: float, y: float, decay: float) -> None:
        s = self.sums
        self.sums = [decay * s[0] + 1, decay * s[1] + x, decay * s[2] + y,
                     decay * s[3] + x * x, decay * s[4] + x * y]

    def fit(self) -> tuple[float, float]:
        w, wx, wy, wxx, wxy = self.sums
        if w <= 0:
            return self.a0, self.b0
        xm, ym = wx / w, wy / w
        sxx = max(wxx - w * xm * xm, 0.0)
        sxy = wxy - w * xm * ym
        b = (sxy + self.kappa * self.b0) / (sxx + self.kappa)
        a = ym - b * xm
        if b < 0:                       # times do not fall with more tokens
            b, a = 0.0, ym
        if a < 0:                       # nor are they negative with none
            a, b = 0.0, max(wxy / wxx, 0.0) if wxx > 0 else self.b0
        return a, b


class _DeviceState:
    def __init__(self, dev: Device, bandwidth_hz: float, lmax: int, prior_weight: float):
        self.name = dev.name
        self.bandwidth_hz = bandwidth_hz
        pw = prior_weight
        self.prior_weight = pw
        self.alpha0 = dev.acceptance
        self.acc = [0.0, 0.0]                                # decayed successes, trials
        self.pos = [(0.0, 0.0)] * lmax                       # the same per position
        self.time = _LineFit(dev.draft_base_s, dev.draft_per_token_s, (1.0, float(max(lmax, 2))),
                             pw)
        self.rate_bps = bandwidth_hz * math.log2(1.0 + 10.0 ** (dev.snr_db / 10.0))
        self.rounds = 0
        self.snr0 = dev.snr_db
        self.rate_seen = False
        self.cached: DeviceEstimate | None = None   # the last estimate, until new evidence

    def observe(self, obs: RoundObservation, decay: float, rate_decay: float) -> None:
        L, A = obs.draft_len, obs.accepted
        if L < 0 or A < 0 or A > L:
            raise ValueError(f"{obs.device}: accepted {A} of {L} drafted is impossible")
        self.cached = None
        self.rounds += 1
        trials = A + (1 if A < L else 0)
        self.acc = [decay * self.acc[0] + A, decay * self.acc[1] + trials]
        # new cells, not changed in place: an estimate made before keeps its own (it holds them)
        self.pos = [(decay * a + (1.0 if i < A else 0.0),
                     decay * r + (1.0 if i <= A and i < L else 0.0))
                    for i, (a, r) in enumerate(self.pos)]
        if L > 0 and obs.draft_s is not None:
            if obs.draft_s < 0:
                raise ValueError(f"{obs.device}: negative drafting time {obs.draft_s}")
            self.time.add(float(L), float(obs.draft_s), decay)
        if L > 0 and obs.upload_bits and obs.upload_s and obs.share:
            if obs.upload_s <= 0 or obs.share <= 0:
                raise ValueError(f"{obs.device}: upload time and share must be positive")
            rate = obs.upload_bits / (obs.upload_s * obs.share)
            self.rate_bps = rate_decay * self.rate_bps + (1.0 - rate_decay) * rate
            self.rate_seen = True

    def estimate(self) -> DeviceEstimate:
        # Asked for every device each round (the forecast, the re-plan, the records) and
        # unchanged between observations: computed once per observation (at K = 1,000 the
        # simulator spent a quarter of its time here).
        if self.cached is None:
            self.cached = self._estimate()
        return self.cached

    def _estimate(self) -> DeviceEstimate:
        t0, tau = self.time.fit()
        efficiency = self.rate_bps / self.bandwidth_hz
        snr = math.expm1(efficiency * math.log(2.0))
        snr_db = 10.0 * math.log10(snr) if snr > 0 else -100.0
        if not self.rate_seen:
            snr_db = self.snr0              # exactly the prior, not a round trip through R
        return DeviceEstimate(
            name=self.name, acceptance=_ratio(self.acc, self.alpha0, self.prior_weight),
            position_cells=self.pos,
            prior=(self.alpha0, self.prior_weight), draft_base_s=t0, draft_per_token_s=tau, rate_bps=self.rate_bps,
            snr_db=max(-100.0, min(100.0, snr_db)), rounds=self.rounds)


def _ratio(cell, prior: float, pw: float) -> float:
    """Successes over trials with ``pw`` prior trials; exactly the prior without data."""
    if cell[1] <= 0:
        return prior
    return min(1.0, max(0.0, (cell[0] + pw * prior) / (cell[1] + pw)))


class Estimator:
    """EWMA estimates of every device's parameters, seeded by a problem."""

    def __init__(self, problem: Problem, ewma: float = 0.2, prior_weight: float = 0.01,
                 rate_ewma: float | None = None):
        if not 0 < ewma <= 1:
            raise ValueError(f"ewma must be in (0, 1], got {ewma}")
        if rate_ewma is not None and not 0 < rate_ewma <= 1:
            raise ValueError(f"rate_ewma must be in (0, 1], got {rate_ewma}")
        self.rate_decay = 1.0 - (ewma if rate_ewma is None else rate_ewma)
        if prior_weight <= 0:
            raise ValueError(f"prior_weight must be positive, got {prior_weight}")
        self.base = problem
        self.decay = 1.0 - ewma
        self.devices = {d.name: _DeviceState(d, problem.bandwidth_hz, problem.max_draft_len,
                                             prior_weight) for d in problem.devices}

    def observe(self, obs: RoundObservation) -> None:
        try:
            state = self.devices[obs.device]
        except KeyError:
            raise ValueError(f"unknown device {obs.device!r}") from None
        state.observe(obs, self.decay, self.rate_decay)

    def estimate(self, name: str) -> DeviceEstimate:
        return self.devices[name].estimate()

    def restart_acceptance(self, name: str, prior: float) -> None:
        """Forget ``name``'s acceptance evidence and start again from ``prior``: its workload
        changed, and what was observed belongs to the old one. Times and rate are kept."""
        if not 0.0 <= prior <= 1.0:
            raise ValueError(f"acceptance prior must be in [0, 1], got {prior}")
        try:
            state = self.devices[name]
        except KeyError:
            raise ValueError(f"unknown device {name!r}") from None
        state.alpha0 = prior
        state.cached = None
        state.acc = [0.0, 0.0]
        state.pos = [(0.0, 0.0)] * len(state.pos)

    def problem(self, active: Iterable[str] | None = None) -> Problem:
        """The problem with the current estimates, for the ``active`` devices (default: all)."""
        names = list(self.devices) if active is None else list(active)
        devices = []
        for name in names:
            e = self.estimate(name)
            devices.append(Device(name=name, draft_base_s=e.draft_base_s,
                                  draft_per_token_s=e.draft_per_token_s,
                                  acceptance=e.acceptance, snr_db=e.snr_db))
        return dataclasses.replace(self.base, devices=tuple(devices))
