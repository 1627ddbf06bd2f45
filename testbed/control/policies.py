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

Entry points: ``solve(problem, policy) -> Plan``, ``solve_many``, ``POLICIES``,
``solve_slo_plan``, ``constraints``. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from testbed.control import catalog
from testbed.control.fair import SloResult, solve_max_min, solve_proportional_fair, solve_slo
from testbed.control.hetero import solve_heterogeneous
from testbed.control.model import (Arrays, arrays, arrival_time, evaluate, expected_tokens,
                                   make_plan, optimal_shares, spectral_efficiency)
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


def solve(problem: Problem, policy: str, arr: Arrays | None = None) -> Plan:
    """The plan of ``policy`` for ``problem`` (``arr``: the problem's tables, if already built)."""
    if policy not in _SOLVERS:
        raise InputError(f'unknown policy "{policy}"; known: {", ".join(POLICIES)}',
                         field="policy")
    arr = arrays(problem) if arr is None else arr
    lengths, shares = _SOLVERS[policy](problem, arr)
    return make_plan(problem, arr, policy, lengths, shares)


def solve_many(problem: Problem, policies=POLICIES) -> list[Plan]:
    arr = arrays(problem)
    return [solve(problem, p, arr) for p in policies]


def solve_slo_plan(problem: Problem, tpot_s: float,
                   arr: Arrays | None = None) -> tuple[Plan | None, SloResult]:
    """The plan of largest sum goodput with every device's T / E_k <= tpot_s (named
    ``SLO_POLICY``), or None when no plan meets it; the ``SloResult`` says by how much."""
    arr = arrays(problem) if arr is None else arr
    result = solve_slo(arr, tpot_s)
    if not result.feasible:
        return None, result
    return make_plan(problem, arr, SLO_POLICY, result.lengths,
                     optimal_shares(arr, result.lengths)[0]), result


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
