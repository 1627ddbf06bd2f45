"""Acceptance rules, sampling and payloads on synthetic data (pure: no llama.cpp).

The speculative-sampling rule is checked by simulation: context-free target distributions p_j and
draft distributions q_j per output position, rounds of L = 2 drafts until three tokens are out,
and a chi-square goodness-of-fit test of each output position against p_j. A deliberately wrong
rule (resample from p instead of the residual after a rejection) must fail the same test, which
shows the test has the power to catch a wrong rule.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from testbed.engine import payload as pl
from testbed.engine.accept import accept_greedy, accept_sampling, residual
from testbed.engine.metrics import AcceptanceStats
from testbed.engine.sampling import Dist, SamplingParams, dist_from_logits, sample
from testbed.errors import EngineError, InputError

V = 6
# Target distributions per position (dense over V tokens) and very different drafts; the drafts
# of positions 1 and 3 leave out tokens the target likes (a truncated top-k q).
P = np.array([[.05, .10, .15, .20, .20, .30],
              [.40, .05, .05, .10, .10, .30],
              [.10, .10, .10, .10, .10, .50],
              [.30, .30, .10, .10, .10, .10],
              [.15, .15, .15, .15, .20, .20]])
Q = np.array([[.50, .20, .10, .10, .05, .05],
              [.00, .60, .40, .00, .00, .00],
              [.10, .10, .10, .10, .50, .10],
              [.00, .00, .00, .50, .50, .00],
              [.30, .30, .10, .10, .10, .10]])


def _dist(row) -> Dist:
    ids = np.flatnonzero(row > 0)
    order = np.argsort(-row[ids], kind="stable")
    return Dist(ids[order].astype(np.int64), row[ids][order] / row[ids].sum())


PD = [_dist(r) for r in P]
QD = [_dist(r) for r in Q]


def wrong_rule(draft, q, p_at, rng):
    """Deliberately wrong: after a rejection, resample from p instead of norm(max(0, p - q))."""
    for i, token in enumerate(draft):
        p = p_at(i)
        if rng.random() * q[i].prob(token) < p.prob(token):
            continue
        return i, sample(p, rng)
    return len(draft), sample(p_at(len(draft)), rng)


def simulate(rule, trials: int, *, one_hot_draft: bool = False, L: int = 2, n_out: int = 3,
             seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_out, V))
    for _ in range(trials):
        out: list[int] = []
        while len(out) < n_out:
            j0 = len(out)
            qs = [Dist.one_hot(int(QD[j0 + i].ids[0])) if one_hot_draft else QD[j0 + i]
                  for i in range(L)]
            draft = [sample(q, rng) for q in qs]
            n, t = rule(draft, qs, lambda i, j0=j0: PD[j0 + i], rng)
            out += draft[:n] + [t]
        for j in range(n_out):
            counts[j, out[j]] += 1
    return counts


def p_values(counts: np.ndarray) -> list[float]:
    out = []
    for j, row in enumerate(counts):
        expected = P[j] * row.sum()
        assert expected.min() >= 5       # chi-square is valid with these counts
        out.append(stats.chisquare(row, expected).pvalue)
    return out


def test_speculative_sampling_emits_the_target_distribution():
    pv = p_values(simulate(accept_sampling, 12000))
    assert min(pv) > 1e-3, pv


def test_speculative_sampling_exact_with_a_deterministic_draft():
    # ids payload while sampling: the draft is greedy, q is one-hot, the rule stays exact.
    pv = p_values(simulate(accept_sampling, 8000, one_hot_draft=True, seed=2))
    assert min(pv) > 1e-3, pv


def test_a_wrong_rule_fails_the_same_test():
    pv = p_values(simulate(wrong_rule, 4000))
    assert pv[0] < 1e-6, pv


def test_residual_is_normalised_positive_part():
    r = residual(PD[0], QD[0])
    dense = np.zeros(V)
    dense[r.ids] = r.probs
    want = np.maximum(P[0] - Q[0], 0)
    assert np.allclose(dense, want / want.sum())
    assert np.all(np.diff(r.probs) <= 0)


def test_greedy_rule_longest_prefix_plus_target_token():
    target = [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7], lambda i: target[i]) == (3, 8)    # all + bonus
    assert accept_greedy([5, 9, 7], lambda i: target[i]) == (1, 6)    # first mismatch
    assert accept_greedy([1, 6, 7], lambda i: target[i]) == (0, 5)    # still one token
    assert accept_greedy([], lambda i: target[i]) == (0, 5)


def test_sampling_rule_rejects_a_token_not_drawn_from_q():
    with pytest.raises(ValueError, match="q = 0"):
        accept_sampling([3], [QD[1]], lambda i: PD[i], np.random.default_rng(0))


def test_dist_from_logits_top_k_top_p_temperature():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    full = dist_from_logits(logits, SamplingParams(temperature=1.0))
    assert list(full.ids) == [1, 3, 4, 2, 0] and np.allclose(full.probs, [.4, .3, .15, .1, .05])
    k2 = dist_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert list(k2.ids) == [1, 3] and np.allclose(k2.probs, [4 / 7, 3 / 7])
    p = dist_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert list(p.ids) == [1, 3, 4]                 # 0.4 + 0.3 < 0.8 <= 0.85
    hot = dist_from_logits(logits, SamplingParams(temperature=0.5))
    assert hot.probs[0] > full.probs[0]
    greedy = dist_from_logits(logits, SamplingParams())
    assert list(greedy.ids) == [1] and greedy.probs[0] == 1.0
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0)


def test_ids_payload_round_trip_and_size():
    data = pl.encode("ids", [5, 49151, 0])
    assert len(data) == 4 + 3 * 2
    assert pl.decode(data) == pl.DraftPayload("ids", (5, 49151, 0), None)
    big = pl.encode("ids", [70000], id_bytes=4)
    assert len(big) == 4 + 4 and pl.decode(big).tokens == (70000,)
    assert len(pl.encode("ids", [])) == 4


def test_topk_payload_carries_exactly_the_q_the_drafter_sampled_from():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000) * 3
    tokens, quantized, qs = [], [], []
    for _ in range(3):
        ids, w = pl.quantize_dist(dist_from_logits(logits, SamplingParams(temperature=1.0)), 8)
        assert len(ids) <= 8 and w.max() == pl.WEIGHT_MAX and w.min() > 0
        q = Dist.from_weights(ids, w)
        tokens.append(sample(q, rng))
        quantized.append((ids, w))
        qs.append(q)
    data = pl.encode("topk", tokens, quantized)
    assert len(data) == 4 + sum(2 + 4 * len(ids) for ids, _ in quantized)
    back = pl.decode(data)
    assert back.tokens == tuple(tokens)
    for a, b in zip(back.dists, qs):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.probs, b.probs)  # bit for bit


@pytest.mark.parametrize("data", [b"", b"\x01\x00\x02\x02\x05\x00", b"\x02\x00\x02\x00",
                                  b"\x01\x00\x02\x01\x05\x00\x07"])
def test_malformed_payload_is_an_engine_error(data):
    with pytest.raises(EngineError, match="malformed draft payload"):
        pl.decode(data)


def test_acceptance_stats_per_position():
    s = AcceptanceStats()
    s.record(4, 2, payload_bytes=12)
    s.record(4, 4, payload_bytes=12)
    s.record(2, 0, payload_bytes=8)
    assert (s.n_rounds, s.n_drafted, s.n_accepted, s.n_emitted) == (3, 10, 6, 9)
    assert s.drafted_at == [3, 3, 2, 2] and s.accepted_at == [2, 2, 1, 1]
    assert s.acceptance_at == [2 / 3, 2 / 3, 0.5, 0.5]
    assert s.bits_per_draft_token == 8 * 32 / 10
