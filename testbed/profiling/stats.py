"""The profiler's statistics: straight-line fits with spreads, Wilson intervals, acceptance tallies.

Pure functions and small data types, no I/O, so the numbers a profile reports can be checked
against hand-computed ones:

- ``fit_line(xs, ys)``: ordinary least squares ``y = base + slope * x`` with the standard errors
  of both coefficients (``base_sd``, ``slope_sd``), the residual spread and R^2. Drafting time
  vs draft length, wire bits vs draft length and verification time vs batch tokens all use it.
- ``wilson(k, n)``: the 95% Wilson score interval of a proportion (sensible at 0 and 1 and for
  small n, unlike the normal approximation).
- ``AcceptanceTally``: counts drafted and accepted tokens of rounds. Acceptance in the goodput
  model is i.i.d. per position and stops at the first rejection, so a round with ``a`` of ``L``
  drafted tokens accepted is ``a`` successes in ``a + (1 if a < L else 0)`` trials (positions
  after the first rejection were never judged). ``rate`` is that maximum-likelihood estimate;
  per position ``i`` the trials are the rounds that judged position ``i``. ``n_drafted`` is
  reported beside it.
- ``mean_sd``: mean and sample standard deviation.

Limits: fits are unweighted; a fit needs two distinct x values (one gives slope 0 and no spread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

Z95 = 1.959963984540054


@dataclass(frozen=True)
class LineFit:
    """``y = base + slope * x`` fitted to ``n`` points; spreads None when they cannot be had."""

    base: float
    slope: float
    base_sd: float | None
    slope_sd: float | None
    resid_sd: float | None
    r2: float | None
    n: int

    def at(self, x: float) -> float:
        return self.base + self.slope * x


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LineFit:
    """Least-squares line through the points. Raises ValueError without any point."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    n = len(xs)
    if n == 0:
        raise ValueError("no points to fit")
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0:
        sd = math.sqrt(syy / (n - 1)) if n > 1 else None
        return LineFit(my, 0.0, sd / math.sqrt(n) if sd is not None else None, None, sd,
                       None, n)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    base = my - slope * mx
    sse = sum((y - base - slope * x) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - sse / syy if syy > 0 else 1.0
    if n > 2:
        s2 = sse / (n - 2)
        slope_sd = math.sqrt(s2 / sxx)
        base_sd = math.sqrt(s2 * (1.0 / n + mx * mx / sxx))
        resid_sd = math.sqrt(s2)
    else:
        slope_sd = base_sd = resid_sd = None
    return LineFit(base, slope, base_sd, slope_sd, resid_sd, r2, n)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials; (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in 0..n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation); (None, None) without values, sd None for one."""
    n = len(values)
    if n == 0:
        return None, None
    m = sum(values) / n
    if n == 1:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


@dataclass
class AcceptanceTally:
    """Drafted/accepted counts of rounds; see the module docstring for what a trial is."""

    drafted: int = 0
    accepted: int = 0
    trials: int = 0
    rounds: int = 0
    pos_trials: list[int] = field(default_factory=list)
    pos_accepted: list[int] = field(default_factory=list)

    def add(self, n_drafted: int, n_accepted: int) -> None:
        if not 0 <= n_accepted <= n_drafted:
            raise ValueError(f"accepted {n_accepted} of {n_drafted} drafted tokens")
        if n_drafted == 0:
            return
        self.rounds += 1
        self.drafted += n_drafted
        self.accepted += n_accepted
        judged = n_accepted + (1 if n_accepted < n_drafted else 0)
        self.trials += judged
        while len(self.pos_trials) < judged:
            self.pos_trials.append(0)
            self.pos_accepted.append(0)
        for i in range(judged):
            self.pos_trials[i] += 1
            if i < n_accepted:
                self.pos_accepted[i] += 1

    def merge(self, other: "AcceptanceTally") -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.trials += other.trials
        self.rounds += other.rounds
        while len(self.pos_trials) < len(other.pos_trials):
            self.pos_trials.append(0)
            self.pos_accepted.append(0)
        for i, (t, a) in enumerate(zip(other.pos_trials, other.pos_accepted)):
            self.pos_trials[i] += t
            self.pos_accepted[i] += a

    @property
    def rate(self) -> float | None:
        return self.accepted / self.trials if self.trials else None

    def summary(self, per_position: bool = True) -> dict:
        """The profile's acceptance block: rate, ci95, counts (and per position)."""
        out = {"rate": self.rate, "ci95": list(wilson(self.accepted, self.trials)),
               "n_drafted": self.drafted, "n_accepted": self.accepted, "n_judged": self.trials,
               "rounds": self.rounds}
        if per_position:
            out["per_position"] = [
                {"position": i + 1, "rate": a / t if t else None, "ci95": list(wilson(a, t)),
                 "n": t} for i, (t, a) in enumerate(zip(self.pos_trials, self.pos_accepted))]
        return out
