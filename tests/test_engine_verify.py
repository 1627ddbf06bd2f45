"""The verifier with the real target: one llama_decode per round for all devices, per-device
results identical to verifying each device alone, KV rollback, emulated step duration, bad input.

Drafts are built from the target's own greedy continuation with one token spoiled at a chosen
position, so the expected outcome of every round is known exactly: n_accepted = the spoiled
position, next token = the target's token there.
"""

from __future__ import annotations

import pytest
from engine_helpers import PROMPTS, prepared

from testbed.engine import payload as pl
from testbed.engine.native import Model
from testbed.engine.sampling import SamplingParams
from testbed.engine.spec import target_only
from testbed.engine.verify import Verifier
from testbed.errors import EngineError, InputError
from testbed.inputs.inventory import Emulation
from testbed.inputs.prompts import render_prompt

TARGET = "smollm2-135m-q4_1"
THREADS = 1
DEVICES = [  # per device: prompt, and per round (draft length, spoiled position or None)
    ("Name three colours.", [(4, 2), (3, None)]),
    (PROMPTS[1], [(1, None), (5, 0)]),
    (PROMPTS[2], [(0, None), (2, 1)]),
    ("Count from one to ten.", [(6, None), (4, 3)]),
]


@pytest.fixture(scope="module")
def target_path():
    return prepared()[TARGET]


@pytest.fixture(scope="module")
def cases(target_path):
    """Per device: prompt tokens and the target's greedy continuation (the truth)."""
    with Model.open(target_path) as m:
        out = []
        for text, rounds in DEVICES:
            prompt = m.tokenize(render_prompt(text))
            truth = target_only(m, prompt, max_tokens=24, threads=THREADS).tokens
            # no early end: every round below has the target's tokens to check against
            assert len(truth) >= sum(length + 1 for length, _ in rounds)
            out.append((prompt, truth, rounds))
        return out


def _draft(truth, done, length, spoil):
    tokens = list(truth[done:done + length])
    if spoil is not None:
        tokens[spoil] = (tokens[spoil] + 1) % 49152
    return pl.encode("ids", tokens)


def _play(verifier, cases, seqs):
    """Play every round for ``seqs`` together; returns per round {seq: SeqResult} and checks."""
    done = {s: 0 for s in seqs}
    for s in seqs:
        verifier.add_sequence(s, cases[s][0])
    history = []
    for r in range(2):
        drafts = {s: _draft(cases[s][1], done[s], *cases[s][2][r]) for s in seqs}
        before = verifier.n_decodes
        step = verifier.verify(drafts)
        assert verifier.n_decodes - before == 1 == step.n_decodes   # ONE decode for all devices
        assert step.n_tokens == sum(cases[s][2][r][0] + 1 for s in seqs)
        for s in seqs:
            length, spoil = cases[s][2][r]
            res = step.results[s]
            want_n = length if spoil is None else spoil
            truth = cases[s][1]
            assert (res.n_drafted, res.n_accepted) == (length, want_n)
            assert res.tokens == tuple(truth[done[s]:done[s] + want_n + 1])
            done[s] += want_n + 1
            assert verifier.tokens(s) == cases[s][0] + truth[:done[s]]
            # the KV cache holds everything but the pending last token: rejected ones are gone
            assert verifier.ctx.seq_pos_max(s) == len(verifier.tokens(s)) - 2
        history.append(step.results)
    return history


def test_one_decode_per_round_and_same_results_as_alone(target_path, cases):
    with_all = Verifier(target_path, n_seq_max=4, n_ctx=256, threads=THREADS)
    alone = Verifier(target_path, n_seq_max=1, n_ctx=256, threads=THREADS)
    try:
        together = _play(with_all, cases, [0, 1, 2, 3])
        for s in range(4):
            single = _play(alone, [cases[s]], [0])
            for r in range(2):
                a, b = together[r][s], single[r][0]
                assert (a.n_accepted, a.next_token, a.tokens) == (b.n_accepted, b.next_token, b.tokens)
    finally:
        with_all.close()
        alone.close()


def test_sampling_results_do_not_depend_on_the_other_devices(target_path, cases):
    # Per-sequence sampling: device 0 greedy (the verifier's default), devices 1-3 sample.
    sampling = SamplingParams(temperature=1.0, top_k=40)
    batched = Verifier(target_path, n_seq_max=4, n_ctx=256, threads=THREADS, seed=5)
    single = Verifier(target_path, n_seq_max=4, n_ctx=256, threads=THREADS, seed=5)
    try:
        for s in range(4):
            batched.add_sequence(s, cases[s][0], sampling=sampling if s else None)
        drafts = {s: pl.encode("ids", cases[s][1][:4]) for s in range(4)}   # a greedy draft: q one-hot
        together = batched.verify(drafts).results
        assert together[0].tokens == tuple(cases[0][1][:5])     # greedy: all 4 + the bonus
        for s in range(4):
            single.add_sequence(s, cases[s][0], sampling=sampling if s else None)
            assert single.verify({s: drafts[s]}).results[s] == together[s]
    finally:
        batched.close()
        single.close()


