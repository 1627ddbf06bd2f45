"""The goodput model of one synchronous Multi-SPIN round (docs: goodput-model.md), vectorised.

Given draft lengths L_k and band shares b_k, device k's draft reaches the server at
``ready_k = t0_k + L_k*tau_k + (h + L_k*s) / (b_k*R_k)`` (0 when L_k = 0: nothing to upload),
the server verifies n = sum(L_k + 1) tokens, and the round takes
``T = max_k ready_k + v0 + v1*n + d``. Device k gains E_k = 1 + alpha + ... + alpha^L_k expected
tokens; the goodput is sum(E_k) / T.

For fixed lengths the best shares make every drafting device arrive at the same instant t, the
root of ``sum_k p_k / (t - a_k) = 1`` with a_k = t0_k + L_k*tau_k (drafting done) and
p_k = (h + L_k*s)/R_k (upload time on the whole band). The left side is convex and falls in t,
so Newton's method started left of the root climbs to it monotonically (``arrival_time``).

Main types and entry points: ``Arrays`` (the problem as numpy tables over devices x lengths,
``arrays(problem)``), ``arrival_time``, ``optimal_shares``, ``goodput_of_lengths`` (all
vectorised over many length vectors at once), ``evaluate`` (round time and goodput of any plan)
and ``make_plan`` (a ``Plan`` whose numbers are the model's values for exactly its lengths and
shares). Pure: no I/O.

The tail model (``Problem.model == "tail"``, the default; docs: goodput-model.md, "The tail
model"): a round waits for the *slowest* arrival, so ``max_k ready_k`` becomes
``E[max_k A_k]`` with ``A_k ~ N(mu_k, sd_k^2)`` independent, ``mu_k = a_k + m*p_k/b_k`` and
``sd_k^2 = sigma_k(L_k)^2 + (s_u*p_k/b_k)^2``: drafting's measured spread at its length and
the upload's measured time over bits/rate (mean m, sd s_u). ``evaluate`` (so ``make_plan``,
every forecast and the re-planner's values) uses it whenever the problem has a spread or an
upload factor other than 1; ``inflated(arr, z)`` gives the mean-model tables of the arrival
``mu_k + z*(sigma_k + s_u*p_k/b_k)`` (an upper bound of ``mu_k + z*sd_k``), on which the
mean-model solvers find the plans the tail policies choose from (``policies.py``).
``E[max]`` is integrated numerically up to ``EXACT_MAX_K`` drafting devices (trapezoid
on a fine grid, ``tail.expected_max_grid``; adaptive quadrature, ``tail.expected_max``, when
some arrival has no spread) and Blom's approximation beyond (its error:
``bench/tail_model.py``).

Limits: the model is the contract's synchronous round; acceptance is i.i.d. per position;
the tail model's arrivals are independent normals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from testbed.control import tail
from testbed.control.problem import DevicePlan, Plan, Problem

_LN2 = math.log(2.0)
EXACT_MAX_K = 1000      # drafting devices up to which E[max] is integrated, Blom's beyond
GRID_MAX_K = 32         # up to this many, on a fixed grid (faster there than adaptive)


def spectral_efficiency(snr_db) -> np.ndarray:
    """log2(1 + SNR) in bit/s/Hz, accurate also for very low SNR."""
    return np.log1p(np.power(10.0, np.asarray(snr_db, dtype=float) / 10.0)) / _LN2


def uplink_rate_bps(share: float, bandwidth_hz: float, snr_db: float) -> float:
    """Shannon rate of a share of the band, in bit/s: share * B * log2(1 + 10^(snr_db / 10))
    (``spectral_efficiency``). The one definition: the controller plans with it and the live
    session shapes each device's ``tc`` class with it."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if bandwidth_hz <= 0:
        raise ValueError(f"bandwidth_hz must be positive, got {bandwidth_hz}")
    return share * bandwidth_hz * float(spectral_efficiency(snr_db))


def expected_tokens(alpha, draft_len):
    """E = 1 + alpha + ... + alpha^L (= (1 - alpha^(L+1)) / (1 - alpha); L + 1 at alpha = 1)."""
    alpha, L = np.broadcast_arrays(np.asarray(alpha, dtype=float), np.asarray(draft_len, np.intp))
    table = _tokens_table(alpha.ravel(), int(L.max()) if L.size else 0)
    out = table[np.arange(alpha.size), L.ravel()].reshape(alpha.shape)
    return out if out.ndim else float(out)


