"""Exhaustive reference solvers: ground truth for tests on small problems (K <= 5, Lmax <= 8).

Every length vector in {0..Lmax}^K (heterogeneous) or every common L in 1..Lmax (homogeneous)
is tried, each with its optimal shares, found here by a plain bisection of
sum_k b_k(t) = 1 (independent of the Newton iteration in ``model``). Cost grows as
(Lmax + 1)^K: never use it for planning.

Entry points: ``exhaustive_heterogeneous(arr)`` and ``exhaustive_homogeneous(arr)``, each
returning (lengths, goodput_tps).
"""

from __future__ import annotations

import itertools

import numpy as np

from testbed.control.model import Arrays

MAX_VECTORS = 2_000_000


def _bisect_arrival(arr: Arrays, L: np.ndarray) -> np.ndarray:
    rows = np.arange(arr.K)[None, :]
    p = np.where(L > 0, arr.upload_s[rows, L], 0.0)
    a = np.where(L > 0, arr.drafted_s[rows, L], -np.inf)
    drafting = (L > 0).any(axis=1)
    lo = np.where(drafting, a.max(axis=1), 0.0)
    hi = np.where(drafting, a.max(axis=1) + p.sum(axis=1), 0.0)
    for _ in range(200):  # the bracket halves each time: far below the float spacing
        mid = 0.5 * (lo + hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = mid[:, None] - a
            used = np.where(p > 0, np.where(x > 0, p / x, np.inf), 0.0).sum(axis=1)
        over = used > 1.0
        lo = np.where(over, mid, lo)
        hi = np.where(over, hi, mid)
    return hi


def _goodput(arr: Arrays, L: np.ndarray) -> np.ndarray:
    t = _bisect_arrival(arr, L)
    tokens = arr.tokens[np.arange(arr.K)[None, :], L].sum(axis=1)
    return tokens / (t + arr.fixed_s + arr.v1 * L.sum(axis=1))


def exhaustive_heterogeneous(arr: Arrays) -> tuple[np.ndarray, float]:
    count = (arr.lmax + 1) ** arr.K
    if count > MAX_VECTORS:
        raise ValueError(f"{count} length vectors: too many for exhaustive search")
    L = np.array(list(itertools.product(range(arr.lmax + 1), repeat=arr.K)), dtype=np.intp)
    g = _goodput(arr, L)
    i = int(np.argmax(g))
    return L[i], float(g[i])


def exhaustive_homogeneous(arr: Arrays) -> tuple[np.ndarray, float]:
    L = np.repeat(np.arange(1, arr.lmax + 1, dtype=np.intp)[:, None], arr.K, axis=1)
    g = _goodput(arr, L)
    i = int(np.argmax(g))
    return L[i], float(g[i])
