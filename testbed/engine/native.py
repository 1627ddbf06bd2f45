"""Thin, owned wrapper over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Everything that touches a raw llama.cpp pointer lives here, so that the lifetimes are visible:

- ``Model``: a loaded GGUF (weights mmapped) and its vocabulary: tokenize, detokenize, token texts,
  end-of-generation test, vocabulary type (``vocab_type_name``), BOS/EOS ids and whether the
  tokenizer adds them (``bos``, ``eos``, ``add_bos``, ``add_eos``), the chat template stored in the
  GGUF (``chat_template()``) and other metadata (``meta``). ``Model.open(path, vocab_only=True)``
  reads only the vocabulary (and the metadata).
- ``Context``: one llama.cpp context over a model, with ``n_seq_max`` sequences sharing one unified
  KV cache; ``decode(batch)`` (counted in ``n_decodes``), ``logits(i)``, ``seq_rm`` (KV rollback).
- ``Batch``: a reusable ``llama_batch`` with ``add(token, pos, seq, logits)``.

- ``prefill(ctx, batch, seq, tokens, pos0)``: decode a prompt in batch-sized chunks.

All three are context managers and also free their memory in ``close()``; a Context keeps its Model
alive. Contexts run with flash attention ON, which makes a sequence's logits independent of how it
is batched (see ``Context``). llama.cpp's own log output is silenced (``quiet()``); its last
warnings and errors are kept and ``last_log()`` returns the first of them, so a failed load can say
why (``ModelFileError`` names the file).

Limits: CPU only (no GPU offload is requested); one token belongs to exactly one sequence.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
from pathlib import Path

import llama_cpp as C
import numpy as np

from testbed.errors import EngineError, ModelFileError

# llama.cpp's rule for a draft model's vocabulary (common/speculative.cpp,
# common_speculative_are_compatible): sizes may differ by this many tokens (padding rows, e.g.
# Qwen2.5-7B's 152064 against 0.5B's 151936), and token texts are compared from this id on.
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START = 5
_LOG_KEEP = 20
_log_lines: collections.deque[str] = collections.deque(maxlen=_LOG_KEEP)
_init_lock = threading.Lock()
_initialised = False


_WARN, _ERROR = 3, 4   # enum ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 cont


@C.llama_log_callback
def _log_callback(level: int, text: bytes, user_data) -> None:  # pragma: no cover - C callback
    if level in (_WARN, _ERROR) and text:
        _log_lines.append(text.decode("utf-8", "replace").strip())


def quiet() -> None:
    """Initialise the llama.cpp backend once and route its log output into a small ring buffer."""
    global _initialised
    with _init_lock:
        C.llama_log_set(_log_callback, ctypes.c_void_p(0))
        if not _initialised:
            C.llama_backend_init()
            _initialised = True


def last_log() -> str:
    """The first of the most recent llama.cpp warnings/errors (the cause; empty if none)."""
    lines = [line for line in _log_lines if line]
    return lines[0] if lines else ""


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Raise ModelFileError unless ``path`` is a readable file that starts with the GGUF magic."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError("model file does not exist", source=str(p))
    if not p.is_file():
        raise ModelFileError("not a regular file", source=str(p))
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read: {exc.strerror}", source=str(p)) from None
    if magic != b"GGUF":
        raise ModelFileError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')", source=str(p))
    return p


class _Owned:
    """A holder of llama.cpp memory: ``close()`` frees it; a context manager; freed on garbage
    collection too, where a failure (at interpreter exit, llama_cpp may already be torn down)
    can only be logged."""

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - nothing to raise to from a finaliser
            logging.getLogger(__name__).debug("freeing a %s failed: %s", type(self).__name__,
                                              exc)


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU (CUDA, Metal, Vulkan...)."""
    return bool(C.llama_supports_gpu_offload())