def _tokens_table(alpha: np.ndarray, lmax: int) -> np.ndarray:
    powers = np.power(alpha[:, None], np.arange(lmax + 1)[None, :])  # 0**0 == 1
    return np.cumsum(powers, axis=1)


@dataclass(frozen=True)
class Arrays:
    """A problem as numpy tables. Rows are devices, columns draft lengths 0..lmax."""

    rate_bps: np.ndarray     # (K,) full-band rate R_k
    tokens: np.ndarray       # (K, lmax+1) expected tokens E_k(L)
    drafted_s: np.ndarray    # (K, lmax+1) a_k(L) = t0_k + L*tau_k
    upload_s: np.ndarray     # (K, lmax+1) p_k(L) = (h + L*s) / R_k; 0 at L = 0
    v0: float
    v1: float
    d: float
    lmax: int
    lfix: int
    draft_sd: np.ndarray | None = None   # (K, lmax+1) drafting's sd at each length (0 at L=0)
    upload_mean: float = 1.0             # an upload's time over bits/rate: mean and sd
    upload_sd: float = 0.0
    tail: bool = False                   # round = E[slowest arrival] (module docstring)
    min_share: np.ndarray | None = None  # (K,) the share the lab's rate floor amounts to:
                                         # a smaller share uploads at the floor's rate

    @property
    def K(self) -> int:
        return self.rate_bps.shape[0]

    @property
    def fixed_s(self) -> float:
        """Round time that does not depend on the plan: v0 + v1*K + d."""
        return self.v0 + self.v1 * self.K + self.d


def arrays(problem: Problem) -> Arrays:
    devs = problem.devices
    t0 = np.array([d.draft_base_s for d in devs], dtype=float)
    tau = np.array([d.draft_per_token_s for d in devs], dtype=float)
    alpha = np.array([d.acceptance for d in devs], dtype=float)
    snr = np.array([d.snr_db for d in devs], dtype=float)
    return arrays_from(t0, tau, alpha, snr, problem, [d.draft_sd_s for d in devs])


def sd_table(draft_sd, lmax: int) -> np.ndarray:
    """(K, lmax+1) drafting sd at L = 0..lmax from each device's ``draft_sd_s`` (L = 1, 2, ...;
    the last entry holds beyond; empty: 0)."""
    out = np.zeros((len(draft_sd), lmax + 1))
    for k, sds in enumerate(draft_sd):
        if len(sds):
            row = np.asarray(sds, dtype=float)[:lmax]
            out[k, 1:1 + row.size] = row
            out[k, 1 + row.size:] = row[-1]
    return out


def arrays_from(t0, tau, alpha, snr_db, problem: Problem, draft_sd=None) -> Arrays:
    """Tables for per-device parameter vectors and the shared settings of ``problem``
    (``draft_sd``: each device's ``draft_sd_s``, for the tail model)."""
    lmax = problem.max_draft_len
    ls = np.arange(lmax + 1, dtype=float)
    rate = problem.bandwidth_hz * spectral_efficiency(snr_db)
    upload = (problem.header_bits + ls[None, :] * problem.bits_per_draft_token) / rate[:, None]
    upload[:, 0] = 0.0
    drafted = np.asarray(t0, float)[:, None] + ls[None, :] * np.asarray(tau, float)[:, None]
    s = problem.server
    sd = sd_table(draft_sd, lmax) if draft_sd is not None else np.zeros_like(drafted)
    um, us = (float(x) for x in problem.upload_time_factor)
    tail_on = problem.model == "tail" and (bool(sd.any()) or um != 1.0 or us > 0)
    return Arrays(rate_bps=rate, tokens=_tokens_table(np.asarray(alpha, float), lmax),
                  drafted_s=drafted, upload_s=upload, v0=s.verify_base_s, v1=s.verify_per_token_s,
                  d=s.downlink_s, lmax=lmax, lfix=problem.baseline_draft_len, draft_sd=sd,
                  upload_mean=um, upload_sd=us, tail=tail_on,
                  min_share=(problem.min_rate_bps / rate) if problem.min_rate_bps else None)


def effective_shares(arr: Arrays, shares) -> np.ndarray:
    """The shares as the lab serves them: at least the rate floor's (``min_share``)."""
    b = np.asarray(shares, dtype=float)
    return b if arr.min_share is None else np.where(b > 0, np.maximum(b, arr.min_share), b)


