"""The verifier: the server's target model checking every device's draft in ONE forward pass.

``Verifier`` holds one llama.cpp context of the target model in which every device is a sequence
(``n_seq_max`` of them, one unified KV cache). Per sequence it keeps the accepted tokens; the KV
cache always holds all of them but the last (which is "pending", as in llama.cpp's speculative
example). ``verify({seq: payload})`` runs one round for all the devices given:

1. Build ONE batch: for each sequence ``[last, d0, ..., d(L-1)]`` at consecutive positions
   ``n, n+1, ..., n+L`` of that sequence, logits requested for exactly those tokens (the prompt
   prefill requests none).
2. ``llama_decode`` once (``n_decodes`` counts the calls, so tests can assert one per round).
3. Per sequence, the acceptance rule (accept.py): greedy, or speculative sampling with the target
   distribution of sampling.py and the device's q from its payload. At least one token is always
   produced. Each sequence has its own random generator, so a device's result does not depend on
   which other devices share the batch.
4. Roll back each sequence's rejected positions with ``llama_memory_seq_rm``; the new pending
   token is the one the target produced.

Vocabulary sizes: a draft model may have up to 128 tokens more or fewer than the target (as
llama.cpp's speculative decoding allows: padding rows, e.g. Qwen2.5-7B's 152064 against 0.5B's
151936). A draft token id the target does not have can never be the target's token: it is
rejected like any wrong draft (greedy: it is not the argmax; sampling: p = 0 there, and the
residual norm(max(0, p - q)) only has the target's ids), the drafts after it are dropped, and
none of them is decoded. ``n_drafted`` still counts them all.

Timing: ``compute_s`` is the real duration of the step. With an emulation profile
(``inventory.Emulation``, emulated lab only) the step is made to last
``max(compute_s, verify_base_s + verify_per_token_s * n_tokens)`` by sleeping the remainder, where
``n_tokens`` is the number of tokens in the batch (sum of L + 1 over the sequences); both durations
are returned. The clock and the sleep are injectable.

GPU: ``gpu_layers`` (0: none, -1: all) offloads the target to a GPU when llama.cpp was built with
a GPU backend (docs/gpu-server.md has what was measured on one). The greedy verdicts then still
follow the target's argmax, but GPU kernels need not give bit-identical logits across batch
shapes, so a near-tie can resolve differently than in a one-sequence decode.

Limits: sequence ids are 0..n_seq_max-1; the unified cache holds ``n_ctx`` tokens per sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from testbed.engine import payload as pl
from testbed.engine.accept import accept_greedy, accept_sampling
from testbed.engine.native import Batch, Context, Model
from testbed.engine.sampling import Dist, SamplingParams, dist_from_logits, greedy, verify_rng
from testbed.errors import EngineError, InputError


@dataclass(frozen=True)
class SeqResult:
    """One device's outcome of a round. ``tokens`` = accepted drafts + the target's token."""

    seq: int
    n_drafted: int
    n_accepted: int
    next_token: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class VerifyResult:
    """One round for all devices: per-sequence results and the step's timing."""

    results: dict[int, SeqResult]
    n_tokens: int             # tokens in the batch
    n_decodes: int            # llama_decode calls of this step (1, or 0 for an empty round)
    decode_s: float           # the llama_decode call alone
    compute_s: float          # the whole real step (batch, decode, acceptance, rollback)
    emulated_s: float | None  # max(compute_s, base + per_token * n_tokens); None without emulation

    @property
    def step_s(self) -> float:
        """How long the step lasted for the caller."""
        return self.compute_s if self.emulated_s is None else self.emulated_s


class _Seq:
    def __init__(self, rng: np.random.Generator, sampling: SamplingParams):
        self.tokens: list[int] = []
        self.kv: list[int] = []
        self.rng = rng
        self.sampling = sampling


