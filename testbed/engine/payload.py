"""Draft payloads: the bytes a device uploads to the server for one round.

``encode`` / ``decode`` are exact inverses; ``len(encode(...))`` is the byte count that goes on the
wire for the draft itself (the data path adds its own framing on top and counts it separately).

Format (little-endian), version 1::

    header   u8 version=1 | u8 mode (0 ids, 1 topk) | u8 id_bytes (2 or 4) | u8 n_tokens L
    ids      L x token id (id_bytes each)                                    -> 4 + L*id_bytes
    topk     per token: u8 n_entries m | u8 index of the drafted token among the entries
                        | m x token id (id_bytes) | m x u16 weight         -> 4 + L*(2 + m*(id_bytes+2))

``ids`` carries the drafted tokens only: exact for greedy verification, and for sampling when the
draft is deterministic (q is one-hot). ``topk`` carries each token's draft distribution restricted
to its k most likely tokens, quantized to u16 weights scaled so the largest is 65535. The draft
distribution q is DEFINED as the renormalised weights (``Dist.from_weights``): the drafter samples
from that quantized q and the verifier reconstructs the identical q from the same integers, so the
speculative-sampling rule stays exact. With a 49152-token vocabulary ids take 2 bytes: ids mode is
16 bits per draft token, topk with k=8 is 272 bits per draft token (plus the 4-byte header).

Limits: at most 255 tokens per draft and k <= 255.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from testbed.engine.sampling import Dist
from testbed.errors import EngineError

VERSION = 1
MODES = ("ids", "topk")
_HEADER = struct.Struct("<BBBB")
WEIGHT_MAX = 65535


@dataclass(frozen=True)
class DraftPayload:
    """A decoded payload: the drafted tokens and, in topk mode, each token's q (else None)."""

    mode: str
    tokens: tuple[int, ...]
    dists: tuple[Dist, ...] | None = None


def id_bytes_for(n_vocab: int) -> int:
    return 2 if n_vocab <= 1 << 16 else 4


def quantize_dist(dist: Dist, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``dist`` as (ids, u16 weights), the largest weight 65535, zero weights dropped."""
    ids, probs = dist.ids[:k], dist.probs[:k]   # Dist is sorted by decreasing probability
    w = np.rint(probs / probs[0] * WEIGHT_MAX).astype(np.uint16)
    keep = w > 0
    return ids[keep].astype(np.int64), w[keep]


def encode(mode: str, tokens, quantized=None, *, id_bytes: int = 2) -> bytes:
    """Bytes of one draft. ``quantized[i]`` = (ids, weights) from ``quantize_dist`` in topk mode."""
    if mode not in MODES:
        raise ValueError(f"unknown payload mode {mode!r}")
    if len(tokens) > 255:
        raise ValueError("at most 255 draft tokens per payload")
    idc = "H" if id_bytes == 2 else "I"
    out = bytearray(_HEADER.pack(VERSION, MODES.index(mode), id_bytes, len(tokens)))
    if mode == "ids":
        out += struct.pack(f"<{len(tokens)}{idc}", *tokens)
        return bytes(out)
    for token, (ids, weights) in zip(tokens, quantized, strict=True):
        m = len(ids)
        hits = np.flatnonzero(ids == token)
        if not hits.size or m > 255:
            raise ValueError(f"token {token} not among its {m} payload entries")
        out += struct.pack("<BB", m, int(hits[0]))
        out += struct.pack(f"<{m}{idc}", *(int(i) for i in ids))
        out += struct.pack(f"<{m}H", *(int(w) for w in weights))
    return bytes(out)


def decode(data: bytes) -> DraftPayload:
    """Parse a payload; EngineError if it is malformed (a corrupted upload)."""
    try:
        version, mode_i, id_bytes, n = _HEADER.unpack_from(data, 0)
        if version != VERSION or mode_i >= len(MODES) or id_bytes not in (2, 4):
            raise ValueError(f"bad header (version {version}, mode {mode_i}, id bytes {id_bytes})")
        idc = "H" if id_bytes == 2 else "I"
        off = _HEADER.size
        if MODES[mode_i] == "ids":
            tokens = struct.unpack_from(f"<{n}{idc}", data, off)
            off += n * id_bytes
            dists = None
        else:
            tokens, dists = [], []
            for _ in range(n):
                m, chosen = struct.unpack_from("<BB", data, off)
                off += 2
                ids = np.array(struct.unpack_from(f"<{m}{idc}", data, off), dtype=np.int64)
                off += m * id_bytes
                w = np.array(struct.unpack_from(f"<{m}H", data, off), dtype=np.uint16)
                off += 2 * m
                if not 0 <= chosen < m or w[chosen] == 0:
                    raise ValueError("drafted token has no weight")
                tokens.append(int(ids[chosen]))
                dists.append(Dist.from_weights(ids, w))
            tokens, dists = tuple(tokens), tuple(dists)
        if off != len(data):
            raise ValueError(f"{len(data) - off} trailing bytes")
    except (struct.error, ValueError) as exc:
        raise EngineError(f"malformed draft payload ({len(data)} bytes): {exc}") from None
    return DraftPayload(MODES[mode_i], tuple(int(t) for t in tokens), dists)
