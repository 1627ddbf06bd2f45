"""The server's verification cost over a grid of batch sizes, fitted to ``base + per_token * n``.

    python bench/server_verify.py [--target NAME|PATH] [--gpu-layers all|N] [--ks 1,2,4,8,16]
                                  [--ls 1,2,4,8] [--repeats 9] [--threads 2] [--json FILE]

This is the measurement behind the emulated server (``server.emulation`` in an emulated
inventory: ``verify_base_s`` and ``verify_per_token_s``, docs/gpu-server.md). For K sequences
(distinct chat prompts, prefilled once) with an L-token draft each, it times
``Verifier.verify`` as the server runs it: one batch of n = K * (L + 1) tokens, one
``llama_decode``, greedy acceptance, KV rollback (``verify_ms``), and the decode alone
(``decode_ms``; the engine synchronises the GPU after each decode). It also times the K drafts
verified one sequence at a time (``separate_ms``), the cost without batching. Cells run
round-robin, ``--repeats`` times after two warm-up passes; the table gives medians.

It then checks what batching does to the numbers a verdict is made of: for the largest K and L,
each sequence's logits in the batch against the same sequence decoded alone
(``max_abs_logit_diff``: 0.0 means bit-identical, as on the CPU with flash attention on) and the
greedy verdicts (accepted count and next token) batched against alone.

Runs on any llama-cpp-python; ``--gpu-layers all`` needs one built with a GPU backend. The
target may be a random-weight model of a bigger shape (bench/synth_gguf.py): its timings are
real, its verdicts meaningless.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.engine import payload as pl  # noqa: E402
from testbed.engine.native import gpu_offload_supported  # noqa: E402
from testbed.engine.verify import Verifier  # noqa: E402
from testbed.inputs.prompts import load_prompts  # noqa: E402
from testbed.profiling.stats import fit_line  # noqa: E402


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return sorted(set(values))


def _layers(text: str) -> int:
    if text == "all":
        return -1
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "all" or a number, got {text!r}')
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected >= 0, got {n}")
    return n


def _resolve(target: str) -> Path:
    p = Path(target).expanduser()
    if p.suffix == ".gguf" or p.exists():
        return p
    from testbed.inputs import models  # the registry (needs the project's dependencies)
    return models.resolve(target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m-q4_1", help="registry name or .gguf path")
    ap.add_argument("--gpu-layers", type=_layers, default=0, help='"all" or a number (default 0)')
    ap.add_argument("--ks", type=_ints, default=[1, 2, 4, 8, 16], help="device counts K")
    ap.add_argument("--ls", type=_ints, default=[1, 2, 4, 8], help="draft lengths L")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="", help="a name for this machine in the output")
    ap.add_argument("--json", metavar="FILE", help="also write every number here")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    target = _resolve(args.target)
    k_max, l_max = max(args.ks), max(args.ls)
    texts = load_prompts(ROOT / "experiments/prompts/chat.yaml").rendered
    t0 = time.perf_counter()
    v = Verifier(target, n_seq_max=k_max, n_ctx=1024, threads=args.threads,
                 max_draft_len=l_max, gpu_layers=args.gpu_layers)
    load_s = time.perf_counter() - t0
    prompts = [v.model.tokenize(texts[s % len(texts)] + " " * (s // len(texts)))
               for s in range(k_max)]
    for s, p in enumerate(prompts):
        v.add_sequence(s, p)
    # Draft tokens: a fixed, plausible filler (the cost does not depend on what is accepted).
    filler = v.model.tokenize(" and the answer is that you should take it one step at a time, "
                              "then check the result twice before you go on", add_special=False)
    ids = pl.id_bytes_for(v.model.n_vocab)

    def drafts_for(k: int, length: int) -> dict:
        return {s: pl.encode("ids", filler[s % 3:s % 3 + length], id_bytes=ids) for s in range(k)}

    def reset(k: int) -> None:
        for s in range(k):
            v.add_sequence(s, prompts[s])   # keeps the cached prompt, drops what verify added

    cells = [(k, length) for k in args.ks for length in args.ls]
    runs = {c: {"verify": [], "decode": [], "separate": []} for c in cells}
    for rep in range(args.repeats + 2):          # two warm-up passes, not recorded
        for k, length in cells:
            d = drafts_for(k, length)
            res = v.verify(d)
            assert res.n_decodes == 1 and res.n_tokens == k * (length + 1)
            reset(k)
            sep = sum(v.verify({s: d[s]}).compute_s for s in range(k))
            reset(k)
            if rep >= 2:
                runs[k, length]["verify"].append(res.compute_s)
                runs[k, length]["decode"].append(res.decode_s)
                runs[k, length]["separate"].append(sep)

    # Batch invariance: logits and verdicts of each sequence, batched vs alone.
    d = drafts_for(k_max, l_max)
    batched = v.verify(d)
    starts, at = {}, 0
    for s in range(k_max):
        starts[s] = at
        at += len(pl.decode(d[s]).tokens) + 1
    logits_b = {s: v.ctx.logits(starts[s]) for s in range(k_max)}
    reset(k_max)
    max_diff, verdicts_differ = 0.0, 0
    for s in range(k_max):
        alone = v.verify({s: d[s]})
        max_diff = max(max_diff, float(abs(v.ctx.logits(0) - logits_b[s]).max()))
        a, b = alone.results[s], batched.results[s]
        verdicts_differ += (a.n_accepted, a.next_token) != (b.n_accepted, b.next_token)
    reset(k_max)
    v.close()

    rows = []
    for k, length in cells:
        r = runs[k, length]
        rows.append({"K": k, "L": length, "n_tokens": k * (length + 1),
                     "verify_ms": 1e3 * statistics.median(r["verify"]),
                     "decode_ms": 1e3 * statistics.median(r["decode"]),
                     "separate_ms": 1e3 * statistics.median(r["separate"]),
                     "verify_min_ms": 1e3 * min(r["verify"])})
    fit_v = fit_line([r["n_tokens"] for r in rows], [r["verify_ms"] / 1e3 for r in rows])
    fit_d = fit_line([r["n_tokens"] for r in rows], [r["decode_ms"] / 1e3 for r in rows])
    out = {"label": args.label, "target": str(target), "target_name": target.name,
           "gpu_layers": args.gpu_layers, "gpu_offload_supported": gpu_offload_supported(),
           "threads": args.threads, "repeats": args.repeats, "load_s": load_s,
           "python": platform.python_version(), "rows": rows,
           "fit_verify": {"base_s": fit_v.base, "per_token_s": fit_v.slope,
                          "base_sd": fit_v.base_sd, "per_token_sd": fit_v.slope_sd,
                          "r2": fit_v.r2},
           "fit_decode": {"base_s": fit_d.base, "per_token_s": fit_d.slope, "r2": fit_d.r2},
           "batch_invariance": {"K": k_max, "L": l_max, "max_abs_logit_diff": max_diff,
                                "verdicts_differing": verdicts_differ}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    where = f"{args.label}: " if args.label else ""
    print(f"{where}{target.name}, gpu_layers={args.gpu_layers}, {args.threads} threads, "
          f"median of {args.repeats} (load {load_s:.1f} s)")
    print(f"{'K':>3} {'L':>2} {'tokens':>6} {'verify ms':>10} {'decode ms':>10} "
          f"{'separate ms':>12} {'batching':>9}")
    for r in rows:
        print(f"{r['K']:>3} {r['L']:>2} {r['n_tokens']:>6} {r['verify_ms']:>10.2f} "
              f"{r['decode_ms']:>10.2f} {r['separate_ms']:>12.2f} "
              f"{r['separate_ms'] / r['verify_ms']:>8.2f}x")
    print(f"fit (verify): {1e3 * fit_v.base:.2f} ms + {1e3 * fit_v.slope:.4f} ms/token "
          f"(r2 {fit_v.r2:.3f}); decode alone: {1e3 * fit_d.base:.2f} ms + "
          f"{1e3 * fit_d.slope:.4f} ms/token")
    print(f"batch invariance at K={k_max}, L={l_max}: max |logit diff| {max_diff:.3g}, "
          f"{verdicts_differ} of {k_max} verdicts differ")
    print(f"emulation: {{verify_base_s: {fit_v.base:.4f}, verify_per_token_s: {fit_v.slope:.6f}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
