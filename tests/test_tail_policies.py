"""The tail model's policies against exhaustive search (issue #27), and its plumbing.

The reference: every length vector of a small problem, each with the shares that minimise the
tail model's round time (``model.tail_shares``, itself checked here against scipy's bounded
scalar search for two drafters and Nelder-Mead from several starts for three), valued by the
policy's own objective. The solvers take their lengths from the mean-model solvers on
``model.inflated`` tables at a few z levels instead, so this checks that the shortcut loses
(almost) nothing.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from scipy import optimize

from testbed.control import tail
from testbed.control.model import (arrays, arrival_moments, evaluate, inflated,
                                   optimal_shares, slowest_arrival, tail_shares)
from testbed.control.policies import policy_value, solve, solve_slo_plan
from testbed.control.problem import (Device, Problem, Server, problem_from_dict,
                                     problem_to_dict)
from testbed.errors import ProblemError


def _problem(rng: np.random.Generator, K: int, lmax: int) -> Problem:
    devices = []
    for k in range(K):
        tau = rng.uniform(0.005, 0.08)
        sd = tuple(float(x) for x in np.sort(rng.uniform(0.0, 0.4, lmax)) * tau * 3)
        devices.append(Device(name=f"d{k}", draft_base_s=rng.uniform(0.0, 0.05),
                              draft_per_token_s=tau, acceptance=rng.uniform(0.3, 0.95),
                              snr_db=rng.uniform(0.0, 25.0), draft_sd_s=sd))
    return Problem(bandwidth_hz=rng.uniform(2e4, 2e5), bits_per_draft_token=rng.uniform(32, 800),
                   header_bits=rng.uniform(0, 600), max_draft_len=lmax, baseline_draft_len=2,
                   server=Server(rng.uniform(0.01, 0.2), rng.uniform(0.0, 0.01), 0.003),
                   devices=tuple(devices), model="tail",
                   upload_time_factor=(float(rng.uniform(0.9, 1.2)),
                                       float(rng.uniform(0.0, 0.4))))


def _best_shares(arr, L: np.ndarray) -> tuple[float, np.ndarray]:
    """The smallest tail round time of lengths ``L`` over all shares, by scipy."""
    k = np.flatnonzero(L > 0)
    b = np.zeros(arr.K)
    if k.size == 0:
        return evaluate(arr, L, b)[0], b
    if k.size == 1:
        b[k] = 1.0
        return evaluate(arr, L, b)[0], b

    def shares(x):
        out = np.zeros(arr.K)
        e = np.exp(x - x.max())
        out[k] = e / e.sum()
        return out

    def cost(x):
        return evaluate(arr, L, shares(x))[0]

    starts = [np.log(np.maximum(optimal_shares(inflated(arr, z), L)[0][k], 1e-9))
              for z in (0.0, 1.0, 2.0)] + [np.zeros(k.size)]
    if k.size == 2:
        def cost1(u):
            return cost(np.array([u, 0.0]))
        res = optimize.minimize_scalar(cost1, bounds=(-12.0, 12.0), method="bounded",
                                       options={"xatol": 1e-7})
        best = res.x * np.array([1.0, 0.0])
        return float(res.fun), shares(best)
    best_f, best_x = np.inf, None
    for x0 in starts:
        res = optimize.minimize(cost, x0, method="Nelder-Mead",
                                options={"xatol": 1e-7, "fatol": 1e-10, "maxiter": 2000})
        if res.fun < best_f:
            best_f, best_x = float(res.fun), res.x
    return best_f, shares(best_x)


def test_tail_shares_minimise_the_expected_slowest_arrival():
    """``tail_shares`` against scipy's general-purpose searches for the same minimum."""
    rng = np.random.default_rng(61)
    for K, vectors in ((2, [(1, 1), (2, 5), (5, 3), (4, 4)]), (3, [(1, 2, 3), (3, 3, 3)])):
        for _ in range(4 if K == 2 else 2):
            arr = arrays(_problem(rng, K, 5))
            for v in vectors:
                L = np.array(v)
                ref, _ = _best_shares(arr, L)
                got = evaluate(arr, L, tail_shares(arr, L))[0]
                assert got <= ref * (1 + 1e-6), (v, got, ref)


