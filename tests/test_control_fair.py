"""The fair solvers (control/fair.py) against exhaustive search, and what holds by construction.

The random problems are those of test_control_solver.py (K <= 4, Lmax <= 8, wide ranges, edge
values of acceptance). Each solver must reach the exhaustive optimum of its own objective:
proportional fairness to 1e-9 relative on the geometric mean of the device goodputs (the
objective sum_k log g_k divided by K), max-min to 1e-9 relative, and the TPOT-constrained sum
goodput with the same feasibility verdict and the same optimum (or, when infeasible, the same
best achievable TPOT). The target of each problem is drawn between just below the best
worst-device TPOT any plan reaches (max-min's, so some targets are infeasible) and just above
the worst TPOT of the unconstrained optimum (so some do not bind), both from exhaustive search.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_control_solver import large_problem, random_problem
from testbed.control.exhaustive import (exhaustive_max_min, exhaustive_proportional_fair,
                                        exhaustive_slo, exhaustive_table)
from testbed.control.fair import (device_goodputs, log_utility, min_goodput, solve_max_min,
                                  solve_proportional_fair, solve_slo)
from testbed.control.model import arrays, make_plan, optimal_shares
from testbed.control.policies import POLICIES, solve, solve_many, solve_slo_plan
from testbed.control.problem import Device, Problem, Server

N_RANDOM = 200
N_PLANNED = 50          # of them, planned with every policy for the properties
REL = 1e-9


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(20261201)
    out = []
    for _ in range(N_RANDOM):
        prob = random_problem(rng)
        arr = arrays(prob)
        table = exhaustive_table(arr)
        L, E, T = table
        het = int(np.argmax(E.sum(axis=1) / T))
        het_tpot = float((T[het] / E[het]).max())          # worst TPOT of the sum optimum
        ex_pf = exhaustive_proportional_fair(arr, table)
        ex_mm = exhaustive_max_min(arr, table)
        lo, hi = 0.97 / ex_mm[1], max(1.02 * het_tpot, 1.05 / ex_mm[1])
        tpot = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        out.append(dict(prob=prob, arr=arr, table=table, tpot=tpot, het_tpot=het_tpot,
                        ex_pf=ex_pf, ex_mm=ex_mm, ex_slo=exhaustive_slo(arr, tpot, table),
                        pf=solve_proportional_fair(arr), mm=solve_max_min(arr),
                        slo=solve_slo(arr, tpot)))
    for c in out[:N_PLANNED]:
        prob, arr = c["prob"], c["arr"]
        c["plans"] = {p: solve(prob, p, arr) for p in POLICIES[:5]}
        for name, (L, _) in (("proportional-fair", c["pf"]), ("max-min", c["mm"])):
            c["plans"][name] = make_plan(prob, arr, name, L, optimal_shares(arr, L)[0])
    return out


def test_random_targets_cover_every_case(cases):
    infeasible = [c for c in cases if c["ex_slo"][0] is None]
    feasible = [c for c in cases if c["ex_slo"][0] is not None]
    binding = [c for c in feasible if c["tpot"] < c["het_tpot"]]
    assert len(infeasible) >= 10 and len(binding) >= 30 and len(feasible) - len(binding) >= 30
    # the fair optima are not the sum optimum in many problems
    differ = sum(1 for c in cases if not np.array_equal(c["pf"][0], c["mm"][0]))
    assert differ >= 40


def test_proportional_fair_matches_exhaustive_search(cases):
    for c in cases:
        (L, u), (_, u_ex) = c["pf"], c["ex_pf"]
        K = c["arr"].K
        assert abs(u - u_ex) / K < REL, (c["prob"], L, c["ex_pf"][0])
        assert u == pytest.approx(log_utility(c["arr"], L), rel=1e-12, abs=1e-12)


def test_max_min_matches_exhaustive_search(cases):
    for c in cases:
        (L, m), (L_ex, m_ex) = c["mm"], c["ex_mm"]
        assert abs(m - m_ex) <= REL * m_ex, (c["prob"], L, L_ex)
        assert m == min_goodput(c["arr"], L)


def test_max_min_returns_the_unique_maximiser_where_there_is_one(cases):
    """Where the exhaustive optimum is unique by a clear margin the lengths are the same."""
    checked = 0
    for c in cases:
        _, E, T = c["table"]
        m = np.sort((E / T[:, None]).min(axis=1))
        if m[-2] < m[-1] * (1 - 1e-6):
            assert np.array_equal(c["mm"][0], c["ex_mm"][0])
            checked += 1
    assert checked >= N_RANDOM // 2


def test_slo_matches_exhaustive_search(cases):
    for c in cases:
        r, (L_ex, g_ex, m_ex) = c["slo"], c["ex_slo"]
        assert r.feasible == (L_ex is not None), (c["prob"], c["tpot"])
        assert r.tpot_s == c["tpot"]
        if r.feasible:
            assert abs(r.goodput_tps - g_ex) <= REL * g_ex, (c["prob"], r.lengths, L_ex)
            g = device_goodputs(c["arr"], r.lengths)
            assert (1.0 / g).max() <= c["tpot"] * (1 + 1e-12)          # meets the target
            assert r.worst_tpot_s == pytest.approx((1.0 / g).max(), rel=1e-12)
            assert np.array_equal(r.closest_lengths, r.lengths)
        else:
            assert r.lengths is None and r.goodput_tps is None
            assert r.worst_tpot_s == pytest.approx(1.0 / m_ex, rel=REL)   # the best reachable
            assert r.worst_tpot_s > c["tpot"]
            assert min_goodput(c["arr"], r.closest_lengths) == pytest.approx(m_ex, rel=REL)


def _objectives(plan):
    g = np.array([d.expected_tokens for d in plan.devices]) / plan.round_s
    return float(np.log(g).sum()), float(g.min())


def test_each_fair_policy_beats_every_other_policy_on_its_own_objective(cases):
    """By construction: each maximises its objective over all lengths, with the shares that
    minimise the round (the agnostic policies' equal shares can only do worse)."""
    for c in cases[:N_PLANNED]:
        plans = c["plans"]
        pf_u, _ = _objectives(plans["proportional-fair"])
        _, mm_m = _objectives(plans["max-min"])
        for name, plan in plans.items():
            u, m = _objectives(plan)
            assert pf_u >= u - 1e-12 * abs(u) - 1e-12, (name, c["prob"])
            assert mm_m >= m * (1 - 1e-12), (name, c["prob"])
        # and the sum-goodput policy stays the best on sum goodput
        het = plans["multispin-heterogeneous"].goodput_tps
        assert all(het * (1 + 1e-12) >= p.goodput_tps for p in plans.values())


def test_slo_plan_is_the_best_plan_that_meets_the_target(cases):
    for c in cases[:N_PLANNED]:
        plan, result = solve_slo_plan(c["prob"], c["tpot"], c["arr"])
        assert (plan is None) == (not result.feasible)
        if plan is None:
            continue
        assert plan.policy == "slo-heterogeneous"
        assert plan.goodput_tps == pytest.approx(result.goodput_tps, rel=1e-9)
        assert max(plan.round_s / d.expected_tokens for d in plan.devices) \
            <= c["tpot"] * (1 + 1e-9)
        for other in c["plans"].values():
            meets = max(other.round_s / d.expected_tokens for d in other.devices) <= c["tpot"]
            if meets:
                assert plan.goodput_tps >= other.goodput_tps * (1 - 1e-12), other.policy
        # feasible means the max-min plan meets it too: the target is at most its TPOT
        assert 1.0 / c["mm"][1] <= c["tpot"] * (1 + 1e-12)


def _weak_device_problem() -> Problem:
    strong = [Device(f"s{k}", 0.0, 0.02, 0.9, 20.0) for k in range(3)]
    weak = Device("weak", 0.005, 0.12, 0.35, 0.0)          # slow, poor drafts, cell edge
    return Problem(100e3, 800.0, 512.0, 8, 4, Server(0.15, 0.0005, 0.005),
                   tuple(strong) + (weak,))


def test_max_min_lifts_the_weakest_device():
    """What must hold: max-min's minimum is at least any plan's minimum, so the device that
    is the weakest under agnostic-fixed and under heterogeneous gets at least what it got
    there (it is the minimum of those plans, checked first)."""
    prob = _weak_device_problem()
    plans = {p.policy: p for p in solve_many(prob)}
    g = {name: np.array([d.expected_tokens for d in p.devices]) / p.round_s
         for name, p in plans.items()}
    for other in ("agnostic-fixed", "multispin-heterogeneous"):
        assert int(np.argmin(g[other])) == 3                   # the weak device is the minimum
        assert g["max-min"][3] >= g[other][3] * (1 - 1e-12)
        assert g["max-min"].min() >= g[other].min() * (1 - 1e-12)
    assert g["max-min"][3] > g["multispin-heterogeneous"][3]  # and strictly here


def test_a_device_that_never_gains_makes_max_min_server_only():
    """With acceptance 0 a device gains 1 token a round whatever it drafts, so its goodput is
    1/T: the best minimum is the shortest round, nobody drafting (T rises with any draft)."""
    devs = (Device("a", 0.0, 0.01, 0.9, 20.0), Device("b", 0.0, 0.01, 0.0, 20.0))
    prob = Problem(100e3, 800.0, 512.0, 6, 3, Server(0.1, 0.001, 0.0), devs)
    L, m = solve_max_min(arrays(prob))
    assert L.tolist() == [0, 0]
    assert m == pytest.approx(1.0 / (0.1 + 0.001 * 2))
    assert solve(prob, "max-min").draft_lens == (0, 0)


def test_slo_rejects_a_target_that_is_not_a_time():
    arr = arrays(_weak_device_problem())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tpot_s"):
            solve_slo(arr, bad)


def test_policies_include_the_fair_ones_with_their_objectives():
    from testbed.control import catalog
    assert {"proportional-fair", "max-min"} <= set(POLICIES)
    assert catalog.objective("proportional-fair") == "geometric"
    assert catalog.objective("max-min") == "minimum"
    assert {catalog.objective(p) for p in POLICIES} - {"geometric", "minimum"} == {"sum"}


def test_large_problem_fair_plans_are_consistent():
    prob = large_problem(8, 1500)
    arr = arrays(prob)
    L_pf, u = solve_proportional_fair(arr)
    assert u == pytest.approx(log_utility(arr, L_pf), rel=1e-12)
    L_mm, m = solve_max_min(arr)
    assert m == min_goodput(arr, L_mm)
    het = solve(prob, "multispin-heterogeneous", arr)
    assert u >= log_utility(arr, het.draft_lens) - 1e-9 * abs(u)
    assert m >= min_goodput(arr, het.draft_lens)
    # a target between the max-min TPOT and the unconstrained optimum's binds and is met
    worst_het = 1.0 / min_goodput(arr, het.draft_lens)
    tpot = 0.5 * (1.0 / m + worst_het)
    r = solve_slo(arr, tpot)
    assert r.feasible and r.worst_tpot_s <= tpot
    assert r.goodput_tps <= het.goodput_tps * (1 + 1e-12)
    assert r.goodput_tps >= solve(prob, "max-min", arr).goodput_tps
