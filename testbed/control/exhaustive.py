"""Exhaustive reference solvers: ground truth for tests on small problems (K <= 5, Lmax <= 8).

Every length vector in {0..Lmax}^K (heterogeneous) or every common L in 1..Lmax (homogeneous)
is tried, each with its optimal shares, found here by a plain bisection of
sum_k b_k(t) = 1 (independent of the Newton iteration in ``model``). Cost grows as
(Lmax + 1)^K: never use it for planning.

Entry points: ``exhaustive_heterogeneous(arr)`` and ``exhaustive_homogeneous(arr)``, each
returning (lengths, goodput_tps); for the fair policies (``fair``) ``exhaustive_table(arr)``
(every length vector with its tokens and round time, to share between the three below),
``exhaustive_proportional_fair(arr)`` -> (lengths, sum_k log g_k),
``exhaustive_max_min(arr)`` -> (lengths, min_k g_k) (ties in the minimum: the largest sum
goodput) and ``exhaustive_slo(arr, tpot_s)`` -> (lengths or None, goodput_tps or nan,
max-min goodput), g_k = E_k / T the goodput of device k.
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


def exhaustive_table(arr: Arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every length vector L (n, K), its expected tokens E (n, K) and round time T (n,)."""
    count = (arr.lmax + 1) ** arr.K
    if count > MAX_VECTORS:
        raise ValueError(f"{count} length vectors: too many for exhaustive search")
    L = np.array(list(itertools.product(range(arr.lmax + 1), repeat=arr.K)), dtype=np.intp)
    T = _bisect_arrival(arr, L) + arr.fixed_s + arr.v1 * L.sum(axis=1)
    return L, arr.tokens[np.arange(arr.K)[None, :], L], T


def exhaustive_proportional_fair(arr: Arrays, table=None) -> tuple[np.ndarray, float]:
    L, E, T = exhaustive_table(arr) if table is None else table
    u = np.log(E).sum(axis=1) - arr.K * np.log(T)
    i = int(np.argmax(u))
    return L[i], float(u[i])


def exhaustive_max_min(arr: Arrays, table=None) -> tuple[np.ndarray, float]:
    L, E, T = exhaustive_table(arr) if table is None else table
    m = (E / T[:, None]).min(axis=1)
    tied = np.flatnonzero(m == m.max())
    i = int(tied[np.argmax(E[tied].sum(axis=1) / T[tied])])
    return L[i], float(m[i])


def exhaustive_slo(arr: Arrays, tpot_s: float, table=None):
    """(lengths, goodput) of the best plan with every T / E_k <= tpot_s, or (None, nan) when
    no plan meets it; third: the best min_k g_k of any plan (its 1/x is the best TPOT)."""
    L, E, T = exhaustive_table(arr) if table is None else table
    m = (E / T[:, None]).min(axis=1)
    ok = (E >= T[:, None] / tpot_s).all(axis=1)
    if not ok.any():
        return None, float("nan"), float(m.max())
    g = np.where(ok, E.sum(axis=1) / T, -np.inf)
    i = int(np.argmax(g))
    return L[i], float(g[i]), float(m.max())
