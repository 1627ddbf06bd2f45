"""Acceptance rules: which drafted tokens the target keeps, and the token it adds.

Both rules see the draft tokens d_0..d_{L-1} and the target's distribution at each of the L + 1
positions (p_i is the target's next-token distribution after the accepted prefix and d_0..d_{i-1}).
They return ``(n_accepted, next_token)``. Invariant: at least one token is always produced (the
next token), so every round makes progress even when all drafts are rejected.

- ``accept_greedy``: the longest prefix of the draft equal to the target's argmax, then the
  target's argmax after it. The output equals target-only greedy decoding token for token.
- ``accept_sampling``: standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023).
  Token d_i drawn from q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); on the first
  rejection the next token is drawn from the residual norm(max(0, p_i - q_i)); if all L are
  accepted a bonus token is drawn from p_L. Each emitted token is then distributed exactly as p,
  for ANY q whose support contains the drafted token (a deterministic draft is q = one-hot).

The target distributions are passed lazily (``p_at(i)``) so positions after the first rejection
are never computed. Pure functions: no llama.cpp, no I/O.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from testbed.engine.sampling import Dist, sample


def accept_greedy(draft: Sequence[int], argmax_at: Callable[[int], int]) -> tuple[int, int]:
    """Longest agreeing prefix plus the target's own next token. ``argmax_at(i)``, i in 0..L."""
    n = 0
    while n < len(draft):
        target = argmax_at(n)
        if draft[n] != target:
            return n, target          # the target's token replaces the first wrong draft
        n += 1
    return n, argmax_at(n)            # all accepted: the bonus token


def accept_sampling(draft: Sequence[int], q: Sequence[Dist], p_at: Callable[[int], Dist],
                    rng: np.random.Generator) -> tuple[int, int]:
    """Speculative sampling. ``q[i]``: the draft's distribution d_i was drawn from."""
    for i, token in enumerate(draft):
        p = p_at(i)
        p_x, q_x = p.prob(token), q[i].prob(token)
        if q_x <= 0:
            raise ValueError(f"draft token {token} at position {i} has q = 0: not drawn from q")
        # accept with probability min(1, p_x / q_x): u < p_x / q_x with u ~ U[0, 1)
        if rng.random() * q_x < p_x:
            continue
        return i, sample(residual(p, q[i]), rng)
    return len(draft), sample(p_at(len(draft)), rng)


def residual(p: Dist, q: Dist) -> Dist:
    """norm(max(0, p - q)). Falls back to p if p <= q everywhere (only by rounding: then a
    rejection has probability 0)."""
    support = np.union1d(p.ids, q.ids)
    r = np.maximum(p.on(support) - q.on(support), 0.0)
    total = r.sum()
    if total <= 0:
        return p
    keep = r > 0
    ids, probs = support[keep], r[keep] / total
    order = np.argsort(-probs, kind="stable")
    return Dist(ids[order], probs[order])
