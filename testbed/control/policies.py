"""The built-in policies of the contract (docs: goodput-model.md, "Policies"), by their CLI names.

- ``multispin-heterogeneous``: per-device lengths in 0..Lmax and optimal shares (``hetero``).
- ``multispin-homogeneous``: one common L in 1..Lmax, the best one, with optimal shares.
- ``agnostic-fixed``: L = baseline_draft_len for all, equal shares 1/K.
- ``agnostic-tuned``: one common L, the best for K copies of the average device (mean t0, tau,
  alpha and SNR in dB) with equal shares; applied to the real devices with shares 1/K.
- ``server-only``: nobody drafts; the server decodes one token per user per round.
- ``proportional-fair``: per-device lengths in 0..Lmax maximising sum_k log g_k, g_k = E_k / T
  the goodput of device k, with optimal shares (``fair``).
- ``max-min``: per-device lengths in 0..Lmax maximising min_k g_k (the least such plan: the
  shortest round among the maximisers), with optimal shares (``fair``).

Not a policy name but planned here too: ``solve_slo_plan(problem, tpot_s)``, the largest sum
goodput with every device's expected time per token T / E_k <= tpot_s (plan name
``SLO_POLICY`` = "slo-heterogeneous"), or None with the best TPOT any plan reaches.

Constraints: besides its objective a policy may declare what every plan of it must meet
(``constraints(policy, tpot_s)``: functions ``(plan, problem, arr=None) -> [violation, ...]``,
each violation a short text such as "tpot_s (0.187 > 0.15)"). The re-planner checks the plan
in force against them at every decision, under the current estimates. Only ``SLO_POLICY``
declares one today (``TpotTarget``); the other built-ins declare none.

Ordering that holds by construction (tests check it): heterogeneous >= homogeneous >=
agnostic-tuned and agnostic-fixed, and heterogeneous >= server-only (sum goodput);
proportional-fair has the largest sum_k log g_k and max-min the largest min_k g_k of all
policies. Homogeneous may lose to server-only (it must draft at least one token).

The tail model (``Problem.model == "tail"`` with measured spreads; ``model.py``): the policies
whose shares are "optimal for their lengths" (homogeneous, heterogeneous, the fair ones, the
SLO plan) plan on ``model.inflated(arr, z)``, the arrival at ``z`` of its spread, for each z
of ``z_levels(K)`` (0, the mean arrival, up to one more than Blom's z of the largest of K
normals), and keep the plan whose value under the tail model is best (``policy_value``: the
policy's own objective). Plans every such policy could also choose are among the candidates
(heterogeneous: homogeneous's, server-only's and the agnostic ones'; homogeneous: the
agnostic ones'; the fair ones: server-only's and the agnostic ones'), so the orderings above
hold under the tail model too. ``tests/test_tail_policies.py`` compares the result with an
exhaustive search over lengths whose shares are optimised by scipy for the tail model itself.
With ``model: mean`` (or no spread) every policy is the mean model's, exactly as before.

Entry points: ``solve(problem, policy) -> Plan``, ``solve_many``, ``POLICIES``,
``solve_slo_plan``, ``constraints``, ``policy_value``. Pure.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import special

from testbed.control import catalog
from testbed.control.fair import SloResult, solve_max_min, solve_proportional_fair, solve_slo
from testbed.control.hetero import solve_heterogeneous
from testbed.control.model import (Arrays, arrays, arrival_time, evaluate, expected_tokens,
                                   inflated, make_plan, optimal_shares, quantile_shares,
                                   spectral_efficiency, tail_shares)
from testbed.control.problem import POLICY_NAMES, Plan, Problem
from testbed.errors import InputError


def _heterogeneous(problem: Problem, arr: Arrays) -> tuple[np.ndarray, np.ndarray]:
    L, _ = solve_heterogeneous(arr)
    return L, optimal_shares(arr, L)[0]


def _homogeneous(problem: Problem, arr: Arrays) -> tuple[np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(1, arr.lmax + 1)[:, None], arr.K, axis=1)
    t = arrival_time(arr, rows)
    tokens = arr.tokens[:, 1:].sum(axis=0)
    goodput = tokens / (t + arr.fixed_s + arr.v1 * rows.sum(axis=1))
    best = int(np.argmax(goodput))                  # the shortest L among equals
    return rows[best], optimal_shares(arr, rows[best], t[best:best + 1])[0]


def _equal(arr: Arrays, length: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(arr.K, length, dtype=np.intp), np.full(arr.K, 1.0 / arr.K)


def _agnostic_fixed(problem: Problem, arr: Arrays) -> tuple[np.ndarray, np.ndarray]:
    return _equal(arr, arr.lfix)


def tuned_length(problem: Problem) -> int:
    """The common L that is best for K copies of the average device with equal shares."""
    devs, K = problem.devices, len(problem.devices)
    t0 = float(np.mean([d.draft_base_s for d in devs]))
    tau = float(np.mean([d.draft_per_token_s for d in devs]))
    alpha = float(np.mean([d.acceptance for d in devs]))
    snr_db = float(np.mean([d.snr_db for d in devs]))
    rate = problem.bandwidth_hz * float(spectral_efficiency(snr_db)) / K
    L = np.arange(1, problem.max_draft_len + 1)
    s = problem.server
    round_s = (t0 + L * tau + (problem.header_bits + L * problem.bits_per_draft_token) / rate
               + s.verify_base_s + s.verify_per_token_s * K * (L + 1) + s.downlink_s)
    goodput = K * expected_tokens(alpha, L) / round_s
    return int(L[int(np.argmax(goodput))])


def _agnostic_tuned(problem: Problem, arr: Arrays) -> tuple[np.ndarray, np.ndarray]:
    return _equal(arr, tuned_length(problem))


def _server_only(problem: Problem, arr: Arrays) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(arr.K, dtype=np.intp), np.zeros(arr.K)


def _proportional_fair(problem: Problem, arr: Arrays) -> tuple[np.ndarray, np.ndarray]:
    L, _ = solve_proportional_fair(arr)
    return L, optimal_shares(arr, L)[0]


def _max_min(problem: Problem, arr: Arrays) -> tuple[np.ndarray, np.ndarray]:
    L, _ = solve_max_min(arr)
    return L, optimal_shares(arr, L)[0]


_SOLVERS: dict[str, Callable[[Problem, Arrays], tuple[np.ndarray, np.ndarray]]] = {
    "multispin-heterogeneous": _heterogeneous,
    "multispin-homogeneous": _homogeneous,
    "agnostic-fixed": _agnostic_fixed,
    "agnostic-tuned": _agnostic_tuned,
    "server-only": _server_only,
    "proportional-fair": _proportional_fair,
    "max-min": _max_min,
}
POLICIES: tuple[str, ...] = POLICY_NAMES
assert tuple(_SOLVERS) == POLICIES
BASELINE = catalog.BASELINES[0]     # what gains are reported against first
SLO_POLICY = "slo-heterogeneous"   # the plan name of ``solve_slo_plan``


# -- the tail model (module docstring) ---------------------------------------------------------

TAIL_STEPS = 7               # z levels a tail policy plans at
# Plans each policy may also choose (they meet its definition), so the orderings hold.
_TAIL_ALSO = {
    "multispin-heterogeneous": ("multispin-homogeneous", "server-only", "agnostic-fixed",
                                "agnostic-tuned"),
    "multispin-homogeneous": ("agnostic-fixed", "agnostic-tuned"),
    "proportional-fair": ("server-only", "agnostic-fixed", "agnostic-tuned"),
    "max-min": ("server-only", "agnostic-fixed", "agnostic-tuned"),
}


def z_levels(K: int) -> np.ndarray:
    """The spreads' multiples a tail policy plans at: 0 up to Blom's z for the largest of K
    normals plus one, in ``TAIL_STEPS`` steps."""
    zk = float(special.ndtri((K - 0.375) / (K + 0.25))) if K > 1 else 0.0
    return np.linspace(0.0, zk + 1.0, TAIL_STEPS)


def policy_value(policy: str, arr: Arrays, lengths, shares) -> float:
    """The plan's value under ``policy``'s objective (``catalog.objective``: the sum goodput
    but for the fair built-ins), in tokens/s, under the model ``arr`` was built with:
    K times the geometric mean of the g_k for ``proportional-fair``, K times the smallest for
    ``max-min`` (both equal to the sum goodput when every device gets the same)."""
    round_s, goodput = evaluate(arr, lengths, shares)
    kind = catalog.objective(policy)
    if kind == "sum":
        return goodput
    e = arr.tokens[np.arange(arr.K), np.asarray(lengths, dtype=np.intp)]
    if kind == "minimum":
        return arr.K * float(e.min()) / round_s
    return arr.K * float(np.exp(np.mean(np.log(e)))) / round_s


def _plan(problem: Problem, policy: str, arr: Arrays) -> tuple[np.ndarray, np.ndarray]:
    if not arr.tail or policy not in _TAIL_ALSO:
        return _SOLVERS[policy](problem, arr)
    lengths = {tuple(L.tolist()): L for L, _ in
               (_SOLVERS[policy](problem, inflated(arr, z)) for z in z_levels(arr.K))}
    if policy == "multispin-homogeneous":       # every common length: cheap, and exhaustive
        lengths.update({(n,) * arr.K: np.full(arr.K, n, dtype=np.intp)
                        for n in range(1, arr.lmax + 1)})
    cands = [best_tail_shares(policy, arr, L) for L in lengths.values()]
    cands.sort(key=lambda c: -c[2])
    if arr.K <= LOCAL_SEARCH_K and catalog.objective(policy) != "sum":
        cands.insert(0, _local_search(policy, arr, _refined(policy, arr, *cands[0])))
    refine = REFINE_SMALL if arr.K <= REFINE_SMALL_K else REFINE_LARGE
    if policy == "multispin-homogeneous" and arr.K <= REFINE_SMALL_K:
        refine = len(cands)                     # every common length
    cands[:refine] = [_refined(policy, arr, L, b, v) for L, b, v in cands[:refine]]
    cands += [(L, b, policy_value(policy, arr, L, b)) for L, b in
              (_plan(problem, other, arr) for other in _TAIL_ALSO[policy])]
    L, b, _ = max(cands, key=lambda c: c[2])
    return L, b


PRUNE = 0.03                 # a move whose equal-quantile value is this far below is dropped
PAIR_MOVES_K = 3             # up to this many devices, also two lengths at once
LOCAL_SEARCH_K = 4           # up to this many devices, the fair policies (whose solvers see
                             # the tail least) also search one-length moves from the best plan
REFINE_SMALL_K = 64          # up to this many devices, the best REFINE_SMALL length vectors get
REFINE_SMALL = 2             # their shares optimised (model.tail_shares); beyond, the best one
REFINE_LARGE = 1


def best_tail_shares(policy: str, arr: Arrays, L: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                      float]:
    """(L, shares, value): the best equal-quantile shares of ``L`` over ``z_levels``."""
    best = None
    for z in z_levels(arr.K)[::2]:
        b = quantile_shares(arr, L, float(z))
        v = policy_value(policy, arr, L, b)
        if best is None or v > best[2]:
            best = (L, b, v)
    return best


def _local_search(policy: str, arr: Arrays, start):
    """From ``start`` (L, shares, value): move one device's length by one, or two devices'
    (up to ``PAIR_MOVES_K`` devices), while that helps (each move valued with its optimal
    shares, ``_refined``)."""
    best = start                  # (the fair policies only: any length in 0..lmax)
    K = arr.K
    moves = [np.eye(K, dtype=np.intp)[k] * step for k in range(K) for step in (-1, 1)]
    if K <= PAIR_MOVES_K:
        unit = np.eye(K, dtype=np.intp)
        moves += [unit[i] * si + unit[j] * sj for i, j in itertools.combinations(range(K), 2)
                  for si, sj in itertools.product((-1, 1), repeat=2)]
    improved = True
    while improved:
        improved = False
        for m in moves:
            L = best[0] + m
            if L.min() < 0 or L.max() > arr.lmax:
                continue
            cand = best_tail_shares(policy, arr, L)
            if cand[2] < best[2] * (1 - PRUNE):     # even optimal shares would not help
                continue
            cand = _refined(policy, arr, *cand)
            if cand[2] > best[2] * (1 + 1e-12):
                best, improved = cand, True
    return best


def _refined(policy: str, arr: Arrays, L: np.ndarray, b: np.ndarray, v: float):
    """``L`` with its shares optimised for the tail model, if that is better than ``b``."""
    b2 = tail_shares(arr, L, start=b)
    v2 = policy_value(policy, arr, L, b2)
    return (L, b2, v2) if v2 > v else (L, b, v)


def solve(problem: Problem, policy: str, arr: Arrays | None = None) -> Plan:
    """The plan of ``policy`` for ``problem`` (``arr``: the problem's tables, if already built)."""
    if policy not in _SOLVERS:
        raise InputError(f'unknown policy "{policy}"; known: {", ".join(POLICIES)}',
                         field="policy")
    arr = arrays(problem) if arr is None else arr
    lengths, shares = _plan(problem, policy, arr)
    return make_plan(problem, arr, policy, lengths, shares)


def solve_many(problem: Problem, policies=POLICIES) -> list[Plan]:
    arr = arrays(problem)
    return [solve(problem, p, arr) for p in policies]


def solve_slo_plan(problem: Problem, tpot_s: float,
                   arr: Arrays | None = None) -> tuple[Plan | None, SloResult]:
    """The plan of largest sum goodput with every device's T / E_k <= tpot_s (named
    ``SLO_POLICY``), or None when no plan meets it; the ``SloResult`` says by how much."""
    arr = arrays(problem) if arr is None else arr
    if arr.tail:
        return _slo_tail(problem, tpot_s, arr)
    result = solve_slo(arr, tpot_s)
    if not result.feasible:
        return None, result
    return make_plan(problem, arr, SLO_POLICY, result.lengths,
                     optimal_shares(arr, result.lengths)[0]), result


def _slo_tail(problem: Problem, tpot_s: float, arr: Arrays) -> tuple[Plan | None, SloResult]:
    """The SLO plan under the tail model: heterogeneous's plan when it meets the target (it has
    the most goodput of all), else the mean model's SLO plan (or its closest) at each z level,
    valued by the tail model; the feasible one of largest sum goodput (its shares then
    optimised, if they still meet the target), else max-min's plan (the smallest worst time
    per token, as the mean model's SLO answer)."""
    def worst_of(L, b):
        round_s, goodput = evaluate(arr, L, b)
        return goodput, round_s / float(arr.tokens[np.arange(arr.K), L].min())

    L, b = _plan(problem, "multispin-heterogeneous", arr)
    goodput, worst = worst_of(L, b)
    if worst <= tpot_s * (1 + TPOT_TOLERANCE):
        return (make_plan(problem, arr, SLO_POLICY, L, b),
                SloResult(tpot_s, True, L, goodput, worst, L, b))
    best = closest = None
    for z in z_levels(arr.K):
        az = inflated(arr, z)
        res = solve_slo(az, tpot_s)
        L = res.lengths if res.feasible else res.closest_lengths
        b = optimal_shares(az, L)[0]
        goodput, worst = worst_of(L, b)
        if worst <= tpot_s * (1 + TPOT_TOLERANCE) and (best is None or goodput > best[2]):
            best = (L, b, goodput, worst)
        if closest is None or worst < closest[3]:
            closest = (L, b, goodput, worst)
    if best is not None:                      # optimal shares: a shorter round, if it still
        L = best[0]                           # meets the target (it shortens every T / E_k)
        b = tail_shares(arr, L, start=best[1])
        goodput, worst = worst_of(L, b)
        if goodput > best[2] and worst <= tpot_s * (1 + TPOT_TOLERANCE):
            best = (L, b, goodput, worst)
    if best is None:             # the closest plan: max-min's (the lowest worst T / E_k)
        L, b = _plan(problem, "max-min", arr)
        _, worst = worst_of(L, b)
        if worst < closest[3]:
            closest = (L, b, None, worst)
        L, b, _, worst = closest
        return None, SloResult(tpot_s, False, None, None, worst, L, b)
    L, b, goodput, worst = best
    return (make_plan(problem, arr, SLO_POLICY, L, b),
            SloResult(tpot_s, True, L, goodput, worst, L, b))


# -- constraints a plan of a policy must meet (module docstring) -------------------------------

Constraint = Callable[..., list]     # (plan, problem, arr=None) -> list of violations (str)
TPOT_TOLERANCE = 1e-9                # relative: the solver's plans meet a target to rounding


def worst_tpot_s(arr: Arrays, plan: Plan) -> float:
    """The largest expected time per token T / E_k of ``plan`` (its lengths and its own
    shares, not re-optimised) under the estimates ``arr`` was built from."""
    L = np.asarray(plan.draft_lens, dtype=np.intp)
    round_s, _ = evaluate(arr, L, plan.shares)
    return round_s / float(arr.tokens[np.arange(arr.K), L].min())


@dataclass(frozen=True)
class TpotTarget:
    """``SLO_POLICY``'s constraint: every device's T / E_k at most ``tpot_s``."""
    tpot_s: float

    def __call__(self, plan: Plan, problem: Problem, arr: Arrays | None = None) -> list[str]:
        worst = worst_tpot_s(arrays(problem) if arr is None else arr, plan)
        if worst <= self.tpot_s * (1 + TPOT_TOLERANCE):
            return []
        return [f"tpot_s ({worst:.3g} > {self.tpot_s:.3g})"]


def constraints(policy: str, tpot_s: float | None = None) -> tuple[Constraint, ...]:
    """What every plan of ``policy`` must meet besides maximising its objective: for
    ``SLO_POLICY`` the target ``tpot_s``; nothing for the seven policies."""
    if policy == SLO_POLICY:
        if tpot_s is None:
            raise ValueError(f"{SLO_POLICY} needs a target time per token (tpot_s)")
        return (TpotTarget(tpot_s),)
    return ()
