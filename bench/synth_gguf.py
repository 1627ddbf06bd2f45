"""Write a random-weight GGUF of a bigger llama-family shape, for TIMING a GPU server only.

    python bench/synth_gguf.py --shape 8b --vocab-from SmolLM2.gguf --out /tmp/synth-8b.gguf

Why: the emulated lab's target (SmolLM2-135M) is far smaller than a real edge server's target
(the paper verifies with 7-8B models), and only PyPI is reachable from here, so no 8B checkpoint
can be fetched. A forward pass costs the same whatever the weights' values, so a model of the
same shape with random Q4_0 weights times verification like the real one. Its tokens mean
nothing: never use it for acceptance.

The tokenizer (every ``tokenizer.*`` key) comes from ``--vocab-from`` (a llama-architecture
GGUF: SmolLM2's 49,152-token vocabulary), so the output layer is smaller than Llama-3's 128k one;
the embeddings are tied, as in SmolLM2. Every 2-D weight is Q4_0 with random 4-bit values and a
fixed scale; norms are ones. One random array per tensor kind is shared by all layers (the bytes
on disk are the same per layer; timing does not care).

Needs the ``gguf`` package: llama-cpp-python's source tree has it in
``vendor/llama.cpp/gguf-py`` (put that on PYTHONPATH), or ``pip install gguf``.
Limits: llama architecture only; Q4_0 only; n_embd and n_ff must be multiples of 32.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

# name: (n_embd, n_layer, n_head, n_head_kv, n_ff), after published configurations
SHAPES = {
    "tiny": (256, 2, 4, 2, 512),          # for tests of this script
    "1b": (2048, 16, 32, 8, 8192),        # Llama-3.2-1B's body
    "3b": (3072, 28, 24, 8, 8192),        # Llama-3.2-3B's body
    "8b": (4096, 32, 32, 8, 14336),       # Llama-3.1-8B's body
}
Q4_0_BLOCK, Q4_0_BYTES = 32, 18           # 32 weights: an fp16 scale and 16 bytes of nibbles


def q4_0_rows(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """Random Q4_0 data of a (rows x cols) weight, as the (rows, bytes per row) uint8 array the
    gguf writer takes for a quantized tensor."""
    if cols % Q4_0_BLOCK:
        raise ValueError(f"{cols} columns: not a multiple of {Q4_0_BLOCK}")
    blocks = rng.integers(0, 256, size=(rows, cols // Q4_0_BLOCK, Q4_0_BYTES), dtype=np.uint8)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def write(shape: str, vocab_from: str, out: str, seed: int = 0) -> dict:
    import gguf

    n_embd, n_layer, n_head, n_head_kv, n_ff = SHAPES[shape]
    head_dim = n_embd // n_head
    reader = gguf.GGUFReader(vocab_from)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise SystemExit(f"{vocab_from}: general.architecture is {arch!r}, need 'llama'")
    w = gguf.GGUFWriter(out, "llama")
    w.add_name(f"random-weights-{shape}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)

    rng = np.random.default_rng(seed)
    q4 = gguf.GGMLQuantizationType.Q4_0
    scale = 0.02 / 8                   # weights of about +-0.02, like a trained model's
    ones = np.ones(n_embd, dtype=np.float32)
    kv = n_head_kv * head_dim
    layer = {"attn_q": q4_0_rows(rng, n_embd, n_embd, scale),
             "attn_k": q4_0_rows(rng, kv, n_embd, scale),
             "attn_v": q4_0_rows(rng, kv, n_embd, scale),
             "attn_output": q4_0_rows(rng, n_embd, n_embd, scale),
             "ffn_gate": q4_0_rows(rng, n_ff, n_embd, scale),
             "ffn_up": q4_0_rows(rng, n_ff, n_embd, scale),
             "ffn_down": q4_0_rows(rng, n_embd, n_ff, scale)}
    w.add_tensor("token_embd.weight", q4_0_rows(rng, n_vocab, n_embd, scale), raw_dtype=q4)
    w.add_tensor("output_norm.weight", ones)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        for kind, data in layer.items():
            w.add_tensor(f"blk.{i}.{kind}.weight", data, raw_dtype=q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    params = n_vocab * n_embd + n_layer * sum(a.shape[0] * a.shape[1] // Q4_0_BYTES * Q4_0_BLOCK
                                              for a in layer.values())
    return {"shape": shape, "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
            "n_head_kv": n_head_kv, "n_ff": n_ff, "n_vocab": n_vocab, "params": params}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--vocab-from", required=True, help="a llama-architecture GGUF")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    info = write(args.shape, args.vocab_from, args.out, args.seed)
    print(f"wrote {args.out}: {info['params'] / 1e9:.2f} B parameters, " +
          ", ".join(f"{k}={v}" for k, v in info.items() if k.startswith("n_")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
