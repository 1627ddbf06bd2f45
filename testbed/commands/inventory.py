"""`testbed inventory show INVENTORY [--json]`: validate an inventory and print its nodes."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("inventory", help="validate an inventory file and show its nodes",
                       description="Validate an inventory file (exit 2 with file:line: field: "
                       "problem when it is malformed) and show its nodes.")
    isub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = isub.add_parser("show", help="validate and show the nodes")
    show.add_argument("inventory", help="inventory YAML file, e.g. inventory/local.yaml")
    show.add_argument("--json", action="store_true", help="print the resolved inventory as JSON")
    show.set_defaults(func=run)


def _as_dict(inv) -> dict:
    def node(n):
        return {"name": n.name, "role": n.role, "host": n.host, "connection": n.connection,
                "ssh": None if n.ssh is None else vars(n.ssh), "python": n.python,
                "venv": n.venv, "interface": n.interface, "model": vars(n.model),
                "threads": n.threads, "snr_db": n.snr_db, "cpu_quota": n.cpu_quota,
                "emulation": None if n.emulation is None else vars(n.emulation)}
    return {"name": inv.name, "kind": inv.kind, "digest": inv.digest,
            "channel": vars(inv.channel), "ray_port": inv.ray_port, "data_port": inv.data_port,
            "lab": None if inv.lab is None else {**vars(inv.lab), "subnet": str(inv.lab.subnet)},
            "server": node(inv.server), "devices": [node(d) for d in inv.devices]}


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from testbed.inputs.inventory import load_inventory

    inv = load_inventory(args.inventory)
    if args.json:
        print(json.dumps(_as_dict(inv), indent=2))
        return 0
    table = Table(title=f"{inv.name} ({inv.kind}) — {args.inventory}")
    for col in ("node", "role", "host", "via", "model", "SNR dB", "CPU quota"):
        table.add_column(col)
    for n in inv.nodes:
        via = "local" if n.connection == "local" else f"ssh {n.ssh.user}@{n.host}:{n.ssh.port}"
        table.add_row(n.name, n.role, n.host, via, n.model.label,
                      "" if n.snr_db is None else f"{n.snr_db:g}",
                      "" if n.cpu_quota is None else f"{n.cpu_quota:g}")
    Console().print(table)
    return 0
