"""The channel: the shared uplink band and the drafts' payload format, and their limits.

``Channel`` is plain data (band, header and payload bits, payload kind, top-k, draft-length
limits). ``parse_channel(section, base)`` is its one parser: the inventory's ``channel:`` section
(``base`` None: every key has its default) and an experiment's ``channel:`` override (``base``:
the inventory's channel; only the keys given change). ``MAX_DRAFT_LEN`` and ``MAX_TOP_K`` are the
one set of limits, used by the inventory, the experiment, the controller's problem files and the
engine's draft worker, so a value that validates also runs.

Limits: the payload format carries at most 255 tokens and 255 probabilities per token
(``engine/payload.py``); these limits stay within it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from testbed.yamlio import Section

MAX_DRAFT_LEN = 64      # tokens per draft; longer drafts are never worth their upload here
MAX_TOP_K = 255         # draft probabilities per token in a ``topk`` payload (a u8 count)
PAYLOADS = ("ids", "topk")


@dataclass(frozen=True)
class Channel:
    """The shared uplink band and the payload format of drafts."""

    bandwidth_hz: float
    header_bits: int = 512
    payload: str = "ids"           # "ids" (greedy: token ids) | "topk" (sampling: top-k dists)
    top_k: int = 8
    max_draft_len: int = 8
    baseline_draft_len: int = 4
    bits_per_draft_token: int | None = None  # None: measured by the profiler


# Sane upper bounds: far above any real band or frame, low enough that the arithmetic stays finite.
MAX_BANDWIDTH_HZ = 1e12          # 1 THz
MAX_BITS = 10**9                 # per upload or per token


def parse_channel(sec: Section, base: Channel | None = None) -> Channel:
    """The channel in ``sec`` (errors name its file, line and field). Without ``base`` the band
    is required and the rest has defaults; with ``base`` every key is optional and overrides it.
    """
    over: dict = {}
    if base is None or sec.has("bandwidth_hz"):
        over["bandwidth_hz"] = sec.number("bandwidth_hz", min=0, min_exclusive=True,
                                          max=MAX_BANDWIDTH_HZ)
    for key, lo, hi in (("header_bits", 0, MAX_BITS), ("top_k", 1, MAX_TOP_K),
                        ("max_draft_len", 1, MAX_DRAFT_LEN),
                        ("bits_per_draft_token", 1, MAX_BITS)):
        if sec.has(key):
            over[key] = sec.integer(key, min=lo, max=hi)
    lmax = over.get("max_draft_len", (base or Channel).max_draft_len)
    if sec.has("baseline_draft_len"):
        over["baseline_draft_len"] = sec.integer("baseline_draft_len", min=1, max=lmax)
    elif base is None:
        over["baseline_draft_len"] = min(Channel.baseline_draft_len, lmax)
    if sec.has("payload"):
        over["payload"] = sec.str("payload", choices=PAYLOADS)
    sec.done()
    channel = Channel(**over) if base is None else dataclasses.replace(base, **over)
    if channel.baseline_draft_len > channel.max_draft_len:     # an override lowered the max
        raise sec.error("max_draft_len", f"baseline_draft_len {channel.baseline_draft_len} "
                        f"exceeds max_draft_len {channel.max_draft_len}")
    return channel
