"""The expected slowest arrival of a synchronous round: the tail model's core (issue #27).

A round waits for the last of its K drafting devices, so its length is the server's part plus
``max_k A_k``, where ``A_k`` is device k's arrival (drafting plus upload, from the round's
start). The goodput model of the contract plans with ``max_k E[A_k]``; the round takes
``E[max_k A_k]``, which is larger, and most so when every device arrives at the same mean time
(equal-arrival shares: the Multi-SPIN plans). Here each arrival is a normal ``N(mu_k, sd_k^2)``,
independent across devices: the simulator draws drafting's residual and the upload's factor
over the model as normals (``sim/lab.py``), so their sum is normal but for the clipping of
rare draws (drafting at least half its mean, the factor at least 0.5).

- ``expected_max(mu, sd)``: ``E[max_k A_k]`` by numerical integration of
  ``m + integral from m to inf of (1 - prod_k Phi((t - mu_k) / sd_k)) dt`` (scipy's adaptive
  quadrature; ``m`` is below every arrival's 8.5-sigma point, where the product is below
  1e-16, and at least the largest deterministic arrival). Exact to the quadrature's tolerance
  (1e-10 of the arrivals' span); its cost is O(K) per evaluation of the integrand, a few
  hundred evaluations.
- ``expected_max_approx(mu, sd)``: the time ``t`` where ``prod_k Phi((t - mu_k) / sd_k)``
  equals ``p^K`` with Blom's ``p = (K - 0.375) / (K + 0.25)``: for identical devices exactly
  Blom's approximation of the largest of K normals (``mu + sd * Phi^-1(p)``), for others the
  same level of the product. Found by bisection (60 steps on log Phi), no quadrature.
  Its error against the exact value and against sampled maxima, for K from 2 to 10,000:
  ``bench/tail_model.py`` (table in ``docs/data/bench/tail_model.md``).
- ``expected_max_sampled(mu, sd, n, rng)``: the mean of ``n`` sampled maxima (the reference a
  simulation gives; vectorised).

- ``expected_max_grid(mu, sd)`` and ``expected_max_grad(mu, sd)``: the same integral by the
  trapezoid rule on one fixed grid (vectorised; faster than the adaptive rule for a few
  devices), the second with its derivatives by every mean and sd (``model.tail_shares``
  optimises the shares with them).

``control.model`` uses these for the tail model's round time (docs/controller.md, "The tail
model").

Limits: independence across devices (a shared server or a shared channel fade would correlate
arrivals); normal arrivals (a long right tail, such as a retransmission, is not modelled).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate, special

SIGMAS = 8.5            # below mu - 8.5 sd, Phi < 1e-17: the product is negligible there
BLOM_ALPHA = 0.375


def _arrays(mu, sd) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=float).ravel()
    sd = np.asarray(sd, dtype=float).ravel()
    if mu.shape != sd.shape or mu.size == 0:
        raise ValueError(f"mu and sd must be non-empty and of one length, got {mu.size} and "
                         f"{sd.size}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sd)) and np.all(sd >= 0)):
        raise ValueError("mu must be finite and sd finite and >= 0")
    return mu, sd


def _split(mu: np.ndarray, sd: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The largest deterministic arrival (-inf when none) and the random ones."""
    fixed = sd == 0
    m0 = float(mu[fixed].max()) if fixed.any() else -math.inf
    return m0, mu[~fixed], sd[~fixed]


def _log_cdf(t: float, mu: np.ndarray, sd: np.ndarray) -> float:
    """log prod_k Phi((t - mu_k) / sd_k)."""
    return float(special.log_ndtr((t - mu) / sd).sum())


def expected_max(mu, sd) -> float:
    """E[max_k A_k] for independent A_k ~ N(mu_k, sd_k^2) (sd_k = 0: a fixed arrival)."""
    mu, sd = _arrays(mu, sd)
    m0, mu_r, sd_r = _split(mu, sd)
    if mu_r.size == 0:
        return m0
    lo = max(m0, float((mu_r - SIGMAS * sd_r).max()))
    hi = float((mu_r + SIGMAS * sd_r).max())
    if hi <= lo:                          # a fixed arrival after every random one's tail
        return lo

    def survival(t: float) -> float:
        return -math.expm1(_log_cdf(t, mu_r, sd_r))

    # the integrand falls from 1 to 0 around the largest means: tell the quadrature where
    top = np.sort(mu_r)[-min(mu_r.size, 8):]
    points = [p for p in top if lo < p < hi]
    value, _ = integrate.quad(survival, lo, hi, points=points or None, limit=400,
                              epsabs=1e-10 * (hi - lo), epsrel=1e-10)
    return lo + value


