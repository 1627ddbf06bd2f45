"""`testbed provision INVENTORY [--dry-run]`: install testbed, models, Ray token on a real lab.

Over SSH/SFTP, idempotent, one progress line per node and step (``testbed/lab/provision.py`` has
the steps). Exit 0 when every node is provisioned, 1 when a node failed (each failure named with
its fix; the other nodes still go on), 2 for a bad inventory.
"""

from __future__ import annotations

import time


def add_parser(sub) -> None:
    p = sub.add_parser("provision", help="install testbed, its dependencies, the models and the "
                       "Ray token on every node of a real lab (idempotent)",
                       description="For every node of a kind: real inventory, over SSH/SFTP: "
                       "check the Python release against the server's, create the venv, install "
                       "this testbed and the exact dependency versions this machine runs "
                       "(wheels built or fetched here once, installed offline on the node; "
                       "llama-cpp-python built on the node when this machine has no wheel for "
                       "it), copy each node's model (skipped when its sha256 matches, resumed "
                       "when a copy was interrupted) and the Ray token. A second run copies "
                       "nothing.")
    p.add_argument("inventory", metavar="INVENTORY", help="inventory YAML (kind: real)")
    p.add_argument("--dry-run", action="store_true",
                   help="look at every node (read only) and print what would be done")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    from testbed.inputs.inventory import load_inventory
    from testbed.lab.provision import provision

    console = Console(log_path=False, highlight=False)
    inv = load_inventory(args.inventory)
    t0 = time.monotonic()

    def progress(node: str, msg: str) -> None:
        console.print(f"[bold]{escape(node)}[/]: {escape(msg)}")

    if args.dry_run:
        results = provision(inv, dry_run=True, progress=progress)
    else:
        from testbed.lab.lock import lab_lock      # not while a run uses the venvs
        with lab_lock(inv, "testbed provision"):
            results = provision(inv, progress=progress)
    took = time.monotonic() - t0
    failed = [r for r in results if not r.ok]
    copied = sum(r.copied_bytes for r in results)
    acted = sum(len(r.actions) for r in results)
    for r in failed:
        console.print(f"[red]{escape(r.node)} failed[/]: {escape(r.error or '')}"
                      + (f"\n  fix: {escape(r.fix)}" if r.fix else ""))
    verb = "would do" if args.dry_run else "did"
    if acted == 0 and not failed:
        console.print(f"[green]provisioned[/] in {took:.1f} s: nothing to do, nothing copied "
                      "(every node was already provisioned)")
    else:
        console.print(f"{'[green]provisioned[/]' if not failed else '[red]not provisioned[/]'} "
                      f"in {took:.1f} s: {verb} {acted} actions, copied "
                      f"{copied / 2**20:.1f} MiB; {len(results) - len(failed)} of "
                      f"{len(results)} nodes ok")
    return 1 if failed else 0