class StepClock:
    """A clock for the verifier that a test controls: every reading advances it by ``tick``
    seconds (so the real step "lasts" a known time, whatever this CPU's speed), and ``sleep``
    moves it forward and records what the verifier asked for."""

    def __init__(self, tick: float):
        self.now, self.tick, self.slept = 100.0, tick, []

    def clock(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("tick, padded", [(0.001, True), (0.2, False)])
def test_emulated_step_lasts_base_plus_per_token(target_path, cases, tick, padded):
    """A verify of n tokens lasts max(real compute, base + per_token * n) for its caller: the
    verifier sleeps the remainder when the real step is shorter, and adds nothing when the real
    step outlasts the emulation (then the real duration is what counts)."""
    emu = Emulation(verify_base_s=0.25, verify_per_token_s=0.01)
    fake = StepClock(tick)
    v = Verifier(target_path, n_seq_max=2, n_ctx=256, threads=THREADS, emulation=emu,
                 clock=fake.clock, sleep=fake.sleep)
    try:
        v.add_sequence(0, cases[0][0])
        v.add_sequence(1, cases[1][0])
        t0 = fake.clock()
        step = v.verify({0: _draft(cases[0][1], 0, 4, None), 1: _draft(cases[1][1], 0, 2, None)})
        waited = fake.clock() - t0
        assert step.n_tokens == 8 and step.n_decodes == 1
        want = 0.25 + 0.01 * 8
        assert tick <= step.compute_s <= 10 * tick           # the real step, in clock readings
        if padded:
            assert step.compute_s < want
            assert step.emulated_s == pytest.approx(want) and len(fake.slept) == 1
        else:
            assert step.compute_s > want                     # the real step outlasts the model
            assert step.emulated_s == step.compute_s and fake.slept == []
        assert step.step_s == step.emulated_s
        # The caller waited the emulated duration, plus a few clock readings (each a tick here)
        # outside the part the verifier measures.
        assert step.emulated_s <= waited <= step.emulated_s + 4 * tick
    finally:
        v.close()


def test_without_emulation_no_padding(target_path, cases):
    v = Verifier(target_path, n_seq_max=1, n_ctx=256, threads=THREADS)
    try:
        v.add_sequence(0, cases[0][0])
        step = v.verify({0: _draft(cases[0][1], 0, 2, None)})
        assert step.emulated_s is None and step.step_s == step.compute_s > step.decode_s > 0
        assert v.verify({}).n_decodes == 0
    finally:
        v.close()


def test_bad_input(target_path, cases):
    v = Verifier(target_path, n_seq_max=2, n_ctx=256, threads=THREADS)
    try:
        with pytest.raises(InputError, match="seq"):
            v.add_sequence(2, cases[0][0])
        with pytest.raises(EngineError, match="not added"):
            v.verify({1: pl.encode("ids", [1])})
        v.add_sequence(0, cases[0][0])
        with pytest.raises(EngineError, match="malformed"):
            v.verify({0: pl.encode("ids", [1, 2])[:-1]})
        assert v.tokens(0) == cases[0][0]                   # a bad payload changes nothing
    finally:
        v.close()


def test_logits_are_bit_identical_alone_batched_and_beside_other_sequences(target_path, cases):
    """The ground losslessness stands on: flash attention on, a sequence's logits do not depend
    on how its tokens are batched or on other sequences in the batch."""
    import numpy as np

    from testbed.engine.native import Batch, Context, prefill

    prompt, truth, _ = cases[1]
    other_truth = cases[2][1]
    n = 6
    with Model.open(target_path) as m, Context(m, n_ctx=512, n_seq_max=3, threads=THREADS) as ctx, \
            Batch(64) as b:
        prefill(ctx, b, 0, prompt[:-1], 0, logits_last=False)
        single = []
        for j, tok in enumerate([prompt[-1]] + truth[:n - 1]):
            b.clear()
            b.add(tok, len(prompt) - 1 + j, 0, True)
            ctx.decode(b)
            single.append(ctx.logits(0))
        for seq in (1, 2):
            prefill(ctx, b, seq, prompt[:-1], 0, logits_last=False)
        b.clear()
        for j, tok in enumerate([prompt[-1]] + truth[:n - 1]):
            b.add(tok, len(prompt) - 1 + j, 1, True)           # seq 1: the same tokens, batched
        for j, tok in enumerate(other_truth[:3]):
            b.add(tok, len(prompt) - 1 + j, 2, True)           # seq 2: other tokens beside it
        ctx.decode(b)
        for j in range(n):
            assert np.array_equal(single[j], ctx.logits(j)), j


def test_gpu_layers_on_a_cpu_build_is_a_clear_error(target_path):
    from testbed.engine.native import gpu_offload_supported
    if gpu_offload_supported():
        pytest.skip("this llama-cpp-python has a GPU backend: the error path is not reachable")
    with pytest.raises(EngineError, match="no GPU backend.*DGGML_CUDA=on"):
        Verifier(target_path, n_seq_max=1, gpu_layers=-1)

