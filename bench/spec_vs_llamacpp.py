"""Single-device speculative decoding: testbed's engine vs llama-cpp-python's own speculative path.

    .venv/bin/python bench/spec_vs_llamacpp.py [--draft smollm2-135m-q8_0] [--draft-len 4]
                                               [--max-tokens 96] [--prompts 4] [--repeats 2]

Both sides greedy, same target and draft GGUFs, same prompts (the chat prompt set), same threads:

- testbed: ``engine.spec.speculate`` with a ``DraftWorker`` and a ``Verifier`` in this process
  (the code path of ``testbed spec``);
- llama-cpp-python: ``Llama(target, draft_model=GGUFDraft(draft))``, where ``GGUFDraft`` is a
  ``LlamaDraftModel`` (the library's hook) that drafts ``--draft-len`` greedy tokens with a second
  ``Llama`` on the draft GGUF (reusing its KV cache through the library's prefix matching).

Time is measured from prompt tokens to the last token (prefill included, model loading excluded);
tokens/s = all emitted tokens / all time, per side, best of ``--repeats``. The ratio
testbed / llama-cpp-python should stay >= 0.9. Both outputs are also compared token for token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp  # noqa: E402
from llama_cpp.llama_speculative import LlamaDraftModel  # noqa: E402

from testbed.engine.draft import DraftWorker  # noqa: E402
from testbed.engine.native import quiet  # noqa: E402
from testbed.engine.spec import speculate  # noqa: E402
from testbed.engine.verify import Verifier  # noqa: E402
from testbed.inputs import models  # noqa: E402
from testbed.inputs.prompts import load_prompts  # noqa: E402


class GGUFDraft(LlamaDraftModel):
    """llama-cpp-python's draft hook around a draft GGUF: ``n`` greedy tokens per call."""

    def __init__(self, path: Path, n: int, threads: int):
        self.n = n
        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads,
                                   n_threads_batch=threads, verbose=False, flash_attn=True)

    def __call__(self, input_ids, /, **kwargs):
        out = []
        for tok in self.llm.generate(input_ids.tolist(), temp=0.0, reset=True):
            out.append(tok)
            if len(out) == self.n or self.llm.token_eos() == tok:
                break
        return np.array(out, dtype=np.intc)


def run_llamacpp(llm: llama_cpp.Llama, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = []
    for tok in llm.generate(prompt, temp=0.0, reset=True):
        out.append(tok)
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) or len(out) >= max_tokens:
            break
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft", default="smollm2-135m-q8_0")
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    target, draft = models.resolve(models.TARGET), models.resolve(args.draft)
    root = Path(__file__).resolve().parents[1]
    texts = load_prompts(root / "experiments/prompts/chat.yaml").rendered[:args.prompts]

    ours_d = DraftWorker(draft, n_ctx=1024, threads=args.threads)
    ours_v = Verifier(target, n_seq_max=1, n_ctx=1024, threads=args.threads,
                      max_draft_len=args.draft_len)
    # flash_attn=True as in testbed's contexts: the same attention kernels on both sides (with
    # llama-cpp-python's default, off, its speculative output is not even its own greedy output).
    theirs = llama_cpp.Llama(str(target), n_ctx=1024, n_threads=args.threads,
                             n_threads_batch=args.threads, verbose=False, flash_attn=True,
                             draft_model=GGUFDraft(draft, args.draft_len, args.threads))
    quiet()   # llama-cpp-python re-installs its own log callback; silence llama.cpp again
    prompts = [ours_v.model.tokenize(t) for t in texts]
    best = {"testbed": [float("inf")] * len(prompts), "llama-cpp-python": [float("inf")] * len(prompts)}
    n_tok = {"testbed": [0] * len(prompts), "llama-cpp-python": [0] * len(prompts)}
    same = [True] * len(prompts)
    for rep in range(args.repeats + 1):         # repeat 0 warms caches and is not counted
        for i, p in enumerate(prompts):
            run = speculate(ours_d, ours_v, p, max_tokens=args.max_tokens, draft_len=args.draft_len)
            toks, secs = run_llamacpp(theirs, p, args.max_tokens)
            if rep == 0:
                same[i] = run.tokens == toks
                continue
            best["testbed"][i] = min(best["testbed"][i], run.elapsed_s)
            best["llama-cpp-python"][i] = min(best["llama-cpp-python"][i], secs)
            n_tok["testbed"][i], n_tok["llama-cpp-python"][i] = len(run.tokens), len(toks)
    ours_d.close()
    ours_v.close()
    print(f"greedy speculative decoding, target {target.name}, draft {draft.name}, "
          f"L={args.draft_len}, {args.threads} threads, max {args.max_tokens} tokens, "
          f"best of {args.repeats}")
    print(f"{'prompt':>6} {'tokens':>6} {'testbed tok/s':>14} {'llama-cpp tok/s':>16} {'ratio':>6} {'same':>5}")
    for i in range(len(prompts)):
        a = n_tok["testbed"][i] / best["testbed"][i]
        b = n_tok["llama-cpp-python"][i] / best["llama-cpp-python"][i]
        print(f"{i:>6} {n_tok['testbed'][i]:>6} {a:>14.1f} {b:>16.1f} {a / b:>6.2f} {str(same[i]):>5}")
    a = sum(n_tok["testbed"]) / sum(best["testbed"])
    b = sum(n_tok["llama-cpp-python"]) / sum(best["llama-cpp-python"])
    print(f"{'all':>6} {sum(n_tok['testbed']):>6} {a:>14.1f} {b:>16.1f} {a / b:>6.2f} {str(all(same)):>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