# enum llama_vocab_type
VOCAB_TYPE_NAMES = {C.LLAMA_VOCAB_TYPE_NONE: "none", C.LLAMA_VOCAB_TYPE_SPM: "SPM",
                    C.LLAMA_VOCAB_TYPE_BPE: "BPE", C.LLAMA_VOCAB_TYPE_WPM: "WPM",
                    C.LLAMA_VOCAB_TYPE_UGM: "UGM", C.LLAMA_VOCAB_TYPE_RWKV: "RWKV",
                    C.LLAMA_VOCAB_TYPE_PLAMO2: "PLAMO2"}


def vocab_type_name(vocab_type: int) -> str:
    """``BPE``, ``SPM``... for a llama_vocab_type value (``type N`` for one unknown here)."""
    return VOCAB_TYPE_NAMES.get(int(vocab_type), f"type {int(vocab_type)}")


class Model(_Owned):
    """A loaded GGUF model (or only its vocabulary). Free with ``close()``.

    ``bos`` / ``eos``: the BOS / EOS token ids (-1: none); ``add_bos`` / ``add_eos``: whether
    ``tokenize(add_special=True)`` adds them."""

    def __init__(self, path: Path, ptr, vocab_only: bool):
        self.path = path
        self._ptr = ptr
        self.vocab_only = vocab_only
        self._vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = int(C.llama_vocab_n_tokens(self._vocab))
        self.vocab_type = int(C.llama_vocab_type(self._vocab))
        self.bos = int(C.llama_vocab_bos(self._vocab))
        self.eos = int(C.llama_vocab_eos(self._vocab))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self._vocab))
        self.add_eos = bool(C.llama_vocab_get_add_eos(self._vocab))

    @classmethod
    def open(cls, path: str | os.PathLike, *, vocab_only: bool = False,
             gpu_layers: int = 0) -> "Model":
        """``gpu_layers``: layers to offload to a GPU (0: none, -1: all); needs a llama.cpp
        built with a GPU backend (``gpu_offload_supported()``)."""
        p = check_gguf_file(path)
        quiet()
        if gpu_layers and not vocab_only and not gpu_offload_supported():
            raise EngineError(
                f"gpu_layers is {gpu_layers} but this llama-cpp-python has no GPU backend: "
                "reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\" (docs/real-lab.md)")
        params = C.llama_model_default_params()
        params.n_gpu_layers = 0 if vocab_only else gpu_layers
        params.vocab_only = vocab_only
        _log_lines.clear()
        ptr = C.llama_model_load_from_file(str(p).encode(), params)
        if not ptr:
            why = last_log() or "llama.cpp could not load it"
            raise ModelFileError(f"corrupt or unsupported GGUF: {why}", source=str(p))
        return cls(p, ptr, vocab_only)

    @property
    def ptr(self):
        if self._ptr is None:
            raise EngineError(f"model {self.path} is closed")
        return self._ptr

    @property
    def ftype(self) -> int:
        return int(C.llama_model_ftype(self.ptr))

    @property
    def vocab_type_name(self) -> str:
        return vocab_type_name(self.vocab_type)

    def token_text(self, token: int) -> bytes:
        return C.llama_vocab_get_text(self._vocab, token) or b""

    def chat_template(self) -> str | None:
        """The default chat template stored in the GGUF (``tokenizer.chat_template``, a Jinja
        template as Hugging Face tokenizers have it); None when the file has none."""
        raw = C.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", "replace") if raw else None

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (``general.name``...); None when the key is absent."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n tokens needed
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise EngineError(f"tokenization failed for {self.path}")
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", "replace")

    def close(self) -> None:
        if self._ptr is not None:
            C.llama_model_free(self._ptr)
            self._ptr = None



class Batch(_Owned):
    """A reusable llama_batch of at most ``capacity`` tokens, one sequence id per token."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._b = C.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index in the batch (the index for ``Context.logits``)."""
        if self.n >= self.capacity:
            raise EngineError(f"batch full ({self.capacity} tokens)")
        i = self.n
        b = self._b
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = 1 if logits else 0
        self.n += 1
        return i

    @property
    def raw(self):
        self._b.n_tokens = self.n
        return self._b

    def close(self) -> None:
        if self._b is not None:
            C.llama_batch_free(self._b)
            self._b = None



