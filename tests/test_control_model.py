"""The goodput model: round time, expected tokens, equal-arrival shares, plans and their JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from testbed.control.model import (arrays, arrival_time, evaluate, expected_tokens,
                                   goodput_of_lengths, make_plan, optimal_shares,
                                   spectral_efficiency, uplink_rate_bps)
from testbed.control.policies import POLICIES, solve
from testbed.control.problem import Device, Problem, Server, plan_to_dict


def make_problem(devices, *, B=100e3, s=800.0, h=512.0, lmax=8, lfix=4,
                 server=(0.15, 0.0005, 0.003)) -> Problem:
    return Problem(bandwidth_hz=B, bits_per_draft_token=s, header_bits=h, max_draft_len=lmax,
                   baseline_draft_len=lfix, server=Server(*server),
                   devices=tuple(Device(f"d{i}", *d) for i, d in enumerate(devices)))


TWO = make_problem([(0.0, 0.05, 0.6, 10.0), (0.005, 0.02, 0.8, 20.0)])


def test_uplink_rate_is_shannon_rate_of_the_share():
    # SNR 0 dB: log2(1 + 1) = 1 bit/s/Hz.
    assert uplink_rate_bps(0.5, 100_000, 0.0) == pytest.approx(50_000)
    # 20 dB = 100x: log2(101).
    assert uplink_rate_bps(0.25, 100_000, 20.0) == pytest.approx(
        25_000 * math.log2(101))
    assert uplink_rate_bps(0.0, 100_000, 10.0) == 0.0
    with pytest.raises(ValueError):
        uplink_rate_bps(1.5, 100_000, 10.0)
    with pytest.raises(ValueError):
        uplink_rate_bps(0.5, 0, 10.0)


def test_spectral_efficiency_and_low_snr():
    assert spectral_efficiency(0.0) == pytest.approx(1.0)
    assert spectral_efficiency(10 * math.log10(3)) == pytest.approx(2.0)
    # -60 dB: log2(1 + 1e-6) ~ 1e-6 / ln 2, computed without cancellation
    assert spectral_efficiency(-60.0) == pytest.approx(1e-6 / math.log(2), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 0.999999, 1.0])
def test_expected_tokens_matches_closed_form(alpha):
    for L in range(0, 9):
        want = math.fsum(alpha ** i for i in range(L + 1))   # exact, also next to alpha = 1
        assert expected_tokens(alpha, L) == pytest.approx(want, rel=1e-14)
        if alpha < 0.99:
            assert want == pytest.approx((1 - alpha ** (L + 1)) / (1 - alpha), rel=1e-12)
        if alpha == 1.0:
            assert want == L + 1
    assert expected_tokens(alpha, 0) == 1.0          # the server's own token


def test_equal_arrival_shares_make_everyone_arrive_together():
    arr = arrays(TWO)
    L = np.array([3, 5])
    t = arrival_time(arr, L)[0]
    b = optimal_shares(arr, L)[0]
    assert b.sum() == pytest.approx(1.0, abs=1e-12)
    ready = arr.drafted_s[[0, 1], L] + arr.upload_s[[0, 1], L] / b
    assert ready == pytest.approx([t, t], rel=1e-12)
    # any other split of the band makes the round longer
    for eps in (0.01, -0.01):
        other = b + np.array([eps, -eps])
        assert evaluate(arr, L, other)[0] > evaluate(arr, L, b)[0]


def test_arrival_time_matches_a_bisection_on_many_vectors():
    rng = np.random.default_rng(3)
    prob = make_problem([(rng.uniform(0, 0.02), rng.uniform(0.005, 0.1), 0.7,
                          rng.uniform(-10, 30)) for _ in range(6)])
    arr = arrays(prob)
    L = rng.integers(0, 9, size=(300, 6))
    t = arrival_time(arr, L)
    for row, tr in zip(L, t):
        on = row > 0
        if not on.any():
            assert tr == 0.0
            continue
        a = arr.drafted_s[np.arange(6), row][on]
        p = arr.upload_s[np.arange(6), row][on]
        lo, hi = a.max(), a.max() + p.sum()
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if (p / (mid - a)).sum() > 1 else (lo, mid)
        assert tr == pytest.approx(hi, rel=1e-12)


def test_round_time_without_drafting_is_the_server_alone():
    arr = arrays(TWO)
    round_s, goodput = evaluate(arr, [0, 0], [0.0, 0.0])
    assert round_s == pytest.approx(0.15 + 0.0005 * 2 + 0.003)
    assert goodput == pytest.approx(2 / round_s)
    # a drafting device with no band never arrives
    assert evaluate(arr, [2, 0], [0.0, 0.0])[1] == 0.0


def test_round_time_by_hand():
    arr = arrays(TWO)
    L, b = np.array([2, 4]), np.array([0.3, 0.7])
    R = 100e3 * np.log2(1 + 10 ** (np.array([10.0, 20.0]) / 10))
    ready = np.array([0.0 + 2 * 0.05, 0.005 + 4 * 0.02]) + (512 + L * 800) / (b * R)
    n = (2 + 1) + (4 + 1)
    want_T = ready.max() + 0.15 + 0.0005 * n + 0.003
    E = (1 - 0.6 ** 3) / 0.4 + (1 - 0.8 ** 5) / 0.2
    assert evaluate(arr, L, b) == pytest.approx((want_T, E / want_T), rel=1e-12)
    assert goodput_of_lengths(arr, L)[0] >= E / want_T     # optimal shares do no worse


@pytest.mark.parametrize("policy", POLICIES)
def test_plan_json_goodput_is_the_models_value(policy):
    rng = np.random.default_rng(11)
    prob = make_problem([(rng.uniform(0, 0.01), rng.uniform(0.01, 0.08), rng.uniform(0.4, 0.95),
                          rng.uniform(0, 25)) for _ in range(7)])
    data = json.loads(json.dumps(plan_to_dict(solve(prob, policy))))
    L = [d["draft_len"] for d in data["devices"]]
    b = [d["bandwidth_share"] for d in data["devices"]]
    assert sum(b) <= 1.0 + 1e-12
    round_s, goodput = evaluate(arrays(prob), L, b)
    assert data["goodput_tps"] == pytest.approx(goodput, rel=1e-6)
    assert data["round_s"] == pytest.approx(round_s, rel=1e-6)
    tokens = sum(d["expected_tokens"] for d in data["devices"])
    assert tokens / data["round_s"] == pytest.approx(data["goodput_tps"], rel=1e-9)
    for d, share in zip(data["devices"], b):
        if d["draft_len"] == 0:
            assert share == 0.0 and d["uplink_bps"] == 0.0


def test_plan_of_any_values_reports_the_model():
    arr = arrays(TWO)
    plan = make_plan(TWO, arr, "custom", [1, 0], [0.25, 0.5])
    assert plan.devices[1].bandwidth_share == 0.0          # not drafting: no band
    assert plan.devices[0].uplink_bps == pytest.approx(0.25 * arr.rate_bps[0])
    assert (plan.round_s, plan.goodput_tps) == pytest.approx(
        evaluate(arr, [1, 0], [0.25, 0.0]))


@pytest.mark.parametrize("weak", ["slower drafting", "lower snr", "higher base"])
def test_homogeneous_gives_the_weaker_device_the_larger_share(weak):
    strong = (0.002, 0.02, 0.7, 15.0)
    weaker = {"slower drafting": (0.002, 0.04, 0.7, 15.0),
              "lower snr": (0.002, 0.02, 0.7, 5.0),
              "higher base": (0.02, 0.02, 0.7, 15.0)}[weak]
    prob = make_problem([strong, weaker, strong], B=50e3)
    plan = solve(prob, "multispin-homogeneous")
    assert len(set(plan.draft_lens)) == 1 and plan.draft_lens[0] >= 1
    shares = plan.shares
    assert shares[1] > shares[0] and shares[0] == pytest.approx(shares[2])
