"""`testbed check INVENTORY [--trust-new-hosts]`: precheck every node, print a table of checks.

Exit 0 only when every check passes, 1 when one fails, 2 for a bad inventory. The checks and
their fixes live in ``testbed/lab/precheck.py``; this module only shows them.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check", help="precheck every node: SSH, host key, sudo tc, versions, memory, disk, models",
        description="Check every node of an inventory before building on it: SSH reachable, host "
        "key known, `sudo -n tc` allowed on the uplink interface, the same Python, Ray, "
        "llama-cpp-python and testbed versions everywhere, free memory and disk, model files "
        "present with matching sha256. Each failure comes with its fix. Exit 0 only when all pass.")
    p.add_argument("inventory", help="inventory YAML file, e.g. inventory/local.yaml")
    p.add_argument("--trust-new-hosts", action="store_true",
                   help="accept and record the SSH host key of a node not yet in known_hosts "
                   "(reported; a changed key is always refused)")
    p.set_defaults(func=run)


def _rows(checks):
    """Table rows; a node's consecutive skipped checks with one reason share a row."""
    rows: list[list] = []
    for c in checks:
        prev = rows[-1] if rows else None
        if (prev and c.status == "skip" and prev[2] == "skip" and prev[0] == c.node
                and prev[3] == c.detail):
            prev[1] += f", {c.name}"
            continue
        rows.append([c.node, c.name, c.status, c.detail, c.fix])
    return rows


STYLE = {"ok": "green", "FAIL": "bold red", "warn": "yellow", "skip": "dim"}


def run(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from testbed.inputs.inventory import load_inventory
    from testbed.lab.precheck import check_inventory

    inv = load_inventory(args.inventory)
    console = Console()
    done: list[str] = []
    with console.status(f"checking {len(inv.nodes)} nodes of {inv.name}...") as status:
        def on_node(name: str) -> None:
            done.append(name)
            status.update(f"checked {len(done)}/{len(inv.nodes)} nodes (last: {name})...")
        report = check_inventory(inv, trust_new=args.trust_new_hosts, on_node=on_node)
    for msg in report.trusted:
        console.print(f"[yellow]trusted:[/] {escape(msg)}")
    table = Table(title=f"testbed check {args.inventory}", show_lines=False)
    table.add_column("node", overflow="fold")
    table.add_column("check", max_width=22)
    table.add_column("status")
    table.add_column("detail / fix", overflow="fold")
    last = None
    for node, names, status, detail, fix in _rows(report.checks):
        text = escape(detail)
        if fix:
            text += f"\n[bold]fix:[/] {escape(fix)}"
        table.add_row(node if node != last else "", names,
                      f"[{STYLE.get(status, '')}]{status}[/]", text)
        last = node
    console.print(table)
    failed = report.failures()
    skipped = [c for c in report.checks if c.status == "skip"]
    if not report.passed:
        nodes = sorted({c.node for c in failed})
        console.print(f"[bold red]{len(failed)} check(s) failed[/] on {', '.join(nodes)}"
                      + (f", {len(skipped)} could not run" if skipped else ""))
        return 1
    console.print(f"[green]all {len(report.checks)} checks passed[/]")
    return 0
