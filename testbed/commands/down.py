"""`testbed down INVENTORY`: stop the lab's Ray cluster (devices first, then the head).

In an emulated lab each node's Ray processes are stopped by their namespace and temp dir, never
with a machine-wide ``ray stop``. The emulated lab itself stays: `testbed lab down` removes it.
"""

from __future__ import annotations

import os
import time


def add_parser(sub) -> None:
    p = sub.add_parser("down", help="stop the Ray cluster of a lab (safe to repeat)",
                       description="Stop the Ray cluster started by `testbed up`: devices first, "
                       "then the head. On an emulated lab only this lab's Ray processes are "
                       "stopped (by namespace and temp dir). The lab stays; `testbed lab down` "
                       "removes it.")
    p.add_argument("inventory", metavar="INVENTORY", help="inventory YAML")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from testbed.inputs.inventory import load_inventory
    from testbed.lab import cluster

    from testbed.errors import LabError
    from testbed.lab.lock import lab_lock

    console = Console(log_path=False)
    inv = load_inventory(args.inventory)
    if inv.kind == "emulated" and os.geteuid() != 0:
        raise LabError("`testbed down` on an emulated lab needs root (its processes run in "
                       "root's namespaces): run it with sudo")
    t0 = time.monotonic()
    with lab_lock(inv, "testbed down"), console.status("") as spinner:
        def progress(msg: str) -> None:
            spinner.update(f"down: {msg}")
            console.log(msg)

        stopped = cluster.down(inv, progress)
    what = "; ".join(stopped) if stopped else "no Ray processes of this lab were running"
    console.print(f"[green]down[/] in {time.monotonic() - t0:.1f} s: {what}")
    return 0
