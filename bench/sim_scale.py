"""Bench: how long the simulator takes for large populations; prints a table.

    .venv/bin/python bench/sim_scale.py [--sizes 100,1000,10000] [--minutes 10]
                                        [--profile profiles/local.json] [--out docs/data/bench]

``testbed simulate experiments/quickstart.yaml --devices K --duration 60*minutes`` (the four
policies, re-planning every 8 rounds, the records written as a live run writes them) for each K,
in a fresh process (``/usr/bin/time``-like: wall seconds from the parent, peak RSS the
child's own ``ru_maxrss``), plus the rounds simulated and the size of the run folder. The band
grows with K (``--hz-per-device``, default 25 kHz per device), so that drafting pays at every K.

Writes ``sim_scale.json`` (the command, date, machine and its load at the start, versions,
commit, parameters, every row) and ``sim_scale.md`` (the table as the docs publish it, between
``<!-- bench/sim_scale.py -->`` and ``<!-- end -->``) under ``--out``, atomically
(``bench/_records.py``), and prints the table as each size ends. About 2 minutes with the
defaults on the 2-core AMD EPYC machine, most of it at 10,000 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from _records import Record, add_out_option, heading, repo_path  # bench/_records.py

ROOT = Path(__file__).resolve().parent.parent
# Wall-time goals at 10 simulated minutes per policy (devices: seconds).
GOALS_S = {1_000: 60, 10_000: 600}

CHILD = """
import dataclasses, json, resource, sys
from pathlib import Path
from testbed.inputs.experiment import load_experiment
from testbed.live.loop import run
from testbed.profiling.format import load_profile
from testbed.sim.run import prepare
k, seconds, hz, profile, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
exp = load_experiment("experiments/quickstart.yaml")
exp = dataclasses.replace(exp, channel=dataclasses.replace(exp.channel, bandwidth_hz=hz * k),
                          repeats=1, order="blocked")
e, p, lab = prepare(exp, load_profile(profile), devices=k, duration_s=seconds)
run_dir, code = run(e, p, Path(out), lab=lab)
s = json.loads((run_dir / "summary.json").read_text())
print(json.dumps({"rounds": sum(x["rounds"] for x in s["policies"]),
                  "goodput": {x["policy"]: x["goodput_tps"] for x in s["policies"]},
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def markdown(data: dict) -> str:
    """sim_scale.md from sim_scale.json: one row per number of devices."""
    lines = [heading(data), "",
             "| devices | wall s | peak RSS MB | rounds | device-rounds / s | run folder MB |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['devices']:,} | {r['wall_s']:.1f} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['rounds']:,} | {r['device_rounds_per_s']:,.0f} | "
                     f"{r['run_folder_mb']:,.0f} |")
    if data["parameters"]["minutes"] == 10:
        lines += ["", "Goals: " + ", ".join(f"{k:,} devices under {s} s"
                                            for k, s in GOALS_S.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--minutes", type=float, default=10.0, help="simulated minutes per policy")
    ap.add_argument("--hz-per-device", type=float, default=25_000.0)
    ap.add_argument("--profile", default=str(ROOT / "profiles/local.json"))
    add_out_option(ap)
    args = ap.parse_args()
    record = Record("sim_scale")
    sizes = [int(x) for x in args.sizes.split(",")]
    record.data["parameters"] = {
        "sizes": sizes, "minutes": args.minutes, "hz_per_device": args.hz_per_device,
        "profile": repo_path(args.profile), "experiment": "experiments/quickstart.yaml"}
    rows = record.data["rows"] = []
    table = Table(title=f"testbed simulate: quickstart's 4 policies, {args.minutes:g} simulated "
                  f"min each, {os.cpu_count()} CPUs")
    for col in ("devices", "wall s", "peak RSS MB", "rounds", "device-rounds / s",
                "run folder MB", "heterogeneous tok/s", "server-only tok/s"):
        table.add_column(col, justify="right")
    for k in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            proc = subprocess.run([sys.executable, "-c", CHILD, str(k), str(args.minutes * 60),
                                   str(args.hz_per_device), args.profile, tmp],
                                  capture_output=True, text=True, cwd=ROOT)
            wall = time.monotonic() - t0
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        row = {"devices": k, "wall_s": wall, "peak_rss_mb": out["peak_rss_kb"] / 1024,
               "rounds": out["rounds"], "device_rounds_per_s": out["rounds"] * k / wall,
               "run_folder_mb": size / 1e6, "goodput_tps": out["goodput"]}
        rows.append(row)
        table.add_row(str(k), f"{wall:.1f}", f"{row['peak_rss_mb']:.0f}", str(out["rounds"]),
                      f"{row['device_rounds_per_s']:,.0f}", f"{size / 1e6:.0f}",
                      f"{out['goodput']['multispin-heterogeneous']:.0f}",
                      f"{out['goodput']['server-only']:.0f}")
        Console(width=140).print(table)
    record.save(args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
