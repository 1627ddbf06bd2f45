"""`testbed sweep SWEEP.yaml`: an experiment over a grid of parameters, simulated in parallel.

Points run as Ray tasks (a local Ray with one worker per CPU, or ``--address`` of a cluster);
finished points are kept in ``--out`` (default ``sweeps/<name>``), so a second run resumes.
Prints a table of every point's goodput per policy, or ``--json``:
``{"points": [{"params", "policy", "goodput_tps", "goodput_ci95", "status"}]}``.
Exit codes: 0 every point done, 1 some point failed (recorded with its error), 2 bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

from testbed.commands import int_in


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run an experiment over a grid of parameters (simulated, "
                       "in parallel on Ray)",
                       description="Simulate a base experiment at every point of a grid "
                       "(devices, band, spreads, server cost, draft-length limit, seed) as Ray "
                       "tasks; a failed point is recorded and the others go on; finished points "
                       "are kept so that an interrupted sweep resumes (docs/sweeps.md).")
    p.add_argument("sweep", metavar="SWEEP", help="sweep YAML (schema testbed.sweep/1)")
    p.add_argument("--out", metavar="DIR", help="where points are kept (default: "
                   "sweeps/<name>)")
    p.add_argument("--address", metavar="RAY", help="an existing Ray cluster to run the "
                   "points on (default: a local Ray started for the sweep)")
    p.add_argument("--workers", type=int_in(1, 1024), metavar="N", help="local Ray workers "
                   "(default: one per CPU)")
    p.add_argument("--json", action="store_true", help="print the points as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.table import Table

    from testbed.commands import writable_folder
    from testbed.sim.sweep import load_sweep, points_json, run_sweep

    sweep = load_sweep(args.sweep)
    out = Path(args.out) if args.out else Path("sweeps") / sweep.name
    writable_folder(out, "--out")
    console = Console(stderr=args.json)
    columns = (TextColumn("points"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("points", total=len(sweep.points()))

        def progress(done: int, total: int, result: dict | None) -> None:
            bar.update(task, completed=done, total=total)
            if result is not None and result.get("status") == "failed":
                bar.console.print(f"point {result['params']} failed: {result.get('error')}",
                                  markup=False, highlight=False)

        results = run_sweep(sweep, out, address=args.address, progress=progress,
                            workers=args.workers, log=bar.console.log)
    data = points_json(results)
    (out / "points.json").write_text(json.dumps(data, indent=1) + "\n")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        keys = list(sweep.grid)
        policies = list(dict.fromkeys(p["policy"] for p in data["points"] if p["policy"]))
        table = Table(title=f"sweep {sweep.name}: goodput tok/s (95% CI over repeats)")
        for k in keys:
            table.add_column(k, justify="right")
        for pol in policies:
            table.add_column(pol, justify="right")
        for r in results:
            by = {p["policy"]: p for p in r.get("policies") or []}
            cells = []
            for pol in policies:
                p = by.get(pol)
                if p is None:
                    cells.append("failed" if r.get("status") == "failed" else "—")
                    continue
                ci = p.get("goodput_ci95")
                cells.append(f"{p['goodput_tps']:.1f}" +
                             (f" ({ci[0]:.1f}–{ci[1]:.1f})" if ci else ""))
            table.add_row(*[json.dumps(r["params"].get(k)) for k in keys], *cells)
        console.print(table)
        console.print(f"points kept in {out}/points/ (a second run resumes); table data in "
                      f"{out}/points.json")
    from testbed.sim import figures
    for path in figures.write(sweep, results, out):
        console.print(f"wrote {path}")
    return 1 if any(r.get("status") == "failed" for r in results) else 0
