"""Error bars for run summaries: intervals over repeats, and paired ratios between policies.

A run with ``repeats: N`` measures every policy N times; repeat ``r`` of every policy forms
block ``r`` (in ``order: interleaved`` the block's policies ran one after another in a seeded
random order). Two statistics come from that, both with scipy.stats (docs/experiments.md,
"Error bars"):

- ``mean_ci(values)``: a policy's mean goodput over its repeats with a Student-t 95% interval
  (``scipy.stats.t``); none with fewer than two repeats.
- ``paired_ratio(a, b)``: the ratio of two policies' mean goodputs, ``mean(a) / mean(b)``,
  with a 95% interval from a paired bootstrap over blocks (``scipy.stats.bootstrap`` with
  ``paired=True``: a resample draws whole blocks, so the load a block saw falls on both policies
  alike). BCa, 9,999 resamples, a fixed seed so that a report is the same every time; the
  percentile method when BCa cannot be computed (all blocks alike). With two blocks a bootstrap
  has nothing to resample from, so the interval is the Student-t interval of the per-block log
  ratios instead; with one block there is no interval. ``method`` says which.

Limits: with few blocks every interval is rough. A bootstrap over 3 blocks takes at most 10
distinct values and is known to come out narrower than the truth; the t interval of the log
ratios is printed beside it (``t_ci95``) so a reader can see both. Only blocks in which both
policies have a goodput are paired.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 20261201
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


def _log_ratio_t(a: np.ndarray, b: np.ndarray) -> list[float] | None:
    """The t interval of the mean per-block log ratio, back on the ratio scale."""
    from scipy import stats
    d = np.log(a) - np.log(b)
    if len(d) < 2:
        return None
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
    from scipy import stats
    blocks = sorted(k for k in a_by_block if k in b_by_block
                    and _finite([a_by_block[k]]) and _finite([b_by_block[k]]))
    a = np.array([float(a_by_block[k]) for k in blocks])
    b = np.array([float(b_by_block[k]) for k in blocks])
    if not blocks or b.mean() <= 0:
        return None
    ratio = float(a.mean() / b.mean())
    out = {"ratio": ratio, "ci95": None, "method": None, "blocks": len(blocks), "t_ci95": None}
    positive = bool(np.all(a > 0) and np.all(b > 0))
    if len(blocks) >= 2 and positive:
        out["t_ci95"] = _log_ratio_t(a, b)
    if len(blocks) == 2:
        if out["t_ci95"] is not None:
            out["ci95"], out["method"] = out["t_ci95"], "t on log ratios (2 blocks)"
        return out
    if len(blocks) < 2:
        return out

    def stat(x, y, axis=-1):
        return np.mean(x, axis=axis) / np.mean(y, axis=axis)

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # degenerate BCa: caught by the check below
            res = stats.bootstrap((a, b), stat, paired=True, vectorized=True,
                                  n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=LEVEL,
                                  method=method, random_state=BOOTSTRAP_SEED)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            out["ci95"] = [lo, hi]
            out["method"] = f"paired bootstrap ({method}, {len(blocks)} blocks)"
            return out
    return out
