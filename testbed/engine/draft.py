"""The draft worker: one device's draft model and its sequence state (plain Python, no Ray).

``DraftWorker`` holds a llama.cpp context of the draft model with one sequence whose KV cache
holds the accepted prefix. A round is:

1. ``draft(L)``: decode the tokens not yet in the KV cache (the server's last token, and after a
   fully accepted round also the last draft), then sample L tokens one by one, each from the draft
   distribution q (greedy: the argmax; ``ids`` payload: always the argmax; ``topk`` payload: the
   quantized top-k distribution that the payload carries, see payload.py). Returns a ``Draft``
   with the tokens, the payload bytes and the compute time ``draft_s``.
2. The payload goes to the verifier (by Ray, or raw bytes over the data path).
3. ``accept(n_accepted, next_token)``: keeps the accepted drafts, appends the server's token and
   trims the KV cache to the longest prefix still valid with ``llama_memory_seq_rm`` (no
   re-evaluation).

Invariant: the KV cache holds a prefix of ``tokens`` that leaves at least the last token pending,
so the next ``draft`` always has logits to start from. ``catch_up()`` decodes what is pending
but the last, for a device that is not drafting (see agents.DeviceAgent). Drafting stops early at an end-of-generation
token. The clock is injectable for tests.

Vocabulary: the draft's may be up to 128 tokens smaller than the target's (llama.cpp's rule);
a prompt or server token outside it (a padding id the target should never produce) raises a clear
``EngineError`` in ``start`` / ``accept``. Draft tokens the target lacks are the verifier's
concern (rejected there).

Limits: one sequence per worker; the context holds ``n_ctx`` tokens (prompt + output + L).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from testbed.channel import MAX_DRAFT_LEN, MAX_TOP_K
from testbed.engine import payload as pl
from testbed.engine.native import Batch, Context, Model
from testbed.engine.sampling import (Dist, SamplingParams, dist_from_logits, draft_rng, greedy,
                                     sample)
from testbed.errors import EngineError, InputError


@dataclass
class Draft:
    """One round's draft. ``payload`` is exactly what is uploaded; ``dists`` only in topk mode."""

    tokens: list[int]
    payload: bytes
    draft_s: float
    dists: list[Dist] | None = None
    mode: str = "ids"

    @property
    def payload_bytes(self) -> int:
        return len(self.payload)


