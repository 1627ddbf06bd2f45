"""`testbed report RUN [RUN ...] [--out DIR] [--json] [--no-plots]`: compare policies of runs.

Prints a table per policy (goodput, gains over agnostic-fixed and server-only; with repeats,
means with 95% intervals and paired ratios), one of predicted vs measured, the round-time
breakdown and overhead, a per-device table, a per-user table (each policy's goodput beside its
slowest device's and Jain's fairness index; per device its time per output token and to first
token), and, for ``report RUN REPLAY``, whether each policy's replay fell inside the first run's
interval. With scheduled events, a table of how each policy answered each of them (goodput
before, after, and after the re-plan). Writes four PNG plots per run (goodput over time with
events and re-plans, every repeat drawn; per-device tokens/s and share; means with error bars
and ratios; per-device goodput and sum against minimum per policy) into the run folder or
``--out``. Tables fit the terminal (80 columns and up): policy names are shortened, with a
legend, rather than numbers cut. ``--json`` prints ``{"runs": [{"run", "policies": [...],
"ratios": {...}, "users": [...], "responses": [...], "plots"}], "replay_checks": [...]}``
instead of the tables. A missing or garbled run folder is one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="compare the policies of one or more runs (table, plots)",
                       description="Report on run folders (runs/<id>): a table comparing "
                       "policies and PNG plots. Reads summary.json, or recomputes it from "
                       "events.jsonl when it is missing.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder, e.g. runs/<id>")
    p.add_argument("--out", metavar="DIR", help="write the plots here as <run>-goodput.png, "
                   "<run>-devices.png, <run>-intervals.png and <run>-users.png (default: into "
                   "each run folder)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown "
                   "(full names, no width limit; what the README's tables are pasted from)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from testbed.records.report import load_run, print_report, report_json, write_plots

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
    if args.markdown:
        from testbed.records.report import markdown_report
        print(markdown_report(runs), end="")
        return 0
    # A terminal's own width (COLUMNS when set); a file or a pipe gets 100 columns. Every table
    # fits: when the full policy names do not, short ones are used, with a legend at the end.
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=100)
    print_report(console, runs, plots)
    return 0
