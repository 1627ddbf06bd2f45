"""`testbed up INVENTORY`: start the lab's Ray cluster (head on the server, one node per device).

Checks Python and Ray versions on every node first. On an emulated inventory it brings the lab
up first when it is not. Prints the nodes that joined and how to pin actors to them.
"""

from __future__ import annotations

import time


def add_parser(sub) -> None:
    p = sub.add_parser("up", help="start the Ray cluster of a lab (emulated: the lab too)",
                       description="Start the Ray cluster: a head on the server (resource "
                       "'server') and one node per device (resource 'device:NAME'), each "
                       "started through the node's runner (SSH for devices). Checks that Python "
                       "and Ray versions match on every node first. An emulated inventory's lab "
                       "is brought up first when it is not.")
    p.add_argument("inventory", metavar="INVENTORY", help="inventory YAML")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from testbed.inputs.inventory import load_inventory
    from testbed.lab import cluster
    from testbed.lab.bringup import bring_up

    console = Console(log_path=False)
    inv = load_inventory(args.inventory)
    t0 = time.monotonic()
    with console.status("") as spinner:
        def progress(msg: str) -> None:
            spinner.update(f"up: {msg}")
            console.log(msg)

        from testbed.lab.lock import lab_lock
        with lab_lock(inv, "testbed up"), bring_up(inv, progress, keep=True, cluster=False):
            state = cluster.up(inv, progress)
    table = Table(title=f"Ray cluster {state['address']} ({time.monotonic() - t0:.1f} s)")
    for col in ("node", "address", "pinning resource", "python", "ray"):
        table.add_column(col, no_wrap=True)
    joined = {n["ip"] for n in state.get("joined", [])}
    for node in inv.nodes:
        res = "server" if node.role == "server" else cluster.device_resource(node.name)
        v = state["versions"][node.name]
        ok = "" if node.host in joined else " [red](missing)[/]"
        table.add_row(node.name, node.host + ok, res, v["python"], v["ray"] or "-")
    console.print(table)
    return 0