def _exhaustive(problem: Problem, policy: str) -> float:
    arr = arrays(problem)
    lo = 1 if policy == "multispin-homogeneous" else 0
    if policy == "multispin-homogeneous":
        vectors = [np.full(arr.K, L) for L in range(1, arr.lmax + 1)]
    else:
        vectors = [np.array(v) for v in itertools.product(range(lo, arr.lmax + 1),
                                                          repeat=arr.K)]
    best = -np.inf
    for L in vectors:
        best = max(best, policy_value(policy, arr, L, tail_shares(arr, L)))
    return best


@pytest.mark.parametrize("K,lmax,n", [(2, 6, 10), (3, 4, 4)])
@pytest.mark.parametrize("policy", ["multispin-heterogeneous", "multispin-homogeneous",
                                    "proportional-fair", "max-min"])
def test_tail_policies_match_exhaustive_search(K, lmax, n, policy):
    rng = np.random.default_rng([K, lmax, 27])
    worst = 1.0
    for _ in range(n):
        problem = _problem(rng, K, lmax)
        arr = arrays(problem)
        assert arr.tail
        plan = solve(problem, policy, arr)
        got = policy_value(policy, arr, plan.draft_lens, plan.shares)
        ref = _exhaustive(problem, policy)
        worst = min(worst, got / ref)
    print(f"{policy} K={K}: worst ratio to exhaustive {worst:.5f}")
    assert worst >= 0.995, f"{policy}: worst ratio to exhaustive {worst:.4f}"


def test_tail_orderings_hold():
    """Heterogeneous >= homogeneous >= agnostic-fixed and >= server-only under the tail model,
    on problems where the spreads are large enough to change the plans."""
    rng = np.random.default_rng(2727)
    for _ in range(12):
        problem = _problem(rng, int(rng.integers(2, 9)), 6)
        arr = arrays(problem)
        g = {p: solve(problem, p, arr).goodput_tps for p in
             ("multispin-heterogeneous", "multispin-homogeneous", "agnostic-fixed",
              "server-only")}
        assert g["multispin-heterogeneous"] >= g["multispin-homogeneous"] * (1 - 1e-12)
        assert g["multispin-homogeneous"] >= g["agnostic-fixed"] * (1 - 1e-12)
        assert g["multispin-heterogeneous"] >= g["server-only"] * (1 - 1e-12)


def test_tail_round_time_is_the_expected_slowest_arrival():
    """A plan's round under the tail model: E[max] of its arrivals, which sampling agrees with,
    and above the mean model's max of the means."""
    rng = np.random.default_rng(5)
    problem = _problem(rng, 6, 4)
    arr = arrays(problem)
    plan = solve(problem, "multispin-homogeneous", arr)
    L, b = np.array(plan.draft_lens), np.array(plan.shares)
    mu, sd = arrival_moments(arr, L, b)
    sampled, se = tail.expected_max_sampled(mu, sd, 200_000, np.random.default_rng(1))
    assert slowest_arrival(arr, L, b) == pytest.approx(sampled, abs=5 * se)
    assert slowest_arrival(arr, L, b) > mu.max()
    mean_arr = arrays(dataclasses.replace(problem, model="mean"))
    assert not mean_arr.tail
    assert plan.round_s > evaluate(mean_arr, L, b)[0]


def test_mean_model_and_problems_without_spread_plan_as_before():
    """``model: mean`` ignores the spreads and the factor; a problem without them is the same
    under both models."""
    rng = np.random.default_rng(11)
    problem = _problem(rng, 5, 6)
    plain = dataclasses.replace(problem, upload_time_factor=(1.0, 0.0), devices=tuple(
        dataclasses.replace(d, draft_sd_s=()) for d in problem.devices))
    mean = dataclasses.replace(problem, model="mean")
    for policy in ("multispin-heterogeneous", "multispin-homogeneous", "max-min"):
        a, b, c = solve(plain, policy), solve(mean, policy), \
            solve(dataclasses.replace(plain, model="mean"), policy)
        assert a == dataclasses.replace(b) == c
    assert not arrays(plain).tail and arrays(problem).tail


