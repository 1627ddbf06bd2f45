"""Bench: how long the simulator takes for large populations; prints a table.

    .venv/bin/python bench/sim_scale.py [--sizes 100,1000,10000] [--minutes 10]
                                        [--profile profiles/local.json]

``testbed simulate experiments/quickstart.yaml --devices K --duration 60*minutes`` (the four
policies, re-planning every 8 rounds, the records written as a live run writes them) for each K,
in a fresh process (``/usr/bin/time``-like: wall seconds and peak RSS from the child's
rusage), plus the rounds simulated and the size of the run folder. The band grows with K
(``--hz-per-device``, default 25 kHz per device), so that drafting pays at every K.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import dataclasses, json, sys
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
                  "goodput": {x["policy"]: x["goodput_tps"] for x in s["policies"]}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--minutes", type=float, default=10.0, help="simulated minutes per policy")
    ap.add_argument("--hz-per-device", type=float, default=25_000.0)
    ap.add_argument("--profile", default=str(ROOT / "profiles/local.json"))
    args = ap.parse_args()
    table = Table(title=f"testbed simulate: quickstart's 4 policies, {args.minutes:g} simulated "
                  f"min each, {os.cpu_count()} CPUs")
    for col in ("devices", "wall s", "peak RSS MB", "rounds", "device-rounds / s",
                "run folder MB", "heterogeneous tok/s", "server-only tok/s"):
        table.add_column(col, justify="right")
    for k in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            proc = subprocess.run([sys.executable, "-c", CHILD, str(k), str(args.minutes * 60),
                                   str(args.hz_per_device), args.profile, tmp],
                                  capture_output=True, text=True, cwd=ROOT)
            wall = time.monotonic() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        table.add_row(str(k), f"{wall:.1f}", f"{max(peak, before) / 1024:.0f}",
                      str(out["rounds"]), f"{out['rounds'] * k / wall:,.0f}",
                      f"{size / 1e6:.0f}",
                      f"{out['goodput']['multispin-heterogeneous']:.0f}",
                      f"{out['goodput']['server-only']:.0f}")
        Console(width=140).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
