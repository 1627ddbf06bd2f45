"""Helpers shared by the model/engine tests: the prepared demo models, and a GGUF token patcher.

``prepared()`` runs ``testbed.inputs.models.prepare()`` once per test process (cached in the models
folder: $TESTBED_MODELS or ~/.cache/testbed/models) and returns {name: path}.
``patch_token_text`` writes a copy of a GGUF whose vocabulary differs in one token's text, by
parsing the GGUF header (v2/v3) and overwriting the token's bytes with a same-length string, so
every offset stays valid and llama.cpp loads the copy as a real, mismatching model.
"""

from __future__ import annotations

import functools
import shutil
import struct
from pathlib import Path

from testbed.inputs import models

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences how a bicycle works.",
]


@functools.lru_cache(maxsize=1)
def prepared() -> dict[str, Path]:
    return {e.name: e.path for e in models.prepare()}


# GGUF value types -> struct format of a scalar (8: string, 9: array handled separately)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _token_text_span(data: bytes, token_id: int) -> tuple[int, int]:
    """Byte range of token ``token_id``'s text inside tokenizer.ggml.tokens of a GGUF header."""
    off = 0

    def take(fmt):
        nonlocal off
        vals = struct.unpack_from("<" + fmt, data, off)
        off += struct.calcsize("<" + fmt)
        return vals[0]

    def string_span():
        nonlocal off
        n = take("Q")
        start = off
        off += n
        return start, off

    def skip_value(vtype):
        nonlocal off
        if vtype == 8:
            string_span()
        elif vtype == 9:
            etype, count = take("I"), take("Q")
            for _ in range(count):
                skip_value(etype)
        else:
            off += struct.calcsize("<" + _SCALARS[vtype])

    assert data[:4] == b"GGUF"
    off = 4
    take("I")                      # version
    take("Q")                      # tensor count
    n_kv = take("Q")
    for _ in range(n_kv):
        ks, ke = string_span()
        vtype = take("I")
        if data[ks:ke] == b"tokenizer.ggml.tokens":
            etype, count = take("I"), take("Q")
            assert vtype == 9 and etype == 8 and token_id < count
            for i in range(count):
                span = string_span()
                if i == token_id:
                    return span
        skip_value(vtype)
    raise AssertionError("no tokenizer.ggml.tokens in this GGUF")


def patch_token_text(src: Path, dst: Path, token_id: int) -> tuple[bytes, bytes]:
    """Copy ``src`` to ``dst`` with token ``token_id``'s text changed (same length).

    Returns (old text, new text).
    """
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as fh:
        head = fh.read(8 << 20)    # the metadata of these models fits in the first 8 MiB
        start, end = _token_text_span(head, token_id)
        old = head[start:end]
        last = old[-1:]
        new = old[:-1] + (b"q" if last != b"q" else b"z")
        fh.seek(start)
        fh.write(new)
    return old, new
