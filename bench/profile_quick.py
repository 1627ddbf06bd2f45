"""Bench: how long `testbed profile --quick` takes on the emulated lab; prints a table.

    sudo .venv/bin/python bench/profile_quick.py [--inventory inventory/local.yaml]
                                                 [--keep-up] [--out /tmp/bench-profile.json]

By default it starts from nothing: the inventory's Ray cluster and emulated lab are taken down
first, so the time includes `testbed profile` bringing them up and taking them down again (what
a newcomer sees). ``--keep-up`` brings them up before timing and leaves them up (the time of the
profile alone). Target: under 3 minutes from nothing on a 2-core machine.

The table has the wall time of the whole command, the time spent bringing the lab and cluster
up, the profile's own duration and the time of each stage (from the profile's ``stage_s``),
and the fidelity figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from testbed.inputs.inventory import load_inventory
from testbed.lab import cluster, emulated
from testbed.lab.bringup import bring_up

TARGET_S = 180.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inventory", default="inventory/local.yaml")
    ap.add_argument("--out", default="/tmp/bench-profile.json")
    ap.add_argument("--keep-up", action="store_true",
                    help="time the profile on a lab and cluster that are already up")
    args = ap.parse_args()
    inv = load_inventory(args.inventory)
    console = Console()
    if args.keep_up:
        with bring_up(inv, keep=True):             # up if not up, and left up afterwards
            pass
    else:
        cluster.down(inv)
        if inv.kind == "emulated":
            emulated.down(inv)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "testbed.cli", "profile", args.inventory,
                          "--quick", "--out", args.out], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if res.returncode not in (0, 3):
        console.print(res.stdout[-4000:], res.stderr[-4000:], markup=False)
        return res.returncode
    prof = json.loads(Path(args.out).read_text())
    table = Table(title=f"testbed profile --quick {args.inventory} "
                  f"({'lab and cluster already up' if args.keep_up else 'from nothing'})")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_row("whole command", f"{wall:.1f}")
    table.add_row("  profile (measuring)", f"{prof['duration_s']:.1f}")
    for stage, secs in prof.get("stage_s", {}).items():
        table.add_row(f"    {stage}", f"{secs:.1f}")
    table.add_row("  bring-up, tear-down, start-up", f"{wall - prof['duration_s']:.1f}")
    console.print(table)
    fid = prof.get("fidelity") or {}
    if fid.get("rel_error") is not None:
        console.print(f"fidelity: predicted {fid['predicted_round_s']:.3f} s, measured "
                      f"{fid['measured_round_s']:.3f} s, error {fid['rel_error'] * 100:.1f}%")
    verdict = "[green]within" if wall <= TARGET_S else "[red]over"
    console.print(f"{verdict} the {TARGET_S:.0f} s target[/] ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