def inflated(arr: Arrays, z: float) -> Arrays:
    """The mean-model tables of the arrival ``a + z*sigma(L) + (m + z*s_u) * p/b``: the tail
    model's arrival at ``z`` of its spread (by the upper bound sigma + s_u*p/b of its sd).
    At z = 0, the tail model's mean arrival. The result plans with the mean model."""
    sd = arr.draft_sd if arr.draft_sd is not None else 0.0
    return replace(arr, drafted_s=arr.drafted_s + z * sd,
                   upload_s=arr.upload_s * (arr.upload_mean + z * arr.upload_sd), tail=False)


def quantile_shares(arr: Arrays, lengths, z: float) -> np.ndarray:
    """Shares that make every drafting device's ``mu_k + z*sd_k`` (tail model) equal, summing
    to 1: the tail model's counterpart of ``optimal_shares`` (z = 0: equal mean arrivals).

    With u = p_k/b_k a device's upload time, ``a + m*u + z*sqrt(sigma^2 + s_u^2*u^2) = t``
    is a quadratic in u (closed form, the root with t - a - m*u >= 0); the level t where the
    shares p_k/u_k sum to 1 is bracketed by a vectorised 32-point search (the sum falls in t)."""
    L = np.asarray(lengths, dtype=np.intp)
    k = np.flatnonzero(L > 0)
    out = np.zeros(arr.K)
    if k.size == 0:
        return out
    a = arr.drafted_s[k, L[k]]
    p = arr.upload_s[k, L[k]]
    sig = arr.draft_sd[k, L[k]] if arr.draft_sd is not None else np.zeros(k.size)
    m, s = arr.upload_mean, arr.upload_sd

    def uploads(t: float) -> np.ndarray:
        c = t - a - z * sig                      # u's budget when sigma's term is at u = 0
        A = m * m - z * z * s * s
        cc = t - a
        if z == 0.0 or s == 0.0:
            # a + m*u + z*sigma = t
            return np.maximum(c, 0.0) / m
        B = -2.0 * cc * m
        C = cc * cc - z * z * sig * sig
        with np.errstate(invalid="ignore", divide="ignore"):
            disc = np.sqrt(np.maximum(B * B - 4 * A * C, 0.0))
            if abs(A) < 1e-15:
                u = -C / B
            else:
                r1, r2 = (-B - disc) / (2 * A), (-B + disc) / (2 * A)
                ok1 = (r1 >= 0) & (cc - m * r1 >= 0)
                u = np.where(ok1, r1, r2)
        return np.where(c > 0, np.maximum(u, 0.0), 0.0)

    def total(t: np.ndarray) -> np.ndarray:
        """sum_k p_k / u_k(t) for each t (inf where some u_k is 0)."""
        u = uploads(t[:, None])
        with np.errstate(divide="ignore"):
            return np.where((u > 0).all(axis=1), (p / np.where(u > 0, u, 1.0)).sum(axis=1),
                            np.inf)

    lo = float((a + z * sig).max())
    hi = lo + 1.0
    while total(np.array([hi]))[0] > 1.0:
        hi = lo + 2.0 * (hi - lo)
    for _ in range(8):                         # 31 points a step: 32^8 of the bracket
        ts = np.linspace(lo, hi, 33)[1:-1]
        above = total(ts) > 1.0
        i = int(above.sum())                   # total falls in t: the first i are above
        lo, hi = (ts[i - 1] if i else lo), (ts[i] if i < ts.size else hi)
        if hi - lo <= 1e-13 * hi:
            break
    b = p / uploads(np.array([hi])[:, None])[0]
    out[k] = b / max(b.sum(), 1.0)
    return out


