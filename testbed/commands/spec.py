"""`testbed spec`: speculative decoding of one prompt on this machine, with its statistics.

Runs the engine's own ``DraftWorker`` and ``Verifier`` in this process (the classes the Ray actors
wrap) after checking that the pair shares a vocabulary. Prints the generated text and drafted /
accepted counts, acceptance per draft position and tokens/s; ``--json`` prints one object.
Models are registry names (``testbed models list``) or paths to GGUF files.
"""

from __future__ import annotations

import json

from testbed.channel import MAX_DRAFT_LEN, MAX_TOP_K
from testbed.commands import float_in, int_in
from testbed.errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("spec", help="speculative decoding of one prompt, in this process",
                       description="Draft with --draft, verify with --target, print the text and "
                       "the acceptance statistics. At temperature 0 the output is exactly the "
                       "target's greedy output; otherwise it is distributed as the target's.")
    p.add_argument("--target", default="smollm2-135m-q4_1", help="registry name or .gguf path")
    p.add_argument("--draft", default="smollm2-135m-q8_0", help="registry name or .gguf path")
    p.add_argument("--prompt", required=True, help="the user prompt")
    p.add_argument("--template", choices=("chatml", "model", "none"), default="chatml",
                   help="wrap the prompt in the ChatML chat template (default), in the target "
                   "model's own chat template (from its GGUF), or use it raw")
    p.add_argument("--max-tokens", type=int_in(1, 32768), default=64,
                   help="tokens to generate, 1..32768 (default 64)")
    p.add_argument("--draft-len", type=int_in(0, MAX_DRAFT_LEN), default=4,
                   help=f"draft tokens per round, 0..{MAX_DRAFT_LEN} (default 4)")
    p.add_argument("--temperature", type=float_in(0, 10), default=0.0,
                   help="0 (default): greedy; at most 10")
    p.add_argument("--top-k", type=int_in(0, 1_000_000), default=0,
                   help="top-k of the target (0: off)")
    p.add_argument("--top-p", type=float_in(0, 1, lo_exclusive=True), default=1.0,
                   help="top-p of the target, in (0, 1] (1: off)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0,
                   help="random seed, 0..2^32-1 (default 0)")
    p.add_argument("--payload", choices=("ids", "topk"), default=None,
                   help="draft payload: ids (default when greedy; when sampling the draft is then "
                   "greedy) or topk (default when sampling)")
    p.add_argument("--payload-k", type=int_in(1, MAX_TOP_K), default=8,
                   help=f"entries per token in topk payloads, 1..{MAX_TOP_K}")
    p.add_argument("--threads", type=int_in(1, 256), default=2,
                   help="llama.cpp threads, 1..256 (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _check(args) -> None:
    def bad(flag, msg):
        raise InputError(msg, source="testbed spec", field=flag)

    if args.max_tokens < 1:
        bad("--max-tokens", f"must be >= 1, got {args.max_tokens}")
    if not 0 <= args.draft_len <= 64:
        bad("--draft-len", f"must be in 0..64, got {args.draft_len}")
    if not 1 <= args.payload_k <= 255:
        bad("--payload-k", f"must be in 1..255, got {args.payload_k}")
    if args.threads < 1:
        bad("--threads", f"must be >= 1, got {args.threads}")
    if not args.prompt.strip():
        bad("--prompt", "is empty")


def run(args) -> int:
    _check(args)
    from testbed.engine.draft import DraftWorker
    from testbed.engine.sampling import SamplingParams
    from testbed.engine.spec import speculate
    from testbed.engine.verify import Verifier
    from testbed.inputs import models
    from testbed.errors import PromptsError
    from testbed.inputs.prompts import ChatTemplate, render_prompt

    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    except InputError as exc:
        flag = "--" + exc.field.replace("_", "-")
        raise InputError(exc.message, source="testbed spec", field=flag) from None
    target_path = models.resolve(args.target)
    draft_path = models.resolve(args.draft)
    models.check_pair(target_path, draft_path)
    payload = args.payload or ("ids" if sampling.greedy else "topk")
    verifier = Verifier(target_path, n_seq_max=1, threads=args.threads, seed=args.seed,
                        sampling=sampling, max_draft_len=max(1, args.draft_len),
                        n_ctx=_n_ctx(args))
    try:
        chat = ChatTemplate.of(verifier.model) if args.template == "model" else None
        prompt = verifier.model.tokenize(render_prompt(args.prompt, args.template, chat=chat))
    except PromptsError as exc:
        verifier.close()
        raise InputError(exc.message, source="testbed spec", field="--template") from None
    if len(prompt) + args.max_tokens + args.draft_len + 1 > verifier.n_ctx_seq:
        verifier.close()
        raise InputError(f"the prompt has {len(prompt)} tokens; with --max-tokens it exceeds the "
                         f"context of {verifier.n_ctx_seq}", source="testbed spec", field="--prompt")
    draft = DraftWorker(draft_path, n_ctx=verifier.n_ctx_seq, threads=args.threads, seed=args.seed,
                        payload=payload, payload_k=args.payload_k, sampling=sampling)
    try:
        result = speculate(draft, verifier, prompt, max_tokens=args.max_tokens,
                           draft_len=args.draft_len, seed=args.seed)
        text = verifier.model.detokenize(result.tokens)
    finally:
        draft.close()
        verifier.close()
    s = result.stats
    out = {"text": text, "tokens": result.tokens, "n_tokens": len(result.tokens),
           "n_prompt_tokens": len(prompt), "n_rounds": s.n_rounds, "n_drafted": s.n_drafted,
           "n_accepted": s.n_accepted, "acceptance_rate": s.acceptance_rate,
           "acceptance_at": s.acceptance_at, "tokens_per_s": result.tokens_per_s,
           "elapsed_s": result.elapsed_s, "draft_s": s.draft_s, "verify_s": s.verify_s,
           "payload": payload, "payload_bytes": s.payload_bytes,
           "bits_per_draft_token": s.bits_per_draft_token, "target": str(target_path),
           "draft": str(draft_path), "draft_len": args.draft_len, "temperature": args.temperature,
           "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _show(out)
    return 0


def _n_ctx(args) -> int:
    # The prompt is not tokenized yet: leave generous room, the context is cheap for small models.
    return max(1024, args.max_tokens + args.draft_len + 2 * len(args.prompt) + 64)


def _show(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(out["text"], markup=False, highlight=False)
    table = Table(title="speculative decoding", show_header=False)
    table.add_column("stat")
    table.add_column("value")
    table.add_row("tokens", f"{out['n_tokens']} in {out['n_rounds']} rounds")
    table.add_row("drafted / accepted", f"{out['n_drafted']} / {out['n_accepted']} "
                  f"({out['acceptance_rate']:.0%})")
    table.add_row("acceptance per draft position",
                  "  ".join(f"{i + 1}:{a:.2f}" for i, a in enumerate(out["acceptance_at"])) or "-")
    table.add_row("tokens/s", f"{out['tokens_per_s']:.1f} ({out['elapsed_s']:.2f} s)")
    table.add_row("draft / verify time", f"{out['draft_s']:.2f} s / {out['verify_s']:.2f} s")
    table.add_row("payload", f"{out['payload']}: {out['payload_bytes']} bytes, "
                  f"{out['bits_per_draft_token']:.1f} bits per draft token")
    console.print(table)