def expected_max_approx(mu, sd) -> float:
    """Blom's level of the product of the CDFs (module docstring): for K identical devices
    ``mu + sd * Phi^-1((K - 0.375) / (K + 0.25))``."""
    mu, sd = _arrays(mu, sd)
    m0, mu_r, sd_r = _split(mu, sd)
    if mu_r.size == 0:
        return m0
    K = mu.size
    target = K * math.log((K - BLOM_ALPHA) / (K - 2 * BLOM_ALPHA + 1))
    lo = float((mu_r - SIGMAS * sd_r).min())
    hi = float((mu_r + SIGMAS * sd_r).max())
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _log_cdf(mid, mu_r, sd_r) < target:
            lo = mid
        else:
            hi = mid
    return max(m0, 0.5 * (lo + hi))


GRID_POINTS = 2049      # the trapezoid grid of ``expected_max_grid`` and ``_grad``
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _grid(mu: np.ndarray, sd: np.ndarray, points: int):
    lo = float((mu - SIGMAS * sd).max())
    hi = float((mu + SIGMAS * sd).max())
    t = np.linspace(lo, hi, points)
    z = (t[None, :] - mu[:, None]) / sd[:, None]                 # (K, points)
    log_cdf = special.log_ndtr(z)
    return lo, t, z, log_cdf, log_cdf.sum(axis=0)


def _trapezoid(f: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The trapezoid rule on the uniform grid ``t`` along the last axis."""
    h = (t[-1] - t[0]) / (t.size - 1)
    return h * (f.sum(axis=-1) - 0.5 * (f[..., 0] + f[..., -1]))


def expected_max_grid(mu, sd, points: int = GRID_POINTS) -> float:
    """``E[max_k A_k]`` by the trapezoid rule on one grid of ``points`` (vectorised,
    O(K * points)); every ``sd_k`` must be positive. The integrand is smooth and flat at both
    ends, so the rule converges fast: it agrees with ``expected_max`` to about 1e-12 of the
    spread at the default (tests/test_tail.py), at a fraction of the cost for small K."""
    mu, sd = _arrays(mu, sd)
    if np.any(sd <= 0):
        raise ValueError("expected_max_grid needs every sd > 0")
    lo, t, _, _, log_f = _grid(mu, sd, points)
    return float(lo + _trapezoid(-np.expm1(log_f), t))


def expected_max_grad(mu, sd, points: int = GRID_POINTS) -> tuple[float, np.ndarray,
                                                                  np.ndarray]:
    """``E[max_k A_k]`` and its derivatives by every ``mu_k`` and ``sd_k``, by the trapezoid
    rule on one grid (as ``expected_max_grid``), for a solver that moves many arrivals at
    once. Every ``sd_k`` must be positive. With ``F(t) = prod_k Phi(z_k)``,
    ``z_k = (t - mu_k)/sd_k``: ``E = lo + int (1 - F) dt``,
    ``dE/dmu_k = int F phi(z_k) / (sd_k Phi(z_k)) dt`` (the chance that k arrives last) and
    ``dE/dsd_k = int F z_k phi(z_k) / (sd_k Phi(z_k)) dt``."""
    mu, sd = _arrays(mu, sd)
    if np.any(sd <= 0):
        raise ValueError("expected_max_grad needs every sd > 0")
    lo, t, z, log_cdf, log_f = _grid(mu, sd, points)
    e = lo + _trapezoid(-np.expm1(log_f), t)
    ratio = np.exp(log_f[None, :] - 0.5 * z * z - _LOG_SQRT_2PI - log_cdf)
    d_mu = _trapezoid(ratio, t) / sd
    d_sd = _trapezoid(ratio * z, t) / sd
    return float(e), d_mu, d_sd


def expected_max_sampled(mu, sd, n: int, rng: np.random.Generator,
                         chunk: int = 2_000_000) -> tuple[float, float]:
    """The mean of ``n`` sampled maxima and its standard error (vectorised, in chunks of at
    most ``chunk`` draws)."""
    mu, sd = _arrays(mu, sd)
    rows = max(1, chunk // mu.size)
    maxima = []
    done = 0
    while done < n:
        m = min(rows, n - done)
        maxima.append((mu + sd * rng.standard_normal((m, mu.size))).max(axis=1))
        done += m
    x = np.concatenate(maxima)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
