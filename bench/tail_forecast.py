"""Bench: the controller's forecast against the simulated lab, mean model against tail model.

    .venv/bin/python bench/tail_forecast.py [--profile profiles/local.json] [--sizes 4,256,1000]
                                            [--duration 120] [--seed 9] [--out docs/data/bench]

What issue #27 asks to show: ``testbed simulate experiments/quickstart.yaml --devices K`` (the
same code path: ``sim.run.prepare`` and the live loop, re-planning as the experiment says), once
with ``model: mean`` (the paper's mean times) and once with ``model: tail`` (the expected
slowest arrival, the default), and for every policy the measured goodput against the
controller's forecast for the plans in force (``predicted_goodput_tps``, each round from the
rounds before it; the report's "pred."). Goodput is on the wall clock over all repeats.

K = 4 uses the profiled devices themselves (no drawn population); larger K draws a population
from them (``sim.population.draw``, seeded). Deterministic for a seed. Writes
``tail_forecast.json`` (command, date, machine, load, versions, commit, parameters, rows) and
``tail_forecast.md`` (the table as the docs publish it) under ``--out`` (``bench/_records.py``),
and prints the table. About 3-5 minutes on the 2-core machine with the defaults (K = 1,000
dominates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _records import Record, add_out_option, heading, repo_path  # noqa: E402  (bench/)
from testbed.control.catalog import short_name
from testbed.inputs.experiment import load_experiment
from testbed.live.loop import run as run_loop
from testbed.profiling.format import load_profile
from testbed.sim.population import PopulationSpec
from testbed.sim.run import prepare

MODELS = ("mean", "tail")
TARGET = 0.05            # the bar: every policy within 5% of its forecast


def simulate(exp, profile, k: int, seed: int, duration: float, out: Path) -> list[dict]:
    devices = None if k == len(exp.inventory.devices) else k
    population = PopulationSpec(**(exp.population or {})) if devices else None
    e, p, lab = prepare(exp, profile, devices=devices, seed=seed, duration_s=duration,
                        population=population)
    run_dir, _ = run_loop(e, p, out, lab=lab)
    summary = json.loads((run_dir / "summary.json").read_text())
    return [{"policy": pol["policy"], "rounds": pol["rounds"], "goodput": pol["goodput_tps"],
             "forecast": pol["predicted_goodput_tps"], "error": pol["prediction_error"]}
            for pol in summary["policies"]]


def markdown(data: dict) -> str:
    """tail_forecast.md from tail_forecast.json: one row per K and policy, both models."""
    lines = [heading(data), "",
             "| K | policy | mean model: forecast | simulated | error | tail model: forecast "
             "| simulated | error |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    rows = {(r["k"], r["model"], r["policy"]): r for r in data["rows"]}
    for k in data["parameters"]["sizes"]:
        for pol in data["parameters"]["policies"]:
            cells = []
            for model in MODELS:
                r = rows.get((k, model, pol))
                cells += [f"{r['forecast']:.1f}", f"{r['goodput']:.1f}", f"{r['error']:+.1%}"] \
                    if r else ["", "", ""]
            lines.append(f"| {k:,} | {short_name(pol)} | " + " | ".join(cells) + " |")
    worst = {m: max((abs(r["error"]) for r in data["rows"] if r["model"] == m), default=None)
             for m in MODELS}
    lines += ["", "Largest |error|: " + ", ".join(
        f"{m} model {w:.1%}" for m, w in worst.items() if w is not None) +
        f" (the bar: {TARGET:.0%})."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(ROOT / "profiles/local.json"))
    ap.add_argument("--experiment", default=str(ROOT / "experiments/quickstart.yaml"))
    ap.add_argument("--sizes", default="4,256,1000")
    ap.add_argument("--duration", type=float, default=120.0, help="simulated s per policy")
    ap.add_argument("--seed", type=int, default=9)
    add_out_option(ap)
    args = ap.parse_args()
    record = Record("tail_forecast")
    sizes = [int(x) for x in args.sizes.split(",")]
    base = load_experiment(args.experiment)
    record.data["parameters"] = {
        "profile": repo_path(args.profile), "experiment": repo_path(args.experiment),
        "sizes": sizes, "duration_s": args.duration, "seed": args.seed,
        "policies": list(base.policies), "models": list(MODELS),
        "repeats": base.repeats}
    profile = load_profile(args.profile)
    table = Table(title=f"forecast vs simulated goodput (tok/s), {args.duration:g} s per "
                  f"policy and repeat, seed {args.seed}")
    for col in ("K", "model", "policy", "forecast", "simulated", "error", "wall s"):
        table.add_column(col, justify="left" if col in ("model", "policy") else "right")
    rows = record.data["rows"] = []
    for k in sizes:
        for model in MODELS:
            exp = dataclasses.replace(base, model=model)
            t0 = time.monotonic()
            with tempfile.TemporaryDirectory() as tmp:
                result = simulate(exp, profile, k, args.seed, args.duration, Path(tmp))
            wall = time.monotonic() - t0
            for r in result:
                rows.append({"k": k, "model": model, **r, "wall_s": wall})
                table.add_row(f"{k:,}", model, short_name(r["policy"]), f"{r['forecast']:.1f}",
                              f"{r['goodput']:.1f}", f"{r['error']:+.1%}", f"{wall:.0f}")
            print(f"K={k} model={model}: {wall:.0f} s", file=sys.stderr, flush=True)
    Console(width=140).print(table)
    record.save(args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
