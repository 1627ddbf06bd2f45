"""Online estimation from scripted rounds, and re-planning with hysteresis and dwell."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from testbed.control.estimator import Estimator, RoundObservation
from testbed.control.policies import solve
from testbed.control.problem import Device, Problem, Server, problem_from_dict, problem_to_dict
from testbed.control.replan import Replanner

B = 100e3


def prior(**over) -> Problem:
    devs = (Device("a", 0.005, 0.03, 0.6, 10.0), Device("b", 0.002, 0.02, 0.8, 15.0),
            Device("c", 0.0, 0.05, 0.5, 5.0))
    p = Problem(B, 800.0, 512.0, 8, 4, Server(0.15, 0.0005, 0.003), devs)
    return dataclasses.replace(p, **over)


def rate_of(snr_db: float) -> float:
    return B * math.log2(1 + 10 ** (snr_db / 10))


def draft_round(rng, name, L, accept_probs) -> RoundObservation:
    """One round of i.i.d. (or per-position) acceptance: the longest accepted prefix."""
    accepted = 0
    while accepted < L and rng.random() < accept_probs[min(accepted, len(accept_probs) - 1)]:
        accepted += 1
    return RoundObservation(name, L, accepted)


def test_pooled_and_per_position_acceptance_converge():
    rng = np.random.default_rng(1)
    est = Estimator(prior(), ewma=0.002)
    for r in range(4000):
        est.observe(draft_round(rng, "a", 1 + r % 8, [0.75]))
    e = est.estimate("a")
    assert e.acceptance == pytest.approx(0.75, abs=0.03)
    assert len(e.acceptance_by_position) == 8
    for p in e.acceptance_by_position[:3]:      # later positions are reached less often
        assert p == pytest.approx(0.75, abs=0.06)


def test_per_position_acceptance_follows_position_dependent_truth():
    rng = np.random.default_rng(2)
    truth = [0.95, 0.8, 0.6, 0.4, 0.3, 0.3, 0.3, 0.3]
    est = Estimator(prior(), ewma=0.005)
    for _ in range(4000):
        est.observe(draft_round(rng, "b", 8, truth))
    by_pos = est.estimate("b").acceptance_by_position
    for got, want in zip(by_pos[:4], truth[:4]):
        assert got == pytest.approx(want, abs=0.05)
    assert by_pos[0] > by_pos[1] > by_pos[2] > by_pos[3]
    pooled = est.estimate("b").acceptance
    assert truth[3] < pooled < truth[0]


def test_acceptance_counts_only_judged_positions():
    est = Estimator(prior(), ewma=0.2)
    for _ in range(40):
        est.observe(RoundObservation("a", 4, 4))     # all accepted: no failure was seen
        est.observe(RoundObservation("c", 6, 0))     # first token rejected
    assert est.estimate("a").acceptance > 0.99
    assert est.estimate("c").acceptance < 0.01
    # c never reached position 1: its estimate there stays the prior
    assert est.estimate("c").acceptance_by_position[1] == pytest.approx(0.5)


def test_acceptance_tracks_a_change_at_the_ewma_rate():
    rng = np.random.default_rng(3)
    est = Estimator(prior(), ewma=0.2)
    for _ in range(300):
        est.observe(draft_round(rng, "a", 4, [0.85]))
    assert est.estimate("a").acceptance == pytest.approx(0.85, abs=0.08)
    for _ in range(60):
        est.observe(draft_round(rng, "a", 4, [0.3]))
    assert est.estimate("a").acceptance == pytest.approx(0.3, abs=0.1)


def test_drafting_time_fit_recovers_base_and_per_token():
    rng = np.random.default_rng(4)
    est = Estimator(prior(), ewma=0.05)
    for r in range(400):
        L = 1 + r % 8
        est.observe(RoundObservation("a", L, 0, draft_s=0.012 + 0.041 * L
                                     + rng.normal(0, 0.002)))
    e = est.estimate("a")
    assert e.draft_base_s == pytest.approx(0.012, abs=0.004)
    assert e.draft_per_token_s == pytest.approx(0.041, abs=0.002)


def test_one_draft_length_keeps_the_prior_slope():
    est = Estimator(prior(), ewma=0.2)
    for _ in range(200):
        est.observe(RoundObservation("a", 4, 2, draft_s=0.2))   # slower than the prior
    e = est.estimate("a")
    assert e.draft_per_token_s == pytest.approx(0.03, rel=0.05)     # the prior's slope
    assert e.draft_base_s + 4 * e.draft_per_token_s == pytest.approx(0.2, rel=0.02)


def test_link_rate_gives_the_snr_and_follows_a_drop():
    est = Estimator(prior(), ewma=0.3)
    for snr in (20.0, 0.0):
        for _ in range(40):
            bits, share = 512 + 4 * 800, 0.25
            est.observe(RoundObservation("b", 4, 3, upload_bits=bits,
                                         upload_s=bits / (share * rate_of(snr)), share=share))
        e = est.estimate("b")
        assert e.snr_db == pytest.approx(snr, abs=0.05)
        assert e.rate_bps == pytest.approx(rate_of(snr), rel=1e-3)


def test_rate_ewma_follows_the_link_faster_than_acceptance():
    est = Estimator(prior(), ewma=0.1, rate_ewma=0.6)
    bits, share = 512 + 4 * 800, 0.25
    for snr in (20.0, 0.0):
        for _ in range(5):
            est.observe(RoundObservation("b", 4, 4 if snr > 10 else 0, upload_bits=bits,
                                         upload_s=bits / (share * rate_of(snr)), share=share))
    e = est.estimate("b")
    # five rounds after the drop: the rate is within 2 % of the new one (0.4^5 of the old
    # remains), while acceptance has moved only about 1 - 0.9^5 of the way from 1 to 0
    assert e.rate_bps == pytest.approx(rate_of(0.0), rel=0.1)
    assert 0.4 < e.acceptance < 0.9
    slow = Estimator(prior(), ewma=0.1)
    for snr in (20.0, 0.0):
        for _ in range(5):
            slow.observe(RoundObservation("b", 4, 4, upload_bits=bits,
                                          upload_s=bits / (share * rate_of(snr)), share=share))
    assert slow.estimate("b").rate_bps > 2 * rate_of(0.0)       # one weight: still far off
    with pytest.raises(ValueError):
        Estimator(prior(), rate_ewma=0.0)


def test_the_estimated_problem_keeps_the_server_and_unobserved_devices():
    est = Estimator(prior(), ewma=0.1)
    for _ in range(20):
        est.observe(RoundObservation("b", 4, 2, draft_s=0.3))
    p = est.problem()
    assert p.server == prior().server           # the server's cost is the profile's, not learnt
    assert p.devices[1] != prior().devices[1]   # the observed device moved
    # devices never observed keep their prior, and the result is a valid problem
    assert (p.devices[0], p.devices[2]) == (prior().devices[0], prior().devices[2])
    assert problem_from_dict(problem_to_dict(p)) == p
    assert est.problem(active=["c", "a"]).names == ("c", "a")


@pytest.mark.parametrize("obs", [RoundObservation("a", 2, 3), RoundObservation("a", -1, 0),
                                 RoundObservation("zz", 2, 1),
                                 RoundObservation("a", 2, 1, draft_s=-1.0)])
def test_impossible_observations_are_refused(obs):
    with pytest.raises(ValueError):
        Estimator(prior()).observe(obs)


# -- re-planning ---------------------------------------------------------------------------

def with_device(problem: Problem, name: str, **change) -> Problem:
    devs = tuple(dataclasses.replace(d, **change) if d.name == name else d
                 for d in problem.devices)
    return dataclasses.replace(problem, devices=devs)


def test_static_estimates_never_replace_the_plan():
    r = Replanner("multispin-heterogeneous", hysteresis=0.03)
    p = prior()
    first = r.decide(None, p, 0)
    assert first.replace and first.reason == "first plan"
    plan = first.plan
    for i in range(1, 50):
        d = r.decide(plan, p, i)
        assert not d.replace and d.plan is plan and d.predicted_gain == pytest.approx(0.0)


def test_small_changes_alternating_do_not_flap():
    # two estimate sets whose optimal plans differ, each better than the other's by < 3 %
    A = with_device(prior(), "a", acceptance=0.66)
    Bp = with_device(prior(), "a", acceptance=0.60)
    plan_A, plan_B = solve(A, "multispin-heterogeneous"), solve(Bp, "multispin-heterogeneous")
    assert plan_A.draft_lens != plan_B.draft_lens          # the optimum does move
    r = Replanner("multispin-heterogeneous", hysteresis=0.03)
    plan = r.decide(None, A, 0).plan
    replaced = 0
    for i in range(1, 60):
        d = r.decide(plan, A if i % 2 else Bp, i)
        replaced += d.replace
        plan = d.plan
    assert replaced == 0


def test_a_real_change_replaces_once_then_holds():
    r = Replanner("multispin-heterogeneous", hysteresis=0.05)
    good = prior()
    plan = r.decide(None, good, 0).plan
    bad = with_device(good, "b", snr_db=-5.0)              # b's uplink collapses
    d = r.decide(plan, bad, 1)
    assert d.replace and d.reason == "gain" and d.predicted_gain > 0.05
    assert d.plan.devices[1].draft_len < plan.devices[1].draft_len
    for i in range(2, 30):
        assert not r.decide(d.plan, bad, i).replace


def test_dwell_limits_how_often_plans_change():
    A = prior()
    Bp = with_device(with_device(prior(), "a", snr_db=-10.0, acceptance=0.2), "c",
                     acceptance=0.95, snr_db=25.0)
    r = Replanner("multispin-heterogeneous", hysteresis=0.02, min_dwell_rounds=10)
    plan = r.decide(None, A, 0).plan
    changes = []
    for i in range(1, 100):
        d = r.decide(plan, A if (i // 3) % 2 else Bp, i)   # the truth swings every 3 rounds
        if d.replace:
            changes.append(i)
        elif d.reason == "dwell":
            assert i - (changes[-1] if changes else 0) < 10
        plan = d.plan
    assert changes, "large swings must be followed"
    assert all(b - a >= 10 for a, b in zip([0] + changes, changes))


def test_device_change_replaces_at_once():
    r = Replanner("agnostic-fixed", hysteresis=0.05, min_dwell_rounds=100)
    full = prior()
    plan = r.decide(None, full, 0).plan
    fewer = dataclasses.replace(full, devices=full.devices[:2])
    d = r.decide(plan, fewer, 1)                           # within the dwell
    assert d.replace and d.reason == "devices changed"
    assert [x.bandwidth_share for x in d.plan.devices] == [0.5, 0.5]


def test_restart_acceptance_forgets_the_old_workload():
    rng = np.random.default_rng(5)
    est = Estimator(prior(), ewma=0.02)          # about 50 rounds of memory: a steady estimate
    for _ in range(200):
        est.observe(draft_round(rng, "a", 4, [0.9]))
        est.observe(RoundObservation("a", 4, 4, draft_s=0.125))
    before = est.estimate("a")
    est.restart_acceptance("a", 0.35)
    after = est.estimate("a")
    assert after.acceptance == pytest.approx(0.35)       # exactly the new prior, no old evidence
    assert all(x == pytest.approx(0.35) for x in after.acceptance_by_position)
    assert (after.draft_base_s, after.draft_per_token_s) == (before.draft_base_s,
                                                            before.draft_per_token_s)
    assert est.problem().devices[0].acceptance == pytest.approx(0.35)
    for _ in range(600):
        est.observe(draft_round(rng, "a", 4, [0.6]))
    assert est.estimate("a").acceptance == pytest.approx(0.6, abs=0.1)   # then it learns again
    with pytest.raises(ValueError):
        est.restart_acceptance("a", 1.5)
    with pytest.raises(ValueError):
        est.restart_acceptance("zz", 0.5)


def test_ignore_dwell_still_needs_the_hysteresis():
    r = Replanner("multispin-heterogeneous", hysteresis=0.05, min_dwell_rounds=100)
    good = prior()
    plan = r.decide(None, good, 0).plan
    bad = with_device(good, "b", snr_db=-5.0)
    assert r.decide(plan, bad, 1).reason == "dwell"
    d = r.decide(plan, bad, 1, ignore_dwell=True)
    assert d.replace and d.reason == "gain"
    assert not r.decide(d.plan, bad, 2, ignore_dwell=True).replace   # no gain: kept


def test_a_recorded_upload_gives_the_profiles_rate_and_reproduces_its_time():
    """The runner observes uploads in the profile's unit (bits the shaper meters, framing
    included), so the rate it learns is the link's and the model's upload time for the draft
    length is the measured one. With payload bytes alone (the bug found 2026-11-30) the rate
    came out 1.8x too low for 4-token drafts and every forecast upload 1.8x too long."""
    from testbed.control.model import arrays
    from testbed.engine.payload import encode
    from testbed.live.datapath import DRAFT, END, frame
    from testbed.live.loop import observe_round
    from testbed.profiling.format import payload_summary

    name, rate, share = "b", 5860.0, 0.25

    def draft_frame(L):
        return len(frame(DRAFT, 7, name, encode("ids", list(range(100, 100 + L)))))

    def step_bytes(L):       # what a device's data-path step reports: DRAFT frame + END frame
        return draft_frame(L) + len(frame(END, 7, name))

    def metered(L):          # the shaper's count: the DRAFT frame plus TCP/IP/Ethernet headers
        return 8.0 * (draft_frame(L) + 66)

    rounds = [{"steps": {name: {"n_drafted": L, "wire_bytes": step_bytes(L),
                                "upload_s": metered(L) / (rate * share)}},
               "rates_bps": {name: rate * share}} for L in (1, 2, 4, 8)]
    fit = payload_summary(rounds)
    assert fit["upload_time_over_model"]["mean"] == pytest.approx(1.0)
    problem = prior(header_bits=fit["header_bits"], bits_per_draft_token=fit["bits_per_draft_token"])
    est = Estimator(problem, ewma=0.2, rate_ewma=1.0)     # rate: the last round's alone
    L = 4
    upload_s = metered(L) / (rate * share)
    ev = {"devices": [{"name": name, "n_drafted": L, "n_accepted": 2, "draft_s": 0.1,
                       "upload_bytes": step_bytes(L), "upload_s": upload_s, "share": share}]}
    observe_round(est, ev)
    assert est.estimate(name).rate_bps == pytest.approx(rate, rel=1e-6)
    arr = arrays(est.problem())
    k = est.problem().names.index(name)
    assert arr.upload_s[k, L] / share == pytest.approx(upload_s, rel=1e-6)


def test_fair_replanners_value_plans_by_their_own_objective():
    """A max-min re-planner leaves the heterogeneous plan (more sum goodput, a weaker worst
    device) for its own, while a heterogeneous re-planner keeps it: each values both plans by
    its own objective (``policy_value``), not by the sum."""
    from testbed.control.model import arrays
    from testbed.control.replan import policy_value
    p = with_device(prior(), "c", acceptance=0.2, draft_per_token_s=0.2)   # a weak device
    het = solve(p, "multispin-heterogeneous")
    mm = solve(p, "max-min")
    arr = arrays(p)
    assert policy_value("max-min", arr, het.draft_lens, het.shares) < \
        policy_value("max-min", arr, mm.draft_lens, mm.shares)
    assert het.goodput_tps > mm.goodput_tps
    d = Replanner("max-min", hysteresis=0.01).decide(het, p, 100)
    assert d.replace and d.plan.draft_lens == mm.draft_lens and d.predicted_gain > 0.01
    d = Replanner("multispin-heterogeneous", hysteresis=0.01).decide(het, p, 100)
    assert not d.replace
    # proportional-fair: K times the geometric mean of the devices' goodputs
    g = arr.tokens[np.arange(arr.K), list(het.draft_lens)] / het.round_s
    assert policy_value("proportional-fair", arr, het.draft_lens, het.shares) == \
        pytest.approx(arr.K * float(np.exp(np.log(g).mean())))


def test_slo_replanner_meets_the_target_or_says_it_cannot():
    from testbed.control.policies import SLO_POLICY
    p = prior()
    het = solve(p, "multispin-heterogeneous")
    worst = max(het.round_s / d.expected_tokens for d in het.devices)
    easy = Replanner(SLO_POLICY, tpot_s=worst * 2).decide(None, p, 0)
    assert easy.slo["feasible"] and easy.plan.draft_lens == het.draft_lens
    tight = Replanner(SLO_POLICY, tpot_s=worst * 0.9).decide(None, p, 0)
    if tight.slo["feasible"]:
        assert max(tight.plan.round_s / d.expected_tokens for d in tight.plan.devices) \
            <= worst * 0.9 * (1 + 1e-9)
        assert tight.plan.goodput_tps <= het.goodput_tps
    never = Replanner(SLO_POLICY, tpot_s=1e-4).decide(None, p, 0)
    assert not never.slo["feasible"] and never.plan.policy == SLO_POLICY
    mm = solve(p, "max-min")
    assert never.plan.draft_lens == mm.draft_lens          # the closest plan: max-min's
    assert never.slo["worst_tpot_s"] == pytest.approx(
        max(mm.round_s / d.expected_tokens for d in mm.devices), rel=1e-6)
    with pytest.raises(ValueError, match="tpot_s"):
        Replanner(SLO_POLICY)
