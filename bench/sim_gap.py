"""Bench: the analytic model's blind spot, measured with the simulator; prints a table.

    .venv/bin/python bench/sim_gap.py [--profile profiles/local.json] [--sizes 4,32,256,1000]
                                      [--duration 120] [--hz-per-device 25000]
                                      [--seed 1234] [--out docs/data/bench]

For each number of devices K and for multispin-heterogeneous and multispin-homogeneous, a
population of K devices is drawn from the profile (seeded; ``sim.population.draw``), the band
is ``--hz-per-device`` x K (so that every K has the same band per device), re-planning is off
(the first plan stays: the comparison is plan against plan), and the experiment
``experiments/quickstart.yaml`` is simulated twice:

- with every timing spread at zero (``timing_noise=0``): rounds last the measured means; what
  is left of the gap to the model comes from acceptance sampled token by token (the per-position
  shape, the workload's rate) and the measured upload factor;
- with the measured spreads (``timing_noise=1``): the round waits for the last of K noisy
  arrivals, E[max] > max E. The ratio of the two is the arrival-spread gap.

Columns: the plan's goodput under the model, the two simulated goodputs, and the gaps.
Deterministic for a seed; about 10 s with the defaults on the 2-core AMD EPYC machine. Writes
``sim_gap.json`` (the command, date, machine and its load at the start, versions, commit,
parameters, every row) and ``sim_gap.md`` (the table as the docs publish it, between
``<!-- bench/sim_gap.py -->`` and ``<!-- end -->``) under ``--out``, atomically
(``bench/_records.py``), and prints the table.
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
from testbed.inputs.experiment import load_experiment
from testbed.live.loop import run as run_loop
from testbed.profiling.format import load_profile
from testbed.sim.run import prepare

POLICIES = ("multispin-heterogeneous", "multispin-homogeneous")
SHORT = {"multispin-heterogeneous": "heterogeneous", "multispin-homogeneous": "homogeneous"}


def simulate(exp, profile, k: int, noise: float, out: Path) -> dict:
    e, p, lab = prepare(exp, profile, devices=k, timing_noise=noise)
    run_dir, _ = run_loop(e, p, out, lab=lab)
    summary = json.loads((run_dir / "summary.json").read_text())
    events = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()
              if '"policy_start"' in ln]
    plans = {ev["policy"]: ev["plan"]["goodput_tps"] for ev in events}
    return {pol["policy"]: (pol["goodput_tps"], plans.get(pol["policy"]))
            for pol in summary["policies"]}


def markdown(data: dict) -> str:
    """sim_gap.md from sim_gap.json: one row per K and policy."""
    lines = [heading(data), "",
             "| K | policy | model (plan) | sim, no timing spread | sim, measured spread | "
             "gap: acceptance etc. | gap: arrival spread | gap: total |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['k']:,} | {SHORT.get(r['policy'], r['policy'])} | {r['model']:.1f} "
                     f"| {r['quiet']:.1f} | {r['noisy']:.1f} | {r['gap_other']:+.1%} | "
                     f"{r['gap_arrival']:+.1%} | {r['gap_total']:+.1%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=str(ROOT / "profiles/local.json"))
    ap.add_argument("--sizes", default="4,32,256,1000")
    ap.add_argument("--duration", type=float, default=120.0, help="simulated s per policy")
    ap.add_argument("--hz-per-device", type=float, default=25_000.0)
    ap.add_argument("--seed", type=int, default=1234)
    add_out_option(ap)
    args = ap.parse_args()
    record = Record("sim_gap")
    sizes = [int(x) for x in args.sizes.split(",")]
    record.data["parameters"] = {
        "profile": repo_path(args.profile), "experiment": "experiments/quickstart.yaml",
        "sizes": sizes, "duration_s": args.duration, "hz_per_device": args.hz_per_device,
        "seed": args.seed, "policies": list(POLICIES), "replan": "off (first plan kept)"}
    profile = load_profile(args.profile)
    base = load_experiment(ROOT / "experiments/quickstart.yaml")
    table = Table(title=f"simulated vs model goodput (tok/s), re-planning off, "
                  f"{args.duration:g} s per policy, band {args.hz_per_device:g} Hz x K")
    for col in ("K", "policy", "model (plan)", "sim, no timing spread", "sim, measured spread",
                "gap: acceptance etc.", "gap: arrival spread", "gap: total", "wall s"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    rows = record.data["rows"] = []
    for k in sizes:
        channel = dataclasses.replace(base.channel, bandwidth_hz=args.hz_per_device * k)
        replan = dataclasses.replace(base.replan, interval_rounds=10**6)
        exp = dataclasses.replace(base, policies=POLICIES, channel=channel, replan=replan,
                                  duration_s=args.duration, rounds=None, repeats=1,
                                  order="blocked", seed=args.seed)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            quiet = simulate(exp, profile, k, 0.0, Path(tmp) / "quiet")
            noisy = simulate(exp, profile, k, 1.0, Path(tmp) / "noisy")
        wall = time.monotonic() - t0
        for pol in POLICIES:
            q, model = quiet[pol]
            n, _ = noisy[pol]
            row = {"k": k, "policy": pol, "model": model, "quiet": q, "noisy": n,
                   "gap_other": q / model - 1, "gap_arrival": n / q - 1,
                   "gap_total": n / model - 1, "wall_s": wall}
            rows.append(row)
            table.add_row(str(k), pol, f"{model:.1f}", f"{q:.1f}", f"{n:.1f}",
                          f"{row['gap_other']:+.1%}", f"{row['gap_arrival']:+.1%}",
                          f"{row['gap_total']:+.1%}", f"{wall:.0f}")
    Console(width=140).print(table)
    record.save(args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
