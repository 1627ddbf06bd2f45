"""The Multi-SPIN solvers against exhaustive search, the policy ordering, structural findings."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.control.exhaustive import (exhaustive_heterogeneous, exhaustive_homogeneous,
                                        random_problem)
from testbed.control.hetero import solve_heterogeneous
from testbed.control.model import arrays, goodput_of_lengths
from testbed.control.policies import POLICIES, solve, solve_many
from testbed.control.problem import Device, Problem, Server

N_RANDOM = 240
# The policies of sum goodput (the fair ones are tested against search in test_control_fair.py)
SUM_POLICIES = POLICIES[:5]


@pytest.fixture(scope="module")
def random_results():
    rng = np.random.default_rng(20260522)
    out = []
    for _ in range(N_RANDOM):
        prob = random_problem(rng)
        arr = arrays(prob)
        plans = {p.policy: p for p in solve_many(prob, SUM_POLICIES)}
        out.append((prob, plans, exhaustive_heterogeneous(arr)[1], exhaustive_homogeneous(arr)[1]))
    return out


def test_random_problems_cover_the_space(random_results):
    sizes = {(len(p.devices), p.max_draft_len) for p, *_ in random_results}
    assert {k for k, _ in sizes} == {1, 2, 3, 4} and max(m for _, m in sizes) == 8
    lengths = [p.draft_lens for _, plans, *_ in random_results
               for p in [plans["multispin-heterogeneous"]]]
    mixed = sum(1 for L in lengths if 0 in L and any(L))
    assert mixed >= 10          # some optima leave a device out while others draft
    assert sum(1 for L in lengths if not any(L)) >= 10     # and some are server-only


def test_both_multispin_policies_match_exhaustive_search(random_results):
    het_gaps, hom_gaps = [], []
    for prob, plans, g_het, g_hom in random_results:
        het_gaps.append(1 - plans["multispin-heterogeneous"].goodput_tps / g_het)
        hom_gaps.append(1 - plans["multispin-homogeneous"].goodput_tps / g_hom)
    assert max(het_gaps) <= 0.005 and max(hom_gaps) <= 0.005        # the requirement
    # and in fact exact: the optimum itself, to rounding
    assert max(het_gaps) < 1e-9 and max(hom_gaps) < 1e-9


def test_policy_ordering(random_results):
    for prob, plans, *_ in random_results:
        g = {name: plan.goodput_tps for name, plan in plans.items()}
        tol = 1 + 1e-12
        for other in ("multispin-homogeneous", "agnostic-fixed", "agnostic-tuned",
                      "server-only"):
            assert g["multispin-heterogeneous"] * tol >= g[other], (prob, other)
        for baseline in ("agnostic-fixed", "agnostic-tuned"):
            assert g["multispin-homogeneous"] * tol >= g[baseline], (prob, baseline)


def test_homogeneous_can_lose_to_server_only_but_heterogeneous_cannot():
    # drafting is slow and useless (alpha = 0): any L >= 1 only costs time
    prob = Problem(100e3, 800.0, 512.0, 4, 2, Server(0.05, 0.001, 0.0),
                   (Device("a", 0.0, 0.05, 0.0, 10.0), Device("b", 0.0, 0.05, 0.0, 10.0)))
    g = {p.policy: p for p in solve_many(prob)}
    assert g["multispin-homogeneous"].goodput_tps < g["server-only"].goodput_tps
    assert g["multispin-heterogeneous"].draft_lens == (0, 0)
    assert g["multispin-heterogeneous"].goodput_tps == pytest.approx(
        g["server-only"].goodput_tps)


@pytest.mark.parametrize("seed", range(8))
def test_heterogeneous_higher_acceptance_gets_at_least_share_and_length(seed):
    rng = np.random.default_rng(seed)
    K = 5
    alphas = np.sort(rng.uniform(0.3, 0.95, K))
    tau, t0, snr = rng.uniform(0.005, 0.03), rng.uniform(0, 0.01), rng.uniform(5, 25)
    prob = Problem(float(rng.uniform(50e3, 200e3)), float(rng.uniform(100, 800)), 256.0, 8, 4,
                   Server(0.15, 0.0005, 0.003),
                   tuple(Device(f"d{k}", t0, tau, float(a), snr) for k, a in enumerate(alphas)))
    plan = solve(prob, "multispin-heterogeneous")
    L, b = np.array(plan.draft_lens), np.array(plan.shares)
    assert L.any()
    assert (np.diff(L) >= 0).all(), (alphas, L)                  # sorted by acceptance
    assert (np.diff(b) >= -1e-12).all(), (alphas, b)


def test_heterogeneous_moves_band_to_likely_accepted_tokens():
    # same hardware and channel, acceptance 0.9 versus 0.4: longer drafts and more band to 0.9
    devs = tuple(Device(f"d{k}", 0.0, 0.02, a, 8.0) for k, a in enumerate((0.9, 0.4, 0.9, 0.4)))
    prob = Problem(60e3, 800.0, 256.0, 8, 4, Server(0.15, 0.0005, 0.003), devs)
    plan = solve(prob, "multispin-heterogeneous")
    assert plan.draft_lens[0] > plan.draft_lens[1]
    assert plan.shares[0] > plan.shares[1]


@pytest.mark.parametrize("alpha, snr", [(0.0, 10.0), (1.0, 10.0), (0.8, -40.0), (1.0, 60.0)])
def test_edge_values_give_valid_plans(alpha, snr):
    devs = tuple(Device(f"d{k}", 0.001, 0.02, alpha, snr) for k in range(3))
    prob = Problem(100e3, 800.0, 512.0, 8, 4, Server(0.1, 0.0005, 0.0), devs)
    for plan in solve_many(prob):
        assert all(np.isfinite([plan.round_s, plan.goodput_tps]))
        assert plan.goodput_tps > 0 and sum(plan.shares) <= 1 + 1e-12
    het = solve(prob, "multispin-heterogeneous")
    if alpha == 0.0 or snr < -30:       # drafting cannot pay: useless tokens, or no channel
        assert het.draft_lens == (0, 0, 0)
    if alpha == 1.0 and snr > 50:       # free, always-accepted drafts: the longest
        assert het.draft_lens == (8, 8, 8)


def large_problem(seed: int, K: int) -> Problem:
    """K random devices, 20 kHz of band each, a server whose step barely grows with K."""
    rng = np.random.default_rng(seed)
    devs = tuple(Device(f"d{k}", float(rng.uniform(0, 0.01)), float(rng.uniform(0.01, 0.06)),
                        float(rng.uniform(0.5, 0.9)), float(rng.uniform(0, 25)))
                 for k in range(K))
    return Problem(20e3 * K, 64.0, 256.0, 8, 4, Server(0.15, 0.0005 * 10 / K, 0.005), devs)


def test_large_problem_is_consistent():
    prob = large_problem(5, 2000)
    arr = arrays(prob)
    L, g = solve_heterogeneous(arr)
    assert g == pytest.approx(goodput_of_lengths(arr, L)[0], rel=1e-12)
    assert len(set(L.tolist())) > 3                  # genuinely heterogeneous
    plans = {p: solve(prob, p, arr) for p in POLICIES}
    assert plans["multispin-heterogeneous"].goodput_tps >= \
        plans["multispin-homogeneous"].goodput_tps * 1.01
    assert sum(plans["multispin-heterogeneous"].shares) <= 1 + 1e-12