def tail_shares(arr: Arrays, lengths, start=None, max_iter: int = 200) -> np.ndarray:
    """The shares of ``lengths`` that minimise the tail model's E[slowest arrival].

    E[max] is convex in the shares (the max of arrivals is convex and non-decreasing in each
    mean and sd, which are convex in the share), so a local method finds the optimum:
    BFGS (scipy; L-BFGS beyond 64 drafters) over a softmax of the drafting devices' shares, with the gradient of
    ``tail.expected_max_grad`` (trapezoid grid), from ``start`` (default: the equal-quantile
    shares at z = 1). A drafter without any spread gets a floor of 1e-3 of the largest sd, so
    that the grid resolves it."""
    from scipy import optimize
    L = np.asarray(lengths, dtype=np.intp)
    k = np.flatnonzero(L > 0)
    out = np.zeros(arr.K)
    if k.size <= 1:
        out[k] = 1.0
        return out
    b0 = quantile_shares(arr, L, 1.0) if start is None else np.asarray(start, dtype=float)
    a = arr.drafted_s[k, L[k]]
    p = arr.upload_s[k, L[k]]
    sig = arr.draft_sd[k, L[k]] if arr.draft_sd is not None else np.zeros(k.size)
    m, s = arr.upload_mean, arr.upload_sd

    def moments(b):
        up = p / b
        return a + m * up, np.sqrt(sig ** 2 + (s * up) ** 2), up

    floor = 1e-3 * float(moments(np.maximum(b0[k], 1e-12))[1].max())

    def cost(x):
        e = np.exp(x - x.max())
        b = e / e.sum()
        mu, sd, up = moments(b)
        val, d_mu, d_sd = tail.expected_max_grad(mu, np.maximum(sd, floor), points=257)
        d_sd = np.where(sd > floor, d_sd, 0.0)
        g = d_mu * (-m * up / b) + d_sd * (-(s * up) ** 2 / (b * np.maximum(sd, floor)))
        return val, b * (g - float((b * g).sum()))

    x0 = np.log(np.maximum(b0[k], 1e-12))
    if k.size <= 64:        # dense BFGS: less overhead per step than L-BFGS-B's
        res = optimize.minimize(cost, x0, jac=True, method="BFGS",
                                options={"maxiter": max_iter, "gtol": 1e-7})
    else:
        res = optimize.minimize(cost, x0, jac=True, method="L-BFGS-B",
                                options={"maxiter": max_iter, "gtol": 1e-10, "ftol": 1e-12})
    e = np.exp(res.x - res.x.max())
    out[k] = e / e.sum()
    return out


def arrival_moments(arr: Arrays, lengths, shares) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of each drafting device's arrival under the tail model (devices with
    L = 0 left out; an arrival with no band is infinite)."""
    L = np.asarray(lengths, dtype=np.intp)
    b = effective_shares(arr, shares)
    k = np.flatnonzero(L > 0)
    with np.errstate(divide="ignore"):
        up = np.where(b[k] > 0, arr.upload_s[k, L[k]] / np.where(b[k] > 0, b[k], 1.0), np.inf)
    mu = arr.drafted_s[k, L[k]] + arr.upload_mean * up
    sd_d = arr.draft_sd[k, L[k]] if arr.draft_sd is not None else np.zeros(k.size)
    sd = np.sqrt(sd_d ** 2 + (arr.upload_sd * np.where(np.isfinite(up), up, 0.0)) ** 2)
    return mu, sd


def slowest_arrival(arr: Arrays, lengths, shares) -> float:
    """E[max_k A_k] over the drafting devices (0 when none drafts): exact up to
    ``EXACT_MAX_K`` drafters, Blom's approximation beyond (module docstring)."""
    mu, sd = arrival_moments(arr, lengths, shares)
    if mu.size == 0:
        return 0.0
    if not np.all(np.isfinite(mu)):
        return math.inf
    if mu.size > EXACT_MAX_K:
        return tail.expected_max_approx(mu, sd)
    if mu.size <= GRID_MAX_K and np.all(sd > 0):
        return tail.expected_max_grid(mu, sd)
    return tail.expected_max(mu, sd)