class DraftWorker:
    """A device's draft model. See the module docstring for the round protocol."""

    def __init__(self, model_path, *, n_ctx: int = 2048, threads: int = 1, seed: int = 0,
                 payload: str = "ids", payload_k: int = 8, sampling: SamplingParams | None = None,
                 clock: Callable[[], float] = time.perf_counter, gpu_layers: int = 0):
        if payload not in pl.MODES:
            raise InputError(f"must be one of {', '.join(pl.MODES)}, got {payload!r}", field="payload")
        if not 1 <= payload_k <= MAX_TOP_K:
            raise InputError(f"must be in 1..{MAX_TOP_K}, got {payload_k}", field="payload_k")
        self.sampling = sampling or SamplingParams()
        self.mode = payload
        self.payload_k = payload_k
        self.clock = clock
        # gpu_layers: draft on a GPU (a Jetson's; needs a llama.cpp built with CUDA there).
        self.model = Model.open(model_path, gpu_layers=gpu_layers)
        self.ctx = Context(self.model, n_ctx=n_ctx, n_seq_max=1, threads=threads)
        self.batch = Batch(min(512, n_ctx))
        self.id_bytes = pl.id_bytes_for(self.model.n_vocab)
        self.rng = draft_rng(seed)
        self.tokens: list[int] = []     # the accepted sequence (prompt + output)
        self._kv: list[int] = []        # tokens whose K/V are in the cache, positions 0..len-1
        self._drafted: list[int] = []   # the last draft, until accept()

    # -- sequence state ---------------------------------------------------------------------

    def start(self, prompt_tokens, *, seed: int | None = None) -> float:
        """Begin a sequence with ``prompt_tokens``; reuses the cached common prefix. Returns the
        prefill time in seconds."""
        if not prompt_tokens:
            raise InputError("the prompt has no tokens", field="prompt")
        self._check_ids(prompt_tokens, "the prompt")
        if seed is not None:
            self.rng = draft_rng(seed)
        t0 = self.clock()
        self.tokens = list(prompt_tokens)
        self._drafted = []
        self._trim_to(self.tokens)
        self._decode_pending(keep_last=True)
        return self.clock() - t0

    def _trim_to(self, tokens: list[int]) -> None:
        """Drop cached positions that are not a prefix of ``tokens[:-1]`` (the last stays pending)."""
        keep = 0
        limit = min(len(self._kv), len(tokens) - 1)
        while keep < limit and self._kv[keep] == tokens[keep]:
            keep += 1
        if keep < len(self._kv):
            self.ctx.seq_rm(0, keep, -1)
            del self._kv[keep:]

    def _decode_pending(self, *, keep_last: bool) -> int | None:
        """Decode the tokens not yet cached (all but the last when ``keep_last``), one decode per
        batch chunk; returns the batch index of the last token's logits when it was decoded."""
        todo = self.tokens[len(self._kv):len(self.tokens) - (1 if keep_last else 0)]
        if len(self.tokens) + 1 > self.ctx.n_ctx:
            raise EngineError(f"draft context full ({self.ctx.n_ctx} tokens)")
        out = None
        for start in range(0, len(todo), self.batch.capacity):
            self.batch.clear()
            for j, tok in enumerate(todo[start:start + self.batch.capacity]):
                want = not keep_last and start + j == len(todo) - 1   # logits only where needed
                idx = self.batch.add(tok, len(self._kv), 0, want)
                out = idx if want else out
                self._kv.append(tok)
            self.ctx.decode(self.batch)
        return out

    def _check_ids(self, tokens, what: str) -> None:
        """The target's tokens must exist in this (draft) vocabulary, which may be up to 128
        tokens smaller (padding rows the target never produces): a clear error, rather than a
        llama_decode failure later with the sequence state half updated."""
        n = self.model.n_vocab
        bad = next((int(t) for t in tokens if not 0 <= int(t) < n), None)
        if bad is not None:
            raise EngineError(f"{what} has token {bad}, outside the draft model's vocabulary of "
                              f"{n} tokens ({self.model.path})")

    # -- one round --------------------------------------------------------------------------

    def draft(self, n_tokens: int) -> Draft:
        """Draft up to ``n_tokens`` tokens (fewer if an end-of-generation token is drafted)."""
        t0 = self.clock()
        if n_tokens < 0 or n_tokens > MAX_DRAFT_LEN:
            raise InputError(f"must be in 0..{MAX_DRAFT_LEN}, got {n_tokens}", field="draft_len")
        if self._drafted:                  # the previous draft was never accepted: drop it
            self._drafted = []
            self._trim_to(self.tokens)
        tokens: list[int] = []
        dists: list[Dist] = []
        quantized = []
        if n_tokens > 0:
            if len(self.tokens) + n_tokens > self.ctx.n_ctx:
                raise EngineError(f"draft context full ({self.ctx.n_ctx} tokens)")
            idx = self._decode_pending(keep_last=False)
            pos = len(self._kv)
            for i in range(n_tokens):
                logits = self.ctx.logits(idx)
                token, q, quant = self._choose(logits)
                tokens.append(token)
                if q is not None:
                    dists.append(q)
                    quantized.append(quant)
                if i == n_tokens - 1 or self.model.is_eog(token):
                    break                  # the last draft is decoded next round if accepted
                self.batch.clear()
                idx = self.batch.add(token, pos, 0, True)
                self.ctx.decode(self.batch)
                self._kv.append(token)
                pos += 1
        self._drafted = tokens
        data = pl.encode(self.mode, tokens, quantized if self.mode == "topk" else None,
                         id_bytes=self.id_bytes)
        return Draft(tokens=tokens, payload=data, draft_s=self.clock() - t0,
                     dists=dists if self.mode == "topk" else None, mode=self.mode)

    def _choose(self, logits):
        """The next draft token, and in topk mode the q it was drawn from (+ its quantized form)."""
        if self.mode == "ids" or self.sampling.greedy:
            token = greedy(logits)
            if self.mode == "ids":
                return token, None, None
            ids, w = np.array([token], dtype=np.int64), np.array([pl.WEIGHT_MAX], dtype=np.uint16)
            return token, Dist.from_weights(ids, w), (ids, w)
        ids, w = pl.quantize_dist(dist_from_logits(logits, self.sampling), self.payload_k)
        q = Dist.from_weights(ids, w)      # exactly the q the verifier will decode
        return sample(q, self.rng), q, (ids, w)

    def greedy_matches(self, prompt_tokens, answer) -> list[bool]:
        """Teacher forcing: for each position i of ``answer`` (the target's greedy answer to
        the prompt), whether this model's greedy next token after ``prompt + answer[:i]`` is
        ``answer[i]``. With greedy decoding on both sides that is exactly what speculative
        decoding accepts: a round that starts at position p with a draft of L tokens accepts
        the run of matches from p, at most L (its draft tokens are these very predictions as
        long as they match). One decode per 512 positions. Leaves the sequence at
        ``prompt + answer`` (a ``start`` follows)."""
        answer = [int(t) for t in answer]
        if not answer:
            return []
        self.start(list(prompt_tokens))
        full = list(prompt_tokens) + answer
        if len(full) + 1 > self.ctx.n_ctx:
            raise EngineError(f"draft context full ({self.ctx.n_ctx} tokens)")
        todo = full[len(self._kv):-1]          # the prompt's last token, then answer[:-1]
        matches: list[bool] = []
        for lo in range(0, len(todo), self.batch.capacity):
            chunk = todo[lo:lo + self.batch.capacity]
            self.batch.clear()
            for tok in chunk:
                self.batch.add(tok, len(self._kv), 0, True)
                self._kv.append(tok)
            self.ctx.decode(self.batch)
            for j in range(len(chunk)):
                matches.append(greedy(self.ctx.logits(j)) == answer[lo + j])
        self.tokens = full
        return matches

    def catch_up(self) -> float:
        """Decode the tokens accepted since the last draft (all but the last, which stays
        pending), so that a device that does not draft for a while is not left with all of
        them to decode when it drafts again; returns the seconds it took."""
        t0 = self.clock()
        if self._drafted:
            self._drafted = []
            self._trim_to(self.tokens)
        self._decode_pending(keep_last=True)
        return self.clock() - t0

    def accept(self, n_accepted: int, next_token: int) -> None:
        """Keep ``n_accepted`` drafted tokens, append the server's ``next_token``, roll the KV
        cache back to what is still valid."""
        if not 0 <= n_accepted <= len(self._drafted):
            raise EngineError(f"accepted {n_accepted} of a {len(self._drafted)}-token draft")
        self._check_ids([next_token], "the server's token")
        self.tokens.extend(self._drafted[:n_accepted])
        self.tokens.append(int(next_token))
        self._drafted = []
        self._trim_to(self.tokens)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()
