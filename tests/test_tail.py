"""The expected slowest of K arrivals (issue #27, first part: ``testbed/control/tail.py``):
the exact value against closed forms and sampled maxima, the approximation against the exact
value, fixed arrivals, bad input. No lab."""

from __future__ import annotations

import math

import numpy as np
import pytest

from testbed.control.tail import expected_max, expected_max_approx, expected_max_sampled

# E[max] of K independent standard normals (Harter's tables; K = 2: 1/sqrt(pi), K = 3:
# 3/(2 sqrt(pi)))
STANDARD = {2: 1 / math.sqrt(math.pi), 3: 1.5 / math.sqrt(math.pi), 4: 1.0293754,
            5: 1.1629645, 10: 1.5387527, 100: 2.5075937}


@pytest.mark.parametrize("k", sorted(STANDARD))
def test_exact_matches_the_known_maxima_of_standard_normals(k):
    mu, sd = 0.3, 0.07
    assert expected_max(np.full(k, mu), np.full(k, sd)) == pytest.approx(
        mu + sd * STANDARD[k], abs=1e-7)


def test_one_device_is_its_mean_and_the_max_is_above_every_mean():
    assert expected_max([0.42], [0.1]) == pytest.approx(0.42, abs=1e-9)
    rng = np.random.default_rng(3)
    mu, sd = rng.uniform(0.1, 1.0, 50), rng.uniform(0.0, 0.2, 50)
    assert expected_max(mu, sd) > mu.max()


def test_exact_agrees_with_sampled_maxima_for_unequal_devices():
    rng = np.random.default_rng(11)
    for k in (3, 40, 700):
        mu, sd = rng.uniform(0.5, 1.0, k), rng.uniform(0.005, 0.1, k)
        mean, se = expected_max_sampled(mu, sd, 20_000, rng)
        assert abs(mean - expected_max(mu, sd)) < 4 * se, (k, mean, se)


def test_fixed_arrivals_bound_the_maximum():
    # a fixed arrival after every random one's tail is the maximum; one before them changes
    # nothing; one in the middle lifts the expectation
    assert expected_max([2.0, 1.0, 1.1], [0.0, 0.05, 0.05]) == pytest.approx(2.0)
    assert expected_max([0.1, 1.0, 1.0], [0.0, 0.05, 0.05]) == pytest.approx(
        1.0 + 0.05 / math.sqrt(math.pi), abs=1e-7)
    mid = expected_max([1.0, 1.0], [0.0, 0.1])            # E[max(1, N(1, 0.1))]
    assert mid == pytest.approx(1.0 + 0.1 / math.sqrt(2 * math.pi), abs=1e-7)
    assert expected_max([0.5, 0.7], [0.0, 0.0]) == 0.7
    assert expected_max_approx([0.5, 0.7], [0.0, 0.0]) == 0.7


@pytest.mark.parametrize("k", [2, 4, 10, 100, 1000, 10_000])
def test_the_approximation_is_within_1_5_percent(k):
    """Blom's level: within 0.15% for identical devices, within 1.5% for the bench's
    families (equal means with the profile's unequal spreads; spread means)."""
    rng = np.random.default_rng(k)
    sds = np.array([0.022, 0.018, 0.026, 0.081])[np.arange(k) % 4]
    same = expected_max(np.ones(k), np.full(k, 0.05))
    assert expected_max_approx(np.ones(k), np.full(k, 0.05)) == pytest.approx(same, rel=1.5e-3)
    for mu in (np.ones(k), rng.uniform(0.7, 1.0, k)):
        assert expected_max_approx(mu, sds) == pytest.approx(expected_max(mu, sds), rel=0.015)


@pytest.mark.parametrize("mu, sd", [([], []), ([1.0], [-0.1]), ([1.0, 2.0], [0.1]),
                                    ([math.nan], [0.1]), ([1.0], [math.inf])])
def test_bad_input_is_refused(mu, sd):
    with pytest.raises(ValueError):
        expected_max(mu, sd)
    with pytest.raises(ValueError):
        expected_max_approx(mu, sd)
