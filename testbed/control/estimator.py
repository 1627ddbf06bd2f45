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
  uses (R = B log2(1 + SNR)); under the tail model the problem's mean upload factor m
  multiplies it (the model charges m * bits / rate: counted once);
- drafting's spread per length stays the problem's (the profile's): not re-estimated.

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

import numpy as np

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


def _ratio(cell, prior: float, pw: float) -> float:
    """Successes over trials with ``pw`` prior trials; exactly the prior without data."""
    if cell[1] <= 0:
        return prior
    return min(1.0, max(0.0, (cell[0] + pw * prior) / (cell[1] + pw)))


class Estimator:
    """EWMA estimates of every device's parameters, seeded by a problem.

    State is kept as numpy arrays over devices, so that a round of K devices is folded in
    with ``observe_many`` in a few array operations and the estimates of all devices are
    computed at once (cached until the next observation): at K = 1,000 the simulator spent a
    third of its time in a per-device version of this class.

    Drafting time is an exponentially weighted least-squares line y = a + b*x per device,
    shrunk towards the prior line: it passes through the weighted mean of the observations; its
    slope is the data's, pulled towards the prior slope by ``prior_weight`` observations' worth
    of spread, so that with a single x (one draft length in force) the prior slope is kept and
    the intercept absorbs the difference. Without observations: the prior line.
    """

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
        self.prior_weight = float(prior_weight)
        devs = problem.devices
        self.names = [d.name for d in devs]
        self.index = {name: i for i, name in enumerate(self.names)}
        n, lmax = len(devs), problem.max_draft_len
        self.bandwidth_hz = float(problem.bandwidth_hz)
        self.alpha0 = np.array([d.acceptance for d in devs], dtype=float)
        self.acc = np.zeros((n, 2))                          # decayed successes, trials
        self.pos = np.zeros((n, lmax, 2))                    # the same per position
        self.a0 = np.array([d.draft_base_s for d in devs], dtype=float)
        self.b0 = np.array([d.draft_per_token_s for d in devs], dtype=float)
        span = float(max(lmax, 2)) - 1.0                     # the prior's x range: 1..lmax
        self.kappa = prior_weight * (span / 2.0) ** 2
        self.sums = np.zeros((n, 5))                         # w, wx, wy, wxx, wxy
        self.snr0 = np.array([d.snr_db for d in devs], dtype=float)
        self._draft_sd = {d.name: d.draft_sd_s for d in devs}   # kept as profiled
        # The tail model charges an upload m times bits/rate (the profile's measured mean
        # factor): the rate estimated from upload times is then bits * m / (time * share), so
        # that the factor is not counted twice. The mean model has no factor: m = 1.
        self.upload_mean = float(problem.upload_time_factor[0]) if problem.model == "tail" \
            else 1.0
        self.rate = self.bandwidth_hz * np.log2(1.0 + 10.0 ** (self.snr0 / 10.0))
        self.rate_seen = np.zeros(n, dtype=bool)
        self.rounds = np.zeros(n, dtype=int)
        self._cache: dict | None = None

    # -- evidence ----------------------------------------------------------------------------

    def _idx(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise ValueError(f"unknown device {name!r}") from None

    def observe(self, obs: RoundObservation) -> None:
        self.observe_many([obs])

    def observe_many(self, observations: Sequence[RoundObservation]) -> None:
        """Fold in one round's observations (one per device; a device named twice is folded
        in twice, in order)."""
        if not observations:
            return
        idx = [self._idx(o.device) for o in observations]
        if len(set(idx)) < len(idx):                        # the same device twice: in order
            for o in observations:
                self.observe_many([o])
            return
        for o in observations:
            L, A = o.draft_len, o.accepted
            if L < 0 or A < 0 or A > L:
                raise ValueError(f"{o.device}: accepted {A} of {L} drafted is impossible")
            if L > 0 and o.draft_s is not None and o.draft_s < 0:
                raise ValueError(f"{o.device}: negative drafting time {o.draft_s}")
            if L > 0 and o.upload_bits and o.upload_s and o.share and (
                    o.upload_s <= 0 or o.share <= 0):
                raise ValueError(f"{o.device}: upload time and share must be positive")
        self._cache = None
        i = np.array(idx)
        L = np.array([o.draft_len for o in observations], dtype=float)
        A = np.array([o.accepted for o in observations], dtype=float)
        d = self.decay
        self.rounds[i] += 1
        self.acc[i] = d * self.acc[i] + np.stack([A, A + (A < L)], axis=1)
        positions = np.arange(self.pos.shape[1])[None, :]
        hit = (positions < A[:, None]).astype(float)
        reached = ((positions <= A[:, None]) & (positions < L[:, None])).astype(float)
        self.pos[i] = d * self.pos[i] + np.stack([hit, reached], axis=2)
        timed = [(k, o) for k, o in zip(idx, observations)
                 if o.draft_len > 0 and o.draft_s is not None]
        if timed:
            j = np.array([k for k, _ in timed])
            x = np.array([float(o.draft_len) for _, o in timed])
            y = np.array([float(o.draft_s) for _, o in timed])
            self.sums[j] = d * self.sums[j] + np.stack([np.ones_like(x), x, y, x * x, x * y],
                                                       axis=1)
        sent = [(k, o) for k, o in zip(idx, observations)
                if o.draft_len > 0 and o.upload_bits and o.upload_s and o.share]
        if sent:
            j = np.array([k for k, _ in sent])
            rate = np.array([o.upload_bits * self.upload_mean / (o.upload_s * o.share)
                             for _, o in sent])
            self.rate[j] = self.rate_decay * self.rate[j] + (1.0 - self.rate_decay) * rate
            self.rate_seen[j] = True

    def restart_acceptance(self, name: str, prior: float) -> None:
        """Forget ``name``'s acceptance evidence and start again from ``prior``: its workload
        changed, and what was observed belongs to the old one. Times and rate are kept."""
        if not 0.0 <= prior <= 1.0:
            raise ValueError(f"acceptance prior must be in [0, 1], got {prior}")
        i = self._idx(name)
        self._cache = None
        self.alpha0[i] = prior
        self.acc[i] = 0.0
        self.pos[i] = 0.0

    # -- estimates ---------------------------------------------------------------------------

    def _estimates(self) -> dict:
        """Every device's estimates as arrays (cached until the next observation)."""
        if self._cache is not None:
            return self._cache
        w, wx, wy, wxx, wxy = self.sums.T
        has = w > 0
        safe = np.where(has, w, 1.0)
        xm, ym = wx / safe, wy / safe
        sxx = np.maximum(wxx - w * xm * xm, 0.0)
        sxy = wxy - w * xm * ym
        b = (sxy + self.kappa * self.b0) / (sxx + self.kappa)
        a = ym - b * xm
        falling = b < 0                      # times do not fall with more tokens
        b = np.where(falling, 0.0, b)
        a = np.where(falling, ym, a)
        negative = a < 0                     # nor are they negative with none
        slope = np.where(wxx > 0, np.maximum(wxy / np.where(wxx > 0, wxx, 1.0), 0.0), self.b0)
        a, b = np.where(negative, 0.0, a), np.where(negative, slope, b)
        a, b = np.where(has, a, self.a0), np.where(has, b, self.b0)
        pw = self.prior_weight
        trials = self.acc[:, 1]
        acceptance = np.where(trials > 0, np.clip(
            (self.acc[:, 0] + pw * self.alpha0) / (trials + pw), 0.0, 1.0), self.alpha0)
        snr = np.expm1(self.rate / self.bandwidth_hz * math.log(2.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            snr_db = np.where(snr > 0, 10.0 * np.log10(np.where(snr > 0, snr, 1.0)), -100.0)
        snr_db = np.clip(np.where(self.rate_seen, snr_db, self.snr0), -100.0, 100.0)
        self._cache = {"a": a, "b": b, "acceptance": acceptance, "snr_db": snr_db}
        return self._cache

    def estimate(self, name: str) -> DeviceEstimate:
        i = self._idx(name)
        e = self._estimates()
        return DeviceEstimate(
            name=name, acceptance=float(e["acceptance"][i]), draft_base_s=float(e["a"][i]),
            draft_per_token_s=float(e["b"][i]), rate_bps=float(self.rate[i]),
            snr_db=float(e["snr_db"][i]), rounds=int(self.rounds[i]),
            position_cells=tuple(map(tuple, self.pos[i].tolist())),
            prior=(float(self.alpha0[i]), self.prior_weight))

    def acceptance_of(self, names: Iterable[str]) -> list[float]:
        """The current acceptance estimate of each named device (one array lookup)."""
        acc = self._estimates()["acceptance"]
        return [float(acc[self._idx(n)]) for n in names]

    def problem(self, active: Iterable[str] | None = None) -> Problem:
        """The problem with the current estimates, for the ``active`` devices (default: all)."""
        names = self.names if active is None else list(active)
        i = [self._idx(n) for n in names]
        e = self._estimates()
        sds = [self._draft_sd.get(n, ()) for n in names]   # the profile's spreads (tail model)
        devices = tuple(map(Device, names, e["a"][i].tolist(), e["b"][i].tolist(),
                            e["acceptance"][i].tolist(), e["snr_db"][i].tolist(), sds))
        return dataclasses.replace(self.base, devices=devices)
