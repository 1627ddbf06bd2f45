"""Verification time: K devices' drafts of L tokens in ONE llama_decode vs one decode per device.

    .venv/bin/python bench/verify.py [--target NAME|PATH] [--repeats 7] [--threads 2] [--json]

For K = 1, 2, 4, 8 sequences (different chat prompts, prefilled once) and L = 1, 2, 4, 8 draft
tokens each, times ``Verifier.verify`` (its ``compute_s``: batch build, decode, greedy acceptance,
KV rollback) for all K drafts together, and the sum of K separate ``verify`` calls of one
sequence each, interleaved. Each sequence is rolled back to its prompt between measurements (not
timed). The best (minimum) of ``--repeats`` is printed, the estimate least disturbed by other
processes on a shared machine; ``--json`` also gives the medians. Expected on a 2-core CPU:
batched >= 1.4x faster at K=4, L=4.
Uses the prepared demo target (``testbed models prepare``) unless ``--target`` names another
model. The gain of batching depends on the quantization's CPU kernels: llama.cpp repacks Q4_0 and
Q8_0 weights for batched matrix products, not Q4_1, so a Q4_0 "target" shows a larger gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.engine import payload as pl  # noqa: E402
from testbed.engine.verify import Verifier  # noqa: E402
from testbed.inputs import models  # noqa: E402
from testbed.inputs.prompts import load_prompts  # noqa: E402

KS = (1, 2, 4, 8)
LS = (1, 2, 4, 8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=models.TARGET, help="registry name or .gguf path")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    target = models.resolve(args.target)
    root = Path(__file__).resolve().parents[1]
    texts = load_prompts(root / "experiments/prompts/chat.yaml").rendered[:max(KS)]
    v = Verifier(target, n_seq_max=max(KS), n_ctx=512, threads=args.threads,
                 max_draft_len=max(LS))
    prompts = [v.model.tokenize(t) for t in texts]
    for s, p in enumerate(prompts):
        v.add_sequence(s, p)
    # Draft tokens: a fixed, plausible filler; acceptance does not change the decode's cost.
    filler = v.model.tokenize(" and the answer is that you should take it one step at a time",
                              add_special=False)

    def reset(seqs):
        for s in seqs:
            v.add_sequence(s, prompts[s])   # keeps the cached prompt, drops what verify added

    warm = {0: pl.encode("ids", filler[:4])}
    v.verify(warm)
    reset([0])
    cells = [(k, length) for k in KS for length in LS]
    batched = {c: [] for c in cells}
    separate = {c: [] for c in cells}
    # Round-robin over the cells, so a burst of other load on a shared machine hits every cell
    # alike and the best of the repeats of each cell comes from a quiet moment.
    for _ in range(args.repeats):
        for k, length in cells:
            seqs = list(range(k))
            drafts = {s: pl.encode("ids", filler[s % 3:s % 3 + length]) for s in seqs}
            step = v.verify(drafts)
            assert step.n_decodes == 1
            batched[k, length].append(step.compute_s)
            reset(seqs)
            separate[k, length].append(sum(v.verify({s: drafts[s]}).compute_s for s in seqs))
            reset(seqs)
    rows = []
    for k, length in cells:
        b, sep = min(batched[k, length]), min(separate[k, length])
        rows.append({"K": k, "L": length, "n_tokens": k * (length + 1), "batched_ms": 1e3 * b,
                     "separate_ms": 1e3 * sep, "speedup": sep / b,
                     "batched_median_ms": 1e3 * statistics.median(batched[k, length]),
                     "separate_median_ms": 1e3 * statistics.median(separate[k, length])})
    v.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"verification time, best of {args.repeats}, {args.threads} threads, target {target.name}")
    print(f"{'K':>2} {'L':>2} {'tokens':>6} {'batched ms':>11} {'separate ms':>12} {'speedup':>8}")
    for r in rows:
        print(f"{r['K']:>2} {r['L']:>2} {r['n_tokens']:>6} {r['batched_ms']:>11.1f} "
              f"{r['separate_ms']:>12.1f} {r['speedup']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
