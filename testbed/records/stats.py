"""Error bars for run summaries: intervals over repeats, and paired ratios between policies.

A run with ``repeats: N`` measures every policy N times; repeat ``r`` of every policy forms
block ``r`` (in ``order: interleaved`` the block's policies ran one after another in a seeded
random order). Two statistics come from that, both with scipy.stats (docs/experiments.md,
"Repeats, order and error bars"):

- ``mean_ci(values)``: a policy's mean goodput over its repeats with a Student-t 95% interval
  (``scipy.stats.t``); none with fewer than two repeats.
- ``paired_ratio(a, b)``: the ratio of two policies' mean goodputs, ``mean(a) / mean(b)``,
  with a 95% interval from the per-block log ratios ``log a_r - log b_r``: the Student-t
  interval of their mean (``scipy.stats.t``, n - 1 degrees of freedom), back on the ratio scale
  (``method`` "t on log ratios (N blocks)"). Pairing by block removes what a block's policies
  share (the machine's load in those minutes); the log makes a multiplicative block effect
  additive. ``t_ci95`` is the same interval (the key predates the choice). None with one block,
  or when a goodput is zero or negative (no log).

Why not the paired bootstrap used before: over 3 blocks (what published runs use) a bootstrap
has at most 10 distinct resamples, and its "95%" interval held the true ratio in 72-75% of
simulated runs, BCa and percentile alike, against 95% for this t interval; at 8 blocks the
bootstrap still reached only 89% (``bench/coverage.py``, ``docs/data/bench/coverage.md``; the
noise sized from the published runs). The price is width: with 3 blocks the t quantile is 4.30
and the interval about +-14% of the ratio; 5 blocks make it about half as wide.

What an interval covers: the repeats of one run on one machine. It says how much the ratio
moved between that run's blocks, not how much another run, another day or another machine
would differ: the quickstart's ratio measured on different days moved by more than a run's own
repeats explain (coverage.md, "between runs"). Ratio and interval estimate the same thing only
when the noise is multiplicative and alike for both policies: the interval is about the
geometric mean of per-block ratios, ``ratio`` is the ratio of means. Only blocks in which both
policies have a goodput are paired.
"""

from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95


def _finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)]


def mean_ci(values) -> dict:
    """``{"mean", "ci95", "sd", "n", "method"}`` of the values (a t interval; ``ci95`` None
    below two values)."""
    from scipy import stats
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return {"mean": None, "ci95": None, "sd": None, "n": 0, "method": None}
    mean = float(np.mean(xs))
    if n < 2:
        return {"mean": mean, "ci95": None, "sd": None, "n": 1, "method": None}
    sd = float(np.std(xs, ddof=1))
    if sd == 0.0:
        return {"mean": mean, "ci95": [mean, mean], "sd": 0.0, "n": n, "method": "t"}
    lo, hi = stats.t.interval(LEVEL, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return {"mean": mean, "ci95": [float(lo), float(hi)], "sd": sd, "n": n, "method": "t"}


def _log_ratio_t(a: np.ndarray, b: np.ndarray) -> list[float]:
    """The t interval of the mean per-block log ratio (two blocks or more, all positive), back
    on the ratio scale."""
    from scipy import stats
    d = np.log(a) - np.log(b)
    sd = float(np.std(d, ddof=1))
    m = float(np.mean(d))
    if sd == 0.0:
        return [math.exp(m), math.exp(m)]
    lo, hi = stats.t.interval(LEVEL, len(d) - 1, loc=m, scale=sd / math.sqrt(len(d)))
    return [math.exp(lo), math.exp(hi)]


def paired_ratio(a_by_block: dict, b_by_block: dict) -> dict | None:
    """``mean(a) / mean(b)`` over the blocks both have, with its 95% interval (see the module
    docstring): ``{"ratio", "ci95", "method", "blocks", "t_ci95"}``; None without a common
    block or with a zero mean."""
    blocks = sorted(k for k in a_by_block if k in b_by_block
                    and _finite([a_by_block[k]]) and _finite([b_by_block[k]]))
    a = np.array([float(a_by_block[k]) for k in blocks])
    b = np.array([float(b_by_block[k]) for k in blocks])
    if not blocks or b.mean() <= 0:
        return None
    out = {"ratio": float(a.mean() / b.mean()), "ci95": None, "method": None,
           "blocks": len(blocks), "t_ci95": None}
    if len(blocks) >= 2 and np.all(a > 0) and np.all(b > 0):
        interval = _log_ratio_t(a, b)
        out["ci95"], out["t_ci95"] = interval, list(interval)
        out["method"] = f"t on log ratios ({len(blocks)} blocks)"
    return out
