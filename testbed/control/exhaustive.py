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

``random_problem(rng, devices=None)``: a seeded random problem over wide ranges, small enough
for these references (the tests' generator, and ``testbed policy check``'s).
"""

from __future__ import annotations

import itertools

import numpy as np

from testbed.control.model import Arrays
from testbed.control.problem import Device, Problem, Server

MAX_VECTORS = 2_000_000


def random_problem(rng: np.random.Generator, devices: int | None = None) -> Problem:
    """Wide ranges on purpose: speeds, SNRs, acceptances (edges 0 and 1 included), payloads.
    K devices drawn in 1..4 unless ``devices`` says how many; Lmax in 1..8."""
    K = int(rng.integers(1, 5)) if devices is None else int(devices)
    lmax = int(rng.integers(1, 9))

    def logu(lo, hi):
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    devs = []
    for k in range(K):
        r = rng.random()
        alpha = 0.0 if r < 0.05 else 1.0 if r < 0.1 else \
            float(rng.uniform(0.85, 0.99)) if r < 0.3 else float(rng.uniform(0, 1))
        devs.append(Device(f"d{k}", 0.0 if rng.random() < 0.4 else logu(1e-3, 0.2),
                           logu(1e-3, 0.3), alpha, float(rng.uniform(-10, 35))))
    server = Server(logu(0.005, 0.5), 0.0 if rng.random() < 0.3 else logu(1e-5, 0.02),
                    0.0 if rng.random() < 0.3 else logu(1e-4, 0.02))
    return Problem(bandwidth_hz=logu(1e4, 2e6), bits_per_draft_token=logu(8, 8000),
                   header_bits=0.0 if rng.random() < 0.3 else logu(8, 4000),
                   max_draft_len=lmax, baseline_draft_len=int(rng.integers(1, lmax + 1)),
                   server=server, devices=tuple(devs))


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