class Verifier:
    """The target model serving ``n_seq_max`` device sequences. See the module docstring."""

    def __init__(self, model_path, *, n_seq_max: int = 8, n_ctx: int = 2048, threads: int = 2,
                 seed: int = 0, sampling: SamplingParams | None = None, emulation=None,
                 max_draft_len: int = 16, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep, gpu_layers: int = 0):
        if n_seq_max < 1:
            raise InputError(f"must be >= 1, got {n_seq_max}", field="n_seq_max")
        self.sampling = sampling or SamplingParams()
        self.emulation = emulation
        self.seed = seed
        self.clock, self.sleep = clock, sleep
        self.n_ctx_seq = n_ctx
        self.model = Model.open(model_path, gpu_layers=gpu_layers)
        self.ctx = Context(self.model, n_ctx=n_ctx * n_seq_max, n_seq_max=n_seq_max,
                           threads=threads, n_batch=max(512, n_seq_max * (max_draft_len + 1)))
        self.batch = Batch(self.ctx.n_batch)
        self._seqs: dict[int, _Seq] = {}

    @property
    def n_decodes(self) -> int:
        """llama_decode calls made so far (prefills included)."""
        return self.ctx.n_decodes

    def tokens(self, seq: int) -> list[int]:
        return list(self._seq(seq).tokens)

    def _seq(self, seq: int) -> _Seq:
        try:
            return self._seqs[seq]
        except KeyError:
            raise EngineError(f"sequence {seq} was not added") from None

    # -- sequences --------------------------------------------------------------------------

    def add_sequence(self, seq: int, prompt_tokens, *, seed: int | None = None,
                     sampling: SamplingParams | None = None) -> float:
        """Start (or restart) sequence ``seq`` with a prompt; the cached common prefix is reused.
        ``seed`` / ``sampling`` override the verifier's for this sequence. Returns the prefill
        time in seconds."""
        if not 0 <= seq < self.ctx.n_seq_max:
            raise InputError(f"must be in 0..{self.ctx.n_seq_max - 1}, got {seq}", field="seq")
        if not prompt_tokens:
            raise InputError("the prompt has no tokens", field="prompt")
        if len(prompt_tokens) >= self.n_ctx_seq:
            raise InputError(f"{len(prompt_tokens)} tokens do not fit n_ctx={self.n_ctx_seq}",
                             field="prompt")
        t0 = self.clock()
        old = self._seqs.get(seq)
        rng = verify_rng(self.seed if seed is None else seed, seq)
        st = _Seq(rng, sampling or self.sampling)
        st.tokens = list(prompt_tokens)
        if old is not None:
            st.kv = old.kv
        self._seqs[seq] = st
        self._trim(seq, st)
        todo = st.tokens[len(st.kv):-1]
        for start in range(0, len(todo), self.batch.capacity):
            self.batch.clear()
            for tok in todo[start:start + self.batch.capacity]:
                self.batch.add(tok, len(st.kv), seq, False)
                st.kv.append(tok)
            self.ctx.decode(self.batch)
        return self.clock() - t0

    def remove_sequence(self, seq: int) -> None:
        if seq in self._seqs:
            self.ctx.seq_rm(seq, 0, -1)
            del self._seqs[seq]

    def _trim(self, seq: int, st: _Seq) -> None:
        """Keep the longest cached prefix of tokens[:-1]; the last token stays pending."""
        keep, limit = 0, min(len(st.kv), len(st.tokens) - 1)
        while keep < limit and st.kv[keep] == st.tokens[keep]:
            keep += 1
        if keep < len(st.kv):
            self.ctx.seq_rm(seq, keep, -1)
            del st.kv[keep:]

    # -- one round --------------------------------------------------------------------------

    def verify(self, drafts: Mapping[int, "bytes | pl.DraftPayload"]) -> VerifyResult:
        """Verify one round: ``drafts`` maps a sequence to its payload bytes (or decoded payload).
        An empty draft is allowed: the target then just produces that sequence's next token."""
        t0 = self.clock()
        plan = []
        self.batch.clear()
        for seq, data in drafts.items():
            st = self._seq(seq)
            d = pl.decode(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
            # A draft model may have up to 128 tokens more than the target (padding rows, as
            # llama.cpp allows): a draft token the target does not have is one it can never
            # produce, so it is rejected (p = 0), never decoded. Only the drafts before it
            # go into the batch; acceptance stops at it (see the module docstring).
            n_in = next((j for j, t in enumerate(d.tokens) if not 0 <= t < self.model.n_vocab),
                        len(d.tokens))
            if len(st.tokens) + len(d.tokens) > self.n_ctx_seq:
                raise EngineError(f"sequence {seq} would exceed n_ctx={self.n_ctx_seq}")
            if self.batch.n + n_in + 1 > self.batch.capacity:
                raise EngineError(f"round of {self.batch.n + n_in + 1}+ tokens exceeds "
                                  f"the batch capacity {self.batch.capacity}")
            pos = len(st.tokens) - 1           # position of the pending token
            first = self.batch.add(st.tokens[-1], pos, seq, True)
            for j, tok in enumerate(d.tokens[:n_in]):
                self.batch.add(tok, pos + 1 + j, seq, True)
            plan.append((seq, st, d, first, n_in))
        n_tokens = self.batch.n
        decodes_before = self.ctx.n_decodes
        t_dec = self.clock()
        self.ctx.decode(self.batch)            # ONE llama_decode for every device of the round
        decode_s = self.clock() - t_dec
        results = {}
        for seq, st, d, first, n_in in plan:
            n, nxt = self._accept(st, d, first, n_in)
            # KV now holds tokens[:-1] + [last] + the drafts decoded: keep the accepted ones.
            st.kv.append(st.tokens[-1])
            st.kv.extend(d.tokens[:n_in])
            st.tokens.extend(d.tokens[:n])
            st.tokens.append(nxt)
            self._trim(seq, st)
            results[seq] = SeqResult(seq, len(d.tokens), n, nxt, tuple(d.tokens[:n]) + (nxt,))
        compute_s = self.clock() - t0
        emulated_s = None
        if self.emulation is not None:
            emulated_s = max(compute_s, self.emulation.verify_base_s
                             + self.emulation.verify_per_token_s * n_tokens)
            remaining = emulated_s - (self.clock() - t0)
            if remaining > 0:
                self.sleep(remaining)          # the emulation: pad to the emulated duration
        return VerifyResult(results, n_tokens, self.ctx.n_decodes - decodes_before, decode_s,
                            compute_s, emulated_s)

    def greedy_answers(self, prompts, max_tokens: int) -> list[list[int]]:
        """The target's greedy answer to each prompt (token lists): at most ``max_tokens``
        tokens, ending early at an end-of-generation token. ``n_seq_max`` prompts at a time,
        one decode per step, no emulated duration (these are not rounds). The profiler's
        reference answers for teacher-forced acceptance (``DraftWorker.greedy_matches``).
        Restarts sequences 0..n_seq_max-1: their previous contents are gone."""
        if max_tokens < 1:
            raise InputError(f"must be >= 1, got {max_tokens}", field="max_tokens")
        prompts = [list(p) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        width = self.ctx.n_seq_max
        for lo in range(0, len(prompts), width):
            chunk = list(range(lo, min(len(prompts), lo + width)))
            live = []
            for seq, i in enumerate(chunk):
                if len(prompts[i]) + max_tokens > self.n_ctx_seq:
                    raise InputError(f"prompt {i}: {len(prompts[i])} + {max_tokens} tokens do "
                                     f"not fit n_ctx={self.n_ctx_seq}", field="max_tokens")
                self.add_sequence(seq, prompts[i], sampling=SamplingParams())
                live.append((seq, i))
            while live:
                self.batch.clear()
                index = {}
                for seq, i in live:
                    st = self._seqs[seq]
                    index[seq] = self.batch.add(st.tokens[-1], len(st.tokens) - 1, seq, True)
                self.ctx.decode(self.batch)
                still = []
                for seq, i in live:
                    st = self._seqs[seq]
                    tok = greedy(self.ctx.logits(index[seq]))
                    st.kv.append(st.tokens[-1])
                    st.tokens.append(tok)
                    out[i].append(tok)
                    if len(out[i]) < max_tokens and not self.model.is_eog(tok):
                        still.append((seq, i))
                live = still
        return out

    def _accept(self, st: _Seq, d: pl.DraftPayload, first: int, n_in: int) -> tuple[int, int]:
        """Acceptance over the drafts up to the first one outside the target's vocabulary
        (``n_in``: the drafts before it, decoded). That one is rejected by either rule (the
        target's argmax, or p, never has it), with the target's logits at its position, which
        the batch has; the drafts after it are never looked at."""
        tokens = list(d.tokens[:n_in + 1])
        if st.sampling.greedy:
            return accept_greedy(tokens, lambda i: greedy(self.ctx.logits(first + i)))
        q = d.dists if d.dists is not None else [Dist.one_hot(t) for t in d.tokens]
        return accept_sampling(tokens, q[:len(tokens)],
                               lambda i: dist_from_logits(self.ctx.logits(first + i), st.sampling),
                               st.rng)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()
