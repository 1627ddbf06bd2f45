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

Limits: the model is the contract's synchronous round; acceptance is i.i.d. per position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from testbed.control.problem import DevicePlan, Plan, Problem

_LN2 = math.log(2.0)


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
    return arrays_from(t0, tau, alpha, snr, problem)


def arrays_from(t0, tau, alpha, snr_db, problem: Problem) -> Arrays:
    """Tables for per-device parameter vectors and the shared settings of ``problem``."""
    lmax = problem.max_draft_len
    ls = np.arange(lmax + 1, dtype=float)
    rate = problem.bandwidth_hz * spectral_efficiency(snr_db)
    upload = (problem.header_bits + ls[None, :] * problem.bits_per_draft_token) / rate[:, None]
    upload[:, 0] = 0.0
    drafted = np.asarray(t0, float)[:, None] + ls[None, :] * np.asarray(tau, float)[:, None]
    s = problem.server
    return Arrays(rate_bps=rate, tokens=_tokens_table(np.asarray(alpha, float), lmax),
                  drafted_s=drafted, upload_s=upload, v0=s.verify_base_s, v1=s.verify_per_token_s,
                  d=s.downlink_s, lmax=lmax, lfix=problem.baseline_draft_len)


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
    """(round_s, goodput_tps) of one plan: any lengths and shares, not only optimal ones."""
    L = np.asarray(lengths, dtype=np.intp)
    b = np.asarray(shares, dtype=float)
    rows = np.arange(arr.K)
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