def flash_attn_type(enabled: bool) -> int:
    return C.LLAMA_FLASH_ATTN_TYPE_ENABLED if enabled else C.LLAMA_FLASH_ATTN_TYPE_DISABLED


class Context(_Owned):
    """A llama.cpp context: ``n_seq_max`` sequences in one unified KV cache of ``n_ctx`` cells."""

    def __init__(self, model: Model, *, n_ctx: int, n_seq_max: int = 1, threads: int = 1,
                 n_batch: int = 512, flash_attn: bool = True):
        if model.vocab_only:
            raise EngineError(f"{model.path}: a vocabulary-only model cannot run")
        self.model = model
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = True   # all sequences share one KV buffer of n_ctx cells
        # Flash attention on (not "auto"): with it a sequence's logits are bit-identical whether
        # its tokens are decoded one at a time, as a draft batch, or next to other sequences
        # (measured on CPU). Without it, single-token and batched logits of SmolLM2 differed by
        # up to ~1.0 here, and greedy outputs diverge. Lossless speculation relies on this.
        params.flash_attn_type = flash_attn_type(flash_attn)
        params.no_perf = True
        self._ptr = C.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            raise EngineError(f"{model.path}: llama.cpp could not create a context "
                              f"(n_ctx={n_ctx}, n_seq_max={n_seq_max}): {last_log()}")
        self._mem = C.llama_get_memory(self._ptr)
        self.n_ctx = int(C.llama_n_ctx(self._ptr))
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.n_vocab = model.n_vocab
        self.n_decodes = 0         # llama_decode calls made on this context
        self.n_tokens_decoded = 0  # tokens passed to those calls

    def decode(self, batch: Batch) -> None:
        if batch.n == 0:
            return
        rc = C.llama_decode(self._ptr, batch.raw)
        self.n_decodes += 1
        self.n_tokens_decoded += batch.n
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc} ({batch.n} tokens): {last_log()}")
        # A GPU backend returns before the computation ends; wait here, so that the caller's
        # timing of the decode is the decode (a no-op on the CPU backend, which is synchronous).
        C.llama_synchronize(self._ptr)

    def logits(self, i: int) -> np.ndarray:
        """Logits (float32, length n_vocab) of batch index ``i`` of the last decode (a copy)."""
        ptr = C.llama_get_logits_ith(self._ptr, i)
        if not ptr:
            raise EngineError(f"no logits for batch index {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> None:
        """Remove positions [p0, p1) of ``seq`` from the KV cache (p1 = -1: to the end)."""
        if not C.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise EngineError(f"llama_memory_seq_rm(seq={seq}, {p0}, {p1}) failed")

    def seq_pos_max(self, seq: int) -> int:
        """Largest position of ``seq`` in the KV cache, -1 when empty."""
        return int(C.llama_memory_seq_pos_max(self._mem, seq))

    def close(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            C.llama_free(self._ptr)
            self._ptr = None



def prefill(ctx: Context, batch: Batch, seq: int, tokens: list[int], pos0: int,
            *, logits_last: bool) -> int | None:
    """Decode ``tokens`` into ``seq`` from position ``pos0``, in chunks of the batch capacity.

    Returns the batch index of the last token's logits when ``logits_last`` (valid until the next
    decode), else None.
    """
    out = None
    for start in range(0, len(tokens), batch.capacity):
        chunk = tokens[start:start + batch.capacity]
        batch.clear()
        for j, tok in enumerate(chunk):
            last = logits_last and start + j == len(tokens) - 1
            idx = batch.add(tok, pos0 + start + j, seq, last)
            if last:
                out = idx
        ctx.decode(batch)
    return out