def test_slo_plan_meets_its_target_under_the_tail_model():
    rng = np.random.default_rng(3)
    problem = _problem(rng, 4, 5)
    arr = arrays(problem)
    het = solve(problem, "multispin-heterogeneous", arr)
    worst = het.round_s / min(d.expected_tokens for d in het.devices)
    target = worst * 0.9                        # binds: heterogeneous's plan misses it
    plan, res = solve_slo_plan(problem, target, arr)
    if plan is None:
        assert not res.feasible and res.worst_tpot_s > target
        assert res.closest_shares is not None
    else:
        assert plan.round_s / min(d.expected_tokens for d in plan.devices) <= target * (1 + 1e-9)
        assert plan.goodput_tps <= het.goodput_tps * (1 + 1e-12)


def test_problem_file_round_trips_the_tail_fields(tmp_path):
    rng = np.random.default_rng(8)
    problem = _problem(rng, 3, 4)
    assert problem_from_dict(problem_to_dict(problem)) == problem
    data = problem_to_dict(problem)
    data["devices"][0]["draft_sd_s"] = 0.01           # one number: every length
    assert problem_from_dict(data).devices[0].draft_sd_s == (0.01,)
    data["devices"][0]["draft_sd_s"] = [0.01] * 5     # more than max_draft_len (4)
    with pytest.raises(ProblemError, match=r"devices\[0\]\.draft_sd_s: expected 1 to "):
        problem_from_dict(data, "p.json")
    data["devices"][0]["draft_sd_s"] = [0.01, -1]
    with pytest.raises(ProblemError, match=r"draft_sd_s\[1\]"):
        problem_from_dict(data, "p.json")
    data["devices"][0]["draft_sd_s"] = 0.01
    data["model"] = "median"
    with pytest.raises(ProblemError, match=r"model: expected one of tail, mean"):
        problem_from_dict(data, "p.json")
    data["model"] = "mean"
    data["upload_time_factor"] = {"mean": 0, "sd": 0.1}
    with pytest.raises(ProblemError, match=r"upload_time_factor\.mean: must be greater"):
        problem_from_dict(data, "p.json")


def test_profile_problem_carries_the_measured_spreads():
    """A problem made from a profile holds drafting's spread per length (the grid's, linear in
    between), the upload factor and the labs' rate floor, and plans with the tail model unless
    asked for the mean one; the estimator keeps the spreads and counts the factor once."""
    import json
    from pathlib import Path

    from testbed.control.estimator import Estimator, RoundObservation
    from testbed.control.model import uplink_rate_bps
    from testbed.control.problem import problem_from_profile
    from testbed.inputs.inventory import load_inventory

    root = Path(__file__).resolve().parents[1]
    profile = json.loads((root / "profiles/local.json").read_text())
    channel = load_inventory(root / "inventory/local.yaml").channel
    problem = problem_from_profile(profile, channel)
    d0, grid = problem.devices[0], profile["devices"][0]["draft"]["grid"]
    by_len = {r["draft_len"]: r["sd_s"] for r in grid}
    assert d0.draft_sd_s[0] == pytest.approx(by_len[1])
    assert d0.draft_sd_s[2] == pytest.approx((by_len[2] + by_len[4]) / 2)     # L = 3
    assert d0.draft_sd_s[-1] == pytest.approx(by_len[max(by_len)])
    factor = profile["payload"]["upload_time_over_model"]
    assert problem.upload_time_factor == pytest.approx((factor["mean"], factor["sd"]))
    assert problem.min_rate_bps == 100.0
    assert arrays(problem).tail
    assert not arrays(problem_from_profile(profile, channel, model="mean")).tail

    est = Estimator(problem, ewma=0.5)
    assert est.problem().devices[0].draft_sd_s == d0.draft_sd_s
    share, L = 0.5, 4
    rate = uplink_rate_bps(share, problem.bandwidth_hz, d0.snr_db)
    bits = problem.header_bits + L * problem.bits_per_draft_token
    for _ in range(20):      # uploads take the measured factor times the model's time
        est.observe(RoundObservation(d0.name, L, L, 0.1, bits, bits / rate * factor["mean"],
                                     share))
    assert est.estimate(d0.name).snr_db == pytest.approx(d0.snr_db, abs=1e-6)
    mean_est = Estimator(dataclasses.replace(problem, model="mean"), ewma=0.5)
    for _ in range(20):      # the mean model has no factor: the rate absorbs it
        mean_est.observe(RoundObservation(d0.name, L, L, 0.1, bits,
                                          bits / rate * factor["mean"], share))
    assert mean_est.estimate(d0.name).rate_bps == pytest.approx(
        rate / share / factor["mean"], rel=1e-6)
