"""Token distributions from logits: temperature, top-k, top-p, and sampling from them.

This is THE definition of "what a target-only run samples": ``SamplingParams`` applied to a logits
vector by ``dist_from_logits`` gives the distribution a plain (non-speculative) run draws its next
token from, and the verifier applies the very same function to the target's logits, so the
speculative output is distributed exactly as a target-only run's.

Main types: ``SamplingParams`` (temperature 0 = greedy), ``Dist`` (a sparse distribution: token
ids and float64 probabilities, sorted by decreasing probability); functions ``dist_from_logits``,
``greedy``, ``sample``, and ``draft_rng`` / ``verify_rng``, the random streams of the two sides
(independent of each other for any seeds).

Order of operations (as in llama.cpp's common sampler chain): top-k on the logits, temperature,
softmax, then top-p (the smallest prefix of the sorted tokens whose mass reaches top_p), renormalise.
Limits: no repetition penalties, min-p or typical sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0``: greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0          # 0: no top-k
    top_p: float = 1.0      # 1: no top-p

    def __post_init__(self):
        if not self.temperature >= 0:
            raise InputError(f"must be >= 0, got {self.temperature}", field="temperature")
        if self.top_k < 0:
            raise InputError(f"must be >= 0, got {self.top_k}", field="top_k")
        if not 0 < self.top_p <= 1:
            raise InputError(f"must be in (0, 1], got {self.top_p}", field="top_p")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Dist:
    """A sparse distribution over token ids: ``ids`` (int64) with ``probs`` (float64, sum 1).

    Sorted by decreasing probability. Tokens not listed have probability 0.
    """

    ids: np.ndarray
    probs: np.ndarray

    def prob(self, token: int) -> float:
        hit = np.flatnonzero(self.ids == token)
        return float(self.probs[hit[0]]) if hit.size else 0.0

    def on(self, support: np.ndarray) -> np.ndarray:
        """Probabilities of the (sorted, unique) token ids ``support``, 0 where not listed."""
        out = np.zeros(len(support), dtype=np.float64)
        pos = np.searchsorted(support, self.ids)
        out[pos] = self.probs
        return out

    @classmethod
    def from_weights(cls, ids, weights) -> "Dist":
        """Normalise non-negative weights; used on both sides of a payload so both see one q."""
        w = np.asarray(weights, dtype=np.float64)
        return cls(np.asarray(ids, dtype=np.int64), w / w.sum())

    @classmethod
    def one_hot(cls, token: int) -> "Dist":
        return cls(np.array([token], dtype=np.int64), np.array([1.0]))


# Random streams are domain-separated by role: the draft's and the verifier's draws must be
# independent even when both are given the same seed (numpy's SeedSequence treats [s] and [s, 0]
# alike, so "seed" and "[seed, seq]" would give one and the same stream, which biases the rule).
_ROLE_DRAFT = 0x44524654     # "DRFT"
_ROLE_VERIFY = 0x56524659    # "VRFY"


def draft_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([_ROLE_DRAFT, seed])


def verify_rng(seed: int, seq: int) -> np.random.Generator:
    return np.random.default_rng([_ROLE_VERIFY, seed, seq])


def greedy(logits: np.ndarray) -> int:
    """The argmax token (the first one on ties)."""
    return int(np.argmax(logits))


def dist_from_logits(logits: np.ndarray, params: SamplingParams) -> Dist:
    """The distribution a run with ``params`` samples from (one-hot on the argmax when greedy)."""
    if params.greedy:
        return Dist.one_hot(greedy(logits))
    z = np.asarray(logits, dtype=np.float64)
    n = z.shape[0]
    if 0 < params.top_k < n:
        ids = np.argpartition(-z, params.top_k - 1)[:params.top_k]
    else:
        ids = np.arange(n)
    zz = z[ids] / params.temperature
    order = np.argsort(-zz, kind="stable")
    ids, zz = ids[order], zz[order]
    p = np.exp(zz - zz[0])
    p /= p.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1
        ids, p = ids[:keep], p[:keep] / p[:keep].sum()
    return Dist(ids.astype(np.int64), p)


def sample(dist: Dist, rng: np.random.Generator) -> int:
    """One token drawn from ``dist`` (inverse CDF with one uniform draw)."""
    if dist.ids.size == 1:
        return int(dist.ids[0])
    c = np.cumsum(dist.probs)
    j = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    return int(dist.ids[min(j, dist.ids.size - 1)])