def _gather(table: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """table[k, lengths[..., k]] for every k: one flat take (faster than fancy indexing)."""
    K, width = table.shape
    return np.take(table, np.arange(K) * width + lengths)


def arrival_time(arr: Arrays, lengths, t_guess=None) -> np.ndarray:
    """Equal-arrival instant t of each length vector (rows of ``lengths``); 0 with no drafter.

    Solves sum_{k: L_k > 0} p_k / (t - a_k) = 1 by Newton's method from the lower bound
    max(max_k(a_k + p_k), min_k a_k + sum_k p_k): f is convex and decreasing, so the iterates
    rise monotonically to the root (quadratically near it). A Newton step from any point right
    of every a_k (``t_guess``, one per row or one for all, or else the upper bound
    max_k a_k + sum_k p_k) also lands left of the root, usually much closer: the start is the
    larger of the two.
    """
    L = np.atleast_2d(np.asarray(lengths, dtype=np.intp))
    drafting = L > 0
    p = _gather(arr.upload_s, L)                                   # 0 where L = 0
    a = np.where(drafting, _gather(arr.drafted_s, L), -np.inf)     # -inf: p / (t - a) = 0
    any_draft = drafting.any(axis=1)
    psum = p.sum(axis=1)
    amin = np.where(drafting, a, np.inf).min(axis=1)
    hi = np.where(any_draft, a.max(axis=1) + psum, np.inf)
    t = np.where(any_draft, np.maximum((a + p).max(axis=1), amin + psum), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        guess = hi if t_guess is None else \
            np.broadcast_to(np.asarray(t_guess, dtype=float), t.shape)
        x = guess[:, None] - a
        q = p / x
        step = (q.sum(axis=1) - 1.0) / (q / x).sum(axis=1)
        ok = any_draft & (x > 0).all(axis=1) & np.isfinite(step)
        t = np.where(ok, np.maximum(t, guess + step), t)
        for _ in range(200):
            x = t[:, None] - a
            q = p / x
            step = np.maximum((q.sum(axis=1) - 1.0) / (q / x).sum(axis=1), 0.0)
            new = np.minimum(t + step, hi)
            if not (new - t > 1e-15 * new).any():
                t = new
                break
            t = new
    return np.where(any_draft, t, 0.0)


def optimal_shares(arr: Arrays, lengths, t: np.ndarray | None = None) -> np.ndarray:
    """Shares that make all drafters of each row arrive together; they sum to at most 1."""
    L = np.atleast_2d(np.asarray(lengths, dtype=np.intp))
    if t is None:
        t = arrival_time(arr, L)
    p = _gather(arr.upload_s, L)
    a = _gather(arr.drafted_s, L)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(L > 0, p / (t[:, None] - a), 0.0)
    total = b.sum(axis=1, keepdims=True)
    return b / np.maximum(total, 1.0)


def goodput_of_lengths(arr: Arrays, lengths, t_guess=None) -> np.ndarray:
    """Goodput of each row of ``lengths`` with its optimal shares (equal arrival)."""
    L = np.atleast_2d(np.asarray(lengths, dtype=np.intp))
    t = arrival_time(arr, L, t_guess)
    tokens = _gather(arr.tokens, L).sum(axis=1)
    return tokens / (t + arr.fixed_s + arr.v1 * L.sum(axis=1))


def evaluate(arr: Arrays, lengths, shares) -> tuple[float, float]:
    """(round_s, goodput_tps) of one plan: any lengths and shares, not only optimal ones; with
    the tail model when ``arr.tail`` (module docstring)."""
    L = np.asarray(lengths, dtype=np.intp)
    b = np.asarray(shares, dtype=float)
    rows = np.arange(arr.K)
    if arr.tail:
        round_s = slowest_arrival(arr, L, b) + arr.fixed_s + arr.v1 * float(L.sum())
        return round_s, float(arr.tokens[rows, L].sum() / round_s)
    b = effective_shares(arr, b)
    drafting = L > 0
    with np.errstate(divide="ignore"):
        ready = np.where(drafting, arr.drafted_s[rows, L]
                         + arr.upload_s[rows, L] / np.where(drafting, b, 1.0), 0.0)
    ready = np.where(drafting & (b <= 0), np.inf, ready)
    round_s = float(ready.max() + arr.fixed_s + arr.v1 * L.sum())
    return round_s, float(arr.tokens[rows, L].sum() / round_s)


def make_plan(problem: Problem, arr: Arrays, policy: str, lengths, shares) -> Plan:
    """A plan whose round time, goodput and per-device numbers are the model's for these values."""
    L = np.asarray(lengths, dtype=np.intp)
    b = np.where(L > 0, np.asarray(shares, dtype=float), 0.0)
    round_s, goodput = evaluate(arr, L, b)
    tokens = arr.tokens[np.arange(arr.K), L]
    devices = tuple(DevicePlan(name=d.name, draft_len=n, bandwidth_share=share, uplink_bps=bps,
                               expected_tokens=e)
                    for d, n, share, bps, e in zip(problem.devices, L.tolist(), b.tolist(),
                                                   (b * arr.rate_bps).tolist(), tokens.tolist()))
    return Plan(policy=policy, round_s=round_s, goodput_tps=goodput, devices=devices)
