"""`testbed report RUN [RUN ...] [--out DIR] [--json] [--no-plots]`: compare policies of runs.

Prints a table per policy (goodput, gains over agnostic-fixed and server-only, predicted vs
measured, round-time breakdown, overhead) and a per-device table, and writes two PNG plots per
run (goodput over time with events and re-plans; per-device tokens/s and share) into the run
folder or ``--out``. With scheduled events, a table of how each policy answered each of
them (goodput before, after, and after the re-plan). ``--json`` prints
``{"runs": [{"run", "policies": [...], "responses": [...], "plots"}]}`` instead of the tables. A missing or garbled run folder is one line on stderr, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="compare the policies of one or more runs (table, plots)",
                       description="Report on run folders (runs/<id>): a table comparing "
                       "policies and PNG plots. Reads summary.json, or recomputes it from "
                       "events.jsonl when it is missing.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder, e.g. runs/<id>")
    p.add_argument("--out", metavar="DIR", help="write the plots here as <run>-goodput.png and "
                   "<run>-devices.png (default: into each run folder)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    from testbed.records.report import (breakdown_table, comparison_table, device_table, load_run,
                                        report_json, response_table, write_plots)

    if args.out and not args.no_plots:
        from testbed.commands import writable_folder
        writable_folder(args.out, "--out")
    runs = [load_run(r) for r in args.runs]
    plots: dict[str, list[str]] = {}
    if not args.no_plots:
        out = Path(args.out) if args.out else None
        for r in runs:
            plots[r.run_id] = [str(p) for p in write_plots(r, out)]
    if args.json:
        print(json.dumps(report_json(runs, plots), indent=2))
        return 0
    console = Console()
    if not console.is_terminal:           # a file or a pipe: no terminal to fit, keep numbers whole
        console = Console(width=120)
    console.print(comparison_table(runs))
    console.print(breakdown_table(runs))
    for r in runs:
        if r.truncated:
            console.print(f"[yellow]{escape(str(r.path))}: the last event line was cut off "
                          "(a crash mid-write); it is left out[/]")
        if r.summary.get("status") not in ("ok", None):
            message = r.summary.get("message")
            console.print(f"run {r.run_id}: status {r.summary.get('status')}"
                          f"{f' ({message})' if message else ''}", style="yellow", markup=False)
        console.print(device_table(r))
        responses = response_table(r)
        if responses is not None:
            console.print(responses)
        for p in plots.get(r.run_id, []):
            console.print(f"wrote {p}", markup=False, highlight=False)
    return 0
