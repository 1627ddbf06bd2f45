"""In-process speculative decoding (``testbed spec``) and the target-only reference run.

``speculate`` is the loop, in the order it runs, over one ``DraftWorker`` and one ``Verifier`` in
this process (the same classes the Ray actors wrap):

    start both on the prompt
    repeat until max_tokens or an end-of-generation token:
        draft L tokens                       (DraftWorker.draft -> payload bytes)
        verify them in one llama_decode      (Verifier.verify)
        accept n of them + 1 target token    (at least one token per round)
        roll both KV caches back             (DraftWorker.accept / inside verify)

``target_only`` is the reference a speculative run must match: the target alone, one token per
llama_decode, choosing each token with the same ``SamplingParams`` (greedy: argmax). It shares no
state with the verifier, so greedy equality between the two is a real check.

Main types: ``SpecRun`` (tokens, text, ``AcceptanceStats``, elapsed_s, tokens_per_s).
Limits: one device; tokens/s counts the emitted tokens over the loop's wall time including the
prompt prefill, excluding model loading.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from testbed.engine.draft import DraftWorker
from testbed.engine.metrics import AcceptanceStats
from testbed.engine.native import Batch, Context, Model, prefill
from testbed.engine.sampling import SamplingParams, dist_from_logits, greedy, sample
from testbed.engine.verify import Verifier


@dataclass
class SpecRun:
    tokens: list[int]
    stats: AcceptanceStats
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.elapsed_s if self.elapsed_s > 0 else 0.0


def speculate(draft: DraftWorker, verifier: Verifier, prompt_tokens: list[int], *,
              max_tokens: int, draft_len: int, seq: int = 0, seed: int | None = None,
              clock: Callable[[], float] = time.perf_counter) -> SpecRun:
    """Generate up to ``max_tokens`` tokens speculatively; stops after an end-of-generation token."""
    is_eog = verifier.model.is_eog
    stats = AcceptanceStats()
    t0 = clock()
    draft.start(prompt_tokens, seed=seed)
    verifier.add_sequence(seq, prompt_tokens, seed=seed)
    out: list[int] = []
    done = max_tokens <= 0
    while not done:
        # never draft past what is still wanted: a round emits up to L + 1 tokens
        d = draft.draft(max(0, min(draft_len, max_tokens - len(out) - 1)))
        step = verifier.verify({seq: d.payload})
        r = step.results[seq]
        draft.accept(r.n_accepted, r.next_token)
        stats.record(r.n_drafted, r.n_accepted, draft_s=d.draft_s, verify_s=step.step_s,
                     payload_bytes=d.payload_bytes)
        for tok in r.tokens:
            out.append(tok)
            if is_eog(tok) or len(out) >= max_tokens:
                done = True
                break
    return SpecRun(out, stats, clock() - t0)


def target_only(model: Model, prompt_tokens: list[int], *, max_tokens: int,
                sampling: SamplingParams | None = None, seed: int = 0, threads: int = 2,
                n_ctx: int = 2048, clock: Callable[[], float] = time.perf_counter) -> SpecRun:
    """The target model alone: prefill the prompt, then one token per llama_decode."""
    sampling = sampling or SamplingParams()
    rng = np.random.default_rng(seed)
    out: list[int] = []
    t0 = clock()
    with Context(model, n_ctx=n_ctx, threads=threads) as ctx, Batch(min(512, n_ctx)) as batch:
        idx = prefill(ctx, batch, 0, list(prompt_tokens), 0, logits_last=True)
        pos = len(prompt_tokens)
        while len(out) < max_tokens:
            logits = ctx.logits(idx)
            tok = greedy(logits) if sampling.greedy else sample(dist_from_logits(logits, sampling), rng)
            out.append(tok)
            if model.is_eog(tok) or len(out) >= max_tokens:
                break
            batch.clear()
            idx = batch.add(tok, pos, 0, True)
            ctx.decode(batch)
            pos += 1
    return SpecRun(out, AcceptanceStats(), clock() - t0)
